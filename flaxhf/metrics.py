"""Evaluation metrics in plain numpy/Python: GLUE-style classification, seqeval NER, SQuAD v1.1/v2.

Each function reproduces its usual reference (sklearn, scipy, seqeval, the official SQuAD scripts)
to float precision, so scores compare with published numbers without those packages at run time.
Classification metrics take `weights`: examples with weight 0 (padding) are dropped before anything
is computed, so the result equals the reference run on the unpadded examples.
Generated-text metrics (BLEU, chrF, ROUGE) are the exception: the last section wraps sacrebleu and
rouge-score themselves, so the scores are those packages' own.
"""

import collections
import logging
import re
import string
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Classification and regression.


def _select(preds, labels, weights=None, mask_only=False):
  """Checks that preds and labels match and drops weight-0 (padded) examples."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.ndim == 0 or labels.ndim == 0:
    raise ValueError("preds and labels must be arrays with one entry per example, not scalars.")
  if len(preds) != len(labels):
    raise ValueError(f"Length mismatch: {len(preds)} predictions but {len(labels)} labels.")
  if weights is not None:
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(labels),):
      raise ValueError(f"weights has shape {weights.shape}; expected ({len(labels)},), one per "
                       "example.")
    if (weights < 0).any() or not np.isfinite(weights).all():
      raise ValueError("weights must be finite and non-negative.")
    if mask_only and not np.isin(weights, (0.0, 1.0)).all():
      raise ValueError("Correlations take a 0/1 mask as weights, not fractional weights.")
    keep = weights != 0
    preds, labels, weights = preds[keep], labels[keep], weights[keep]
  if len(labels) == 0:
    raise ValueError("No examples to score (empty inputs, or every weight is 0).")
  return preds, labels, weights


def _class_sums(preds, labels, weights):
  """Per-class (classes, true positives, predicted counts, true counts), weighted."""
  if labels.ndim == 2:
    # Multi-label indicator matrices: every column is its own binary problem.
    if preds.shape != labels.shape:
      raise ValueError(f"Multi-label preds {preds.shape} and labels {labels.shape} differ.")
    p, t = preds.astype(bool), labels.astype(bool)
    w = np.ones(len(t)) if weights is None else weights
    return np.arange(t.shape[1]), w @ (p & t), w @ p, w @ t
  if preds.ndim != 1 or labels.ndim != 1:
    raise ValueError(f"Expected 1-D class ids; got preds {preds.shape} and labels {labels.shape}.")
  classes = np.union1d(labels, preds)
  p_idx, t_idx = np.searchsorted(classes, preds), np.searchsorted(classes, labels)

  def count(idx, w):
    return np.bincount(idx, w, minlength=len(classes)).astype(np.float64)

  hit = p_idx == t_idx
  w_hit = None if weights is None else weights[hit]
  return classes, count(t_idx[hit], w_hit), count(p_idx, weights), count(t_idx, weights)


def _divide(num, den):
  """num / den with 0 where den is 0, as sklearn's default zero_division does."""
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  return np.where(den == 0, 0.0, num / np.where(den == 0, 1.0, den))


def _precision_recall_f1(preds, labels, average, pos_label, weights):
  """sklearn's precision_recall_fscore_support for average in {binary, macro, micro}."""
  preds, labels, weights = _select(preds, labels, weights)
  classes, tp, pred_sum, true_sum = _class_sums(preds, labels, weights)
  if average == "binary":
    if labels.ndim == 2 or len(classes) > 2:
      raise ValueError(f"average='binary' needs at most 2 classes, found {classes.tolist()[:10]}; "
                       "use average='macro' or 'micro'.")
    if pos_label not in classes:
      if len(classes) == 2:
        raise ValueError(f"pos_label={pos_label!r} is not one of the classes {classes.tolist()}.")
      return 0.0, 0.0, 0.0  # only the negative class occurs: nothing to find
    keep = classes == pos_label
    tp, pred_sum, true_sum = tp[keep], pred_sum[keep], true_sum[keep]
  elif average == "micro":
    tp, pred_sum, true_sum = tp.sum(), pred_sum.sum(), true_sum.sum()
  elif average != "macro":
    raise ValueError(f"average must be 'binary', 'macro' or 'micro', got {average!r}.")
  # F1 from counts (2tp / (true + pred)) rather than from p and r, as sklearn >= 1.3 does.
  scores = (_divide(tp, pred_sum), _divide(tp, true_sum), _divide(2 * tp, true_sum + pred_sum))
  return tuple(float(np.mean(s)) for s in scores)


