"""Translation and summarization on the engine: label-smoothed token loss, scores on generated text.

The train step is the engine's: the decoder inputs are the labels shifted right by the model
module's own `shift_tokens_right` (mBART's wraps the language code round), built on device. The
loss is transformers' LabelSmoother (what Trainer's `label_smoothing_factor` trains): per label token
(1 - eps) * NLL + eps * mean over the vocabulary of -log p, summed with the token count so
accumulation and sharding never change it. (v4's run_summarization_flax.py instead puts eps / (V - 1)
on every wrong token and subtracts that target's entropy: same minimiser family, different values.)

Each eval also generates from every eval source with `model.generate` (eval.num_beams,
eval.max_new_tokens, ...), one compiled program per batch shape, and scores the text: BLEU and chrF
(sacrebleu) for translation, ROUGE (rouge-score) for summarization; `generated_predictions.txt` in
the workdir holds the last eval's outputs, one line per example.
"""

import copy
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxhf import metrics as M
from flaxhf.data import batching
from flaxhf.models import auto
from flaxhf.models.losses import IGNORE_INDEX
from flaxhf.train.tasks import Task

log = logging.getLogger("flaxhf")

BATCH_AXES = ("data", "fsdp")  # the engine's batch axes
GENERATION_KEYS = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty",
                   "no_repeat_ngram_size", "early_stopping", "repetition_penalty")


def label_smoothed_losses(logits_BxTxV, labels_BxT, epsilon: float = 0.0):
  """(per-token loss [B, T], valid [B, T]): transformers' LabelSmoother per token, 0 on -100."""
  valid = labels_BxT != IGNORE_INDEX
  logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp_BxTxV, jnp.where(valid, labels_BxT, 0)[..., None], -1)[..., 0]
  if epsilon:
    nll = (1.0 - epsilon) * nll - epsilon * jnp.mean(logp_BxTxV, axis=-1)
  return jnp.where(valid, nll, 0.0), valid


def sharded_generator(model, mesh):
  """A shallow copy of `model` whose generation hooks keep every row-first array of the decode loop
  sharded over the mesh's batch axes, so generate's one compiled program splits the rows as the
  train step does. Inputs must be the same global batch on every process."""
  def constrain(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(BATCH_AXES)))
        if getattr(x, "ndim", 0) > 0 else x, tree)

  prefill, step = model._generation_prefill, model._generation_step
  clone = copy.copy(model)
  clone.__dict__.pop("_generate_programs", None)  # its own compiled programs, not the model's
  clone._generation_prefill = lambda params, ids, mask, cache_len, inputs: constrain(
      prefill(params, constrain(ids), constrain(mask), cache_len, constrain(inputs)))
  clone._generation_step = lambda params, tokens, state: constrain(
      step(params, constrain(tokens), constrain(state)))
  return clone


