"""Text classification (GLUE-style): `--config configs/text_classification.py[:ARGS]`.

ARGS, comma-separated: a GLUE task (sst2, mrpc, cola, stsb, rte; default sst2), `local` (the offline
MiniLM checkpoint and GLUE files under $FLAXHF_DATA, default ../shared/data), `smoke` (a run of
seconds), `model=NAME_OR_PATH`, `steps=N`.
"""

import os

from configs import common

# GLUE task -> (folder under glue/, text columns). GLUE's TSV headers are read under the hub's
# column names (flaxhf.data renames e.g. MRPC's "#1 String"), so one set of keys serves both.
GLUE = {
    "sst2": ("SST-2", "sentence"),
    "mrpc": ("MRPC", "sentence1,sentence2"),
    "cola": ("CoLA", "sentence"),
    "stsb": ("STS-B", "sentence1,sentence2"),
    "rte": ("RTE", "sentence1,sentence2"),
}


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  c = common.base_config("text_classification")
  glue = [f for f in flags if f in GLUE]
  if len(glue) > 1:
    raise common.ConfigError(f"Pick one GLUE task, got {glue}.")
  task = glue[0] if glue else "sst2"
  folder, columns = GLUE[task]
  c.data.dataset = "nyu-mll/glue"
  c.data.subset = task
  c.data.text_columns = columns
  c.data.label_column = "label"
  c.data.task_name = task
  c.data.label_list = common.placeholder(str)  # comma-separated, to fix the label order
  if "local" in flags:
    c.data.dataset = None
    c.data.subset = None
    c.data.train_file = os.path.join(common.DATA_DIR, "text_classification", "glue", folder, "train.tsv")
    c.data.validation_file = os.path.join(common.DATA_DIR, "text_classification", "glue", folder,
                                          "dev.tsv")
  c.train.steps = 300 if "local" in flags else None
  c.train.learning_rate = 5e-5 if "local" in flags else 2e-5
  c.train.eval_every = 100 if "local" in flags else 0
  c.checkpoint.every_steps = 100 if "local" in flags else 500
  common.apply_common_args(c, flags, values, known_flags=GLUE)
  c.lock()
  return c
