"""`model.generate`: one jit-compiled decode loop for every generative family.

A family supplies only what differs, as two methods (decoder-only defaults below):
  `_generation_prefill(params, ids_NxP, mask_NxP, cache_len, inputs) -> (logits_NxV, state)` runs
  the prompt into a static cache of `cache_len` slots. Decoder-only prompts arrive left-padded
  (mask 0) to a length bucket. An encoder-decoder (`is_encoder_decoder = True`) gets its decoder
  prompt unpadded (the start token) and `inputs` = {"input_ids", "attention_mask"} of the encoder,
  right-padded (mask 0) to a bucket: it runs the encoder once and computes the cross-attention
  keys and values once, into `state`.
  `_generation_step(params, tokens_N, state) -> (logits_NxV, state)` feeds one token per row.
  Beam search reorders `state` by gathering axis 0 of every array with ndim > 0.
The loop (flaxhf.generation.search) never leaves the compiled program. A program is compiled per
(batch, prompt bucket, new tokens, beams, strategy, processors on); values that change per call
(temperature, top-k/p, penalties, lengths, special ids) are traced arrays, so they do not recompile.

Called inside jit or pmap (v4 scripts pmap a `generate_step`), `generate` traces into the caller's
program instead; `sequences` then keep their static [batch, max_length] shape, padded after each
row's end as v4's Flax generate returns them (there is no host step to crop them).
"""

import logging
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from flaxhf.generation import config as gconfig
from flaxhf.generation import processors, search
from flaxhf.models.outputs import ModelOutput

log = logging.getLogger("flaxhf")

