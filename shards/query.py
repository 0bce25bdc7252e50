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
(as curation's drop_bottom_pct), not over the rows other conditions leave. A comparison with a missing
value is false (so `x < 3` and `x >= 3` together leave out the samples without x; `x is null` finds them).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


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


class _Parser:
    """Recursive descent straight to numpy masks over the manifest frame."""

    def __init__(self, text: str, frame: pd.DataFrame) -> None:
        self.text, self.frame = text, frame
        self.tokens = tokenize(text)
        self.i = 0

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
    def parse(self) -> np.ndarray:
        mask = self.or_()
        if self.peek().kind != "end":
            tok = self.peek()
            raise QueryError(f"unexpected {tok.text!r} at character {tok.pos} of {self.text!r}; "
                             "join conditions with and / or")
        return mask

    def or_(self) -> np.ndarray:
        mask = self.and_()
        while self.accept("kw", "or"):
            mask = mask | self.and_()
        return mask

    def and_(self) -> np.ndarray:
        mask = self.not_()
        while self.accept("kw", "and"):
            mask = mask & self.not_()
        return mask

    def not_(self) -> np.ndarray:
        if self.accept("kw", "not"):
            return ~self.not_()
        return self.atom()

    def atom(self) -> np.ndarray:
        n = len(self.frame)
        if self.accept("punct", "("):
            mask = self.or_()
            self.expect("punct", ")", "')'")
            return mask
        if self.accept("kw", "true"):
            return np.ones(n, bool)
        if self.accept("kw", "false"):
            return np.zeros(n, bool)
        tok = self.peek()
        if tok.kind == "name" and tok.text.lower() not in FUNCTIONS:
            nxt = self.peek(1)
            if nxt.kind == "kw" and nxt.text in ("between", "in", "is", "not"):
                return self.column_test()
            if nxt.kind != "op":  # a bare boolean column
                self.take()
                return self.boolean_column(tok)
        left = self.value()
        op = self.expect("op", what="a comparison (<, <=, >, >=, ==, !=)")
        right = self.value()
        return compare(left, op.text, right, self.text)

    def column_test(self) -> np.ndarray:
        tok = self.take()
        values = self.column(tok)
        if self.accept("kw", "is"):
            negate = self.accept("kw", "not") is not None
            self.expect("kw", "null", "null")
            missing = pd.isna(values)
            return ~missing if negate else missing
        negate = self.accept("kw", "not") is not None
        if self.accept("kw", "between"):
            low = self.value()
            self.expect("kw", "and", "and (between LOW and HIGH)")
            high = self.value()
            mask = compare(values, ">=", low, self.text) & compare(values, "<=", high, self.text)
        else:
            self.expect("kw", "in", "between or in")
            self.expect("punct", "(", "'(' after in")
            items = [self.literal()]
            while self.accept("punct", ","):
                items.append(self.literal())
            self.expect("punct", ")", "')'")
            present = ~pd.isna(values)
            mask = present & pd.Series(values).isin(items).to_numpy()
        if negate:  # a missing value is in no range and no list, and not outside them either
            mask = ~mask & ~pd.isna(values)
        return mask

    def value(self) -> Any:
        tok = self.take()
        if tok.kind == "num":
            return float(tok.text)
        if tok.kind == "str":
            return tok.text[1:-1]
        if tok.kind == "name" and tok.text.lower() in FUNCTIONS:
            self.expect("punct", "(", f"'(' after {tok.text}")
            col = self.expect("name", what="a column name")
            self.expect("punct", ",", f"',' ({tok.text}(column, q))")
            q = self.expect("num", what="a percentile in [0, 100]")
            self.expect("punct", ")", "')'")
            return self.percentile(col, float(q.text))
        if tok.kind == "name":
            return self.column(tok)
        raise QueryError(f"expected a column, number or string at character {tok.pos} of {self.text!r}, "
                         f"found {tok.text or 'the end'!r}")

    def literal(self) -> Any:
        tok = self.take()
        if tok.kind == "num":
            return float(tok.text) if not float(tok.text).is_integer() else int(float(tok.text))
        if tok.kind == "str":
            return tok.text[1:-1]
        if tok.kind == "kw" and tok.text in ("true", "false"):
            return tok.text == "true"
        raise QueryError(f"expected a number or string in the list at character {tok.pos} of {self.text!r}")

    # --- columns
    def column(self, tok: Token) -> np.ndarray:
        if tok.text not in self.frame.columns:
            names = [str(c) for c in self.frame.columns]
            hint = difflib.get_close_matches(tok.text, names, n=1)
            fix = f"did you mean {hint[0]}?" if hint else f"columns: {', '.join(sorted(names))}"
            raise QueryError(f"unknown column {tok.text!r} in {self.text!r}; {fix}")
        col = self.frame[tok.text]
        kind = col.dtype.kind
        if kind == "b":  # a missing flag counts as false
            return col.to_numpy(dtype=bool, na_value=False)
        if kind in "iuf":
            return col.to_numpy(dtype=float, na_value=np.nan)
        return col.to_numpy(dtype=object)

    def boolean_column(self, tok: Token) -> np.ndarray:
        values = self.column(tok)
        if values.dtype == bool:
            return values
        if values.dtype == object and all(isinstance(v, (bool, np.bool_)) or v is None for v in values):
            return np.array([bool(v) if v is not None else False for v in values])
        raise QueryError(f"column {tok.text!r} is not true/false, so it cannot stand alone in {self.text!r}; "
                         f"compare it, e.g. {tok.text} > 0")

    def percentile(self, tok: Token, q: float) -> float:
        if not 0 <= q <= 100:
            raise QueryError(f"percentile {q:g} in {self.text!r} must be in [0, 100]")
        values = self.column(tok)
        if values.dtype.kind != "f":
            raise QueryError(f"percentile of {tok.text!r} needs a numeric column")
        present = values[~np.isnan(values)]
        if present.size == 0:
            raise QueryError(f"percentile of {tok.text!r}: no sample has a value")
        return float(np.percentile(present, q))


def compare(left: Any, op: str, right: Any, text: str) -> np.ndarray:
    op = "==" if op == "=" else op
    l_num, r_num = _is_numeric(left), _is_numeric(right)
    if l_num != r_num:
        raise QueryError(f"{text!r} compares text with a number; quote strings and compare like with like")
    if l_num:
        lv, rv = np.asarray(left, dtype=float), np.asarray(right, dtype=float)
        with np.errstate(invalid="ignore"):
            result = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
                      "==": np.equal, "!=": np.not_equal}[op](lv, rv)
        return np.asarray(result & ~np.isnan(lv) & ~np.isnan(rv), bool)
    if op not in ("==", "!="):
        raise QueryError(f"{text!r}: text can only be compared with == or !=")
    lv, rv = np.asarray(left, dtype=object), np.asarray(right, dtype=object)
    eq = np.asarray(lv == rv, bool)
    missing = np.asarray(pd.isna(lv), bool) | np.asarray(pd.isna(rv), bool)
    return (eq if op == "==" else ~eq) & ~missing


def _is_numeric(v: Any) -> bool:
    if isinstance(v, np.ndarray):
        return v.dtype.kind in "iufb"
    return isinstance(v, (int, float))


def evaluate(query: str, frame: pd.DataFrame) -> np.ndarray:
    """Boolean mask over `frame`'s rows."""
    if not query or not query.strip():
        raise QueryError("empty query; write e.g. \"aesthetic >= 5\" or \"true\" for every sample")
    mask = _Parser(query, frame).parse()
    return np.broadcast_to(np.asarray(mask, bool), (len(frame),)).copy()
