"""A masked-LM script written the transformers-v4 Flax way (run_mlm_flax.py) runs on flaxhf once its
imports are changed: it starts from FLAX_MODEL_FOR_MASKED_LM_MAPPING, as v4's does.

The script is v4's examples/flax/language-modeling/run_mlm_flax.py cut to what a CI run needs (no
hub, tensorboard or intermediate checkpoints), keeping its code as v4 wrote it: its own masking
collator, psum-normalised pmap steps, save_pretrained of the unreplicated params.
"""

import json

import numpy as np
import pytest
import torch
import transformers

import flaxhf
from test_v4_clm_script import assert_v4_imports_fail, port_v4_imports, run_script

# v4's eval step donates its params argument, which XLA cannot reuse: harmless, and v4's code.
pytestmark = pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")

RUN_MLM_FLAX = '''
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from datasets import load_dataset
from flax import jax_utils, traverse_util
from flax.training import train_state
from flax.training.common_utils import get_metrics, onehot, shard

# --- v4 imports ---
from transformers import (
    CONFIG_MAPPING,
    FLAX_MODEL_FOR_MASKED_LM_MAPPING,
    AutoConfig,
    AutoTokenizer,
    FlaxAutoModelForMaskedLM,
    HfArgumentParser,
    PreTrainedTokenizerBase,
    TensorType,
    set_seed,
)
# --- end v4 imports ---

MODEL_CONFIG_CLASSES = list(FLAX_MODEL_FOR_MASKED_LM_MAPPING.keys())
MODEL_TYPES = tuple(conf.model_type for conf in MODEL_CONFIG_CLASSES)

logger = logging.getLogger(__name__)


@dataclass
class TrainingArguments:
    output_dir: str = field(metadata={"help": "The output directory."})
    per_device_train_batch_size: int = field(default=8)
    per_device_eval_batch_size: int = field(default=8)
    learning_rate: float = field(default=5e-5)
    weight_decay: float = field(default=0.0)
    adam_beta1: float = field(default=0.9)
    adam_beta2: float = field(default=0.999)
    adam_epsilon: float = field(default=1e-8)
    num_train_epochs: float = field(default=3.0)
    warmup_steps: int = field(default=0)
    seed: int = field(default=42)


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
    dtype: Optional[str] = field(default="float32")


@dataclass
class DataTrainingArguments:
    train_file: Optional[str] = field(default=None)
    validation_file: Optional[str] = field(default=None)
    max_seq_length: Optional[int] = field(default=None)
    mlm_probability: float = field(default=0.15)
    pad_to_max_length: bool = field(default=False)


@flax.struct.dataclass
class FlaxDataCollatorForLanguageModeling:
    """
    Data collator used for language modeling. Inputs are dynamically padded to the maximum length of a batch if they
    are not all of the same length.
    """

    tokenizer: PreTrainedTokenizerBase
    mlm_probability: float = 0.15

    def __post_init__(self):
        if self.tokenizer.mask_token is None:
            raise ValueError(
                "This tokenizer does not have a mask token which is necessary for masked language modeling. "
                "You should pass `mlm=False` to train on causal language modeling instead."
            )

    def __call__(self, examples: List[Dict[str, np.ndarray]], pad_to_multiple_of: int) -> Dict[str, np.ndarray]:
        # Handle dict or lists with proper padding and conversion to tensor.
        batch = self.tokenizer.pad(examples, pad_to_multiple_of=pad_to_multiple_of, return_tensors=TensorType.NUMPY)

        # If special token mask has been preprocessed, pop it from the dict.
        special_tokens_mask = batch.pop("special_tokens_mask", None)

        batch["input_ids"], batch["labels"] = self.mask_tokens(
            batch["input_ids"], special_tokens_mask=special_tokens_mask
        )
        return batch

    def mask_tokens(
        self, inputs: np.ndarray, special_tokens_mask: Optional[np.ndarray]
    ) -> Tuple[np.ndarray, np.ndarray]:
        """
        Prepare masked tokens inputs/labels for masked language modeling: 80% MASK, 10% random, 10% original.
        """
        labels = inputs.copy()
        # We sample a few tokens in each sequence for MLM training (with probability `self.mlm_probability`)
        probability_matrix = np.full(labels.shape, self.mlm_probability)
        special_tokens_mask = special_tokens_mask.astype("bool")

        probability_matrix[special_tokens_mask] = 0.0
        masked_indices = np.random.binomial(1, probability_matrix).astype("bool")
        labels[~masked_indices] = -100  # We only compute loss on masked tokens

        # 80% of the time, we replace masked input tokens with tokenizer.mask_token ([MASK])
        indices_replaced = np.random.binomial(1, np.full(labels.shape, 0.8)).astype("bool") & masked_indices
        inputs[indices_replaced] = self.tokenizer.convert_tokens_to_ids(self.tokenizer.mask_token)

        # 10% of the time, we replace masked input tokens with random word
        indices_random = np.random.binomial(1, np.full(labels.shape, 0.5)).astype("bool")
        indices_random &= masked_indices & ~indices_replaced

        random_words = np.random.randint(self.tokenizer.vocab_size, size=labels.shape, dtype="i4")
        inputs[indices_random] = random_words[indices_random]

        # The rest of the time (10% of the time) we keep the masked input tokens unchanged
        return inputs, labels


def generate_batch_splits(samples_idx: np.ndarray, batch_size: int, drop_last=True) -> np.ndarray:
    """Generate batches of data for a specified batch size from sample indices. If the dataset size is not divisible by
    the batch size and `drop_last` is `True`, the last incomplete batch is dropped. Else, it is returned."""
    num_samples = len(samples_idx)
    if drop_last:
        samples_to_remove = num_samples % batch_size
        if samples_to_remove != 0:
            samples_idx = samples_idx[:-samples_to_remove]
        sections_split = num_samples // batch_size
        samples_idx = samples_idx.reshape((sections_split, batch_size))
    else:
        sections_split = math.ceil(num_samples / batch_size)
        samples_idx = np.array_split(samples_idx, sections_split)
    return samples_idx


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    datasets = load_dataset("text", data_files=data_files, cache_dir=model_args.cache_dir)

    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, cache_dir=model_args.cache_dir)

    column_names = datasets["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    # Otherwise, we tokenize every text, then concatenate them together before splitting them in smaller parts.
    # We use `return_special_tokens_mask=True` because DataCollatorForLanguageModeling (see below) is more
    # efficient when it receives the `special_tokens_mask`.
    def tokenize_function(examples):
        return tokenizer(examples[text_column_name], return_special_tokens_mask=True)

    tokenized_datasets = datasets.map(tokenize_function, batched=True, remove_columns=column_names)

    # Main data processing function that will concatenate all texts from our dataset and generate chunks of
    # max_seq_length.
    def group_texts(examples):
        # Concatenate all texts.
        concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        # We drop the small remainder, we could add padding if the model supported it instead of this drop.
        if total_length >= max_seq_length:
            total_length = (total_length // max_seq_length) * max_seq_length
        # Split by chunks of max_len.
        result = {
            k: [t[i : i + max_seq_length] for i in range(0, total_length, max_seq_length)]
            for k, t in concatenated_examples.items()
        }
        return result

    tokenized_datasets = tokenized_datasets.map(group_texts, batched=True)

    if model_args.model_name_or_path:
        model = FlaxAutoModelForMaskedLM.from_pretrained(
            model_args.model_name_or_path, config=config, seed=training_args.seed, dtype=getattr(jnp, model_args.dtype)
        )
    else:
        model = FlaxAutoModelForMaskedLM.from_config(
            config, seed=training_args.seed, dtype=getattr(jnp, model_args.dtype)
        )

    # Store some constant
    num_epochs = int(training_args.num_train_epochs)
    train_batch_size = int(training_args.per_device_train_batch_size) * jax.device_count()
    per_device_eval_batch_size = int(training_args.per_device_eval_batch_size)
    eval_batch_size = per_device_eval_batch_size * jax.device_count()

    num_train_steps = len(tokenized_datasets["train"]) // train_batch_size * num_epochs

    # Data collator
    # This one will take care of randomly masking the tokens.
    data_collator = FlaxDataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=data_args.mlm_probability)

    # Initialize our training
    rng = jax.random.PRNGKey(training_args.seed)
    dropout_rngs = jax.random.split(rng, jax.local_device_count())

    # Create learning rate schedule
    warmup_fn = optax.linear_schedule(
        init_value=0.0, end_value=training_args.learning_rate, transition_steps=training_args.warmup_steps
    )
    decay_fn = optax.linear_schedule(
        init_value=training_args.learning_rate,
        end_value=0,
        transition_steps=num_train_steps - training_args.warmup_steps,
    )
    linear_decay_lr_schedule_fn = optax.join_schedules(
        schedules=[warmup_fn, decay_fn], boundaries=[training_args.warmup_steps]
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

    optimizer = optax.adamw(
        learning_rate=linear_decay_lr_schedule_fn,
        b1=training_args.adam_beta1,
        b2=training_args.adam_beta2,
        eps=training_args.adam_epsilon,
        weight_decay=training_args.weight_decay,
        mask=decay_mask_fn,
    )

    # Setup train state
    state = train_state.TrainState.create(apply_fn=model.__call__, params=model.params, tx=optimizer)

    # Define gradient update step fn
    def train_step(state, batch, dropout_rng):
        dropout_rng, new_dropout_rng = jax.random.split(dropout_rng)

        def loss_fn(params):
            labels = batch.pop("labels")

            logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]

            # compute loss, ignore padded input tokens
            label_mask = jnp.where(labels > 0, 1.0, 0.0)
            loss = optax.softmax_cross_entropy(logits, onehot(labels, logits.shape[-1])) * label_mask

            # take average
            loss = loss.sum()
            num_labels = label_mask.sum()

            return loss, num_labels

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, num_labels), grad = grad_fn(state.params)
        num_labels = jax.lax.psum(num_labels, "batch")

        # true loss = total loss / total samples
        loss = jax.lax.psum(loss, "batch")
        loss = jax.tree_util.tree_map(lambda x: x / num_labels, loss)

        # true grad = total grad / total samples
        grad = jax.lax.psum(grad, "batch")
        grad = jax.tree_util.tree_map(lambda x: x / num_labels, grad)
        new_state = state.apply_gradients(grads=grad)

        metrics = {"loss": loss, "learning_rate": linear_decay_lr_schedule_fn(state.step)}

        return new_state, metrics, new_dropout_rng

    # Create parallel version of the train step
    p_train_step = jax.pmap(train_step, "batch", donate_argnums=(0,))

    # Define eval fn
    def eval_step(params, batch):
        labels = batch.pop("labels")

        logits = model(**batch, params=params, train=False)[0]

        # compute loss, ignore padded input tokens
        label_mask = jnp.where(labels > 0, 1.0, 0.0)
        loss = optax.softmax_cross_entropy(logits, onehot(labels, logits.shape[-1])) * label_mask

        # compute accuracy
        accuracy = jnp.equal(jnp.argmax(logits, axis=-1), labels) * label_mask

        # summarize metrics
        metrics = {"loss": loss.sum(), "accuracy": accuracy.sum(), "normalizer": label_mask.sum()}
        metrics = jax.lax.psum(metrics, axis_name="batch")

        return metrics

    p_eval_step = jax.pmap(eval_step, "batch", donate_argnums=(0,))

    # Replicate the train state on each device
    state = jax_utils.replicate(state)

    def evaluate(params):
        num_eval_samples = len(tokenized_datasets["validation"])
        eval_samples_idx = np.arange(num_eval_samples)
        eval_batch_idx = generate_batch_splits(eval_samples_idx, eval_batch_size)
        eval_metrics = []
        for i, batch_idx in enumerate(eval_batch_idx):
            samples = [tokenized_datasets["validation"][int(idx)] for idx in batch_idx]
            model_inputs = data_collator(samples, pad_to_multiple_of=16)
            # Model forward
            model_inputs = shard(model_inputs.data)
            metrics = p_eval_step(params, model_inputs)
            eval_metrics.append(metrics)
        # normalize eval metrics
        eval_metrics = get_metrics(eval_metrics)
        eval_metrics = jax.tree_util.tree_map(jnp.sum, eval_metrics)
        eval_normalizer = eval_metrics.pop("normalizer")
        return {k: float(v / eval_normalizer) for k, v in eval_metrics.items()}

    train_losses = []
    for epoch in range(num_epochs):
        # ======================== Training ================================
        # Create sampling rng
        rng, input_rng = jax.random.split(rng)

        # Generate an epoch by shuffling sampling indices from the train dataset
        num_train_samples = len(tokenized_datasets["train"])
        # Avoid using jax.numpy here in case of TPU training
        train_samples_idx = np.random.permutation(np.arange(num_train_samples))
        train_batch_idx = generate_batch_splits(train_samples_idx, train_batch_size)

        # Gather the indexes for creating the batch and do a training step
        for step, batch_idx in enumerate(train_batch_idx):
            samples = [tokenized_datasets["train"][int(idx)] for idx in batch_idx]
            model_inputs = data_collator(samples, pad_to_multiple_of=16)

            # Model forward
            model_inputs = shard(model_inputs.data)
            state, train_metric, dropout_rngs = p_train_step(state, model_inputs, dropout_rngs)
            train_losses.append(float(jax_utils.unreplicate(train_metric)["loss"]))

    # ======================== Evaluating ==============================
    eval_metrics = evaluate(state.params)

    # save checkpoint
    if jax.process_index() == 0:
        params = jax.device_get(jax.tree_util.tree_map(lambda x: x[0], state.params))
        model.save_pretrained(training_args.output_dir, params=params)
        tokenizer.save_pretrained(training_args.output_dir)
        eval_metrics = {f"eval_{metric_name}": value for metric_name, value in eval_metrics.items()}
        eval_metrics["train_losses"] = train_losses
        path = os.path.join(training_args.output_dir, "eval_results.json")
        with open(path, "w") as f:
            json.dump(eval_metrics, f, indent=4, sort_keys=True)


if __name__ == "__main__":
    main()
'''

