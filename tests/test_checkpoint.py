"""Checkpointer: bit-exact sharded round trips, retention, meta, crash safety and clear errors."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flaxhf.checkpoint import Checkpointer, read_meta, restore_arrays
from engine_utils import child_env

REPO = pathlib.Path(__file__).parents[1]
META = {"config": {"lr": 1e-3, "layers": [1, 2], "name": "bert", "flag": True, "none": None},
        "model_class": "FlaxBertForSequenceClassification", "data_position": 1234}


def _mesh(shape):
  return Mesh(np.array(jax.devices()).reshape(shape), ("data", "fsdp"))


def _train_state(mesh):
  """Params sharded over `mesh`, AdamW moments after one real update, step and both key kinds."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"dense": {"weight": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros((8,))},
            "embed": jax.random.normal(k2, (32, 16))}
  opt = optax.adamw(1e-2)
  opt_state = opt.init(params)
  grads = jax.tree.map(lambda p: jnp.sin(p) + 0.5, params)
  updates, opt_state = opt.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7),
           "rng": jax.random.key_data(jax.random.key(3)), "typed_rng": jax.random.key(4)}
  specs = {"dense": {"weight": P("data", "fsdp"), "bias": P("fsdp")}, "embed": P("fsdp", None)}

  def place(path, x):
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    spec = P()
    if "params" in names or "mu" in names or "nu" in names:
      spec = specs["embed"] if "embed" in names else specs["dense"][names[-1]]
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(place, state)


def _abstract(state, mesh, spec_fn=lambda x: P()):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec_fn(x))),
      state)


def _bits(x):
  """Host bytes of an array (typed keys as their key data), for bit-for-bit comparison."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x).tobytes()


def _assert_bit_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert _bits(x) == _bits(y), jax.tree_util.keystr(path)


def test_sharded_round_trip_onto_other_sharding_is_bit_exact(tmp_path):
  state = _train_state(_mesh((2, 4)))
  expected = jax.tree.map(lambda x: x.copy(), state)
  ck = Checkpointer(str(tmp_path), keep=2)
  assert ck.save(7, state, meta=META)
  # The trainer donates the state right after save() returns; the async write must not need it.
  for x in jax.tree.leaves(state):
    x.delete()
  ck.wait_until_finished()
  other = _mesh((4, 2))
  target = _abstract(expected, other, lambda x: P(None, "data") if x.ndim == 2 else P())
  restored, meta = ck.restore(7, target)
  _assert_bit_equal(restored, expected)
  assert type(restored["opt_state"][0]) is type(expected["opt_state"][0])  # optax namedtuple
  assert jax.dtypes.issubdtype(restored["typed_rng"].dtype, jax.dtypes.prng_key)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  assert meta == META
  ck.close()


@pytest.mark.parametrize("mode,best", [("max", 2), ("min", 3)])
def test_retention_keeps_latest_n_plus_best(tmp_path, mode, best):
  values = [0.5, 0.9, 0.1, None, float("nan"), 0.2]
  state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
  ck = Checkpointer(str(tmp_path), keep=2, best_metric="acc", best_mode=mode)
  for step, value in enumerate(values, start=1):
    assert ck.save(step, state, meta={"step": step},
                   metrics=None if value is None else {"acc": jnp.float32(value), "report": "x"})
  ck.wait_until_finished()
  # Latest two (5: NaN, 6) plus the best; step 4 (no metrics) and NaN never count as best.
  assert ck.all_steps() == sorted({best, 5, 6})
  assert ck.best_step() == best and ck.latest_step() == 6
  on_disk = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert on_disk == ck.all_steps() and not (tmp_path / "_deleted").exists()
  assert not ck.save(6, state, meta={}) and not ck.save(3, state, meta={})  # not newer: skipped
  ck.close()
  fresh = Checkpointer(str(tmp_path), keep=2, best_metric="acc", best_mode=mode)
  assert fresh.best_step() == best and fresh.all_steps() == sorted({best, 5, 6})
  assert read_meta(str(tmp_path / "6")) == {"step": 6}
  fresh.close()


def test_no_metrics_never_best(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=1, best_metric="acc")
  for step in (1, 2):
    ck.save(step, {"w": jnp.ones(2)}, meta={})
  ck.wait_until_finished()
  assert ck.best_step() is None and ck.all_steps() == [2]
  ck.close()


def test_restore_converts_between_typed_keys_and_key_data(tmp_path):
  mesh = _mesh((2, 4))
  key = jax.random.key(5, impl="rbg")
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, {"a": key, "b": jax.random.key_data(key)}, meta={})
    target = _abstract({"a": jax.random.key_data(key), "b": key}, mesh)
    restored, _ = ck.restore(1, target)
  assert restored["a"].dtype == jnp.uint32 and restored["b"].dtype == key.dtype
  assert _bits(restored["a"]) == _bits(key) == _bits(restored["b"])
  assert restored["b"].sharding == target["b"].sharding


def test_read_meta_and_restore_arrays_need_no_target(tmp_path):
  state = _train_state(_mesh((2, 4)))
  with Checkpointer(str(tmp_path), async_save=False) as ck:
    ck.save(3, state, meta=META)
  assert read_meta(str(tmp_path / "3")) == META
  arrays = restore_arrays(str(tmp_path / "3"))
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(arrays))
  np.testing.assert_array_equal(arrays["params"]["dense"]["weight"],
                                np.asarray(state["params"]["dense"]["weight"]))
  # Namedtuples come back as dicts: opt_state = (ScaleByAdamState, EmptyState, EmptyState).
  np.testing.assert_array_equal(arrays["opt_state"][0]["nu"]["embed"],
                                np.asarray(state["opt_state"][0].nu["embed"]))
  np.testing.assert_array_equal(arrays["typed_rng"],
                                np.asarray(jax.random.key_data(state["typed_rng"])))
  assert arrays["step"] == 7 and arrays["step"].dtype == np.int32


def test_errors_are_clear(tmp_path):
  mesh = _mesh((2, 4))
  state = {"params": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}, "step": jnp.int32(1)}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, meta={})
    ck.save(2, state, meta={})
    with pytest.raises(TypeError, match="JSON"):
      ck.save(3, state, meta={"x": np.float32(1)})
    with pytest.raises(FileNotFoundError, match=r"step 5 .*available steps: \[1, 2\]"):
      ck.restore(5, _abstract(state, mesh))
    wrong = {"params": {"w": jnp.ones((4, 4)), "c": jnp.zeros(8)}, "step": jnp.int32(1)}
    with pytest.raises(ValueError) as err:
      ck.restore(2, _abstract(wrong, mesh))
    for name in ("params.w", "(4, 8)", "(4, 4)", "params.c", "params.b"):
      assert name in str(err.value)
    # Data files lost after the commit (disk trouble, a partial copy): name the folder, go back.
    for f in (tmp_path / "2" / "state").rglob("*"):
      if f.is_file() and f.parent.name == "d":
        f.unlink()
    with pytest.raises(RuntimeError, match=r"/2 is incomplete or corrupt; restore the previous"):
      ck.restore(2, _abstract(state, mesh))
    (tmp_path / "1" / "state" / "_METADATA").unlink()
    with pytest.raises(RuntimeError, match="/1 is incomplete or corrupt; no earlier checkpoint"):
      ck.restore(1, _abstract(state, mesh))


_CHILD = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp, numpy as np
    from flaxhf.checkpoint import Checkpointer
    directory = sys.argv[1]
    bits = np.random.default_rng(0).integers(0, 2**32, size=50_000_000, dtype=np.uint32)  # 200 MB
    ck = Checkpointer(directory, keep=3)
    ck.save(1, {"w": jnp.asarray(bits), "step": jnp.int32(1)}, meta={"step": 1})
    ck.wait_until_finished()
    ck.save(2, {"w": jnp.asarray(bits[::-1]), "step": jnp.int32(2)}, meta={"step": 2})
    # Report only once Orbax is writing step 2, so the parent kills a save that is in flight.
    while not any(n.startswith("2.orbax-checkpoint-tmp") for n in os.listdir(directory)):
      time.sleep(0.002)
    print("saving", flush=True)
    time.sleep(600)
""")