def accuracy(preds, labels, weights=None) -> float:
  """Fraction of examples predicted exactly (every label must match for multi-label rows)."""
  preds, labels, weights = _select(preds, labels, weights)
  if preds.shape != labels.shape:
    raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in shape.")
  correct = (preds == labels).reshape(len(labels), -1).all(axis=1)
  return float(np.average(correct, weights=weights))


def precision(preds, labels, average="binary", pos_label=1, weights=None) -> float:
  """Precision like sklearn.metrics.precision_score (0 when nothing is predicted)."""
  return _precision_recall_f1(preds, labels, average, pos_label, weights)[0]


def recall(preds, labels, average="binary", pos_label=1, weights=None) -> float:
  """Recall like sklearn.metrics.recall_score (0 when the class never occurs)."""
  return _precision_recall_f1(preds, labels, average, pos_label, weights)[1]


def f1(preds, labels, average="binary", pos_label=1, weights=None) -> float:
  """F1 like sklearn.metrics.f1_score: binary (pos_label), macro or micro over classes/columns."""
  return _precision_recall_f1(preds, labels, average, pos_label, weights)[2]


def matthews_corrcoef(preds, labels, weights=None) -> float:
  """Matthews correlation (binary or multi-class) like sklearn; 0 when undefined."""
  preds, labels, weights = _select(preds, labels, weights)
  if labels.ndim != 1:
    raise ValueError("matthews_corrcoef takes 1-D class ids; multi-label inputs are not supported.")
  _, tp, pred_sum, true_sum = _class_sums(preds, labels, weights)
  n = true_sum.sum()
  cov_tp = tp.sum() * n - true_sum @ pred_sum
  cov_pp = n**2 - pred_sum @ pred_sum
  cov_tt = n**2 - true_sum @ true_sum
  if cov_pp * cov_tt == 0:
    return 0.0
  return float(cov_tp / np.sqrt(cov_pp * cov_tt))


def _as_vectors(preds, labels, weights):
  """Float64 1-D copies of preds and labels with masked examples removed."""
  preds, labels, _ = _select(preds, labels, weights, mask_only=True)
  x, y = preds.astype(np.float64).reshape(-1), labels.astype(np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"Expected one value per example; got preds {preds.shape} and labels "
                     f"{labels.shape}.")
  if len(x) < 2:
    raise ValueError("A correlation needs at least 2 examples.")
  return x, y


def _pearson(x, y):
  xm, ym = x - x.mean(), y - y.mean()
  nx, ny = np.linalg.norm(xm), np.linalg.norm(ym)
  if nx == 0 or ny == 0:
    return float("nan")  # constant input: undefined, as scipy.stats.pearsonr returns
  return float(np.clip(np.dot(xm / nx, ym / ny), -1.0, 1.0))


def _average_ranks(x):
  """1-based ranks with ties given their mean rank, like scipy.stats.rankdata(method='average')."""
  order = np.argsort(x, kind="stable")
  xs = x[order]
  is_new = np.r_[True, xs[1:] != xs[:-1]]
  starts = np.flatnonzero(is_new)
  ends = np.r_[starts[1:], len(x)]
  ranks = np.empty(len(x))
  ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(is_new) - 1]
  return ranks


def pearson(preds, labels, weights=None) -> float:
  """Pearson correlation like scipy.stats.pearsonr; `weights` is a 0/1 mask; NaN if constant."""
  return _pearson(*_as_vectors(preds, labels, weights))


