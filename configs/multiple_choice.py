"""Multiple choice (SWAG layout): `--config configs/multiple_choice.py[:ARGS]`.

ARGS, comma-separated: `local` (the offline MiniLM checkpoint and CODAH's SWAG-layout jsonl under
$FLAXHF_DATA, default ../shared/data), `smoke` (a run of seconds), `model=NAME_OR_PATH`, `steps=N`.
Without `local` the data is the hub's `swag` (`regular`).
"""

import os

from configs import common


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.base_config("multiple_choice")
  c.data.dataset = "swag"
  c.data.subset = "regular"
  c.data.context_column = "sent1"
  c.data.question_column = "sent2"             # prefixed to every ending; may be empty
  c.data.ending_prefix = "ending"              # ending0, ending1, ...: the count is the data's
  c.data.ending_columns = common.placeholder(str)  # comma-separated; overrides ending_prefix
  c.data.label_column = "label"
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.train.learning_rate = 5e-5
  if "local" in flags:
    folder = os.path.join(common.DATA_DIR, "multiple_choice", "codah")
    c.data.dataset = None
    c.data.subset = None
    c.data.train_file = os.path.join(folder, "train.swag.jsonl")
    c.data.validation_file = os.path.join(folder, "dev.swag.jsonl")
    c.data.max_length = 64                     # CODAH pairs are short sentences
    c.train.epochs = 3.0
    c.train.warmup_ratio = 0.1
    c.checkpoint.every_steps = 200
  common.apply_common_args(c, flags, values, known_flags=())
  c.lock()
  return c
