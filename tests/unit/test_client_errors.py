"""What a gateway in front of Triton answers, as clip_client's typed errors; retry logging, messages, batch_size."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException as E

from clip_client import CLIPClient, InvalidInputError, ModelNotFoundError, RateLimitedError, ServerError, _core
from clip_client._status import is_restricted
from clip_common.endpoint import parse_endpoint

RATE = "rate limited at the gateway: more than 1 requests/s (burst 1) from this client address; retry later"


def test_gateway_answers_map_to_typed_errors():
    """What the gateway answers, typed by status: 429 rate limited (retried); 413 / RESOURCE_EXHAUSTED (over its
    size cap) invalid input, verbatim, not retried; 404 not found; 403 refused (restricted)."""
    err = _core.map_error(E(RATE, "429"), "infer encode_text")
    assert isinstance(err, RateLimitedError) and _core.retryable(err) and err.status == "429"
    assert str(err).startswith("infer encode_text: rate limited: ")
    for exc in (
        E("request body larger than the gateway's cap of 1000 bytes", "413"),
        E("request message larger than the gateway's cap of 1000 bytes", "StatusCode.RESOURCE_EXHAUSTED"),
    ):
        err = _core.map_error(exc, "infer encode_image")
        assert isinstance(err, InvalidInputError) and not _core.retryable(err) and str(err) == exc.message()
    for exc in (
        E("Request for unknown model: 'clip_info' is not found", "404"),
        E("Request for unknown model: 'clip_info' is not found", "StatusCode.NOT_FOUND"),
    ):
        err = _core.map_error(exc, "infer clip_info")
        assert isinstance(err, ModelNotFoundError) and isinstance(err, ServerError) and not _core.retryable(err)
    forbidden = _core.map_error(E("forbidden at the gateway: only the models ... are served", "403"), "config x")
    assert type(forbidden) is ServerError and is_restricted(forbidden)
    restricted = _core.map_error(E("This API is restricted, expecting header 'x'", "StatusCode.UNAVAILABLE"), "c")
    assert is_restricted(restricted)  # Triton's gRPC answer to a restricted API: a live server said UNAVAILABLE
    assert not is_restricted(_core.map_error(E("boom", "500"), "x"))


def test_a_retry_warning_names_the_call_once(caplog):
    client = CLIPClient("http://127.0.0.1:1")
    with caplog.at_level(logging.WARNING, logger="clip_client"):
        client._log_retry("infer encode_text", _core.map_error(E("down", "503"), "infer encode_text"), 0, 0.5)
        client._log_retry("infer encode_text", RateLimitedError("slow down"), 1, 1.0)
    assert [r.getMessage() for r in caplog.records] == [
        "infer encode_text: server unavailable: [503] down; retry 1/8 in 0.50 s",
        "infer encode_text: slow down; retry 2/8 in 1.00 s",
    ]


def test_unreachable_message_ends_one_sentence_once():
    msg = _core.unreachable_message(parse_endpoint("http://127.0.0.1:9"), "connection closed.")
    assert "connection closed. Is the server running" in msg and ".." not in msg


def test_batch_size_takes_any_integer_type():
    client = CLIPClient("http://127.0.0.1:1")
    info = _core.ModelInfo("m", 8, 1.0, 16, 16)
    assert client._batch_limit(info, "text", np.int64(3)) == 3 and client._batch_limit(info, "image", 5) == 5
    for bad in (0, np.int64(0), 1.5, True, np.bool_(True), "2"):
        with pytest.raises(InvalidInputError, match="batch_size must be a positive int"):
            client._batch_limit(info, "text", bad)
