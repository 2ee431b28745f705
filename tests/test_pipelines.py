"""flaxhf.pipeline against transformers' pipelines on PyTorch twins of MiniLM, and flaxhf.qa."""

import copy
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

import flaxhf
from engine_utils import count_compiles
from flaxhf import qa

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
MAX_LEN = 64  # the twins' tokenizer model_max_length: long inputs need several windows
TEXTS = ["Angela Merkel visited Washington yesterday with Barack Obama.", "I love Paris!",
         "Tokenization of unbelievably hyphenated-words, e.g. Schwarzenegger's ZZZ-9 qwxzt."]
LONG = " ".join(["Marie Curie worked in Paris with Pierre while Albert Einstein lectured in Berlin."] * 9)
HEADS = {
    "seq": (transformers.AutoModelForSequenceClassification,
            dict(num_labels=3, id2label={0: "neg", 1: "neu", 2: "pos"})),
    "tok": (transformers.AutoModelForTokenClassification,
            dict(num_labels=5, id2label=dict(enumerate(LABELS)))),
    "qa": (transformers.AutoModelForQuestionAnswering, {}),
    "mlm": (transformers.AutoModelForMaskedLM, {}),
}


@pytest.fixture(scope="module")
def twins(minilm_path, tmp_path_factory):
  """name -> (folder, PyTorch model): MiniLM with a seeded random head, saved with its tokenizer."""
  root = tmp_path_factory.mktemp("twins")
  tok = transformers.AutoTokenizer.from_pretrained(minilm_path, model_max_length=MAX_LEN)
  out = {}
  for name, (cls, kwargs) in HEADS.items():
    torch.manual_seed(0)
    model = cls.from_pretrained(minilm_path, **kwargs).eval()
    head = {"seq": "classifier", "tok": "classifier", "qa": "qa_outputs"}.get(name)
    if head:  # a larger random head: decisive labels, far from ties that float noise could flip
      with torch.no_grad():
        getattr(model, head).weight.mul_(10.0)
    model.save_pretrained(root / name)
    tok.save_pretrained(root / name)
    out[name] = (str(root / name), model)
  return out


@pytest.fixture(scope="module")
def pipes(twins):
  """task name -> (flaxhf pipeline, transformers pipeline or None) on the same folder."""
  tasks = {"seq": "text-classification", "tok": "token-classification", "mlm": "fill-mask",
           "qa": "question-answering"}
  return {name: (flaxhf.pipeline(task, model=twins[name][0]),
                 None if name == "qa" else transformers.pipeline(task, model=twins[name][0]))
          for name, task in tasks.items()}


def assert_same(got, want, atol=1e-4):
  """Equal nested results: every field identical, scores within atol."""
  if isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (got, want)
    for g, w in zip(got, want):
      assert_same(g, w, atol)
    return
  assert set(got) == set(want), (got, want)
  for k in want:
    if k == "score":
      assert abs(got[k] - float(want[k])) < atol, (got, want)
    else:
      assert got[k] == want[k], (k, got, want)


# ---- text classification ---------------------------------------------------------------------------
@pytest.mark.xla_optimized  # MiniLM over inputs up to 512 tokens
def test_text_classification_matches_transformers(pipes):
  fp, tp = pipes["seq"]
  assert_same(fp(TEXTS[0]), tp(TEXTS[0]))
  assert_same(fp(TEXTS), tp(TEXTS))
  for kwargs in (dict(top_k=None), dict(top_k=2), dict(function_to_apply="sigmoid"),
                 dict(top_k=None, function_to_apply="none")):
    assert_same(fp(TEXTS, **kwargs), tp(TEXTS, **kwargs))
    assert_same(fp(TEXTS[1], **kwargs), tp(TEXTS[1], **kwargs))
  pair = {"text": "Is it raining?", "text_pair": "The sky is grey over Paris."}
  assert_same(fp(pair), tp(pair))
  assert_same(fp(LONG, truncation=True), tp(LONG, truncation=True))  # cut to model_max_length
  assert_same(fp([LONG, TEXTS[1]]), tp([LONG, TEXTS[1]]))  # past model_max_length, within positions
  assert len(fp(TEXTS[0], top_k=None)) == 3


