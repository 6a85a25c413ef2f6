"""The GPU kit: `make gpu-kit` (`assemble`) packs everything a GPU machine without network lacks into one folder of
at most 64 MiB; its launcher (`launcher`, copied as `run_kit.py`) unpacks it there and runs the one measuring script
(`run`: parity against the fp32 CPU reference, towers alone, end-to-end through Triton, perf_analyzer, GPU
utilisation; `gpu` samples nvidia-smi, `report` writes the markdown)."""
