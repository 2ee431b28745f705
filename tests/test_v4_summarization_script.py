"""A summarization script written the transformers-v4 Flax way (run_summarization_flax.py) runs on
flaxhf once its imports are changed: FlaxAutoModelForSeq2SeqLM, `shift_tokens_right` found through
`model.__module__`, label-smoothed psum steps under pmap, `model.generate(num_beams=, max_length=)`
inside a pmapped step, ROUGE, save_pretrained(params=...).

The script is v4's examples/flax/summarization/run_summarization_flax.py cut to what a CI run needs
(no hub, tensorboard, tqdm or predict loop; nltk's punkt download branch and the final results dump
are the CI's), keeping its code as v4 wrote it. A `parallel` switch adds a jit reference: one
device holds the global batch and a unit vmap axis named "batch" serves v4's psums, so the steps
themselves run unchanged. The CI is offline, so the test supplies what the script fetches:
`evaluate.load("rouge")` is a stand-in computing what evaluate's rouge module computes with
rouge-score, and nltk's punkt model is a local parameter file (an abbreviation list).
"""

import json
import sys
import types

import jax
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from test_v4_clm_script import assert_v4_imports_fail, port_v4_imports, run_script

# v4's steps donate buffers XLA cannot always reuse: harmless, and v4's code.
pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

