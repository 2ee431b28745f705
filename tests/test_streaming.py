"""data.streaming for causal and masked LM: the same blocks as in memory, disjoint process shares,
exact resume from a saved position (also after SIGKILL, to bit-identical weights), clear errors."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from flaxhf.data import clm as clm_data
from flaxhf.data import mlm as mlm_data
from flaxhf.data import sources
from flaxhf.data.sources import DataError
from engine_utils import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpt2_tok():
  import transformers
  return transformers.AutoTokenizer.from_pretrained(clm_data.gpt2_tokenizer_dir())


@pytest.fixture(scope="module")
def bert_tok(minilm_path):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(minilm_path)


def _write_stories(path, n, seed):
  """Short documents from a tiny grammar, some blank lines and multi-line paragraphs among them."""
  rng = np.random.default_rng(seed)
  nouns, verbs = ["cat", "dog", "bird", "fox", "king"], ["sees", "likes", "finds", "follows"]
  with open(path, "w") as f:
    for i in range(n):
      words = [f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)} ."
               for _ in range(rng.integers(1, 4))]
      f.write(" ".join(words) + ("\n\n" if i % 3 == 2 else "\n"))
  return str(path)


def _epoch(stream, n, seed=0, state=None):
  return list(itertools.islice(stream.examples(seed, state), n))


def _assert_rows_equal(rows, examples, fields):
  for f in fields:
    np.testing.assert_array_equal(np.stack([r[f] for r in rows]), np.stack(examples.seqs[f]),
                                  err_msg=f)


# ---- the same blocks as in memory ----------------------------------------------------------------

@pytest.mark.parametrize("unit", ["line", "paragraph"])
def test_clm_stream_equals_in_memory_blocks(tmp_path, gpt2_tok, unit):
  train = _write_stories(tmp_path / "train.txt", 120, 0)
  cfg = {"train_file": train, "block_size": 16, "per_document_attention": True, "text_unit": unit}
  want = clm_data.prepare_clm(cfg, gpt2_tok).train
  # Chunks of 7 texts: block after block crosses a chunk boundary through the carry.
  data = clm_data.prepare_clm({**cfg, "streaming": True, "stream_chunk_texts": 7,
                               "validation_file": train}, gpt2_tok)
  assert len(data.eval) == len(want)  # eval read in full, as without streaming
  rows = _epoch(data.train, len(want) + 2)
  _assert_rows_equal(rows[:len(want)], want, ["input_ids", "document_ids"])
  # The next epoch starts over (the tail that fills no block is dropped, as in memory).
  for f in ("input_ids", "document_ids"):
    np.testing.assert_array_equal(rows[len(want)][f], want.seqs[f][0])


@pytest.mark.parametrize("line_by_line", [False, True])
def test_mlm_stream_equals_in_memory_examples(tmp_path, bert_tok, line_by_line):
  rows_file = tmp_path / "train.jsonl"
  texts = open(_write_stories(tmp_path / "t.txt", 90, 1)).read().split("\n")
  rows_file.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
  cfg = {"train_file": str(rows_file), "text_column": "body", "max_length": 24,
         "whole_word_mask": True, "line_by_line": line_by_line}
  want = mlm_data.prepare_mlm(cfg, bert_tok).train
  data = mlm_data.prepare_mlm({**cfg, "streaming": True, "stream_chunk_texts": 5}, bert_tok)
  assert data.eval is None  # no validation data: nothing held out of a stream
  rows = _epoch(data.train, len(want))
  for f in ("input_ids", "word_ids"):
    assert [r[f].tolist() for r in rows] == [a.tolist() for a in want.seqs[f]], f
  # Batches: this process's rows, padded to max_length on every process (one shape).
  batch = next(data.train.batches(global_batch_size=4, seed=0, max_length=24,
                                  pad_values={"input_ids": 0, "word_ids": -1}))
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
  lens = [len(r["input_ids"]) for r in rows[:4]]
  np.testing.assert_array_equal(batch["attention_mask"].sum(-1), lens)
  assert (batch["word_ids"][batch["attention_mask"] == 0] == -1).all()


def test_shuffle_is_a_seeded_permutation_within_chunks(tmp_path, gpt2_tok):
  train = _write_stories(tmp_path / "train.txt", 200, 2)
  cfg = {"train_file": train, "block_size": 16, "validation_split_percentage": 0}
  want = [b.tolist() for b in clm_data.prepare_clm(cfg, gpt2_tok).train.seqs["input_ids"]]
  stream = clm_data.prepare_clm({**cfg, "streaming": True, "stream_shuffle": True,
                                 "stream_chunk_texts": 50}, gpt2_tok).train
  n = len(want)
  first = [r["input_ids"].tolist() for r in _epoch(stream, 2 * n, seed=3)]
  assert first == [r["input_ids"].tolist() for r in _epoch(stream, 2 * n, seed=3)]
  assert first != [r["input_ids"].tolist() for r in _epoch(stream, 2 * n, seed=4)]
  assert first[:n] != want and sorted(first[:n]) == sorted(want)  # every block, once an epoch
  assert first[n:] != first[:n] and sorted(first[n:]) == sorted(want)  # a new order each epoch
  # Only within a chunk: the blocks of the first chunk (50 texts) all come before the others.
  k = len(clm_data.prepare_clm({**cfg, "train_file": _head(train, tmp_path, 50)}, gpt2_tok).train)
  assert 0 < k < n and sorted(first[:k]) == sorted(want[:k])


def _head(path, tmp_path, k):
  """A file of the first k non-blank lines of `path` (the first stream chunk of k texts)."""
  out = tmp_path / f"head{k}.txt"
  out.write_text("".join(t + "\n" for t in itertools.islice(sources.iter_text_file(path), k)))
  return str(out)


# ---- positions and shares ------------------------------------------------------------------------

def test_restored_position_continues_exactly(tmp_path, gpt2_tok, bert_tok):
  train = _write_stories(tmp_path / "train.txt", 60, 3)
  clm = clm_data.prepare_clm({"train_file": train, "block_size": 16, "streaming": True,
                              "per_document_attention": True, "stream_shuffle": True,
                              "stream_chunk_texts": 9, "validation_split_percentage": 0},
                             gpt2_tok).train
  mlm = mlm_data.prepare_mlm({"train_file": train, "max_length": 16, "streaming": True,
                              "whole_word_mask": True, "stream_chunk_texts": 4}, bert_tok).train
  for stream in (clm, mlm):
    args = dict(global_batch_size=4, seed=1, max_length=16, pad_values={})
    it = stream.batches(**args)
    batches, states = [], []
    for _ in range(40):  # several epochs: positions at chunk, block and epoch boundaries
      batches.append(next(it))
      states.append(json.loads(json.dumps(stream.state_dict())))  # as it goes through the meta
    assert max(s["epoch"] for s in states) >= 2
    for k in (0, 1, 7, 18, 33):
      resumed = stream.batches(**args, state=states[k])
      for want in batches[k + 1:k + 5]:
        got = next(resumed)
        assert sorted(got) == sorted(want)
        for f in want:
          np.testing.assert_array_equal(got[f], want[f], err_msg=f)


def test_processes_read_disjoint_shares(tmp_path, gpt2_tok):
  train = _write_stories(tmp_path / "train.txt", 50, 4)
  rows = tmp_path / "train.jsonl"
  rows.write_text("".join(json.dumps({"text": t}) + "\n" for t in sources.iter_text_file(train)))
  everything = list(sources.iter_text_file(train))
  for path in (train, str(rows)):
    assert list(sources.stream_texts({"train_file": path}).iterate()) == everything
    for count in (2, 3):
      shares = [list(sources.stream_texts({"train_file": path}, process_index=i,
                                          process_count=count).iterate()) for i in range(count)]
      # Row r goes to process r % count: disjoint, and together all of it.
      assert shares == [everything[i::count] for i in range(count)]
  with pytest.raises(ValueError, match=r"process_index=2 is not in \[0, 2\)"):
    sources.stream_texts({"train_file": train}, process_index=2, process_count=2)
  # Each process's blocks are those of its own texts; max_train_samples is split between them.
  cfg = {"train_file": train, "block_size": 16, "streaming": True, "max_train_samples": 6,
         "validation_split_percentage": 0}
  share = tmp_path / "share1.txt"
  share.write_text("".join(t + "\n" for t in everything[1::2]))
  want = clm_data.prepare_clm({"train_file": str(share), "block_size": 16}, gpt2_tok).train
  stream = clm_data.prepare_clm(cfg, gpt2_tok, process_index=1, process_count=2).train
  rows1 = _epoch(stream, 4)
  _assert_rows_equal(rows1[:3], want.select(range(3)), ["input_ids"])
  np.testing.assert_array_equal(rows1[3]["input_ids"], want.seqs["input_ids"][0])  # 6 / 2 a process


# ---- bad input -----------------------------------------------------------------------------------

def _clm_config(arg="local,smoke,streaming", **overrides):
  from configs.clm import get_config
  cfg = get_config(arg)
  cfg.update_from_flattened_dict({
      "model.config_overrides": "n_embd=32,n_layer=1,n_head=2,n_positions=64",
      "data.block_size": 32, "data.max_train_samples": None, "data.max_eval_samples": None,
      "data.stream_chunk_texts": 16, "train.batch_size": 8, "train.eval_batch_size": 16,
      "train.steps": 8, "train.learning_rate": 1e-2, "train.progress_bar": False,
      "train.log_every": 1, "train.eval_every": 0, "checkpoint.every_steps": 4,
      "checkpoint.async_save": False, "mesh.data": 1, "eval.num_samples": 0, **overrides})
  return cfg


def test_bad_streaming_configs_name_the_fix(tmp_path, minilm_path, gpt2_tok):
  from configs.text_classification import get_config
  from flaxhf.train import engine
  train = _write_stories(tmp_path / "train.txt", 40, 5)
  cfg = get_config("smoke")
  cfg.update_from_flattened_dict({"model.name_or_path": minilm_path, "data.streaming": True})
  with pytest.raises(ValueError, match=r"task 'text_classification' loads its data into memory; "
                                       r"only causal_lm and masked_lm stream"):
    engine.Trainer(cfg, str(tmp_path / "w1"), devices=jax.devices()[:1])
  cfg = _clm_config(**{"data.train_file": train, "data.validation_file": train,
                       "train.steps": None})
  with pytest.raises(ValueError, match=r"an epoch's length is unknown: set train.steps"):
    engine.Trainer(cfg, str(tmp_path / "w2"), devices=jax.devices()[:1])
  with pytest.raises(DataError, match=r"cannot hold data.validation_split_percentage=5.0% of a "
                                      r"stream out.*data.validation_file"):
    clm_data.prepare_clm({"train_file": train, "streaming": True,
                          "validation_split_percentage": 5.0}, gpt2_tok)
  with pytest.raises(DataError, match="streaming reads local files or the hub, not TFDS"):
    sources.stream_texts({"tfds_name": "wikipedia"})
  if os.environ.get("HF_HUB_OFFLINE") == "1":  # conftest's default: no hub
    with pytest.raises(DataError, match=r"Could not stream dataset 'wikitext'.*HF_HUB_OFFLINE=1 "
                                        r"is set.*data.train_file=PATH"):
      next(sources.stream_texts({"dataset": "wikitext", "subset": "wikitext-2-raw-v1"}).iterate())
  short = tmp_path / "short.txt"
  short.write_text("a few words\n")
  stream = clm_data.prepare_clm({"train_file": str(short), "streaming": True, "block_size": 64},
                                gpt2_tok).train
  with pytest.raises(ValueError, match=r"short.txt gives no training example"):
    next(stream.examples(0))
  rows = tmp_path / "rows.jsonl"
  rows.write_text('{"body": "some text"}\n')
  stream = clm_data.prepare_clm({"train_file": str(rows), "streaming": True}, gpt2_tok).train
  with pytest.raises(DataError, match=r"no text column 'text'.*data.text_column"):
    next(stream.examples(0))


# ---- through the engine: SIGKILL, rerun, the uninterrupted run's weights -------------------------

_CHILD = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r}); sys.path.insert(0, os.path.join({root!r}, "tests"))
    import jax
    from flaxhf.train import engine
    from test_streaming import _clm_config
    cfg = _clm_config(**json.loads(sys.argv[2]))
    trainer = engine.Trainer(cfg, sys.argv[1], devices=jax.devices()[:1])
    step = trainer._train_step

    def step_then_wait(state, batch):  # after the first checkpoint: wait to be killed mid-run
      if trainer.ckpt.all_steps():
        time.sleep(600)
      return step(state, batch)

    trainer._train_step = step_then_wait
    trainer.fit()
""")