TEXT = """the cat sat on the mat and the dog sat on the rug .
the dog ran in the park and the cat slept in the sun .
a bird sang in the tree while the cat watched from the mat .
the sun set over the park and the bird flew to its nest .
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(output dir, results, script globals, initial params) of the ported script on a tiny BERT."""
  root = tmp_path_factory.mktemp("v4_mlm")
  (root / "train.txt").write_text(TEXT * 16)
  (root / "valid.txt").write_text(TEXT * 2)
  words = sorted(set(TEXT.split()))
  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
  model_dir = root / "tiny-bert"
  transformers.BertTokenizerFast(vocab=vocab).save_pretrained(model_dir)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64)
  config.save_pretrained(model_dir)
  out_dir = root / "out"
  with pytest.MonkeyPatch.context() as monkeypatch:
    namespace = run_script(port_v4_imports(RUN_MLM_FLAX), [
        "--output_dir", str(out_dir), "--model_type", "bert", "--config_name", str(model_dir),
        "--tokenizer_name", str(model_dir), "--train_file", str(root / "train.txt"),
        "--validation_file", str(root / "valid.txt"), "--cache_dir", str(root / "cache"),
        "--max_seq_length", "16", "--per_device_train_batch_size", "1",
        "--per_device_eval_batch_size", "1", "--num_train_epochs", "3", "--learning_rate", "1e-2",
        "--warmup_steps", "2", "--weight_decay", "0.01", "--seed", "0"], monkeypatch, "run_mlm_flax")
  initial = flaxhf.FlaxAutoModelForMaskedLM.from_config(config, seed=0).params  # the script's init
  return str(out_dir), json.loads((out_dir / "eval_results.json").read_text()), namespace, initial


