"""Text preprocessing for the Triton Python stub: tokenizers + numpy only (never torch or transformers)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

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


class TokenRows(NamedTuple):
    """Tokenized texts as the text encoder's forward() takes them (contract.TextEncoder): int64 ids (N, L),
    right-padded to the longest text; lengths (N, 1), the tokens in each row; widths (N, 1), each row's width L
    (served, Triton makes the widths itself from the ids' shape: preprocess_text sends ids and lengths); counts (N,)
    int32, the non-padding tokens of each text (encode_text's token_counts)."""

    ids: np.ndarray
    lengths: np.ndarray
    widths: np.ndarray
    counts: np.ndarray | None = None


class TextTokenizer:
    """tokenizer.json -> TokenRows: the texts' ids padded to the longest of them (truncated to max_length)."""

    def __init__(self, tokenizer_json: str | os.PathLike, max_length: int, pad_token_id: int):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = int(max_length)
        self.pad_token_id = int(pad_token_id)
        self._tok = Tokenizer.from_file(os.fspath(tokenizer_json))
        self._tok.no_padding()
        # HF truncation=True, max_length=N: longest_first, right side, special tokens counted in N
        self._tok.enable_truncation(max_length=self.max_length)

    def encode_batch(self, texts: Sequence[str]) -> TokenRows:
        """Tokenize with special tokens; right-pad with pad_token_id to the longest text (the encoder pads each of
        its batches to the longest row again: one length per batch, whatever the requests' lengths)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=True) if len(texts) else []
        lengths = np.array([[len(e.ids)] for e in encodings], dtype=np.int64).reshape(-1, 1)  # (N, 1)
        width = max(1, int(lengths.max(initial=0)))
        ids = np.full((len(encodings), width), self.pad_token_id, dtype=np.int64)  # (N, L)
        for i, e in enumerate(encodings):
            ids[i, :len(e.ids)] = e.ids
        return TokenRows(ids, lengths, np.full_like(lengths, width), lengths.reshape(-1).astype(np.int32))

    def encode_bytes(self, items: Sequence[bytes], max_bytes: int | None = None) -> TokenRows:
        """decode_text each item, then encode_batch (raises InvalidInputError on the first bad item)."""
        return self.encode_batch([decode_text(x, max_bytes) for x in items])