def test_sigkill_mid_async_save_leaves_only_restorable_steps(tmp_path):
  env = child_env()
  child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    line = child.stdout.readline()
    os.kill(child.pid, signal.SIGKILL)
  finally:
    child.kill()
    child.wait(timeout=30)
  assert line.strip() == "saving", child.stderr.read()[-3000:]
  # A half-deleted old step would look like this; it must never be listed.
  (tmp_path / "_deleted" / "0" / "state").mkdir(parents=True)

  ck = Checkpointer(str(tmp_path), keep=3)
  latest = ck.latest_step()
  # Step 2 was in flight when killed (a 200 MB write takes ~1 s); it may only appear if complete.
  assert latest in (1, 2) and ck.all_steps() == list(range(1, latest + 1))
  bits = np.random.default_rng(0).integers(0, 2**32, size=50_000_000, dtype=np.uint32)
  mesh = _mesh((8, 1))
  target = {"w": jax.ShapeDtypeStruct(bits.shape, np.uint32,
                                      sharding=NamedSharding(mesh, P("data"))),
            "step": jax.ShapeDtypeStruct((), np.int32, sharding=NamedSharding(mesh, P()))}
  restored, meta = ck.restore(latest, target)
  assert meta == {"step": latest} and int(restored["step"]) == latest
  assert np.array_equal(np.asarray(restored["w"]), bits if latest == 1 else bits[::-1])
  # Training goes on: the next save works and the crash leftovers are gone afterwards.
  assert ck.save(3, {"w": jnp.ones(2)}, meta={})
  ck.close()
  leftovers = [p.name for p in tmp_path.iterdir() if not p.name.isdigit()]
  assert leftovers == [], leftovers
  assert read_meta(str(tmp_path / "3")) == {}
