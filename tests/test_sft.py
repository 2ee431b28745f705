"""Chat SFT: the assistant mask against transformers', packing equal to the conversations run alone
(loss and gradients), bad rows and templates, and a CLI run from scratch on the instruction data."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import flaxhf
from flaxhf.data import chat
from flaxhf.data.sources import DataError
from flaxhf.models.base import flatten
from flaxhf.train import engine
from engine_utils import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
     {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, of course."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Teal."}],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour !"}],
]
# The default template with the turn's closing newline inside the marked span: exactly what an
# assistant turn adds after the generation prompt, so the prefix rule must find the same tokens.
MARKED = chat.DEFAULT_TEMPLATE.replace(
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}{{ '\n' }}",
    "{% generation %}{{ message['content'] + eos_token + '\n' }}{% endgeneration %}")
UNMARKED = MARKED.replace("{% generation %}", "").replace("{% endgeneration %}", "")


@pytest.fixture(scope="module")
def tokenizer():
  from flaxhf.data.clm import gpt2_tokenizer_dir
  return transformers.AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())


def test_assistant_mask_equals_transformers(tokenizer):
  assert MARKED != chat.DEFAULT_TEMPLATE and "{% generation %}" not in UNMARKED
  for template in (chat.DEFAULT_TEMPLATE, MARKED):
    for messages in CONVERSATIONS:
      want = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
      ids, mask = chat.render(tokenizer, messages, template)
      np.testing.assert_array_equal(ids, want["input_ids"])
      np.testing.assert_array_equal(mask, want["assistant_masks"])
      assert 0 < mask.sum() < len(mask)
      # The marked tokens decode to the assistant's words (and EOS), nothing of the user's.
      text = tokenizer.decode(ids[mask > 0])
      assert all(m["content"] in text for m in messages if m["role"] == "assistant")
      assert not any(m["content"] in text for m in messages if m["role"] != "assistant")
  # A template without marks: the prefix rule gives transformers' mask of the marked twin.
  for messages in CONVERSATIONS:
    want = tokenizer.apply_chat_template(messages, chat_template=MARKED, tokenize=True,
                                         return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat.render(tokenizer, messages, UNMARKED)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["assistant_masks"])


def test_rows_pairs_packing_and_bad_input(tokenizer, caplog):
  rows = [{"messages": m} for m in CONVERSATIONS] + [
      {"messages": [{"role": "user", "content": "no reply"}]},
      {"prompt": "The sky is", "completion": " blue."},
      {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": "Hello."}]}]
  with caplog.at_level("WARNING", logger="flaxhf"):
    examples, kept = chat.tokenize_rows(tokenizer, rows, chat.DEFAULT_TEMPLATE, "train")
  assert len(examples) == 5 and "skipped 1 of 6 conversations without an assistant turn" in caplog.text
  ids, mask = examples[3]  # plain text: prompt, then completion + EOS under the mask
  assert tokenizer.decode(ids[mask > 0]) == " blue.<|endoftext|>" and tokenizer.decode(ids[mask == 0]) == "The sky is"
  np.testing.assert_array_equal(examples[4][0], chat.render(tokenizer, [
      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], chat.DEFAULT_TEMPLATE)[0])

  lengths = [len(i) for i, _ in examples]
  block = lengths[0] + lengths[1] + 2
  packed = chat.pack(examples, block, packing=True)
  assert [len(r) for r in packed.seqs["input_ids"]][0] == lengths[0] + lengths[1]
  np.testing.assert_array_equal(np.unique(packed.seqs["document_ids"][0]), [0, 1])
  assert sum(len(r) for r in packed.seqs["input_ids"]) == sum(lengths)
  for row_ids, row_labels in zip(packed.seqs["input_ids"], packed.seqs["labels"]):
    assert all(len(r) <= block for r in packed.seqs["input_ids"])
    assert ((row_labels == -100) | (row_labels == row_ids)).all()
  unpacked = chat.pack(examples, block, packing=False)
  assert len(unpacked) == 5 and all((d == 0).all() for d in unpacked.seqs["document_ids"])

  with pytest.raises(DataError, match="has no conversation with an assistant turn"):
    chat.tokenize_rows(tokenizer, rows[3:4], chat.DEFAULT_TEMPLATE, "validation")
  with pytest.raises(DataError, match="needs `messages`.*has \\['text'\\]"):
    chat.row_messages({"text": "hi"})
  assert tokenizer.chat_template is None
  with pytest.raises(DataError, match="no chat template.*data.chat_template"):
    chat.chat_template(tokenizer, {"chat_template": None})
  assert chat.chat_template(tokenizer, {"chat_template": "default"}) == chat.DEFAULT_TEMPLATE


def _sft_task():
  from configs.sft import get_config
  from flaxhf.train.tasks_sft import SFT
  return SFT(get_config("local,smoke"))


def _loss_sum(model, task, params, batch):
  batch = task.device_transform({k: jnp.asarray(v) for k, v in batch.items()}, None, train=False)
  out = model.module.apply({"params": params}, **engine.module_inputs(model, batch))
  return task.loss(out, batch)


def test_packed_loss_and_gradients_equal_the_conversations_alone(tokenizer):
  """One packed row of three conversations == the three as rows of their own (sums, 1e-6)."""
  config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, pad_token_id=tokenizer.eos_token_id)
  model = flaxhf.FlaxLlamaForCausalLM(config, seed=0)
  task = _sft_task()
  examples = [chat.render(tokenizer, m, chat.DEFAULT_TEMPLATE) for m in CONVERSATIONS]
  total = sum(len(i) for i, _ in examples)

  def batch_of(packed):
    width = max(len(r) for r in packed.seqs["input_ids"])
    pads = {"input_ids": tokenizer.eos_token_id, "labels": -100, "document_ids": -1}
    out = {k: np.stack([np.pad(r, (0, width - len(r)), constant_values=pads[k]) for r in v])
           for k, v in packed.seqs.items()}
    out["attention_mask"] = (out["document_ids"] >= 0).astype(np.int32)
    return out

  packed = batch_of(chat.pack(examples, total, packing=True))
  alone = batch_of(chat.pack(examples, total, packing=False))
  assert packed["input_ids"].shape == (1, total) and alone["input_ids"].shape[0] == 3

  def loss_sum(params, batch):
    loss, count = _loss_sum(model, task, params, batch)
    return loss, count

  # Compiled (once per shape): op by op, the 50k-vocabulary backward takes tens of seconds.
  loss_and_grad = jax.jit(jax.value_and_grad(loss_sum, has_aux=True))
  (loss_packed, count_packed), grad_packed = loss_and_grad(model.params, packed)
  (loss_alone, count_alone), grad_alone = loss_and_grad(model.params, alone)
  assert int(count_packed) == int(count_alone) == sum(int(m[1:].sum()) for _, m in examples)
  assert float(loss_packed) > 100.0  # an untrained model over many assistant tokens
  np.testing.assert_allclose(float(loss_packed), float(loss_alone), rtol=1e-6)
  for k, g in flatten(grad_packed).items():
    np.testing.assert_allclose(np.asarray(g), np.asarray(flatten(grad_alone)[k]), rtol=1e-5,
                               atol=1e-6, err_msg=k)


# What both CLI runs share: a short run, its step-0 eval (eval_on_start) and one at the end.
_CLI = {"train.batch_size": 8, "train.eval_batch_size": 16, "train.eval_every": 0,
        "train.eval_on_start": True, "train.progress_bar": False, "checkpoint.every_steps": 1000,
        "mesh.data": 1, "data.max_length": 128}


def _run_sft_cli(config_arg, workdir, data_dir, overrides):
  """launch/run.py on configs/sft.py:ARG; (untrained eval, trained eval, metrics.jsonl records)."""
  env = child_env(FLAXHF_DATA=str(data_dir))
  proc = subprocess.run(
      [sys.executable, "launch/run.py", "--config", f"configs/sft.py:{config_arg}",
       "--workdir", str(workdir), *(f"--config.{k}={v}" for k, v in {**_CLI, **overrides}.items())],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  trained = json.loads((workdir / "eval_results.json").read_text())
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  untrained = next(r for r in records if r["kind"] == "eval" and r["step"] == 0)
  return untrained, trained, records


@pytest.fixture(scope="module")
def chat_tokenizer_dir(data_dir, tmp_path_factory):
  """A 1000-token byte-level BPE trained by launch/train_tokenizer.py on GPTeacher's messages: the
  CLI runs' tokenizer (GPT-2's 50257-token head was most of each tiny model's step)."""
  from launch import train_tokenizer
  out = str(tmp_path_factory.mktemp("chat_tokenizer"))
  train_tokenizer.main(["--train_file", str(data_dir / "instruction" / "gpteacher" / "train.jsonl"),
                        "--fields", "messages.content", "--family", "gpt2", "--vocab_size", "1000",
                        "--out", out])
  return out