# Prompts are left-padded (masked) to one of these lengths, so nearby lengths share a program.
PROMPT_BUCKETS = (8, 16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


@flax.struct.dataclass
class GenerateOutput(ModelOutput):
  """v4's Flax generate outputs: `sequences` always; the rest with return_dict_in_generate."""

  sequences: Any = None
  scores: Optional[tuple] = None
  sequences_scores: Optional[Any] = None
  beam_indices: Optional[Any] = None


def prompt_bucket(length: int, limit: Optional[int]) -> int:
  """The padded prompt length used for compiling: the smallest bucket that fits, within `limit`."""
  for b in PROMPT_BUCKETS:
    if b >= length:
      return b if limit is None or b <= limit else length
  return length


class GenerationMixin:
  """Adds `generate` (greedy, sampling, beam search) and `generation_config` to a model class."""

  is_encoder_decoder = False
  _generation_config = None

  def can_generate(self) -> bool:
    return True

  @property
  def generation_config(self):
    """Default settings of `generate`: generation_config.json when loaded with one, else the
    model config's special tokens; written by save_pretrained."""
    if self._generation_config is None:
      self._generation_config = gconfig.model_generation_config(self.config)
    return self._generation_config

  @generation_config.setter
  def generation_config(self, value):
    self._generation_config = value

  def load_generation_config(self, model_dir: str):
    import os
    from transformers import GenerationConfig
    if os.path.isfile(os.path.join(model_dir, "generation_config.json")):
      self._generation_config = GenerationConfig.from_pretrained(model_dir)

  def _max_positions(self) -> Optional[int]:
    return getattr(self.config, "max_position_embeddings", None)

  # ---- what a decoder-only family supplies (v4 cache convention) ---------------------------------
  def _generation_prefill(self, params, ids_NxP, mask_NxP, cache_len, inputs):
    n, p = ids_NxP.shape
    cache = self.init_cache(n, cache_len)
    mask_NxS = jnp.ones((n, cache_len), jnp.int32).at[:, :p].set(mask_NxP)
    # Positions count real tokens (transformers' prepare_inputs_for_generation), so left padding
    # does not shift them.
    pos_NxP = jnp.where(mask_NxP > 0, jnp.cumsum(mask_NxP, axis=-1) - 1, 1)
    out = self(ids_NxP, attention_mask=mask_NxS, position_ids=pos_NxP, params=params,
               past_key_values=cache)
    state = {"cache": out.past_key_values, "mask": mask_NxS, "position": pos_NxP[:, -1] + 1}
    return out.logits[:, -1], state

  def _generation_step(self, params, tokens_N, state):
    out = self(tokens_N[:, None], attention_mask=state["mask"],
               position_ids=state["position"][:, None], params=params,
               past_key_values=state["cache"])
    return out.logits[:, -1], {**state, "cache": out.past_key_values,
                               "position": state["position"] + 1}

  def _cache_rebuild_at(self) -> Optional[int]:
    """The logical length at which transformers recomputes the whole cache once while generating
    (Phi-3: on first outgrowing original_max_position_embeddings, for its long rope factors)."""
    return None

  def _generation_rebuild(self, params, ids_NxS, slot, state):
    """A decoder-only step that recomputes the cache from every token so far (slots 0..slot of
    `ids_NxS`, the last one just chosen) instead of appending one token to it."""
    n, s = ids_NxS.shape
    seen_NxS = (jnp.arange(s) <= slot)[None, :]
    mask_NxS = jnp.where(seen_NxS, state["mask"], 0)
    # Positions count real tokens as the prefill's do; slots not written yet take 1 (no effect on
    # the rope's sequence length) and stay causally hidden.
    pos_NxS = jnp.where(mask_NxS > 0, jnp.cumsum(mask_NxS, axis=-1) - 1, 1)
    out = self(ids_NxS, attention_mask=state["mask"], position_ids=pos_NxS, params=params,
               past_key_values=self.init_cache(n, s))
    cache = jax.tree_util.tree_map_with_path(  # the next token goes to slot + 1, as after a step
        lambda path, x: jnp.asarray(slot + 1, x.dtype) if "cache_index" in jax.tree_util.keystr(path)
        else x, out.past_key_values)
    logits = jax.lax.dynamic_index_in_dim(out.logits, slot, axis=1, keepdims=False)
    return logits, {**state, "cache": cache, "position": state["position"] + 1}

  # ---- generate ----------------------------------------------------------------------------------
  def generate(self, input_ids, attention_mask=None, generation_config=None, prng_key=None,
               trace: bool = True, params=None, logits_processor=None, decoder_input_ids=None,
               _lower: bool = False, **kwargs):
    """Generates token ids as transformers' `generate` does; returns an output with `.sequences`.

    Decoder-only models continue `input_ids` (left-padded); encoder-decoders encode `input_ids`
    once and decode from `decoder_input_ids` (default: the decoder start token).
    """
    if logits_processor is not None:
      raise ValueError("logits_processor= is not supported: flaxhf's processors are compiled into "
                       "the decode loop; use the GenerationConfig settings instead.")
    weights = self.__dict__.get("_params") if params is None else params
    in_trace = any(isinstance(x, jax.core.Tracer) for x in (
        input_ids, attention_mask, *jax.tree_util.tree_leaves(weights)[:1]))
    xp = jnp if in_trace else np  # traced inputs stay jax arrays; the layout code is the same
    input_ids = jnp.asarray(input_ids) if in_trace else np.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}.")
    config, default_max_length = gconfig.resolve(self, generation_config, kwargs)
    gconfig.check_strategy(config)
    eos = list(config.eos_token_id or [])
    pad_id = config.pad_token_id
    if pad_id is None and eos:
      if input_ids.shape[0] > 1 and attention_mask is None:
        log.warning("Batched prompts with no pad token and no attention_mask: using eos_token_id=%d "
                    "as the pad token, as transformers does. Pass attention_mask (and pad_token_id) "
                    "for reliable results.", eos[0])
      pad_id = eos[0]
    attention_mask = _input_mask(input_ids, attention_mask, pad_id, eos, xp)
    if self.is_encoder_decoder:
      prompt, extra = self._decoder_prompt(config, input_ids, attention_mask, decoder_input_ids, xp)
      positions = self._max_positions()
    else:
      if decoder_input_ids is not None:
        raise ValueError(f"{type(self).__name__} is decoder-only: it takes no decoder_input_ids.")
      if not in_trace and input_ids.shape[0] > 1 and (attention_mask[:, -1] == 0).any():
        log.warning("Right padding in a decoder-only prompt: pad on the left "
                    "(tokenizer.padding_side='left') for correct generation.")
      prompt, extra, positions = input_ids.astype(np.int32), {}, self._max_positions()
    prompt_mask = attention_mask if not self.is_encoder_decoder else np.ones_like(prompt)
    batch, prompt_len = prompt.shape
    config = gconfig.resolve_lengths(config, default_max_length, prompt_len, positions)
    num_beams = config.num_beams or 1
    n_return = config.num_return_sequences or 1
    expand = max(num_beams, n_return)
    fill = (pad_id or (eos[0] if eos else None)) if eos else -1
    fill = -1 if fill is None else fill
    ids = xp.repeat(prompt, expand, axis=0)
    mask = xp.repeat(prompt_mask, expand, axis=0)
    runner = _Runner(self, config, prompt_len, num_beams, n_return, mask, positions)
    # Host-side layout: the model's prompt left-padded (masked) to the bucket; the output buffer
    # holds the prompt as given, then the new tokens.
    pad_cols = runner.bucket - prompt_len
    ids_in = xp.pad(ids, ((0, 0), (pad_cols, 0)))
    mask_in = xp.pad(mask, ((0, 0), (pad_cols, 0)))
    sequences = xp.full((ids.shape[0], runner.bucket + runner.max_new),
                        fill if num_beams > 1 else (pad_id if pad_id is not None else 0), np.int32)
    if in_trace:
      sequences = sequences.at[:, :prompt_len].set(ids)
    else:
      sequences[:, :prompt_len] = ids
    extra = {k: xp.repeat(xp.asarray(v), expand, axis=0) for k, v in extra.items()}
    rng = prng_key if prng_key is not None else jax.random.key(0)
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jnp.unsignedinteger):
      rng = jax.random.wrap_key_data(rng)  # a v4-style raw PRNGKey
    traced = dict(
        processors=runner.values, prompt_len=jnp.int32(prompt_len),
        max_length=jnp.int32(config.max_length), pad_id=jnp.int32(pad_id if pad_id is not None else 0),
        eos=jnp.asarray(eos, jnp.int32).reshape(-1),
        length_penalty=jnp.float32(config.length_penalty if config.length_penalty is not None else 1.0))
    run = runner.program(trace)
    args = (self.params if params is None else params, ids_in, mask_in, sequences, extra, traced, rng)
    if _lower:  # lower_generate: the program for these inputs, not run
      if in_trace or not trace:
        raise ValueError("lower_generate needs a plain call: not inside jit/pmap, trace=True.")
      return run.lower(*args)
    out = run(*args)
    if in_trace:  # no host step: v4's static [batch, max_length], padded after each row's end
      if runner.output_scores:
        raise ValueError("output_scores=True is not supported inside jit/pmap (scores are cropped "
                         "on the host): call generate outside the traced function for them.")
      return GenerateOutput(sequences=out["sequences"][:, :int(config.max_length)])
    return runner.finish(out, config)

  def lower_generate(self, input_ids, **kwargs):
    """The `jax.stages.Lowered` decode program that `generate(input_ids, **kwargs)` would run, not
    run: `.compile().memory_analysis()` gives its buffer sizes (benchmarks/generate.py --memory)."""
    return self.generate(input_ids, _lower=True, **kwargs)

  def _decoder_prompt(self, config, input_ids, attention_mask, decoder_input_ids, xp=np):
    """(decoder prompt [B, P], encoder inputs padded on the right to a length bucket)."""
    start = config.decoder_start_token_id
    if start is None:
      start = getattr(self.config, "decoder_start_token_id", None)
    if start is None:
      start = config.bos_token_id
    if start is None:
      raise ValueError(f"{type(self).__name__} has no decoder_start_token_id (nor bos_token_id) in "
                       "its config or generation config: set config.decoder_start_token_id (T5 and "
                       "Marian start from the pad id, BART from eos).")
    batch = input_ids.shape[0]
    if decoder_input_ids is None:
      prompt = np.full((batch, 1), int(start), np.int32)
    else:
      prompt = np.asarray(decoder_input_ids, np.int32)
      if prompt.ndim != 2 or prompt.shape[0] != batch:
        raise ValueError(f"decoder_input_ids must be [batch={batch}, length]; got {prompt.shape}.")
      if not (prompt[:, 0] == start).all():  # transformers prepends the start token
        prompt = np.concatenate([np.full((batch, 1), int(start), np.int32), prompt], axis=1)
    length = input_ids.shape[1]
    enc_len = prompt_bucket(length, getattr(self, "max_encoder_positions", lambda: None)())
    # Right padding is masked out of attention; the encoder's real positions do not move.
    extra = {"input_ids": xp.pad(input_ids.astype(np.int32), ((0, 0), (0, enc_len - length)),
                                 constant_values=int(config.pad_token_id or 0)),
             "attention_mask": xp.pad(attention_mask, ((0, 0), (0, enc_len - length)))}
    return prompt, extra