RUN_SUMMARIZATION_FLAX = '''
import json
import logging
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import evaluate
import jax
import jax.numpy as jnp
import nltk  # Here to have a nice missing dependency error message early on
import numpy as np
import optax
from datasets import Dataset, load_dataset
from flax import jax_utils, traverse_util
from flax.jax_utils import pad_shard_unpad, unreplicate
from flax.training import train_state
from flax.training.common_utils import get_metrics, onehot, shard, shard_prng_key

# --- v4 imports ---
from transformers import (
    CONFIG_MAPPING,
    FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoTokenizer,
    FlaxAutoModelForSeq2SeqLM,
    HfArgumentParser,
)
# --- end v4 imports ---

logger = logging.getLogger(__name__)

try:
    nltk.data.find("tokenizers/punkt")
except (LookupError, OSError):
    # (v4 downloads punkt here unless offline; the CI is offline and brings its own)
    raise LookupError("Offline mode: run this script without TRANSFORMERS_OFFLINE first to download nltk data files")

MODEL_CONFIG_CLASSES = list(FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING.keys())
MODEL_TYPES = tuple(conf.model_type for conf in MODEL_CONFIG_CLASSES)


@dataclass
class TrainingArguments:
    output_dir: str = field(metadata={"help": "The output directory."})
    do_train: bool = field(default=False, metadata={"help": "Whether to run training."})
    do_eval: bool = field(default=False, metadata={"help": "Whether to run eval on the dev set."})
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=8)
    learning_rate: float = field(default=5e-5)
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    label_smoothing_factor: float = field(
        default=0.0, metadata={"help": "The label smoothing epsilon to apply (zero means no label smoothing)."}
    )
    num_train_epochs: float = field(default=3.0)
    warmup_steps: int = field(default=0)
    seed: int = field(default=42)
    parallel: str = field(default="pmap", metadata={"help": "pmap (v4) or jit (the CI's reference)."})


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None)
    model_type: Optional[str] = field(
        default=None,
        metadata={"help": "If training from scratch, pass a model type from the list: " + ", ".join(MODEL_TYPES)},
    )
    config_name: Optional[str] = field(default=None)
    tokenizer_name: Optional[str] = field(default=None)
    cache_dir: Optional[str] = field(default=None)
    use_fast_tokenizer: bool = field(default=True)
    dtype: Optional[str] = field(default="float32")


@dataclass
class DataTrainingArguments:
    text_column: Optional[str] = field(default=None)
    summary_column: Optional[str] = field(default=None)
    train_file: Optional[str] = field(default=None)
    validation_file: Optional[str] = field(default=None)
    max_source_length: Optional[int] = field(default=1024)
    max_target_length: Optional[int] = field(default=128)
    val_max_target_length: Optional[int] = field(default=None)
    max_train_samples: Optional[int] = field(default=None)
    max_eval_samples: Optional[int] = field(default=None)
    preprocessing_num_workers: Optional[int] = field(default=None)
    source_prefix: Optional[str] = field(default=None)
    predict_with_generate: bool = field(default=False)
    num_beams: Optional[int] = field(default=None)
    overwrite_cache: bool = field(default=False)

    def __post_init__(self):
        if self.train_file is not None:
            extension = self.train_file.split(".")[-1]
            assert extension in ["csv", "json"], "`train_file` should be a csv or a json file."
        if self.validation_file is not None:
            extension = self.validation_file.split(".")[-1]
            assert extension in ["csv", "json"], "`validation_file` should be a csv or a json file."
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


class TrainState(train_state.TrainState):
    dropout_rng: jnp.ndarray

    def replicate(self):
        return jax_utils.replicate(self).replace(dropout_rng=shard_prng_key(self.dropout_rng))


def data_loader(rng: jax.random.PRNGKey, dataset: Dataset, batch_size: int, shuffle: bool = False, drop_last=True):
    """
    Returns batches of size `batch_size` from `dataset`. If `drop_last` is set to `False`, the final batch may be
    incomplete, and range in size from 1 to `batch_size`. Shuffle batches if `shuffle` is `True`.
    """
    if shuffle:
        batch_idx = jax.random.permutation(rng, len(dataset))
        batch_idx = np.asarray(batch_idx)
    else:
        batch_idx = np.arange(len(dataset))

    if drop_last:
        steps_per_epoch = len(dataset) // batch_size
        batch_idx = batch_idx[: steps_per_epoch * batch_size]  # Skip incomplete batch.
        batch_idx = batch_idx.reshape((steps_per_epoch, batch_size))
    else:
        steps_per_epoch = math.ceil(len(dataset) / batch_size)
        batch_idx = np.array_split(batch_idx, steps_per_epoch)

    for idx in batch_idx:
        batch = dataset[idx]
        batch = {k: np.array(v) for k, v in batch.items()}

        yield batch


def create_learning_rate_fn(
    train_ds_size: int, train_batch_size: int, num_train_epochs: int, num_warmup_steps: int, learning_rate: float
) -> Callable[[int], jnp.ndarray]:
    """Returns a linear warmup, linear_decay learning rate function."""
    steps_per_epoch = train_ds_size // train_batch_size
    num_train_steps = steps_per_epoch * num_train_epochs
    warmup_fn = optax.linear_schedule(init_value=0.0, end_value=learning_rate, transition_steps=num_warmup_steps)
    decay_fn = optax.linear_schedule(
        init_value=learning_rate, end_value=0, transition_steps=num_train_steps - num_warmup_steps
    )
    schedule_fn = optax.join_schedules(schedules=[warmup_fn, decay_fn], boundaries=[num_warmup_steps])
    return schedule_fn


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()

    data_files = {}
    if data_args.train_file is not None:
        data_files["train"] = data_args.train_file
        extension = data_args.train_file.split(".")[-1]
    if data_args.validation_file is not None:
        data_files["validation"] = data_args.validation_file
        extension = data_args.validation_file.split(".")[-1]
    dataset = load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir)

    # Load pretrained model and tokenizer
    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")

    if model_args.tokenizer_name:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.tokenizer_name, cache_dir=model_args.cache_dir, use_fast=model_args.use_fast_tokenizer
        )
    elif model_args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, use_fast=model_args.use_fast_tokenizer
        )
    else:
        raise ValueError(
            "You are instantiating a new tokenizer from scratch. This is not supported by this script. "
            "You can do it from another script, save it, and load it from here, using --tokenizer_name."
        )

    if model_args.model_name_or_path:
        model = FlaxAutoModelForSeq2SeqLM.from_pretrained(
            model_args.model_name_or_path, config=config, seed=training_args.seed, dtype=getattr(jnp, model_args.dtype)
        )
    else:
        model = FlaxAutoModelForSeq2SeqLM.from_config(
            config, seed=training_args.seed, dtype=getattr(jnp, model_args.dtype)
        )

    if model.config.decoder_start_token_id is None:
        raise ValueError("Make sure that `config.decoder_start_token_id` is correctly defined")

    prefix = data_args.source_prefix if data_args.source_prefix is not None else ""

    # Preprocessing the datasets.
    # We need to tokenize inputs and targets.
    if training_args.do_train:
        column_names = dataset["train"].column_names
    elif training_args.do_eval:
        column_names = dataset["validation"].column_names
    else:
        logger.info("There is nothing to do. Please pass `do_train` and/or `do_eval`.")
        return

    # Get the column names for input/target.
    if data_args.text_column is None:
        text_column = column_names[0]
    else:
        text_column = data_args.text_column
        if text_column not in column_names:
            raise ValueError(
                f"--text_column' value '{data_args.text_column}' needs to be one of: {', '.join(column_names)}"
            )
    if data_args.summary_column is None:
        summary_column = column_names[1]
    else:
        summary_column = data_args.summary_column
        if summary_column not in column_names:
            raise ValueError(
                f"--summary_column' value '{data_args.summary_column}' needs to be one of: {', '.join(column_names)}"
            )

    # Temporarily set max_target_length for training.
    max_target_length = data_args.max_target_length

    # In Flax, for seq2seq models we need to pass `decoder_input_ids`
    # as the Flax models don't accept `labels`, we need to prepare the decoder_input_ids here
    # for that dynamically import the `shift_tokens_right` function from the model file
    model_module = __import__(model.__module__, fromlist=["shift_tokens_tight"])
    shift_tokens_right_fn = getattr(model_module, "shift_tokens_right")

    # Setting padding="max_length" as we need fixed length inputs for jitted functions
    def preprocess_function(examples):
        inputs = examples[text_column]
        targets = examples[summary_column]
        inputs = [prefix + inp for inp in inputs]
        model_inputs = tokenizer(
            inputs, max_length=data_args.max_source_length, padding="max_length", truncation=True, return_tensors="np"
        )

        # Setup the tokenizer for targets
        labels = tokenizer(
            text_target=targets,
            max_length=max_target_length,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )

        model_inputs["labels"] = labels["input_ids"]
        decoder_input_ids = shift_tokens_right_fn(
            labels["input_ids"], config.pad_token_id, config.decoder_start_token_id
        )
        model_inputs["decoder_input_ids"] = np.asarray(decoder_input_ids)

        # We need decoder_attention_mask so we can ignore pad tokens from loss
        model_inputs["decoder_attention_mask"] = labels["attention_mask"]

        return model_inputs

    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train requires a train dataset")
        train_dataset = dataset["train"]
        if data_args.max_train_samples is not None:
            max_train_samples = min(len(train_dataset), data_args.max_train_samples)
            train_dataset = train_dataset.select(range(max_train_samples))
        train_dataset = train_dataset.map(
            preprocess_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on train dataset",
        )

    if training_args.do_eval:
        max_target_length = data_args.val_max_target_length
        if "validation" not in dataset:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = dataset["validation"]
        if data_args.max_eval_samples is not None:
            max_eval_samples = min(len(eval_dataset), data_args.max_eval_samples)
            eval_dataset = eval_dataset.select(range(max_eval_samples))
        eval_dataset = eval_dataset.map(
            preprocess_function,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=column_names,
            load_from_cache_file=not data_args.overwrite_cache,
            desc="Running tokenizer on validation dataset",
        )

    # Metric
    metric = evaluate.load("rouge", cache_dir=model_args.cache_dir)

    def postprocess_text(preds, labels):
        preds = [pred.strip() for pred in preds]
        labels = [label.strip() for label in labels]

        # rougeLSum expects newline after each sentence
        preds = ["\\n".join(nltk.sent_tokenize(pred)) for pred in preds]
        labels = ["\\n".join(nltk.sent_tokenize(label)) for label in labels]

        return preds, labels

    def compute_metrics(preds, labels):
        decoded_preds = tokenizer.batch_decode(preds, skip_special_tokens=True)
        decoded_labels = tokenizer.batch_decode(labels, skip_special_tokens=True)

        # Some simple post-processing
        decoded_preds, decoded_labels = postprocess_text(decoded_preds, decoded_labels)

        result = metric.compute(predictions=decoded_preds, references=decoded_labels, use_stemmer=True)
        result = {k: round(v * 100, 4) for k, v in result.items()}
        prediction_lens = [np.count_nonzero(pred != tokenizer.pad_token_id) for pred in preds]
        result["gen_len"] = np.mean(prediction_lens)
        return result

    # Initialize our training
    rng = jax.random.PRNGKey(training_args.seed)
    rng, dropout_rng = jax.random.split(rng)

    # Store some constant
    num_epochs = int(training_args.num_train_epochs)
    train_batch_size = int(training_args.per_device_train_batch_size) * jax.device_count()
    per_device_eval_batch_size = int(training_args.per_device_eval_batch_size)
    eval_batch_size = per_device_eval_batch_size * jax.device_count()
    steps_per_epoch = len(train_dataset) // train_batch_size
    total_train_steps = steps_per_epoch * num_epochs

    # Create learning rate schedule
    linear_decay_lr_schedule_fn = create_learning_rate_fn(
        len(train_dataset),
        train_batch_size,
        training_args.num_train_epochs,
        training_args.warmup_steps,
        training_args.learning_rate,
    )

    # We use Optax's "masking" functionality to not apply weight decay
    # to bias and LayerNorm scale parameters. decay_mask_fn returns a
    # mask boolean with the same structure as the parameters.
    # The mask is True for parameters that should be decayed.
    def decay_mask_fn(params):
        flat_params = traverse_util.flatten_dict(params)
        # find out all LayerNorm parameters
        layer_norm_candidates = ["layernorm", "layer_norm", "ln"]
        layer_norm_named_params = {
            layer[-2:]
            for layer_norm_name in layer_norm_candidates
            for layer in flat_params.keys()
            if layer_norm_name in "".join(layer).lower()
        }
        flat_mask = {path: (path[-1] != "bias" and path[-2:] not in layer_norm_named_params) for path in flat_params}
        return traverse_util.unflatten_dict(flat_mask)

    # create adam optimizer
    adamw = optax.adamw(
        learning_rate=linear_decay_lr_schedule_fn,
        b1=training_args.adam_beta1,
        b2=training_args.adam_beta2,
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
        mask=decay_mask_fn,
    )

    # Setup train state
    state = TrainState.create(apply_fn=model.__call__, params=model.params, tx=adamw, dropout_rng=dropout_rng)

    # label smoothed cross entropy
    def loss_fn(logits, labels, padding_mask, label_smoothing_factor=0.0):
        """
        The label smoothing implementation is adapted from Flax's official example:
        https://github.com/google/flax/blob/87a211135c6a377c8f29048a1cac3840e38b9da4/examples/wmt/train.py#L104
        """
        vocab_size = logits.shape[-1]
        confidence = 1.0 - label_smoothing_factor
        low_confidence = (1.0 - confidence) / (vocab_size - 1)
        normalizing_constant = -(
            confidence * jnp.log(confidence) + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
        )
        soft_labels = onehot(labels, vocab_size, on_value=confidence, off_value=low_confidence)

        loss = optax.softmax_cross_entropy(logits, soft_labels)
        loss = loss - normalizing_constant

        # ignore padded tokens from loss
        loss = loss * padding_mask
        loss = loss.sum()
        num_labels = padding_mask.sum()
        return loss, num_labels

    # Define gradient update step fn
    def train_step(state, batch, label_smoothing_factor=0.0):
        dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

        def compute_loss(params):
            labels = batch.pop("labels")
            logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
            loss, num_labels = loss_fn(logits, labels, batch["decoder_attention_mask"], label_smoothing_factor)
            return loss, num_labels

        grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
        (loss, num_labels), grad = grad_fn(state.params)
        num_labels = jax.lax.psum(num_labels, "batch")

        # true loss = total loss / total samples
        loss = jax.lax.psum(loss, "batch")
        loss = jax.tree_util.tree_map(lambda x: x / num_labels, loss)

        # true grad = total grad / total samples
        grad = jax.lax.psum(grad, "batch")
        grad = jax.tree_util.tree_map(lambda x: x / num_labels, grad)
        new_state = state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng)

        metrics = {"loss": loss, "learning_rate": linear_decay_lr_schedule_fn(state.step)}
        return new_state, metrics

    # Define eval fn
    def eval_step(params, batch, label_smoothing_factor=0.0):
        labels = batch.pop("labels")
        logits = model(**batch, params=params, train=False)[0]

        loss, num_labels = loss_fn(logits, labels, batch["decoder_attention_mask"], label_smoothing_factor)
        num_labels = jax.lax.psum(num_labels, "batch")

        # true loss = total loss / total samples
        loss = jax.lax.psum(loss, "batch")
        loss = jax.tree_util.tree_map(lambda x: x / num_labels, loss)

        metrics = {"loss": loss}
        return metrics

    # Define generation function
    max_length = (
        data_args.val_max_target_length if data_args.val_max_target_length is not None else model.config.max_length
    )
    num_beams = data_args.num_beams if data_args.num_beams is not None else model.config.num_beams
    gen_kwargs = {"max_length": max_length, "num_beams": num_beams}

    def generate_step(params, batch):
        model.params = params
        output_ids = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **gen_kwargs)
        return output_ids.sequences

    if training_args.parallel == "pmap":
        # Create parallel version of the train and eval step
        p_train_step = jax.pmap(
            partial(train_step, label_smoothing_factor=training_args.label_smoothing_factor), "batch", donate_argnums=(0,)
        )
        p_eval_step = jax.pmap(partial(eval_step, label_smoothing_factor=training_args.label_smoothing_factor), "batch")
        p_generate_step = jax.pmap(generate_step, "batch")

        # Replicate the train state on each device
        state = state.replicate()
    else:
        # (the CI's jit reference: the global batch on one device, in a unit axis named "batch")
        def unit(tree):
            return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], tree)

        p_train_step = jax.jit(
            jax.vmap(partial(train_step, label_smoothing_factor=training_args.label_smoothing_factor), axis_name="batch"),
            donate_argnums=(0,),
        )
        p_eval_step = jax.jit(
            jax.vmap(partial(eval_step, label_smoothing_factor=training_args.label_smoothing_factor), axis_name="batch")
        )
        state = unit(state)

    logger.info("***** Running training *****")
    train_losses, epoch_eval_metrics = [], []  # (the CI's record)
    for epoch in range(num_epochs):
        # ======================== Training ================================

        # Create sampling rng
        rng, input_rng = jax.random.split(rng)
        train_metrics = []

        # Generate an epoch by shuffling sampling indices from the train dataset
        train_loader = data_loader(input_rng, train_dataset, train_batch_size, shuffle=True)
        steps_per_epoch = len(train_dataset) // train_batch_size
        # train
        for _ in range(steps_per_epoch):
            batch = next(train_loader)
            batch = shard(batch) if training_args.parallel == "pmap" else unit(batch)
            state, train_metric = p_train_step(state, batch)
            train_metrics.append(train_metric)
            train_losses.append(float(unreplicate(train_metric)["loss"]))

        train_metric = unreplicate(train_metric)

        # ======================== Evaluating ==============================
        eval_metrics = []
        eval_preds = []
        eval_labels = []

        eval_loader = data_loader(input_rng, eval_dataset, eval_batch_size, drop_last=False)
        eval_steps = math.ceil(len(eval_dataset) / eval_batch_size)
        for _ in range(eval_steps):
            # Model forward
            batch = next(eval_loader)
            labels = batch["labels"]

            if training_args.parallel == "pmap":
                metrics = pad_shard_unpad(p_eval_step, static_return=True)(
                    state.params, batch, min_device_batch=per_device_eval_batch_size
                )
            else:
                metrics = p_eval_step(state.params, unit(batch))
            eval_metrics.append(metrics)

            # generation
            if data_args.predict_with_generate:
                generated_ids = pad_shard_unpad(p_generate_step)(state.params, batch)
                eval_preds.extend(jax.device_get(generated_ids.reshape(-1, gen_kwargs["max_length"])))
                eval_labels.extend(labels)

        # normalize eval metrics
        eval_metrics = get_metrics(eval_metrics)
        eval_metrics = jax.tree_util.tree_map(jnp.mean, eval_metrics)

        # compute ROUGE metrics
        rouge_desc = ""
        if data_args.predict_with_generate:
            rouge_metrics = compute_metrics(eval_preds, eval_labels)
            eval_metrics.update(rouge_metrics)
            rouge_desc = " ".join([f"Eval {key}: {value} |" for key, value in rouge_metrics.items()])

        # Print metrics and update progress bar
        desc = f"Epoch... ({epoch + 1}/{num_epochs} | Eval Loss: {eval_metrics['loss']} | {rouge_desc})"
        logger.info(desc)
        epoch_eval_metrics.append({k: float(v) for k, v in eval_metrics.items()})

        # save checkpoint after each epoch and push checkpoint to the hub
        if jax.process_index() == 0:
            params = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], state.params))
            model.save_pretrained(training_args.output_dir, params=params)
            tokenizer.save_pretrained(training_args.output_dir)

    # (the CI's results dump)
    if jax.process_index() == 0:
        results = {
            "train_losses": train_losses,
            "total_train_steps": total_train_steps,
            "eval_metrics": epoch_eval_metrics,
            "eval_preds": np.asarray(eval_preds).tolist(),
            "model_types": list(MODEL_TYPES),
        }
        with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=4, sort_keys=True)


if __name__ == "__main__":
    main()
'''

