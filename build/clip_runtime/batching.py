"""The execute loop every batching Python model shares: gather the requests of one `execute`, validate per item,
make ONE vectorised call for all good items, split the outputs back, one error response per failed request.

Used by preprocess_text, preprocess_image and the Python-based `pytorch` runner; `execute_each` is the loop of the
models that take one problem per request (postprocess, clip_info).

Cancellation: a request whose client went away (gRPC cancel or deadline, an HTTP client that closed its connection,
where Triton's frontend reports it) or whose queue timeout expired is answered CANCELLED without its work: it is
checked when `execute` starts, again before the one compute call (after the expensive `prepare`, e.g. decoding), and
by execute_each before each request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .errors import InvalidInputError, error_response, internal_error


def is_cancelled(request: Any) -> bool:
    """True when Triton marked the request cancelled (InferenceRequest.is_cancelled, python backend 23.10+)."""
    check = getattr(request, "is_cancelled", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001 - a stub that cannot tell: the work goes on
        return False


def cancelled_response(pb_utils: Any) -> Any:
    """The response of a cancelled request: CANCELLED, no work done."""
    code = getattr(pb_utils.TritonError, "CANCELLED", None)
    message = "request cancelled: its client gave up or its queue timeout expired"
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    response = pb_utils.InferenceResponse(error=error)
    try:
        response._clip_cancelled = True  # counted in the log line of this execute
    except AttributeError:  # a response type without __dict__
        pass
    return response


def _log_cancelled(logger: Any, responses: list[Any], when: str) -> None:
    """Say how many requests of this execute were cancelled (their work skipped)."""
    count = sum(1 for r in responses if getattr(r, "_clip_cancelled", False))
    if count and logger is not None:
        logger.log_info(f"{count} request(s) cancelled {when}: skipped")


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
    tensor: Callable[[str, Any], Any] | None = None,
    per_request: Callable[[list[Any]], dict[str, np.ndarray]] | None = None,
) -> list[Any]:
    """One response per request, in order.

    read(request) -> the request's items; InvalidInputError fails that request alone (INVALID_ARG).
    prepare(items) -> one result per item (all requests' items at once, e.g. decoded in a thread pool); an exception
        in place of a result fails that item's request: InvalidInputError -> INVALID_ARG "<label> <j>: <message>",
        anything else -> INTERNAL with a short message (the traceback goes to the log).
    compute(prepared) -> {output name: array} whose leading dim is the total rows of the good items, in order
        (ONE vectorised call for every live request); when it fails, each request is computed alone and only the
        ones that still fail get the error (InvalidInputError -> INVALID_ARG, else INTERNAL with a short message).
    rows(item) -> rows an item contributes to the outputs (default 1).
    tensor(name, rows) -> the output tensor of one request's rows (default pb_utils.Tensor; GPU outputs:
        pb_utils.Tensor.from_dlpack).
    per_request(items) -> {output name: array} added to each answered request's response as they are (host tensors
        not split by rows: e.g. MODEL_ID [1], or TOKEN_COUNTS [n] of the request's n items).
    """
    tensor = tensor or pb_utils.Tensor
    responses: list[Any] = [None] * len(requests)
    items: list[Any] = []
    owner: list[int] = []  # request index of each item
    first: dict[int, int] = {}  # request index -> index of its first item
    for r, request in enumerate(requests):
        if is_cancelled(request):
            responses[r] = cancelled_response(pb_utils)
            continue
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

    _log_cancelled(logger, responses, "before reading")
    prepared = prepare(items) if prepare is not None else items
    for j, result in enumerate(prepared):
        r = owner[j]
        if not isinstance(result, BaseException) or responses[r] is not None:
            continue
        if isinstance(result, InvalidInputError):
            responses[r] = error_response(pb_utils, f"{label} {j - first[r]}: {result}")
        else:
            responses[r] = internal_error(pb_utils, logger, f"{label} {j - first[r]}: internal error", result)

    late = [r for r in first if responses[r] is None and is_cancelled(requests[r])]
    for r in late:  # given up while the batch was being prepared: not computed
        responses[r] = cancelled_response(pb_utils)
    if late and logger is not None:
        logger.log_info(f"{len(late)} request(s) cancelled while being prepared: not computed")
    live: dict[int, list[Any]] = {}  # request -> its good items, in order
    for j, result in enumerate(prepared):
        if responses[owner[j]] is None:
            live.setdefault(owner[j], []).append(result)
    for r, response in _compute(pb_utils, live, compute, rows, logger, tensor, per_request).items():
        responses[r] = response
    return _fill_empty(pb_utils, responses, first)


def _compute(
    pb_utils: Any,
    live: dict[int, list[Any]],
    compute: Callable,
    rows: Callable | None,
    logger: Any,
    tensor: Callable[[str, Any], Any],
    per_request: Callable | None = None,
) -> dict[int, Any]:
    """Responses of the `live` requests (request -> its good items) from ONE compute call, its outputs split back.

    When that call fails and several requests took part, each is computed alone, so one request that makes the
    computation fail (e.g. a tensor the model cannot take) fails alone and its batch-mates are answered.
    """
    if not live:
        return {}
    good = [x for items in live.values() for x in items]
    try:
        outputs = compute(good)
    except Exception as exc:  # noqa: BLE001 - InvalidInputError -> INVALID_ARG; anything else -> INTERNAL, logged
        if len(live) > 1:
            answered: dict[int, Any] = {}
            for r, items in live.items():
                answered.update(_compute(pb_utils, {r: items}, compute, rows, logger, tensor, per_request))
            return answered
        (r,) = live
        if isinstance(exc, InvalidInputError):
            return {r: error_response(pb_utils, str(exc))}
        return {r: internal_error(pb_utils, logger, "internal error while computing the batch", exc)}
    counts = [rows(x) for x in good] if rows is not None else [1] * len(good)
    offsets = np.cumsum([0] + counts)
    answered, k = {}, 0
    for r, items in live.items():  # rows [lo, hi) of the outputs are request r's
        lo, hi = int(offsets[k]), int(offsets[k + len(items)])
        k += len(items)
        extra = per_request(items) if per_request is not None else {}
        answered[r] = pb_utils.InferenceResponse(
            output_tensors=[tensor(name, array[lo:hi]) for name, array in outputs.items()]
            + [pb_utils.Tensor(name, array) for name, array in extra.items()]
        )
    return answered


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
        if is_cancelled(request):
            responses.append(cancelled_response(pb_utils))
            continue
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except InvalidInputError as exc:
            responses.append(error_response(pb_utils, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a fault of ours: logged, short message
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