@pytest.mark.parametrize("family", ["llama"])
def test_sft_from_scratch_on_instruction_data_learns(family, data_dir, tmp_path, chat_tokenizer_dir):
  """configs/sft.py:local (tiny) through the CLI on GPTeacher: the assistant-token loss falls well
  below the untrained model's (the same run's step-0 eval), replies are logged, and PyTorch
  generates the same from the export."""
  workdir = tmp_path / "run"
  untrained, trained, records = _run_sft_cli(f"local,family={family}", workdir, data_dir, {
      "model.tokenizer": chat_tokenizer_dir,
      "model.config_overrides": ("hidden_size=64,intermediate_size=176,num_hidden_layers=2,"
                                 "num_attention_heads=4,num_key_value_heads=2,"
                                 "max_position_embeddings=128"),
      "data.max_train_samples": 1000, "data.max_eval_samples": 32, "train.steps": 150,
      "train.learning_rate": 3e-3, "train.log_every": 25, "eval.num_samples": 2,
      "eval.max_new_tokens": 12})
  print(f"SFT {family}: untrained {untrained}, trained {trained}")
  assert untrained["tokens"] == trained["tokens"] > 1000
  # Measured (1000-token tokenizer, 150 steps): loss 6.94 -> 5.44 (ln 1000 = 6.91: near-uniform at
  # first), next-token accuracy 0.071 on the assistant tokens.
  assert trained["loss"] < untrained["loss"] - 1.0, (untrained, trained)
  assert trained["accuracy"] > untrained["accuracy"] + 0.04, (untrained, trained)
  samples = [r for r in records if r["kind"] == "samples"][-1]["samples"]
  assert len(samples) == 2 and all(s["prompt"].endswith("<|im_start|>assistant\n") for s in samples)
  # PyTorch greedy on the export continues the first held-out prompt as flaxhf does.
  import torch
  tok = transformers.AutoTokenizer.from_pretrained(workdir / "export")
  with open(data_dir / "instruction" / "gpteacher" / "test.jsonl") as f:
    first = json.loads(f.readline())["messages"]
  prompt = chat.generation_prompt(tok, first, chat.DEFAULT_TEMPLATE)[None]
  assert samples[0]["prompt"] == tok.decode(prompt[0])
  pt = transformers.AutoModelForCausalLM.from_pretrained(workdir / "export").eval()
  with torch.no_grad():
    want = pt.generate(torch.as_tensor(prompt, dtype=torch.long), do_sample=False, max_new_tokens=12,
                       pad_token_id=tok.eos_token_id).numpy()
  ours = flaxhf.FlaxAutoModelForCausalLM.from_pretrained(str(workdir / "export"))
  got = ours.generate(prompt, do_sample=False, max_new_tokens=12,
                      pad_token_id=tok.eos_token_id).sequences
  np.testing.assert_array_equal(np.asarray(got), want)


