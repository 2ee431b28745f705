"""Text generation, as transformers' TextGenerationPipeline, on flaxhf's compiled `generate`."""

import copy
import enum

import jax
import numpy as np
from transformers import GenerationConfig

from flaxhf.pipelines.base import Pipeline, as_list


class ReturnType(enum.Enum):
  TENSORS = 0
  NEW_TEXT = 1
  FULL_TEXT = 2


# transformers' pipeline defaults, for what neither the call nor the model's generation config sets.
DEFAULT_GENERATION = dict(max_new_tokens=256, do_sample=True, temperature=0.7)
# Defaults that only apply when sampling (transformers' _prepare_generate_kwargs).
_SAMPLING = {"temperature", "top_k", "top_p", "min_p", "top_h", "typical_p", "epsilon_cutoff",
             "eta_cutoff"}
GENERATION_KEYS = frozenset(k for k in vars(GenerationConfig()) if not k.startswith("_")) | {
    "generation_config", "prng_key"}
# transformers pipeline arguments flaxhf does not implement, with what to do instead.
_NOT_SUPPORTED = {
    "stop_sequence": "stop strings are not compiled into the decode loop; pass eos_token_id=[ids]",
    "handle_long_generation": "truncate the prompt yourself (truncation=True, max_length=...)",
    "assistant_model": "assisted generation is not supported",
    "assistant_tokenizer": "assisted generation is not supported",
    "padding": "prompts are always left-padded per batch", "num_workers": "there are no workers",
}


def _return_type(p):
  """The return type one set of arguments asks for (None: not said), with transformers' exclusions."""
  if p.get("return_type") is not None:
    return ReturnType(p["return_type"])
  if p.get("return_full_text") is not None:
    if p.get("return_text") is not None:
      raise ValueError("`return_text` is mutually exclusive with `return_full_text`")
    if p.get("return_tensors") is not None:
      raise ValueError("`return_full_text` is mutually exclusive with `return_tensors`")
    return ReturnType.FULL_TEXT if p["return_full_text"] else ReturnType.NEW_TEXT
  if p.get("return_tensors"):
    if p.get("return_text") is not None:
      raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
    return ReturnType.TENSORS
  return None


def _is_chat(inputs):
  message = lambda m: isinstance(m, dict) and "role" in m  # noqa: E731
  if message(inputs):
    return True
  return isinstance(inputs, (list, tuple)) and bool(inputs) and (
      message(inputs[0]) or (isinstance(inputs[0], (list, tuple)) and bool(inputs[0])
                             and message(inputs[0][0])))


