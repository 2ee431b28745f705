"""Preemption (SIGTERM), a dead peer, non-finite losses and checkpoint failures, end to end."""

import errno
import os
import re
import resource
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cluster_utils
from cluster_utils import flags_cluster, wait_exit, wait_for_step
from engine_utils import read_jsonl, tiny_bert_dir, tiny_config, write_sentiment_tsv
from flaxhf.checkpoint import Checkpointer, CheckpointSaveError, restore_arrays
from flaxhf.data import batching
from flaxhf.train import engine, faults
from test_launch import (STEPS, Launcher, exported, free_port, hostname_is_loopback, run_cmd,
                         saved_steps, tiny_run_env, train_curve)

PREEMPTED = r"Preempted: every process stopped at step (\d+)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, minilm_path):
  yield cluster_utils.tiny_setup(tmp_path_factory, minilm_path)
  cluster_utils.close()


@pytest.fixture
def launcher(tmp_path):
  launch = Launcher(str(tmp_path / "logs"))
  yield launch
  launch.kill()


def assert_same_weights(workdir, ref):
  weights, want = exported(workdir), exported(ref)
  assert sorted(weights) == sorted(want)
  for name in weights:
    np.testing.assert_array_equal(weights[name], want[name], err_msg=name)  # bit for bit


def preempted_step(launcher, proc):
  err = launcher.output(proc)[1]
  match = re.search(PREEMPTED, err)
  assert match, err[-4000:]
  return int(match.group(1))


# ---- preemption --------------------------------------------------------------------------------
def test_sigterm_saves_the_step_and_the_rerun_is_bit_identical(tiny, tmp_path, launcher):
  cluster_utils.start_uninterrupted(tiny, 1)
  workdir = tmp_path / "preempted"
  cmd, env = run_cmd(tiny, workdir), tiny_run_env(8)
  first = launcher.start(cmd, env, "first")
  seen = wait_for_step(launcher, [first], workdir, 2)
  first.send_signal(signal.SIGTERM)
  assert wait_exit(launcher, [first]) == [faults.EXIT_PREEMPTED], launcher.report([first])
  n = preempted_step(launcher, first)
  assert seen <= n < STEPS
  assert saved_steps(workdir)[-1] == n  # saved synchronously at the step it stopped at
  assert max(train_curve(workdir)) == n  # and logged up to it

  [(_, err)] = launcher.wait(launcher.start(cmd, env, "rerun"))
  assert f"Resuming from step {n} " in err
  ref, _ = cluster_utils.uninterrupted(tiny, 1)
  got, want = train_curve(workdir), train_curve(ref)
  assert [got[s] for s in range(n + 1, STEPS + 1)] == [want[s] for s in range(n + 1, STEPS + 1)]
  assert_same_weights(workdir, ref)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tiny, tmp_path, launcher):
  if not hostname_is_loopback():
    pytest.skip("this host name resolves to a non-loopback address, where gloo would listen")
  cluster_utils.start_uninterrupted(tiny, 2)
  workdir, port = tmp_path / "preempted2", free_port()
  procs = [launcher.start(run_cmd(tiny, workdir, *flags_cluster(port, i)), tiny_run_env(4),
                          f"first{i}") for i in range(2)]
  wait_for_step(launcher, procs, workdir, 2)
  procs[1].send_signal(signal.SIGTERM)  # as a maintenance event on one host would
  assert wait_exit(launcher, procs) == [faults.EXIT_PREEMPTED] * 2, launcher.report(procs)
  n = preempted_step(launcher, procs[0])
  assert preempted_step(launcher, procs[1]) == n < STEPS
  assert saved_steps(workdir)[-1] == n

  port = free_port()
  outputs = launcher.wait(*[launcher.start(run_cmd(tiny, workdir, *flags_cluster(port, i)),
                                           tiny_run_env(4), f"rerun{i}") for i in range(2)])
  assert all(f"Resuming from step {n} " in err for _, err in outputs)
  ref, _ = cluster_utils.uninterrupted(tiny, 2)
  assert_same_weights(workdir, ref)


