"""Subset queries over the manifest: a training stage's data, defined without rewriting a tar.

Grammar (case-insensitive keywords; no arithmetic, nothing is evaluated as Python):

    query      := or ;  or := and ("or" and)* ;  and := not ("and" not)* ;  not := "not" not | atom
    atom       := "(" query ")" | "true" | "false" | COLUMN                  (a boolean column, e.g. keep)
                | value OP value                                           OP: < <= > >= == != =
                | COLUMN ["not"] "between" value "and" value               (inclusive)
                | COLUMN ["not"] "in" "(" literal ("," literal)* ")"
                | COLUMN "is" ["not"] "null"
    value      := COLUMN | NUMBER | 'string' | "string" | percentile(COLUMN, Q) | pct(COLUMN, Q)

Examples:
    aesthetic >= 5 and motion_score between 0.01 and 0.3 and text_area < 0.07
    keep and aesthetic >= percentile(aesthetic, 20)      # SVD-style: drop the bottom 20% by aesthetic
    source in ('a.mp4', 'b.mp4') or video_id == 'f00d'

`percentile(c, q)` is the q-th percentile of column c over every sample of the manifest that has a value
(as curation's drop_bottom_pct; linear interpolation, as numpy's), not over the rows other conditions leave.
A comparison with a missing value (null or NaN) is false (so `x < 3` and `x >= 3` together leave out the
samples without x; `x is null` finds them).

The query is compiled to a DuckDB WHERE clause and run as one scan of the columns it names (projection,
filters pushed into the parquet reader); each percentile is one aggregate over its column. The grammar stays
ours rather than SQL: the compiler emits only quoted column names checked against the manifest's schema,
numbers and escaped string literals, so a query cannot call a function, read a file or run a subquery, and
its errors name the column or the character at fault.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from shards.manifest import Manifest


class QueryError(ValueError):
    """A query that does not parse or names a column the manifest lacks; the message says where and why."""


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<str>'[^']*'|"[^"]*")
    | (?P<op><=|>=|==|!=|<|>|=)
    | (?P<punct>[(),])
    | (?P<name>[A-Za-z_][A-Za-z0-9_.]*)
    )""", re.VERBOSE)
KEYWORDS = {"and", "or", "not", "between", "in", "is", "null", "true", "false"}
FUNCTIONS = {"percentile", "pct"}


@dataclass(frozen=True)
class Token:
    kind: str  # num, str, op, punct, name, kw, end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise QueryError(f"cannot read the query at character {pos}: {text[pos:pos + 20]!r}")
        group = m.lastgroup
        kind, value, start = group, m.group(group), m.start(group)
        if kind == "name" and value.lower() in KEYWORDS:
            kind, value = "kw", value.lower()
        tokens.append(Token(kind, value, start))
        pos = m.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


@dataclass(frozen=True)
class _Value:
    sql: str
    kind: str  # num, bool, str, other (lists, structs: only `is null` applies)


