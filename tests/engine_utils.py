"""Tiny offline training set-ups: a small BERT with a real WordPiece vocab and a synthetic task."""

import contextlib
import os
import pathlib
import shutil

import numpy as np

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # one event per XLA compile
REPO = pathlib.Path(__file__).parents[1]


def child_env(devices=1, unoptimized=False, **extra):
  """The environment of a process a test starts (launch/run.py, a child script): JAX on `devices`
  simulated CPU devices, offline, and without torch (tests/no_torch/sitecustomize.py), as a user's
  training machine. `unoptimized`: compile with XLA's backend optimisations off, as the tests' own
  process does (conftest), for a child whose results are compared bit for bit with an in-process
  run. The session's compilation cache comes with os.environ (conftest)."""
  path = [str(REPO / "tests" / "no_torch"), str(REPO), os.environ.get("PYTHONPATH", "")]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=os.pathsep.join(p for p in path if p))
  if unoptimized:
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env.update(extra)
  return env

POSITIVE = ["good", "great", "fine", "lovely", "superb", "wonderful"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "boring", "dull"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "actors", "story", "it", "really", "very",
          "quite", "film", "ending", "music", "scenes"]


def write_sentiment_tsv(path, n, seed, string_labels=False, header=("sentence", "label")):
  """Sentences whose label is set by one sentiment word among filler: learnable in a few steps."""
  rng = np.random.RandomState(seed)
  rows = []
  for _ in range(n):
    label = int(rng.randint(2))
    words = list(rng.choice(FILLER, size=rng.randint(3, 20)))
    words.insert(rng.randint(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
    rows.append((" ".join(words), ("pos" if label else "neg") if string_labels else str(label)))
  with open(path, "w") as f:
    f.write("\t".join(header) + "\n")
    for r in rows:
      f.write("\t".join(r) + "\n")
  return str(path)


def tiny_bert_dir(path, minilm_path, seed=0, hidden=32, layers=2):
  """A random 2-layer BERT with MiniLM's tokenizer files, saved as a Hugging Face folder."""
  import transformers

  import flaxhf
  config = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=4, intermediate_size=2 * hidden,
                                   max_position_embeddings=128, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0)
  flaxhf.FlaxBertModel(config, seed=seed).save_pretrained(path)
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    src = os.path.join(minilm_path, name)
    if os.path.exists(src):
      shutil.copy(src, path)
  return str(path)


def tiny_config(model_dir, train_file, validation_file, **overrides):
  """A locked text-classification config for a seconds-long run; overrides as dotted keys."""
  from configs.text_classification import get_config
  cfg = get_config("smoke")
  cfg.model.name_or_path = model_dir
  cfg.data.dataset = None
  cfg.data.subset = None
  cfg.data.train_file = train_file
  cfg.data.validation_file = validation_file
  cfg.data.text_columns = "sentence"
  cfg.data.task_name = None
  cfg.data.max_eval_samples = None
  cfg.train.learning_rate = 1e-3
  cfg.train.log_every = 1
  cfg.train.progress_bar = False
  cfg.checkpoint.async_save = False
  cfg.update_from_flattened_dict(overrides)  # dotted keys; the lock still rejects typos
  return cfg


def read_jsonl(path, kind="train"):
  import json
  with open(path) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


@contextlib.contextmanager
def count_compiles(fun_name=None):
  """A list that gains one entry per XLA compile inside the block (jax's public monitoring events),
  only of functions whose name contains `fun_name` when given."""
  import jax
  compiles = []

  def listener(event, duration, **kwargs):
    if event == BACKEND_COMPILE and (fun_name is None or fun_name in kwargs.get("fun_name", "")):
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def prepared_data(cfg):
  """(tokenizer, task data) of `cfg` as its Trainer prepares them, without building a model: what
  a test of a CLI run needs to read the run's eval rows back."""
  from transformers import AutoTokenizer

  from flaxhf.models import io
  from flaxhf.train.tasks import get_task
  tokenizer = AutoTokenizer.from_pretrained(io.resolve_model_dir(cfg.model.tokenizer or cfg.model.name_or_path))
  return tokenizer, get_task(cfg).prepare(tokenizer)


def eval_on_start_metrics(workdir):
  """The step-0 eval of a run with train.eval_on_start: the untrained model's numbers."""
  return next(r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"), "eval") if r["step"] == 0)
