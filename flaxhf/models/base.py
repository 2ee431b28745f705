"""`FlaxPreTrainedModel`: the transformers-v4 Flax model API over a Linen module.

Parameter trees flatten (joined with ".") to exactly the PyTorch state-dict keys, so loading and
export are a strict key match: missing, unexpected or mismatched keys raise with their names.
"""

import copy
import dataclasses
import difflib
import functools
import logging
import os
import re
from typing import Any, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxhf.models import io, losses
from flaxhf.models.layers import REMAT_POLICIES, LayerStack

log = logging.getLogger("flaxhf")

# Checkpoint keys every family drops on load: buffers, and poolers a head without one does not use.
_ALWAYS_IGNORED = (r"(^|\.)position_ids$", r"(^|\.)token_type_ids$")
# Families whose layers are not built by layers.layer_stack, and why (the message for scan/remat).
_SEQ2SEQ_WHY = ("its layer stacks are not built with layer_stack yet: the seq2seq families generate "
                "through a per-layer KV cache, whose beam reordering a stacked cache would break")
_NO_LAYER_STACK = {
    "albert": "ALBERT already reuses one set of layer weights at every depth (num_hidden_groups), so "
              "there is no per-layer weight stack to scan",
    "t5": "T5's first layer alone holds the relative attention bias, so its layers differ; and "
          + _SEQ2SEQ_WHY,
    **{t: _SEQ2SEQ_WHY for t in ("mt5", "bart", "mbart", "marian")},
}
_V4_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "from_pt", "use_auth_token",
              "force_download", "resume_download", "proxies", "subfolder", "from_flax")


def flatten(params) -> Dict[str, Any]:
  return traverse_util.flatten_dict(params, sep=".")


def unflatten(flat: Dict[str, Any], like) -> dict:
  """Rebuilds the module's nested tree from dotted keys, using `like` for where the dots nest."""
  paths = {".".join(p): p for p in traverse_util.flatten_dict(like)}
  return traverse_util.unflatten_dict({paths[k]: v for k, v in flat.items()})


_HALF_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _param_dtype(dtype):
  """float32 (None), or a floating dtype given as a numpy/jax dtype or its name."""
  if dtype is None:
    return np.float32
  try:
    dtype = np.dtype(getattr(jnp, dtype) if isinstance(dtype, str) else dtype)
  except (AttributeError, TypeError) as e:
    raise ValueError(f"param_dtype={dtype!r} is not a dtype: use float32, bfloat16 or float16.") from e
  if dtype not in (np.dtype(np.float32), *_HALF_DTYPES):
    raise ValueError(f"param_dtype={dtype} is not a weight dtype: use float32, bfloat16 or float16.")
  return dtype


def _fmt(keys, limit=20):
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


