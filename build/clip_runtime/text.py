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
        raise InvalidInputError(f"text is not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 4]!r})") from None


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
    (served, Triton makes the widths itself from the ids' shape: preprocess_text sends ids and lengths)."""

    ids: np.ndarray
    lengths: np.ndarray
    widths: np.ndarray


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
            ids[i, : len(e.ids)] = e.ids
        return TokenRows(ids, lengths, np.full_like(lengths, width))

    def encode_counted(self, texts: Sequence[str]) -> tuple[TokenRows, np.ndarray]:
        """encode_batch and each text's token count (N,) int32 (encode_text's token_counts)."""
        rows = self.encode_batch(texts)
        return rows, rows.lengths.reshape(-1).astype(np.int32)

    def encode_bytes(self, items: Sequence[bytes], max_bytes: int | None = None) -> TokenRows:
        """decode_text each item, then encode_batch (raises InvalidInputError on the first bad item)."""
        return self.encode_batch([decode_text(x, max_bytes) for x in items])


def _pad_rows(
    encoded: Sequence[Sequence[int]], pad_token_id: int, width: int | None = None, left: bool = False
) -> tuple[TokenRows, np.ndarray]:
    """Token id lists -> (TokenRows padded (right, or `left`) to `width` (None: the longest row), every position fed
    to the encoder; each list's length (N,) int32)."""
    counts = np.array([len(e) for e in encoded], dtype=np.int32)  # (N,)
    width = max(1, int(counts.max(initial=0))) if width is None else int(width)
    ids = np.full((len(encoded), width), pad_token_id, dtype=np.int64)  # (N, L)
    for i, e in enumerate(encoded):
        if left:
            ids[i, width - len(e) :] = e
        else:
            ids[i, : len(e)] = e
    lengths = np.full((len(encoded), 1), width, dtype=np.int64)  # (N, 1): every position is fed
    return TokenRows(ids, lengths, np.full_like(lengths, width)), counts


class FixedLengthTokenizer:
    """tokenizer.json -> TokenRows padded to max_length, every position fed to the encoder (no attention mask), as
    the bidirectional towers that pool the last position (SigLIP with a fast / Gemma tokenizer) are run."""

    def __init__(
        self, tokenizer_json: str | os.PathLike, max_length: int, pad_token_id: int, settings: dict | None = None
    ):
        self.inner = TextTokenizer(tokenizer_json, max_length, pad_token_id)
        self.max_length, self.pad_token_id = self.inner.max_length, self.inner.pad_token_id
        self.left = (settings or {}).get("padding_side", "right") == "left"  # Gemma-style tokenizers pad left

    def encode_counted(self, texts: Sequence[str]) -> tuple[TokenRows, np.ndarray]:
        """Tokenize (truncated to max_length) and right-pad every row to max_length; the token counts."""
        rows = self.inner.encode_batch(texts)
        return _pad_rows(
            [r[:n] for r, n in zip(rows.ids.tolist(), rows.lengths.reshape(-1).tolist())],
            self.pad_token_id,
            self.max_length,
            self.left,
        )

    def encode_batch(self, texts: Sequence[str]) -> TokenRows:
        """Tokenize (truncated to max_length) and right-pad every row to max_length."""
        return self.encode_counted(texts)[0]


class SiglipSentencePiece:
    """SigLIP's SentencePiece tokenizer exactly as transformers' SiglipTokenizer runs it (sentencepiece only).

    Special tokens in the text are split off first; every other piece is lower-cased, stripped of ASCII punctuation
    and whitespace-collapsed (SigLIP's canonicalisation), encoded behind an "<unk>" prefix that is cut off again (the
    slow tokenizer's way to drop SentencePiece's dummy prefix), then "</s>" is appended after truncation and the row
    padded to max_length: SigLIP's text tower pools the last position of a max_length row.
    settings: {"eos_token", "unk_token", "do_lower_case", "special": [{"content", "id", "lstrip", "rstrip"}]}.
    """

    def __init__(self, spm_file: str | os.PathLike, settings: dict, max_length: int, pad_token_id: int):
        import re
        import string

        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=os.fspath(spm_file))
        self.max_length, self.pad_token_id = int(max_length), int(pad_token_id)
        self.lower = bool(settings.get("do_lower_case", True))
        self.unk = str(settings.get("unk_token", "<unk>"))
        self.unk_length = len(self.sp.encode(self.unk, out_type=str))
        special = sorted(settings.get("special") or [], key=lambda t: -len(t["content"]))
        self.special = {t["content"]: t for t in special}
        self.eos_id = int(self.special[settings.get("eos_token", "</s>")]["id"])
        self._split = re.compile("(" + "|".join(re.escape(t["content"]) for t in special) + ")") if special else None
        self._punct = str.maketrans("", "", string.punctuation)
        self._spaces = re.compile(r"\s+")

    def _canonical(self, text: str) -> str:
        text = text.lower() if self.lower else text
        return self._spaces.sub(" ", text.translate(self._punct)).strip()

    def _pieces(self, text: str) -> list[str]:
        pieces = self.sp.encode(self.unk + self._canonical(text), out_type=str)
        return pieces[self.unk_length :] if len(pieces) >= self.unk_length else pieces

    def tokens(self, text: str) -> list[str]:
        """The token strings of one text, special tokens included, no EOS added (SiglipTokenizer.tokenize)."""
        text = "\u2581" + text.replace("\u2581", " ")
        parts = [p for p in self._split.split(text)] if self._split else [text]
        for i, part in enumerate(parts):
            if part in self.special:
                t = self.special[part]
                if t.get("rstrip") and i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if t.get("lstrip") and i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        out: list[str] = []
        for part in parts:
            if part:
                out.extend([part] if part in self.special else self._pieces(part))
        if len(out) > 1 and out[0] == "\u2581" and out[1] in self.special:
            out = out[1:]
        return out

    def ids(self, text: str) -> list[int]:
        """Token ids of one text as SiglipTokenizer(text, truncation=True, max_length=max_length) gives them."""
        ids = [int(self.special[t]["id"]) if t in self.special else self.sp.piece_to_id(t) for t in self.tokens(text)]
        ids = ids[: self.max_length - 1]
        return ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id]

    def encode_counted(self, texts: Sequence[str]) -> tuple[TokenRows, np.ndarray]:
        """Every text's ids, right-padded with pad_token_id to max_length; the token counts."""
        return _pad_rows([self.ids(t) for t in texts], self.pad_token_id, self.max_length)

    def encode_batch(self, texts: Sequence[str]) -> TokenRows:
        """Every text's ids, right-padded with pad_token_id to max_length."""
        return self.encode_counted(texts)[0]


