"""The encoder-decoder shell: transformers v4's Flax seq2seq calls (`__call__`, `encode`, `decode`,
`init_cache`) and generation's prefill/step for every encoder-decoder family, and the hooks a family
answers so that the seq2seq tasks need no `model_type` switch: how labels become decoder inputs,
which token starts decoding, whether its data carries language codes or expects a task prefix.
BART, mBART and Marian (flaxhf/models/bart.py) build on Seq2SeqPreTrainedModel; T5
(flaxhf/models/t5.py) has its own calls (relative position bias, encoder-only head) and the hooks.
"""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from flaxhf.generation import GenerationMixin
from flaxhf.models.base import FlaxPreTrainedModel, flatten
from flaxhf.models.decoder import count_positions, shift_tokens_right


class EncoderDecoderHooks:
  """What the seq2seq tasks ask an encoder-decoder family, with the common answers (T5, Marian)."""

  language_codes = False             # mBART: sources and targets carry language codes
  source_prefix_expected = False     # T5: pretrained checkpoints expect a task prefix
  decoder_inputs_from_inputs = True  # without labels or decoder_input_ids, shift input_ids (not Marian)

  @classmethod
  def shift_labels(cls, labels, config):
    """Decoder inputs from labels (-100 allowed), as the family's transformers code shifts them."""
    return shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)

  @classmethod
  def decoder_start_from_tokenizer(cls, tokenizer, data_cfg) -> int:
    """decoder_start_token_id of a model trained from scratch with `tokenizer` (T5, Marian: pad)."""
    return tokenizer.pad_token_id


def _int(a):
  return None if a is None else jnp.asarray(a, jnp.int32)


def _check_shape(name, arr, want):
  if arr is not None and tuple(arr.shape) != tuple(want):
    raise ValueError(f"{name} has shape {tuple(arr.shape)} but must be {tuple(want)}.")


def _cache_index(cache):
  """The decoder cache's fill level (a scalar), with a clear error for anything but a cache."""
  index = [v for k, v in flatten(cache).items() if k.endswith("self_attn.cache_index")] if isinstance(
      cache, dict) else []
  if not index:
    raise ValueError("past_key_values must be the cache from model.init_cache(batch_size, max_length, "
                     "encoder_outputs) (or a previous decode's outputs.past_key_values).")
  return index[0]