class FlaxPreTrainedModel:
  """A Flax model with `config`, `module`, `params`, v4 `__call__`, `from_pretrained`, `save_pretrained`."""

  config_class = None
  module_class = None        # Linen module, constructed as module_class(config=..., dtype=...)
  base_model_prefix = ""     # attribute name of the base model inside head models ("bert", ...)
  task = None                # head kind, for `labels=` losses and the auto classes
  torch_architecture = ""    # the transformers PyTorch class that export targets
  uses_token_type_ids = True
  ignore_on_load = ()        # regexes of checkpoint keys dropped on load (tied copies, unused parts)
  new_ok_in_base = (r"(^|\.)pooler\.",)  # base-model keys that may be freshly initialised

  def __init__(self, config, input_shape=None, seed: int = 0, dtype=jnp.float32,
               _do_init: bool = True, scan_layers: bool = False, remat: str = "none",
               gradient_checkpointing: bool = False, **kwargs):
    if kwargs:
      raise TypeError(f"{type(self).__name__}() got unexpected arguments {sorted(kwargs)}.")
    if self.config_class is not None and not isinstance(config, self.config_class):
      raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                      f"{type(config).__name__}. Use flaxhf.FlaxAutoModel... to pick the class by config.")
    self.config = config
    self.dtype = jnp.dtype(dtype)
    if gradient_checkpointing and remat == "none":
      remat = "nothing_saveable"  # v4's gradient_checkpointing: recompute every layer in backward
    self._build_module(LayerStack(scan=bool(scan_layers), remat=remat))
    self.input_shape = input_shape or ((1, 1, 1) if self.task == "multiple_choice" else (1, 1))
    self._params = self.init_weights(jax.random.key(seed)) if _do_init else None

  # ---- construction and params -------------------------------------------------------------------
  def _build_module(self, stack: LayerStack):
    """The Linen module, with `stack` (scan/remat) for families that build theirs with layer_stack."""
    fields = {f.name for f in dataclasses.fields(self.module_class)}
    if "stack" not in fields and stack != LayerStack():
      why = _NO_LAYER_STACK.get(self.config.model_type, "its layers are not built by "
                                "flaxhf.models.layers.layer_stack yet")
      supported = sorted({t for by_type in REGISTRY.values() for t, c in by_type.items()
                          if "stack" in {f.name for f in dataclasses.fields(c.module_class)}})
      raise ValueError(f"{type(self).__name__} (model_type {self.config.model_type!r}) does not "
                       f"support scan_layers=True or remat: {why}. Drop scan_layers/remat (or "
                       f"train.remat=none, model.scan_layers=False) for this family; supported: "
                       f"{supported}.")
    self.stack = stack
    extra = {"stack": stack} if "stack" in fields else {}
    self.module = self.module_class(config=self.config, dtype=self.dtype, **extra)
    self.__dict__.pop("_boxed_shapes", None)
    self.__dict__.pop("_stacked", None)

  @property
  def scan_layers(self) -> bool:
    return self.stack.scan

  @property
  def remat(self) -> str:
    return self.stack.remat

  def enable_gradient_checkpointing(self, policy: str = "nothing_saveable"):
    """transformers v4's switch: rematerialise each layer in the backward pass (same params)."""
    if policy == "none":
      raise ValueError(f"enable_gradient_checkpointing needs a policy other than 'none'; choose one "
                       f"of {list(REMAT_POLICIES[1:])}.")
    self._build_module(dataclasses.replace(self.stack, remat=policy))

  def dummy_inputs(self):
    ids = jnp.zeros(self.input_shape, jnp.int32)
    token_type_ids = jnp.zeros_like(ids) if self.uses_token_type_ids else None  # as __call__ passes
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=token_type_ids,
                position_ids=None)

  @functools.cached_property
  def _boxed_shapes(self):
    """The abstract (boxed, logically annotated) parameter tree, computed without allocating."""
    return jax.eval_shape(lambda r: self.module.init(r, **self.dummy_inputs())["params"],
                          jax.random.key(0))

  def logical_axes(self):
    """Logical axis names of every parameter (a pytree of PartitionSpec)."""
    return nn.get_partition_spec(self._boxed_shapes)

  def param_shapes(self):
    """Shapes of the params as the module holds them (scanned layers stacked on a leading axis)."""
    return jax.tree_util.tree_map(lambda x: tuple(x.shape), nn.meta.unbox(self._boxed_shapes))

  # ---- scanned layers <-> PyTorch keys -------------------------------------------------------------
  @functools.cached_property
  def _stacked(self) -> Dict[str, tuple]:
    """Stacked param key -> (prefix, rest): `prefix.rest` [n, ...] is the PyTorch keys `prefix.{i}.rest`.

    The prefix is the outermost module whose every weight has the leading "layers" axis (the scanned
    layer, e.g. `bert.encoder.layer`); unscanned models have none.
    """
    specs = traverse_util.flatten_dict(self.logical_axes())
    stacked = {p for p, spec in specs.items() if len(spec) and spec[0] == "layers"}
    out = {}
    for p in stacked:
      for j in range(1, len(p)):
        if all(q in stacked for q in specs if q[:j] == p[:j]):
          out[".".join(p)] = (".".join(p[:j]), ".".join(p[j:]))
          break
    return out

  def _unstack(self, flat: Dict[str, Any]) -> Dict[str, Any]:
    """Module-layout flat params (or shapes) -> PyTorch keys, each stacked layer split into its own."""
    out = {}
    for k, v in flat.items():
      if k not in self._stacked:
        out[k] = v
        continue
      prefix, rest = self._stacked[k]
      n = v[0] if isinstance(v, tuple) else v.shape[0]
      for i in range(n):
        out[f"{prefix}.{i}.{rest}"] = v[1:] if isinstance(v, tuple) else v[i]
    return out

  def _external_shapes(self) -> Dict[str, tuple]:
    """The PyTorch state-dict keys and shapes this model loads and exports."""
    return self._unstack(flatten(self.param_shapes()))

  def init_weights(self, rng, shardings=None):
    """Random parameters with transformers' initialisation; placed on `shardings` when given."""
    init = jax.jit(lambda r: nn.meta.unbox(self.module.init(r, **self.dummy_inputs())["params"]),
                   out_shardings=shardings)
    return init(rng)

  @property
  def params(self):
    if self._params is None:
      raise ValueError("This model has no params (loaded with _do_init=False): pass params= explicitly.")
    return self._params

  @params.setter
  def params(self, params):
    want, got = set(flatten(self.param_shapes())), set(flatten(params))
    if want != got:
      hint = (" This model has scan_layers=True: its params hold each layer stack as one stacked "
              "array; load per-layer weights with from_pretrained." if self._stacked else "")
      raise ValueError(f"params do not fit {type(self).__name__}: missing {_fmt(want - got)}; "
                       f"unexpected {_fmt(got - want)}.{hint}")
    self._params = params

  def num_parameters(self, params=None) -> int:
    shapes = flatten(self.param_shapes()) if params is None else {
        k: v.shape for k, v in flatten(params).items()}
    return int(sum(np.prod(s) for s in shapes.values()))

  # ---- calling -----------------------------------------------------------------------------------
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
               head_mask=None, params=None, dropout_rng=None, train: bool = False,
               output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
               return_dict: Optional[bool] = None, labels=None, start_positions=None,
               end_positions=None):
    if head_mask is not None:
      raise NotImplementedError("head_mask is not supported by flaxhf models.")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if self.task == "multiple_choice" and input_ids.ndim != 3:
      raise ValueError(f"Multiple choice takes input_ids of shape [batch, choices, length]; got "
                       f"{input_ids.shape}.")
    if self.task != "multiple_choice" and input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}.")
    attention_mask = (jnp.ones_like(input_ids) if attention_mask is None
                      else jnp.asarray(attention_mask, jnp.int32))
    if self.uses_token_type_ids:
      token_type_ids = (jnp.zeros_like(input_ids) if token_type_ids is None
                        else jnp.asarray(token_type_ids, jnp.int32))
    elif token_type_ids is not None:
      raise ValueError(f"{type(self).__name__} has no token type embeddings; do not pass "
                       "token_type_ids (its tokenizer does not produce them).")
    for name, arr in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids),
                      ("position_ids", position_ids)):
      if arr is not None and tuple(arr.shape) != tuple(input_ids.shape):
        raise ValueError(f"{name} has shape {tuple(arr.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}; they must match.")
    if train and dropout_rng is None:
      raise ValueError("train=True applies dropout and needs dropout_rng=jax.random.key(...).")
    rngs = {"dropout": dropout_rng} if train else {}
    outputs = self.module.apply(
        {"params": self.params if params is None else params}, input_ids=input_ids,
        attention_mask=attention_mask, token_type_ids=token_type_ids,
        position_ids=None if position_ids is None else jnp.asarray(position_ids, jnp.int32),
        deterministic=not train, output_attentions=bool(output_attentions),
        output_hidden_states=bool(output_hidden_states), rngs=rngs)
    return self.finish_outputs(outputs, labels, start_positions, end_positions, return_dict)

  def finish_outputs(self, outputs, labels=None, start_positions=None, end_positions=None,
                     return_dict=None):
    """Every head's call ends here: the loss when labels (QA: start/end positions) are given; a
    tuple for return_dict=False."""
    if self.task == "question_answering" and start_positions is not None:
      labels = (jnp.asarray(start_positions), jnp.asarray(end_positions))
    if labels is not None:
      labels = labels if isinstance(labels, tuple) else jnp.asarray(labels)
      outputs = outputs.replace(loss=losses.compute_loss(self.task, outputs, labels, self.config))
    return outputs.to_tuple() if return_dict is False else outputs

  # ---- loading -----------------------------------------------------------------------------------
  @classmethod
  def _check_config_kwargs(cls, config, kwargs):
    unknown = [k for k in kwargs if not hasattr(config, k)]
    if unknown:
      known = [k for k in dir(config) if not k.startswith("_")]
      hints = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
      hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in hints.items())
      raise TypeError(f"Unknown config argument(s) for {type(config).__name__}: {hint}. Config "
                      f"arguments must name fields of the config.")
    for k, v in kwargs.items():
      setattr(config, k, v)

  @classmethod
  def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None,
                      dtype=jnp.float32, seed: int = 0, _do_init: bool = True,
                      ignore_mismatched_sizes: bool = False, trust_remote_code: bool = False,
                      mesh=None, rules: str = "fsdp", input_shape=None, scan_layers: bool = False,
                      remat: str = "none", gradient_checkpointing: bool = False,
                      adapter: Optional[str] = None, param_dtype=None, **kwargs):
    """Loads a Hugging Face checkpoint (folder or hub id) into this head, creating new head weights.

    With `mesh`, each tensor is placed straight onto its shards under the rule table `rules`.
    `scan_layers` stacks the layers into one scanned layer on load; `remat` (a
    jax.checkpoint_policies name) or `gradient_checkpointing` rematerialises each layer.
    `adapter` (a peft LoRA adapter folder) is merged in, as peft's merge_and_unload() does.
    `param_dtype` stores the weights in that dtype (e.g. jnp.bfloat16 keeps a bf16 checkpoint's
    tensors as they are, half the memory of the float32 default); `dtype` is the compute dtype.
    Returns the model, or `(model, params)` with `_do_init=False` as in transformers v4.
    """
    if model_args:
      raise TypeError("from_pretrained takes the path and keyword arguments only.")
    if trust_remote_code:
      raise ValueError("trust_remote_code=True is not supported: flaxhf runs only its own model code. "
                       "Drop the argument; flaxhf.FlaxAutoModel... lists the model types it implements.")
    hub_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _V4_KWARGS}
    if hub_kwargs.pop("subfolder", None):
      raise NotImplementedError("subfolder= is not supported; pass the sub-folder's path instead.")
    for dropped in ("from_pt", "from_flax", "force_download", "resume_download", "proxies"):
      hub_kwargs.pop(dropped, None)  # accepted for v4 compatibility; every format is read natively
    if "use_auth_token" in hub_kwargs:
      hub_kwargs["token"] = hub_kwargs.pop("use_auth_token")
    model_dir = io.resolve_model_dir(pretrained_model_name_or_path, **hub_kwargs)
    if config is None:
      config = io.load_config(model_dir)
    else:
      config = copy.deepcopy(config)
    want_type = getattr(cls.config_class, "model_type", None)
    if want_type and config.model_type != want_type:
      raise ValueError(f"{model_dir} holds a {config.model_type!r} model, not {want_type!r}. Load it "
                       f"with the matching class, or with flaxhf.FlaxAutoModel... which picks it.")
    cls._check_config_kwargs(config, kwargs)
    model = cls(config, input_shape=input_shape, seed=seed, dtype=dtype, _do_init=False,
                scan_layers=scan_layers, remat=remat, gradient_checkpointing=gradient_checkpointing)
    state = io.load_state_dict(model_dir)
    params = model._params_from_state_dict(state, seed=seed, mesh=mesh, rules=rules,
                                           ignore_mismatched_sizes=ignore_mismatched_sizes,
                                           source=model_dir, param_dtype=param_dtype)
    if adapter is not None:
      from flaxhf import lora
      params = lora.merge_adapter(model, io.resolve_model_dir(adapter, **hub_kwargs), params)
    if hasattr(model, "load_generation_config"):
      model.load_generation_config(model_dir)
    if not _do_init:
      return model, params
    model._params = params
    return model

  def _params_from_state_dict(self, state, *, seed=0, mesh=None, rules="fsdp",
                              ignore_mismatched_sizes=False, source="checkpoint", param_dtype=None):
    """Strictly matches a PyTorch-named state dict to this model's params; inits only the new head.
    The params are float32, or `param_dtype` (cast on the host, before any device sees them)."""
    param_dtype = np.dtype(_param_dtype(param_dtype))
    expected = self._external_shapes()  # PyTorch keys, whether or not the layers are scanned
    prefix = self.base_model_prefix + "."
    is_head = any(k.startswith(prefix) for k in expected)
    has_prefix = any(k.startswith(prefix) for k in state)
    if is_head and not has_prefix:
      state = {prefix + k: v for k, v in state.items()}
    elif not is_head and has_prefix:
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    def in_base(k):
      return not is_head or k.startswith(prefix)

    ignore = [re.compile(p) for p in _ALWAYS_IGNORED + tuple(self.ignore_on_load)]
    unexpected = {k for k in state if k not in expected and not any(p.search(k) for p in ignore)}
    unexpected_base = {k for k in unexpected if in_base(k) and not re.search(r"(^|\.)pooler\.", k)}
    missing = {k for k in expected if k not in state}
    new_ok = [re.compile(p) for p in self.new_ok_in_base]
    missing_base = {k for k in missing if in_base(k) and not any(p.search(k) for p in new_ok)}
    mismatched = {k: (tuple(state[k].shape), expected[k]) for k in expected
                  if k in state and tuple(state[k].shape) != expected[k]}
    problems = []
    if missing_base:
      problems.append(f"missing weights: {_fmt(missing_base)}")
    if unexpected_base:
      problems.append(f"unexpected weights: {_fmt(unexpected_base)}")
    if mismatched and not ignore_mismatched_sizes:
      # Re-initialising is the fix for a resized head only; a mismatched encoder means a wrong config.
      fix = ("the config does not describe these weights: make its sizes (hidden_size, vocab_size, "
             "...) match the checkpoint's" if any(in_base(k) for k in mismatched) else
             "pass ignore_mismatched_sizes=True to re-initialise them, e.g. for a new num_labels")
      problems.append("shape mismatches (checkpoint vs model): " + _fmt(
          [f"{k} {a} vs {b}" for k, (a, b) in mismatched.items()]) + f" ({fix})")
    if problems:
      raise ValueError(f"Cannot load {source} into {type(self).__name__}: " + "; ".join(problems) + ".")
    fresh = missing | set(mismatched)
    if fresh:
      log.warning("%s: newly initialised (train them before use): %s", type(self).__name__, _fmt(fresh))
    dropped = unexpected - unexpected_base
    if dropped:
      log.info("%s: checkpoint weights not used by this head: %s", type(self).__name__, _fmt(dropped))

    shardings = None
    if mesh is not None:
      from flaxhf import sharding
      shardings = flatten(sharding.param_shardings(self, mesh, rules))
    init_params = self._unstack(flatten(self.init_weights(jax.random.key(seed)))) if fresh else {}

    def on_host(k):
      return np.asarray(init_params[k] if k in fresh else state[k], dtype=param_dtype)

    flat = {}
    for k, shape in flatten(self.param_shapes()).items():
      if k in self._stacked:  # scanned: stack the per-layer tensors on the leading "layers" axis
        prefix_k, rest = self._stacked[k]
        value = np.stack([on_host(f"{prefix_k}.{i}.{rest}") for i in range(shape[0])])
      else:
        value = on_host(k)
      if shardings is None:
        flat[k] = jnp.asarray(value)
      else:
        host = np.asarray(value)
        flat[k] = jax.make_array_from_callback(host.shape, shardings[k], lambda idx, h=host: h[idx])
    return unflatten(flat, self.param_shapes())

  # ---- export ------------------------------------------------------------------------------------
  def state_dict(self, params=None) -> Dict[str, np.ndarray]:
    """The params as a PyTorch-named numpy state dict (gathered across hosts when sharded; scanned
    layers split back into their per-layer keys)."""
    from jax.experimental import multihost_utils
    flat = flatten(self.params if params is None else params)
    want = flatten(self.param_shapes())
    if set(flat) != set(want):
      raise ValueError(f"params do not fit {type(self).__name__} (scan_layers={self.scan_layers}): "
                       f"missing {_fmt(set(want) - set(flat))}; unexpected "
                       f"{_fmt(set(flat) - set(want))}. Params from a scanned model need a model "
                       "built with scan_layers=True, and unscanned ones one without.")
    out = {}
    for k, v in flat.items():
      if isinstance(v, jax.Array) and not v.is_fully_addressable:
        v = multihost_utils.process_allgather(v, tiled=True)
      v = np.asarray(jax.device_get(v))  # 16-bit weights stay 16-bit; anything else is float32
      out[k] = v if v.dtype in _HALF_DTYPES else v.astype(np.float32)
    return self._unstack(out)

  def export_config(self):
    config = copy.deepcopy(self.config)
    config.architectures = [self.torch_architecture]
    return config

  def save_pretrained(self, save_directory, params=None, **kwargs):
    """Writes config.json + model.safetensors that transformers' PyTorch classes load as they are."""
    unknown = set(kwargs) - {"push_to_hub", "safe_serialization", "max_shard_size"}
    if unknown or kwargs.get("push_to_hub"):
      raise TypeError(f"save_pretrained does not support {sorted(unknown) or ['push_to_hub']}.")
    state = self.state_dict(params)  # every process takes part in the gather
    if jax.process_index() != 0:
      return
    os.makedirs(save_directory, exist_ok=True)
    io.save_safetensors(state, save_directory)
    config = self.export_config()
    dtypes = {v.dtype for v in state.values()}
    config.dtype = str(dtypes.pop()) if len(dtypes) == 1 else "float32"  # the weights' own dtype
    config.save_pretrained(save_directory)
    if hasattr(self, "can_generate"):
      self.generation_config.save_pretrained(save_directory)

  # ---- v4 dtype casts: new params, the floating leaves (where `mask` is True) cast ---------------
  def _cast_params(self, params, dtype, mask):
    params = self.params if params is None else params
    mask = jax.tree_util.tree_map(lambda _: True, params) if mask is None else mask
    return jax.tree_util.tree_map(
        lambda p, m: p.astype(dtype) if m and jnp.issubdtype(p.dtype, jnp.floating) else p,
        params, mask)

  def to_bf16(self, params=None, mask=None):
    return self._cast_params(params, jnp.bfloat16, mask)

  def to_fp16(self, params=None, mask=None):
    return self._cast_params(params, jnp.float16, mask)

  def to_fp32(self, params=None, mask=None):
    return self._cast_params(params, jnp.float32, mask)