class TextGenerationPipeline(Pipeline):
  """Continues prompts: per prompt a list of {"generated_text"} (or {"generated_token_ids"}) dicts.

  Generation settings (any GenerationConfig field, or generation_config=) go to `model.generate`;
  where neither they nor the model's generation config say otherwise, transformers' pipeline
  defaults apply: max_new_tokens=256, do_sample=True, temperature=0.7. Batches of `batch_size`
  prompts (default 1, as transformers) are left-padded; rows are padded to a power of two so few
  programs compile. Sampling draws from `prng_key=` or from the pipeline's key (`seed=`), split
  per call.
  """

  task = "text-generation"
  model_task = "causal_lm"
  _not_supported = _NOT_SUPPORTED  # argument -> why flaxhf does not take it
  defaults = dict(return_full_text=None, return_text=None, return_tensors=None, return_type=None,
                  clean_up_tokenization_spaces=None, skip_special_tokens=None, prefix=None,
                  add_special_tokens=None, truncation=None, tokenizer_encode_kwargs=None,
                  continue_final_message=None, tools=None, documents=None)

  def __init__(self, model, tokenizer, batch_size: int = 1, seed: int = 0, **kwargs):
    pipe, self.generate_kwargs = self._split(kwargs)
    self._return_type = _return_type(pipe)
    super().__init__(model, tokenizer, batch_size=batch_size, **pipe)
    self._rng = jax.random.key(seed)
    self._generation_defaults = dict(DEFAULT_GENERATION)
    if tokenizer.pad_token_id is not None:
      self._generation_defaults["pad_token_id"] = tokenizer.pad_token_id

  def _split(self, kwargs):
    """(pipeline arguments, generate arguments); anything else is an error that names it."""
    for name in kwargs:
      if name in self._not_supported:
        raise ValueError(f"The {self.task} pipeline does not support {name}= in flaxhf: "
                         f"{self._not_supported[name]}.")
    unknown = sorted(set(kwargs) - set(self.defaults) - GENERATION_KEYS)
    if unknown:
      raise TypeError(f"The {self.task!r} pipeline got unknown argument(s) {unknown}; it takes "
                      f"{sorted(self.defaults)}, batch_size, and any GenerationConfig field "
                      f"(max_new_tokens, do_sample, num_beams, ...), generation_config or prng_key.")
    pipe = {k: v for k, v in kwargs.items() if k in self.defaults}
    return pipe, {k: v for k, v in kwargs.items() if k not in self.defaults}

  def _set_generation_params(self, kwargs):
    """The settings a generate call with `kwargs` does not take from the global defaults."""
    params = self.model.generation_config.to_diff_dict()
    if kwargs.get("generation_config") is not None:
      params.update(kwargs["generation_config"].to_diff_dict())
    return {**params, **kwargs}

  def prepare_generate_kwargs(self, call_kwargs, prefix_length=0):
    """generate()'s arguments for one call, as transformers' pipeline builds them: the call's over
    the constructor's (unless the call passes a generation_config), plus the pipeline defaults."""
    kwargs = dict(call_kwargs)
    if "generation_config" not in kwargs:
      kwargs = {**self.generate_kwargs, **kwargs}
    set_params = self._set_generation_params(kwargs)
    added = {k: v for k, v in self._generation_defaults.items()
             if k not in set_params and not (k == "max_new_tokens" and "max_length" in set_params)}
    if not {**set_params, **added}.get("do_sample"):
      added = {k: v for k, v in added.items() if k not in _SAMPLING}
    if kwargs.get("generation_config") is None:
      kwargs.update(added)
    else:  # what the pipeline adds goes into a copy of the user's config, as transformers does
      config = copy.deepcopy(kwargs["generation_config"])
      config.update(**added)
      kwargs["generation_config"] = config
    if prefix_length:  # a total length (not a number of new tokens) must include the prefix
      set_params = self._set_generation_params(kwargs)
      for length, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if length in set_params and new_tokens not in set_params:
          kwargs[length] = set_params[length] + prefix_length
    set_params = self._set_generation_params(kwargs)
    if set_params.get("return_dict_in_generate") or set_params.get("output_scores"):
      raise ValueError("return_dict_in_generate / output_scores are not pipeline outputs in flaxhf: "
                       "call model.generate(...) directly for scores.")
    return kwargs

  def __call__(self, text_inputs, batch_size=None, **kwargs):
    chats = None
    if _is_chat(text_inputs):  # one conversation, or a list of them
      single = isinstance(text_inputs, dict) or isinstance(text_inputs[0], dict)
      chats = [list(text_inputs)] if single else [list(c) for c in text_inputs]
      texts = chats
    else:
      texts, single = as_list(text_inputs)
    pipe, gen = self._split(kwargs)
    p = self.call_params(pipe)
    return_type = _return_type(pipe) or self._return_type or ReturnType.FULL_TEXT
    batch_size = self.batch_size if batch_size is None else batch_size
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}.")

    prefix = p["prefix"] if p["prefix"] is not None else (getattr(self.model.config, "prefix", None)
                                                          or "")
    prefix_length = 0
    if prefix and chats is None:
      prefix_length = len(self.tokenizer(prefix, padding=False,
                                         add_special_tokens=bool(p["add_special_tokens"]))["input_ids"])
    generate_kwargs = self.prepare_generate_kwargs(gen, prefix_length)
    tok_kwargs = {k: v for k, v in (("add_special_tokens", p["add_special_tokens"]),
                                    ("truncation", p["truncation"]),
                                    ("max_length", gen.get("max_length"))) if v is not None}
    tok_kwargs.update(p["tokenizer_encode_kwargs"] or {})
    if chats is not None:
      prompts = [self._chat_ids(c, p, tok_kwargs) for c in chats]
    else:
      prompts = [self.tokenizer(prefix + text, **tok_kwargs)["input_ids"] for text in texts]
    for text, ids in zip(texts, prompts):
      if not ids:
        raise ValueError(f"The prompt {text!r} has no tokens: give at least one token of text "
                         f"(e.g. the BOS token {self.tokenizer.bos_token!r}).")

    rng = generate_kwargs.pop("prng_key", None)
    if rng is None:
      self._rng, rng = jax.random.split(self._rng)
    results = []
    for b in range(0, len(prompts), batch_size):
      batch = prompts[b:b + batch_size]
      key = rng if b == 0 else jax.random.fold_in(rng, b)  # the first batch draws with the key given
      sequences = self.generate_batch(batch, batch_size, key, generate_kwargs)
      longest = max(len(ids) for ids in batch)
      for text, rows in zip(texts[b:b + batch_size], sequences):
        results.append([self.postprocess(text, row, longest, return_type, p) for row in rows])
    return results[0] if single else results

  def _chat_ids(self, messages, p, tok_kwargs):
    """A conversation's prompt ids from the tokenizer's chat template, as transformers' pipeline
    makes them: a generation prompt for a new assistant turn, or (when the last message is the
    assistant's, or continue_final_message=True) that message continued."""
    if not getattr(self.tokenizer, "chat_template", None):
      raise ValueError("Chat input needs a tokenizer with a chat template; this one has none. Set "
                       "tokenizer.chat_template = '...' (a Jinja template), or pass the prompt text.")
    cont = p["continue_final_message"]
    if cont is None:
      cont = messages[-1]["role"] == "assistant"
    kwargs = {k: v for k, v in tok_kwargs.items() if k != "add_special_tokens"}
    return list(self.tokenizer.apply_chat_template(
        messages, add_generation_prompt=not cont, continue_final_message=cont, return_dict=True,
        tools=p["tools"], documents=p["documents"], **kwargs)["input_ids"])

  def generate_batch(self, prompts, batch_size, rng, generate_kwargs):
    """[prompts, num_return_sequences, length] token ids: the prompts left-padded, then generated."""
    longest = max(len(ids) for ids in prompts)
    pad_id = self.tokenizer.pad_token_id
    if pad_id is None:  # GPT-2 has none: EOS fills the (masked) padding, as transformers' generate
      pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
    # Rows padded to a power of two (within batch_size) with copies of the first prompt: the decode
    # loop compiles once per row count, and copies keep output lengths those of the real rows.
    rows = min(batch_size, 1 << (len(prompts) - 1).bit_length())
    padded = prompts + [prompts[0]] * (rows - len(prompts))
    ids = np.full((rows, longest), pad_id, np.int32)
    mask = np.zeros((rows, longest), np.int32)
    for r, prompt in enumerate(padded):
      ids[r, longest - len(prompt):] = prompt
      mask[r, longest - len(prompt):] = 1
    out = self.model.generate(ids, attention_mask=mask, prng_key=rng, **generate_kwargs)
    sequences = np.asarray(out.sequences)
    return sequences.reshape(rows, sequences.shape[0] // rows, -1)[:len(prompts)]

  def postprocess(self, prompt_text, sequence, prompt_length, return_type, p):
    """One record: the token ids, or the decoded new text (after the prompt text if full)."""
    if return_type == ReturnType.TENSORS:
      return {"generated_token_ids": sequence.tolist()}
    skip = p["skip_special_tokens"] if p["skip_special_tokens"] is not None else True
    text = self.tokenizer.decode(sequence[prompt_length:].tolist(), skip_special_tokens=skip,
                                 clean_up_tokenization_spaces=p["clean_up_tokenization_spaces"])
    if return_type != ReturnType.FULL_TEXT:
      return {"generated_text": text}
    if isinstance(prompt_text, str):
      return {"generated_text": prompt_text + text}
    # A conversation: the reply as a new assistant message, or appended to the prefilled one.
    cont = p["continue_final_message"]
    if cont is None:
      cont = prompt_text[-1]["role"] == "assistant"
    if cont:
      last = prompt_text[-1]
      return {"generated_text": prompt_text[:-1] + [{"role": last["role"],
                                                       "content": last["content"] + text}]}
    return {"generated_text": prompt_text + [{"role": "assistant", "content": text}]}
