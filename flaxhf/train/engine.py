"""The training engine: one jit-compiled optax loop over a `data x fsdp x tensor` device mesh.

The same code runs on one CPU, a GPU host or a multi-host pod: the state is a pytree of global
arrays placed by the model's logical-axis rules, each process feeds its share of every batch, and
checkpoints hold everything needed to resume exactly (params, optimizer, step, RNG; the data
position is a pure function of the step, or for a stream its saved position).
"""

import contextlib
import json
import logging
import math
import os
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxhf import sharding, xla_cpu
from flaxhf.checkpoint import Checkpointer, gather_json, read_meta
from flaxhf.data import batching
from flaxhf.models import io
from flaxhf.train import faults, memory, optim
from flaxhf.train.logger import RunLogger
from flaxhf.train.tasks import get_task

log = logging.getLogger("flaxhf")

BATCH_AXES = ("data", "fsdp")


def _dtype(name: str):
  table = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}
  if name not in table:
    raise ValueError(f"model.dtype {name!r} is not one of {sorted(table)}.")
  return table[name]


def module_inputs(model, batch):
  """The Linen module's inputs from a batch dict (token types only for models that have them)."""
  ids = batch["input_ids"]
  if "decoder_input_ids" in batch:  # encoder-decoders: the task built the decoder side on device
    return dict(input_ids=ids, attention_mask=batch["attention_mask"],
                decoder_input_ids=batch["decoder_input_ids"],
                decoder_attention_mask=batch["decoder_attention_mask"])
  tt = batch.get("token_type_ids") if model.uses_token_type_ids else None
  if model.uses_token_type_ids and tt is None:
    tt = jnp.zeros_like(ids)
  # A task may build its own positions and a [B, L, L] mask on device (causal LM, per document).
  return dict(input_ids=ids, attention_mask=batch["attention_mask"], token_type_ids=tt,
              position_ids=batch.get("position_ids"))


def load_model_config(model_cfg, model_dir: Optional[str]):
  """The transformers config: model.config_name (a folder, a config.json file or a model type) or
  the checkpoint's, then model.config_overrides ("n_embd=128,n_layer=4", as run_clm.py's)."""
  from transformers import AutoConfig
  name = model_cfg.get("config_name")
  if io.names_a_model_type(name):
    config = AutoConfig.for_model(name)  # transformers' defaults for the type: no download
  elif name:
    config = AutoConfig.from_pretrained(name if os.path.exists(name) else io.resolve_model_dir(name))
  elif model_dir:
    config = AutoConfig.from_pretrained(model_dir)
  else:
    raise ValueError("No model config: set model.name_or_path (a checkpoint) or model.config_name "
                     "(a folder, config.json or a model type such as 'gpt2') with "
                     "model.from_scratch=True.")
  overrides = model_cfg.get("config_overrides")
  if overrides:
    try:
      config.update_from_string(overrides)
    except ValueError as e:
      raise ValueError(f"model.config_overrides={overrides!r}: {e}. Give comma-separated key=value "
                       f"pairs of {type(config).__name__} keys, e.g. 'n_embd=128,n_layer=4'.") from e
  return config