def _weights(trainer):
  return jax.tree_util.tree_leaves_with_path(jax.device_get(trainer.state["params"]))


def test_sigkill_then_rerun_resumes_the_stream_exactly(tmp_path):
  from flaxhf.checkpoint import read_meta
  from flaxhf.train import engine
  # ~45 blocks an epoch: 8 steps of 8 cross into the second epoch. No eval data, so the runs
  # compile only the train step.
  files = {"data.train_file": _write_stories(tmp_path / "train.txt", 110, 6),
           "data.validation_file": None, "data.validation_split_percentage": 0.0}
  killed = tmp_path / "killed"
  # The child compiles as this process does (conftest: XLA's backend optimisations off), so
  # the rerun here can equal the killed run bit for bit.
  env = child_env(unoptimized=True)
  child = subprocess.Popen([sys.executable, "-c", _CHILD.format(root=ROOT), str(killed),
                            json.dumps(files)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  # The uninterrupted run, here, while the child starts.
  ref = engine.Trainer(_clm_config(**files), str(tmp_path / "ref"), devices=jax.devices()[:1])
  try:
    ref.fit()
  finally:
    ref.ckpt.close()
  steps_dir = killed / "checkpoints"
  deadline = time.monotonic() + 240
  try:
    while not (steps_dir.is_dir() and any(p.name.isdigit() for p in steps_dir.iterdir())):
      if child.poll() is not None or time.monotonic() > deadline:
        pytest.fail("no checkpoint appeared while the run was alive\n"
                    + child.communicate()[1][-4000:])
      time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
  finally:
    child.kill()
    child.wait(timeout=60)
  assert child.returncode == -signal.SIGKILL
  saved = sorted(int(p.name) for p in steps_dir.iterdir() if p.name.isdigit())
  assert saved == [4], saved  # killed while step 5's batch was already taken from the stream
  [position] = read_meta(str(steps_dir / "4"))["data_state"]  # one process's position
  assert position["emitted"] == 4 * 8 and position["epoch"] == 0
  assert [position] == read_meta(str(tmp_path / "ref" / "checkpoints" / "4"))["data_state"]

  rerun = engine.Trainer(_clm_config(**files), str(killed), devices=jax.devices()[:1])
  # The same program as the reference's (same model, mesh and shardings): saves a compile.
  rerun._train_step = ref._train_step
  try:
    assert rerun.start_step == 4
    rerun.fit()
  finally:
    rerun.ckpt.close()
  got, want = _weights(rerun), _weights(ref)
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  # And the stream ends where the uninterrupted one does, in its second epoch.
  end = read_meta(str(killed / "checkpoints" / "8"))["data_state"]
  assert end == read_meta(str(tmp_path / "ref" / "checkpoints" / "8"))["data_state"]
  assert end[0]["epoch"] == 1