ROUGE_TYPES = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
# Abbreviations whose period ends no sentence, as nltk's English punkt model knows them.
ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "e.g", "i.e",
                 "a.m", "p.m", "u.s", "u.k")
N_TRAIN, N_EVAL, MAX_SOURCE, MAX_TARGET, NUM_BEAMS, EPOCHS = 128, 12, 64, 24, 2, 8


class RougeStandIn:
  """What `evaluate.load("rouge")` returns, offline: evaluate's rouge module computes exactly this
  (rouge-score F-measures, the bootstrap aggregate's mid), so the script's metric code is v4's."""

  def compute(self, predictions, references, use_stemmer=False):
    from rouge_score import rouge_scorer, scoring
    scorer = rouge_scorer.RougeScorer(rouge_types=ROUGE_TYPES, use_stemmer=use_stemmer)
    aggregator = scoring.BootstrapAggregator()
    for ref, pred in zip(references, predictions):
      aggregator.add_scores(scorer.score(ref, pred))
    return {k: v.mid.fmeasure for k, v in aggregator.aggregate().items()}


def offline_script_environment(monkeypatch, root):
  """`import evaluate` gets the ROUGE stand-in; nltk finds a local punkt model (abbreviations)."""
  import nltk
  import nltk.tokenize
  evaluate = types.ModuleType("evaluate")
  evaluate.load = lambda name, **kwargs: {"rouge": RougeStandIn}[name]()
  monkeypatch.setitem(sys.modules, "evaluate", evaluate)
  english = root / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
  english.mkdir(parents=True)
  (root / "nltk_data" / "tokenizers" / "punkt").mkdir()  # what v4's start-up check looks for
  (english / "abbrev_types.txt").write_text("\n".join(ABBREVIATIONS) + "\n")
  for name in ("collocations.tab", "sent_starters.txt", "ortho_context.tab"):
    (english / name).write_text("")
  monkeypatch.setattr(nltk.data, "path", [str(root / "nltk_data")] + list(nltk.data.path))
  nltk.tokenize._get_punkt_tokenizer.cache_clear()


