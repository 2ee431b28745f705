"""flaxhf.metrics against sklearn, scipy, seqeval and the official SQuAD v1.1/v2.0 scripts."""

import collections
import re
import string

import numpy as np
import pytest
import scipy.stats
import seqeval.metrics
import sklearn.metrics as skm
from seqeval.metrics.sequence_labeling import get_entities

from flaxhf import metrics

# The references warn on ill-defined cases (0/0 precision, constant input) that the tests exercise.
pytestmark = pytest.mark.filterwarnings("ignore")

TOL = dict(rtol=0, atol=1e-9)
CORRELATIONS = ((metrics.pearson, scipy.stats.pearsonr), (metrics.spearman, scipy.stats.spearmanr))


def close(got, want):
  np.testing.assert_allclose(got, want, **TOL)


# ------------------------------------------------------------------------------------------------
# Classification and correlation.


def random_classification(rng, num_classes):
  n = int(rng.integers(1, 60))
  labels = rng.integers(0, num_classes, n)
  # Mostly-right predictions, so scores spread over [0, 1] rather than sitting at chance.
  preds = np.where(rng.random(n) < rng.random(), labels, rng.integers(0, num_classes, n))
  return preds, labels


def assert_matches_sklearn(preds, labels, weights=None):
  """Every classification metric equals sklearn's on the same (already unpadded) examples."""
  kw = dict(sample_weight=weights)
  close(metrics.accuracy(preds, labels, weights), skm.accuracy_score(labels, preds, **kw))
  close(metrics.matthews_corrcoef(preds, labels, weights),
        skm.matthews_corrcoef(labels, preds, **kw))
  averages = ["macro", "micro"] + (["binary"] if set(labels) | set(preds) <= {0, 1} else [])
  for average in averages:
    got = [fn(preds, labels, average, weights=weights)
           for fn in (metrics.precision, metrics.recall, metrics.f1)]
    close(got, skm.precision_recall_fscore_support(labels, preds, average=average, **kw)[:3])


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_classification_matches_sklearn(num_classes):
  rng = np.random.default_rng(num_classes)
  for case in range(80):
    preds, labels = random_classification(rng, num_classes)
    weights = rng.uniform(0.1, 3.0, len(labels)) if case % 3 == 0 else None
    assert_matches_sklearn(preds, labels, weights)


def test_classification_degenerate_cases():
  ones, zeros = np.ones(6, int), np.zeros(6, int)
  for preds, labels in ((ones, ones), (zeros, zeros), (ones, zeros), (zeros, ones),
                        ([0, 1, 0, 1], [0, 0, 0, 0]), ([2], [2]), (["b", "a"], ["a", "a"])):
    assert_matches_sklearn(np.asarray(preds), np.asarray(labels))
  assert metrics.matthews_corrcoef(ones, ones) == 0.0  # undefined -> 0, as sklearn


def test_multilabel_matches_sklearn():
  rng = np.random.default_rng(0)
  for _ in range(150):
    # c >= 2: sklearn reads an [n, 1] indicator matrix as a binary class vector, not as one label.
    n, c = int(rng.integers(1, 30)), int(rng.integers(2, 6))
    labels = rng.integers(0, 2, (n, c))
    preds = np.where(rng.random((n, c)) < 0.7, labels, rng.integers(0, 2, (n, c)))
    weights = rng.uniform(0.1, 2.0, n)
    close(metrics.accuracy(preds, labels), skm.accuracy_score(labels, preds))
    close(metrics.accuracy(preds, labels, weights),
          skm.accuracy_score(labels, preds, sample_weight=weights))
    for average in ("micro", "macro"):
      close(metrics.f1(preds, labels, average, weights=weights),
            skm.f1_score(labels, preds, average=average, sample_weight=weights))


