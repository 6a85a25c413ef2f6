"""Parquet weight files (one row per tensor) and the WEIGHTS_DIR manifest, with sha256 integrity checks.

A Parquet file holds columns name (string), dtype (string, e.g. "float32"), shape (list<int64>) and data (binary,
raw little-endian C-order bytes), one tensor per row group so that a reader can fetch one tensor alone. Its file
metadata key ``clip_triton`` holds JSON {tower, family, config} (content only: no paths, which would leak
into model_id). Readers never import torch at module level.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .files import sha256_file  # re-exported: convert and export take it from here

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA_KEY = b"clip_triton"
SCHEMA = pa.schema(
    [("name", pa.string()), ("dtype", pa.string()), ("shape", pa.list_(pa.int64())), ("data", pa.binary())]
)
# dtype name -> numpy dtype; bfloat16 has no numpy dtype and is carried as raw uint16 bits.
_NUMPY = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "bfloat16": "<u2",
    "int64": "<i8",
    "int32": "<i4",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}


class WeightsError(Exception):
    """Base class for problems with a WEIGHTS_DIR or a checkpoint."""


class WeightsFormatError(WeightsError):
    """A weights file or manifest is missing or malformed."""


class WeightsIntegrityError(WeightsError):
    """A file's sha256 differs from the one recorded at convert time."""


def compute_model_id(files: Mapping[str, str]) -> str:
    """First 16 hex of sha256 over the Parquet files' sha256s (sorted by file name, one per line)."""
    lines = "".join(f"{name}:{digest}\n" for name, digest in sorted(files.items()) if name.endswith(".parquet"))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def _to_record(name: str, tensor: Any) -> tuple[str, str, list[int], bytes]:
    """(name, dtype, shape, bytes) for a torch tensor or numpy array."""
    if hasattr(tensor, "detach"):  # torch.Tensor, without importing torch here
        t = tensor.detach().cpu().contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        shape = list(t.shape)
        arr = t.view(_torch_int16()).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()
    else:
        arr = np.ascontiguousarray(tensor)
        dtype, shape = arr.dtype.name, list(arr.shape)
    if dtype not in _NUMPY:
        raise WeightsFormatError(f"tensor {name!r}: unsupported dtype {dtype}")
    return name, dtype, shape, arr.astype(_NUMPY[dtype], copy=False).tobytes(order="C")


def _torch_int16():
    import torch

    return torch.int16


def write_parquet(
    path: str | os.PathLike, tensors: Iterable[tuple[str, Any]], meta: Mapping[str, Any], progress: Any = None
) -> str:
    """Write (name, tensor) pairs one row group each with file metadata `clip_triton`; return the file's sha256."""
    path = Path(path)
    schema = SCHEMA.with_metadata({METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()})
    seen: set[str] = set()
    tmp = path.with_suffix(path.suffix + ".tmp")
    with pq.ParquetWriter(tmp, schema, compression="none", write_statistics=["name"]) as writer:
        for name, tensor in tensors:
            if name in seen:
                raise WeightsFormatError(f"duplicate tensor name {name!r}")
            seen.add(name)
            n, dtype, shape, data = _to_record(name, tensor)
            table = pa.Table.from_pydict(
                {"name": [n], "dtype": [dtype], "shape": [shape], "data": [data]}, schema=schema
            )
            writer.write_table(table)  # one row group per tensor
            if progress is not None:
                progress.update(1)
    tmp.replace(path)
    return sha256_file(path)


