"""OpenAI /v1/embeddings requests (texts and images in three dialects) and responses, without any I/O."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

ENCODING_FORMATS = ("float", "base64")
MAX_INPUTS = 2048  # OpenAI's own limit of inputs per request
DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9=._+-]+)*;base64,", re.ASCII | re.IGNORECASE)
_BASE64_SPACE = re.compile(rb"[ \t\r\n]+")  # line-wrapped base64 (GNU `base64`, MIME: every 76 characters)
_URLSAFE = bytes.maketrans(b"-_", b"+/")


class APIError(Exception):
    """An error answered in OpenAI's schema: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {
        400: "invalid_request_error",
        401: "invalid_request_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        408: "invalid_request_error",
        429: "rate_limit_error",
        503: "server_error",
        500: "server_error",
    }

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = "input", code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Item:
    """One input: a text (UTF-8 bytes), an image's bytes, or an image URL still to fetch."""

    kind: str  # "text" | "image" | "url"
    data: bytes | str


@dataclass
class EmbeddingRequest:
    model: str
    items: list[Item]
    encoding_format: str
    dimensions: int | None


def parse_request(body: Any, max_image_bytes: int) -> EmbeddingRequest:
    """The JSON body of POST /v1/embeddings -> EmbeddingRequest, or APIError 400 saying what is wrong."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", param=None)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: one of the ids GET /v1/models lists", param="model")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ENCODING_FORMATS:
        raise invalid(f"encoding_format must be 'float' or 'base64', not {fmt!r}", param="encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)):
        raise invalid("'dimensions' must be an integer", param="dimensions")
    modality = body.get("modality", "text")
    if modality not in ("text", "image"):
        raise invalid(f"modality must be 'text' or 'image', not {modality!r}", param="modality")
    if "input" not in body:
        raise invalid("'input' is required: a string or a list of strings")
    raw = body["input"]
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise invalid("'input' is empty: give at least one string")
    if len(values) > MAX_INPUTS:
        raise invalid(f"'input' has {len(values)} items; at most {MAX_INPUTS} per request")
    if _token_ids(values):
        raise invalid(
            "token-id arrays are not accepted: send the texts as strings (LangChain's OpenAIEmbeddings: "
            "pass check_embedding_ctx_length=False)",
            code="token_ids_not_supported",
        )
    items = [_item(v, i, modality, max_image_bytes) for i, v in enumerate(values)]
    return EmbeddingRequest(model=model, items=items, encoding_format=fmt, dimensions=dimensions)


def _token_ids(values: list) -> bool:
    first = values[0]
    return (
        isinstance(first, int)
        and not isinstance(first, bool)
        or (isinstance(first, list) and all(isinstance(t, int) for t in first))
    )


def _item(value: Any, index: int, modality: str, max_image_bytes: int) -> Item:
    param = f"input[{index}]"
    if isinstance(value, dict):  # Jina: {"text": ...} or {"image": ...}
        keys = set(value) - {"type"}
        if keys == {"text"} and isinstance(value["text"], str):
            return Item("text", _utf8(value["text"], param))
        if keys == {"image"} and isinstance(value["image"], str):
            return _image(value["image"], param, max_image_bytes, bare_base64=True)
        raise invalid(
            f'{param}: an object input must be {{"text": "..."}} or {{"image": "URL, data URI or base64"}}}}',
            param=param,
        )
    if not isinstance(value, str):
        raise invalid(f"{param}: expected a string, got {type(value).__name__}", param=param)
    if modality == "image":  # Infinity: every input is a URL or a data URI
        return _image(value, param, max_image_bytes, bare_base64=False)
    if value[:11].lower() == "data:image/":  # NV-CLIP: data URIs mixed with texts (the scheme is case-insensitive)
        return _image(value, param, max_image_bytes, bare_base64=False)
    return Item("text", _utf8(value, param))


def _utf8(text: str, param: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid(f"{param}: the text is not valid Unicode (a lone surrogate)", param=param) from None


def _image(value: str, param: str, max_image_bytes: int, bare_base64: bool) -> Item:
    if value[:8].lower().startswith(("http://", "https://")):  # schemes are case-insensitive (RFC 3986)
        return Item("url", value)
    match = DATA_URI.match(value)
    if match:
        payload = value[match.end() :]
    elif value[:5].lower() == "data:":
        raise invalid(f"{param}: an image data URI must look like data:image/<format>;base64,<data>", param=param)
    elif bare_base64:
        payload = value
    else:
        raise invalid(f"{param}: an image must be an http(s) URL or a data:image/...;base64, URI", param=param)
    raw = _canonical_base64(payload)
    if len(raw) * 3 // 4 > max_image_bytes + 2:
        raise APIError(413, f"{param}: the image is larger than the limit of {max_image_bytes} bytes", param=param)
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the image's base64 data is malformed", param=param) from None
    if not data:
        raise invalid(f"{param}: the image is empty", param=param)
    if len(data) > max_image_bytes:
        raise APIError(
            413, f"{param}: the image is {len(data)} bytes, more than the limit of {max_image_bytes}", param=param
        )
    return Item("image", data)


def _canonical_base64(payload: str) -> bytes:
    """Base64 as encoders write it: line breaks dropped, URL-safe letters mapped, missing padding added."""
    raw = _BASE64_SPACE.sub(b"", payload.encode("ascii", "replace")).translate(_URLSAFE)
    return raw + b"=" * (-len(raw) % 4)


def embedding_value(row: np.ndarray, encoding_format: str) -> Any:
    """One embedding as OpenAI answers it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(row, dtype="<f4").tobytes()).decode("ascii")
    return row.astype(np.float32)


def response_body(model: str, embeds: np.ndarray, encoding_format: str, prompt_tokens: int) -> dict:
    """OpenAI's embeddings response: object "list", data[i] {object, index, embedding}, model, usage."""
    data = [
        {"object": "embedding", "index": i, "embedding": embedding_value(row, encoding_format)}
        for i, row in enumerate(embeds)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": int(prompt_tokens), "total_tokens": int(prompt_tokens)},
    }
