"""Train-step memory per device on the 8 simulated devices: fsdp holds ~1/8 of dp's state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import flaxhf
from flaxhf import sharding
from flaxhf.train import memory

B, L = 8, 32
MESHES = {"dp": dict(data=8), "fsdp": dict(data=1, fsdp=8), "fsdp_tp": dict(data=1, fsdp=4, tensor=2)}


def task_and_cfg():
  from configs.text_classification import get_config
  from flaxhf.data.text_classification import TaskData
  from flaxhf.train import tasks
  cfg = get_config("smoke")
  task = tasks.TextClassification(cfg)
  return task, cfg, TaskData(train=None, eval=None, label_list=None, num_labels=2,
                             problem_type="single_label_classification")


@pytest.fixture(scope="module")
def memories():
  """Per-device memory of one BERT train step (3.8M params: the weights dwarf the activations)."""
  config = transformers.BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=1024,
                                   max_position_embeddings=128, num_labels=2)
  task, cfg, data = task_and_cfg()
  task.configure_model(config, data)
  model = flaxhf.FlaxBertForSequenceClassification(config, _do_init=False)  # no weights allocated
  batch = {"input_ids": np.zeros((B, L), np.int32), "attention_mask": np.ones((B, L), np.int32),
           "token_type_ids": np.zeros((B, L), np.int32), "labels": np.zeros((B,), np.int32)}
  out = {}
  for rules, axes in MESHES.items():
    mesh = sharding.make_mesh(**axes)
    step, state = memory.abstract_train_step(model, task, cfg.train, mesh, rules)
    # Unoptimised machine code: the same buffer sizes, half the compile time.
    out[rules] = memory.step_memory(step, state, memory.abstract_batch(mesh, batch),
                                    {"xla_backend_optimization_level": 0})
  out["n_params"] = model.num_parameters()
  return out


def test_dp_replicates_the_whole_state(memories):
  dp = memories["dp"]
  assert dp["params_bytes"] == 4 * memories["n_params"]  # float32, every weight on every device
  assert dp["opt_state_bytes"] == pytest.approx(2 * dp["params_bytes"], rel=1e-4)  # AdamW mu, nu
  # XLA's arguments are the state plus one device's batch rows; donated state aliases the outputs.
  state = dp["params_bytes"] + dp["opt_state_bytes"]
  assert state <= dp["argument_bytes"] <= state + 64 * 1024
  assert dp["alias_bytes"] >= state - 64 * 1024


@pytest.mark.parametrize("rules", ["fsdp", "fsdp_tp"])
def test_sharded_rules_hold_an_eighth(memories, rules):
  dp, got = memories["dp"], memories[rules]
  for key in ("params_bytes", "opt_state_bytes", "argument_bytes"):
    ratio = got[key] / dp[key]
    # A few vectors (biases over `mlp`/`heads`, the 2-class head) stay whole under fsdp.
    assert 1 / 8 <= ratio <= 1.25 / 8, (rules, key, ratio)
  assert got["total_bytes"] < 0.5 * dp["total_bytes"], (rules, got, dp)


def test_shard_bytes_counts_one_device():
  mesh = sharding.make_mesh(data=1, fsdp=8)
  s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
  x = jax.device_put(jnp.zeros((64, 3), jnp.float32), s)
  whole = jax.ShapeDtypeStruct((5,), jnp.bfloat16)  # no sharding: all of it
  assert memory.shard_bytes({"x": x, "y": whole}) == 8 * 3 * 4 + 5 * 2
  assert "params 0.0" in memory.describe({"params_bytes": 10})