def test_sft_equals_a_pytorch_loop_on_the_same_packed_batches(data_dir):
  """benchmarks/compare_tasks.py's SFT row, small: PyTorch draws a tiny Llama, both sides train it
  on flaxhf's packed GPTeacher rows (transformers reads a packed row from its restarting
  positions); every step's loss and the eval assistant-token loss agree to float rounding."""
  import argparse
  sys.path.insert(0, ROOT)
  from benchmarks import compare_tasks
  args = argparse.Namespace(
      quick=True, steps=6, batch_size=4, lr=None, max_length=None, max_train_samples=48,
      max_eval_samples=8, set=[], only=None, dropout_off=False, independent_init=False,
      family="bart", sft_family="llama", threads=1)
  row = compare_tasks.run_task("sft", args, seed=3)
  curves = row["curves"]
  assert sorted(curves["flaxhf"]) == sorted(curves["torch"]) == list(range(1, 7))
  for step, loss in curves["torch"].items():
    np.testing.assert_allclose(curves["flaxhf"][step], loss, rtol=2e-5, err_msg=f"step {step}")
  assert curves["torch"][6] < curves["torch"][1] - 0.1  # it trains: the loss moves
  np.testing.assert_allclose(row["flaxhf"][1][0], row["torch"][1][0], rtol=2e-5)