def write_rows(src, dst, n):
  with open(src) as f, open(dst, "w") as out:
    for _, line in zip(range(n), f):
      out.write(line)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
  """{mode: (output dir, results), "validation_file": path}: the ported script with pmap (beam
  search in eval) and jit, on a from-scratch BART and a tokenizer trained on a DialogSum slice."""
  from flaxhf.data.tokenizer_training import read_texts, train_tokenizer
  root = tmp_path_factory.mktemp("v4_summarization")
  source = data_dir / "summarization" / "dialogsum"
  write_rows(source / "dialogsum.train.jsonl", root / "train.json", N_TRAIN)
  write_rows(source / "dialogsum.dev.jsonl", root / "validation.json", N_EVAL)
  model_dir = root / "tiny-bart"
  tokenizer = train_tokenizer(read_texts(str(source / "dialogsum.train.jsonl"),
                                         ["dialogue", "summary"], max_rows=200),
                              str(model_dir), "bart", vocab_size=1000)
  # Dropout off: 8 pmap replicas summing their shards then take exactly the jit steps. A wide
  # init (std 0.3, not 0.02) keeps the trained tiny model's beams input-dependent: with 0.02 every
  # row gets the same summary, and the beam-search comparison with PyTorch would check less.
  transformers.BartConfig(
      vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1,
      encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
      max_position_embeddings=64, dropout=0.0, attention_dropout=0.0,
      activation_dropout=0.0, init_std=0.3).save_pretrained(model_dir)
  ported = port_v4_imports(RUN_SUMMARIZATION_FLAX)
  out = {}
  with pytest.MonkeyPatch.context() as monkeypatch:
    offline_script_environment(monkeypatch, root)
    for mode in ("pmap", "jit"):
      out_dir = root / mode
      run_script(ported, [
          "--output_dir", str(out_dir), "--model_type", "bart", "--config_name", str(model_dir),
          "--tokenizer_name", str(model_dir), "--train_file", str(root / "train.json"),
          "--validation_file", str(root / "validation.json"), "--cache_dir", str(root / "cache"),
          "--text_column", "dialogue", "--summary_column", "summary", "--do_train", "--do_eval",
          "--max_source_length", str(MAX_SOURCE), "--max_target_length", str(MAX_TARGET),
          "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
          "--num_train_epochs", str(EPOCHS), "--learning_rate", "1e-2", "--warmup_steps", "2",
          "--weight_decay", "0.01", "--label_smoothing_factor", "0.1", "--seed", "0",
          "--num_beams", str(NUM_BEAMS), "--parallel", mode,
          *(["--predict_with_generate"] if mode == "pmap" else [])], monkeypatch,
          "run_summarization_flax")
      out[mode] = (str(out_dir), json.loads((out_dir / "eval_results.json").read_text()))
    sys.modules["nltk.tokenize"]._get_punkt_tokenizer.cache_clear()  # drop the local punkt model
  out["validation_file"] = str(root / "validation.json")
  return out