def _kind(t: pa.DataType) -> str:
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "num"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return "other"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _number(text: str, query: str) -> str:
    value = float(text)
    if not math.isfinite(value):
        raise QueryError(f"number {text} in {query!r} is out of range")
    return repr(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


class _Compiler:
    """Recursive descent straight to a SQL boolean expression (never null: a missing value fails a test)."""

    def __init__(self, text: str, schema: pa.Schema, percentile: Callable[[str, float], float | None]) -> None:
        self.text, self.schema, self._percentile = text, schema, percentile
        self.tokens = tokenize(text)
        self.i = 0
        self.columns: set[str] = set()

    # --- token helpers
    def peek(self, offset: int = 0) -> Token:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def take(self) -> Token:
        tok = self.peek()
        self.i += 1
        return tok

    def accept(self, kind: str, text: str | None = None) -> Token | None:
        tok = self.peek()
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def expect(self, kind: str, text: str | None = None, what: str = "") -> Token:
        tok = self.accept(kind, text)
        if tok is None:
            got = self.peek()
            raise QueryError(f"expected {what or text or kind} at character {got.pos} of {self.text!r}, "
                             f"found {got.text or 'the end'!r}")
        return tok

    # --- grammar
    def parse(self) -> str:
        sql = self.or_()
        if self.peek().kind != "end":
            tok = self.peek()
            raise QueryError(f"unexpected {tok.text!r} at character {tok.pos} of {self.text!r}; "
                             "join conditions with and / or")
        return sql

    def or_(self) -> str:
        parts = [self.and_()]
        while self.accept("kw", "or"):
            parts.append(self.and_())
        return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"

    def and_(self) -> str:
        parts = [self.not_()]
        while self.accept("kw", "and"):
            parts.append(self.not_())
        return parts[0] if len(parts) == 1 else "(" + " AND ".join(parts) + ")"

    def not_(self) -> str:
        if self.accept("kw", "not"):
            return f"(NOT {self.not_()})"
        return self.atom()

    def atom(self) -> str:
        if self.accept("punct", "("):
            sql = self.or_()
            self.expect("punct", ")", "')'")
            return sql
        if self.accept("kw", "true"):
            return "TRUE"
        if self.accept("kw", "false"):
            return "FALSE"
        tok = self.peek()
        if tok.kind == "name" and tok.text.lower() not in FUNCTIONS:
            nxt = self.peek(1)
            if nxt.kind == "kw" and nxt.text in ("between", "in", "is", "not"):
                return self.column_test()
            if nxt.kind != "op":  # a bare boolean column
                self.take()
                column = self.column(tok)
                if column.kind != "bool":
                    raise QueryError(f"column {tok.text!r} is not true/false, so it cannot stand alone in "
                                     f"{self.text!r}; compare it, e.g. {tok.text} > 0")
                return f"COALESCE({column.sql}, FALSE)"  # a missing flag counts as false
        left = self.value()
        op = self.expect("op", what="a comparison (<, <=, >, >=, ==, !=)")
        right = self.value()
        return self.compare(left, op.text, right)

    def column_test(self) -> str:
        tok = self.take()
        column = self.column(tok)
        if self.accept("kw", "is"):
            negate = self.accept("kw", "not") is not None
            self.expect("kw", "null", "null")
            return f"({column.sql} IS NOT NULL)" if negate else f"({column.sql} IS NULL)"
        negate = self.accept("kw", "not") is not None
        if self.accept("kw", "between"):
            low = self.value()
            self.expect("kw", "and", "and (between LOW and HIGH)")
            high = self.value()
            test = f"({self.compare(column, '>=', low)} AND {self.compare(column, '<=', high)})"
        else:
            self.expect("kw", "in", "between or in")
            self.expect("punct", "(", "'(' after in")
            items = [self.literal(column)]
            while self.accept("punct", ","):
                items.append(self.literal(column))
            self.expect("punct", ")", "')'")
            test = f"COALESCE({self.operand(column)} IN ({', '.join(items)}), FALSE)"
        if negate:  # a missing value is in no range and no list, and not outside them either
            return f"({column.sql} IS NOT NULL AND NOT {test})"
        return test

    def compare(self, left: _Value, op: str, right: _Value) -> str:
        op = "=" if op in ("=", "==") else "<>" if op == "!=" else op
        for v in (left, right):
            if v.kind == "other":
                raise QueryError(f"{self.text!r} compares {v.sql}, which holds lists or records; test it with "
                                 "is null / is not null")
        l_num, r_num = left.kind in ("num", "bool"), right.kind in ("num", "bool")
        if l_num != r_num:
            raise QueryError(f"{self.text!r} compares text with a number; quote strings and compare like with like")
        if not l_num and op not in ("=", "<>"):
            raise QueryError(f"{self.text!r}: text can only be compared with == or !=")
        return f"COALESCE({self.operand(left)} {op} {self.operand(right)}, FALSE)"

    @staticmethod
    def operand(v: _Value) -> str:
        return f"CAST({v.sql} AS DOUBLE)" if v.kind == "bool" else v.sql

    def value(self) -> _Value:
        tok = self.take()
        if tok.kind == "num":
            return _Value(_number(tok.text, self.text), "num")
        if tok.kind == "str":
            return _Value(_text(tok.text[1:-1]), "str")
        if tok.kind == "name" and tok.text.lower() in FUNCTIONS:
            self.expect("punct", "(", f"'(' after {tok.text}")
            col = self.expect("name", what="a column name")
            self.expect("punct", ",", f"',' ({tok.text}(column, q))")
            q = self.expect("num", what="a percentile in [0, 100]")
            self.expect("punct", ")", "')'")
            return _Value(repr(self.percentile(col, float(q.text))), "num")
        if tok.kind == "name":
            return self.column(tok)
        raise QueryError(f"expected a column, number or string at character {tok.pos} of {self.text!r}, "
                         f"found {tok.text or 'the end'!r}")

    def literal(self, column: _Value) -> str:
        tok = self.take()
        if tok.kind == "num":
            sql, kind = _number(tok.text, self.text), "num"
        elif tok.kind == "str":
            sql, kind = _text(tok.text[1:-1]), "str"
        elif tok.kind == "kw" and tok.text in ("true", "false"):
            sql, kind = tok.text.upper(), "bool"
        else:
            raise QueryError(f"expected a number or string in the list at character {tok.pos} of {self.text!r}")
        numeric = ("num", "bool")
        if (kind in numeric) != (column.kind in numeric) or column.kind == "other":
            raise QueryError(f"{self.text!r} compares text with a number in an `in` list; quote strings and "
                             "compare like with like")
        return f"CAST({sql} AS DOUBLE)" if column.kind == "num" and kind == "bool" else sql

    # --- columns
    def column(self, tok: Token) -> _Value:
        if tok.text not in self.schema.names:
            names = [str(c) for c in self.schema.names]
            hint = difflib.get_close_matches(tok.text, names, n=1)
            fix = f"did you mean {hint[0]}?" if hint else f"columns: {', '.join(sorted(names))}"
            raise QueryError(f"unknown column {tok.text!r} in {self.text!r}; {fix}")
        self.columns.add(tok.text)
        t = self.schema.field(tok.text).type
        return _Value(_column_sql(tok.text, t), _kind(t))

    def percentile(self, tok: Token, q: float) -> float:
        if not 0 <= q <= 100:
            raise QueryError(f"percentile {q:g} in {self.text!r} must be in [0, 100]")
        column = self.column(tok)
        if column.kind != "num":
            raise QueryError(f"percentile of {tok.text!r} needs a numeric column")
        value = self._percentile(column.sql, q / 100)
        if value is None:
            raise QueryError(f"percentile of {tok.text!r}: no sample has a value")
        return float(value)


def _column_sql(name: str, t: pa.DataType) -> str:
    """A column as the query sees it: NaN reads as missing, so that it fails comparisons like null."""
    if pa.types.is_floating(t):
        return f"(CASE WHEN isnan({_quote(name)}) THEN NULL ELSE {_quote(name)} END)"
    return _quote(name)


@dataclass
class Compiled:
    """A query as a DuckDB boolean expression over `source`, and the columns it reads."""

    where: str
    columns: list[str]


def compile_query(query: str, schema: pa.Schema, con, source: str) -> Compiled:
    """`query` -> a WHERE expression; percentiles are computed here, each as one aggregate over `source`."""
    if not query or not query.strip():
        raise QueryError("empty query; write e.g. \"aesthetic >= 5\" or \"true\" for every sample")

    def percentile(column_sql: str, q: float) -> float | None:
        return con.execute(f"SELECT quantile_cont({column_sql}, {q!r}) FROM {source} "
                           f"WHERE {column_sql} IS NOT NULL").fetchall()[0][0]

    compiler = _Compiler(query, schema, percentile)
    where = compiler.parse()
    return Compiled(where, sorted(compiler.columns))


def _connect():
    import duckdb

    return duckdb.connect(config={"threads": 2})


def evaluate(query: str, frame: pd.DataFrame | pa.Table) -> np.ndarray:
    """Boolean mask over the rows of an in-memory table (the manifest's own queries go through `select_rows`)."""
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    con = _connect()
    con.register("samples", table)
    compiled = compile_query(query, table.schema, con, "samples")
    mask = con.sql(f"SELECT {compiled.where} AS hit FROM samples").to_arrow_table().column("hit")
    return mask.to_numpy(zero_copy_only=False).astype(bool)


def select_rows(manifest: "Manifest", query: str) -> np.ndarray:
    """Rows (ascending) of the manifest's samples where `query` holds: one DuckDB scan of the manifest files
    reading only the columns the query names, returning (file, row in file) of the hits."""
    con = _connect()
    paths = manifest.part_paths
    if manifest.fs.protocol not in ("file", "local") and "file" not in manifest.fs.protocol:
        con.register_filesystem(manifest.fs)
        paths = [manifest.fs.unstrip_protocol(p) for p in paths]
    listing = "[" + ", ".join(_text(p) for p in paths) + "]"
    source = (f"read_parquet({listing}, filename='__lvd_file', file_row_number=true, union_by_name=true)")
    compiled = compile_query(query, manifest.schema, con, source)
    hits = con.sql(f"SELECT __lvd_file, file_row_number FROM {source} WHERE {compiled.where}").to_arrow_table()
    file_index = pc.index_in(hits.column("__lvd_file"), value_set=pa.array(paths)).to_numpy(zero_copy_only=False)
    rows = manifest.part_starts[file_index] + hits.column("file_row_number").to_numpy(zero_copy_only=False)
    return np.sort(rows.astype(np.int64))
