"""Extractive question answering with transformers v4's QuestionAnsweringPipeline behaviour.

transformers 5 removed this pipeline; flaxhf keeps its outputs ({"score", "start", "end", "answer"})
and scoring, on the windowed features of `flaxhf.qa.prepare_qa_features`.
"""

import collections

import numpy as np

from flaxhf import qa
from flaxhf.pipelines.base import Pipeline


def _examples(args, kwargs):
  """([(question, context)], whether one example was given) from any v4 calling convention."""
  question, context = kwargs.pop("question", None), kwargs.pop("context", None)
  if len(args) == 2 and all(isinstance(a, str) for a in args):
    question, context = args
  elif len(args) == 1:
    items = args[0]
    single = isinstance(items, dict)
    items = [items] if single else list(items) if isinstance(items, (list, tuple)) else None
    if not items or not all(isinstance(x, dict) for x in items):
      raise ValueError("Question answering takes {'question': ..., 'context': ...} dicts (or a list of "
                       "them), two strings (question, context), or question=..., context=....")
    for item in items:
      missing = {"question", "context"} - set(item)
      if missing:
        raise ValueError(f"A question-answering input needs 'question' and 'context'; {sorted(missing)} "
                         f"missing from {sorted(item)}.")
    return [(x["question"], x["context"]) for x in items], single or len(items) == 1
  elif args:
    raise ValueError(f"Question answering got {len(args)} positional arguments; pass (question, "
                     f"context), a dict, or a list of dicts.")
  if question is None or context is None:
    raise ValueError("Question answering needs both a question and a context: call with "
                     "question=..., context=... (the context is the text the answer is taken from).")
  if isinstance(question, list) and isinstance(context, str):
    pairs = [(q, context) for q in question]
  elif isinstance(question, list) and isinstance(context, list):
    if len(question) != len(context):
      raise ValueError(f"Got {len(question)} questions and {len(context)} contexts; they must pair up.")
    pairs = list(zip(question, context))
  elif isinstance(question, str) and isinstance(context, str):
    pairs = [(question, context)]
  else:
    raise ValueError(f"question and context must be strings or lists of strings; got "
                     f"{type(question).__name__} and {type(context).__name__}.")
  return pairs, len(pairs) == 1


class QuestionAnsweringPipeline(Pipeline):
  """Finds answer spans of questions in contexts of any length (split into overlapping windows)."""

  task = "question-answering"
  model_task = "question_answering"
  defaults = dict(top_k=1, doc_stride=None, max_answer_len=15, max_seq_len=None, max_question_len=64,
                  handle_impossible_answer=False, align_to_words=True)

  def select_outputs(self, outputs):
    return outputs.start_logits, outputs.end_logits

  def check_params(self, p):
    for name in ("top_k", "max_answer_len", "max_question_len"):
      if not isinstance(p[name], int) or p[name] < 1:
        raise ValueError(f"{name} must be a positive int; got {p[name]!r}.")
    if p["max_seq_len"] is not None and p["max_seq_len"] > self.max_length:
      raise ValueError(f"max_seq_len={p['max_seq_len']} exceeds the model's {self.max_length} positions.")
    max_seq_len, doc_stride = self.window(p)
    if doc_stride > max_seq_len:
      raise ValueError(f"doc_stride ({doc_stride}) is larger than max_seq_len ({max_seq_len}).")

  def window(self, p):
    """(max_seq_len, doc_stride) with v4's defaults: min(model_max_length, 384) and half, <= 128."""
    max_seq_len = p["max_seq_len"] or min(self.tokenizer.model_max_length, 384, self.max_length)
    return max_seq_len, p["doc_stride"] or min(max_seq_len // 2, 128)

  def __call__(self, *args, **kwargs):
    pairs, single = _examples(args, kwargs)
    p = self.call_params(kwargs)
    for q, c in pairs:
      if not isinstance(q, str) or not isinstance(c, str) or not q or not c:
        raise ValueError(f"question and context must be non-empty strings; got {q!r}, {c!r}.")
    features = self.preprocess(pairs, p)
    n = len(features["input_ids"])
    outputs = self.forward([self.model_inputs(features, i) for i in range(n)])
    results = self.postprocess([c for _, c in pairs], features, [o[0] for o in outputs],
                               [o[1] for o in outputs], p)
    return results[0] if single else results

  def preprocess(self, pairs, p):
    """The windowed features (columns) of (question, context) pairs; example ids are positions."""
    max_seq_len, doc_stride = self.window(p)
    # v4 passed questions to the tokenizer as given (no lstrip, unlike run_qa.py).
    return qa.prepare_qa_features(self.tokenizer, [q for q, _ in pairs], [c for _, c in pairs],
                                  max_length=max_seq_len, doc_stride=doc_stride, strip_questions=False,
                                  max_question_len=p["max_question_len"])

  def postprocess(self, contexts, features, start_logits, end_logits, p):
    """Per example: the best answer dict, or a list of them when several (top_k) are kept."""
    by_example = collections.defaultdict(list)
    for i, example_id in enumerate(features["example_id"]):
      by_example[example_id].append(i)
    cls_id = self.tokenizer.cls_token_id
    results = []
    for e, context in enumerate(contexts):
      min_null, answers = 1e6, []  # v4: the null answer scores as its least likely window
      for i in by_example[e]:
        offsets, word_ids = features["offset_mapping"][i], features["word_ids"][i]
        ids = np.asarray(features["input_ids"][i])
        attended = np.asarray(features["attention_mask"][i]) == 1
        candidate = np.array([o is not None for o in offsets]) & attended
        keep = ids == cls_id  # v4 lets CLS into the softmax: its probability is the null score
        starts, ends, scores, null = qa.select_spans(
            np.asarray(start_logits[i])[:len(ids)], np.asarray(end_logits[i])[:len(ids)], candidate,
            keep, top_k=p["top_k"], max_answer_len=p["max_answer_len"])
        if p["handle_impossible_answer"]:
          min_null = min(min_null, null)
        for s, t, score in zip(starts, ends, scores):
          a, b = qa.char_span(offsets, word_ids, s, t, p["align_to_words"])
          answers.append({"score": float(score), "start": a, "end": b, "answer": context[a:b]})
      if p["handle_impossible_answer"]:
        answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
      answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:p["top_k"]]
      results.append(answers[0] if len(answers) == 1 else answers)
    return results
