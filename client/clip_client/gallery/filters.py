"""Gallery filters: one expression language for every backend, a subset of Milvus' boolean expressions.

    size > 100000 and (path like "%/holiday/%" or array_contains(tags, "cat")) and meta["camera"] == "X100"

Comparisons == != < <= > >= between a column and a literal; `in [..]` / `not in [..]`; `like "pat%"` (% any run,
_ one char); and / or / not (also && || !); array_contains(tags, x), array_contains_any(tags, [..]),
array_contains_all(tags, [..]), array_length(tags); meta["key"] reads a key of the user metadata. Columns: see
base.FIELDS. Literals are checked against the column's type (path / sha256: str; size / width / height /
array_length(tags), mtime: numbers; tags only through the array_ functions). String literals are in double or
single quotes, with \\ \" \' \n \t \r escapes (quote() writes them). Milvus evaluates the string itself (after the
same checks); the embedded backend evaluates the parsed tree with pyarrow. A filter has at most MAX_FILTER_CHARS
characters and MAX_DEPTH nested parentheses / nots.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from ..errors import InvalidInputError
from .base import FIELDS

_TOKEN = re.compile(
    r"""\s*(?:
    (?P<num>-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\],])
  | (?P<name>[A-Za-z_][A-Za-z_0-9]*)
)""",
    re.X,
)
_CMP = {"==", "!=", "<", "<=", ">", ">="}
_FUNCS = {"array_contains", "array_contains_any", "array_contains_all", "array_length"}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_TYPES = {"path": str, "sha256": str, "size": int, "width": int, "height": int, "mtime": float}  # tags, meta: apart
MAX_FILTER_CHARS = 2**21  # find() sends 256 paths of up to MAX_PATH bytes at once
MAX_DEPTH = 64  # nested parentheses and nots
_INT64 = 2**63


class FilterError(InvalidInputError):
    """The filter expression is not valid."""


def quote(value: str) -> str:
    """A str as a filter literal that both engines read back as `value` (Milvus takes other characters as they are)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'


def in_list(column: str, values: list[str]) -> str:
    """`column in ["a", "b"]` for str values."""
    return f"{column} in [{', '.join(quote(v) for v in values)}]"


def _tokens(text: str) -> list[tuple[str, Any]]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise FilterError(f"filter: cannot read {text[pos : pos + 20]!r} (at character {pos})")
        pos = m.end()
        kind = m.lastgroup
        value = m.group(kind)
        if kind == "num":
            num = float(value) if any(c in value for c in ".eE") else int(value)
            if not -_INT64 <= num < _INT64:
                raise FilterError(f"filter: {value} is out of range (64-bit)")
            out.append(("lit", num))
        elif kind == "str":
            out.append(("lit", _unquote(value)))
        elif kind == "name" and value.lower() in ("and", "or", "not", "in", "like", "true", "false"):
            low = value.lower()
            out.append(("lit", low == "true") if low in ("true", "false") else ("op", low))
        else:
            out.append((kind, {"&&": "and", "||": "or", "!": "not"}.get(value, value)))
    return out


_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.S)


def _unquote(s: str) -> str:
    """A quoted literal's text: backslash escapes \\n \\t \\r \\uXXXX, any other escaped char is itself."""

    def one(m: re.Match) -> str:
        e = m.group(1)
        return chr(int(e[1:], 16)) if len(e) == 5 else {"n": "\n", "t": "\t", "r": "\r"}.get(e, e)

    text = _ESCAPE.sub(one, s[1:-1])
    try:  # \uD83D\uDE00 pairs -> one character; a lone surrogate is not text
        return text.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeDecodeError:
        raise FilterError(f"filter: {s[:40]!r} holds a lone surrogate (not valid Unicode)") from None


