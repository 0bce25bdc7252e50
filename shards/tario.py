"""The few tar operations shards need, on byte ranges rather than whole archives.

A sample is the contiguous run of tar members `<key>.<ext>` (header blocks and padded data). The manifest
records where that run starts and how long it is, so a reader fetches one sample with one ranged read
(a `pread` locally, one GET on object storage) and parses it here, without reading the rest of the shard.
Tar headers carry their own checksum, so a flipped byte in a header is caught by parsing alone; the
manifest's per-sample crc32 catches one in the data.
"""

from __future__ import annotations

import tarfile
from isal import isal_zlib

from shards.names import key_problem, member_problem

BLOCK = tarfile.BLOCKSIZE  # 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


class SampleFormatError(ValueError):
    """A sample's bytes do not parse as the tar members of one key (corrupt or truncated)."""


def member_bytes(name: str, data: bytes, mtime: int = 0) -> bytes:
    """One tar member: header block(s), data, padding to a block. mtime is fixed so that a rewritten
    shard is byte-identical to the first write (resume and checksums rely on it)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = mtime
    info.mode = 0o444
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.GNU_FORMAT, encoding="utf-8", errors="strict")
    pad = (-len(data)) % BLOCK
    return b"".join((header, data, b"\0" * pad))


def sample_bytes(key: str, files: dict[str, bytes]) -> bytes:
    """All members of one sample in a fixed order (sorted by extension), so that equal input gives equal bytes."""
    return sample_layout(key, files)[0]


def sample_layout(key: str, files: dict[str, bytes]) -> tuple[bytes, list[dict]]:
    """The sample's bytes and where each member's data lies in them: [{ext, offset, size, crc32}], so that a
    reader can fetch one member (the latents, a frame) without the rest."""
    problem = key_problem(key) or next((p for ext in files if (p := member_problem(f"{key}.{ext}"))), None)
    if problem:
        raise ValueError(f"cannot write sample: {problem}; sample keys are plain names (clip ids) without '/', "
                         "'.' or control characters")
    parts, layout, pos = [], [], 0
    for ext in sorted(files):
        data = files[ext]
        member = member_bytes(f"{key}.{ext}", data)
        header = len(member) - len(data) - (-len(data)) % BLOCK
        layout.append({"ext": ext, "offset": pos + header, "size": len(data), "crc32": crc32(data)})
        parts.append(member)
        pos += len(member)
    return b"".join(parts), layout


def parse_sample(buf: bytes | memoryview, key: str | None = None) -> dict[str, memoryview]:
    """Members of one sample's byte range: {extension: data} (views into `buf`). Raises SampleFormatError on
    any corruption: a header whose checksum fails, a member running past the range, a name of another key or
    one the writer could not have written (shards/names.py)."""
    view = memoryview(buf)
    out: dict[str, memoryview] = {}
    pos, long_name = 0, None
    while pos < len(view):
        block = bytes(view[pos : pos + BLOCK])
        if len(block) < BLOCK:
            raise SampleFormatError(f"truncated tar header at byte {pos} of {len(view)}")
        if block == ZERO_BLOCK:
            break  # end-of-archive marker: only after the last sample of a shard
        name, size, kind = _header(block, pos)
        start = pos + BLOCK
        end = start + size
        if end > len(view):
            raise SampleFormatError(f"member {name!r} runs past the sample's end ({end} > {len(view)})")
        pos = end + (-size) % BLOCK
        if kind == b"L":  # GNU long name: the data is the next member's name
            long_name = bytes(view[start:end]).rstrip(b"\0").decode("utf-8", "replace")
            continue
        name, long_name = long_name or name, None
        if kind not in (b"0", b"\0"):
            raise SampleFormatError(f"member {name!r} is not a regular file (type {kind!r})")
        problem = member_problem(name, key)
        if problem:
            raise SampleFormatError(problem)
        out[name.partition(".")[2]] = view[start:end]
    if not out:
        raise SampleFormatError("no members")
    return out


ZERO_BLOCK = b"\0" * BLOCK


def _header(block: bytes, pos: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header, its checksum verified. Written for speed: tarfile's own
    parser costs more than the read of a small sample."""
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        if block[124] & 0x80:  # GNU base-256 size
            size = int.from_bytes(block[125:136], "big")
        else:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise SampleFormatError(f"bad tar header at byte {pos}: unreadable number") from None
    if stored != sum(block[:148]) + 256 + sum(block[156:]):
        raise SampleFormatError(f"bad tar header at byte {pos}: checksum mismatch")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\0" and block[345]:  # POSIX prefix field
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


def crc32(data: bytes | memoryview) -> int:
    """zlib's CRC-32 (the manifest's checksums), computed by ISA-L: the loader checks every member it reads, and
    zlib's own runs at ~1-2 GB/s here, slower than a page-cache read."""
    return isal_zlib.crc32(data) & 0xFFFFFFFF
