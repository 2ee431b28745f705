"""RunLogger counts completed steps: the bar and tokens/s never run ahead of the device."""

import json

import jax
import jax.numpy as jnp
import pytest

from flaxhf.train.logger import RunLogger


class FakeArray:
  """A metric on a fake device: ready only when the test says so, or when the host waits on it."""

  def __init__(self):
    self.ready, self.waited = False, False

  def is_ready(self):
    return self.ready

  def block_until_ready(self):
    self.waited, self.ready = True, True
    return self


@pytest.fixture
def logger(tmp_path):
  log = RunLogger(str(tmp_path), total_steps=10, start_step=0, progress_bar=True, max_in_flight=2)
  yield log
  log.close()


def dispatch(logger, step, tokens):
  arr = FakeArray()
  logger.count_tokens(tokens)
  logger.step_done(step, {"loss": arr, "grad_norm": arr})
  return arr


def test_bar_counts_only_finished_steps_in_order(logger):
  a1 = dispatch(logger, 1, 100)
  a2 = dispatch(logger, 2, 200)
  assert logger._bar.n == 0 and logger.tokens == 0  # both still running
  a3 = dispatch(logger, 3, 300)
  # Three in flight > 2: the host waits for step 1 only.
  assert a1.waited and not a2.waited and not a3.waited
  assert (logger._bar.n, logger.completed, logger.tokens) == (1, 1, 100)
  a3.ready = True  # finished out of order: step 2 still runs, so the bar stays at 1
  a4 = dispatch(logger, 4, 400)
  assert a2.waited and (logger._bar.n, logger.tokens) == (3, 600)  # 2 waited on, 3 was ready
  assert not a4.waited
  a4.ready = True
  dispatch(logger, 5, 500)
  assert (logger._bar.n, logger.tokens) == (4, 1000)


def test_train_log_counts_tokens_of_completed_steps(logger, tmp_path):
  logger.reset_clock(0)
  for step in (1, 2, 3):
    dispatch(logger, step, 100 * step)
  logger.train(3, {"loss": 1.0, "learning_rate": 1e-3})
  row = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
  assert logger._bar.n == 3
  # tokens/s over steps/s = tokens per completed step: (100 + 200 + 300) / 3.
  assert row["tokens_per_sec"] / row["steps_per_sec"] == pytest.approx(200.0)


def test_bar_never_ahead_of_real_async_steps(tmp_path):
  @jax.jit
  def slow_step(x):
    for _ in range(30):
      x = jnp.tanh(x @ x)
    return x, {"loss": x.sum()}

  x = jnp.full((256, 256), 0.01)
  jax.block_until_ready(slow_step(x))  # compile outside the loop
  logger = RunLogger(str(tmp_path), total_steps=8, start_step=0, max_in_flight=2)
  dispatched, ran_ahead = [], False
  for step in range(1, 9):
    x, metrics = slow_step(x)
    dispatched.append(metrics["loss"])
    ran_ahead |= not dispatched[-1].is_ready()
    logger.step_done(step, metrics)
    shown = logger._bar.n
    ready = sum(a.is_ready() for a in dispatched)  # read after the bar: readiness only grows
    assert shown <= ready, f"bar at {shown} with only {ready} of {step} steps finished"
    assert step - shown <= 2, "the host queued more than max_in_flight steps"
  assert ran_ahead, "dispatch never ran ahead of the device: this test would not see the bug"
  logger.close()
  assert logger._bar.n == 8