class _Parser:
    def __init__(self, text: str):
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> tuple[str, Any] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, kind: str | None = None, value: Any = None) -> tuple[str, Any]:
        tok = self.peek()
        if tok is None or (kind and tok[0] != kind) or (value is not None and tok[1] != value):
            want = value or kind or "more input"
            raise FilterError(f"filter: expected {want!r}, got {tok[1] if tok else 'the end'!r}")
        self.i += 1
        return tok

    def accept(self, value: str) -> bool:
        tok = self.peek()
        if tok is not None and tok[0] == "op" and tok[1] == value:
            self.i += 1
            return True
        return False

    def parse(self):
        node = self.or_()
        if self.peek() is not None:
            raise FilterError(f"filter: unexpected {self.peek()[1]!r}")
        return node

    def or_(self):
        nodes = [self.and_()]
        while self.accept("or"):
            nodes.append(self.and_())
        return nodes[0] if len(nodes) == 1 else ("or", nodes)

    def and_(self):
        nodes = [self.not_()]
        while self.accept("and"):
            nodes.append(self.not_())
        return nodes[0] if len(nodes) == 1 else ("and", nodes)

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise FilterError(f"filter: more than {MAX_DEPTH} nested parentheses / nots")

    def not_(self):
        if self.accept("not"):
            self.nest()
            node = ("not", self.not_())
            self.depth -= 1
            return node
        return self.predicate()

    def predicate(self):
        if self.accept("("):
            self.nest()
            node = self.or_()
            self.take("op", ")")
            self.depth -= 1
            return node
        left = self.operand()
        if left[0] == "call" and left[1] != "array_length":
            return left
        if self.accept("like"):
            pattern = self.take("lit")[1]
            if not isinstance(pattern, str):
                raise FilterError("filter: like needs a string pattern")
            return ("like", self._column(left, pattern), pattern)
        negate = self.accept("not")
        if self.accept("in"):
            values = self.literal_list()
            return ("in", self._column(left, *values), values, negate)
        if negate:
            raise FilterError("filter: expected 'in' after 'not'")
        tok = self.peek()
        if tok is None or tok[1] not in _CMP:
            raise FilterError(f"filter: expected a comparison after {left[-1]!r}")
        op = self.take()[1]
        right = self.operand()
        if left[0] == "lit" and right[0] != "lit":
            left, right, op = right, left, _FLIP[op]
        if right[0] != "lit" or left[0] == "lit":
            raise FilterError("filter: compare a column with a literal")
        return ("cmp", op, self._column(left, right[1]), right[1])

    def _column(self, node, *values):
        """The column node, checked against the literals it is compared with (their type must match its)."""
        if node[0] == "lit":
            raise FilterError("filter: like / in apply to a column")
        if node == ("col", "tags"):
            raise FilterError(
                "filter: tags is a list: use array_contains(tags, x), array_contains_any, "
                "array_contains_all or array_length(tags)"
            )
        if node[0] == "meta":
            return node
        name = "array_length(tags)" if node[0] == "call" else node[1]
        kind = int if node[0] == "call" else _TYPES[name]
        for v in values:
            ok = isinstance(v, str) if kind is str else not isinstance(v, (bool, str))
            if not ok:
                raise FilterError(f"filter: {v!r} does not match the type of {name} ({kind.__name__})")
        return node

    def operand(self):
        tok = self.take()
        if tok[0] == "lit":
            return tok
        if tok[0] != "name":
            raise FilterError(f"filter: unexpected {tok[1]!r}")
        name = tok[1]
        if self.accept("("):
            if name not in _FUNCS:
                raise FilterError(f"filter: unknown function {name}; known: {', '.join(sorted(_FUNCS))}")
            col = self.operand()
            if col != ("col", "tags"):
                raise FilterError(f"filter: {name} applies to tags")
            arg = None
            if name != "array_length":
                self.take("op", ",")
                arg = self.literal_list() if name != "array_contains" else self.take("lit")[1]
                if not all(isinstance(t, str) for t in ([arg] if name == "array_contains" else arg)):
                    raise FilterError(f"filter: {name} needs string tags")
            self.take("op", ")")
            return ("call", name, arg)
        if name not in FIELDS:
            raise FilterError(f"filter: unknown column {name!r}; columns: {', '.join(FIELDS)}")
        if name == "meta":
            self.take("op", "[")
            key = self.take("lit")[1]
            self.take("op", "]")
            if not isinstance(key, str):
                raise FilterError('filter: meta["key"] needs a string key')
            return ("meta", key)
        return ("col", name)

    def literal_list(self) -> list:
        self.take("op", "[")
        items = []
        while not self.accept("]"):
            if items:
                self.take("op", ",")
            items.append(self.take("lit")[1])
        return items


def parse(text: str):
    """The filter's syntax tree (FilterError when it is not valid)."""
    if not isinstance(text, str) or not text.strip():
        raise FilterError("filter must be a non-empty str")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter: longer than {MAX_FILTER_CHARS} characters")
    return _Parser(text).parse()


# -------------------------------------------------------------------------------------- evaluation (pyarrow)


