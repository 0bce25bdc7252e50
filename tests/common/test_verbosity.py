"""-v/-q: what reaches the console, and where the rest goes."""

from __future__ import annotations

import os

from common import verbosity

NATIVE = (b"\x1b[31m[2026-12-04 16:01:49,225 E 20384 20384] core_worker.cc:2465: Actor with class name: "
          b"'MapWorker' has constructor arguments in the object store\n\x1b[0m")


def test_native_ray_lines_go_to_the_log_and_the_rest_to_the_console(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(verbosity.ENV, verbosity.NORMAL)
    log = tmp_path / "logs" / "ray.log"
    with verbosity.native_logs_to(log):
        os.write(2, b"\rcurate:  50%|#####     | 1/2 [00:08<00:08]")
        os.write(2, NATIVE)
        os.write(2, b"\rcurate: 100%|##########| 2/2 [00:09<00:00]\n")
    err = capfd.readouterr().err
    assert err == "\rcurate:  50%|#####     | 1/2 [00:08<00:08]\rcurate: 100%|##########| 2/2 [00:09<00:00]\n"
    assert log.read_bytes() == (b"[2026-12-04 16:01:49,225 E 20384 20384] core_worker.cc:2465: Actor with class "
                                b"name: 'MapWorker' has constructor arguments in the object store\n")


def test_verbose_leaves_stderr_alone(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(verbosity.ENV, verbosity.VERBOSE)
    with verbosity.native_logs_to(tmp_path / "ray.log"):
        os.write(2, NATIVE)
    assert "core_worker.cc:2465" in capfd.readouterr().err
    assert not (tmp_path / "ray.log").exists()


def test_third_party_warnings_only_with_verbose(monkeypatch):
    import warnings

    for level, shown in ((verbosity.NORMAL, False), (verbosity.VERBOSE, True)):
        monkeypatch.setenv(verbosity.ENV, level)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            verbosity.apply()
            warnings.warn_explicit("deprecated", FutureWarning, "c10d_logger.py", 83, module="torch.distributed.c10d")
            warnings.warn_explicit("lvd's own", UserWarning, "loop.py", 1, module="training.loop")
        assert [str(w.message) for w in caught] == (["deprecated", "lvd's own"] if shown else ["lvd's own"])