def test_unported_script_fails_on_transformers_5():
  assert_v4_imports_fail(RUN_MLM_FLAX, "FLAX_MODEL_FOR_MASKED_LM_MAPPING")
  assert "from flaxhf import FLAX_MODEL_FOR_MASKED_LM_MAPPING, FlaxAutoModelForMaskedLM\n" in \
      port_v4_imports(RUN_MLM_FLAX)


def test_model_types_from_the_v4_mapping(run):
  _, _, ns, _ = run
  assert {"bert", "roberta", "electra", "distilbert", "albert"} <= set(ns["MODEL_TYPES"])
  assert transformers.BertConfig in ns["MODEL_CONFIG_CLASSES"]
  assert flaxhf.FLAX_MODEL_FOR_MASKED_LM_MAPPING[transformers.BertConfig] is flaxhf.FlaxBertForMaskedLM
  assert "gpt2" not in ns["MODEL_TYPES"]  # GPT-2 has no masked-LM head


def masked_loss(model, params, enc, positions):
  """Cross entropy of the original tokens at `positions`, with [MASK] there in the input."""
  ids = np.array(enc["input_ids"])
  masked = ids.copy()
  masked[:, positions] = 4  # [MASK]
  logits = np.asarray(model(masked, attention_mask=np.array(enc["attention_mask"]),
                            params=params).logits, np.float64)[:, positions]
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, ids[:, positions, None], -1).mean())


