"""Extractive question answering, framework-free (numpy): windowed features and span decoding.

Two decoders over the same features:
- `postprocess_qa_predictions`: HF examples/pytorch/question-answering/utils_qa.py (summed logits, n-best,
  SQuAD v2 null threshold), for evaluation scripts.
- `select_spans` + `char_span`: the transformers-v4 QuestionAnsweringPipeline scoring (outer product of
  start/end probabilities), which `flaxhf.pipeline("question-answering")` uses.
"""

import collections
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np


def _check_fast(tokenizer):
  if not getattr(tokenizer, "is_fast", False):
    raise ValueError(f"{type(tokenizer).__name__} is a slow tokenizer: question answering needs offset "
                     "mappings, which only fast (Rust) tokenizers give. Load it with use_fast=True.")


def truncate_question(tokenizer, question: str, max_question_len: int) -> str:
  """Cuts `question` after its first `max_question_len` tokens (so the context keeps room)."""
  enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
  offsets = enc["offset_mapping"]
  return question if len(offsets) <= max_question_len else question[:offsets[max_question_len - 1][1]]


def prepare_qa_features(tokenizer, questions: Sequence[str], contexts: Sequence[str],
                        max_length: int = 384, doc_stride: int = 128,
                        example_ids: Optional[Sequence[Any]] = None, pad_to_max_length: bool = False,
                        strip_questions: bool = True,
                        max_question_len: Optional[int] = None) -> Dict[str, list]:
  """Tokenizes (question, context) pairs into overlapping windows, like run_qa.py's validation features.

  Returns columns (one entry per window): the tokenizer's model inputs, `example_id` (from
  `example_ids`, default the example's position), `offset_mapping` with character offsets into the
  context for context tokens and None elsewhere, and `word_ids` (context word index, None elsewhere).
  A tokenizer padding on the left gets (context, question) order, truncating the context, as HF does.
  """
  _check_fast(tokenizer)
  questions, contexts = list(questions), list(contexts)
  if len(questions) != len(contexts):
    raise ValueError(f"Got {len(questions)} questions and {len(contexts)} contexts; they must pair up.")
  example_ids = list(range(len(questions))) if example_ids is None else list(example_ids)
  if strip_questions:  # run_qa.py: long leading whitespace would eat the window otherwise
    questions = [q.lstrip() for q in questions]
  if max_question_len is not None:
    questions = [truncate_question(tokenizer, q, max_question_len) for q in questions]
  pad_on_right = tokenizer.padding_side == "right"
  # A window holds max_length minus the question and specials; when a context overflows, the stride
  # must leave its window room to move (the Rust tokenizer panics, uncatchably, otherwise).
  specials = tokenizer.num_special_tokens_to_add(pair=True)
  lengths = tokenizer(questions + contexts, add_special_tokens=False,
                      verbose=False)["input_ids"]  # whole contexts: no "too long" warning
  for q_ids, c_ids in zip(lengths[:len(questions)], lengths[len(questions):]):
    room = max_length - len(q_ids) - specials
    if len(q_ids) + len(c_ids) + specials > max_length and room <= doc_stride:
      raise ValueError(f"doc_stride={doc_stride} leaves no room for the context: windows of "
                       f"max_length={max_length} hold {room} context tokens next to a question of "
                       f"{len(q_ids)} tokens. Lower doc_stride or max_question_len, or raise max_length.")
  enc = tokenizer(questions if pad_on_right else contexts, contexts if pad_on_right else questions,
                  truncation="only_second" if pad_on_right else "only_first", max_length=max_length,
                  stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                  padding="max_length" if pad_to_max_length else False)
  sample_mapping = enc.pop("overflow_to_sample_mapping")
  context_index = 1 if pad_on_right else 0
  features = {k: list(v) for k, v in enc.items()}
  features["example_id"], features["word_ids"] = [], []
  for i, offsets in enumerate(features["offset_mapping"]):
    in_context = [s == context_index for s in enc.sequence_ids(i)]
    features["example_id"].append(example_ids[sample_mapping[i]])
    features["offset_mapping"][i] = [tuple(o) if c else None for o, c in zip(offsets, in_context)]
    features["word_ids"].append([w if c else None for w, c in zip(enc.word_ids(i), in_context)])
  return features


