"""Asynchronous, sharded checkpoints of the train state; the only flaxhf module that imports Orbax.

On disk, `<directory>/<step>/` holds the items `state/` (the state pytree, OCDBT), `meta/` (JSON)
and, for steps saved with metrics while a best metric is tracked, `metrics/`. Orbax writes a step to
`<step>.orbax-checkpoint-tmp-*` and renames it when every process has finished, so a step folder
with a plain integer name is always complete. Superseded steps are first renamed into `_deleted/`
and only then removed, so a kill mid-deletion never leaves a half-deleted step that looks valid.
A step that fails to restore later (files lost or damaged after the commit) is moved into
`_corrupt/` by `restore_latest`, which resumes from the newest step that does restore. A save that
fails (a full disk) raises CheckpointSaveError and leaves every earlier step as it was.

Typed PRNG keys (`jax.random.key`) may be saved directly: they are stored as their uint32 key data
and come back as whichever kind `abstract_state` holds (`restore_arrays` gives the raw data).
"""

import json
import logging
import math
import os

from absl import logging as absl_logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

_STATE, _META = "state", "meta"
_TRASH = "_deleted"
_CORRUPT = "_corrupt"
_MAX_LISTED = 20  # leaves named per kind of mismatch; the rest are counted

log = logging.getLogger(__name__)


# Orbax warnings that describe what this module does on purpose (saving without metrics).
_EXPECTED_WARNINGS = ("did not provide metrics",)


class _QuietOrbax(logging.Filter):
  """Drops Orbax's INFO/DEBUG records and expected warnings from the absl logger."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno >= logging.ERROR:
      return True
    return (record.levelno >= logging.WARNING
            and not any(w in record.getMessage() for w in _EXPECTED_WARNINGS))


def _quiet_orbax():
  # A filter on the absl logger, added when first used rather than at import, silences only
  # Orbax's per-save chatter (dozens of lines per step when an app turns absl to INFO) and leaves
  # every other absl user's verbosity alone.
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
    logger.addFilter(_QuietOrbax())


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (often a full disk); the earlier checkpoints are intact."""


