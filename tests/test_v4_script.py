"""A training script written the transformers-v4 Flax way (TrainState + jit/pmap) runs on flaxhf."""

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax.training import train_state

import flaxhf
from model_utils import TINY_CONFIGS, VOCAB

NUM_LABELS = 3


def make_batch(n=16, length=8, seed=0):
  """A fixed batch of right-padded sequences; labels a function of the second token."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, VOCAB, size=(n, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[::2, -3:] = 0
  ids = np.where(mask == 1, ids, 0)
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "labels": (ids[:, 1] % NUM_LABELS).astype(np.int32)}


def make_state(model, lr=3e-3):
  return train_state.TrainState.create(apply_fn=model.__call__, params=model.params,
                                       tx=optax.adamw(learning_rate=lr, weight_decay=0.01))


def train_step(state, batch, dropout_rng, axis_name=None):
  """The v4 run_flax_glue step: cross entropy on one-hot labels, dropout on."""
  dropout_rng, new_dropout_rng = jax.random.split(dropout_rng)
  targets = batch.pop("labels")

  def loss_fn(params):
    logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(targets, NUM_LABELS)).mean()

  loss, grad = jax.value_and_grad(loss_fn)(state.params)
  if axis_name is not None:
    grad = jax.lax.pmean(grad, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  return state.apply_gradients(grads=grad), {"loss": loss}, new_dropout_rng


def eval_loss(model, params, batch):
  batch = dict(batch)
  labels = batch.pop("labels")
  logits = model(**batch, params=params).logits
  return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())


def torch_logits(model_dir, batch):
  pt, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      model_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  inputs = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items() if k != "labels"}
  with torch.no_grad():
    return pt.eval()(**inputs).logits.numpy()


def test_jit_train_save_load_in_torch(tmp_path):
  config = TINY_CONFIGS["bert"](num_labels=NUM_LABELS)
  model = flaxhf.FlaxBertForSequenceClassification(config, seed=0)
  batch = make_batch()
  inputs = {k: v for k, v in batch.items() if k != "labels"}
  before = eval_loss(model, model.params, batch)
  initial_logits = np.asarray(model(**inputs).logits)
  state = make_state(model)
  # Donating the state also frees model.params (the same buffers): read them before, as above.
  step = jax.jit(train_step, donate_argnums=(0,))
  rng = jax.random.PRNGKey(0)
  losses = []
  for _ in range(30):
    state, metrics, rng = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, rng)
    losses.append(float(metrics["loss"]))
  after = eval_loss(model, state.params, batch)
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
  assert after < 0.5 * before, (before, after)
  assert int(state.step) == 30

  model.save_pretrained(tmp_path, params=state.params)
  want = np.asarray(model(**inputs, params=state.params).logits)
  np.testing.assert_allclose(torch_logits(tmp_path, batch), want, atol=1e-5, rtol=1e-5)
  assert np.abs(initial_logits - want).max() > 1e-2  # the trained weights were exported


def test_pmap_matches_jit_and_exports(tmp_path):
  # jax 0.10 still has jax.pmap. Without dropout, 8 replicas averaging gradients over equal
  # shards take the same steps as one jit over the whole batch.
  n_dev = jax.local_device_count()
  if n_dev < 2:
    pytest.skip("needs the simulated devices from conftest's XLA_FLAGS")
  config = TINY_CONFIGS["bert"](num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
  model = flaxhf.FlaxBertForSequenceClassification(config, seed=1)
  batch = make_batch(n=2 * n_dev, seed=1)

  p_step = jax.pmap(lambda s, b, r: train_step(s, b, r, axis_name="batch"), axis_name="batch",
                    donate_argnums=(0,))
  p_state = flax.jax_utils.replicate(make_state(model))
  p_rngs = jax.random.split(jax.random.PRNGKey(0), n_dev)
  sharded = {k: v.reshape(n_dev, -1, *v.shape[1:]) for k, v in batch.items()}  # v4's shard()
  j_step = jax.jit(train_step)
  j_state, j_rng = make_state(model), jax.random.PRNGKey(0)
  for _ in range(5):
    p_state, p_metrics, p_rngs = p_step(p_state, sharded, p_rngs)
    j_state, j_metrics, j_rng = j_step(j_state, dict(batch), j_rng)
    np.testing.assert_allclose(np.asarray(p_metrics["loss"]), float(j_metrics["loss"]), rtol=1e-4)

  params = jax.device_get(flax.jax_utils.unreplicate(p_state.params))
  for (path, p), j in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(j_state.params)):
    np.testing.assert_allclose(p, np.asarray(j), atol=1e-5, err_msg=jax.tree_util.keystr(path))
  assert eval_loss(model, params, batch) < eval_loss(model, model.params, batch)

  model.save_pretrained(tmp_path, params=params)
  want = model(**{k: v for k, v in batch.items() if k != "labels"}, params=params).logits
  np.testing.assert_allclose(torch_logits(tmp_path, batch), np.asarray(want), atol=1e-5, rtol=1e-5)
