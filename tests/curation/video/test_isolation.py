import os
import signal
import time

from curation.video.isolation import IsolatedWorker


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


def _beats_then_stalls(num_beats, every_s, stall_for_s):
    from curation.video.isolation import heartbeat

    for _ in range(num_beats):
        heartbeat()
        time.sleep(every_s)
    time.sleep(stall_for_s)  # a decoder stuck on a file whose header promised an hour
    return "finished"


def test_a_call_without_progress_ends_long_before_its_time_limit():
    w = IsolatedWorker()
    try:
        # progress keeps a call alive past stall_s: 12 beats over ~1.2 s, each within the 0.6 s bound
        steady = w.call(_beats_then_stalls, 12, 0.1, 0.0, timeout_s=60, stall_s=0.6)
        assert steady.ok and steady.value == "finished"
        t = time.monotonic()
        stalled = w.call(_beats_then_stalls, 3, 0.1, 60, timeout_s=3600, stall_s=0.6)
        took = time.monotonic() - t
        assert not stalled.ok and stalled.reason == "timeout: no progress (no new frame) for 0.6 s"
        assert 0.6 < took < 5  # ended by the stall bound, not the hour the limit allowed
        assert w.call(_add, 1, 1, timeout_s=60, stall_s=0.6).value == 2  # replaced, serving again
    finally:
        w.close()


class _CountingBeat:
    def __init__(self):
        self.count = 0

    @property
    def value(self):
        return 0.0

    @value.setter
    def value(self, _):
        self.count += 1


def test_decoding_a_video_beats_at_least_once_per_frame(tmp_path, monkeypatch):
    """The real decode feeds the stall bound: every decoded frame is a heartbeat."""
    import curation.video.isolation as isolation
    from curation.config import CurationConfig
    from curation.testing.synthetic import moving_square, write_video
    from curation.video.task import prepare, process_video

    video = write_video(tmp_path / "v.mp4", moving_square(48, 96, 128, speed=4), 24)
    cfg = CurationConfig.model_validate({"output": str(tmp_path / "run"), "clips": {"mode": "none"},
                                         "text": {"enabled": False}, "thresholds": {}})
    beat = _CountingBeat()
    monkeypatch.setattr(isolation, "_beat", beat)
    out = process_video(str(video), "v", prepare(str(video), cfg.decode.max_pixels), cfg, str(tmp_path / "run"))
    assert out.video["num_frames"] == 48
    assert beat.count >= 48


def _start_a_program_and_hang(pid_file: str) -> None:
    import subprocess

    proc = subprocess.Popen(["sleep", "300"])
    with open(pid_file, "w") as f:
        f.write(str(proc.pid))
    time.sleep(300)


def test_a_killed_call_takes_the_programs_it_started_with_it(tmp_path):
    """A call past its limit is killed with its process group: an ffmpeg it started is not left running."""
    import os

    pid_file = tmp_path / "pid"
    worker = IsolatedWorker()
    try:
        out = worker.call(_start_a_program_and_hang, str(pid_file), timeout_s=3)
        assert not out.ok and out.reason.startswith("timeout")
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            # a killed child that nobody waited for yet is a zombie: gone for our purpose
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
            time.sleep(0.1)
        else:
            raise AssertionError(f"sleep {pid} started by the killed call is still running")
    finally:
        worker.close()
