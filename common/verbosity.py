"""How much lvd lets its libraries say. Every command takes `-v` (everything: Ray's and DeepSpeed's own lines,
warnings) and `-q` (results and errors only: no progress bars); by default a run shows lvd's lines and the
errors. The level travels to subprocesses (training ranks, Ray workers) in LVD_VERBOSITY."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

ENV = "LVD_VERBOSITY"
QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
# Loggers of libraries that talk on the console at WARNING for things a user cannot act on (DeepSpeed's
# "Setting accelerator to CPU" on every CPU run); below -v they keep only errors.
CHATTY = ("DeepSpeed",)
# Python warnings raised outside lvd's own packages (torch's deprecations under ZeRO-3, ...): only with -v.
THIRD_PARTY = r"(?!(common|curation|shards|training|jobs)(\.|$))"
# A line of Ray's C++ core (glog format), e.g. "[2026-12-04 16:01:49,225 E 20384 20384] core_worker.cc:2465: ..."
NATIVE_LINE = re.compile(rb"(?:\x1b\[[0-9;]*m)?\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] "
                         rb"[\w./-]+\.(?:cc|h):\d+:[^\n]*\n?(?:\x1b\[[0-9;]*m)?")


ANSI = re.compile(rb"\x1b\[[0-9;]*m")


class PlainFormatter(logging.Formatter):
    """A log file's formatter: Ray colours names in messages (ray::MapBatches in tracebacks); a file gets none."""

    def format(self, record: logging.LogRecord) -> str:
        return ANSI.sub(b"", super().format(record).encode()).decode()


def set_level(verbose: bool = False, quiet: bool = False) -> str:
    """Sets this process's level (and its children's) from the -v/-q flags and applies it."""
    level = VERBOSE if verbose else QUIET if quiet else NORMAL
    os.environ[ENV] = level
    apply()
    return level


def level() -> str:
    value = os.environ.get(ENV, NORMAL)
    return value if value in (QUIET, NORMAL, VERBOSE) else NORMAL


def ray_logging_level() -> str:
    """ray.init's logging_level: its INFO and WARNING lines (the local cluster started, token authentication
    is on) only with -v."""
    return "INFO" if level() == VERBOSE else "ERROR"


def apply() -> None:
    """Filters the chatty libraries' loggers below ERROR unless verbose. A filter, not a level: DeepSpeed sets
    its logger's level when it is imported, which would undo a level set here first."""
    for name in CHATTY:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, _BelowError)]:
            logger.removeFilter(f)
        if level() != VERBOSE:
            logger.addFilter(_BelowError())
    if level() != VERBOSE:
        warnings.filterwarnings("ignore", module=THIRD_PARTY)
    if level() == QUIET:
        os.environ.setdefault("TQDM_DISABLE", "1")  # bars of libraries (diffusers, transformers) too


class _BelowError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextmanager
def native_logs_to(log_path: Path) -> Iterator[None]:
    """Moves the lines Ray's C++ core writes to this process's stderr (file descriptor 2, beyond Python's
    logging) into `log_path`; everything else written to stderr (the progress bar, errors) passes through.
    Does nothing when verbose."""
    if level() == VERBOSE:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def pump() -> None:
        # glog writes a line in one write() under PIPE_BUF, so a read never holds half of one
        with open(log_path, "ab") as log, os.fdopen(read_fd, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                for line in NATIVE_LINE.findall(chunk):
                    line = ANSI.sub(b"", line)  # the log is read with less or grep, not a colour terminal
                    log.write(line if line.endswith(b"\n") else line + b"\n")
                    log.flush()
                rest = NATIVE_LINE.sub(b"", chunk)
                if rest:
                    os.write(saved, rest)

    thread = threading.Thread(target=pump, name="lvd-native-logs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes our write end of the pipe: the pump drains it and stops
        thread.join(timeout=2)
        if not thread.is_alive():  # a child still holding the pipe keeps the pump (and `saved`) in use
            os.close(saved)