def build_train_step(model, task, tx, schedule, grad_accum_steps, mesh, state_shardings,
                     skip_nonfinite: bool = False, lora=None):
  """The jitted step (state, batch) -> (state, metrics): sharded in and out, state donated.

  metrics["nonfinite"] flags a non-finite loss or gradient norm; `skip_nonfinite` then also keeps
  that step's params and optimizer state (train.nonfinite=skip). With a `flaxhf.lora.Lora`,
  state["params"] are the adapters (+ modules_to_save) and state["frozen"] the base, which gets
  no gradient.
  """
  module, k = model.module, grad_accum_steps
  batch_sharding = NamedSharding(mesh, P(BATCH_AXES))

  def loss_fn(params, batch, rng, frozen):
    mask_rng, dropout_rng = jax.random.split(rng)
    batch = task.device_transform(batch, mask_rng, train=True)
    with lora.intercept(deterministic=False) if lora else contextlib.nullcontext():
      out = module.apply({"params": lora.join(params, frozen) if lora else params},
                         **module_inputs(model, batch), deterministic=False,
                         rngs={"dropout": dropout_rng})
    return task.loss(out, batch)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    params, frozen = state["params"], state.get("frozen")
    if k == 1:
      (loss_sum, count), grads = grad_fn(params, batch, rng, frozen)
    else:
      # Microbatch j takes rows j, j+k, ... so every microbatch spans all batch shards.
      micro = jax.tree_util.tree_map(
          lambda x: jax.lax.with_sharding_constraint(
              x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
              NamedSharding(mesh, P(None, BATCH_AXES))), batch)

      def body(carry, xs):
        i, mb = xs
        (s, n), g = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen)
        return jax.tree_util.tree_map(jnp.add, carry, (g, s, n)), None

      zeros = (jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros(()), jnp.zeros(()))
      (grads, loss_sum, count), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
    # Sum-then-divide makes accumulation exactly equal to one big batch, token losses included.
    count = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree_util.tree_map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)  # inf or NaN if any gradient is
    nonfinite = ~(jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm))
    if skip_nonfinite:
      new_params, opt_state = faults.keep_if(~nonfinite, (new_params, opt_state),
                                             (params, state["opt_state"]))
    new_state = {"step": state["step"] + 1, "rng": state["rng"], "params": new_params,
                 "opt_state": opt_state, **({"frozen": frozen} if lora else {})}
    metrics = {"loss": loss_sum / count, "grad_norm": grad_norm,
               "learning_rate": schedule(state["step"]), "nonfinite": nonfinite}
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def make_state_shardings(model, tx, mesh, rules, lora=None, frozen_dtype=jnp.float32):
  """Shardings and abstract shapes of the train state {step, rng, params, opt_state}.

  With a `flaxhf.lora.Lora`, "params" are the adapters and modules_to_save only (so the optimizer
  holds state for nothing else) and "frozen" the rest of the base, in `frozen_dtype`.
  """
  param_shardings = sharding.param_shardings(model, mesh, rules)
  replicated = NamedSharding(mesh, P())
  abstract_params = jax.tree_util.tree_map(
      lambda shape, s: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=s),
      model.param_shapes(), param_shardings, is_leaf=lambda x: isinstance(x, tuple))
  frozen = None
  if lora is not None:
    frozen = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, frozen_dtype,
                                                                   sharding=a.sharding),
                                    lora.frozen(abstract_params))
    abstract_params, param_shardings = trainable_abstract(lora, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Optimizer moments follow their parameter's sharding; counters are replicated.
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
  shardings = {"step": replicated, "rng": replicated, "params": param_shardings,
               "opt_state": opt_shardings}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
              "params": abstract_params, "opt_state": abstract_opt}
  if frozen is not None:
    shardings["frozen"] = jax.tree_util.tree_map(lambda a: a.sharding, frozen)
    abstract["frozen"] = frozen
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return shardings, abstract


def trainable_abstract(lora, mesh, rules):
  """(abstract float32 arrays, NamedShardings) of a Lora's trainable tree, by the rule table."""
  table = sharding.get_rules(rules)
  flat_abstract, flat_shardings = {}, {}
  for path, (shape, axes) in lora.trainable_shapes().items():
    spec = sharding._fit_to_shape(nn.logical_to_mesh_axes(axes, table), shape, mesh,
                                  ".".join(path))
    flat_shardings[path] = NamedSharding(mesh, spec)
    flat_abstract[path] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=flat_shardings[path])
  return (traverse_util.unflatten_dict(flat_abstract), traverse_util.unflatten_dict(flat_shardings))


def init_state(tx, params, seed, state_shardings, frozen=None):
  """A fresh train state on its shardings: optimizer initialised where its params live.

  Params are put on their shardings first (a no-op when they already are): a step compiled for
  single-device inputs would otherwise compile a second time for its own sharded outputs.
  `frozen` is a LoRA run's base (cast to the dtype its abstract state has).
  """
  params = jax.device_put(params, state_shardings["params"])
  opt_state = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params)
  rng = jax.device_put(jax.random.key_data(jax.random.key(seed + 1)), state_shardings["rng"])
  step = jax.device_put(jnp.zeros((), jnp.int32), state_shardings["step"])
  state = {"step": step, "rng": rng, "params": params, "opt_state": opt_state}
  if frozen is not None:
    state["frozen"] = place_frozen(frozen, state_shardings["frozen"])
  return state


def place_frozen(frozen, shardings, dtype=None):
  """A LoRA base on its shardings, in `dtype` (bfloat16 halves the memory of frozen weights)."""
  put = jax.device_put(frozen, shardings)
  return put if dtype is None else jax.tree_util.tree_map(lambda x: x.astype(dtype), put)