def _input_mask(input_ids, attention_mask, pad_id, eos, xp=np):
  """The attention mask, by transformers' rule when not given: the pad token marks padding unless
  it is also the EOS token."""
  if attention_mask is None:
    if pad_id is not None and pad_id not in eos:  # (no pad token in the ids: all ones)
      return (input_ids != pad_id).astype(np.int32)
    return xp.ones(input_ids.shape, np.int32)
  attention_mask = xp.asarray(attention_mask, np.int32)
  if attention_mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask has shape {attention_mask.shape} but input_ids has "
                     f"{input_ids.shape}; they must match.")
  return attention_mask


class _Runner:
  """The static shape of one generate call, its compiled program, and its host-side finishing."""

  def __init__(self, model, config, prompt_len, num_beams, n_return, mask_NxP, max_positions):
    self.model, self.num_beams, self.n_return = model, num_beams, n_return
    self.prompt_len = prompt_len
    self.max_new = int(config.max_length) - prompt_len
    self.do_sample = bool(config.do_sample)
    self.output_scores = bool(config.return_dict_in_generate and config.output_scores)
    self.return_dict = bool(config.return_dict_in_generate)
    self.early_stopping = config.early_stopping if config.early_stopping is not None else False
    limit = None if max_positions is None else max_positions - self.max_new
    # An encoder-decoder's decoder prompt is the start token: nothing to share by padding it.
    self.bucket = prompt_len if model.is_encoder_decoder else prompt_bucket(prompt_len, limit)
    self.spec, self.values = processors.build(
        config, prompt_len=prompt_len, vocab_size=model.config.vocab_size,
        do_sample=self.do_sample, num_beams=num_beams, attention_mask=mask_NxP,
        is_encoder_decoder=model.is_encoder_decoder)

  def program(self, trace: bool):
    """The jitted decode program for this call's static shape, compiled once per shape."""
    if not trace:
      return lambda *args: _untraced(self.decode_program, args)
    key = (self.bucket, self.max_new, self.num_beams, self.n_return, self.do_sample,
           self.early_stopping, self.output_scores, self.spec)
    programs = self.model.__dict__.setdefault("_generate_programs", {})
    if key not in programs:
      programs[key] = jax.jit(self.decode_program)
    return programs[key]

  def decode_program(self, params, ids_NxP, mask_NxP, sequences_NxS, extra, traced, rng):
    model = self.model
    cache_len = ids_NxP.shape[1] + self.max_new
    e = max(self.num_beams, self.n_return)
    if e == 1:
      logits, state = model._generation_prefill(params, ids_NxP, mask_NxP, cache_len, extra)
    else:
      # The e rows of a source are copies: prefill (for encoder-decoders, encode) each source once
      # and repeat its state, as transformers expands the encoder outputs; e times less prefill work.
      logits, state = model._generation_prefill(params, ids_NxP[::e], mask_NxP[::e], cache_len,
                                                {k: v[::e] for k, v in extra.items()})
      logits = jnp.repeat(logits, e, axis=0)
      state = jax.tree_util.tree_map(lambda x: x if jnp.ndim(x) == 0 else jnp.repeat(x, e, axis=0),
                                     state)
    lengths = search.Lengths(traced["prompt_len"], traced["max_length"])
    values = traced["processors"]

    def process(logits_NxV, seqs, cur_len):
      return processors.apply(self.spec, values, logits_NxV, seqs, cur_len)

    step = model._generation_step
    rebuild_at = model._cache_rebuild_at()
    if rebuild_at is not None and not model.is_encoder_decoder:
      step, state = _rebuilding(model, rebuild_at, ids_NxP, state, traced["prompt_len"])
    if self.num_beams == 1:
      seqs, cur_len, scores = search.decode(
          step, params, logits, state, sequences_NxS, lengths, process, do_sample=self.do_sample,
          rng=rng, pad_id=traced["pad_id"], eos_ids=traced["eos"], max_new_tokens=self.max_new,
          output_scores=self.output_scores)
      return {"sequences": seqs, "cur_len": cur_len, "scores": scores}
    seqs, seq_scores, beam_indices, cur_len, scores = search.beam_search(
        step, params, logits, state, sequences_NxS, lengths, process, num_beams=self.num_beams,
        length_penalty=traced["length_penalty"], early_stopping=self.early_stopping,
        eos_ids=traced["eos"], max_new_tokens=self.max_new, output_scores=self.output_scores,
        do_sample=self.do_sample, rng=rng)
    k = self.n_return
    flat = lambda x: x[:, :k].reshape((-1,) + x.shape[2:])  # noqa: E731
    return {"sequences": flat(seqs), "sequences_scores": flat(seq_scores),
            "beam_indices": flat(beam_indices), "cur_len": cur_len, "scores": scores}

  def finish(self, out, config) -> GenerateOutput:
    """Crops the static buffers to what was generated, as transformers returns them."""
    out = jax.device_get(out)
    steps = int(out["cur_len"]) - self.prompt_len
    if self.num_beams == 1:
      sequences = out["sequences"][:, :self.prompt_len + steps]
      result = dict(sequences=jnp.asarray(sequences))
      if self.output_scores:
        result["scores"] = tuple(jnp.asarray(s) for s in out["scores"][:steps])
      return GenerateOutput(**result)
    beam_indices = out["beam_indices"]
    generated = int(((beam_indices + 1) != 0).sum(axis=1).max())
    result = dict(sequences=jnp.asarray(out["sequences"][:, :self.prompt_len + generated]))
    if self.return_dict:
      result["beam_indices"] = jnp.asarray(beam_indices[:, :generated])
      if self.output_scores:
        result["sequences_scores"] = jnp.asarray(out["sequences_scores"])
        result["scores"] = tuple(jnp.asarray(s) for s in out["scores"][:steps])
    return GenerateOutput(**result)


