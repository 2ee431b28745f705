"""A causal-LM script written the transformers-v4 Flax way (run_clm_flax.py) runs on flaxhf once
its imports are changed, and nothing else: pmap and jit training, save_pretrained, generate.

The script below is v4's examples/flax/language-modeling/run_clm_flax.py cut to what a CI run
needs (no hub, tensorboard or intermediate checkpoints; a `parallel` switch adds a jit step next
to v4's pmap step), keeping its code as v4 wrote it.
"""

import ast
import json
import sys

import flax.traverse_util
import numpy as np
import pytest
import torch
import transformers

import flaxhf

V4_IMPORTS = ("# --- v4 imports ---\n", "# --- end v4 imports ---\n")

RUN_CLM_FLAX = '''
import functools
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax
from datasets import Dataset, load_dataset
from flax import jax_utils, traverse_util
from flax.jax_utils import pad_shard_unpad, unreplicate
from flax.training import train_state
from flax.training.common_utils import onehot, shard, shard_prng_key

# --- v4 imports ---
from transformers import (
    CONFIG_MAPPING,
    FLAX_MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoTokenizer,
    FlaxAutoModelForCausalLM,
    HfArgumentParser,
    set_seed,
)
# --- end v4 imports ---

logger = logging.getLogger(__name__)

MODEL_CONFIG_CLASSES = list(FLAX_MODEL_FOR_CAUSAL_LM_MAPPING.keys())
MODEL_TYPES = tuple(conf.model_type for conf in MODEL_CONFIG_CLASSES)


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
    adafactor: bool = field(default=False)
    num_train_epochs: float = field(default=3.0)
    warmup_steps: int = field(default=0)
    seed: int = field(default=42)
    parallel: str = field(default="pmap", metadata={"help": "pmap (v4) or jit."})


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
    block_size: Optional[int] = field(default=None)
    keep_linebreaks: bool = field(default=True)
    sample_prompt: str = field(default="The")
    sample_max_new_tokens: int = field(default=8)


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
):
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
    set_seed(training_args.seed)

    data_files = {"train": data_args.train_file, "validation": data_args.validation_file}
    dataset = load_dataset(
        "text", data_files=data_files, cache_dir=model_args.cache_dir, keep_linebreaks=data_args.keep_linebreaks
    )

    if model_args.config_name:
        config = AutoConfig.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
    elif model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    else:
        config = CONFIG_MAPPING[model_args.model_type]()
        logger.warning("You are instantiating a new config instance from scratch.")

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, cache_dir=model_args.cache_dir)

    if model_args.model_name_or_path:
        model = FlaxAutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path, config=config, seed=training_args.seed, dtype=getattr(jnp, model_args.dtype)
        )
    else:
        model = FlaxAutoModelForCausalLM.from_config(
            config, seed=training_args.seed, dtype=getattr(jnp, model_args.dtype)
        )

    column_names = dataset["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name])

    tokenized_datasets = dataset.map(tokenize_function, batched=True, remove_columns=column_names)

    if data_args.block_size is None:
        block_size = tokenizer.model_max_length
        if block_size > config.max_position_embeddings:
            block_size = min(1024, config.max_position_embeddings)
    else:
        if data_args.block_size > tokenizer.model_max_length:
            logger.warning("block_size is larger than the tokenizer's model_max_length")
        block_size = min(data_args.block_size, tokenizer.model_max_length)

    # Main data processing function that will concatenate all texts from our dataset and generate chunks of block_size.
    def group_texts(examples):
        # Concatenate all texts.
        concatenated_examples = {k: sum(examples[k], []) for k in examples.keys()}
        total_length = len(concatenated_examples[list(examples.keys())[0]])
        # We drop the small remainder, we could add padding if the model supported it instead of this drop.
        if total_length >= block_size:
            total_length = (total_length // block_size) * block_size
        # Split by chunks of max_len.
        result = {
            k: [t[i : i + block_size] for i in range(0, total_length, block_size)]
            for k, t in concatenated_examples.items()
        }
        result["labels"] = result["input_ids"].copy()
        return result

    lm_datasets = tokenized_datasets.map(group_texts, batched=True)
    train_dataset = lm_datasets["train"]
    eval_dataset = lm_datasets["validation"]

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
    if training_args.adafactor:
        optimizer = optax.adafactor(learning_rate=linear_decay_lr_schedule_fn)
    else:
        optimizer = optax.adamw(
            learning_rate=linear_decay_lr_schedule_fn,
            b1=training_args.adam_beta1,
            b2=training_args.adam_beta2,
            eps=training_args.adam_epsilon,
            weight_decay=training_args.weight_decay,
            mask=decay_mask_fn,
        )

    # Setup train state
    state = TrainState.create(apply_fn=model.__call__, params=model.params, tx=optimizer, dropout_rng=dropout_rng)

    def loss_fn(logits, labels):
        shift_logits = logits[..., :-1, :]
        shift_labels = labels[..., 1:]
        loss = optax.softmax_cross_entropy(shift_logits, onehot(shift_labels, shift_logits.shape[-1]))
        return loss.mean()

    # Define gradient update step fn
    def train_step(state, batch, axis_name="batch"):
        dropout_rng, new_dropout_rng = jax.random.split(state.dropout_rng)

        def compute_loss(params):
            labels = batch.pop("labels")
            logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
            loss = loss_fn(logits, labels)
            return loss

        grad_fn = jax.value_and_grad(compute_loss)
        loss, grad = grad_fn(state.params)
        if axis_name is not None:
            grad = jax.lax.pmean(grad, axis_name)

        new_state = state.apply_gradients(grads=grad, dropout_rng=new_dropout_rng)

        metrics = {"loss": loss, "learning_rate": linear_decay_lr_schedule_fn(state.step)}
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name=axis_name)

        return new_state, metrics

    # Define eval fn
    def eval_step(params, batch, axis_name="batch"):
        labels = batch.pop("labels")
        logits = model(**batch, params=params, train=False)[0]
        loss = loss_fn(logits, labels)

        # summarize metrics
        metrics = {"loss": loss}
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name=axis_name)
        return metrics

    if training_args.parallel == "pmap":
        # Create parallel version of the train and eval step
        p_train_step = jax.pmap(train_step, "batch", donate_argnums=(0,))
        p_eval_step = jax.pmap(eval_step, "batch")
        # Replicate the train state on each device
        state = state.replicate()
    else:
        p_train_step = jax.jit(functools.partial(train_step, axis_name=None), donate_argnums=(0,))
        p_eval_step = jax.jit(functools.partial(eval_step, axis_name=None))

    logger.info("***** Running training *****")
    train_losses = []
    for epoch in range(num_epochs):
        # Create sampling rng
        rng, input_rng = jax.random.split(rng)

        # Generate an epoch by shuffling sampling indices from the train dataset
        train_loader = data_loader(input_rng, train_dataset, train_batch_size, shuffle=True)
        steps_per_epoch = len(train_dataset) // train_batch_size
        # train
        for step in range(steps_per_epoch):
            batch = next(train_loader)
            if training_args.parallel == "pmap":
                batch = shard(batch)
            state, train_metric = p_train_step(state, batch)
            train_losses.append(float(jnp.mean(train_metric["loss"])))

    # Eval
    eval_metrics = []
    eval_loader = data_loader(input_rng, eval_dataset, eval_batch_size, drop_last=False)
    for batch in eval_loader:
        if training_args.parallel == "pmap":
            metrics = pad_shard_unpad(p_eval_step, static_return=True)(
                state.params, batch, min_device_batch=per_device_eval_batch_size
            )
        else:
            metrics = p_eval_step(state.params, batch)
        eval_metrics.append(float(jnp.mean(metrics["loss"])))
    eval_loss = float(np.mean(eval_metrics))
    try:
        perplexity = math.exp(eval_loss)
    except OverflowError:
        perplexity = float("inf")

    # save checkpoint after each epoch and push checkpoint to the hub
    if jax.process_index() == 0:
        if training_args.parallel == "pmap":
            params = jax.device_get(unreplicate(state.params))
        else:
            params = jax.device_get(state.params)
        model.save_pretrained(training_args.output_dir, params=params)
        tokenizer.save_pretrained(training_args.output_dir)

        prompt = tokenizer(data_args.sample_prompt, return_tensors="np")
        sequences = model.generate(
            prompt["input_ids"], max_new_tokens=data_args.sample_max_new_tokens, params=params
        ).sequences
        results = {
            "eval_loss": eval_loss,
            "perplexity": perplexity,
            "train_losses": train_losses,
            "total_train_steps": total_train_steps,
            "sample": np.asarray(sequences).tolist(),
            "sample_text": tokenizer.decode(np.asarray(sequences)[0]),
        }
        with open(os.path.join(training_args.output_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=4, sort_keys=True)


if __name__ == "__main__":
    main()
'''

