"""A real inference with a deadline: does the server answer, not merely run?

A stub that is alive but stopped (SIGSTOP) or hung keeps its process and its model "ready" in Triton 2.51, so neither
the process checks nor readiness see it; only an inference that goes through every stub does.
"""

from __future__ import annotations

import io
import socket

import numpy as np

from clip_common.contract import ClipInfo, ZeroShot

# What an overloaded server answers (queue policy): busy, not broken; the supervisor leaves it alone.
OVERLOAD = ("Exceeds maximum queue size", "Request timeout expired")


def _pixel() -> bytes:
    """An 8 x 8 grey uint8 image in .npy form (no decoder involved)."""
    buf = io.BytesIO()
    np.save(buf, np.full((8, 8, 3), 128, np.uint8))
    return buf.getvalue()


def _column(item: bytes) -> np.ndarray:
    out = np.empty((1, 1), dtype=object)
    out[0, 0] = item
    return out


def probe(http_url: str, models: list[str], timeout: float) -> str | None:
    """None when `zero_shot` (both preprocessors, both encoders, postprocess) and `clip_info`, those of them the server
    serves, answer correctly within `timeout` seconds, or are refused for overload; else why not."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    calls = []
    if ZeroShot.NAME in models:
        calls.append((ZeroShot.NAME, {ZeroShot.TEXT: _column(b"a photo"), ZeroShot.IMAGE: _column(_pixel())},
                      ZeroShot.PROBS))
    if ClipInfo.NAME in models:
        calls.append((ClipInfo.NAME, {}, ClipInfo.INFO))
    if not calls:
        return None
    try:
        client = httpclient.InferenceServerClient(http_url, connection_timeout=timeout, network_timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the server is the answer
        return f"probe: cannot connect ({type(exc).__name__}: {exc})"
    try:
        for model, arrays, output in calls:
            inputs = []
            for name, array in arrays.items():
                tensor = httpclient.InferInput(name, list(array.shape), "BYTES")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            try:
                result = client.infer(model, inputs, outputs=[httpclient.InferRequestedOutput(output)])
            except InferenceServerException as exc:
                if any(o in (exc.message() or "") for o in OVERLOAD):
                    continue
                return f"probe {model}: [{exc.status()}] {exc.message()}"[:300]
            except (socket.timeout, TimeoutError):
                return f"probe {model}: no answer within {timeout:.0f}s"
            except Exception as exc:  # noqa: BLE001 - connection refused / reset / closed
                return f"probe {model}: {type(exc).__name__}: {exc}"[:300]
            answer = result.as_numpy(output)
            if answer is None or (model == ZeroShot.NAME and not np.allclose(answer, 1.0, atol=1e-4)):
                return f"probe {model}: wrong answer {answer!r}"[:300]
        return None
    finally:
        client.close()
