"""What the training loop does when the cluster takes the machines back or the numbers go bad.

Exit codes of `launch/run.py` (sysexits.h names, so schedulers and shells can tell them apart):
  75 EX_TEMPFAIL  preempted (SIGTERM): a checkpoint of the agreed step was saved; rerun to resume.
  65 EX_DATAERR   a non-finite loss or gradient stopped the run (train.nonfinite); nothing saved
                  after the last good step.
  78 EX_CONFIG    the cluster environment is incomplete or inconsistent (flaxhf.distributed).
A process whose peer died is ended by jax.distributed itself (SIGABRT, 134), naming the peer.
"""

import logging
import signal
from typing import Callable, Optional

import jax
import jax.numpy as jnp

log = logging.getLogger("flaxhf")

EXIT_PREEMPTED, EXIT_NONFINITE, EXIT_CLUSTER = 75, 65, 78
NONFINITE_MODES = ("abort", "skip")


class Preempted(Exception):
  """Every process stopped at `step`, after saving its checkpoint, because of a SIGTERM."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"Preempted: every process stopped at step {step} and saved it in "
                     f"{directory}; rerun the same command to resume from there.")
    self.step = step


class NonFiniteError(RuntimeError):
  """A non-finite loss or gradient norm at `step` ended the run."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


def exit_code(error: BaseException) -> Optional[int]:
  """The documented exit code for an error that ends a run on purpose; None for any other."""
  from flaxhf.distributed import ClusterError
  for kind, code in ((Preempted, EXIT_PREEMPTED), (NonFiniteError, EXIT_NONFINITE),
                     (ClusterError, EXIT_CLUSTER)):
    if isinstance(error, kind):
      return code
  return None


class Preemption:
  """SIGTERM on any process -> the step at which all processes stop; ask `reached` every step.

  Multi-process runs use jax.distributed's preemption service (its own SIGTERM handler, then a
  background agreement on max(step) + 1 over the coordination service: no device work, a few
  microseconds a step). One process has nobody to agree with: a Python handler sets a flag.
  """

  def __init__(self):
    self.requested, self._previous = False, None
    self._service = jax.distributed.is_initialized()
    if self._service:
      return
    try:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    except ValueError:  # signal handlers can only be set from the main thread
      log.warning("Training runs outside the main thread: SIGTERM will not save a checkpoint.")

  def _on_signal(self, signum, frame):
    del frame
    self.requested = True
    log.warning("Received %s: stopping after this step with a checkpoint.",
                signal.Signals(signum).name)

  def reached(self, step: int) -> bool:
    """True at the step every process stops at (the same step on all of them)."""
    if not self._service:
      return self.requested
    from jax.experimental import multihost_utils
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError as e:  # jax_enable_preemption_service=False
      log.warning("SIGTERM will not save a checkpoint: %s", e)
      self._service = None
      return False

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def keep_if(ok, new, old):
  """`new` where the scalar `ok` holds, else `old`, leaf by leaf.

  A select rather than lax.cond: XLA's GPU conditional copies its predicate to the host and waits,
  a select fuses into the optimizer update and keeps the step one asynchronous program.
  """
  return jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)


class NonFiniteGuard:
  """Host side of train.nonfinite: reads the step's `nonfinite` flags when the loop syncs anyway.

  `abort` raises at the first bad step; `skip` (the step already dropped the update on device)
  counts and logs it and raises after `max_in_a_row` bad steps in a row. `check` runs before every
  log, eval and checkpoint, so no checkpoint is ever written after an unnoticed bad step.
  """

  def __init__(self, mode: str, max_in_a_row: int, last_good: Callable[[], Optional[int]]):
    if mode not in NONFINITE_MODES:
      raise ValueError(f"train.nonfinite={mode!r} is not one of {NONFINITE_MODES}.")
    if max_in_a_row < 1:
      raise ValueError(f"train.max_nonfinite_in_a_row={max_in_a_row} must be >= 1.")
    self.mode, self.max_in_a_row, self._last_good = mode, max_in_a_row, last_good
    self.skipped, self.in_a_row, self._pending = 0, 0, []

  def add(self, step: int, flag):
    """Registers the device flag of dispatched step `step` (read later, without a sync now)."""
    self._pending.append((step, flag))

  def check(self) -> int:
    """Reads the pending flags in step order; the number of bad steps among them."""
    pending, self._pending = self._pending, []
    flags = jax.device_get([f for _, f in pending])
    bad = 0
    for (step, _), flag in zip(pending, flags):
      if not flag:
        self.in_a_row = 0
        continue
      bad += 1
      self.skipped += 1
      self.in_a_row += 1
      last = self._last_good()
      keep = f"the last checkpoint is step {last}" if last is not None else "no checkpoint exists"
      if self.mode == "abort":
        raise NonFiniteError(step, (
            f"Non-finite loss or gradients at step {step} (train.nonfinite=abort); {keep}, from "
            "which a rerun resumes. Lower train.learning_rate, check the data around this step, "
            "or set train.nonfinite=skip to drop such updates."))
      if self.in_a_row >= self.max_in_a_row:
        raise NonFiniteError(step, (
            f"Non-finite loss or gradients in {self.in_a_row} steps in a row, the last at step "
            f"{step} (train.max_nonfinite_in_a_row={self.max_in_a_row}); {keep}. The model has "
            "diverged or the data is broken: lower train.learning_rate or check the data."))
      log.warning("Step %d: non-finite loss or gradients; the update was skipped (%d in a row, %d "
                  "in this run).", step, self.in_a_row, self.skipped)
    return bad