def _rows(table) -> List[dict]:
  """Rows of a table given as a list of dicts, a dict of columns, or a datasets.Dataset."""
  if isinstance(table, dict):
    keys = list(table)
    return [dict(zip(keys, values)) for values in zip(*(table[k] for k in keys))]
  return [dict(row) for row in table]


def postprocess_qa_predictions(examples, features, start_logits, end_logits, n_best_size: int = 20,
                               max_answer_length: int = 30, version_2_with_negative: bool = False,
                               null_score_diff_threshold: float = 0.0) -> Tuple[dict, dict]:
  """Answers from per-window logits, exactly as HF's utils_qa.postprocess_qa_predictions.

  `examples` have "id" and "context"; `features` come from `prepare_qa_features` (or any rows with
  "example_id" and "offset_mapping"); `start_logits[i]`/`end_logits[i]` belong to feature i (padding
  past its offsets is ignored). Returns ({example id: answer text}, {example id: n-best list}); each
  n-best entry has "text", "start"/"end" (character span in the context), "probability",
  "start_logit" and "end_logit". With `version_2_with_negative` the answer is "" when the null score
  beats the best span by more than `null_score_diff_threshold`.
  """
  examples, features = _rows(examples), _rows(features)
  if len(start_logits) != len(features) or len(end_logits) != len(features):
    raise ValueError(f"Got {len(start_logits)} start and {len(end_logits)} end logit rows for "
                     f"{len(features)} features; they must match one to one.")
  example_index = {ex["id"]: i for i, ex in enumerate(examples)}
  features_per_example = collections.defaultdict(list)
  for i, feature in enumerate(features):
    features_per_example[example_index[feature["example_id"]]].append(i)

  all_predictions, all_nbest = collections.OrderedDict(), collections.OrderedDict()
  for ex_i, example in enumerate(examples):
    min_null, prelim = None, []
    for f_i in features_per_example[ex_i]:
      starts, ends = np.asarray(start_logits[f_i]), np.asarray(end_logits[f_i])
      offsets = features[f_i]["offset_mapping"]
      max_context = features[f_i].get("token_is_max_context")
      null_score = starts[0] + ends[0]  # the first token (CLS) stands for "no answer"
      if min_null is None or min_null["score"] > null_score:
        min_null = {"offsets": (0, 0), "score": null_score, "start_logit": starts[0],
                    "end_logit": ends[0]}
      start_indexes = np.argsort(starts)[-1:-n_best_size - 1:-1].tolist()
      end_indexes = np.argsort(ends)[-1:-n_best_size - 1:-1].tolist()
      for s in start_indexes:
        for e in end_indexes:
          if (s >= len(offsets) or e >= len(offsets) or offsets[s] is None or len(offsets[s]) < 2
              or offsets[e] is None or len(offsets[e]) < 2):
            continue  # outside the context, or padding
          if e < s or e - s + 1 > max_answer_length:
            continue
          if max_context is not None and not max_context.get(str(s), False):
            continue
          prelim.append({"offsets": (offsets[s][0], offsets[e][1]), "score": starts[s] + ends[e],
                         "start_logit": starts[s], "end_logit": ends[e]})
    if version_2_with_negative and min_null is not None:
      prelim.append(min_null)
      null_score = min_null["score"]
    predictions = sorted(prelim, key=lambda p: p["score"], reverse=True)[:n_best_size]
    if (version_2_with_negative and min_null is not None
        and not any(p["offsets"] == (0, 0) for p in predictions)):
      predictions.append(min_null)  # keep the null answer even when it ranks below the n best

    context = example["context"]
    for pred in predictions:
      pred["start"], pred["end"] = (int(o) for o in pred.pop("offsets"))
      pred["text"] = context[pred["start"]:pred["end"]]
    if not predictions or (len(predictions) == 1 and predictions[0]["text"] == ""):
      # utils_qa's guard for an example without any valid span: a placeholder, never a crash.
      predictions.insert(0, {"text": "empty", "start": 0, "end": 0, "start_logit": 0.0,
                             "end_logit": 0.0, "score": 0.0})
    scores = np.array([p.pop("score") for p in predictions])
    probs = np.exp(scores - np.max(scores))
    probs /= probs.sum()
    for prob, pred in zip(probs, predictions):
      pred["probability"] = prob

    if not version_2_with_negative:
      all_predictions[example["id"]] = predictions[0]["text"]
    else:
      best = next(p for p in predictions if p["text"] != "")
      score_diff = null_score - best["start_logit"] - best["end_logit"]
      all_predictions[example["id"]] = "" if score_diff > null_score_diff_threshold else best["text"]
    all_nbest[example["id"]] = [
        {k: float(v) if isinstance(v, (np.floating, float)) else v for k, v in p.items()}
        for p in predictions]
  return all_predictions, all_nbest