def test_weights_drop_padded_examples():
  rng = np.random.default_rng(1)
  for case in range(100):
    preds, labels = random_classification(rng, 2 + case % 3)
    pad = int(rng.integers(1, 10))
    # Padding carries junk (including a class never seen otherwise) that must not leak into scores.
    padded_p, padded_l = np.r_[preds, np.full(pad, 7)], np.r_[labels, rng.integers(0, 9, pad)]
    order = rng.permutation(len(padded_l))
    mask = (np.arange(len(padded_l)) < len(labels))[order]
    padded_p, padded_l = padded_p[order], padded_l[order]
    real_p, real_l = padded_p[mask], padded_l[mask]
    for weights in (mask, mask.astype(np.float32)):
      close(metrics.accuracy(padded_p, padded_l, weights), skm.accuracy_score(real_l, real_p))
      close(metrics.f1(padded_p, padded_l, "macro", weights=weights),
            skm.f1_score(real_l, real_p, average="macro"))
      close(metrics.matthews_corrcoef(padded_p, padded_l, weights),
            skm.matthews_corrcoef(real_l, real_p))
    x, y = rng.normal(size=len(labels) + 2), rng.normal(size=len(labels) + 2)
    keep = np.ones(len(labels) + 2, bool)
    keep[rng.integers(0, len(keep), 2)] = False
    for ours, ref in CORRELATIONS:
      if keep.sum() >= 3:
        close(ours(x, y, keep), ref(x[keep], y[keep])[0])


