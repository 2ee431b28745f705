"""Extractive question answering (SQuAD): `--config configs/qa.py[:ARGS]`.

ARGS, comma-separated: `v2` (SQuAD 2.0: unanswerable questions, hub `squad_v2`), `local` (the offline
MiniLM checkpoint and the SQuAD v1.1 article split under $FLAXHF_DATA, default ../shared/data:
train on dev articles 0-37, evaluate on 38-47; not comparable with "SQuAD dev" numbers), `smoke` (a
run of seconds), `model=NAME_OR_PATH`, `steps=N`. Defaults follow HF's run_qa.py (max_length 384,
doc_stride 128, learning rate 3e-5, 2 epochs); predictions.json lands in the workdir.
"""

import os

from configs import common

SQUAD_DIR = os.path.join(common.DATA_DIR, "question_answering", "squad_v1.1")


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.base_config("question_answering")
  v2 = "v2" in flags
  c.data.dataset = "squad_v2" if v2 else "squad"
  c.data.version_2_with_negative = v2
  c.data.max_length = 384
  c.data.doc_stride = 128                 # tokens shared by consecutive windows of a long context
  c.data.n_best_size = 20                 # start/end candidates per window when decoding
  c.data.max_answer_length = 30           # in tokens
  c.data.null_score_diff_threshold = 0.0  # v2: answer "" when null beats the best span by more
  c.data.skip_mismatched_answers = False  # drop (not fail on) answers not found at answer_start
  c.data.id_column = "id"                 # flat layouts (hub, jsonl) only
  c.data.question_column = "question"
  c.data.context_column = "context"
  c.data.answer_column = "answers"
  c.train.epochs = 2.0
  # False: padded positions stay out of the start/end softmax. True: transformers' loss, whose
  # softmax includes them (so it changes with the padding of each batch: see data.buckets).
  c.train.loss_includes_padding = False
  c.train.learning_rate = 3e-5
  if "local" in flags:
    if v2:
      raise common.ConfigError("There is no local SQuAD v2 data; drop `v2` or `local`.")
    c.data.dataset = None
    c.data.train_file = os.path.join(SQUAD_DIR, "dev-v1.1.train_articles_0-37.json")
    c.data.validation_file = os.path.join(SQUAD_DIR, "dev-v1.1.validation_articles_38-47.json")
    # MiniLM on this slice: short runs need 3e-4 (at 150 steps, 1e-4 reaches EM 7 / F1 14); from
    # ~300 steps 1e-4 is steadier (EM 27 / F1 46, the benchmarks/compare_tasks.py setting).
    c.train.learning_rate = 3e-4
    c.train.warmup_ratio = 0.1
    c.train.eval_every = 200
    c.checkpoint.every_steps = 200
  common.apply_common_args(c, flags, values, known_flags=("v2",))
  if "smoke" in flags:  # 64 tokens leave a long question no room for a 128-token stride
    c.data.max_length = 128
    c.data.doc_stride = 32
  c.lock()
  return c