@pytest.mark.parametrize("problem_type,fn", [("regression", "none"),
                                             ("multi_label_classification", "sigmoid"),
                                             ("single_label_classification", "softmax")])
def test_text_classification_picks_function_like_transformers(pipes, monkeypatch, problem_type, fn):
  fp, tp = pipes["seq"]
  config = copy.deepcopy(fp.model.config)
  config.problem_type = problem_type
  monkeypatch.setattr(fp.model, "config", config)
  monkeypatch.setattr(tp.model, "config", config)
  assert fp.function_for(None) == fn
  assert_same(fp(TEXTS, top_k=None), tp(TEXTS, top_k=None))  # transformers picks by the config too
  one_label = copy.deepcopy(config)
  one_label.problem_type, one_label.id2label = None, {0: "yes"}
  monkeypatch.setattr(fp.model, "config", one_label)
  assert fp.function_for(None) == "sigmoid"


def test_forward_compiles_once_per_bucket(pipes):
  fp, _ = pipes["seq"]
  fresh = flaxhf.pipeline("sentiment-analysis", model=fp.model, tokenizer=fp.tokenizer)
  fresh("warm up")  # compiles the forward, and any small programs the scoring runs
  with count_compiles() as compiles:
    for text in ("short one", "a slightly longer one, still", "another text of another length"):
      fresh(text)
    assert fresh.compiled_shapes() == 1 and compiles == []  # lengths 4..9 share the 16 bucket
    fresh(TEXTS * 2)
  assert fresh.compiled_shapes() == 2 and len(compiles) == 1  # 6 texts: one 8-row batch
  # batch_size splits large inputs into batches; results do not depend on the split.
  small = flaxhf.pipeline("sentiment-analysis", model=fp.model, tokenizer=fp.tokenizer, batch_size=2)
  assert_same(small(TEXTS * 2, top_k=None), fresh(TEXTS * 2, top_k=None), atol=1e-5)


# ---- token classification --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_matches_transformers(pipes, strategy):
  fp, tp = pipes["tok"]
  got, want = fp(TEXTS, aggregation_strategy=strategy), tp(TEXTS, aggregation_strategy=strategy)
  assert_same(got, want)
  assert sum(len(g) for g in got) > 5  # the random head does tag tokens
  key = "entity" if strategy == "none" else "entity_group"
  assert {e[key] for g in got for e in g} - {"O"}
  # Past model_max_length: truncated to the first window, as transformers does.
  assert_same(fp(LONG, aggregation_strategy=strategy), tp(LONG, aggregation_strategy=strategy))


@pytest.mark.parametrize("strategy", ["simple", "first", "average", "max"])
def test_token_classification_stride_windows_match_transformers(pipes, strategy):
  fp, tp = pipes["tok"]
  got = fp([LONG, TEXTS[0]], aggregation_strategy=strategy, stride=16)
  assert_same(got, tp([LONG, TEXTS[0]], aggregation_strategy=strategy, stride=16))
  assert max(e["end"] for e in got[0]) > len(LONG) - 30  # the whole text, not just the first window


def test_token_classification_ignore_labels(pipes):
  fp, tp = pipes["tok"]
  for labels in ([], ["O", "B-LOC", "LOC"]):
    assert_same(fp(TEXTS[0], ignore_labels=labels), tp(TEXTS[0], ignore_labels=labels))
    assert_same(fp(TEXTS[0], aggregation_strategy="simple", ignore_labels=labels),
                tp(TEXTS[0], aggregation_strategy="simple", ignore_labels=labels))