class Checkpointer:
  """Asynchronous Orbax checkpoints of the train state in <directory>/<step>/.

  Keeps the `keep` most recent steps plus the best one by `best_metric`. In a multi-process run
  every process must make the same calls with the same arguments; process 0 is the primary host.
  """

  def __init__(self, directory: str, *, keep: int = 3, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}.")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    _quiet_orbax()
    self.directory = epath.Path(directory).absolute()
    self.best_metric, self.best_mode = best_metric, best_mode
    self._worst = -math.inf if best_mode == "max" else math.inf
    self._empty_trash()
    policies = [ocp_managers.LatestN(n=keep)]
    if best_metric:
      # BestN keeps the last of the checkpoints sorted ascending by score (reverse for "min");
      # steps saved without metrics are never the best and never kept by this policy.
      policies.append(ocp_managers.BestN(get_metric_fn=self._score, reverse=best_mode == "min",
                                         n=1, keep_checkpoints_without_metrics=False))
    processes = ocp.options.MultiprocessingOptions(primary_host=0)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_managers.AnyPreservationPolicy(policies),
        # best_fn only makes Orbax write each step's metrics (which BestN reads back on restart).
        best_fn=self._score if best_metric else None, best_mode=best_mode,
        todelete_subdir=_TRASH, cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save, multiprocessing_options=processes)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(multiprocessing_options=processes),
                       _META: ocp.JsonCheckpointHandler(multiprocessing_options=processes)})
    # Scores by step, kept here because an in-flight step has no metrics file yet.
    self._scores = {}
    self._in_flight = None  # the step of the last save started, until it is known to be done
    if best_metric:
      for step in self._manager.all_steps():
        score = self._score(self._manager.metrics(step) or {})
        if math.isfinite(score):
          self._scores[step] = score

  def _score(self, metrics) -> float:
    value = metrics.get(self.best_metric) if isinstance(metrics, dict) else None
    try:
      value = float(value)
    except (TypeError, ValueError):
      return self._worst
    return value if math.isfinite(value) else self._worst

  def _empty_trash(self):
    # Only the primary host deletes; a kill half-way leaves garbage in _deleted/ only.
    if jax.process_index() == 0:
      (self.directory / _TRASH).rmtree(missing_ok=True)

  def save(self, step: int, state, *, meta: dict, metrics: dict | None = None,
           force: bool = False) -> bool:
    """Starts an async save of `state` and the JSON-able `meta`; False if the step was not newer."""
    step = int(step)
    try:
      json.dumps(meta)
    except (TypeError, ValueError) as e:
      raise TypeError(f"Checkpoint meta must be JSON-serialisable: {e}") from None
    if metrics is not None:
      # Only numbers go to Orbax's metrics JSON; a task may report other things (lists, reports).
      metrics = {str(k): float(v) for k, v in metrics.items() if _is_number(v)}
    # Orbax refuses steps not newer than the latest one (e.g. a stale step after a restart);
    # `force` overrides that, but an existing step is never overwritten.
    if not force and not self._manager.should_save(step):
      log.warning("Not saving step %d: it is not newer than the latest checkpoint (%s).", step,
                  self.latest_step())
      return False
    if step in self._manager.all_steps():
      log.warning("Not saving step %d: %s already exists.", step, self.directory / str(step))
      return False
    orbax_metrics = None
    if self.best_metric and metrics is not None:
      if math.isfinite(self._score(metrics)):
        orbax_metrics = metrics
      else:
        log.warning("Step %d: metrics lack a finite %r; it cannot become the best checkpoint.",
                    step, self.best_metric)
    # The previous save's deletions (renames into _deleted/) must be done before emptying it.
    self.wait_until_finished()
    self._in_flight = step
    try:
      saved = self._manager.save(
          step, args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state),
                                           _META: ocp.args.JsonSave(meta)}),
          metrics=orbax_metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e
    if saved and orbax_metrics is not None:
      self._scores[step] = self._score(orbax_metrics)
    return saved

  def latest_step(self) -> int | None:
    """The newest step (including one still being saved by this process); None if none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best `best_metric` (ties: the newest); None if none was saved with it."""
    steps = set(self._manager.all_steps())
    scored = [(score if self.best_mode == "max" else -score, step)
              for step, score in self._scores.items() if step in steps]
    return max(scored)[1] if scored else None

  def all_steps(self) -> list[int]:
    """All complete (or in-flight from this process) steps, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int, abstract_state):
    """Restores `step` straight onto the shardings of `abstract_state`; returns (state, meta)."""
    step = int(step)
    self._manager.wait_until_finished()  # `step` may be this process's in-flight save
    steps = self.all_steps()
    if step not in steps:
      self._manager.reload()  # another job may have written it since we listed the folder
      steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available "
                              f"steps: {steps or 'none'}.")
    step_dir = self.directory / str(step)
    try:
      saved = _saved_tree(step_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupt(step_dir, steps, e) from e
    _check_compatible(saved, abstract_state, step_dir)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      raise _corrupt(step_dir, steps, e) from e
    state = jax.tree.map(_as_target_kind, restored[_STATE], abstract_state)
    return state, restored[_META]

  def wait_until_finished(self):
    """Blocks until the in-flight save is committed; raises CheckpointSaveError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e
    self._in_flight = None
    self._empty_trash()

  def _save_failed(self, error) -> CheckpointSaveError:
    step, self._in_flight = self._in_flight, None
    # Orbax forgets every step after a failed save; what is on disk is still intact.
    self._manager.reload()
    cause = str(error)  # TensorStore puts the OS error (e.g. "No space left") at the end
    cause = cause if len(cause) <= 300 else cause[:100] + " ... " + cause[-200:]
    return CheckpointSaveError(
        f"Saving checkpoint step {step} in {self.directory} failed ({type(error).__name__}: "
        f"{cause}). The earlier steps {self.all_steps() or '(none)'} are intact; free disk space "
        "and rerun to resume from the latest of them.")

  def restore_latest(self, abstract_state):
    """(state, meta, step) of the newest step that restores; corrupt ones go to `_corrupt/`.

    Raises FileNotFoundError without checkpoints, RuntimeError if none restores, and ValueError
    (not skipped) if a step does not match `abstract_state`.
    """
    self._manager.wait_until_finished()
    self._manager.reload()
    failed = []
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        error = None
      except RuntimeError as e:  # _corrupt(): files missing or unreadable
        error = e
      if not _all_processes_ok(error is None):  # one process's shard may be the damaged one
        log.warning("Checkpoint step %d does not restore, trying the one before: %s", step,
                    error or "another process could not read its shards")
        self._set_aside(step)
        failed.append(step)
        continue
      return state, meta, step
    if failed:
      raise RuntimeError(f"No checkpoint in {self.directory} restores (steps {failed} are moved to "
                         f"{self.directory / _CORRUPT}).")
    raise FileNotFoundError(f"No checkpoint in {self.directory}.")

  def _set_aside(self, step: int):
    """Moves a step that does not restore out of the step list (kept in _corrupt/ to inspect)."""
    if jax.process_index() == 0:
      (self.directory / _CORRUPT).mkdir(exist_ok=True)
      target = self.directory / _CORRUPT / str(step)
      n = 1
      while target.exists():
        target, n = self.directory / _CORRUPT / f"{step}-{n}", n + 1
      (self.directory / str(step)).rename(target)
    _barrier(f"flaxhf_set_aside_{step}")
    self._manager.reload()
    self._scores.pop(step, None)

  def close(self):
    """Finishes the in-flight save and releases Orbax's threads."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_meta(step_dir: str) -> dict:
  """The meta of one checkpoint folder (<directory>/<step>), without any JAX state."""
  _quiet_orbax()
  path = epath.Path(step_dir) / _META
  if not path.exists():
    raise FileNotFoundError(f"{step_dir} is not a complete flaxhf checkpoint (no {_META}/).")
  # The handler, not a Checkpointer: no cross-process barrier, so one process may call this alone.
  return ocp.JsonCheckpointHandler().restore(path, ocp.args.JsonRestore())


def restore_arrays(step_dir: str):
  """The state of one checkpoint folder as host numpy arrays, with no abstract target.

  Namedtuples (optax states) come back as dicts and tuples as lists; typed PRNG keys as key data.
  """
  _quiet_orbax()
  path = epath.Path(step_dir) / _STATE
  if not path.exists():
    raise FileNotFoundError(f"{step_dir} is not a complete flaxhf checkpoint (no {_STATE}/).")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(path).tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  finally:
    handler.close()


def gather_json(value) -> list:
  """Every process's JSON-able `value`, in process order (all processes must call it)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode("utf-8")) for row, n in zip(rows, sizes)]