def test_lora_sft_cli_learns_and_peft_generates_the_same(data_dir, tmp_path, chat_tokenizer_dir):
  """LoRA chat SFT through the CLI on a tiny Llama checkpoint (its tokenizer carrying the chat
  template): the adapters lower the assistant-token loss below the base's (the run's step-0
  eval), and PyTorch + peft on the base and the run's adapter folder gives the logits and greedy
  reply of flaxhf's merged export."""
  import torch
  peft = pytest.importorskip("peft")
  tok = transformers.AutoTokenizer.from_pretrained(chat_tokenizer_dir)
  tok.chat_template = chat.DEFAULT_TEMPLATE
  torch.manual_seed(0)
  base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=len(tok), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
  base.save_pretrained(tmp_path / "base")
  tok.save_pretrained(tmp_path / "base")
  workdir = tmp_path / "run"
  # A random base's output layer makes logits too small to fit anything: it trains in full
  # (modules_to_save, as chat fine-tunes that add tokens do), the rest through adapters.
  untrained, trained, records = _run_sft_cli(f"local,model={tmp_path / 'base'}", workdir, data_dir, {
      "model.lora.r": 8, "model.lora.lora_alpha": 16, "model.lora.target_modules": "all-linear",
      "model.lora.modules_to_save": "lm_head", "data.max_train_samples": 400,
      "data.max_eval_samples": 16, "train.steps": 40, "train.learning_rate": 1e-2,
      "train.log_every": 20, "eval.num_samples": 1, "eval.max_new_tokens": 8})
  print(f"LoRA SFT: untrained {untrained}, trained {trained}")
  assert trained["loss"] < untrained["loss"] - 1.0, (untrained, trained)
  # Measured (1000-token tokenizer): loss 6.92 -> 5.67, accuracy 0.0 -> 0.065.
  assert trained["accuracy"] > untrained["accuracy"] + 0.04
  adapter = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
  assert adapter["task_type"] == "CAUSAL_LM" and sorted(adapter["target_modules"]) == [
      "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

  with open(data_dir / "instruction" / "gpteacher" / "test.jsonl") as f:
    first = json.loads(f.readline())["messages"]
  prompt = chat.generation_prompt(tok, first, chat.DEFAULT_TEMPLATE)[None]
  ours = flaxhf.FlaxAutoModelForCausalLM.from_pretrained(str(workdir / "export"))
  theirs = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"), workdir / "adapter").eval()
  with torch.no_grad():
    want_logits = theirs(input_ids=torch.as_tensor(prompt, dtype=torch.long)).logits.numpy()
    want = theirs.generate(input_ids=torch.as_tensor(prompt, dtype=torch.long), do_sample=False,
                           max_new_tokens=8, pad_token_id=tok.eos_token_id).numpy()
  np.testing.assert_allclose(np.asarray(ours(prompt).logits), want_logits, atol=1e-4, rtol=1e-4)
  got = ours.generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=tok.eos_token_id)
  np.testing.assert_array_equal(np.asarray(got.sequences), want)
  samples = [r for r in records if r["kind"] == "samples"][-1]["samples"]
  assert samples[0]["generated"] == tok.decode(want[0, prompt.shape[1]:], skip_special_tokens=True)
