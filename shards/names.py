"""The one rule for sample keys, tar member names and shard file names: the writer's, applied again wherever
shards are read, because a manifest or a tar may come from anyone.

A key is a plain name: not empty, no `/` or `\\`, no `.`, no NUL or other control character. A member is
`<key>.<ext>`, its extension plain names joined by single dots (`mp4`, `first.jpg`, `latents.safetensors`).
A shard is a plain file name that does not start with a dot. So no name can be absolute, climb out with
`..`, or point into a folder, whatever extracts or joins it. This is stricter than tarfile's `data` filter
(which allows any path that stays inside the destination): anything the writer could not have written is
refused.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_PLAIN = r"[^/\\.\x00-\x1f\x7f]+"
# (RE2 patterns for pyarrow's vectorised match, and the same for Python's re)
KEY_RE = f"^{_PLAIN}$"
EXT_RE = rf"^{_PLAIN}(\.{_PLAIN})*$"
SHARD_RE = r"^[^/\\.\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]*$"
_KEY, _EXT, _SHARD = (re.compile(p[1:-1]) for p in (KEY_RE, EXT_RE, SHARD_RE))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _why(name: object, what: str, fallback: str) -> str:
    if not isinstance(name, str) or not name:
        return f"{what} is empty"
    if name.startswith(("/", "\\")):
        return f"{what} {name!r} is an absolute path"
    if ".." in name:
        return f"{what} {name!r} climbs out of its folder ('..')"
    if "/" in name or "\\" in name:
        return f"{what} {name!r} holds a path separator"
    if _CONTROL.search(name):
        return f"{what} {name!r} holds a control character"
    return f"{what} {name!r} {fallback}"


def key_problem(key: object) -> str | None:
    """Why `key` is not a sample key the writer could have written; None when it is one."""
    if isinstance(key, str) and _KEY.fullmatch(key):
        return None
    return _why(key, "key", "holds a '.' (WebDataset splits member names at the first dot)")


def member_problem(name: str, key: str | None = None) -> str | None:
    """Why the tar member `name` is not `<key>.<ext>` by the rule (of `key` when given); None when it is."""
    member_key, dot, ext = name.partition(".")
    if not (dot and _KEY.fullmatch(member_key) and _EXT.fullmatch(ext)):
        return _why(name, "member", "is not <key>.<ext>")
    if key is not None and member_key != key:
        return f"member {name!r} does not belong to sample {key!r}"
    return None


def shard_problem(name: object) -> str | None:
    """Why `name` is not a shard file name the writer could have written; None when it is one."""
    if isinstance(name, str) and _SHARD.fullmatch(name):
        return None
    return _why(name, "shard", "starts with a dot")


def refused_rows(table: pa.Table) -> list[tuple[int, str]]:
    """(row, why) for each manifest row whose key, shard or member extensions break the rule. Vectorised: the
    Python work is for the refused rows only."""
    bad = np.zeros(table.num_rows, bool)
    for column, pattern in (("key", KEY_RE), ("shard", SHARD_RE)):
        if column in table.column_names:
            ok = pc.fill_null(pc.match_substring_regex(table.column(column), pattern), False)
            bad |= ~ok.to_numpy(zero_copy_only=False)
    if "members" in table.column_names and table.num_rows:
        members = table.column("members").combine_chunks()
        flat = pc.list_flatten(members)
        if len(flat):
            ok = pc.fill_null(pc.match_substring_regex(flat.field("ext"), EXT_RE), False)
            bad[pc.list_parent_indices(members).to_numpy()[~ok.to_numpy(zero_copy_only=False)]] = True
    out = []
    columns = [c for c in ("key", "shard", "members") if c in table.column_names]
    for row in np.flatnonzero(bad):
        rec = table.select(columns).slice(int(row), 1).to_pylist()[0]
        why = key_problem(rec.get("key")) or shard_problem(rec.get("shard"))
        if why is None:
            why = next(p for m in rec.get("members") or [] if (p := member_problem(f"{rec['key']}.{m['ext']}")))
        out.append((int(row), why))
    return out