def test_unported_script_fails_on_transformers_5():
  assert_v4_imports_fail(RUN_SUMMARIZATION_FLAX, "FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING")
  want = ("from flaxhf import FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, "
          "FlaxAutoModelForSeq2SeqLM\n")
  assert want in port_v4_imports(RUN_SUMMARIZATION_FLAX)


def test_loss_goes_down_pmap_equals_jit_and_rouge(runs):
  (_, pmap), (_, jit) = runs["pmap"], runs["jit"]
  assert {"bart", "mbart", "marian", "t5", "mt5"} <= set(pmap["model_types"])
  losses = pmap["train_losses"]
  assert len(losses) == pmap["total_train_steps"] == EPOCHS * N_TRAIN // 8  # 8 devices, 1 row each
  assert np.isfinite(losses).all()
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses  # about 7.1 -> 2.6
  evals = pmap["eval_metrics"]
  assert evals[-1]["loss"] < evals[0]["loss"] < np.mean(losses[:3]), evals
  # pmap's psum over 8 shards == one device's sum over the global batch (dropout is off).
  np.testing.assert_allclose(jit["train_losses"], losses, rtol=1e-4)
  # pad_shard_unpad pads each 6-row eval batch with zero rows; their decoder mask keeps them out
  # of the loss.
  np.testing.assert_allclose([e["loss"] for e in jit["eval_metrics"]],
                             [e["loss"] for e in evals], rtol=1e-4)
  for e in evals:
    assert set(ROUGE_TYPES) <= set(e) and all(0.0 <= e[k] <= 100.0 for k in ROUGE_TYPES), e
    assert 1 < e["gen_len"] <= MAX_TARGET
  assert evals[-1]["rouge1"] > 5.0, evals  # frequent summary words ("#Person1#", "the") are learnt
  assert len({tuple(p) for p in pmap["eval_preds"]}) > N_EVAL // 2  # the beams read the dialogue


