"""The encoders' batching defaults, chosen from the instance kind and the core count.

The measurement behind each default: docs/benchmarks.md, "Batching defaults". `clip-triton build` options
(--instance-count, --intra-op-threads, --preferred-batch-size, --max-queue-delay-us, --cores) override them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from clip_common import contract as C

from .preprocess_plan import node_cores


@dataclass(frozen=True)
class EncoderTuning:
    """How one TorchScript encoder is batched and run."""

    instances: int  # instance_group count (per GPU for KIND_GPU): each instance is its own process under our runner
    threads: int  # INTRA_OP_THREAD_COUNT per instance (0 = torch's default: every core)
    preferred: tuple[int, ...]  # dynamic_batching preferred_batch_size (empty: the batcher takes what is queued)
    queue_delay_us: int  # dynamic_batching max_queue_delay_microseconds

    def as_dict(self) -> dict:
        """JSON-ready fields."""
        return {**asdict(self), "preferred": list(self.preferred)}


def default_tuning(instance_kind: str, cores: int, max_batch_size: int) -> dict[str, EncoderTuning]:
    """Encoder name -> its defaults for `instance_kind` ("cpu" | "gpu") on a machine with `cores` cores."""
    cores = max(1, int(cores))
    if instance_kind == "gpu":
        # Not measured against alternatives (docs/benchmarks.md): two instances (two processes, two CUDA streams, as
        # the GPU kit runs) so one uploads while the other computes; one intra-op thread (the host side only launches
        # kernels); no preferred size and a short wait: the batcher takes whatever is queued, up to max_batch_size.
        gpu = EncoderTuning(instances=2, threads=1, preferred=(), queue_delay_us=2000)
        return {name: gpu for name in C.ENCODERS}
    # CPU: one instance on every core (a second instance gained ~5% for images but holds another copy of torch and
    # the weights: +0.45-0.6 GB); a queue delay long enough for concurrent single-item callers to fill a batch, and
    # a preferred size that runs the batch as soon as that many are queued: texts 8; images 4, so half the callers'
    # images are decoded while the other half's are encoded. Re-checked for issue 24 (8 single-text callers, base size,
    # fp32; machine shared, so rough): preferred [8] 42.8 texts/s, [4, 8] 39.5, [4] 40.4. bf16 builds take the same
    # layout (not measured on a CPU with native bf16 this round). Bulk calls are not shaped here: the client sends
    # requests of the server's max items (64), which the batcher runs as they come.
    text = EncoderTuning(instances=1, threads=cores, preferred=(8,), queue_delay_us=30_000)
    image = EncoderTuning(instances=1, threads=cores, preferred=(4,), queue_delay_us=30_000)
    return {name: _capped(t, max_batch_size) for name, t in ((C.TextEncoder.NAME, text), (C.ImageEncoder.NAME, image))}


def _capped(tuning: EncoderTuning, max_batch_size: int) -> EncoderTuning:
    return replace(tuning, preferred=tuple(b for b in tuning.preferred if b <= max_batch_size))


def encoder_tuning(
    instance_kind: str = "cpu",
    cores: int | None = None,
    max_batch_size: int = 64,
    *,
    instances: int | None = None,
    threads: int | None = None,
    preferred: tuple[int, ...] | list[int] | None = None,
    queue_delay_us: int | None = None,
) -> dict[str, EncoderTuning]:
    """The defaults for this kind and core count, with every given override applied to both encoders."""
    if instances is not None and instances < 1:
        raise ValueError(f"instance count must be >= 1, not {instances}")
    if threads is not None and threads < 0:
        raise ValueError(f"intra-op threads must be >= 0 (0 = torch's default), not {threads}")
    if preferred is not None and any(b < 1 or b > max_batch_size for b in preferred):
        raise ValueError(f"preferred batch sizes must be 1..max_batch_size ({max_batch_size}), not {list(preferred)}")
    if queue_delay_us is not None and queue_delay_us < 0:
        raise ValueError(f"queue delay must be >= 0 us, not {queue_delay_us}")
    given = {
        "instances": instances,
        "threads": threads,
        "queue_delay_us": queue_delay_us,
        "preferred": None if preferred is None else tuple(sorted(set(preferred))),
    }
    overrides = {k: v for k, v in given.items() if v is not None}
    tuning = default_tuning(instance_kind, node_cores() if cores is None else cores, max_batch_size)
    return {name: replace(t, **overrides) for name, t in tuning.items()}
