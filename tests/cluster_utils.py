"""Subprocess runs shared by test_cluster.py and test_faults.py, each started once per session.

The set-up is test_launch.py's (a 1-layer BERT with dropout, 12 steps, checkpoints at 4 / 8 / 12,
fsdp on data=2 x fsdp=4), so one compilation cache serves every run here.
"""

import json
import os
import time

import pytest

from engine_utils import tiny_bert_dir, write_sentiment_tsv
from test_launch import TIMEOUT_S, Launcher, free_port, run_cmd, tiny_run_env

_SESSION = {}


def tiny_setup(tmp_path_factory, minilm_path):
  """The model and data of every run in this session (the compilation cache is conftest's)."""
  if "tiny" not in _SESSION:
    root = tmp_path_factory.mktemp("cluster")
    model = tiny_bert_dir(root / "model", minilm_path, layers=1)
    config_path = os.path.join(model, "config.json")
    config = json.load(open(config_path))
    config.update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    json.dump(config, open(config_path, "w"))
    _SESSION["tiny"] = dict(model=model, train=write_sentiment_tsv(root / "train.tsv", 128, seed=0),
                            dev=write_sentiment_tsv(root / "dev.tsv", 32, seed=1),
                            root=root)
    _SESSION["launcher"] = Launcher(str(root / "logs"))
  return _SESSION["tiny"]


def slurm_env(tiny, process_id, ntasks=2, port=None):
  """A SLURM job step's environment for task `process_id`, all tasks on 127.0.0.1, 4 devices."""
  return dict(tiny_run_env(4), SLURM_JOB_ID="4242", SLURM_NTASKS=str(ntasks),
              SLURM_PROCID=str(process_id), SLURM_LOCALID=str(process_id),
              SLURM_STEP_NODELIST="127.0.0.1", SLURM_STEP_NUM_NODES="1",
              # jax's own override of the port it derives from the job id, so runs never collide.
              JAX_COORDINATOR_PORT=str(port or free_port()))


def flags_cluster(port, process_id):
  return [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
          f"--process_id={process_id}"]


def start_uninterrupted(tiny, processes):
  """Starts (once) the run of 1 process x 8 devices, or of 2 SLURM tasks x 4 devices, no flags."""
  key = ("run", processes)
  if key not in _SESSION:
    launch, workdir = _SESSION["launcher"], tiny["root"] / f"uninterrupted{processes}"
    if processes == 1:
      procs = [launch.start(run_cmd(tiny, workdir), tiny_run_env(8), "uninterrupted1")]
    else:
      port = free_port()
      procs = [launch.start(run_cmd(tiny, workdir), slurm_env(tiny, i, port=port),
                            f"uninterrupted2_{i}") for i in range(2)]
    _SESSION[key] = dict(workdir=workdir, procs=procs, outputs=None)
  return _SESSION[key]


def uninterrupted(tiny, processes):
  """(workdir, [(stdout, stderr)] per process) of the finished run."""
  run = start_uninterrupted(tiny, processes)
  if run["outputs"] is None:
    run["outputs"] = _SESSION["launcher"].wait(*run["procs"])
  return run["workdir"], run["outputs"]


def close():
  if "launcher" in _SESSION:
    _SESSION["launcher"].kill()


def wait_exit(launcher, procs, timeout=TIMEOUT_S):
  """The exit codes of `procs` once all have exited; kills them and fails the test on a hang."""
  deadline = time.monotonic() + timeout
  while any(p.poll() is None for p in procs):
    if time.monotonic() > deadline:
      launcher.kill(procs)
      pytest.fail(f"timed out after {timeout} s\n" + launcher.report(procs))
    time.sleep(0.05)
  return [p.returncode for p in procs]


def wait_for_step(launcher, procs, workdir, step, timeout=TIMEOUT_S):
  """Blocks until process 0 has logged train step `step` (metrics.jsonl rows appear as it runs)."""
  path, deadline = os.path.join(workdir, "metrics.jsonl"), time.monotonic() + timeout
  while True:
    if os.path.exists(path):
      with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]  # whole rows
      if steps and max(steps) >= step:
        return max(steps)
    if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
      launcher.kill(procs)
      pytest.fail(f"step {step} was never logged\n" + launcher.report(procs))
    time.sleep(0.01)