def test_dead_peer_ends_the_survivor_within_the_heartbeat_timeout(tiny, tmp_path, launcher):
  if not hostname_is_loopback():
    pytest.skip("this host name resolves to a non-loopback address, where gloo would listen")
  heartbeat = 5
  workdir, port = tmp_path / "dead_peer", free_port()
  procs = [launcher.start(run_cmd(tiny, workdir, *flags_cluster(port, i),
                                  f"--config.cluster.heartbeat_timeout_s={heartbeat}"),
                          tiny_run_env(4), f"peer{i}") for i in range(2)]
  wait_for_step(launcher, procs, workdir, 2)
  procs[1].send_signal(signal.SIGKILL)
  start = time.monotonic()
  [rc] = wait_exit(launcher, procs[:1], timeout=heartbeat + 60)
  elapsed = time.monotonic() - start
  err = launcher.output(procs[0])[1]
  assert rc != 0, err[-4000:]
  assert elapsed < heartbeat + 30, elapsed  # 30 s of slack for a loaded CI machine
  # jax.distributed's coordination service names the process that stopped sending heartbeats.
  assert re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b", err), err[-4000:]


def test_exit_codes():
  from flaxhf.distributed import ClusterError
  assert faults.exit_code(faults.Preempted(3, "d")) == 75
  assert faults.exit_code(faults.NonFiniteError(3, "x")) == 65
  assert faults.exit_code(ClusterError("x")) == 78
  assert faults.exit_code(ValueError("x")) is None


# ---- non-finite losses -------------------------------------------------------------------------
def regression_tsv(path, n, bad_rows):
  """Sentences with float scores (a regression task); the rows in `bad_rows` score 1e30.

  An outlier whose squared error overflows float32: the step's loss is inf, its gradients NaN.
  """
  write_sentiment_tsv(path, n, seed=0)
  lines = open(path).read().splitlines()
  rows = [line.rsplit("\t", 1) for line in lines[1:]]
  with open(path, "w") as f:
    f.write(lines[0] + "\n")
    for i, (text, label) in enumerate(rows):
      f.write(f"{text}\t{'1e30' if i in bad_rows else float(label)}\n")
  return str(path)


@pytest.fixture(scope="module")
def regression(tmp_path_factory, minilm_path):
  root = tmp_path_factory.mktemp("nonfinite")
  return dict(model=tiny_bert_dir(root / "model", minilm_path, layers=1),
              dev=regression_tsv(root / "dev.tsv", 16, ()), root=root)


def nonfinite_trainer(regression, name, bad_rows, **overrides):
  train = regression_tsv(regression["root"] / f"{name}.tsv", 64, bad_rows)
  cfg = tiny_config(regression["model"], train, regression["dev"], **{
      "data.max_length": 16, "train.batch_size": 8, "mesh.data": 8,
      "checkpoint.keep": 10, **overrides})
  return engine.Trainer(cfg, str(regression["root"] / name))


def bad_steps(trainer, total):
  """The steps whose batch holds a 1e30 score, in the order the Trainer feeds them."""
  cfg = trainer.cfg
  batches = batching.train_batches(
      trainer.data.train, global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
      buckets=trainer.buckets, max_length=cfg.data.max_length, pad_values=trainer._pad_values())
  return [s for s in range(1, total + 1) if (next(batches)["labels"] > 1e20).any()]


def test_nonfinite_abort_keeps_the_last_good_checkpoint_and_resume_skips_a_corrupt_one(
    regression, caplog):
  trainer = nonfinite_trainer(regression, "abort", bad_rows={3}, **{
      "train.steps": 8, "checkpoint.every_steps": 2})
  try:
    [k] = bad_steps(trainer, 8)
    assert k == 5  # data seed 0 puts row 3 in step 5: checkpoints 2 and 4 come before it
    with pytest.raises(faults.NonFiniteError, match=r"at step 5 \(train.nonfinite=abort\); "
                                                    r"the last checkpoint is step 4"):
      trainer.fit()
  finally:
    trainer.ckpt.close()
  workdir = trainer.workdir
  assert trainer.ckpt.all_steps() == [2, 4]  # nothing saved at or after the bad step
  assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4]
  assert not os.path.exists(os.path.join(workdir, "export"))

  # Step 4's data files go missing: the rerun resumes from step 2 and writes step 4 again.
  step4 = restore_arrays(os.path.join(workdir, "checkpoints", "4"))["params"]
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", "4", "state")):
    for name in files:
      if os.path.basename(root) == "d":
        os.unlink(os.path.join(root, name))
  rerun = nonfinite_trainer(regression, "abort", bad_rows={3}, **{
      "train.steps": 8, "checkpoint.every_steps": 2})
  try:
    assert rerun.start_step == 2
    assert "Checkpoint step 4 does not restore, trying the one before" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "_corrupt", "4"))
    with pytest.raises(faults.NonFiniteError, match="at step 5 .* last checkpoint is step 4"):
      rerun.fit()  # the same data and keys replay: the same bad step
  finally:
    rerun.ckpt.close()
  again = restore_arrays(os.path.join(workdir, "checkpoints", "4"))["params"]
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(step4)):
    np.testing.assert_array_equal(a, b)


