"""The optimizer: AdamW with linear warmup and decay, no decay on biases and LayerNorm, clipping."""

import jax
import optax


def decay_mask(params):
  """True for weights that take weight decay: not biases, not LayerNorm/layer_norm scales."""
  def decays(keypath, _):
    parts = [str(getattr(k, "key", k)) for k in keypath]
    module = ".".join(parts[:-1]).rsplit(".", 1)[-1].lower()  # e.g. "layernorm", "sa_layer_norm"
    return not (parts[-1] == "bias" or "norm" in module)
  return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(learning_rate: float, total_steps: int, warmup_steps: int):
  """Linear warmup from 0 to `learning_rate`, then linear decay to 0 at `total_steps`."""
  warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
  decay = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [warmup_steps])


def make_optimizer(train_cfg, total_steps: int):
  """optax AdamW as transformers' Trainer configures it; returns (tx, schedule)."""
  warmup = int(round(train_cfg.warmup_ratio * total_steps)) if train_cfg.warmup_steps is None \
      else int(train_cfg.warmup_steps)
  schedule = learning_rate_schedule(train_cfg.learning_rate, total_steps, warmup)
  parts = []
  if train_cfg.max_grad_norm and train_cfg.max_grad_norm > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.max_grad_norm))
  parts.append(optax.adamw(schedule, b1=train_cfg.adam_b1, b2=train_cfg.adam_b2,
                           eps=train_cfg.adam_eps, weight_decay=train_cfg.weight_decay,
                           mask=decay_mask))
  return optax.chain(*parts), schedule