TEXT = """The river runs past the old mill and under the stone bridge.
Every morning the miller opens the doors and the wheel begins to turn.
Children watch the water fall and count the fish that jump in the foam.
In the evening the lamps are lit and the mill is quiet again.
"""


def port_v4_imports(script: str) -> str:
  """The script with its marked `from transformers import ...` block split: Flax names from
  flaxhf, the rest still from transformers. Nothing outside the block changes."""
  start, end = script.index(V4_IMPORTS[0]), script.index(V4_IMPORTS[1])
  block = script[start + len(V4_IMPORTS[0]):end]
  lines = []
  for node in ast.parse(block).body:
    assert isinstance(node, ast.ImportFrom) and node.module == "transformers", ast.dump(node)
    names = [a.name + (f" as {a.asname}" if a.asname else "") for a in node.names]
    flax = [n for n in names if n.startswith(("Flax", "FLAX_"))]
    rest = [n for n in names if n not in flax]
    lines += [f"from flaxhf import {', '.join(flax)}\n"] if flax else []
    lines += [f"from transformers import {', '.join(rest)}\n"] if rest else []
  return script[:start] + V4_IMPORTS[0] + "".join(lines) + script[end:]


def run_script(script, argv, monkeypatch, name="run_v4"):
  """Runs `script` as __main__ with `argv`, in-process (the conftest's 8 CPU devices); its globals."""
  monkeypatch.setattr(sys, "argv", [name + ".py", *argv])
  namespace = {"__name__": "__main__"}
  exec(compile(script, name + ".py", "exec"), namespace)
  return namespace


