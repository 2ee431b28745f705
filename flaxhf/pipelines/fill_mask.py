"""Masked-token filling, as transformers' FillMaskPipeline."""

import logging

import numpy as np

from flaxhf.pipelines.base import Pipeline, as_list
from flaxhf.pipelines.text_classification import softmax

log = logging.getLogger("flaxhf")


class FillMaskPipeline(Pipeline):
  """Proposes tokens for each mask token: {"score", "token", "token_str", "sequence"} dicts."""

  task = "fill-mask"
  model_task = "masked_lm"
  defaults = dict(top_k=5, targets=None, truncation=False, max_length=None, tokenizer_kwargs=None)

  def check_params(self, p):
    if self.tokenizer.mask_token_id is None:
      raise ValueError(f"{type(self.tokenizer).__name__} defines no mask token; fill-mask needs one.")
    if not isinstance(p["top_k"], int) or p["top_k"] < 1:
      raise ValueError(f"top_k must be a positive int; got {p['top_k']!r}.")
    p["target_ids"] = None if p["targets"] is None else self.target_ids(p["targets"])

  def _merge(self, base, params):
    base = {k: v for k, v in base.items() if k != "target_ids"}  # derived; recomputed per call
    return super()._merge(base, params)

  def target_ids(self, targets):
    """Vocabulary ids of `targets`; a word outside the vocabulary maps to its first token (warned)."""
    vocab = self.tokenizer.get_vocab()
    ids = []
    for target in [targets] if isinstance(targets, str) else targets:
      id_ = vocab.get(target)
      if id_ is None:
        pieces = self.tokenizer(target, add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False, max_length=1, truncation=True)["input_ids"]
        if not pieces:
          log.warning("Target %r is not in the vocabulary and has no tokens; ignoring it.", target)
          continue
        id_ = pieces[0]
        log.warning("Target %r is not in the vocabulary; using %r instead.", target,
                    self.tokenizer.convert_ids_to_tokens(id_))
      ids.append(id_)
    ids = list(set(ids))  # transformers' order: the set's, ties between targets break the same way
    if not ids:
      raise ValueError("targets= named no usable token.")
    return np.array(ids)

  def __call__(self, inputs, **kwargs):
    p = self.call_params(kwargs)
    texts, single = as_list(inputs)
    tok_kwargs = {"truncation": p["truncation"], **(p["tokenizer_kwargs"] or {})}  # transformers' name
    if p["max_length"] is not None:
      tok_kwargs["max_length"] = p["max_length"]
    features = [self.model_inputs(self.tokenizer(text, **tok_kwargs)) for text in texts]
    for text, f in zip(texts, features):
      if self.tokenizer.mask_token_id not in f["input_ids"]:
        raise ValueError(f"No mask token ({self.tokenizer.mask_token}) in the input {text!r}.")
    results = [self.postprocess(f["input_ids"], logits, p)
               for f, logits in zip(features, self.forward(features))]
    return results[0] if single or len(results) == 1 else results

  def postprocess(self, input_ids, logits, p):
    """The top_k proposals per mask token (a flat list when the input has one mask)."""
    input_ids = np.asarray(input_ids)
    target_ids = p["target_ids"]
    top_k = p["top_k"] if target_ids is None else min(p["top_k"], len(target_ids))
    masked = np.nonzero(input_ids == self.tokenizer.mask_token_id)[0]
    probs = softmax(np.asarray(logits, np.float32)[masked])
    if target_ids is not None:
      probs = probs[:, target_ids]
    single_mask = len(masked) == 1
    result = []
    for m, row in zip(masked, probs):
      top = np.argsort(-row, kind="stable")[:top_k]
      proposals = []
      for k in top:
        token = int(k if target_ids is None else target_ids[k])
        tokens = input_ids.copy()
        tokens[m] = token
        tokens = tokens[tokens != self.tokenizer.pad_token_id]
        # With several masks the other mask tokens stay visible, so specials are kept (transformers).
        sequence = self.tokenizer.decode(tokens, skip_special_tokens=single_mask)
        proposals.append({"score": float(row[k]), "token": token,
                          "token_str": self.tokenizer.decode([token]), "sequence": sequence})
      result.append(proposals)
    return result[0] if single_mask else result