def select_spans(start_logits, end_logits, candidate_mask, keep_mask=None, top_k: int = 1,
                 max_answer_len: int = 15) -> Tuple[np.ndarray, np.ndarray, np.ndarray, float]:
  """One window's best spans as transformers v4's QuestionAnsweringPipeline scores them.

  `candidate_mask[t]` is True where token t may be in the answer (context tokens); `keep_mask` also
  lets other tokens (CLS, as v4 does) into the softmax. Probabilities are softmaxes over the kept
  tokens; a span's score is p_start * p_end, with end >= start and at most `max_answer_len` tokens.
  Returns (starts, ends, scores, null_score), where null_score = p_start[0] * p_end[0].
  """
  candidate_mask = np.asarray(candidate_mask, bool)
  keep = candidate_mask if keep_mask is None else candidate_mask | np.asarray(keep_mask, bool)
  probs = []
  for logits in (start_logits, end_logits):
    logits = np.where(keep, np.asarray(logits, np.float32), -10000.0)  # v4's mask value
    p = np.exp(logits - logits.max())
    probs.append(p / p.sum())
  p_start, p_end = probs
  null_score = float(p_start[0] * p_end[0])
  p_start[0] = p_end[0] = 0.0  # v4: the first token is only the null answer, never a span
  # Scores of every (start, end): upper triangle, band of width max_answer_len (DrQA-style decoding).
  candidates = np.tril(np.triu(np.outer(p_start, p_end)), max_answer_len - 1)
  flat = candidates.ravel()
  if top_k == 1:
    order = np.array([np.argmax(flat)])
  elif len(flat) <= top_k:
    order = np.argsort(-flat)
  else:
    order = np.argpartition(-flat, top_k)[:top_k]
    order = order[np.argsort(-flat[order])]
  starts, ends = np.unravel_index(order, candidates.shape)
  ok = candidate_mask[starts] & candidate_mask[ends]
  starts, ends = starts[ok], ends[ok]
  return starts, ends, candidates[starts, ends], null_score


def char_span(offsets, word_ids, start: int, end: int, align_to_words: bool = True) -> Tuple[int, int]:
  """The context character span of tokens start..end, widened to whole words like v4's pipeline."""
  if not align_to_words or word_ids[start] is None or word_ids[end] is None:
    return int(offsets[start][0]), int(offsets[end][1])
  # The window's tokens of the first and last word (a word cut by the window keeps its visible part).
  first = min(t for t, w in enumerate(word_ids) if w == word_ids[start])
  last = max(t for t, w in enumerate(word_ids) if w == word_ids[end])
  return int(offsets[first][0]), int(offsets[last][1])
