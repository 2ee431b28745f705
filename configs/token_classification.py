"""Token classification (NER): `--config configs/token_classification.py[:ARGS]`.

ARGS, comma-separated: `local` (the offline MiniLM checkpoint and CoNLL-2003 files under
$FLAXHF_DATA, default ../shared/data), `smoke` (a run of seconds), `label_all_tokens` (label every
sub-token, not only each word's first), `model=NAME_OR_PATH`, `steps=N`. Without `local` the data
is the hub's `conll2003`.
"""

import os

from configs import common


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.base_config("token_classification")
  c.data.dataset = "conll2003"
  c.data.tokens_column = "tokens"              # json / hub columns: a list of words per row
  c.data.tags_column = "ner_tags"              # a list of tags per row (names or ClassLabel ids)
  c.data.label_list = common.placeholder(str)  # comma-separated, to fix the tag order
  c.data.label_all_tokens = "label_all_tokens" in flags
  if "local" in flags:
    folder = os.path.join(common.DATA_DIR, "token_classification", "conll2003")
    c.data.dataset = None
    c.data.train_file = os.path.join(folder, "train.txt")  # CoNLL columns, tag last
    c.data.validation_file = os.path.join(folder, "valid.txt")
    c.data.max_length = 128
    c.train.steps = 600
    c.train.batch_size = 32
    c.train.learning_rate = 1e-4
    c.train.warmup_ratio = 0.1
    c.train.eval_every = 200
    c.checkpoint.every_steps = 200
  else:
    c.train.learning_rate = 5e-5
  common.apply_common_args(c, flags, values, known_flags=("label_all_tokens",))
  c.lock()
  return c
