"""Tiny random transformers configs and PyTorch twins for parity tests."""

import numpy as np
import transformers

VOCAB = 99

# Every architecture at a size that runs in milliseconds; dims divisible by 8 for the sharding tests.
TINY_CONFIGS = {
    "bert": lambda **kw: transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, **kw),
    "roberta": lambda **kw: transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=66, type_vocab_size=2, pad_token_id=1, **kw),
    "electra": lambda **kw: transformers.ElectraConfig(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, **kw),
    "distilbert": lambda **kw: transformers.DistilBertConfig(**{**dict(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64),
        **kw}),
    "albert": lambda **kw: transformers.AlbertConfig(**{**dict(
        vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_hidden_groups=1,
        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, type_vocab_size=2),
        **kw}),  # the defaults are overridable, for VARIANTS
}

# Decoders, kept apart: the encoder tests parametrize over TINY_CONFIGS x HEADS (multiple choice, MLM).
DECODER_CONFIGS = {
    "gpt2": lambda **kw: transformers.GPT2Config(**{**dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1), **kw}),
}

# Config switches that take other code paths: (architecture, TINY_CONFIGS overrides).
VARIANTS = {
    "distilbert-sinusoidal-untied": ("distilbert", dict(sinusoidal_pos_embds=True,
                                                        tie_word_embeddings=False)),
    # 4 steps over 2 groups of 2 layers: steps 0-1 share group 0, steps 2-3 group 1.
    "albert-groups-untied": ("albert", dict(num_hidden_layers=4, num_hidden_groups=2,
                                            inner_group_num=2, tie_word_embeddings=False)),
}

HEADS = {
    None: "AutoModel",
    "sequence_classification": "AutoModelForSequenceClassification",
    "token_classification": "AutoModelForTokenClassification",
    "question_answering": "AutoModelForQuestionAnswering",
    "multiple_choice": "AutoModelForMultipleChoice",
    "masked_lm": "AutoModelForMaskedLM",
}
DECODER_HEADS = {"causal_lm": "AutoModelForCausalLM"}


def torch_model(arch, task, seed=0, **config_kwargs):
  """A random PyTorch transformers model in eval mode, the twin for parity checks."""
  import torch
  torch.manual_seed(seed)
  config_kwargs.setdefault("num_labels", 2 if task == "question_answering" else 3)
  config = {**TINY_CONFIGS, **DECODER_CONFIGS}[arch](**config_kwargs)
  model = getattr(transformers, {**HEADS, **DECODER_HEADS}[task]).from_config(config)
  model.eval()
  return model


def make_inputs(arch, task, batch=2, length=9, seed=0, choices=3):
  """Right-padded inputs with two segments; ids avoid the pad id so masks carry the padding."""
  rng = np.random.RandomState(seed)
  shape = (batch, choices, length) if task == "multiple_choice" else (batch, length)
  ids = rng.randint(3, VOCAB, size=shape)
  mask = np.ones(shape, np.int64)
  mask[..., -1, length - 3:] = 0  # last row (or choice) right-padded
  pad = {**TINY_CONFIGS, **DECODER_CONFIGS}[arch]().pad_token_id
  ids = np.where(mask == 1, ids, pad)
  inputs = {"input_ids": ids, "attention_mask": mask}
  if arch in TINY_CONFIGS and arch != "distilbert":  # decoders take no token types
    tt = np.zeros(shape, np.int64)
    tt[..., length // 2:] = 1
    inputs["token_type_ids"] = tt * mask
  return inputs


def torch_outputs(model, inputs, **kwargs):
  import torch
  with torch.no_grad():
    out = model(**{k: torch.tensor(v) for k, v in inputs.items()}, **kwargs)
  return out


def main_outputs(out, task):
  """The arrays to compare per head (numpy), by transformers field name."""
  names = {None: ["last_hidden_state", "pooler_output"],
           "question_answering": ["start_logits", "end_logits"]}.get(task, ["logits"])
  result = {}
  for n in names:
    v = getattr(out, n, None)
    if v is not None:
      result[n] = v.detach().numpy() if hasattr(v, "detach") else np.asarray(v)
  return result