def _rebuilding(model, at: int, ids_NxP, state, prompt_len):
  """(step, state) that also keep every token fed so far, and at the step whose token reaches
  logical length `at` + 1 (transformers' input_ids.shape[1]) recompute the cache from all of them
  instead (model._generation_rebuild), as transformers does for Phi-3. Rows reorder with the beams
  like the rest of the state."""
  n, p = ids_NxP.shape
  cache_len = state["mask"].shape[1]
  ids_NxS = jnp.zeros((n, cache_len), jnp.int32).at[:, :p].set(ids_NxP.astype(jnp.int32))
  # `logical`: transformers' length once this step's token is in; `slot`: where it goes here
  # (the prompt may sit left-padded in a wider bucket).
  wrapped = {"inner": state, "ids": ids_NxS, "slot": jnp.int32(p), "logical": prompt_len + 1}

  def step(params, tokens_N, st):
    ids = jax.lax.dynamic_update_slice_in_dim(st["ids"], tokens_N[:, None].astype(jnp.int32),
                                              st["slot"], axis=1)
    logits, inner = jax.lax.cond(
        st["logical"] == at + 1,
        lambda: model._generation_rebuild(params, ids, st["slot"], st["inner"]),
        lambda: model._generation_step(params, tokens_N, st["inner"]))
    return logits, {"inner": inner, "ids": ids, "slot": st["slot"] + 1, "logical": st["logical"] + 1}

  return step, wrapped


def _untraced(program, args):
  """Runs the decode loop eagerly (v4's trace=False): slow, for debugging."""
  with jax.disable_jit():
    return program(*args)