class Seq2SeqPreTrainedModel(EncoderDecoderHooks, FlaxPreTrainedModel):
  """Encoder-decoders with transformers v4's Flax seq2seq calls: `encode`, `decode`, `init_cache`.

  A family supplies its Linen modules (with `encode`, `decode`, `generation_prefill` methods and
  a self-attention cache named `self_attn`), and may fill `missing_state` and the task hooks.
  """

  base_model_prefix = "model"
  uses_token_type_ids = False
  # Copies of the tied embedding that checkpoints may carry, and fairseq's version buffers.
  ignore_on_load = (r"^(model\.)?(encoder|decoder)\.embed_tokens\.weight$", r"^lm_head\.weight$",
                    r"(^|\.)(encoder|decoder)\.version$")
  ignore_on_save = ()  # keys transformers leaves out of its checkpoints (Marian's fixed positions)
  buffers = ("final_logits_bias",)  # in the state dict, but not parameters in transformers

  def dummy_inputs(self):
    ids = jnp.zeros(self.input_shape, jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), decoder_input_ids=ids,
                decoder_attention_mask=jnp.ones_like(ids))

  def num_parameters(self, params=None) -> int:
    """What transformers' `num_parameters()` counts: every parameter, buffers left out."""
    shapes = flatten(self.param_shapes()) if params is None else {
        k: v.shape for k, v in flatten(params).items()}
    return int(sum(np.prod(s) for k, s in shapes.items() if k not in self.buffers))

  # ---- loading and export ------------------------------------------------------------------------
  def _params_from_state_dict(self, state, **kwargs):
    """Fills what transformers fills itself when a checkpoint lacks it, then loads strictly."""
    expected = flatten(self.param_shapes())
    prefix = self.base_model_prefix + "."
    is_head = any(k.startswith(prefix) for k in expected)
    has_prefix = any(k.startswith(prefix) for k in state)
    if is_head and not has_prefix:  # a base checkpoint into a head: as the base loader would
      state = {prefix + k: v for k, v in state.items()}
    state = dict(state)
    for k, shape in expected.items():
      if k in state:
        continue
      if k in self.buffers:  # zeros, as transformers initialises the buffer
        state[k] = np.zeros(shape, np.float32)
      else:
        filled = self.missing_state(k, shape)
        if filled is not None:
          state[k] = filled
    return super()._params_from_state_dict(state, **kwargs)

  def missing_state(self, key: str, shape) -> Optional[np.ndarray]:
    """A tensor transformers rebuilds rather than saves (Marian's fixed positions), or None."""
    return None

  def state_dict(self, params=None):
    """The PyTorch-named state dict as transformers saves it (without the keys it leaves out)."""
    import re
    state = super().state_dict(params)
    return {k: v for k, v in state.items() if not any(re.search(p, k) for p in self.ignore_on_save)}

  # ---- calling -----------------------------------------------------------------------------------
  def _apply(self, method, params, dropout_rng, train, cache=None, **kwargs):
    if train and dropout_rng is None:
      raise ValueError("train=True applies dropout and needs dropout_rng=jax.random.key(...).")
    variables = {"params": self.params if params is None else params}
    if cache is not None:
      variables["cache"] = cache
    out = self.module.apply(variables, **kwargs, method=method,
                            rngs={"dropout": dropout_rng} if train else {},
                            mutable=["cache"] if cache is not None else False)
    if cache is not None:
      out, mutated = out
      out = out.replace(past_key_values=mutated["cache"])
    return out

  def _default_decoder_inputs(self, input_ids, labels):
    """decoder_input_ids as transformers derives them: from the labels (LM head), else the inputs."""
    source = labels if labels is not None and self.task == "seq2seq_lm" else input_ids
    if source is input_ids and not self.decoder_inputs_from_inputs:
      raise ValueError(f"{type(self).__name__} needs decoder_input_ids (it does not derive them "
                       f"from input_ids): pass decoder_input_ids, or labels to its LM head.")
    return self.shift_labels(source, self.config)

  def _check_eos(self, input_ids):
    """BartForSequenceClassification's rule: every row holds the same (non-zero) number of EOS."""
    if isinstance(input_ids, jax.core.Tracer):
      return  # under jit the values are unknown; transformers checks them eagerly too
    counts = np.asarray(input_ids == self.config.eos_token_id).sum(axis=1)
    if len(np.unique(counts)) > 1:
      raise ValueError(f"All examples must have the same number of <eos> tokens (eos_token_id="
                       f"{self.config.eos_token_id}); got {counts.tolist()} per row.")
    if counts.size and counts[0] == 0:
      raise ValueError("Each example must contain at least one <eos> token: the classifier reads the "
                       "decoder state at the last one.")

  def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
               decoder_attention_mask=None, position_ids=None, decoder_position_ids=None,
               params=None, dropout_rng=None, train: bool = False, output_attentions=None,
               output_hidden_states=None, return_dict=None, labels=None, start_positions=None,
               end_positions=None):
    input_ids = _int(input_ids)
    if input_ids is None or input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got {None if input_ids is None else input_ids.shape}.")
    b, l = input_ids.shape
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else _int(attention_mask)
    if decoder_input_ids is None:
      decoder_input_ids = self._default_decoder_inputs(input_ids, _int(labels))
    decoder_input_ids = _int(decoder_input_ids)
    t = decoder_input_ids.shape[1]
    decoder_attention_mask = (jnp.ones_like(decoder_input_ids) if decoder_attention_mask is None
                              else _int(decoder_attention_mask))
    position_ids = count_positions(b, l) if position_ids is None else _int(position_ids)
    decoder_position_ids = (count_positions(b, t) if decoder_position_ids is None
                            else _int(decoder_position_ids))
    for name, arr, want in (("attention_mask", attention_mask, (b, l)), ("position_ids", position_ids, (b, l)),
                            ("decoder_input_ids", decoder_input_ids, (b, t)),
                            ("decoder_attention_mask", decoder_attention_mask, (b, t)),
                            ("decoder_position_ids", decoder_position_ids, (b, t))):
      _check_shape(name, arr, want)
    if self.task == "sequence_classification":
      self._check_eos(input_ids)
    outputs = self._apply(
        None, params, dropout_rng, train, input_ids=input_ids, attention_mask=attention_mask,
        decoder_input_ids=decoder_input_ids, decoder_attention_mask=decoder_attention_mask,
        position_ids=position_ids, decoder_position_ids=decoder_position_ids, deterministic=not train,
        output_attentions=bool(output_attentions), output_hidden_states=bool(output_hidden_states))
    return self.finish_outputs(outputs, labels, start_positions, end_positions, return_dict)

  def encode(self, input_ids, attention_mask=None, position_ids=None, output_attentions=None,
             output_hidden_states=None, return_dict=None, train: bool = False, params=None,
             dropout_rng=None):
    """Runs the encoder only; the result feeds `decode` (v4's `encoder_outputs`)."""
    input_ids = _int(input_ids)
    b, l = input_ids.shape
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else _int(attention_mask)
    position_ids = count_positions(b, l) if position_ids is None else _int(position_ids)
    _check_shape("attention_mask", attention_mask, (b, l))
    out = self._apply("encode", params, dropout_rng, train, input_ids=input_ids,
                      attention_mask=attention_mask, position_ids=position_ids,
                      deterministic=not train, output_attentions=bool(output_attentions),
                      output_hidden_states=bool(output_hidden_states))
    return out.to_tuple() if return_dict is False else out

  def decode(self, decoder_input_ids, encoder_outputs, encoder_attention_mask=None,
             decoder_attention_mask=None, decoder_position_ids=None, past_key_values=None,
             output_attentions=None, output_hidden_states=None, return_dict=None,
             train: bool = False, params=None, dropout_rng=None):
    """Runs the decoder over `encoder_outputs`; with `past_key_values` (from `init_cache`) it
    appends to the cache, whose slots `decoder_attention_mask` [batch, max_length] then covers."""
    ids = _int(decoder_input_ids)
    b, t = ids.shape
    encoder_hidden = encoder_outputs  # v4 passes encode()'s output; its first field is the states
    if hasattr(encoder_outputs, "last_hidden_state"):
      encoder_hidden = encoder_outputs.last_hidden_state
    elif isinstance(encoder_outputs, (tuple, list)):
      encoder_hidden = encoder_outputs[0]
    first = 0
    if past_key_values is None:
      want = (b, t)
    else:
      first = _cache_index(past_key_values)
      want = (b, next(v for k, v in flatten(past_key_values).items()
                      if k.endswith("self_attn.cached_key")).shape[1])
    if encoder_hidden is None and past_key_values is None:
      raise ValueError("decode needs encoder_outputs (from model.encode(...)).")
    if encoder_attention_mask is None:
      s = (encoder_hidden.shape[1] if encoder_hidden is not None else next(
          v for k, v in flatten(past_key_values).items() if k.endswith("encoder_attn.cached_key")).shape[1])
      encoder_attention_mask = jnp.ones((b, s), jnp.int32)
    mask = jnp.ones(want, jnp.int32) if decoder_attention_mask is None else _int(decoder_attention_mask)
    _check_shape("decoder_attention_mask", mask, want)  # with a cache: over every cache slot
    positions = count_positions(b, t, first) if decoder_position_ids is None else _int(decoder_position_ids)
    out = self._apply("decode", params, dropout_rng, train, cache=past_key_values,
                      decoder_input_ids=ids, decoder_attention_mask=mask,
                      decoder_position_ids=positions, encoder_hidden_states=encoder_hidden,
                      encoder_attention_mask=_int(encoder_attention_mask), deterministic=not train,
                      output_attentions=bool(output_attentions),
                      output_hidden_states=bool(output_hidden_states))
    return out.to_tuple() if return_dict is False else out

  def init_cache(self, batch_size: int, max_length: int, encoder_outputs=None):
    """A zero self-attention cache of `max_length` slots (shapes from jax.eval_shape, no params made).

    `encoder_outputs` is accepted for transformers v4's signature; the cache does not depend on it.
    """
    del encoder_outputs
    if max_length > self.config.max_position_embeddings:
      raise ValueError(f"max_length={max_length} exceeds the decoder's max_position_embeddings="
                       f"{self.config.max_position_embeddings}; generate fewer tokens.")
    ids = jnp.ones((batch_size, max_length), jnp.int32)
    enc = jnp.zeros((batch_size, 1, self.config.d_model), self.dtype)

    def cache():
      return self.module.init(jax.random.key(0), ids, ids, count_positions(batch_size, max_length), enc,
                              jnp.ones((batch_size, 1), jnp.int32), init_cache=True,
                              method="decode")["cache"]
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(cache))