class OpenClipBPE:
    """open_clip's default tokenizer (SimpleTokenizer) exactly: OpenAI's BPE over ftfy-fixed, twice HTML-unescaped,
    whitespace-cleaned text (lower-cased for clean=lower, punctuation stripped too for canonicalize), as
    [<start_of_text>] tokens [<end_of_text>], cut to max_length with the last kept token replaced by the end token.
    Rows are padded with pad_token_id to the longest text (causal towers) or to max_length (`fixed`)."""

    def __init__(
        self, bpe_gz: str | os.PathLike, settings: dict, max_length: int, pad_token_id: int, fixed: bool = False
    ):
        import gzip

        import regex

        with gzip.open(os.fspath(bpe_gz)) as f:
            merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        merges = [tuple(m.split()) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        vocab = list(self.byte_encoder.values())
        vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
        special = ["<start_of_text>", "<end_of_text>"]
        self.encoder = {t: i for i, t in enumerate(vocab + special)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {t: t for t in special}
        self.sot, self.eot = self.encoder[special[0]], self.encoder[special[1]]
        self.pat = regex.compile(
            "|".join(special) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
        self.clean = str(settings.get("clean", "lower"))
        self.max_length, self.pad_token_id, self.fixed = int(max_length), int(pad_token_id), fixed

    def _clean(self, text: str) -> str:
        return open_clip_clean(text, self.clean)

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            first, second = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if (first, second) not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        out = " ".join(word)
        if len(self.cache) < 100_000:  # bounded: texts come from clients
            self.cache[token] = out
        return out

    def ids(self, text: str) -> list[int]:
        """[SOT] + BPE ids + [EOT], cut to max_length (the last kept id becomes EOT), as open_clip's tokenizer."""
        ids = [self.sot]
        for token in self.pat.findall(self._clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(token).split(" "))
        ids.append(self.eot)
        if len(ids) > self.max_length:
            ids = ids[: self.max_length]
            ids[-1] = self.eot
        return ids

    def encode_counted(self, texts: Sequence[str]) -> tuple[TokenRows, np.ndarray]:
        """Every text's ids, right-padded to the longest text (or to max_length when `fixed`); the token counts."""
        rows, counts = _pad_rows(
            [self.ids(t) for t in texts], self.pad_token_id, self.max_length if self.fixed else None
        )
        if not self.fixed:  # causal towers: only the tokens count, the encoder masks the padding
            rows = TokenRows(rows.ids, counts.reshape(-1, 1).astype(np.int64), rows.widths)
        return rows, counts

    def encode_batch(self, texts: Sequence[str]) -> TokenRows:
        """Every text's ids, right-padded to the longest text (or to max_length when `fixed`)."""
        return self.encode_counted(texts)[0]


def open_clip_clean(text: str, clean: str) -> str:
    """open_clip's text cleaning: ftfy.fix_text, HTML-unescape twice, strip; then `lower` (whitespace collapsed,
    lower-cased), `whitespace` (collapsed only) or `canonicalize` (punctuation and underscores out, lower-cased)."""
    import html
    import string

    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if clean == "canonicalize":
        text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    text = " ".join(text.split()).strip()
    return text.lower() if clean == "lower" else text


class OpenClipHF(FixedLengthTokenizer):
    """open_clip's HFTokenizer: its text cleaning (settings["clean"], default whitespace), then the Hugging Face
    tokenizer (tokenizer.json) with padding="max_length", truncation to the context length."""

    def __init__(self, tokenizer_json: str | os.PathLike, max_length: int, pad_token_id: int, settings: dict):
        super().__init__(tokenizer_json, max_length, pad_token_id, settings)
        self.clean = str(settings.get("clean", "whitespace"))

    def encode_counted(self, texts: Sequence[str]) -> tuple[TokenRows, np.ndarray]:
        """Clean as open_clip does, then FixedLengthTokenizer.encode_counted."""
        return super().encode_counted([open_clip_clean(t, self.clean) for t in texts])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_tokenizer(
    kind: str, path: str | os.PathLike, max_length: int, pad_token_id: int, settings: dict | None = None
):
    """The preprocess_text tokenizer of a `tokenizer_kind` parameter: tokenizers (pad to the longest text),
    tokenizers_fixed (pad to max_length) or siglip_spm (SiglipSentencePiece)."""
    if kind == "tokenizers":
        return TextTokenizer(path, max_length, pad_token_id)
    if kind == "tokenizers_fixed":
        return FixedLengthTokenizer(path, max_length, pad_token_id, settings)
    if kind == "siglip_spm":
        return SiglipSentencePiece(path, settings or {}, max_length, pad_token_id)
    if kind == "open_clip_hf":
        return OpenClipHF(path, max_length, pad_token_id, settings or {})
    if kind in ("open_clip_bpe", "open_clip_bpe_fixed"):
        return OpenClipBPE(path, settings or {}, max_length, pad_token_id, fixed=kind.endswith("_fixed"))
    raise ValueError(
        f"unknown tokenizer_kind {kind!r} (tokenizers, tokenizers_fixed, siglip_spm, "
        "open_clip_bpe[_fixed], open_clip_hf)"
    )
