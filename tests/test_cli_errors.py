"""A newcomer's mistakes through launch/run.py: one clear message, exit 64, no traceback."""

import os
import subprocess
import sys

import pytest
from engine_utils import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, config, *extra, **env):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "launch/run.py", "--config", config, "--workdir", str(workdir), *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=240,
      env=child_env(8, **{"FLAXHF_DEBUG": "", **env}))
  assert not workdir.exists() or not any(workdir.iterdir()), "it stopped before writing anything"
  return proc


def assert_one_message(proc, *fragments):
  assert proc.returncode == 64, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("flaxhf: error:")]
  assert len(error_lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in proc.stderr, (fragment, proc.stderr[-3000:])


def test_missing_local_data_names_flaxhf_data_and_the_hub_form(tmp_path):
  proc = run(tmp_path, "configs/text_classification.py:sst2,local", FLAXHF_DATA=str(tmp_path / "none"))
  assert_one_message(proc, "Data file not found", str(tmp_path / "none"), "set FLAXHF_DATA",
                     "--config configs/text_classification.py:sst2 --workdir")


def test_config_time_data_error_and_debug_shows_the_traceback(tmp_path):
  # The local translation config trains its tokenizer while the config loads (flag parsing).
  config, env = "configs/translation.py:local,multi30k", {"FLAXHF_DATA": str(tmp_path / "none")}
  proc = run(tmp_path, config, **env)
  assert_one_message(proc, "train.de.gz", "set FLAXHF_DATA", "--config configs/translation.py ")
  debug = run(tmp_path, config, "--debug", **env)
  assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr


@pytest.mark.parametrize("config,fragments", [
    ("configs/text_classification.py:smoke,model=/no/such/folder",
     ("'/no/such/folder' is not a model folder", "config.json")),
    ("configs/text_classification.py:smoke,model=someone/no-such-model",
     ("the hub is offline", "pass a local folder")),
    ("configs/text_classification.py:smok", ("Unknown config arg(s) ['smok']", "smoke")),
])
def test_user_errors_print_one_line(tmp_path, config, fragments):
  assert_one_message(run(tmp_path, config), *fragments)


def test_malformed_xla_cpu_setting_is_one_message(tmp_path):
  proc = run(tmp_path, "configs/text_classification.py:smoke", "--config.xla_cpu=vector_width=512")
  assert_one_message(proc, "xla_cpu setting 'vector_width=512'", "'auto', 'none'")