class Seq2Seq(Task):
  """An encoder-decoder LM (BART, mBART, Marian, T5) trained on (source, target) text pairs."""

  kind = ""  # "translation" | "summarization"
  auto_class = auto.FlaxAutoModelForSeq2SeqLM
  model_inputs = ("input_ids", "attention_mask")
  label_fields = ("labels",)

  def __init__(self, cfg):
    super().__init__(cfg)
    self._generated, self._generator = None, None

  # ---- data and model ----------------------------------------------------------------------------
  def prepare(self, tokenizer):
    from flaxhf.data.seq2seq import prepare_seq2seq
    from flaxhf.models import io
    from flaxhf.train.engine import load_model_config  # late: the engine imports the tasks
    d, m = self.cfg.data, self.cfg.model
    longest = max(int(d.max_source_length), int(d.max_target_length))
    if int(d.max_length) < longest:
      raise ValueError(f"data.max_length={d.max_length} (the batches' padding cap) is below "
                       f"data.max_source_length={d.max_source_length} / max_target_length="
                       f"{d.max_target_length}: set data.max_length={longest}.")
    self.tokenizer = tokenizer
    # The family decides the data layout (mBART's language codes), so read its config now.
    model_dir = io.resolve_model_dir(m.name_or_path) if m.name_or_path else None
    config = load_model_config(m, model_dir)
    self.family = self.auto_class.model_class_for(config)  # its hooks answer what differs
    if self.family.source_prefix_expected and not d.source_prefix and self.kind == "translation":
      log.warning("%s without data.source_prefix: pretrained checkpoints expect e.g. 'translate "
                  "English to Romanian: ' (harmless from scratch).", config.model_type)
    return prepare_seq2seq(d, tokenizer, self.kind, mbart=self.family.language_codes)

  def configure_model(self, config, task_data):
    if not getattr(config, "is_encoder_decoder", False):
      raise ValueError(f"{self.kind} trains an encoder-decoder (BART, mBART, Marian, T5); "
                       f"{type(config).__name__} is not one.")
    tok, m = self.tokenizer, self.cfg.model
    if m.from_scratch:
      # A new tokenizer: the embeddings and every special id come from it, not the config.
      config.vocab_size = len(tok)
      if hasattr(config, "decoder_vocab_size"):  # Marian's separate target vocabulary
        config.decoder_vocab_size = len(tok)
      for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(config, name, getattr(tok, name))
      if getattr(config, "forced_eos_token_id", None) is not None:
        config.forced_eos_token_id = tok.eos_token_id
      config.decoder_start_token_id = self.family.decoder_start_from_tokenizer(tok, self.cfg.data)
    elif len(tok) > config.vocab_size:
      raise ValueError(f"The tokenizer has {len(tok)} tokens but the checkpoint embeds "
                       f"{config.vocab_size}: use the checkpoint's own tokenizer, or train from "
                       "scratch (model.from_scratch=True sizes the embeddings to the tokenizer).")
    if m.decoder_start_token_id is not None:
      config.decoder_start_token_id = int(m.decoder_start_token_id)
    if getattr(config, "decoder_start_token_id", None) is None:
      raise ValueError(f"The {type(config).__name__} has no decoder_start_token_id: labels cannot be "
                       "shifted into decoder inputs, nor generation start. T5 and Marian start "
                       "from the pad token, BART from </s>: set model.decoder_start_token_id="
                       f"{self.family.decoder_start_from_tokenizer(tok, self.cfg.data)}.")
    positions = getattr(config, "max_position_embeddings", None)
    d, ev = self.cfg.data, self.cfg.eval
    needs = {"data.max_source_length": int(d.max_source_length),
             "data.max_target_length": int(d.max_target_length),
             "eval.max_new_tokens + 1": int(ev.max_new_tokens) + 1}
    for name, n in needs.items():
      if positions is not None and n > positions:
        raise ValueError(f"{name}={n} exceeds the model's max_position_embeddings={positions}: "
                         f"lower it, or from scratch raise model.config_overrides="
                         f"'max_position_embeddings={n}'.")
    self.pad_id, self.start_id = int(config.pad_token_id), int(config.decoder_start_token_id)
    self.config = config

  # ---- train and eval steps ----------------------------------------------------------------------
  def device_transform(self, batch, rng, train):
    labels = batch["labels"]
    decoder_input_ids = self.family.shift_labels(labels, self.config)
    # Right padding under a causal mask changes no real position; slot 0 (the start token) stays
    # visible so an eval dummy row (all -100) has no fully masked softmax row.
    decoder_mask = (labels != IGNORE_INDEX).at[:, 0].set(True).astype(jnp.int32)
    return {**batch, "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_mask}

  def loss(self, outputs, batch):
    eps = float(self.cfg.train.label_smoothing)
    per, valid = label_smoothed_losses(outputs.logits, batch["labels"], eps)
    return jnp.sum(per), jnp.sum(valid)

  def predict(self, outputs, batch):
    per, valid = label_smoothed_losses(outputs.logits, batch["labels"])  # unsmoothed NLL
    return {"loss_sum": per.sum(-1), "count": valid.sum(-1)}

  # ---- generation --------------------------------------------------------------------------------
  def generation_kwargs(self) -> dict:
    """generate() settings from the eval config (greedy unless eval.num_beams > 1)."""
    ev = self.cfg.eval
    kw = {k: ev[k] for k in GENERATION_KEYS if ev.get(k) is not None}
    return {**kw, "do_sample": False}

  def generate_eval(self, model, params, task_data, mesh):
    """Generates from every eval source; the decoded texts feed metrics() and save_outputs()."""
    if task_data.eval is None:
      return
    if self._generator is None:
      # One process: the decode loop is split over the batch axes. Several: generate's host-side
      # read-back needs addressable outputs, so each process decodes the global batch replicated.
      self._generator = sharded_generator(model, mesh) if jax.process_count() == 1 else model
    d, ev = self.cfg.data, task_data.eval
    tokens = [None] * len(ev)
    kw = self.generation_kwargs()
    for batch in batching.eval_batches(
        ev, global_batch_size=self.cfg.train.eval_batch_size, buckets=batching.check_buckets(
            d.buckets), max_length={"input_ids": int(d.max_source_length),
                                    "labels": int(d.max_target_length)},
        pad_values=task_data.pad_values, sort_by_length=True):
      out = self._generator.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                                     params=params, **kw)
      sequences = np.asarray(jax.device_get(out.sequences))
      for row, index in enumerate(batch["example_index"]):
        if index >= 0:
          tokens[index] = sequences[row]
    texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
    # Tokens after the start token, up to and including EOS (what transformers' gen_len counts).
    lengths = [int(np.count_nonzero(t[1:] != self.pad_id)) for t in tokens]
    self._generated = {"texts": [t.strip() for t in texts], "lengths": lengths}

  def samples(self, model, params, task_data):
    """The first few eval examples with their generated text (from the eval just run)."""
    if not self._generated:
      return []
    n = min(int(self.cfg.eval.num_samples), len(self._generated["texts"]))
    raw = task_data.eval_raw
    return [{"source": raw["sources"][i], "reference": raw["targets"][i],
             "generated": self._generated["texts"][i]} for i in range(n)]

  def text_metrics(self, predictions, references) -> dict:
    raise NotImplementedError

  def metrics(self, predictions, task_data):
    total = {k: float(np.sum([np.asarray(p[k], np.float64) for p in predictions]))
             for k in ("loss_sum", "count")}
    loss = total["loss_sum"] / max(total["count"], 1.0)
    out = {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0)))}
    if self._generated is not None:
      out.update(self.text_metrics(self._generated["texts"], task_data.eval_raw["targets"]))
      out["gen_len"] = float(np.mean(self._generated["lengths"]))
    return out

  def save_outputs(self, output_dir):
    """generated_predictions.txt: one generated text per eval example, in order."""
    if self._generated is None:
      return
    with open(os.path.join(output_dir, "generated_predictions.txt"), "w", encoding="utf-8") as f:
      # One example per line: a generated line break would shift every later example.
      f.writelines(t.replace("\n", " ") + "\n" for t in self._generated["texts"])


class Translation(Seq2Seq):
  """`translation` rows {lang: text}; BLEU and chrF on generated text."""

  name = kind = "translation"

  def text_metrics(self, predictions, references):
    return M.bleu(predictions, references)

  @property
  def main_metric(self):
    return "bleu", "max"


class Summarization(Seq2Seq):
  """Text and summary columns; ROUGE-1/2/L/Lsum on generated text."""

  name = kind = "summarization"

  def text_metrics(self, predictions, references):
    return M.rouge(predictions, references)

  @property
  def main_metric(self):
    return "rougeL", "max"