# ---- fill mask -------------------------------------------------------------------------------------
def test_fill_mask_matches_transformers(pipes):
  fp, tp = pipes["mlm"]
  one, two = "Paris is the [MASK] of France.", "The [MASK] sat on the [MASK]."
  assert_same(fp(one), tp(one))
  assert_same(fp([one, two], top_k=3), tp([one, two], top_k=3))
  assert_same(fp(two), tp(two))
  targets = ["capital", "city", "heart", "qwzxv"]
  assert_same(fp(one, targets=targets), tp(one, targets=targets))
  long = "The [MASK] is here. " + LONG
  kwargs = dict(tokenizer_kwargs={"truncation": True})
  assert_same(fp(long, **kwargs), tp(long, **kwargs))
  assert [p["token"] for p in fp(one, top_k=8)] == [p["token"] for p in tp(one, top_k=8)]


# ---- question answering ----------------------------------------------------------------------------
def v4_question_answering(tok, pt_model, question, context, top_k=1, max_answer_len=15,
                          max_seq_len=384, doc_stride=128, handle_impossible_answer=False):
  """transformers v4's QuestionAnsweringPipeline (fast tokenizer) on a PyTorch model: the reference."""
  # v4's span scoring; transformers 5 keeps it for document question answering.
  from transformers.pipelines.document_question_answering import select_starts_ends
  enc = tok(question, context, truncation="only_second", max_length=max_seq_len, stride=doc_stride,
            return_token_type_ids=True, return_overflowing_tokens=True, return_offsets_mapping=True)
  min_null, answers = 1e6, []
  for i in range(len(enc["input_ids"])):
    ids = np.array(enc["input_ids"][i])
    p_mask = np.array([s != 1 for s in enc.sequence_ids(i)], np.int64)
    p_mask[ids == tok.cls_token_id] = 0
    inputs = {k: torch.tensor([enc[k][i]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
      out = pt_model(**inputs)
    starts, ends, scores, min_null = select_starts_ends(
        out.start_logits.numpy(), out.end_logits.numpy(), p_mask[None],
        np.array([enc["attention_mask"][i]]), min_null, top_k, handle_impossible_answer, max_answer_len)
    e = enc.encodings[i]
    for s, t, score in zip(starts, ends, scores):
      try:
        a = e.word_to_chars(e.token_to_word(s), sequence_index=1)[0]
        b = e.word_to_chars(e.token_to_word(t), sequence_index=1)[1]
      except Exception:
        a, b = e.offsets[s][0], e.offsets[t][1]
      answers.append({"score": float(score), "start": a, "end": b, "answer": context[a:b]})
  if handle_impossible_answer:
    answers.append({"score": min_null, "start": 0, "end": 0, "answer": ""})
  answers = sorted(answers, key=lambda x: x["score"], reverse=True)[:top_k]
  return answers[0] if len(answers) == 1 else answers


QUESTION = "Where did Albert Einstein lecture?"


@pytest.mark.parametrize("kwargs", [
    dict(), dict(top_k=3, max_seq_len=48, doc_stride=16), dict(max_answer_len=4, max_seq_len=40),
    dict(handle_impossible_answer=True, top_k=2, max_seq_len=48, doc_stride=8)])
def test_question_answering_matches_v4_reference(pipes, twins, kwargs):
  fp, _ = pipes["qa"]
  pt = twins["qa"][1]
  got = fp(question=QUESTION, context=LONG, **kwargs)
  max_seq_len = kwargs.get("max_seq_len", MAX_LEN)
  want = v4_question_answering(fp.tokenizer, pt, QUESTION, LONG, max_seq_len=max_seq_len,
                               doc_stride=kwargs.get("doc_stride", min(max_seq_len // 2, 128)),
                               **{k: v for k, v in kwargs.items() if k not in ("max_seq_len", "doc_stride")})
  assert_same(got, want)
  for answer in got if isinstance(got, list) else [got]:
    assert LONG[answer["start"]:answer["end"]] == answer["answer"]


def test_question_answering_torch_logits_same_postprocessing(pipes, twins):
  fp, _ = pipes["qa"]
  pt = twins["qa"][1]
  pairs = [(QUESTION, LONG), ("Who worked with Pierre?", TEXTS[0] + " " + LONG[:300])]
  p = fp.call_params(dict(top_k=2, max_seq_len=48, doc_stride=16))
  features = fp.preprocess(pairs, p)
  assert len(features["input_ids"]) > 6  # several windows per long context
  starts, ends = [], []
  for i in range(len(features["input_ids"])):
    inputs = {k: torch.tensor([features[k][i]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
      out = pt(**inputs)
    starts.append(out.start_logits[0].numpy())
    ends.append(out.end_logits[0].numpy())
  want = fp.postprocess([c for _, c in pairs], features, starts, ends, p)
  got = fp([{"question": q, "context": c} for q, c in pairs], top_k=2, max_seq_len=48, doc_stride=16)
  assert_same(got, want)
  # The evaluation decoder (utils_qa) on the same windows: flaxhf's and PyTorch's logits agree.
  examples = [{"id": i, "context": c} for i, (_, c) in enumerate(pairs)]
  flax_out = fp.forward([fp.model_inputs(features, i) for i in range(len(starts))])
  answers, nbest = qa.postprocess_qa_predictions(examples, features, [o[0] for o in flax_out],
                                                 [o[1] for o in flax_out])
  answers_pt, nbest_pt = qa.postprocess_qa_predictions(examples, features, starts, ends)
  assert answers == answers_pt
  for i in answers:
    assert [(n["start"], n["end"], n["text"]) for n in nbest[i]] == \
        [(n["start"], n["end"], n["text"]) for n in nbest_pt[i]]
    np.testing.assert_allclose([n["probability"] for n in nbest[i]],
                               [n["probability"] for n in nbest_pt[i]], atol=1e-4)


def test_prepare_qa_features_windows(pipes):
  tok = pipes["qa"][0].tokenizer
  contexts = [LONG, "Short context about Paris."]
  f = qa.prepare_qa_features(tok, ["  Who lectured?", "Where?"], contexts, max_length=48,
                             doc_stride=16, example_ids=["a", "b"])
  assert f["example_id"].count("a") > 3 and f["example_id"].count("b") == 1
  context_ids = tok(LONG, add_special_tokens=False, return_offsets_mapping=True)
  seen = []
  for ids, offsets, words, ex in zip(f["input_ids"], f["offset_mapping"], f["word_ids"], f["example_id"]):
    assert len(ids) <= 48 and offsets[0] is None  # CLS and the question are not context
    if ex == "a":  # the question was stripped, and comes first
      assert ids[:4] == tok("Who lectured?")["input_ids"][:4]
    inside = [(t, o) for t, o in zip(ids, offsets) if o is not None]
    assert all(w is not None for w, o in zip(words, offsets) if o is not None)
    if ex == "a":
      seen.append([tuple(o) for _, o in inside])
  # Consecutive windows share exactly doc_stride context tokens, and together cover the context.
  for prev, nxt in zip(seen, seen[1:]):
    assert prev[-16:] == nxt[:16]
  covered = {o for window in seen for o in window}
  assert covered == {tuple(o) for o in context_ids["offset_mapping"]}

  left = transformers.AutoTokenizer.from_pretrained(tok.name_or_path, padding_side="left")
  g = qa.prepare_qa_features(left, ["Who lectured?"], [LONG], max_length=48, doc_stride=16)
  for ids, offsets in zip(g["input_ids"], g["offset_mapping"]):
    sep = ids.index(tok.sep_token_id)  # context first, then the question
    assert all(o is not None for o in offsets[1:sep]) and all(o is None for o in offsets[sep:])
  with pytest.raises(ValueError, match="doc_stride"):
    qa.prepare_qa_features(tok, ["Who lectured?"], [LONG], max_length=24, doc_stride=20)


def reference_answers(context, features, starts, ends, max_answer_length, null_threshold=None):
  """Brute force: the best context span over all windows; "" when the least null score wins."""
  best, best_span, null = -np.inf, (0, 0), np.inf
  for offsets, s_logits, e_logits in zip(features["offset_mapping"], starts, ends):
    null = min(null, s_logits[0] + e_logits[0])
    for s in range(len(offsets)):
      for e in range(s, min(len(offsets), s + max_answer_length)):
        if offsets[s] is not None and offsets[e] is not None and s_logits[s] + e_logits[e] > best:
          best, best_span = s_logits[s] + e_logits[e], (offsets[s][0], offsets[e][1])
  if null_threshold is not None and null - best > null_threshold:
    return "", (0, 0)
  return context[best_span[0]:best_span[1]], best_span


def test_postprocess_qa_predictions_against_brute_force(pipes):
  tok = pipes["qa"][0].tokenizer
  contexts = [LONG, TEXTS[0], LONG[:200]]
  examples = {"id": ["x", "y", "z"], "context": contexts}  # dict of columns, like a datasets batch
  features = qa.prepare_qa_features(tok, ["Who?"] * 3, contexts, max_length=40, doc_stride=12,
                                    example_ids=examples["id"])
  rng = np.random.RandomState(0)
  starts = [rng.randn(len(ids)) * 3 for ids in features["input_ids"]]
  ends = [rng.randn(len(ids)) * 3 for ids in features["input_ids"]]
  # Make "z" unanswerable: its CLS logits beat every span in each of its windows.
  for i, ex in enumerate(features["example_id"]):
    if ex == "z":
      starts[i][0] = ends[i][0] = 20.0
  n = max(len(ids) for ids in features["input_ids"])  # n-best this large prunes nothing
  answers, nbest = qa.postprocess_qa_predictions(examples, features, starts, ends, n_best_size=n,
                                                 max_answer_length=5)
  answers_v2, nbest_v2 = qa.postprocess_qa_predictions(examples, features, starts, ends, n_best_size=n,
                                                       max_answer_length=5, version_2_with_negative=True)
  for ex, context in zip(examples["id"], contexts):
    idx = [i for i, e in enumerate(features["example_id"]) if e == ex]
    sub = {"offset_mapping": [features["offset_mapping"][i] for i in idx]}
    text, (a, b) = reference_answers(context, sub, [starts[i] for i in idx], [ends[i] for i in idx], 5)
    assert answers[ex] == text and (nbest[ex][0]["start"], nbest[ex][0]["end"]) == (a, b)
    text_v2, _ = reference_answers(context, sub, [starts[i] for i in idx], [ends[i] for i in idx], 5,
                                   null_threshold=0.0)
    assert answers_v2[ex] == text_v2
    assert abs(sum(p["probability"] for p in nbest[ex]) - 1) < 1e-6
    assert all(context[p["start"]:p["end"]] == p["text"] for p in nbest[ex])
  assert answers_v2["z"] == "" and answers["z"] != ""  # SQuAD v1 must answer; v2 may abstain
  assert len(features["input_ids"]) > 5 and features["example_id"].count("x") > 2
  # A high threshold forces an answer again.
  forced, _ = qa.postprocess_qa_predictions(examples, features, starts, ends, n_best_size=n,
                                            max_answer_length=5, version_2_with_negative=True,
                                            null_score_diff_threshold=1e9)
  assert forced["z"] == answers["z"]


def test_question_answering_impossible_answer(pipes):
  fp, _ = pipes["qa"]
  p = fp.call_params(dict(handle_impossible_answer=True, top_k=2))
  features = fp.preprocess([("Who?", TEXTS[0])], p)
  ids = features["input_ids"][0]
  starts, ends = np.zeros(len(ids)), np.zeros(len(ids))
  starts[0] = ends[0] = 10.0  # the CLS token: "no answer"
  starts[ids.index(tok_id(fp, "washington"))] = ends[ids.index(tok_id(fp, "washington"))] = 4.0
  got = fp.postprocess([TEXTS[0]], features, [starts], [ends], p)[0]
  assert got[0]["answer"] == "" and got[0]["start"] == got[0]["end"] == 0
  assert got[1]["answer"] == "Washington"
  # Probabilities over CLS + context tokens, as v4: null = p_start[CLS] * p_end[CLS].
  n_context = sum(o is not None for o in features["offset_mapping"][0])
  p_cls = np.exp(10.0) / (np.exp(10.0) + np.exp(4.0) + n_context - 1)
  assert abs(got[0]["score"] - p_cls ** 2) < 1e-6
  without = fp.postprocess([TEXTS[0]], features, [starts], [ends], {**p, "handle_impossible_answer": False})
  assert without[0][0]["answer"] == "Washington"


def tok_id(pipe, word):
  return pipe.tokenizer.convert_tokens_to_ids(word)


# ---- building pipelines, bad input -----------------------------------------------------------------
def test_loaded_model_and_errors(pipes, twins, tmp_path):
  fp, _ = pipes["seq"]
  model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(twins["seq"][0])
  assert_same(flaxhf.pipeline("sentiment-analysis", model=model)(TEXTS), fp(TEXTS), atol=1e-6)
  with pytest.raises(ValueError, match="fill-mask.*question-answering.*text-classification"):
    flaxhf.pipeline("zero-shot-classification", model=twins["seq"][0])
  with pytest.raises(ValueError, match="masked_lm head"):
    flaxhf.pipeline("fill-mask", model=model)
  with pytest.raises(OSError, match="offline"):
    flaxhf.pipeline("fill-mask", model="no-such-org/no-such-model")
  with pytest.raises(ValueError, match="tokenizer="):
    model.config._name_or_path = ""
    flaxhf.pipeline("text-classification", model=model)
  bare = tmp_path / "bare"  # weights without tokenizer files: transformers 5 would invent a tokenizer
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(twins["seq"][0], name), bare / name)
  with pytest.raises(OSError, match="No tokenizer files"):
    flaxhf.pipeline("text-classification", model=str(bare))
  assert_same(flaxhf.pipeline("text-classification", model=str(bare), tokenizer=twins["seq"][0])(TEXTS),
              fp(TEXTS), atol=1e-6)
  with pytest.raises(TypeError, match="unknown argument.*top_kk"):
    fp(TEXTS[0], top_kk=2)
  with pytest.raises(ValueError, match="truncation=True"):
    fp(LONG * 8)  # past the 512 positions
  qp, mp, tp = pipes["qa"][0], pipes["mlm"][0], pipes["tok"][0]
  with pytest.raises(ValueError, match="context"):
    qp(question="Where?")
  with pytest.raises(ValueError, match="context"):
    qp({"question": "Where?"})
  with pytest.raises(ValueError, match="doc_stride"):
    qp(question="Where?", context=LONG, max_seq_len=32, doc_stride=40)
  with pytest.raises(ValueError, match="No mask token"):
    mp("No mask here.")
  with pytest.raises(ValueError, match="aggregation_strategy"):
    tp(LONG, stride=16)
  with pytest.raises(ValueError, match="aggregation_strategy must be"):
    tp(LONG, aggregation_strategy="longest")
  # Calling conventions of the v4 QA pipeline agree.
  a = qp(QUESTION, TEXTS[0])
  assert_same(qp({"question": QUESTION, "context": TEXTS[0]}), a, atol=1e-6)
  assert_same(qp(question=[QUESTION, QUESTION], context=TEXTS[0]), [a, a], atol=1e-6)