def test_nonfinite_skip_drops_updates_counts_them_and_stops_after_n_in_a_row(regression):
  trainer = nonfinite_trainer(regression, "skip", bad_rows={1, 9}, **{
      "train.steps": 16, "checkpoint.every_steps": 4, "train.nonfinite": "skip",
      "train.max_nonfinite_in_a_row": 2})
  try:
    bad = bad_steps(trainer, 16)
    assert bad[:4] == [4, 8, 9, 10]  # row 9 is in steps 4 and 9, row 1 in steps 8 and 10
    with pytest.raises(faults.NonFiniteError, match=r"in 2 steps in a row, the last at step 9 "
                                                    r"\(train.max_nonfinite_in_a_row=2\); the "
                                                    r"last checkpoint is step 8"):
      trainer.fit()
    rows = {r["step"]: r for r in read_jsonl(os.path.join(trainer.workdir, "metrics.jsonl"))}
    assert sorted(rows) == list(range(1, 9))  # step 9's check raised before it was logged
    assert [s for s, r in rows.items() if r.get("nonfinite_steps")] == [4, 8]
    assert all(np.isfinite(r["loss"]) for s, r in rows.items() if s not in (4, 8))
    assert trainer.ckpt.all_steps() == [4, 8]

    # The step itself: a bad batch leaves params and optimizer state bit for bit as they were.
    keys = set(trainer.task.model_inputs) | set(trainer.task.label_fields)
    batches = batching.train_batches(
        trainer.data.train, global_batch_size=8, seed=trainer.cfg.train.seed,
        buckets=trainer.buckets, max_length=16, pad_values=trainer._pad_values())
    by_step = {s: {k: v for k, v in next(batches).items() if k in keys} for s in range(1, 5)}
    before = jax.device_get(trainer.state)
    state, metrics = trainer._train_step(trainer.state, trainer._device_batch(by_step[4]))
    assert bool(metrics["nonfinite"]) and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(jax.tree.leaves((after["params"], after["opt_state"])),
                    jax.tree.leaves((before["params"], before["opt_state"]))):
      np.testing.assert_array_equal(a, b)
    state, metrics = trainer._train_step(state, trainer._device_batch(by_step[1]))
    assert not bool(metrics["nonfinite"])
    moved = jax.device_get(state["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(moved),
                                                         jax.tree.leaves(before["params"])))
  finally:
    trainer.ckpt.close()


# ---- checkpoint writes that fail ---------------------------------------------------------------
def test_full_disk_during_a_save_keeps_the_earlier_checkpoints(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  bits = np.random.default_rng(0).integers(0, 2**32, size=1_000_000, dtype=np.uint32)  # 4 MB
  ck = Checkpointer(str(tmp_path), keep=1)
  ck.save(1, {"w": jnp.asarray(bits), "step": jnp.int32(1)}, meta={"step": 1})
  ck.wait_until_finished()
  # A disk that fills up while the arrays are written (in Orbax's background thread): the
  # kernel's file size limit makes those writes fail, as a full disk would (EFBIG, not ENOSPC).
  limit, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.getsignal(signal.SIGXFSZ)
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, limit[1]))
  try:
    ck.save(2, {"w": jnp.asarray(bits[::-1]), "step": jnp.int32(2)}, meta={"step": 2})
    with pytest.raises(CheckpointSaveError, match=r"step 2 .* failed .*File too large.* The "
                                                  r"earlier steps \[1\] are intact"):
      ck.wait_until_finished()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limit)
    signal.signal(signal.SIGXFSZ, handler)
  assert ck.all_steps() == [1] and ck.latest_step() == 1
  # A disk already full when the save starts: the small JSON meta write fails with ENOSPC.
  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", no_space)
  with pytest.raises(CheckpointSaveError, match=r"step 3 .*No space left on device.* \[1\] are"):
    ck.save(3, {"w": jnp.asarray(bits), "step": jnp.int32(3)}, meta={"step": 3})
  monkeypatch.undo()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  target = {"w": jax.ShapeDtypeStruct(bits.shape, np.uint32, sharding=spec),
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=spec)}
  state, meta, step = ck.restore_latest(target)
  assert step == 1 and meta == {"step": 1} and np.array_equal(np.asarray(state["w"]), bits)
  assert ck.save(4, {"w": jnp.asarray(bits), "step": jnp.int32(4)}, meta={"step": 4})
  ck.close()  # space is back: training goes on, and keep=1 may now drop step 1
  with Checkpointer(str(tmp_path), keep=1) as fresh:
    assert fresh.all_steps() == [4]