def _all_processes_ok(ok: bool) -> bool:
  """True when `ok` holds on every process (each one reads only its own shards)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.number)) or getattr(value, "shape", None) == ()


def _saved_tree(step_dir: epath.Path):
  """The saved state's tree of array metadata (shape, dtype), read without loading arrays."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(step_dir / _STATE).tree
  finally:
    handler.close()


def _corrupt(step_dir, steps, error) -> RuntimeError:
  earlier = [s for s in steps if s < int(step_dir.name)]
  hint = (f"restore the previous step, {earlier[-1]}, instead" if earlier
          else "no earlier checkpoint exists")
  cause = str(error)
  cause = cause if len(cause) <= 300 else cause[:300] + " ..."  # TensorStore errors run to pages
  return RuntimeError(f"Checkpoint {step_dir} is incomplete or corrupt; {hint}. "
                      f"Cause: {type(error).__name__}: {cause}")


def _path_str(path) -> str:
  names = []
  for key in path:
    for attr in ("key", "idx", "name"):  # DictKey/FlattenedIndexKey, SequenceKey, GetAttrKey
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return ".".join(names)


def _is_key(dtype) -> bool:
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _as_target_kind(x, target):
  """`x` as a typed PRNG key or as raw key data, whichever `target` is."""
  # Orbax returns the kind that was saved, so a run that switched between `jax.random.key` and
  # key data would otherwise get the other type back.
  want_key = _is_key(getattr(target, "dtype", None))
  if want_key and not _is_key(getattr(x, "dtype", None)):
    # jax has no public dtype -> impl accessor; the key dtype carries its impl.
    impl = target.dtype._impl  # pylint: disable=protected-access
    return jax.random.wrap_key_data(x, impl=impl)
  if not want_key and _is_key(getattr(x, "dtype", None)):
    return jax.random.key_data(x)
  return x


def _stored_shape_dtype(leaf):
  """The (shape, dtype) a target leaf has on disk: typed PRNG keys are stored as key data."""
  dtype = getattr(leaf, "dtype", None)
  if _is_key(dtype):
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, dtype))
    return tuple(data.shape), np.dtype(data.dtype)
  return tuple(getattr(leaf, "shape", ())), (np.dtype(dtype) if dtype is not None else None)


def _check_compatible(saved, target, step_dir):
  """Raises a ValueError naming each leaf whose path, shape or dtype differs from the checkpoint."""
  have = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
  want = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  problems = []

  def report(kind, items):
    if items:
      listed = ", ".join(items[:_MAX_LISTED])
      more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
      problems.append(f"{kind}: {listed}{more}")

  report("missing from the checkpoint", sorted(set(want) - set(have)))
  report("in the checkpoint but not in the target", sorted(set(have) - set(want)))
  differ = []
  for name in sorted(set(want) & set(have)):
    shape, dtype = _stored_shape_dtype(want[name])
    saved_shape = tuple(getattr(have[name], "shape", ()))
    saved_dtype = getattr(have[name], "dtype", None)
    saved_dtype = np.dtype(saved_dtype) if saved_dtype is not None else None
    if shape != saved_shape or (dtype is not None and saved_dtype is not None
                                and dtype != saved_dtype):
      differ.append(f"{name} (checkpoint {saved_shape} {saved_dtype}, target {shape} {dtype})")
  report("shape/dtype differs", differ)
  if problems:
    raise ValueError(f"Checkpoint {step_dir} does not match the target state: "
                     + "; ".join(problems) + ".")