# task -> model_type -> class; filled as each family module declares its classes.
REGISTRY: Dict[Optional[str], Dict[str, type]] = {}


def model_class(name: str, family_base: type, module_class, task: Optional[str],
                mixins: tuple = ()) -> type:
  """Declares a public model class (e.g. FlaxBertForMaskedLM) and registers it for the auto classes.

  `mixins` add capabilities to this head only (flaxhf.generation.GenerationMixin for LM heads).
  """
  cls = type(name, (family_base, *mixins), dict(
      module_class=module_class, task=task, torch_architecture=name[len("Flax"):],
      __doc__=f"Flax {name[len('Flax'):]}: loads and exports transformers' PyTorch checkpoints.",
      __module__=family_base.__module__))
  model_type = family_base.config_class.model_type
  REGISTRY.setdefault(task, {})[model_type] = cls
  return cls


def model_family(arch: str, config_class, prefix: str, modules: dict, parent: type = None,
                 mixins: Optional[dict] = None, **attrs) -> tuple:
  """Declares `Flax{arch}PreTrainedModel` (a `parent` subclass with class `attrs`), then
  `Flax{arch}{suffix}` per module, with `mixins[task]` added to that task's head."""
  # Classes come in `modules` order after the base; a module's `task` (None: encoder) registers it.
  base = type(f"Flax{arch}PreTrainedModel", (parent or FlaxPreTrainedModel,),
              dict(config_class=config_class, base_model_prefix=prefix,
                   __module__=modules["Model"].__module__, **attrs))
  tasks = {suffix: getattr(m, "task", None) for suffix, m in modules.items()}
  return (base, *(model_class(f"Flax{arch}{suffix}", base, m, tasks[suffix],
                              (mixins or {}).get(tasks[suffix], ()))
                  for suffix, m in modules.items()))
