"""Shared pipeline machinery: parameter checks, batching, and one jitted forward per padded shape."""

from typing import Any, Dict, List

import jax
import numpy as np


class Pipeline:
  """Tokenize -> batched jitted forward -> postprocess; call parameters default to the constructor's."""

  task = ""
  model_task = ""    # the flaxhf head the pipeline runs (FlaxPreTrainedModel.task)
  per_token = True   # outputs have a length axis, cut back to each input's length
  defaults: Dict[str, Any] = {}
  too_long_hint = "Pass truncation=True to cut inputs to the model's length."

  def __init__(self, model, tokenizer, batch_size: int = 8, pad_to_multiple_of: int = 16, **params):
    if model.task != self.model_task:
      raise ValueError(f"The {self.task!r} pipeline runs a {self.model_task} head; got "
                       f"{type(model).__name__}. Load it with the matching flaxhf.FlaxAutoModelFor... "
                       f"class, or pass the model folder as model=.")
    if batch_size < 1 or pad_to_multiple_of < 1:
      raise ValueError(f"batch_size and pad_to_multiple_of must be >= 1; got {batch_size}, "
                       f"{pad_to_multiple_of}.")
    if len(tokenizer) > model.config.vocab_size:
      raise ValueError(f"The tokenizer has {len(tokenizer)} tokens but the model embeds "
                       f"{model.config.vocab_size}: they do not belong together.")
    self.model, self.tokenizer = model, tokenizer
    self.batch_size, self.pad_to_multiple_of = batch_size, pad_to_multiple_of
    self.params = self._merge(self.defaults, params)
    # One compiled program per (rows, padded length) bucket; params are an argument, not a constant.
    self._forward_fn = jax.jit(lambda p, batch: self.select_outputs(self.model(**batch, params=p)))
    self._shapes = set()  # the (rows, padded length) shapes the forward has run at

  def _merge(self, base, params):
    unknown = sorted(set(params) - set(self.defaults))
    if unknown:
      raise TypeError(f"The {self.task!r} pipeline got unknown argument(s) {unknown}; it takes "
                      f"{sorted(self.defaults)} (and batch_size, pad_to_multiple_of when built).")
    merged = {**base, **params}
    self.check_params(merged)
    return merged

  def call_params(self, kwargs) -> Dict[str, Any]:
    """The constructor's parameters overridden by this call's, checked."""
    return self._merge(self.params, kwargs)

  def check_params(self, params):
    """Raises on invalid parameter values (subclasses)."""

  def select_outputs(self, outputs):
    return outputs.logits

  @property
  def max_length(self) -> int:
    """The most tokens the model's position embeddings take."""
    c = self.model.config
    offset = c.pad_token_id + 1 if c.model_type == "roberta" else 0  # RoBERTa counts from pad + 1
    return c.max_position_embeddings - offset

  def model_inputs(self, encoding, i=None) -> Dict[str, list]:
    """The model's inputs of one sequence (row `i` of a batched encoding) as lists."""
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if self.model.uses_token_type_ids else [])
    return {k: list(encoding[k] if i is None else encoding[k][i]) for k in names if k in encoding}

  def forward(self, features: List[Dict[str, list]]) -> List[Any]:
    """Runs the model on every feature (dicts of token lists), returning numpy outputs per feature."""
    lengths = [len(f["input_ids"]) for f in features]
    too_long = max(lengths, default=0)
    if too_long > self.max_length:
      raise ValueError(f"An input has {too_long} tokens but the model takes at most {self.max_length}. "
                       f"{self.too_long_hint}")
    results = [None] * len(features)
    order = np.argsort(lengths, kind="stable")  # similar lengths share a batch: less padding
    pad_id = self.tokenizer.pad_token_id or 0
    for b in range(0, len(order), self.batch_size):
      idx = order[b:b + self.batch_size]
      rows = min(self.batch_size, 1 << (len(idx) - 1).bit_length())  # few distinct batch shapes
      longest = max(lengths[i] for i in idx)
      m = self.pad_to_multiple_of
      length = max(longest, min(-(-longest // m) * m, self.max_length))
      batch = {"input_ids": np.full((rows, length), pad_id, np.int32),
               "attention_mask": np.zeros((rows, length), np.int32)}
      batch["attention_mask"][:, 0] = 1  # filler rows attend somewhere: no NaNs to look at
      if self.model.uses_token_type_ids:
        batch["token_type_ids"] = np.zeros((rows, length), np.int32)
      for row, i in enumerate(idx):
        n = lengths[i]
        batch["attention_mask"][row] = 0
        for k, v in features[i].items():
          if k in batch:
            batch[k][row, :n] = v
        if "attention_mask" not in features[i]:
          batch["attention_mask"][row, :n] = 1
      self._shapes.add(batch["input_ids"].shape)
      out = jax.device_get(self._forward_fn(self.model.params, batch))
      for row, i in enumerate(idx):
        cut = (lambda x, r=row, n=lengths[i]: x[r, :n]) if self.per_token else (lambda x, r=row: x[r])
        results[i] = jax.tree_util.tree_map(cut, out)
    return results

  def compiled_shapes(self) -> int:
    """How many shapes the forward has been compiled for (one per batch rows x padded length)."""
    return len(self._shapes)


def as_list(inputs, kind=str):
  """(list of inputs, whether one input was given) for a single `kind` or a list of them."""
  if isinstance(inputs, kind):
    return [inputs], True
  if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, kind) for x in inputs):
    return list(inputs), False
  got = type(inputs).__name__
  if isinstance(inputs, (list, tuple)):
    got += f" of {sorted({type(x).__name__ for x in inputs})}" if inputs else " (empty)"
  raise ValueError(f"Expected a {kind.__name__} or a non-empty list of them; got {got}.")