def spearman(preds, labels, weights=None) -> float:
  """Spearman correlation like scipy.stats.spearmanr (ties get average ranks); 0/1 mask weights."""
  x, y = _as_vectors(preds, labels, weights)
  if np.isnan(x).any() or np.isnan(y).any():
    return float("nan")
  return _pearson(_average_ranks(x), _average_ranks(y))


def mean_squared_error(preds, labels, weights=None) -> float:
  """Weighted mean of (pred - label)^2 over all entries."""
  preds, labels, weights = _select(preds, labels, weights)
  x, y = (a.astype(np.float64).reshape(len(a), -1) for a in (preds, labels))
  if x.shape != y.shape:
    raise ValueError(f"preds {preds.shape} and labels {labels.shape} differ in size per example.")
  return float(np.average(((x - y)**2).mean(axis=1), weights=weights))


# GLUE task name (lower case, without "-" and "_") -> metric set of HF's evaluate/glue.
_GLUE = {"cola": "mcc", "stsb": "corr", "mrpc": "acc_f1", "qqp": "acc_f1", "sst2": "acc",
         "mnli": "acc", "mnlimatched": "acc", "mnlimismatched": "acc", "mnlimm": "acc",
         "qnli": "acc", "rte": "acc", "wnli": "acc", "hans": "acc"}
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")


def _infer_problem_type(preds, labels):
  if labels.ndim == 2:
    return "multi_label_classification"
  if np.issubdtype(labels.dtype, np.floating) and preds.ndim == 1:
    return "regression"
  return "single_label_classification"


def classification_metrics(task: Optional[str], preds, labels, problem_type: Optional[str] = None,
                           weights=None) -> Dict[str, float]:
  """GLUE's metric set for a GLUE task name, else the set for `problem_type` (inferred if None)."""
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.ndim == 2 and preds.shape[1] == 1 and labels.ndim == 1:
    preds = preds[:, 0]  # a regression head's [N, 1] output
  glue = _GLUE.get(re.sub(r"[-_]", "", task.lower())) if task else None
  if problem_type is None:
    problem_type = "regression" if glue == "corr" else _infer_problem_type(preds, labels)
  if problem_type not in PROBLEM_TYPES:
    raise ValueError(f"Unknown problem_type {problem_type!r}; choose one of {PROBLEM_TYPES}.")
  num_classes = None
  if problem_type == "single_label_classification" and preds.ndim == labels.ndim + 1:
    num_classes, preds = preds.shape[-1], preds.argmax(-1)  # logits [N, num_labels] -> class ids
  # Drop padding once, here, so that a padded example's junk class cannot change num_classes.
  preds, labels, weights = _select(preds, labels, weights)
  if glue == "mcc":
    return {"matthews_correlation": matthews_corrcoef(preds, labels, weights)}
  if glue in ("acc", "acc_f1"):
    out = {"accuracy": accuracy(preds, labels, weights)}
    if glue == "acc_f1":
      out["f1"] = f1(preds, labels, "binary", weights=weights)
    return out
  if problem_type == "regression":
    out = {"pearson": pearson(preds, labels, weights),
           "spearmanr": spearman(preds, labels, weights)}
    if glue == "corr":
      return {**out, "combined": (out["pearson"] + out["spearmanr"]) / 2}
    return {**out, "mse": mean_squared_error(preds, labels, weights)}
  if problem_type == "multi_label_classification":
    return {"accuracy": accuracy(preds, labels, weights),
            "f1": f1(preds, labels, "micro", weights=weights)}
  if num_classes is None:
    # Class ids run 0..K-1, so the largest id seen bounds K even when a class is absent.
    num_classes = int(max(preds.max(), labels.max())) + 1
  average = "macro" if num_classes > 2 else "binary"
  return {"accuracy": accuracy(preds, labels, weights),
          "f1": f1(preds, labels, average, weights=weights)}


# --------------------------------------------------------------------------------------------------
# Sequence labelling, as seqeval computes it by default (conlleval chunking, prefix tags).


