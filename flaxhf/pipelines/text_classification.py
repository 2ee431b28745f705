"""Text classification ("sentiment-analysis"), as transformers' TextClassificationPipeline."""

import numpy as np

from flaxhf.pipelines.base import Pipeline

_FUNCTIONS = ("softmax", "sigmoid", "none")
_UNSET = "unset"  # top_k not given: transformers' legacy output (one best label per text)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class TextClassificationPipeline(Pipeline):
  """Labels texts or text pairs ({"text", "text_pair"}) with {"label", "score"} dicts."""

  task = "text-classification"
  model_task = "sequence_classification"
  per_token = False
  defaults = dict(top_k=_UNSET, function_to_apply=None, truncation=False, max_length=None)

  def check_params(self, p):
    fn = p["function_to_apply"]
    if fn is not None and str(getattr(fn, "value", fn)).lower() not in _FUNCTIONS:
      raise ValueError(f"function_to_apply must be one of {_FUNCTIONS}; got {fn!r}.")
    if p["top_k"] not in (_UNSET, None) and (not isinstance(p["top_k"], int) or p["top_k"] < 1):
      raise ValueError(f"top_k must be a positive int or None (all labels); got {p['top_k']!r}.")

  def function_for(self, fn):
    """The score function: the given one, else transformers' pick by problem_type and num_labels."""
    if fn is not None:
      return str(getattr(fn, "value", fn)).lower()
    c = self.model.config
    if c.problem_type == "regression":
      return "none"
    if c.problem_type == "multi_label_classification" or c.num_labels == 1:
      return "sigmoid"
    if c.problem_type == "single_label_classification" or c.num_labels > 1:
      return "softmax"
    return "none"

  def __call__(self, inputs, **kwargs):
    p = self.call_params(kwargs)
    single = isinstance(inputs, (str, dict))
    items = [inputs] if single else list(inputs)
    if not items:
      raise ValueError("Expected a text, a {'text', 'text_pair'} dict, or a non-empty list of them.")
    tok_kwargs = {"truncation": p["truncation"]}
    if p["max_length"] is not None:
      tok_kwargs["max_length"] = p["max_length"]
    features = []
    for item in items:
      if isinstance(item, dict):
        if set(item) - {"text", "text_pair"} or "text" not in item:
          raise ValueError(f"A text pair is a dict with keys 'text' and 'text_pair'; got {sorted(item)}.")
        enc = self.tokenizer(item["text"], item.get("text_pair"), **tok_kwargs)
      elif isinstance(item, str):
        enc = self.tokenizer(item, **tok_kwargs)
      else:
        raise ValueError(f"Expected a text or a {{'text', 'text_pair'}} dict; got {type(item).__name__}. "
                         "Send text pairs as dicts.")
      features.append(self.model_inputs(enc))
    results = [self.postprocess(logits, p) for logits in self.forward(features)]
    if not single:
      return results
    # transformers: a text gives a list (of its best label, or of the top_k); a text pair does not.
    return results if p["top_k"] == _UNSET and isinstance(inputs, str) else results[0]

  def postprocess(self, logits, p):
    """Scores and labels of one text's logits."""
    logits = np.asarray(logits, np.float32)
    fn = self.function_for(p["function_to_apply"])
    scores = {"softmax": softmax, "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "none": lambda x: x}[fn](logits)
    id2label = self.model.config.id2label
    if p["top_k"] == _UNSET:
      best = int(scores.argmax())
      return {"label": id2label[best], "score": float(scores[best])}
    ranked = sorted(({"label": id2label[i], "score": float(s)} for i, s in enumerate(scores)),
                    key=lambda d: d["score"], reverse=True)
    return ranked if p["top_k"] is None else ranked[:p["top_k"]]
