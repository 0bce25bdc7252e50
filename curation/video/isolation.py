"""Runs untrusted-media work in a child process with a time limit.

A decoder can hang (a FIFO, a pathological stream) or crash the process (a segfault in a native
library). The pipeline's actor keeps one child; a call that overruns its limit or kills the child
becomes a failure reason, the child is replaced, and the run goes on.

A limit computed from what the file declares (its duration) can be bought by a lying header, so a call can
also be bounded by progress: the work calls `heartbeat()` as it goes (the decoders do, once per frame), and
a call given `stall_s` ends when no heartbeat came for that long.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    ok: bool
    value: Any = None     # the function's return value when ok
    reason: str = ""      # why not, when not ok: "timeout: ...", "crash: ...", "error: ..."


# In a child: the shared clock reading of the last heartbeat, which the parent watches (None elsewhere).
_beat = None
# How often the parent looks at the heartbeat while it waits for a result.
_STALL_CHECK_S = 0.25


def heartbeat() -> None:
    """Marks progress; in an isolated child it resets the call's stall limit, anywhere else it does nothing."""
    if _beat is not None:
        _beat.value = time.monotonic()  # CLOCK_MONOTONIC: the same clock in parent and child


def _import(module: str) -> None:
    importlib.import_module(module)


def _serve(conn, beat=None) -> None:  # the child's loop: one call at a time until the pipe closes
    global _beat
    _beat = beat
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    # a process group of its own, so that a kill also ends the programs a call started (the ffmpeg cutting a
    # clip) instead of leaving them running without a parent
    os.setpgid(0, 0)
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - everything must come back as a reason
            conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=4)))


class IsolatedWorker:
    """One child process serving calls; `call` never raises for what happens inside the child.

    A fresh child first imports the called function's module under `startup_timeout_s`, so a call's
    own limit measures the work (a 5 s probe limit is not eaten by interpreter start and imports)."""

    def __init__(self, start_method: str = "spawn", startup_timeout_s: float = 120.0) -> None:
        self._ctx = mp.get_context(start_method)
        self._startup_timeout_s = startup_timeout_s
        self._proc = None
        self._conn = None
        self._beat = self._ctx.RawValue("d", 0.0)  # written by the child's heartbeat(), read here

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, self._beat), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float, stall_s: float | None = None,
             **kwargs: Any) -> Outcome:
        """fn(*args, **kwargs) in the child, ended after `timeout_s`, or once `stall_s` pass without a
        `heartbeat()` from it (None: no progress bound; the first heartbeat is due `stall_s` after the start)."""
        if self._proc is None or not self._proc.is_alive():
            self._start()
            warm = self._send(_import, (fn.__module__,), {}, self._startup_timeout_s)
            if not warm.ok:
                return Outcome(False, reason=f"crash: worker process did not start ({warm.reason})")
        return self._send(fn, args, kwargs, timeout_s, stall_s)

    def _send(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout_s: float,
              stall_s: float | None = None) -> Outcome:
        try:
            self._beat.value = time.monotonic()
            self._conn.send((fn, args, kwargs))
            deadline = time.monotonic() + timeout_s
            while not self._conn.poll(max(0.0, min(_STALL_CHECK_S if stall_s else timeout_s,
                                                   deadline - time.monotonic()))):
                now = time.monotonic()
                if now >= deadline:
                    self._kill()
                    return Outcome(False, reason=f"timeout: no result within {timeout_s:.0f} s")
                if stall_s is not None and now - self._beat.value > stall_s:
                    self._kill()
                    return Outcome(False, reason=f"timeout: no progress (no new frame) for {stall_s:g} s")
            msg = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = self._kill()
            return Outcome(False, reason=f"crash: worker process died ({_describe_exit(code)})")
        if msg[0] == "ok":
            return Outcome(True, value=msg[1])
        return Outcome(False, reason=f"error: {msg[1]}", value=msg[2])

    def _kill(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        try:  # the child and whatever it started (its group; still there when the child died first)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.is_alive():  # killed before it made its group
            proc.kill()
        proc.join(timeout=10)
        return proc.exitcode

    def close(self) -> None:
        self._kill()

    def __del__(self) -> None:  # best effort; actors also call close()
        try:
            self._kill()
        except Exception:  # noqa: BLE001
            pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