def _chunk_boundary(prev_tag, tag, prev_type, type_):
  """(a chunk ends before this token, a chunk starts at it): seqeval's end/start_of_chunk."""
  type_changed = prev_type != type_
  ends = (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O")) or
          (prev_tag not in ("O", ".") and type_changed))
  # Lenient: I-/E- after O, E or S (or after another type) opens a new chunk instead of failing.
  starts = (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I")) or
            (tag not in ("O", ".") and type_changed))
  return ends, starts


def _entities(seqs: Sequence[Sequence[str]]):
  """(type, start, end) of every chunk, with sentences joined by an 'O' as seqeval joins them."""
  tags = [t for seq in seqs for t in list(seq) + ["O"]]
  prev_tag, prev_type, begin, chunks = "O", "", 0, []
  for i, chunk in enumerate(tags + ["O"]):
    if not isinstance(chunk, str) or not chunk:
      raise ValueError(f"Tags must be non-empty strings like 'B-PER' or 'O', got {chunk!r}.")
    tag, type_ = chunk[0], chunk[1:].split("-", maxsplit=1)[-1] or "_"
    ends, starts = _chunk_boundary(prev_tag, tag, prev_type, type_)
    if ends:
      chunks.append((prev_type, begin, i - 1))
    if starts:
      begin = i
    prev_tag, prev_type = tag, type_
  return chunks


def _prf_from_counts(tp, n_pred, n_true):
  """seqeval's precision, recall and F1 (F1 from p and r; 0 where undefined)."""
  p, r = (tp / n_pred if n_pred else 0.0), (tp / n_true if n_true else 0.0)
  return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def seqeval_metrics(true_seqs: Sequence[Sequence[str]],
                    pred_seqs: Sequence[Sequence[str]]) -> Dict[str, object]:
  """Overall micro precision/recall/f1, token accuracy and per-type scores, as seqeval's default."""
  if isinstance(true_seqs, str) or isinstance(pred_seqs, str) or any(
      isinstance(s, str) for s in list(true_seqs) + list(pred_seqs)):
    raise ValueError("Expected a list of tag sequences (one list of tags per sentence).")
  if len(true_seqs) != len(pred_seqs):
    raise ValueError(f"Length mismatch: {len(true_seqs)} true sequences but {len(pred_seqs)} "
                     "predicted.")
  for i, (t, p) in enumerate(zip(true_seqs, pred_seqs)):
    if len(t) != len(p):
      raise ValueError(f"Sequence {i} has {len(t)} true tags but {len(p)} predicted tags.")
  n_tokens = sum(len(t) for t in true_seqs)
  if n_tokens == 0:
    raise ValueError("No tags to score (empty inputs).")
  true_ents, pred_ents = collections.defaultdict(set), collections.defaultdict(set)
  for found, seqs in ((true_ents, true_seqs), (pred_ents, pred_seqs)):
    for type_, start, end in _entities(seqs):
      found[type_].add((start, end))
  correct = sum(a == b for t, p in zip(true_seqs, pred_seqs) for a, b in zip(t, p))
  out = {}
  totals = np.zeros(3, np.int64)
  for type_ in sorted(set(true_ents) | set(pred_ents)):
    counts = np.array([len(true_ents[type_] & pred_ents[type_]), len(pred_ents[type_]),
                       len(true_ents[type_])])
    totals += counts
    out[type_] = {**_prf_from_counts(*counts.tolist()), "number": int(counts[2])}
  overall = {**_prf_from_counts(*totals.tolist()), "accuracy": correct / n_tokens}
  if clash := set(out) & set(overall):
    raise ValueError(f"Entity types {sorted(clash)} clash with the overall metric names.")
  return {**overall, **out}