def assert_v4_imports_fail(script, missing):
  """The unported import block fails on transformers 5: the port is needed, and is all that is."""
  start, end = script.index(V4_IMPORTS[0]), script.index(V4_IMPORTS[1])
  with pytest.raises(ImportError, match=missing):
    exec(script[start:end], {})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The ported script run with pmap and with jit on the same data: {mode: (output dir, results)}."""
  from flaxhf.data.clm import gpt2_tokenizer_dir
  root = tmp_path_factory.mktemp("v4_clm")
  (root / "train.txt").write_text(TEXT * 16)  # 976 tokens: 61 blocks of 16, 7 batches of 8
  (root / "valid.txt").write_text(TEXT * 2)
  config_dir = root / "config"
  # Dropout off: 8 pmap replicas averaging equal shards then take exactly the jit steps.
  transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(config_dir)
  ported = port_v4_imports(RUN_CLM_FLAX)
  out = {}
  with pytest.MonkeyPatch.context() as monkeypatch:
    for mode in ("pmap", "jit"):
      out_dir = root / mode
      namespace = run_script(ported, [
          "--output_dir", str(out_dir), "--config_name", str(config_dir),
          "--tokenizer_name", gpt2_tokenizer_dir(), "--model_type", "gpt2",
          "--train_file", str(root / "train.txt"), "--validation_file", str(root / "valid.txt"),
          "--cache_dir", str(root / "cache"), "--block_size", "16",
          "--per_device_train_batch_size", "1", "--per_device_eval_batch_size", "1",
          "--num_train_epochs", "2", "--learning_rate", "1e-2", "--warmup_steps", "2",
          "--weight_decay", "0.01", "--seed", "0", "--sample_prompt", "The river runs",
          "--parallel", mode], monkeypatch, "run_clm_flax")
      results = json.loads((out_dir / "eval_results.json").read_text())
      out[mode] = (str(out_dir), results, namespace)
  return out


def test_unported_script_fails_on_transformers_5():
  assert_v4_imports_fail(RUN_CLM_FLAX, "FLAX_MODEL_FOR_CAUSAL_LM_MAPPING")
  ported = port_v4_imports(RUN_CLM_FLAX)
  assert "from flaxhf import FLAX_MODEL_FOR_CAUSAL_LM_MAPPING, FlaxAutoModelForCausalLM\n" in ported
  assert ported.replace(ported[ported.index(V4_IMPORTS[0]):ported.index(V4_IMPORTS[1])], "") == \
      RUN_CLM_FLAX.replace(RUN_CLM_FLAX[RUN_CLM_FLAX.index(V4_IMPORTS[0]):
                                        RUN_CLM_FLAX.index(V4_IMPORTS[1])], "")


def lm_loss(model, params, ids):
  logits = np.asarray(model(ids, params=params).logits, np.float64)
  logits = logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-np.take_along_axis(logp, ids[:, 1:, None], -1).mean())


def test_loss_goes_down_and_pmap_equals_jit(runs):
  (_, pmap, ns), (_, jit, _) = runs["pmap"], runs["jit"]
  assert "gpt2" in ns["MODEL_TYPES"]
  losses = pmap["train_losses"]
  assert len(losses) == pmap["total_train_steps"] == 14  # 2 epochs of 7 batches
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.75 * losses[0], losses  # 10.8 (ln 50257) -> about 7.1
  assert pmap["eval_loss"] < 0.75 * losses[0]  # the first step's loss is the untrained model's
  np.testing.assert_allclose(jit["train_losses"], losses, rtol=1e-4)
  # (eval losses differ a little: pad_shard_unpad pads the last pmap batch with zero rows, as v4)
  assert jit["eval_loss"] < 0.75 * losses[0]


def test_export_loads_in_transformers_with_same_logits_and_generation(runs):
  out_dir, results, _ = runs["pmap"]
  pt, info = transformers.AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  fx = flaxhf.FlaxAutoModelForCausalLM.from_pretrained(out_dir)
  tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  ids = np.array([tok(TEXT.splitlines()[2])["input_ids"]])
  with torch.no_grad():
    want = pt.eval()(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(fx(ids).logits), want, atol=1e-5, rtol=1e-5)
  # The trained weights were exported: the saved model fits the text far better than the
  # untrained one did (its loss, the first step's, is about ln(50257)).
  assert lm_loss(fx, fx.params, ids) < 0.75 * results["train_losses"][0]
  # The script's greedy sample, made by flaxhf generate, is PyTorch's.
  prompt = tok("The river runs", return_tensors="pt")
  with torch.no_grad():
    torch_sample = pt.generate(**prompt, max_new_tokens=8, do_sample=False)
  assert results["sample"] == torch_sample.tolist()
  # pmap and jit land on the same weights. Adam divides by sqrt(v): where a gradient is near zero,
  # its rounding moves the update by up to ~1e-5 a step (against steps of lr = 1e-2).
  jit_params = flax.traverse_util.flatten_dict(
      flaxhf.FlaxAutoModelForCausalLM.from_pretrained(runs["jit"][0]).params, sep=".")
  for path, a in flax.traverse_util.flatten_dict(fx.params, sep=".").items():
    np.testing.assert_allclose(a, jit_params[path], atol=2e-4, err_msg=path)