def test_correlations_match_scipy():
  rng = np.random.default_rng(2)
  for case in range(300):
    n = int(rng.integers(3, 80))
    x = rng.normal(size=n)
    y = x * rng.normal() + rng.normal(size=n) * rng.uniform(0.1, 2)
    if case % 2:  # many ties, as in STS-B's 0-5 labels and rounded predictions
      x, y = np.round(x * 2) / 2, np.round(y)
    for ours, ref in CORRELATIONS:
      want = ref(x, y)[0]
      if np.isnan(want):
        assert np.isnan(ours(x, y))
      else:
        close(ours(x, y), want)
  assert np.isnan(metrics.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
  assert np.isnan(metrics.spearman([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]))
  close(metrics.mean_squared_error([1.0, 2.0, 4.0], [1.0, 3.0, 2.0]), 5 / 3)
  x, y, w = rng.normal(size=20), rng.normal(size=20), rng.uniform(0, 2, 20)
  close(metrics.mean_squared_error(x, y, w), skm.mean_squared_error(y, x, sample_weight=w))


def test_classification_metrics_sets():
  rng = np.random.default_rng(3)
  binary_p, binary_l = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
  logits, three_l = rng.normal(size=(50, 3)), rng.integers(0, 3, 50)
  reg_p, reg_l = rng.normal(size=(50, 1)), rng.uniform(0, 5, 50)
  cm = metrics.classification_metrics
  assert cm("cola", binary_p, binary_l) == {
      "matthews_correlation": skm.matthews_corrcoef(binary_l, binary_p)}
  for task in ("mrpc", "qqp", "QQP"):
    assert cm(task, binary_p, binary_l) == {"accuracy": skm.accuracy_score(binary_l, binary_p),
                                            "f1": skm.f1_score(binary_l, binary_p)}
  for task in ("sst2", "SST-2", "mnli", "mnli_mismatched", "rte"):
    assert cm(task, logits, three_l) == {"accuracy": skm.accuracy_score(three_l, logits.argmax(1))}
  stsb = cm("sts-b", reg_p, reg_l)
  pearson, spearman = (ref(reg_p[:, 0], reg_l)[0] for _, ref in CORRELATIONS)
  assert set(stsb) == {"pearson", "spearmanr", "combined"}
  close([stsb["pearson"], stsb["spearmanr"], stsb["combined"]],
        [pearson, spearman, (pearson + spearman) / 2])
  reg = cm(None, reg_p, reg_l)  # float labels -> regression
  assert set(reg) == {"pearson", "spearmanr", "mse"}
  close(reg["mse"], skm.mean_squared_error(reg_l, reg_p[:, 0]))
  assert cm("imdb", logits, three_l) == {
      "accuracy": skm.accuracy_score(three_l, logits.argmax(1)),
      "f1": skm.f1_score(three_l, logits.argmax(1), average="macro")}
  assert cm(None, binary_p, binary_l, "single_label_classification") == cm("mrpc", binary_p,
                                                                          binary_l)
  multi_p, multi_l = rng.integers(0, 2, (50, 4)), rng.integers(0, 2, (50, 4))
  for problem_type in ("multi_label_classification", None):
    assert cm(None, multi_p, multi_l, problem_type) == {
        "accuracy": skm.accuracy_score(multi_l, multi_p),
        "f1": skm.f1_score(multi_l, multi_p, average="micro")}
  # Ids {0, 2} of a 3-class task are scored with macro F1, not binary (which has no class 1).
  assert cm(None, [0, 2, 2], [2, 0, 2]) == {
      "accuracy": 1 / 3, "f1": skm.f1_score([2, 0, 2], [0, 2, 2], average="macro")}
  # A padded example's junk class must not turn a binary task into a macro one.
  assert cm(None, [0, 1, 5], [1, 1, 5], weights=[1, 1, 0]) == cm(None, [0, 1], [1, 1])
  mask = np.r_[np.ones(40, bool), np.zeros(10, bool)]
  assert cm("mrpc", binary_p, binary_l, weights=mask) == cm("mrpc", binary_p[:40], binary_l[:40])
  with pytest.raises(ValueError, match="problem_type"):
    cm(None, binary_p, binary_l, "ranking")


def test_classification_errors():
  with pytest.raises(ValueError, match="Length mismatch: 3 predictions but 2 labels"):
    metrics.accuracy([0, 1, 1], [0, 1])
  for fn in (metrics.accuracy, metrics.f1, metrics.matthews_corrcoef, metrics.pearson):
    with pytest.raises(ValueError, match="No examples"):
      fn([], [])
    with pytest.raises(ValueError, match="every weight is 0"):
      fn([0.0, 1.0], [1.0, 0.0], weights=[0, 0])
  with pytest.raises(ValueError, match="weights has shape"):
    metrics.accuracy([0, 1], [0, 1], weights=[1, 1, 1])
  with pytest.raises(ValueError, match="binary"):
    metrics.f1([0, 1, 2], [0, 1, 2])
  with pytest.raises(ValueError, match="pos_label"):
    metrics.f1([0, 2], [2, 0])
  with pytest.raises(ValueError, match="average"):
    metrics.f1([0, 1], [0, 1], average="weighted")
  with pytest.raises(ValueError, match="0/1 mask"):
    metrics.spearman([0.0, 1.0, 2.0], [1.0, 0.0, 2.0], weights=[0.5, 1, 1])
  with pytest.raises(ValueError, match="at least 2"):
    metrics.pearson([1.0], [2.0])
  with pytest.raises(ValueError, match="multi-label"):
    metrics.matthews_corrcoef(np.ones((3, 2)), np.ones((3, 2)))


# ------------------------------------------------------------------------------------------------
# Sequence labelling against seqeval.

TYPES = ("PER", "LOC", "MISC")
SCHEMES = ("iob1", "iob2", "ioe", "iobes")


def well_formed_tags(rng, n, scheme):
  """Random entity spans written in `scheme`."""
  tags, prev = [], None
  while len(tags) < n:
    if rng.random() < 0.5:
      tags.append("O")
      prev = None
      continue
    t, length = TYPES[rng.integers(len(TYPES))], int(rng.integers(1, 4))
    if scheme == "iob1":  # B- only where a chunk directly follows one of the same type
      body = ["B" if prev == t else "I"] + ["I"] * (length - 1)
    elif scheme == "iob2":
      body = ["B"] + ["I"] * (length - 1)
    elif scheme == "ioe":
      body = ["I"] * (length - 1) + ["E"]
    else:
      body = ["S"] if length == 1 else ["B"] + ["I"] * (length - 2) + ["E"]
    tags += [f"{p}-{t}" for p in body]
    prev = t
  return tags[:n]


def noisy(rng, tags, rate):
  """Tags with some replaced by any prefix/type, bare B/I/O included: I- after O, type switches."""
  vocab = [f"{p}-{t}" for p in "BIES" for t in TYPES] + ["O", "O", "B", "I"]
  return [vocab[rng.integers(len(vocab))] if rng.random() < rate else t for t in tags]


def random_corpus(rng):
  scheme = SCHEMES[rng.integers(len(SCHEMES))]
  true, pred = [], []
  for _ in range(int(rng.integers(1, 6))):
    n = int(rng.integers(0, 12))
    tags = well_formed_tags(rng, n, scheme)
    true.append(noisy(rng, tags, 0.1 if rng.random() < 0.5 else 0.0))
    pred.append(noisy(rng, tags, rng.uniform(0, 0.6)))
  if not sum(map(len, true)):
    true.append(["O"]), pred.append(["B-PER"])
  return true, pred


def test_seqeval_matches_reference():
  rng = np.random.default_rng(4)
  for _ in range(400):
    true, pred = random_corpus(rng)
    # Chunks directly, since a wrong chunk in one side alone often leaves the counts unchanged.
    for seqs in (true, pred):
      assert metrics._entities(seqs) == get_entities(seqs)
    got = metrics.seqeval_metrics(true, pred)
    close([got["precision"], got["recall"], got["f1"], got["accuracy"]],
          [seqeval.metrics.precision_score(true, pred), seqeval.metrics.recall_score(true, pred),
           seqeval.metrics.f1_score(true, pred), seqeval.metrics.accuracy_score(true, pred)])
    report = seqeval.metrics.classification_report(true, pred, output_dict=True)
    types = {k: v for k, v in report.items() if not k.endswith(" avg")}
    assert set(got) - {"precision", "recall", "f1", "accuracy"} == set(types)
    for name, want in types.items():
      close([got[name]["precision"], got[name]["recall"], got[name]["f1"]],
            [want["precision"], want["recall"], want["f1-score"]])
      assert got[name]["number"] == want["support"]


def test_seqeval_known_example():
  true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
  pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
  got = metrics.seqeval_metrics(true, pred)
  assert (got["precision"], got["recall"], got["f1"], got["accuracy"]) == (0.5, 0.5, 0.5, 0.8)
  assert got["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
  assert got["MISC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1}
  # Lenient chunking: I-PER after O opens a chunk; a type switch inside I- tags splits it.
  got = metrics.seqeval_metrics([["I-PER", "I-PER", "I-LOC"]], [["B-PER", "I-PER", "B-LOC"]])
  assert got["f1"] == 1.0


def test_seqeval_errors():
  with pytest.raises(ValueError, match="Length mismatch"):
    metrics.seqeval_metrics([["O"], ["O"]], [["O"]])
  with pytest.raises(ValueError, match="Sequence 1 has 2 true tags but 1"):
    metrics.seqeval_metrics([["O"], ["O", "O"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="No tags"):
    metrics.seqeval_metrics([[], []], [[], []])
  with pytest.raises(ValueError, match="list of tag sequences"):
    metrics.seqeval_metrics(["B-PER", "O"], ["B-PER", "O"])
  with pytest.raises(ValueError, match="non-empty strings"):
    metrics.seqeval_metrics([["", "O"]], [["O", "O"]])


# ------------------------------------------------------------------------------------------------
# SQuAD: the official scripts, condensed but logically unchanged, as references.


def official_normalize(s):
  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def official_v1_f1(prediction, ground_truth):
  prediction_tokens = official_normalize(prediction).split()
  ground_truth_tokens = official_normalize(ground_truth).split()
  common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(prediction_tokens)
  recall = 1.0 * num_same / len(ground_truth_tokens)
  return (2 * precision * recall) / (precision + recall)


def official_v1(dataset, predictions):
  """evaluate-v1.1.py's evaluate()."""
  f1 = exact_match = total = 0
  for article in dataset:
    for paragraph in article["paragraphs"]:
      for qa in paragraph["qas"]:
        total += 1
        if qa["id"] not in predictions:
          continue
        ground_truths = [x["text"] for x in qa["answers"]]
        prediction = predictions[qa["id"]]
        exact_match += max(official_normalize(prediction) == official_normalize(g)
                           for g in ground_truths)
        f1 += max(official_v1_f1(prediction, g) for g in ground_truths)
  return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def official_v2_f1(a_gold, a_pred):
  gold_toks = official_normalize(a_gold).split() if a_gold else []
  pred_toks = official_normalize(a_pred).split() if a_pred else []
  common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
  num_same = sum(common.values())
  if len(gold_toks) == 0 or len(pred_toks) == 0:
    return int(gold_toks == pred_toks)
  if num_same == 0:
    return 0
  precision = 1.0 * num_same / len(pred_toks)
  recall = 1.0 * num_same / len(gold_toks)
  return (2 * precision * recall) / (precision + recall)


def official_v2_best_thresh(preds, scores, na_probs, qid_to_has_ans):
  num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
  cur_score = best_score = num_no_ans
  best_thresh = 0.0
  for qid in sorted(na_probs, key=lambda k: na_probs[k]):
    if qid not in scores:
      continue
    if qid_to_has_ans[qid]:
      diff = scores[qid]
    else:
      diff = -1 if preds[qid] else 0
    cur_score += diff
    if cur_score > best_score:
      best_score, best_thresh = cur_score, na_probs[qid]
  return 100.0 * best_score / len(scores), best_thresh


def official_v2(dataset, preds, na_probs=None, na_prob_thresh=1.0):
  """evaluate-v2.0.py's main() minus file I/O."""
  qas = [qa for article in dataset for p in article["paragraphs"] for qa in p["qas"]]
  qid_to_has_ans = {qa["id"]: bool(qa["answers"]) for qa in qas}
  exact_raw, f1_raw = {}, {}
  for qa in qas:
    gold_answers = [a["text"] for a in qa["answers"] if official_normalize(a["text"])] or [""]
    a_pred = preds[qa["id"]]
    exact_raw[qa["id"]] = max(int(official_normalize(a) == official_normalize(a_pred))
                              for a in gold_answers)
    f1_raw[qa["id"]] = max(official_v2_f1(a, a_pred) for a in gold_answers)
  probs = na_probs if na_probs is not None else {k: 0.0 for k in preds}

  def thresholded(scores):
    return {q: float(not qid_to_has_ans[q]) if probs[q] > na_prob_thresh else s
            for q, s in scores.items()}

  exact, f1 = thresholded(exact_raw), thresholded(f1_raw)

  def eval_dict(qid_list, prefix=""):
    total = len(qid_list)
    return {prefix + "exact": 100.0 * sum(exact[k] for k in qid_list) / total,
            prefix + "f1": 100.0 * sum(f1[k] for k in qid_list) / total, prefix + "total": total}

  out = eval_dict(list(exact))
  has_ans = [k for k, v in qid_to_has_ans.items() if v]
  no_ans = [k for k, v in qid_to_has_ans.items() if not v]
  if has_ans:
    out.update(eval_dict(has_ans, "HasAns_"))
  if no_ans:
    out.update(eval_dict(no_ans, "NoAns_"))
  if na_probs is not None:
    for name, raw in (("exact", exact_raw), ("f1", f1_raw)):
      out[f"best_{name}"], out[f"best_{name}_thresh"] = official_v2_best_thresh(
          preds, raw, probs, qid_to_has_ans)
  return out


WORDS = ["the", "The", "a", "An", "an", "Paris", "paris,", "U.S.", "1,000", "café", "Café", "straße",
         "東京", "naïve", "—", "“quoted”", "(b)", "o'clock", "an-", "theatre", "another", "...",
         "A.", "ÉCOLE", "école",
         "Ǆemal", "İstanbul", "a\u00a0b", "-", "$5", "the the"]


def random_text(rng, max_words=5):
  words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(0, max_words + 1)))]
  return rng.choice([" ", "  ", "\t", "\n"]).join(words)


def random_squad(rng, no_answer_rate):
  """(predictions, references, SQuAD-format dataset) with varied near-miss predictions."""
  preds, refs = {}, {}
  for i in range(int(rng.integers(1, 15))):
    qid = f"q{i}"
    no_answer = rng.random() < no_answer_rate
    refs[qid] = [] if no_answer else [random_text(rng) for _ in range(rng.integers(1, 4))]
    truth = refs[qid][rng.integers(len(refs[qid]))] if refs[qid] else ""
    kind = rng.integers(5)
    if kind == 0:
      preds[qid] = truth
    elif kind == 1:  # same answer up to case, punctuation, articles and spacing
      preds[qid] = f"The {truth.upper()}!?" if rng.random() < 0.5 else f" ({truth.lower()}) ."
    elif kind == 2:  # partial overlap
      preds[qid] = f"{truth} {random_text(rng, 2)}"
    elif kind == 3:
      preds[qid] = ""
    else:
      preds[qid] = random_text(rng)
  qas = [{"id": q, "answers": [{"text": t} for t in answers]} for q, answers in refs.items()]
  dataset = [{"paragraphs": [{"qas": qas}]}]
  return preds, refs, dataset


def test_squad_v1_matches_official():
  rng = np.random.default_rng(5)
  for case in range(400):
    preds, refs, dataset = random_squad(rng, no_answer_rate=0.0)
    if case % 4 == 0:  # unanswered questions score 0 but still count
      preds.pop(next(iter(preds)))
    preds["not-a-question"] = "ignored"
    got, want = metrics.squad_metrics(preds, refs), official_v1(dataset, preds)
    assert set(got) == set(want)
    close([got["exact_match"], got["f1"]], [want["exact_match"], want["f1"]])
  assert metrics.squad_metrics({"a": "The Café!"}, {"a": ["cafe", "café"]}) == {
      "exact_match": 100.0, "f1": 100.0}
  # v1.1 gives F1 0 when both sides normalise to nothing, although they match exactly.
  assert metrics.squad_metrics({"a": "the"}, {"a": ["A."]}) == {"exact_match": 100.0, "f1": 0.0}


def test_squad_v2_matches_official():
  rng = np.random.default_rng(6)
  for case in range(400):
    preds, refs, dataset = random_squad(rng, no_answer_rate=0.4)
    probs = None
    if case % 3:  # rounded so that ties exercise the official stable sort order
      probs = {q: float(np.round(rng.random(), 1)) for q in rng.permutation(list(preds))}
    threshold = float(rng.choice([1.0, 0.5, 0.0]))
    got = metrics.squad_v2_metrics(preds, refs, probs, threshold)
    want = official_v2(dataset, preds, probs, threshold)
    assert list(got) == list(want)
    close(list(got.values()), list(want.values()))
  assert metrics.squad_v2_metrics({"a": "", "b": "x"}, {"a": [], "b": ["y"]}) == {
      "exact": 50.0, "f1": 50.0, "total": 2, "HasAns_exact": 0.0, "HasAns_f1": 0.0,
      "HasAns_total": 1, "NoAns_exact": 100.0, "NoAns_f1": 100.0, "NoAns_total": 1}


def test_squad_errors():
  for fn in (metrics.squad_metrics, metrics.squad_v2_metrics):
    with pytest.raises(ValueError, match="No references"):
      fn({"a": "x"}, {})
    with pytest.raises(ValueError, match="is a string"):
      fn({"a": "x"}, {"a": "x"})
  with pytest.raises(ValueError, match="no ground-truth answer"):
    metrics.squad_metrics({"a": "x"}, {"a": []})
  with pytest.raises(ValueError, match="no prediction"):
    metrics.squad_v2_metrics({"a": "x"}, {"a": ["x"], "b": []})
  with pytest.raises(ValueError, match="no no-answer probability"):
    metrics.squad_v2_metrics({"a": "x", "b": ""}, {"a": ["x"], "b": []}, {"a": 0.1})