class ParquetWeights:
    """Lazy reader of one weights Parquet file: only the row groups and columns asked for are read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise WeightsFormatError(f"missing weights file {self.path}")
        try:
            self._file = pq.ParquetFile(self.path, memory_map=True)
        except (pa.ArrowInvalid, OSError) as e:
            raise WeightsFormatError(f"{self.path}: not a Parquet file ({e})") from e
        raw = (self._file.schema_arrow.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise WeightsFormatError(f"{self.path}: no '{METADATA_KEY.decode()}' file metadata")
        self.metadata: dict[str, Any] = json.loads(raw)
        self._index: dict[str, int] | None = None

    def _row_groups(self) -> dict[str, int]:
        """name -> row group, from the name column only."""
        if self._index is None:
            index: dict[str, int] = {}
            for rg in range(self._file.num_row_groups):
                for name in self._file.read_row_group(rg, columns=["name"]).column("name").to_pylist():
                    index[name] = rg
            self._index = index
        return self._index

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._row_groups())

    def read(self, names: Iterable[str] | None = None, prefix: str | None = None) -> dict[str, np.ndarray]:
        """name -> numpy array (bfloat16 as uint16 bits) for the given names and/or prefix; all when both are None."""
        index = self._row_groups()
        wanted = list(index) if names is None else list(names)
        missing = [n for n in wanted if n not in index]
        if missing:
            raise WeightsFormatError(f"{self.path}: no tensors named {missing[:5]}")
        if prefix is not None:
            wanted = [n for n in wanted if n.startswith(prefix)]
        groups = sorted({index[n] for n in wanted})
        out: dict[str, np.ndarray] = {}
        if not groups:
            return out
        table = self._file.read_row_groups(groups, columns=["name", "dtype", "shape", "data"])
        want = set(wanted)
        for name, dtype, shape, data in zip(*(table.column(c).to_pylist() for c in ("name", "dtype", "shape", "data"))):
            if name not in want:
                continue
            if dtype not in _NUMPY:
                raise WeightsFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            arr = np.frombuffer(data, dtype=_NUMPY[dtype])
            if arr.size != int(np.prod(shape, dtype=np.int64)):
                raise WeightsFormatError(f"{self.path}: tensor {name!r} has {arr.size} values for shape {shape}")
            out[name] = arr.reshape(shape)
        return out

    def dtypes(self) -> dict[str, str]:
        """name -> dtype string, without reading the data column."""
        t = self._file.read(columns=["name", "dtype"])
        return dict(zip(t.column("name").to_pylist(), t.column("dtype").to_pylist()))

    def read_torch(self, names: Iterable[str] | None = None, prefix: str | None = None) -> dict[str, Any]:
        """Like read(), as writable torch tensors with their stored dtype."""
        import torch

        dtypes = self.dtypes()
        out = {}
        for name, arr in self.read(names, prefix).items():
            t = torch.from_numpy(arr.copy())
            out[name] = t.view(torch.bfloat16) if dtypes[name] == "bfloat16" else t
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def write_manifest(weights_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write manifest.json (pretty, sorted-free: keys in contract order)."""
    path = Path(weights_dir) / MANIFEST
    path.write_text(json.dumps(dict(manifest), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def verify_files(
    weights_dir: str | os.PathLike, manifest: Mapping[str, Any], files: Iterable[str] | None = None
) -> None:
    """Raise WeightsIntegrityError if any listed file (default: all in manifest["files"]) is missing or altered."""
    root = Path(weights_dir)
    recorded: Mapping[str, str] = manifest.get("files") or {}
    names = list(recorded) if files is None else list(files)
    for name in names:
        if name not in recorded:
            raise WeightsIntegrityError(f"{root}: {name} has no sha256 in {MANIFEST}")
        path = root / name
        if not path.is_file():
            raise WeightsIntegrityError(f"{root}: {name} is listed in {MANIFEST} but missing")
        actual = sha256_file(path)
        if actual != recorded[name]:
            raise WeightsIntegrityError(
                f"{path}: sha256 {actual[:16]}... differs from {recorded[name][:16]}... recorded at convert time"
            )
    if files is None and compute_model_id(recorded) != manifest.get("model_id"):
        raise WeightsIntegrityError(f"{root}: model_id {manifest.get('model_id')} does not match the files' sha256s")


def load_manifest(
    weights_dir: str | os.PathLike, verify: bool = True, files: Iterable[str] | None = None
) -> dict[str, Any]:
    """Read WEIGHTS_DIR/manifest.json; with verify, check the sha256 of `files` (default: every recorded file)."""
    path = Path(weights_dir) / MANIFEST
    if not path.is_file():
        raise WeightsFormatError(f"{weights_dir}: no {MANIFEST} (run `clip-triton convert` first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsFormatError(f"{path}: invalid JSON ({e})") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise WeightsFormatError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    if verify:
        verify_files(weights_dir, manifest, files)
    return manifest


def open_tower(weights_dir: str | os.PathLike, tower: str) -> ParquetWeights:
    """Lazy reader of WEIGHTS_DIR/<tower>.parquet (tower: text | vision)."""
    return ParquetWeights(Path(weights_dir) / f"{tower}.parquet")