# --------------------------------------------------------------------------------------------------
# SQuAD v1.1 and v2.0: the official evaluation scripts' logic.


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """Lower case, drop ASCII punctuation, the articles a/an/the, and extra whitespace (official)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _token_f1(prediction: str, truth: str, empty_agrees: bool) -> float:
  """Bag-of-tokens F1; v2 (`empty_agrees`) scores an empty answer vs an empty truth as 1."""
  pred_toks, true_toks = normalize_answer(prediction).split(), normalize_answer(truth).split()
  if empty_agrees and (not pred_toks or not true_toks):
    return float(pred_toks == true_toks)
  same = sum((collections.Counter(pred_toks) & collections.Counter(true_toks)).values())
  if same == 0:
    return 0.0
  p, r = same / len(pred_toks), same / len(true_toks)
  return 2 * p * r / (p + r)


def _best_scores(prediction: str, truths: Sequence[str], empty_agrees: bool):
  """(exact match, F1) of one prediction, each the max over the ground truths."""
  norm = normalize_answer(prediction)
  exact = max(float(norm == normalize_answer(t)) for t in truths)
  return exact, max(_token_f1(prediction, t, empty_agrees) for t in truths)


def _check_references(references: Mapping[str, Sequence[str]]):
  if not references:
    raise ValueError("No references to score (empty inputs).")
  for qid, answers in references.items():
    if isinstance(answers, str):
      raise ValueError(f"references[{qid!r}] is a string; expected a list of answer strings.")


def squad_metrics(predictions: Mapping[str, str],
                  references: Mapping[str, Sequence[str]]) -> Dict[str, float]:
  """SQuAD v1.1 exact_match and f1 (x100); questions without a prediction score 0 (official)."""
  _check_references(references)
  missing = [qid for qid in references if qid not in predictions]
  if missing:
    log.warning("%d of %d questions have no prediction and score 0 (e.g. %r).", len(missing),
                len(references), missing[0])
  exact = f1_sum = 0.0
  for qid, truths in references.items():
    if qid in predictions:
      if not truths:
        raise ValueError(f"Question {qid!r} has no ground-truth answer; use squad_v2_metrics.")
      e, f = _best_scores(predictions[qid], truths, empty_agrees=False)
      exact, f1_sum = exact + e, f1_sum + f
  return {"exact_match": 100.0 * exact / len(references), "f1": 100.0 * f1_sum / len(references)}


def _best_threshold(predictions, scores, no_answer_probs, has_answer):
  """(best score x100, threshold) over no-answer thresholds, as the official find_best_thresh."""
  score = best = sum(not has for has in has_answer.values())
  threshold = 0.0
  for qid in sorted(no_answer_probs, key=lambda k: no_answer_probs[k]):
    if qid not in scores:
      continue
    # Raising the threshold past this question answers it: gain its score, or lose the free
    # no-answer credit if it has no answer and the prediction is non-empty.
    score += scores[qid] if has_answer[qid] else -1 if predictions[qid] else 0
    if score > best:
      best, threshold = score, no_answer_probs[qid]
  return 100.0 * best / len(scores), threshold


def squad_v2_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                     no_answer_probs: Optional[Mapping[str, float]] = None,
                     no_answer_threshold: float = 1.0) -> Dict[str, float]:
  """SQuAD v2.0 exact/f1 with HasAns_/NoAns_ splits, and best_* thresholds given no_answer_probs."""
  _check_references(references)
  missing = [qid for qid in references if qid not in predictions]
  if missing:
    raise ValueError(f"{len(missing)} questions have no prediction (e.g. {missing[0]!r}); "
                     "predict '' for no answer.")
  probs = no_answer_probs if no_answer_probs is not None else {qid: 0.0 for qid in predictions}
  if missing := [qid for qid in references if qid not in probs]:
    raise ValueError(f"{len(missing)} questions have no no-answer probability (e.g. "
                     f"{missing[0]!r}).")
  has_answer = {qid: bool(answers) for qid, answers in references.items()}
  raw = {}
  for qid, answers in references.items():
    # Answers that normalise to nothing count as "no answer", whose only correct reply is "".
    truths = [a for a in answers if normalize_answer(a)] or [""]
    raw[qid] = _best_scores(predictions[qid], truths, empty_agrees=True)
  scored = {qid: (float(not has_answer[qid]),) * 2 if probs[qid] > no_answer_threshold else s
            for qid, s in raw.items()}

  def summary(qids: List[str], prefix=""):
    exact, f1_sum = (sum(scored[q][i] for q in qids) for i in (0, 1))
    return {f"{prefix}exact": 100.0 * exact / len(qids), f"{prefix}f1": 100.0 * f1_sum / len(qids),
            f"{prefix}total": len(qids)}

  out = summary(list(references))
  for prefix, wanted in (("HasAns_", True), ("NoAns_", False)):
    if qids := [q for q, has in has_answer.items() if has == wanted]:
      out.update(summary(qids, prefix))
  if no_answer_probs is not None:
    for i, name in enumerate(("exact", "f1")):
      scores = {qid: s[i] for qid, s in raw.items()}
      out[f"best_{name}"], out[f"best_{name}_thresh"] = _best_threshold(predictions, scores, probs,
                                                                        has_answer)
  return out


# --------------------------------------------------------------------------------------------------
# Generated text: BLEU and chrF (sacrebleu), ROUGE (rouge-score). Unlike the metrics above these
# call the reference packages themselves (imported here only, so a version bump touches one place).

# Abbreviations whose period does not end a sentence. nltk's trained English Punkt model (what
# run_summarization's nltk.sent_tokenize loads) needs a download; an untrained PunktSentenceTokenizer
# works offline but splits after every "Mr." and "p.m.". Seeding it with these gives the English
# model's split on such text, with no data files.
SENTENCE_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "mt", "vs", "etc", "e.g", "i.e", "a.m", "p.m",
    "u.s", "u.k", "inc", "ltd", "co", "corp", "dept", "approx", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec"})
_sentence_splitter = None


def split_sentences(text: str) -> List[str]:
  """Sentences of `text` by Punkt (nltk's algorithm) with SENTENCE_ABBREVIATIONS, offline."""
  global _sentence_splitter
  if _sentence_splitter is None:
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    params = PunktParameters()
    params.abbrev_types = set(SENTENCE_ABBREVIATIONS)
    _sentence_splitter = PunktSentenceTokenizer(params)
  return _sentence_splitter.tokenize(text)


def _references(predictions: Sequence[str], references) -> List[List[str]]:
  """References as one list of strings per prediction (a bare string is one reference)."""
  refs = [[r] if isinstance(r, str) else list(r) for r in references]
  if len(refs) != len(predictions):
    raise ValueError(f"Length mismatch: {len(predictions)} predictions but {len(refs)} references.")
  if not refs:
    raise ValueError("No predictions to score.")
  if len({len(r) for r in refs}) > 1:
    raise ValueError("Every prediction needs the same number of references (sacrebleu's layout).")
  return refs


def bleu(predictions: Sequence[str], references) -> Dict[str, float]:
  """sacrebleu's corpus BLEU (13a tokenization, as run_translation's evaluate "sacrebleu") and chrF,
  on detokenized text; `references[i]` is a string or a list of strings."""
  import sacrebleu
  refs = _references(predictions, references)
  streams = [list(r) for r in zip(*refs)]  # sacrebleu wants one stream per reference position
  preds = [p.strip() for p in predictions]
  result = sacrebleu.corpus_bleu(preds, streams)
  return {"bleu": float(result.score), "chrf": float(sacrebleu.corpus_chrf(preds, streams).score),
          "bleu_brevity_penalty": float(result.bp)}


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge(predictions: Sequence[str], references, use_stemmer: bool = True) -> Dict[str, float]:
  """ROUGE-1/2/L/Lsum F-measures x 100 (rouge-score, Porter stemming as run_summarization asks),
  the mean over examples; Lsum sees one sentence per line (split_sentences), as run_summarization
  feeds it. (HF's `evaluate` reports a bootstrap median of the same scores: equal up to its noise.)
  With several references per example, each example takes its best-scoring reference."""
  from rouge_score import rouge_scorer
  refs = _references(predictions, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
  lines = lambda t: "\n".join(split_sentences(t.strip()))  # noqa: E731
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for pred, options in zip(predictions, refs):
    scores = [scorer.score(lines(r), lines(pred)) for r in options]
    for k in ROUGE_TYPES:
      totals[k] += max(s[k].fmeasure for s in scores)
  return {k: 100.0 * v / len(refs) for k, v in totals.items()}
