import os
import signal
import time

from curation.isolation import IsolatedWorker


def _add(a, b):
    return a + b


def _sleep(s):
    time.sleep(s)
    return "woke"


def _segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def _boom():
    raise RuntimeError("moov atom not found")


def test_results_errors_timeouts_and_crashes_come_back_as_outcomes():
    w = IsolatedWorker()
    try:
        assert w.call(_add, 2, 3, timeout_s=60).value == 5

        t = time.monotonic()
        hung = w.call(_sleep, 30, timeout_s=1.5)
        assert not hung.ok and hung.reason.startswith("timeout:")
        assert time.monotonic() - t < 10  # the limit holds: we did not wait for the sleeper

        crashed = w.call(_segfault, timeout_s=60)
        assert not crashed.ok and crashed.reason.startswith("crash:") and "SIGSEGV" in crashed.reason

        failed = w.call(_boom, timeout_s=60)
        assert not failed.ok and failed.reason == "error: RuntimeError: moov atom not found"

        # the worker was replaced after each fault and keeps serving
        assert w.call(_add, 40, 2, timeout_s=60).value == 42
    finally:
        w.close()