def make_train_step(model, task, train_cfg, total_steps: int, mesh=None, rules="dp", lora=None):
  """(state, step) for a loop of your own, built as the Trainer builds them.

  `train_cfg` is a config's `train` block (optimizer, schedule, accumulation, seed); `mesh`
  defaults to the first local device. Call `state, metrics = step(state, batch)` with a batch of
  the task's arrays; the step compiles once per batch shape. With a `flaxhf.lora.Lora` the state
  trains fresh adapters on the frozen `model.params`.
  """
  mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
  tx, schedule = optim.make_optimizer(train_cfg, total_steps)
  shardings, _ = make_state_shardings(model, tx, mesh, rules, lora)
  params, frozen = model.params, None
  if lora is not None:
    params, frozen = lora.init(jax.random.key(train_cfg.seed), params), lora.frozen(params)
  state = init_state(tx, params, train_cfg.seed, shardings, frozen)
  step = build_train_step(model, task, tx, schedule, train_cfg.grad_accum_steps, mesh, shardings,
                          lora=lora)
  return state, step


class Trainer:
  """Builds the mesh, model, optimizer and data for `cfg`, then `fit()` trains, evaluates, exports."""

  def __init__(self, cfg, workdir: str, devices=None):
    self.cfg, self.workdir = cfg, os.path.abspath(workdir)
    self.is_main = jax.process_index() == 0
    os.makedirs(self.workdir, exist_ok=True)
    self.task = get_task(cfg)
    self.mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices)
    self._check_batch_sizes()
    self.buckets = batching.check_buckets(cfg.data.buckets)

    from transformers import AutoTokenizer
    model_dir = io.resolve_model_dir(cfg.model.name_or_path) if cfg.model.name_or_path else None
    if model_dir is None and not (cfg.model.from_scratch and cfg.model.tokenizer):
      raise ValueError("model.name_or_path is unset: name a checkpoint, or train from scratch with "
                       "model.from_scratch=True, model.config_name and model.tokenizer.")
    tok_dir = io.resolve_model_dir(cfg.model.tokenizer) if cfg.model.tokenizer else model_dir
    self.tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    self._check_streaming()
    self.data = self.task.prepare(self.tokenizer)
    # A stream (data.streaming) is read lazily: its length is unknown and its position is state.
    self.stream = self.data.train if isinstance(self.data.train, batching.ExampleStream) else None
    if self.data.train is None or (self.stream is None and len(self.data.train) == 0):
      raise ValueError("The training split is empty: check data.train_file / data.dataset.")
    model_config = load_model_config(cfg.model, model_dir)
    self.task.configure_model(model_config, self.data)

    self.steps_per_epoch = None if self.stream else batching.steps_per_epoch(
        len(self.data.train), cfg.train.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{len(self.data.train)} training examples do not fill one batch of "
                       f"{cfg.train.batch_size}; lower train.batch_size.")
    self.total_steps = int(cfg.train.steps) if cfg.train.steps else int(
        math.ceil(cfg.train.epochs * self.steps_per_epoch))
    self.tx, self.schedule = optim.make_optimizer(cfg.train, self.total_steps)

    metric, mode = self.task.main_metric
    self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                             best_metric=metric, best_mode=mode,
                             async_save=cfg.checkpoint.async_save)
    resume_step = self.ckpt.latest_step()
    dtype = _dtype(cfg.model.dtype)
    if (dtype != jnp.float32 and self.mesh.devices.flat[0].platform == "cpu"
        and not xla_cpu.f32_accumulating_dots()):
      log.warning("model.dtype=%s on CPU: this CPU (%s) has no bf16 matrix instructions, so "
                  "XLA's CPU matmuls gain nothing from 16-bit compute and the casts cost time "
                  "(benchmarks/train_step.py measured bf16 at ~0.9x the speed of float32); use "
                  "model.dtype=float32 on CPU.", cfg.model.dtype, xla_cpu.cpu_kind()[1])
    cls = self.task.auto_class.model_class_for(model_config)
    layers = dict(scan_layers=cfg.model.scan_layers, remat=cfg.train.remat)
    lora_cfg = cfg.model.get("lora")
    lora_on = bool(lora_cfg and (lora_cfg.r or lora_cfg.adapter))
    if lora_on and cfg.model.from_scratch:
      raise ValueError("model.lora trains adapters on a pretrained base: set model.lora.r=0 (and "
                       "model.lora.adapter unset) to train from scratch, or model.from_scratch=False.")
    # A LoRA run always loads the base: its checkpoints hold only what trains.
    if (resume_step is not None and not lora_on) or cfg.model.from_scratch:
      self.model = cls(model_config, dtype=dtype, _do_init=False, **layers)
      params = None
    else:
      self.model = cls.from_pretrained(model_dir, config=model_config, dtype=dtype, mesh=self.mesh,
                                       rules=cfg.mesh.rules, seed=cfg.train.seed, **layers)
      params = self.model.params
    self.lora, self._lora_params = self._make_lora(lora_cfg, params) if lora_on else (None, None)
    self._build_shardings()
    self.state, self.start_step = self._init_state(params, resume_step)
    self._train_step = self._compile_train_step()
    self._eval_step = self._compile_eval_step()
    if self.is_main:
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        f.write(cfg.to_json_best_effort(indent=2))
      self.tokenizer.save_pretrained(os.path.join(self.workdir, "tokenizer"))

  # ---- set-up ------------------------------------------------------------------------------------
  def _check_streaming(self):
    if not self.cfg.data.get("streaming"):
      return
    if not getattr(self.task, "supports_streaming", False):
      raise ValueError(f"data.streaming=True: task {self.cfg.task!r} loads its data into memory; "
                       "only causal_lm and masked_lm stream. Set data.streaming=False.")
    if not self.cfg.train.steps:
      raise ValueError("data.streaming=True reads the training data lazily, so an epoch's length "
                       "is unknown: set train.steps (train.epochs cannot be used).")

  def _check_batch_sizes(self):
    t, shards = self.cfg.train, self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    k = t.grad_accum_steps
    if k < 1 or t.batch_size % k:
      raise ValueError(f"train.batch_size={t.batch_size} must be a multiple of "
                       f"train.grad_accum_steps={k}.")
    for name, size in (("train.batch_size / grad_accum_steps", t.batch_size // k),
                       ("train.eval_batch_size", t.eval_batch_size)):
      if size % shards:
        raise ValueError(f"{name} = {size} must divide evenly over the {shards} batch shards "
                         f"(mesh data x fsdp); pick a multiple of {shards}.")
      if size % jax.process_count():
        raise ValueError(f"{name} = {size} must divide over {jax.process_count()} processes.")

  def _make_lora(self, c, params):
    """(flaxhf.lora.Lora, imported trainable params or None) for model.lora.*."""
    from flaxhf import lora
    if c.adapter:  # continue a peft adapter: its adapter_config.json sets r, alpha and the targets
      spec, trainable = lora.load_adapter(self.model, io.resolve_model_dir(c.adapter), params)
      log.warning("LoRA: continuing the adapter in %s (r=%d, lora_alpha=%g; its "
                  "adapter_config.json overrides model.lora.r/lora_alpha/target_modules).",
                  c.adapter, spec.config.r, spec.config.lora_alpha)
    else:
      spec, trainable = lora.Lora(self.model, lora.LoraConfig.from_config(c)), None
    log.info("LoRA r=%d on %d modules (%s), training in full: %s.", spec.config.r,
             len(spec.targets), spec.target_modules, list(spec.modules_to_save) or "nothing else")
    return spec, trainable

  def _build_shardings(self):
    self.param_shardings = sharding.param_shardings(self.model, self.mesh, self.cfg.mesh.rules)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    self.frozen_dtype = _dtype(self.cfg.model.lora.base_dtype) if self.lora else None
    self.state_shardings, self.abstract_state = make_state_shardings(
        self.model, self.tx, self.mesh, self.cfg.mesh.rules, self.lora, self.frozen_dtype)
    # Checkpoints hold what trains; a LoRA run's frozen base is reloaded from model.name_or_path.
    self.ckpt_abstract = {k: v for k, v in self.abstract_state.items() if k != "frozen"}

  def _ckpt_state(self):
    return {k: v for k, v in self.state.items() if k != "frozen"}

  def _init_state(self, params, resume_step):
    frozen = None
    if self.lora is not None:
      frozen = place_frozen(self.lora.frozen(params), self.state_shardings["frozen"],
                            self.frozen_dtype)
    if resume_step is not None:
      # The newest checkpoint that restores: a corrupt one is set aside with a warning.
      state, meta, resume_step = self.ckpt.restore_latest(self.ckpt_abstract)
      if frozen is not None:
        state["frozen"] = frozen
        self.model._params = None
      self._resume_data_state(meta, resume_step)
      log.warning("Resuming from step %d (checkpoint in %s).", resume_step, self.ckpt.directory)
      return state, int(meta.get("step", resume_step))
    if params is None:  # from scratch: initialise straight into the shards
      params = self.model.init_weights(jax.random.key(self.cfg.train.seed),
                                       shardings=self.param_shardings)
    if self.lora is not None:
      params = self._lora_params or self.lora.init(jax.random.key(self.cfg.train.seed), params)
      self._lora_params = None
    self.model._params = None  # the state owns the params from here on
    return init_state(self.tx, params, self.cfg.train.seed, self.state_shardings, frozen), 0

  def _resume_data_state(self, meta, step):
    """A stream continues where the checkpoint's metadata says this process's share stood."""
    self.stream_state = None
    if self.stream is None:
      return
    states = meta.get("data_state")
    if states is None:
      raise ValueError(f"The checkpoint of step {step} in {self.ckpt.directory} holds no stream "
                       "position (written without data.streaming): use a new workdir.")
    if len(states) != jax.process_count():
      raise ValueError(f"The checkpoint of step {step} holds the stream positions of "
                       f"{len(states)} processes, not {jax.process_count()}: each process reads "
                       "its own share, so resume a streaming run with the same process count.")
    self.stream_state = states[jax.process_index()]

  def _compile_train_step(self):
    step = build_train_step(self.model, self.task, self.tx, self.schedule,
                            self.cfg.train.grad_accum_steps, self.mesh, self.state_shardings,
                            skip_nonfinite=self.cfg.train.nonfinite == "skip", lora=self.lora)
    first = [True]

    def train_step(state, batch):
      if first:  # the first call compiles anyway (the call below reuses it): log its memory
        first.clear()
        log.info("%s; mesh %s, mesh.rules=%s.", memory.describe(memory.step_memory(
            step, state, batch)), dict(self.mesh.shape), self.cfg.mesh.rules)
      return step(state, batch)

    return train_step

  def _compile_eval_step(self):
    module, task = self.model.module, self.task

    def eval_fn(params, batch):
      # A fixed key: eval-time corruption (MLM masking) is the same at every evaluation.
      batch = task.device_transform(batch, jax.random.key(0), train=False)
      out = module.apply({"params": params}, **module_inputs(self.model, batch), deterministic=True)
      return task.predict(out, batch), batch["example_index"], batch["example_mask"]

    return jax.jit(eval_fn, in_shardings=(self.param_shardings, self.batch_sharding),
                   out_shardings=self.replicated)

  def _device_batch(self, local_batch):
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  def _pad_values(self):
    return {"input_ids": self.tokenizer.pad_token_id or 0, "labels": -100,
            **getattr(self.data, "pad_values", {})}

  # ---- loops -------------------------------------------------------------------------------------
  def inference_params(self, trainable=None):
    """The model's params for eval, generation and export: a LoRA run's adapters merged in."""
    trainable = self.state["params"] if trainable is None else trainable
    if self.lora is None:
      return trainable
    return self.lora.merge(self.lora.join(trainable, self.state["frozen"]))

  def evaluate(self, params=None) -> dict:
    """Predicts every eval example exactly once and computes the task's metrics."""
    if self.data.eval is None:
      return {}
    params = self.inference_params() if params is None else params
    preds = [None] * len(self.data.eval)
    for batch in batching.eval_batches(
        self.data.eval, global_batch_size=self.cfg.train.eval_batch_size,
        buckets=self.buckets, max_length=self.cfg.data.max_length,
        pad_values=self._pad_values(), process_index=jax.process_index(),
        process_count=jax.process_count()):
      batch = {k: v for k, v in batch.items() if k in self._eval_keys(batch)}
      p, idx, mask = jax.device_get(self._eval_step(params, self._device_batch(batch)))
      for row in np.flatnonzero(mask):  # per-example pytrees: lengths differ between buckets
        preds[idx[row]] = jax.tree_util.tree_map(lambda a, r=row: a[r], p)
    self.task.generate_eval(self.model, params, self.data, self.mesh)  # e.g. translations to score
    metrics = self.task.metrics(preds, self.data)
    if self.is_main:
      self.task.save_outputs(self.workdir)
    return metrics

  def _eval_keys(self, batch):
    return set(self.task.model_inputs) | set(self.task.label_fields) | {"example_index",
                                                                        "example_mask"}

  def fit(self) -> dict:
    """Trains to `total_steps` from wherever the workdir left off; returns the final eval metrics."""
    cfg, total = self.cfg, self.total_steps
    logger = RunLogger(self.workdir, total, self.start_step, cfg.train.progress_bar)
    preemption = faults.Preemption()
    try:
      last_metrics = self._train_loop(logger, preemption)
    finally:
      preemption.close()
    if self.start_step >= total:
      log.warning("The workdir already holds the final step %d: evaluating and exporting again.", total)
      last_metrics = self.evaluate()
    self.ckpt.wait_until_finished()
    logger.close()
    return self._finish(last_metrics)

  def _train_loop(self, logger, preemption) -> dict:
    """Steps start_step + 1 .. total_steps; the last eval metrics. Raises faults.Preempted."""
    cfg, total = self.cfg, self.total_steps
    guard = faults.NonFiniteGuard(cfg.train.nonfinite, cfg.train.max_nonfinite_in_a_row,
                                  self.ckpt.latest_step)
    keys = set(self.task.model_inputs) | set(self.task.label_fields)
    common = dict(global_batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                  max_length=cfg.data.max_length, pad_values=self._pad_values(),
                  process_index=jax.process_index(), process_count=jax.process_count())
    if self.stream is not None:
      batches = self.stream.batches(state=getattr(self, "stream_state", None), **common)
    else:
      batches = batching.train_batches(self.data.train, start_step=self.start_step,
                                       buckets=self.buckets,
                                       group_by_length=cfg.data.group_by_length, **common)
    window, last_metrics = [], {}
    if self.start_step == 0 and cfg.train.get("eval_on_start"):  # the untrained model's numbers
      self._evaluate_and_log(logger, 0, self.inference_params())
    logger.reset_clock(self.start_step)
    for step in range(self.start_step + 1, total + 1):
      local = {k: v for k, v in next(batches).items() if k in keys}
      if step == self.start_step + 1:
        # Logged by every process, so a multi-host log shows each one feeds only its own rows.
        log.info("Process %d of %d feeds %d of the %d rows of each global batch.",
                 jax.process_index(), jax.process_count(), len(local["attention_mask"]),
                 cfg.train.batch_size)
      logger.count_tokens(int(local["attention_mask"].sum()) * jax.process_count())
      self.state, metrics = self._train_step(self.state, self._device_batch(local))
      window.append(metrics)
      guard.add(step, metrics["nonfinite"])
      logger.step_done(step, metrics)  # the bar advances when these are ready, not at dispatch
      stop = preemption.reached(step)  # the same step on every process
      log_due = step % cfg.train.log_every == 0 or step == total or stop
      eval_due = step == total or (cfg.train.eval_every and step % cfg.train.eval_every == 0)
      if log_due or eval_due or step % cfg.checkpoint.every_steps == 0:
        guard.check()  # raises before anything after a bad step is logged or saved
      if log_due:
        host = jax.device_get(window)
        finite = [m["loss"] for m in host if not m["nonfinite"]]  # skipped steps are counted
        logger.train(step, {"loss": float(np.mean(finite)) if finite else float("nan"),
                            "grad_norm": float(host[-1]["grad_norm"]),
                            "learning_rate": float(host[-1]["learning_rate"]),
                            **({"epoch": step / self.steps_per_epoch}
                               if self.steps_per_epoch else {}),
                            **({"nonfinite_steps": len(host) - len(finite)}
                               if len(finite) < len(host) else {})})
        window = []
      if stop:
        if step not in self.ckpt.all_steps():
          self.ckpt.save(step, self._ckpt_state(), meta=self._meta(step), force=True)
        self.ckpt.wait_until_finished()  # synchronous: the machine may go any second now
        raise faults.Preempted(step, str(self.ckpt.directory))
      eval_metrics = self._evaluate_and_log(logger, step, self.inference_params()) if eval_due else None
      if eval_metrics:
        last_metrics = eval_metrics
      if step == total or step % cfg.checkpoint.every_steps == 0 or eval_metrics:
        self.ckpt.save(step, self._ckpt_state(), meta=self._meta(step), metrics=eval_metrics or None,
                       force=True)
      if eval_due or step % cfg.checkpoint.every_steps == 0:
        logger.reset_clock(step)
    return last_metrics

  def _evaluate_and_log(self, logger, step, params) -> dict:
    """Eval metrics and sample generations of `params`, written to the run's logs at `step`."""
    metrics = self.evaluate(params)
    if metrics:
      logger.write("eval", step, metrics)
      # Every process generates (the params are sharded); only process 0's logger writes.
      samples = self.task.samples(self.model, params, self.data)
      if samples:
        logger.write("samples", step, {"samples": samples})
    return metrics

  def _meta(self, step):
    return {"step": int(step), "config": json.loads(self.cfg.to_json_best_effort()),
            "model_class": type(self.model).__name__, "model_config": self.model.config.to_dict(),
            "total_steps": self.total_steps,
            # How to rebuild a LoRA run's adapters (export_checkpoint reloads the base for them).
            **({"lora": self.lora.peft_config(self.cfg.model.name_or_path)} if self.lora else {}),
            # Every process's stream position (each reads its own share), in process order.
            **({"data_state": gather_json(self.stream.state_dict())} if self.stream else {})}

  def _finish(self, final_metrics) -> dict:
    """Exports the best (or last) step to PyTorch format and writes eval_results.json."""
    params, exported = self.state["params"], self.total_steps
    best = self.ckpt.best_step() if self.cfg.checkpoint.export_best else None
    if best is not None and best != self.total_steps:
      params = self.ckpt.restore(best, self.ckpt_abstract)[0]["params"]
      exported = best
    export_dir = os.path.join(self.workdir, "export")
    if self.lora is not None:  # the peft adapter folder next to the merged model
      self.lora.save(os.path.join(self.workdir, "adapter"), params,
                     base_model_name_or_path=self.cfg.model.name_or_path)
    # All processes gather, process 0 writes.
    self.model.save_pretrained(export_dir, params=self.inference_params(params))
    results = {**final_metrics, "step": self.total_steps, "exported_step": exported}
    if self.is_main:
      self.tokenizer.save_pretrained(export_dir)
      with open(os.path.join(self.workdir, "eval_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


def run(cfg, workdir: str, devices=None) -> dict:
  """Trains `cfg` in `workdir` (resuming if it holds checkpoints); returns the final metrics."""
  trainer = Trainer(cfg, workdir, devices)
  try:
    return trainer.fit()
  finally:
    trainer.ckpt.close()


def export_checkpoint(step_dir: str, out_dir: str, tokenizer_dir: Optional[str] = None) -> str:
  """Exports one Orbax checkpoint folder (`WORKDIR/checkpoints/STEP`) as a PyTorch model folder
  (a LoRA run's: the merged model, and its peft adapter in `out_dir/adapter`)."""
  from transformers import AutoConfig

  import flaxhf
  from flaxhf.checkpoint import restore_arrays
  meta = read_meta(step_dir)
  config_dict = dict(meta["model_config"])
  config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
  cls = getattr(flaxhf, meta["model_class"])
  # A scanned run's checkpoint holds stacked layers: the same model unstacks them into PyTorch keys.
  scan = meta["config"]["model"].get("scan_layers", False)
  params = restore_arrays(step_dir)["params"]
  if "lora" in meta:  # adapters only: reload the frozen base they were trained on
    from flaxhf import lora
    base = meta["lora"]["base_model_name_or_path"]
    model = cls.from_pretrained(io.resolve_model_dir(base), config=config, scan_layers=scan,
                                seed=meta["config"]["train"]["seed"])
    spec = lora.Lora(model, lora.LoraConfig.from_peft(meta["lora"]), strict_modules_to_save=False)
    spec.save(os.path.join(out_dir, "adapter"), params, base_model_name_or_path=base)
    params = spec.merge(spec.join(params, model.params))
  else:
    model = cls(config, _do_init=False, scan_layers=scan)
  model.save_pretrained(out_dir, params=params)
  tokenizer_dir = tokenizer_dir or os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(step_dir))), "tokenizer")
  if os.path.isdir(tokenizer_dir):
    for name in os.listdir(tokenizer_dir):
      shutil.copy(os.path.join(tokenizer_dir, name), out_dir)
  return out_dir