class EncoderDecoderGeneration(GenerationMixin):
  """What every encoder-decoder LM head decodes alike: one token per step against the cache that
  the family's `_generation_prefill` filled (self and cross keys/values) and the encoder mask."""

  is_encoder_decoder = True

  def _generation_step(self, params, tokens_N, state):
    out = self.decode(tokens_N[:, None], None, encoder_attention_mask=state["encoder_mask"],
                      decoder_attention_mask=state["mask"], past_key_values=state["cache"],
                      params=params)
    return out.logits[:, -1], {**state, "cache": out.past_key_values}


class Seq2SeqLM(Seq2SeqPreTrainedModel, EncoderDecoderGeneration):
  """The generation hooks of the LM heads (flaxhf.generation drives the loop)."""

  def max_encoder_positions(self):
    return self.config.max_position_embeddings

  def _generation_prefill(self, params, ids_NxP, mask_NxP, cache_len, inputs):
    n, p = ids_NxP.shape
    mask_NxS = jnp.ones((n, cache_len), jnp.int32).at[:, :p].set(mask_NxP)
    enc_mask = jnp.asarray(inputs["attention_mask"], jnp.int32)
    out = self._apply("generation_prefill", params, None, False, cache=self.init_cache(n, cache_len),
                      input_ids=jnp.asarray(inputs["input_ids"], jnp.int32), attention_mask=enc_mask,
                      decoder_input_ids=ids_NxP, decoder_attention_mask=mask_NxS,
                      decoder_position_ids=count_positions(n, p))
    state = {"cache": out.past_key_values, "mask": mask_NxS, "encoder_mask": enc_mask}
    return out.logits[:, -1], state
