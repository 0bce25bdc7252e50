"""Reading one sample's byte range from its shard, locally or from object storage.

Local shards: `os.pread` on file descriptors kept open (a few per process, least recently used closed).
Other fsspec URLs: one ranged read per sample (`cat_file(start, end)`, a single GET on object storage), so a
subset costs only the bytes of its samples and no tar is read whole.
Open lazily: a reader made before a fork opens nothing until used in the worker.

Reads land in one buffer that the reader reuses (fresh memory for every sample costs a page fault per 4 KB,
which on a VM is slower than the copy itself): what `read` returns is valid until the reader's next read;
copy what you keep, or pass memory of your own (`into`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from shards.manifest import join
from shards.tario import SampleFormatError, crc32, parse_sample


class SampleReader:
    def __init__(self, root: str, max_open: int = 16) -> None:
        self.root = str(root)
        self.max_open = max_open
        self._fs = None
        self._path = ""
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pid = None
        self._buf = bytearray()

    def _setup(self) -> None:
        if self._pid != os.getpid():  # after a fork the parent's descriptors are not ours to share
            self._fds = OrderedDict()
            self._fs, self._path = fsspec.core.url_to_fs(self.root)
            self._pid = os.getpid()

    def read_bytes(self, shard: str, offset: int, size: int, into: memoryview | None = None) -> memoryview | bytes:
        """`size` bytes at `offset` of `shard`: a view of the reused buffer (valid until the next read), or of
        `into` when given (memory the caller keeps, e.g. a batch's)."""
        return self.read_spans(shard, [(offset, size)], into)[0]

    def read_spans(self, shard: str, spans: list[tuple[int, int]],
                   into: memoryview | None = None) -> list[memoryview | bytes]:
        """Several (offset, size) ranges of one shard, laid end to end in the reused buffer or in `into`;
        each complete, or SampleFormatError (a truncated shard)."""
        self._setup()
        path = join(self._path, shard)
        total = sum(size for _, size in spans)
        if into is None:
            if len(self._buf) < total:
                self._buf = bytearray(max(total, 2 * len(self._buf)))  # a new one: views of the old stay valid
            into = memoryview(self._buf)
        elif len(into) < total:
            raise ValueError(f"buffer of {len(into)} bytes for {total} to read")
        local = isinstance(self._fs, LocalFileSystem)
        fd = self._fd(path) if local else None
        views, at = [], 0
        for offset, size in spans:
            view = into[at : at + size]
            if local:
                n = 0
                while n < size:
                    got = os.preadv(fd, [view[n:]], offset + n)
                    if got == 0:
                        break
                    n += got
            else:  # object storage: one ranged GET
                data = self._fs.cat_file(path, start=offset, end=offset + size)
                n = len(data)
                view[:n] = data[:size]
            _check_length(shard, offset, size, n)
            views.append(view)
            at += size
        return views

    def read(self, rec: Mapping[str, Any], verify: bool = False) -> dict[str, memoryview]:
        """All members of the sample described by a manifest row: {extension: data} (views of the reused buffer)."""
        data = self.read_bytes(str(rec["shard"]), int(rec["offset"]), int(rec["size_bytes"]))
        if verify and crc32(data) != int(rec["crc32"]):
            raise SampleFormatError(f"crc32 mismatch in {rec['shard']} at offset {rec['offset']}")
        return parse_sample(data, str(rec["key"]))

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        while len(self._fds) > self.max_open:
            _, old = self._fds.popitem(last=False)
            os.close(old)
        return fd

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:  # pickles (e.g. into spawned workers) without open files
        return {"root": self.root, "max_open": self.max_open}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["max_open"])


def _check_length(shard: str, offset: int, size: int, got: int) -> None:
    if got != size:
        raise SampleFormatError(f"{shard} is truncated: {got} of {size} bytes at offset {offset}")


def coalesce(ranges: list[tuple[int, int]], max_gap: int = 64 << 10) -> list[tuple[int, int, list[int]]]:
    """Sorted (offset, size) ranges -> read spans (offset, size, indices of the ranges inside): neighbours
    closer than max_gap share one read, far ones (a jpg on the other side of a large mp4) do not."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    spans: list[tuple[int, int, list[int]]] = []
    for i in order:
        off, size = ranges[i]
        if spans and off - (spans[-1][0] + spans[-1][1]) <= max_gap:
            s_off, s_size, members = spans[-1]
            spans[-1] = (s_off, max(s_size, off + size - s_off), members + [i])
        else:
            spans.append((off, size, [i]))
    return spans