def evaluate(tree, table) -> np.ndarray:
    """Boolean mask (len(table),) of the rows of a pyarrow Table that satisfy the parsed filter."""
    import pyarrow.compute as pc

    n = table.num_rows
    kind = tree[0]
    if kind in ("and", "or"):
        masks = [evaluate(node, table) for node in tree[1]]
        return np.logical_and.reduce(masks) if kind == "and" else np.logical_or.reduce(masks)
    if kind == "not":
        return ~evaluate(tree[1], table)
    if kind == "call":
        return _tags_call(tree, table, n)
    if kind == "like":
        col = tree[1]
        if col[0] == "meta":
            rx = re.compile(_like_regex(tree[2]), re.S)
            return np.array(
                [isinstance(v, str) and rx.fullmatch(v) is not None for v in _meta_values(table, col[1])], bool
            )
        return _mask(pc.match_like(_array(table, col), tree[2]))
    if kind == "in":
        col, values, negate = tree[1], tree[2], tree[3]
        if col[0] == "meta":
            found = np.array([_py_in(v, values) for v in _meta_values(table, col[1])], bool)
        else:
            found = _mask(pc.is_in(_array(table, col), value_set=_value_set(values, table, col)))
        return ~found if negate else found
    _, op, col, value = tree
    if col[0] == "meta":
        return np.array([_py_cmp(v, op, value) for v in _meta_values(table, col[1])], bool)
    arr = _array(table, col)
    fn = {
        "==": pc.equal,
        "!=": pc.not_equal,
        "<": pc.less,
        "<=": pc.less_equal,
        ">": pc.greater,
        ">=": pc.greater_equal,
    }[op]
    try:
        return _mask(fn(arr, _scalar(value, arr)))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for incomparable operands
        raise FilterError(f"filter: cannot compare {col[1]} with {value!r}: {e}") from None


def _array(table, col):
    import pyarrow.compute as pc

    if col[0] == "call":  # array_length(tags)
        return pc.list_value_length(table.column("tags"))
    return table.column(col[1])


def _scalar(value: Any, arr):
    import pyarrow as pa

    if isinstance(value, bool) or (isinstance(value, str) != pa.types.is_string(arr.type)):
        raise FilterError(f"filter: {value!r} does not match the column's type {arr.type}")
    return pa.scalar(value, arr.type) if not pa.types.is_floating(arr.type) else pa.scalar(float(value))


def _value_set(values: list, table, col):
    import pyarrow as pa

    arr = _array(table, col)
    for v in values:
        _scalar(v, arr)
    try:
        return pa.array(values, type=arr.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise FilterError(f"filter: {values!r} do not fit the type of {col[-1]} ({arr.type}): {e}") from None


def is_in(column, values: list) -> np.ndarray:
    """Mask of the entries of a string column that are in `values`."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return _mask(pc.is_in(column, value_set=pa.array(values, pa.string())))


def _mask(result) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(result, False).to_numpy(zero_copy_only=False), dtype=bool)


def _tags_call(tree, table, n: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    _, name, arg = tree
    tags = table.column("tags").combine_chunks()
    flat, parents = pc.list_flatten(tags), pc.list_parent_indices(tags).to_numpy()
    wanted = [arg] if name == "array_contains" else list(arg)
    if not all(isinstance(w, str) for w in wanted):
        raise FilterError(f"filter: {name} needs string tags")
    hit = _mask(pc.is_in(flat, value_set=pa.array(wanted, pa.string())))
    if name != "array_contains_all":
        mask = np.zeros(n, bool)
        mask[parents[hit]] = True
        return mask
    need = len(set(wanted))
    pairs = {(int(p), t) for p, t in zip(parents[hit], np.asarray(flat.to_pylist(), object)[hit])}
    counts = np.bincount([p for p, _ in pairs], minlength=n) if pairs else np.zeros(n, int)
    return counts >= need


def _meta_values(table, key: str) -> list:
    missing = object()
    out = []
    for raw in table.column("meta").to_pylist():
        v = json.loads(raw).get(key, missing) if raw and raw != "{}" else missing
        out.append(None if v is missing else v)
    return out


def _py_cmp(v: Any, op: str, value: Any) -> bool:
    if v is None or isinstance(v, (list, dict)) or isinstance(v, str) != isinstance(value, str):
        return False
    try:
        return {"==": v == value, "!=": v != value, "<": v < value, "<=": v <= value, ">": v > value, ">=": v >= value}[
            op
        ]
    except TypeError:
        return False


def _py_in(v: Any, values: list) -> bool:
    return v is not None and not isinstance(v, (list, dict)) and any(_py_cmp(v, "==", x) for x in values)


def _like_regex(pattern: str) -> str:
    return "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
