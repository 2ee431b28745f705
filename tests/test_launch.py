"""launch/*.py as subprocesses: 2 hosts == 1, SIGKILL + rerun == uninterrupted, CLI, export."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import engine_utils
from engine_utils import read_jsonl, tiny_bert_dir, tiny_config, write_sentiment_tsv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 12, 4  # checkpoints at 4, 8, 12; keep=2 leaves 8 and 12
TIMEOUT_S = 240  # per subprocess: a hung collective must fail the test, not stall CI


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
  root = tmp_path_factory.mktemp("launch")
  model = tiny_bert_dir(root / "model", minilm_path, layers=1)
  # Dropout on, so matching runs must also agree on every step's random key.
  config_path = os.path.join(model, "config.json")
  config = json.load(open(config_path))
  config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  json.dump(config, open(config_path, "w"))
  return dict(model=model,
              train=write_sentiment_tsv(root / "train.tsv", 128, seed=0),
              dev=write_sentiment_tsv(root / "dev.tsv", 32, seed=1),
              root=root)


def overrides(tiny):
  """The --config.KEY=VALUE of every run here: fsdp rules on data=2 x fsdp=4 (8 devices)."""
  return {"model.name_or_path": tiny["model"], "data.train_file": tiny["train"],
          "data.validation_file": tiny["dev"],
          # A str placeholder cannot be set to None from the command line ("None" stays a string);
          # flaxhf.data reads "" as unset, which drops the hub dataset and GLUE task defaults.
          "data.dataset": "", "data.subset": "", "data.task_name": "",
          "data.text_columns": "sentence",
          "data.max_length": 16,  # one bucket: one train-step program to compile
          "train.steps": STEPS, "train.learning_rate": 5e-3, "train.log_every": 1,
          "train.progress_bar": False, "checkpoint.every_steps": EVERY, "checkpoint.keep": 2,
          "mesh.rules": "fsdp", "mesh.data": 2, "mesh.fsdp": 4}


def run_cmd(tiny, workdir, *extra):
  return [sys.executable, "launch/run.py", "--config", "configs/text_classification.py:smoke",
          "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in overrides(tiny).items()),
          *extra]


def tiny_run_env(devices):
  """engine_utils.child_env for the tiny-BERT runs here and in test_faults/test_cluster, which share
  the session's compilation cache (conftest). 12 steps of a 1-layer BERT: compiling is the cost, so
  XLA's backend optimisations are off, as in-process."""
  return engine_utils.child_env(devices, unoptimized=True)


class Launcher:
  """Starts subprocesses with their output in files; kills any still running when closed."""

  def __init__(self, log_dir):
    self.log_dir, self.procs = log_dir, []
    os.makedirs(log_dir, exist_ok=True)

  def start(self, cmd, env, name):
    # Files, not pipes: a chatty child never blocks on a full pipe nobody reads.
    with open(self._log(name, "out"), "w") as out, open(self._log(name, "err"), "w") as err:
      proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
    proc.name = name
    self.procs.append(proc)
    return proc

  def _log(self, name, kind):
    return os.path.join(self.log_dir, f"{name}.{kind}")

  def output(self, proc):
    """(stdout, stderr) of a started process, as written so far."""
    return tuple(open(self._log(proc.name, kind)).read() for kind in ("out", "err"))

  def report(self, procs):
    return "\n".join(f"===== {p.name} (exit {p.returncode}) stderr, last 4000 chars:\n"
                     f"{self.output(p)[1][-4000:]}" for p in procs)

  def wait(self, *procs, timeout=TIMEOUT_S):
    """[(stdout, stderr)] once all `procs` exit 0; kills them all and fails on a hang or error."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      # One crashed process leaves its peer blocked in a collective: stop waiting at once.
      failed = any(p.poll() not in (None, 0) for p in procs)
      if failed or time.monotonic() > deadline:
        self.kill(procs)
        pytest.fail(("a process failed" if failed else f"timed out after {timeout} s") + "\n"
                    + self.report(procs))
      time.sleep(0.1)
    if any(p.returncode for p in procs):
      pytest.fail("a process failed\n" + self.report(procs))
    return [self.output(p) for p in procs]

  def kill(self, procs=None):
    for p in procs or self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture
def launcher(tmp_path):
  launch = Launcher(str(tmp_path / "logs"))
  yield launch
  launch.kill()


class Reference:
  """The uninterrupted single-process run on 8 devices; started early so it overlaps others."""

  def __init__(self, tiny):
    self.workdir = tiny["root"] / "reference"
    self.launch = Launcher(str(tiny["root"] / "reference_logs"))
    self.proc = self.launch.start(run_cmd(tiny, self.workdir), tiny_run_env(8), "reference")
    self.done = False

  def wait(self):
    """The finished run's workdir."""
    if not self.done:
      [(_, err)] = self.launch.wait(self.proc)
      assert "Process 0 of 1 feeds 8 of the 8 rows of each global batch." in err
      self.done = True
    return self.workdir


