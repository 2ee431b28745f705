"""Memory per device of the compiled train step: XLA's own accounting and the state's shard sizes.

`memory_analysis()` of the compiled SPMD program counts one device's arguments, outputs,
temporaries and code; the shard sizes say how much of the arguments are parameters and optimizer
state, the part the mesh rules (dp, fsdp, fsdp_tp) divide. Works on abstract inputs
(`jax.ShapeDtypeStruct`s with shardings), so a model's footprint can be read before allocating it.
"""

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MiB = 2**20


def shard_bytes(tree) -> int:
  """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs (whole leaf if unsharded)."""
  total = 0
  for x in jax.tree_util.tree_leaves(tree):
    s = getattr(x, "sharding", None)
    shape = s.shard_shape(x.shape) if s is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def step_memory(step, state, batch, compiler_options=None) -> dict:
  """Per-device bytes of the jitted `step(state, batch)`: XLA's analysis plus params/optimizer.

  Without `compiler_options` the compile is jit's own, so a later call with the same shapes and
  shardings reuses it. {"xla_backend_optimization_level": 0} halves a CPU compile that is only
  measured: buffer assignment, hence every number here, comes before LLVM's optimisations.
  """
  out = {"params_bytes": shard_bytes(state["params"]),
         "opt_state_bytes": shard_bytes(state["opt_state"]),
         **({"frozen_bytes": shard_bytes(state["frozen"])} if "frozen" in state else {})}
  stats = step.lower(state, batch).compile(compiler_options).memory_analysis()
  if stats is not None:  # a backend may not report one
    out.update(argument_bytes=stats.argument_size_in_bytes,
               output_bytes=stats.output_size_in_bytes, alias_bytes=stats.alias_size_in_bytes,
               temp_bytes=stats.temp_size_in_bytes,
               generated_code_bytes=stats.generated_code_size_in_bytes)
    # Donated state is aliased: its outputs reuse the argument buffers.
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] +
                          out["temp_bytes"] + out["generated_code_bytes"])
  return out


def describe(mem: dict) -> str:
  """One log line, in MiB."""
  names = ("params", "opt_state", "frozen", "argument", "output", "alias", "temp", "generated_code", "total")
  parts = [f"{n} {mem[n + '_bytes'] / MiB:.1f}" for n in names if n + "_bytes" in mem]
  return "Train step memory per device (MiB): " + ", ".join(parts)


def abstract_batch(mesh, arrays: dict) -> dict:
  """ShapeDtypeStructs for a host batch dict, sharded over the batch axes as the Trainer feeds it."""
  from flaxhf.train.engine import BATCH_AXES
  s = NamedSharding(mesh, P(BATCH_AXES))
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=s)
          for k, v in arrays.items()}


def abstract_train_step(model, task, train_cfg, mesh, rules, total_steps: int = 1000, lora=None,
                        frozen_dtype=None):
  """(jitted step, abstract state) as the Trainer builds them, without allocating any weights;
  with a `flaxhf.lora.Lora`, a LoRA run's (params: what trains, frozen: the base)."""
  import jax.numpy as jnp

  from flaxhf.train import engine, optim
  tx, schedule = optim.make_optimizer(train_cfg, total_steps)
  shardings, abstract = engine.make_state_shardings(model, tx, mesh, rules, lora,
                                                    frozen_dtype or jnp.float32)
  step = engine.build_train_step(model, task, tx, schedule, train_cfg.grad_accum_steps, mesh,
                                 shardings, lora=lora)
  return step, abstract