def test_export_loads_in_transformers_with_same_logits_and_beam_search(runs):
  out_dir, results = runs["pmap"]
  pt, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  pt.eval()
  fx = flaxhf.FlaxAutoModelForSeq2SeqLM.from_pretrained(out_dir)
  tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  with open(runs["validation_file"]) as f:
    rows = [json.loads(line) for line in f]
  enc = tok([r["dialogue"] for r in rows], max_length=MAX_SOURCE, padding="max_length",
            truncation=True, return_tensors="np")
  labels = tok(text_target=[r["summary"] for r in rows[:4]], max_length=MAX_TARGET,
               padding="max_length", truncation=True, return_tensors="np")["input_ids"]
  dec = np.asarray(flaxhf.models.bart.shift_tokens_right(labels, tok.pad_token_id,
                                                         pt.config.decoder_start_token_id))
  with torch.no_grad():
    want = pt(input_ids=torch.tensor(enc["input_ids"][:4]),
              attention_mask=torch.tensor(enc["attention_mask"][:4]),
              decoder_input_ids=torch.tensor(dec)).logits.numpy()
  # (jitted: one compile instead of one per op)
  forward = jax.jit(lambda ids, mask, d: fx(ids, attention_mask=mask, decoder_input_ids=d).logits)
  got = forward(enc["input_ids"][:4], enc["attention_mask"][:4], dec)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  # The script's pmapped beam search (the last epoch's weights, the ones saved) is PyTorch's:
  # v4's Flax generate pads every row to max_length, PyTorch's stops at the longest row.
  with torch.no_grad():
    torch_ids = pt.generate(input_ids=torch.tensor(enc["input_ids"]),
                            attention_mask=torch.tensor(enc["attention_mask"]),
                            num_beams=NUM_BEAMS, max_length=MAX_TARGET).numpy()
  padded = np.full((len(rows), MAX_TARGET), tok.pad_token_id)
  padded[:, :torch_ids.shape[1]] = torch_ids
  assert np.asarray(results["eval_preds"]).shape == (N_EVAL, MAX_TARGET)
  np.testing.assert_array_equal(np.asarray(results["eval_preds"]), padded)