@pytest.fixture(scope="module")
def reference(tiny):
  ref = Reference(tiny)
  yield ref
  ref.launch.kill()


def train_curve(workdir):
  """{step: (loss, grad_norm)}: the last row per step (a rerun appends the steps it redoes)."""
  return {r["step"]: (r["loss"], r["grad_norm"])
          for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))}


def saved_steps(workdir):
  """Complete checkpoint steps: Orbax gives a step its integer name only once it is committed."""
  folder = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def exported(workdir):
  from safetensors.numpy import load_file
  return load_file(os.path.join(workdir, "export", "model.safetensors"))


def load_pt(folder):
  """The PyTorch model in `folder`, asserting it loads with no missing or unexpected keys."""
  import transformers
  model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      folder, output_loading_info=True)
  assert not any(info.values()), info
  return model.eval()


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def hostname_is_loopback():
  """Gloo listens on this host name's address (jax gives it no other), so it must be loopback."""
  try:
    infos = socket.getaddrinfo(socket.gethostname(), None)
  except OSError:
    return False
  return all(info[4][0].startswith("127.") or info[4][0] == "::1" for info in infos)


def test_two_processes_equal_one_process(tiny, reference, tmp_path, launcher):
  if not hostname_is_loopback():
    pytest.skip("this host name resolves to a non-loopback address, where gloo would listen")
  workdir = tmp_path / "multi"
  cluster = [f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2"]
  procs = [launcher.start(run_cmd(tiny, workdir, *cluster, f"--process_id={i}"),
                          tiny_run_env(4), f"process{i}") for i in range(2)]
  (out0, err0), (out1, err1) = launcher.wait(*procs)
  ref = reference.wait()
  for i, err in enumerate((err0, err1)):
    assert f"Process {i} of 2, 4 local / 8 global devices." in err
    assert f"Process {i} of 2 feeds 4 of the 8 rows of each global batch." in err
  # Only process 0 logs: one train row per step, one eval row, one event file, one result line.
  assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")] == list(range(1, STEPS + 1))
  assert len(read_jsonl(workdir / "metrics.jsonl", "eval")) == 1
  assert len(os.listdir(workdir / "tensorboard")) == 1
  assert "eval_results:" in out0 and "eval_results:" not in out1
  # Two processes x 4 devices train exactly as one process x 8 devices.
  got, want = train_curve(workdir), train_curve(ref)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-4)
  # Losses differ from batch to batch, so equal curves mean equal rows in every step.
  assert np.ptp([loss for loss, _ in want.values()]) > 1e-2
  results = json.load(open(workdir / "eval_results.json"))
  assert results == json.load(open(ref / "eval_results.json"))
  assert saved_steps(workdir) == saved_steps(ref) == [2 * EVERY, STEPS]
  # The export, gathered from both processes' shards, is a complete PyTorch model.
  load_pt(workdir / "export")
  weights, ref_weights = exported(workdir), exported(ref)
  assert sorted(weights) == sorted(ref_weights)
  for name in weights:
    # Reduction order differs across processes; Adam can amplify that in near-zero gradients.
    np.testing.assert_allclose(weights[name], ref_weights[name], rtol=1e-4, atol=1e-5,
                               err_msg=name)
  # The two-process checkpoint restores in this one process, onto another layout (dp over 8).
  from flaxhf.train import engine
  cfg = tiny_config(tiny["model"], tiny["train"], tiny["dev"], **{
      "data.max_length": 16, "train.steps": STEPS, "checkpoint.every_steps": EVERY,
      "mesh.rules": "dp", "mesh.data": 8})
  trainer = engine.Trainer(cfg, str(workdir))
  try:
    assert trainer.start_step == int(trainer.state["step"]) == STEPS
    state_dict = trainer.model.state_dict(trainer.state["params"])
  finally:
    trainer.ckpt.close()
  assert sorted(state_dict) == sorted(weights)
  for name, value in state_dict.items():
    np.testing.assert_array_equal(value, weights[name], err_msg=name)


