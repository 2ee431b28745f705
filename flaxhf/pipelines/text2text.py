"""Text-to-text generation, summarization and translation: transformers v4's pipelines (removed in
transformers 5) on flaxhf's compiled `generate`.

They share the text-generation pipeline's argument handling and transformers' rule for pipeline
generation defaults (TextGenerationPipeline.prepare_generate_kwargs); what differs is here: encoder
inputs padded on the tokenizer's side (right for these families), the task's prefix and settings
from config.task_specific_params, and v4's output records.
"""

import enum
import logging

import jax
import numpy as np

from flaxhf.pipelines.base import as_list
from flaxhf.pipelines.text_generation import GENERATION_KEYS, TextGenerationPipeline

log = logging.getLogger("flaxhf")


class ReturnType(enum.Enum):
  TENSORS = 0
  TEXT = 1


# transformers v4's Text2TextGenerationPipeline._default_generation_config (for all three tasks):
# used where neither the call, the task parameters nor the model's generation config set a value.
DEFAULT_GENERATION = dict(max_new_tokens=256, num_beams=4)
# Multi-task families told the task by a text prefix ("translate English to German: ").
PREFIX_FAMILIES = ("t5", "mt5", "umt5")
_NOT_SUPPORTED = {
    "assistant_model": "assisted generation is not supported",
    "assistant_tokenizer": "assisted generation is not supported",
    "padding": "encoder inputs are always padded per batch, on the tokenizer's padding side",
    "num_workers": "there are no workers",
}


def parse_translation_task(task: str):
  """(src, tgt) of a "translation_XX_to_YY" task name, (None, None) for "translation"."""
  if task == "translation":
    return None, None
  parts = task.split("_")
  if len(parts) == 4 and parts[0] == "translation" and parts[2] == "to" and parts[1] and parts[3]:
    return parts[1], parts[3]
  raise ValueError(f"Invalid translation task {task!r}: use 'translation' or 'translation_XX_to_YY' "
                   "(e.g. 'translation_en_to_ro'); for codes with underscores (mBART's en_XX) pass "
                   "src_lang= and tgt_lang=.")


def _return_type(p):
  """The return type one set of arguments asks for (None: not said)."""
  if p.get("return_type") is not None:
    return ReturnType(getattr(p["return_type"], "value", p["return_type"]))
  if p.get("return_tensors") and p.get("return_text"):
    raise ValueError("`return_text` is mutually exclusive with `return_tensors`")
  if p.get("return_tensors") is not None:
    return ReturnType.TENSORS if p["return_tensors"] else ReturnType.TEXT
  if p.get("return_text") is False:
    raise ValueError("return_text=False leaves nothing to return: pass return_tensors=True for the "
                     "token ids.")
  return None


def pad_rows(sequences, rows, pad_id, side="right"):
  """(ids, mask) [rows, longest]: `sequences` padded on `side`, then copies of the first up to `rows`
  (a filler row ends when that one does, so it never lengthens the output)."""
  sequences = list(sequences) + [sequences[0]] * (rows - len(sequences))
  longest = max(len(s) for s in sequences)
  ids = np.full((rows, longest), pad_id, np.int32)
  mask = np.zeros((rows, longest), np.int32)
  for r, s in enumerate(sequences):
    cols = slice(longest - len(s), longest) if side == "left" else slice(0, len(s))
    ids[r, cols], mask[r, cols] = s, 1
  return ids, mask


