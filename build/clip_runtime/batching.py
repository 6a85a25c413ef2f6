"""The execute loop every batching Python model shares: gather the requests of one `execute`, validate per item,
make ONE vectorised call for all good items, split the outputs back, one error response per failed request.

Used by preprocess_text, preprocess_image and the Python-based `pytorch` runner; `execute_each` is the loop of the
models that take one problem per request (postprocess, clip_info).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InvalidInputError, error_response, internal_error


def execute_batched(
    pb_utils: Any,
    requests: Sequence[Any],
    *,
    read: Callable[[Any], Sequence[Any]],
    compute: Callable[[list[Any]], dict[str, np.ndarray]],
    prepare: Callable[[list[Any]], list[Any]] | None = None,
    rows: Callable[[Any], int] | None = None,
    label: str = "item",
    logger: Any = None,
) -> list[Any]:
    """One response per request, in order.

    read(request) -> the request's items; InvalidInputError fails that request alone (INVALID_ARG).
    prepare(items) -> one result per item (all requests' items at once, e.g. decoded in a thread pool); an exception
        in place of a result fails that item's request: InvalidInputError -> INVALID_ARG "<label> <j>: <message>",
        anything else -> INTERNAL with a short message (the traceback goes to the log).
    compute(prepared) -> {output name: array} whose leading dim is the total rows of the good items, in order
        (ONE vectorised call for every live request); a failure fails those requests with INTERNAL.
    rows(item) -> rows an item contributes to the outputs (default 1).
    """
    responses: list[Any] = [None] * len(requests)
    items: list[Any] = []
    owner: list[int] = []  # request index of each item
    first: dict[int, int] = {}  # request index -> index of its first item
    for r, request in enumerate(requests):
        try:
            mine = read(request)
        except InvalidInputError as exc:
            responses[r] = error_response(pb_utils, str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a fault of ours: logged, short message
            responses[r] = internal_error(pb_utils, logger, "internal error while reading the request", exc)
            continue
        first[r] = len(items)
        items.extend(mine)
        owner.extend([r] * len(mine))

    prepared = prepare(items) if prepare is not None else items
    for j, result in enumerate(prepared):
        r = owner[j]
        if not isinstance(result, BaseException) or responses[r] is not None:
            continue
        if isinstance(result, InvalidInputError):
            responses[r] = error_response(pb_utils, f"{label} {j - first[r]}: {result}")
        else:
            responses[r] = internal_error(pb_utils, logger, f"{label} {j - first[r]}: internal error", result)

    live = [j for j in range(len(prepared)) if responses[owner[j]] is None]
    if not live:
        return _fill_empty(pb_utils, responses, first)
    good = [prepared[j] for j in live]
    try:
        outputs = compute(good)
    except InvalidInputError as exc:  # the batch as a whole was refused (rare: e.g. a shape only compute can check)
        for r in {owner[j] for j in live}:
            responses[r] = error_response(pb_utils, str(exc))
        return responses
    except Exception as exc:  # noqa: BLE001
        failed = internal_error(pb_utils, logger, "internal error while computing the batch", exc)
        for r in {owner[j] for j in live}:
            responses[r] = failed
        return responses

    counts = [rows(x) for x in good] if rows is not None else [1] * len(good)
    offsets = np.cumsum([0] + counts)
    spans: dict[int, list[int]] = {}  # request -> [row start, row end)
    for k, j in enumerate(live):
        span = spans.setdefault(owner[j], [int(offsets[k]), int(offsets[k])])
        span[1] = int(offsets[k + 1])
    for r, (lo, hi) in spans.items():
        responses[r] = pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, array[lo:hi]) for name, array in outputs.items()])
    return _fill_empty(pb_utils, responses, first)


def _fill_empty(pb_utils: Any, responses: list[Any], first: dict[int, int]) -> list[Any]:
    """A request that read no item and failed nothing gets an INVALID_ARG response (read() should refuse it first)."""
    for r, resp in enumerate(responses):
        if resp is None:
            responses[r] = error_response(pb_utils, "request has no item")
    return responses


def execute_each(
    pb_utils: Any,
    requests: Sequence[Any],
    handle: Callable[[Any], list[Any]],
    *,
    what: str = "request",
    logger: Any = None,
) -> list[Any]:
    """One response per request from handle(request) -> output tensors; InvalidInputError -> INVALID_ARG,
    anything else -> INTERNAL with a short message (traceback logged)."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except InvalidInputError as exc:
            responses.append(error_response(pb_utils, str(exc)))
        except Exception as exc:  # noqa: BLE001
            responses.append(internal_error(pb_utils, logger, f"{what} failed", exc))
    return responses


def request_items(pb_utils: Any, request: Any, name: str, label: str, limit: int) -> np.ndarray:
    """The BYTES items of input `name`, flattened (n,); refuses an empty request or more than `limit` items."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidInputError(f"missing input {name}")
    items = tensor.as_numpy().reshape(-1)  # (n,)
    if len(items) == 0:
        raise InvalidInputError(f"request has no {label}")
    if len(items) > limit:
        raise InvalidInputError(f"{len(items)} {label}s in one request, more than the limit of {limit}")
    return items