def test_sigkill_then_rerun_resumes_exactly(tiny, reference, tmp_path, launcher):
  ref = reference.wait()
  workdir = tmp_path / "killed"
  cmd, env = run_cmd(tiny, workdir), tiny_run_env(8)
  first = launcher.start(cmd, env, "first")
  deadline = time.monotonic() + TIMEOUT_S
  while not saved_steps(workdir):
    if first.poll() is not None or time.monotonic() > deadline:
      launcher.kill([first])
      pytest.fail("no checkpoint appeared while the run was alive\n" + launcher.report([first]))
    time.sleep(0.02)
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert first.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = saved_steps(workdir)
  assert EVERY <= killed_at[-1] < STEPS, killed_at

  [(_, err)] = launcher.wait(launcher.start(cmd, env, "rerun"))
  resumed = re.search(r"Resuming from step (\d+)", err)
  assert resumed, err[-4000:]
  n = int(resumed.group(1))
  assert n == killed_at[-1]
  assert saved_steps(workdir)[-1] == STEPS
  # Steps after n are the uninterrupted run's, and so are the final weights.
  got, want = train_curve(workdir), train_curve(ref)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(n + 1, STEPS + 1)],
                             [want[s] for s in range(n + 1, STEPS + 1)], rtol=1e-6)
  weights, ref_weights = exported(workdir), exported(ref)
  assert sorted(weights) == sorted(ref_weights)
  for name in weights:
    np.testing.assert_allclose(weights[name], ref_weights[name], rtol=0, atol=1e-6, err_msg=name)


def test_mistyped_config_key_names_the_valid_keys(tiny, tmp_path, launcher):
  workdir = tmp_path / "typo"
  proc = launcher.start(run_cmd(tiny, workdir, "--config.train.learning_rat=1e-3"),
                        tiny_run_env(1), "typo")
  proc.wait(timeout=60)
  err = launcher.output(proc)[1]
  assert proc.returncode != 0
  assert "train has no key 'learning_rat' (did you mean 'learning_rate'?)" in err
  assert "batch_size" in err and "warmup_steps" in err  # the section's valid keys are listed
  assert "Traceback" not in err
  assert not workdir.exists()  # it stopped before doing anything


def test_export_of_a_middle_checkpoint(tiny, reference, tmp_path, launcher):
  import torch
  import transformers

  import flaxhf
  from flaxhf.checkpoint import read_meta, restore_arrays
  ref = reference.wait()
  step_dir = ref / "checkpoints" / str(2 * EVERY)
  out = tmp_path / "export"
  launcher.wait(launcher.start(
      [sys.executable, "launch/export.py", "--checkpoint", str(step_dir), "--out", str(out)],
      tiny_run_env(1), "export"))
  pt = load_pt(out)
  tok = transformers.AutoTokenizer.from_pretrained(out)  # copied from the run's workdir
  texts = [line.split("\t")[0] for line in open(tiny["dev"]).read().splitlines()[1:17]]
  enc = tok(texts, padding=True, return_tensors="np")
  with torch.no_grad():
    pt_logits = pt(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
  # The flaxhf model of that step, straight from its checkpoint.
  meta = read_meta(str(step_dir))
  assert meta["step"] == 2 * EVERY
  config_dict = dict(meta["model_config"])
  config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
  model = getattr(flaxhf, meta["model_class"])(config, _do_init=False)
  flax_logits = np.asarray(model(**enc, params=restore_arrays(str(step_dir))["params"]).logits)
  np.testing.assert_allclose(pt_logits, flax_logits, atol=1e-5)
  # It is that step's model, not the final one.
  final = load_pt(ref / "export")
  with torch.no_grad():
    final_logits = final(**{k: torch.from_numpy(v) for k, v in enc.items()}).logits.numpy()
  assert not np.allclose(final_logits, pt_logits, atol=1e-4)
