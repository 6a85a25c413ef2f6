"""Text preprocessing for the Triton Python stub: tokenizers + numpy only (never torch or transformers)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from .errors import InvalidInputError


def decode_text(item: bytes | bytearray | memoryview | str | np.bytes_ | np.str_, max_bytes: int | None = None) -> str:
    """A Triton BYTES element -> str; InvalidInputError on invalid UTF-8 or more than `max_bytes` bytes.

    The empty text is valid (CLIP tokenizes it to BOS, EOS, as the HF tokenizer does).
    """
    if isinstance(item, str):
        try:
            data = str(item).encode("utf-8")  # a str with lone surrogates is not UTF-8 either
        except UnicodeEncodeError as e:
            raise InvalidInputError(f"text is not valid Unicode (character {e.start} is a lone surrogate)") from None
    else:
        data = bytes(item)
    if max_bytes is not None and len(data) > max_bytes:
        raise InvalidInputError(f"text is {len(data)} bytes, more than the limit of {max_bytes}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"text is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r})") from None


def decode_texts(items: Sequence, max_bytes: int | None = None) -> list:
    """decode_text each item; an invalid item gives its InvalidInputError in its place instead of a str."""
    out: list = []
    for item in items:
        try:
            out.append(decode_text(item, max_bytes))
        except InvalidInputError as exc:
            out.append(exc)
    return out


def padded_length(longest: int, multiple: int, max_length: int) -> int:
    """longest rounded up to a multiple of `multiple`, capped at max_length."""
    if multiple > 1:
        longest = -(-longest // multiple) * multiple
    return max(1, min(longest, max_length))


class TextTokenizer:
    """tokenizer.json -> (input_ids, attention_mask) int64 (N, L), L = longest text rounded up, capped at max_length."""

    def __init__(self, tokenizer_json: str | os.PathLike, max_length: int, pad_token_id: int, pad_to_multiple_of: int = 16):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = max(1, int(pad_to_multiple_of))
        self._tok = Tokenizer.from_file(os.fspath(tokenizer_json))
        self._tok.no_padding()
        # HF truncation=True, max_length=N: longest_first, right side, special tokens counted in N
        self._tok.enable_truncation(max_length=self.max_length)

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize with special tokens; right-pad with pad_token_id to the batch's bucketed length."""
        if len(texts) == 0:
            return np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True)
        longest = max(len(e.ids) for e in encodings)
        length = padded_length(longest, self.pad_to_multiple_of, self.max_length)
        ids = np.full((len(encodings), length), self.pad_token_id, dtype=np.int64)  # (N, L)
        mask = np.zeros((len(encodings), length), dtype=np.int64)  # (N, L)
        for i, e in enumerate(encodings):
            n = len(e.ids)
            ids[i, :n] = e.ids
            mask[i, :n] = 1
        return ids, mask

    def encode_bytes(self, items: Sequence[bytes], max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """decode_text each item, then encode_batch (raises InvalidInputError on the first bad item)."""
        return self.encode_batch([decode_text(x, max_bytes) for x in items])
