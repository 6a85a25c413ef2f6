"""How many preprocessor instances and decode threads `clip-triton build` gives the Python preprocessors.

`--preprocess-instances auto` (the default) is one small rule over the node's cores and the build's kinds:
- CPU builds (`--instance-kind cpu`): one preprocess_image and one preprocess_text instance, decode threads
  min(4, cores) chosen at load: the defaults measured on 2-core nodes (CPU batching is tuned apart, issue 13);
- GPU builds decoding on the CPU (`--image-decode cpu`): preprocess_image gets cores // 2 instances (at most 32)
  x 2 decode threads, so decoding runs on every core in separate processes (one GIL each; one stub with 16 threads
  decoded 370 images/s on a 16-core H200 node); preprocess_text gets cores // 8 instances (at least 1);
- `--image-decode gpu`: min(8, cores // 4) preprocess_image instances on the GPU (nvJPEG decodes; the CPU parses
  headers and decodes only the items that fall back) x 2 threads; preprocess_text as above.
`N` or `N,M` sets N preprocess_image and M (default 1) preprocess_text instances; the decode threads then stay as
`--limit decode_threads` says (default 0: min(4, cores) at load). `--limit decode_threads` always wins.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

IMAGE_DECODES = ("cpu", "gpu")
AUTO_DECODE_THREADS = 2  # per preprocess_image instance on GPU builds
MAX_CPU_DECODE_INSTANCES = 32
MAX_GPU_DECODE_INSTANCES = 8  # each holds a CUDA context and nvJPEG state


@dataclass(frozen=True)
class PreprocessPlan:
    """The preprocessors' instance counts and decode threads, and why (recorded in clip_triton.json and clip_info)."""

    image_instances: int
    text_instances: int
    decode_threads: int  # per preprocess_image instance; 0 = min(4, cores) at load
    image_decode: str  # cpu: Pillow, exact; gpu: nvJPEG + GPU resize (KIND_GPU instances)
    rule: str  # "auto" or "explicit"
    cores: int  # the cores the rule saw (this machine's, where it builds)

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


def node_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_instances(text: str) -> tuple[int, int] | None:
    """`auto` -> None; `N` -> (N, 1); `N,M` -> (N, M); ValueError otherwise."""
    text = str(text).strip().lower()
    if text == "auto":
        return None
    parts = text.split(",")
    try:
        counts = [int(p) for p in parts]
    except ValueError:
        counts = []
    if len(counts) not in (1, 2) or min(counts) < 1:
        raise ValueError(f"--preprocess-instances {text!r}: give auto, N or N,M (instances >= 1)")
    return counts[0], counts[1] if len(counts) == 2 else 1


def plan_preprocessing(
    instance_kind: str = "cpu",
    image_decode: str = "cpu",
    instances: str = "auto",
    decode_threads: int | None = None,
    cores: int | None = None,
) -> PreprocessPlan:
    """The plan for a build (see the module docstring); ValueError for a bad combination or count."""
    if image_decode not in IMAGE_DECODES:
        raise ValueError(f"image_decode must be one of {IMAGE_DECODES}, not {image_decode!r}")
    if image_decode == "gpu" and instance_kind != "gpu":
        raise ValueError("--image-decode gpu needs --instance-kind gpu (the pixels stay on the GPU for the encoder)")
    cores = cores or node_cores()
    explicit = parse_instances(instances)
    if explicit is not None:
        image, text = explicit
        threads = 0
    elif instance_kind != "gpu":
        image, text, threads = 1, 1, 0
    else:
        text, threads = max(1, cores // 8), AUTO_DECODE_THREADS
        image = (
            min(MAX_GPU_DECODE_INSTANCES, max(1, cores // 4))
            if image_decode == "gpu"
            else min(MAX_CPU_DECODE_INSTANCES, max(1, cores // AUTO_DECODE_THREADS))
        )
    return PreprocessPlan(
        image,
        text,
        threads if decode_threads is None else int(decode_threads),
        image_decode,
        "auto" if explicit is None else "explicit",
        cores,
    )