class Text2TextGenerationPipeline(TextGenerationPipeline):
  """Generates text from text with an encoder-decoder: per input a list of {"generated_text"} (or
  {"generated_token_ids"}) records, as transformers v4's Text2TextGenerationPipeline.

  A list of inputs gives a list of records when each input has one (num_return_sequences=1), else a
  list of lists. Settings apply in v4's order: the call's, the constructor's, the model config's
  task_specific_params[task] (its "prefix" goes before every input), the model's generation config,
  then v4's pipeline defaults max_new_tokens=256, num_beams=4. `batch_size` inputs (default 1)
  go through the encoder together, padded on the tokenizer's side (right for BART, T5, Marian).
  """

  task = "text2text-generation"
  model_task = "seq2seq_lm"
  _not_supported = _NOT_SUPPORTED
  return_name = "generated"
  defaults = dict(return_tensors=None, return_text=None, return_type=None,
                  clean_up_tokenization_spaces=None, truncation=None, prefix=None,
                  stop_sequence=None)

  def __init__(self, model, tokenizer, batch_size: int = 1, seed: int = 0, task=None, **kwargs):
    self.task = task or type(self).task
    if getattr(model, "task", None) == "causal_lm":
      raise ValueError(f"The {self.task!r} pipeline needs an encoder-decoder model (BART, mBART, "
                       f"Marian, T5); {type(model).__name__} is decoder-only: use "
                       f"flaxhf.pipeline('text-generation') with it.")
    super().__init__(model, tokenizer, batch_size=batch_size, seed=seed, **kwargs)
    self._return_type = _return_type(self.params)
    self._generation_defaults = dict(DEFAULT_GENERATION)
    if tokenizer.pad_token_id is not None:
      self._generation_defaults["pad_token_id"] = tokenizer.pad_token_id
    self.task_key = self.find_task_key()
    self.task_prefix, task_generation = self._task_settings(self.task_key)
    # Under the constructor's settings, over the model's generation config: v4 updated the pipeline's
    # copy of the generation config with them. A call's generation_config= replaces both, as in v4.
    self.generate_kwargs = {**task_generation, **self.generate_kwargs}

  def find_task_key(self):
    """The config.task_specific_params entry this pipeline applies."""
    return self.task

  def _task_settings(self, key):
    """(prefix or None, generation settings) from config.task_specific_params[key]."""
    params = dict((getattr(self.model.config, "task_specific_params", None) or {}).get(key) or {})
    prefix = params.pop("prefix", None)
    ignored = sorted(set(params) - GENERATION_KEYS)
    if ignored:  # v4's generation_config.update() dropped them too
      log.warning("config.task_specific_params[%r] sets %s, which are not generation settings: "
                  "ignored.", key, ignored)
    return prefix, {k: v for k, v in params.items() if k in GENERATION_KEYS}

  def prefix(self, p) -> str:
    """The text put before every input: prefix=, else the task's, else config.prefix."""
    for prefix in (p["prefix"], self.task_prefix, getattr(self.model.config, "prefix", None)):
      if prefix is not None:
        return prefix
    return ""

  def encode(self, texts, p):
    """(token ids per input, generate settings the tokenizer implies)."""
    kwargs = self._truncation(p)
    prefix = self.prefix(p)
    return [list(self.tokenizer(prefix + text, **kwargs)["input_ids"]) for text in texts], {}

  def _truncation(self, p):
    if not p["truncation"]:
      return {}
    # Cut to what the encoder embeds, where the tokenizer's own limit is larger.
    limit = self.max_encoder_positions
    if limit is not None and limit < self.tokenizer.model_max_length:
      return {"truncation": p["truncation"], "max_length": limit}
    return {"truncation": p["truncation"]}

  @property
  def max_encoder_positions(self):
    return getattr(self.model, "max_encoder_positions", lambda: None)()

  def __call__(self, inputs, batch_size=None, **kwargs):
    texts, single = as_list(inputs)
    for i, text in enumerate(texts):
      if not text.strip():
        raise ValueError(f"Input {i} is empty ({text!r}): give the text to {self.task_verb}.")
    pipe, gen = self._split(kwargs)
    p = self.call_params(pipe)
    return_type = _return_type(pipe) or self._return_type or ReturnType.TEXT
    batch_size = self.batch_size if batch_size is None else batch_size
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    sources, implied = self.encode(texts, p)
    limit = self.max_encoder_positions
    for i, ids in enumerate(sources):
      if limit is not None and len(ids) > limit:
        raise ValueError(f"Input {i} has {len(ids)} tokens but {type(self.model).__name__} encodes "
                         f"at most {limit}: pass truncation=True to cut it.")
    if p["stop_sequence"] is not None:  # v4: the stop sequence's first token becomes the EOS
      stop = self.tokenizer.encode(p["stop_sequence"], add_special_tokens=False)
      if not stop:
        raise ValueError(f"stop_sequence={p['stop_sequence']!r} has no tokens.")
      if len(stop) > 1:
        log.warning("stop_sequence %r is %d tokens; generation stops at its first, as transformers "
                    "v4 did.", p["stop_sequence"], len(stop))
      gen["eos_token_id"] = stop[0]
    generate_kwargs = self.prepare_generate_kwargs({**implied, **gen})
    rng = generate_kwargs.pop("prng_key", None)
    if rng is None:
      self._rng, rng = jax.random.split(self._rng)
    results = []
    for b in range(0, len(sources), batch_size):
      key = rng if b == 0 else jax.random.fold_in(rng, b)  # the first batch draws with the key given
      for rows in self.generate_batch(sources[b:b + batch_size], batch_size, key, generate_kwargs):
        results.append([self.record(row, return_type, p) for row in rows])
    if single:
      return results[0]
    return [r[0] for r in results] if all(len(r) == 1 for r in results) else results

  @property
  def task_verb(self):
    return {"summary": "summarize", "translation": "translate"}.get(self.return_name, "generate from")

  def generate_batch(self, sources, batch_size, rng, generate_kwargs):
    """[sources, num_return_sequences, length] token ids: the decoder's start token, then generated."""
    pad_id = self.tokenizer.pad_token_id
    if pad_id is None:
      pad_id = self.model.config.pad_token_id or 0
    # Rows padded to a power of two (within batch_size): the decode loop compiles once per row count.
    rows = min(batch_size, 1 << (len(sources) - 1).bit_length())
    ids, mask = pad_rows(sources, rows, pad_id, self.tokenizer.padding_side)
    out = self.model.generate(ids, attention_mask=mask, prng_key=rng, **generate_kwargs)
    sequences = np.asarray(out.sequences)
    return sequences.reshape(rows, sequences.shape[0] // rows, -1)[:len(sources)]

  def record(self, sequence, return_type, p):
    """One output record: the token ids (batched, with the batch's trailing pads), or the text."""
    if return_type == ReturnType.TENSORS:
      return {f"{self.return_name}_token_ids": sequence.tolist()}
    clean = p["clean_up_tokenization_spaces"]
    text = self.tokenizer.decode(sequence.tolist(), skip_special_tokens=True,
                                 clean_up_tokenization_spaces=bool(clean))  # v4's default: False
    return {f"{self.return_name}_text": text}


class SummarizationPipeline(Text2TextGenerationPipeline):
  """Summarizes: per input a list of {"summary_text"} (or {"summary_token_ids"}) records, with
  config.task_specific_params["summarization"] applied (T5's "summarize: " prefix, beams, lengths)."""

  task = "summarization"
  return_name = "summary"


class TranslationPipeline(Text2TextGenerationPipeline):
  """Translates: per input a list of {"translation_text"} (or {"translation_token_ids"}) records.

  The direction comes from src_lang=/tgt_lang= or the task name ("translation_en_to_ro"); it picks
  config.task_specific_params["translation_en_to_ro"] (T5's "translate English to Romanian: "
  prefix). Plain "translation" takes the first translation entry there, as v4 did. Tokenizers that
  set language codes themselves (mBART, NLLB, M2M100) get src_lang/tgt_lang per call and force
  the target language's token first. A single-direction model (Marian) needs no languages.
  """

  task = "translation"
  return_name = "translation"
  defaults = dict(Text2TextGenerationPipeline.defaults, src_lang=None, tgt_lang=None)

  def __init__(self, model, tokenizer, task="translation", **kwargs):
    parse_translation_task(task)
    super().__init__(model, tokenizer, task=task, **kwargs)
    src, tgt = self.langs
    if self.sets_lang_codes:
      if src is None or tgt is None:
        raise ValueError(f"{type(tokenizer).__name__} marks the languages with its own codes: "
                         f"translation needs both src_lang= and tgt_lang= (got {src!r}, {tgt!r}).")
    elif (model.config.model_type in PREFIX_FAMILIES and self.task_prefix is None
          and self.params["prefix"] is None and getattr(model.config, "prefix", None) is None):
      entries = sorted(k for k in self._task_params() if k.startswith("translation"))
      direction = f"{src}->{tgt}" if src or tgt else "no direction"
      raise ValueError(
          f"{type(model).__name__} is told its task by a text prefix, and config."
          f"task_specific_params has none for {self.task_key or 'translation'!r} ({direction}; it "
          f"has {entries or 'no translation entries'}): name a direction it has (e.g. "
          f"task='translation_en_to_de'), or pass prefix= (e.g. prefix='translate English to "
          f"German: ').")

  @property
  def sets_lang_codes(self):
    return getattr(self.tokenizer, "_build_translation_inputs", None) is not None

  def _task_params(self):
    return getattr(self.model.config, "task_specific_params", None) or {}

  def find_task_key(self):
    """translation_{src}_to_{tgt} (src_lang=/tgt_lang= over the task name's), or v4's fallback for
    plain "translation": the config's first translation entry, whose languages it then takes."""
    src, tgt = self.params["src_lang"], self.params["tgt_lang"]
    if src is None and tgt is None:
      src, tgt = parse_translation_task(self.task)
    key = None
    if src is not None and tgt is not None:
      key = f"translation_{src}_to_{tgt}"
    elif src is None and tgt is None:
      key = next((k for k in self._task_params() if k.startswith("translation")), None)
      if key is not None:
        log.warning("'translation' task was used, instead of 'translation_XX_to_YY', defaulting "
                    "to %r", key)
        try:
          src, tgt = parse_translation_task(key)
        except ValueError:
          pass
    self.langs = (src, tgt)
    return key

  def encode(self, texts, p):
    src = p["src_lang"] if p["src_lang"] is not None else self.langs[0]
    tgt = p["tgt_lang"] if p["tgt_lang"] is not None else self.langs[1]
    if not self.sets_lang_codes:
      if (src, tgt) != self.langs:
        raise ValueError(f"src_lang/tgt_lang {src!r}->{tgt!r} differ from this pipeline's direction "
                         f"{self.langs[0]!r}->{self.langs[1]!r}, and {type(self.tokenizer).__name__} "
                         f"takes no language codes: build a pipeline per direction (e.g. "
                         f"task='translation_{src}_to_{tgt}').")
      return super().encode(texts, p)
    prefix, kwargs = self.prefix(p), self._truncation(p)
    sources, forced = [], None
    for text in texts:
      enc = self.tokenizer._build_translation_inputs(prefix + text, return_tensors=None,
                                                     src_lang=src, tgt_lang=tgt, **kwargs)
      sources.append(list(enc["input_ids"]))
      forced = enc.get("forced_bos_token_id", forced)
    return sources, ({} if forced is None else {"forced_bos_token_id": forced})