def test_trains_saves_and_loads_in_transformers(run):
  out_dir, results, _, initial = run
  losses = results["train_losses"]
  # 64 lines of 14 words + [CLS]/[SEP]: 64 blocks of 16, 8 steps of 8 per epoch.
  assert len(losses) == 24 and np.isfinite(losses).all()
  # From ln(vocab) = 3.4 at init to about 2.2; always predicting "the" would score about 2.6.
  assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3]), losses
  assert results["eval_loss"] < 0.75 * np.mean(losses[:3]), results
  assert 0.2 < results["eval_accuracy"] <= 1.0

  pt, info = transformers.AutoModelForMaskedLM.from_pretrained(out_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  fx = flaxhf.FlaxAutoModelForMaskedLM.from_pretrained(out_dir)
  enc = tok(TEXT.splitlines()[:2], padding=True, return_tensors="np")
  with torch.no_grad():
    want = pt.eval()(**{k: torch.tensor(v) for k, v in enc.items()}).logits.numpy()
  np.testing.assert_allclose(np.asarray(fx(**enc).logits), want, atol=1e-5, rtol=1e-5)
  # The trained weights were exported: masked words are far better predicted than at init.
  positions = [2, 5, 9]
  assert masked_loss(fx, fx.params, enc, positions) < 0.5 * masked_loss(fx, initial, enc, positions)
