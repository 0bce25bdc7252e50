import json

import yaml

from common.runinfo import write_run_info
from tests.common.test_config import Outer


def test_run_info_records_config_versions_and_revision(tmp_path):
    cfg = Outer(name="run-1")
    write_run_info(tmp_path / "out", cfg, "curate", {"address": None})
    info = json.loads((tmp_path / "out" / "run.json").read_text())
    assert info["command"] == "curate"
    assert info["packages"]["torch"].startswith("2.13.0")
    assert info["packages"]["ray"] == "2.60.0"
    assert info["git_revision"] == "unknown" or len(info["git_revision"].split("-")[0]) == 40
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["name"] == "run-1"
