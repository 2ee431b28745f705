"""Every generative family under the same checks: one row per family in FAMILIES, one test per check.

The checks, each run on every row that has what it needs (an LM head, a decoder, `generate` cases):
- round trip: PyTorch -> flaxhf (every output field transformers returns, hidden states and attentions
  included, within 1e-5; parameter count; parameter paths) -> save_pretrained -> transformers loads it
  with no key missing or left over, to a state dict bitwise equal to the original and the same outputs;
- a random flaxhf init (the family's init rules) exports to transformers, bitwise;
- `labels=` gives transformers' loss (and, for encoder-decoders, the same as shifted decoder inputs);
- cached decoding (the v4 `past_key_values` / `encode`-`decode` calls, under jit) and generation's
  prefill + step equal one full forward, also after beam search reorders the cache;
- greedy and beam `generate` equal transformers' `generate` token for token (beams: scores too);
- shift_tokens_right equals transformers'; the shared input errors name the problem.
What only one family does stays in its own file (tests/test_gpt2.py, test_bart.py, test_t5.py).

A new family joins by adding a row (every field but `config` has a default):

    "llama": Family(
        config=lambda **kw: transformers.LlamaConfig(**{**dict(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB - 1), **kw}),
        heads=DECODER_HEADS,                        # round trips: the plain config, every head
        variants={"untied": (dict(tie_word_embeddings=False), ("causal_lm",))},
        init={"lm": ("causal_lm", dict(initializer_range=0.05))},
        init_rules=lambda c, task: {"layers.0.mlp.up_proj.weight": Std(0.05), "norm.weight": 1.0},
        generate=Generate(wide=dict(initializer_range=0.3),
                          beams={"early_true": dict(early_stopping=True)}),
    ),

Test ids read family-variant-head (e.g. `test_roundtrip_parity[marian-unshared-seq2seq_lm]`),
family-case (`test_beam_search_equals_transformers[bart-early_true]`) or the family alone.
"""

import dataclasses
import functools
import importlib
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import flaxhf
from flaxhf.models import bart, t5
from flaxhf.models.base import REGISTRY, flatten
from model_utils import VOCAB, torch_outputs


class Std(NamedTuple):
  """An init rule: the entries' standard deviation is `std` (within rtol)."""
  std: float
  rtol: float = 0.1


@dataclasses.dataclass(frozen=True)
class Generate:
  """How `generate` is compared with transformers' for a family."""
  # Config overrides that draw wider weights: the next-token distribution is then peaked, so no two
  # candidates sit within float rounding of each other and token equality is a fair test.
  wide: dict
  settings: dict = dataclasses.field(default_factory=dict)  # generate kwargs of every call
  greedy: dict = dataclasses.field(default_factory=lambda: {"plain": {}})  # case -> greedy kwargs
  # case -> beam kwargs, over num_beams=4, num_return_sequences=2, max_new_tokens=10
  beams: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
  """One generative family at a tiny random size, and what the shared tests run on it."""
  config: Callable[..., transformers.PretrainedConfig]  # keyword arguments override the defaults
  heads: tuple = ()  # tasks (REGISTRY keys, None = the base model) round-tripped on the plain config
  variants: dict = dataclasses.field(default_factory=dict)  # name -> (config overrides, tasks)
  # Random-init export: name -> (task, config overrides); init_rules(config, task) -> {param path
  # suffix: Std(...) or the value every entry equals}, checked on flaxhf's own init.
  init: dict = dataclasses.field(default_factory=dict)
  init_rules: Callable[..., dict] = lambda c, task: {}
  lengths: tuple = (9, 6)  # (source, target) lengths of the round-trip inputs; decoders: source
  # Encoder-decoders: shift_tokens_right as (flaxhf function, its arguments from the config) and
  # transformers' own as a function of (torch labels, config); the cross-attention module's name in
  # parameter paths; whether the v4 cache holds the cross keys/values (T5) or self-attention only.
  shift: Optional[tuple] = None
  torch_shift: Optional[Callable] = None
  cross_attention: Optional[str] = None
  cache_holds_cross: bool = False
  own_lm_head: bool = False  # LM checkpoints carry their own lm_head (T5 v1.1, mT5)
  generate: Optional[Generate] = None


DECODER_HEADS = (None, "causal_lm", "sequence_classification", "token_classification",
                 "question_answering")
SEQ2SEQ_HEADS = (None, "seq2seq_lm", "sequence_classification", "question_answering")
T5_HEADS = (None, "seq2seq_lm", "text_encoding")
LM_TASKS = ("causal_lm", "seq2seq_lm")

_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
             decoder_ffn_dim=48, max_position_embeddings=64)
# Small bucket counts and distances so that sequences of ~10-20 tokens reach the log-spaced buckets.
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=16,
           decoder_start_token_id=0, dropout_rate=0.1)
_MARIAN_UNSHARED = dict(share_encoder_decoder_embeddings=False, decoder_vocab_size=80,
                        pad_token_id=79, decoder_start_token_id=79)


def _gpt2_init(c, task):
  """transformers' _init_weights: normal(initializer_range), c_proj over sqrt(2 * n_layer), zero biases."""
  return {"h.0.attn.c_attn.weight": Std(c.initializer_range),
          "h.1.attn.c_proj.weight": Std(c.initializer_range / 2),
          "h.0.mlp.c_proj.weight": Std(c.initializer_range / 2),
          "h.0.mlp.c_fc.bias": 0.0, "ln_f.weight": 1.0}


def _bart_init(c, task):
  """normal(init_std), zero biases and final_logits_bias (Marian's fixed table: the bitwise export)."""
  rules = {"encoder.layers.0.fc1.weight": Std(c.init_std),
           "decoder.layers.1.encoder_attn.q_proj.bias": 0.0}
  return {**rules, "final_logits_bias": 0.0} if task == "seq2seq_lm" else rules


def _t5_init(c, task):
  """transformers' T5 rules. (A wider factor is drawn correctly too, but float32 rounding on both
  sides then passes 1e-5 at these sizes: not a bug, each is as far from a float64 run.)"""
  f, d = c.initializer_factor, c.d_model
  return {"shared.weight": Std(f, 0.15),
          "encoder.block.0.layer.0.SelfAttention.q.weight": Std(f * (d * c.d_kv) ** -0.5, 0.15),
          "decoder.block.1.layer.1.EncDecAttention.k.weight": Std(f * d ** -0.5, 0.15),
          "encoder.block.1.layer.0.SelfAttention.o.weight": Std(f * (c.num_heads * c.d_kv) ** -0.5, 0.15),
          "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": Std(f * d ** -0.5, 0.15),
          "decoder.block.0.layer.2.DenseReluDense.wo.weight": Std(f * c.d_ff ** -0.5, 0.15),
          "encoder.final_layer_norm.weight": f}


def _torch_t5_shift(labels, c):
  return transformers.T5PreTrainedModel._shift_right(type("M", (), {"config": c})(), labels)


_BART_SEQ2SEQ = dict(
    lengths=(9, 6), init_rules=_bart_init, cross_attention="encoder_attn",
    shift=(bart.shift_tokens_right, lambda c: (c.pad_token_id, c.decoder_start_token_id)),
    torch_shift=lambda labels, c: transformers.models.bart.modeling_bart.shift_tokens_right(
        labels, c.pad_token_id, c.decoder_start_token_id))
_T5_SEQ2SEQ = dict(
    heads=T5_HEADS, lengths=(13, 11), init_rules=_t5_init, cross_attention="EncDecAttention",
    cache_holds_cross=True, torch_shift=_torch_t5_shift,
    shift=(t5.shift_tokens_right, lambda c: (c.pad_token_id, c.decoder_start_token_id)))
# Untrained tiny models repeat themselves; the penalty makes greedy paths varied (same on both sides).
_BART_GREEDY = {"repetition_penalty": dict(repetition_penalty=1.3)}
_BART_BEAMS = {
    "early_true": dict(num_beams=4, early_stopping=True, length_penalty=1.5, repetition_penalty=1.2),
    "early_false_no_repeat": dict(num_beams=3, early_stopping=False, no_repeat_ngram_size=2),
    "early_never": dict(num_beams=4, early_stopping="never", length_penalty=-0.5),
}

FAMILIES = {
    "gpt2": Family(
        config=lambda **kw: transformers.GPT2Config(**{**dict(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
            bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1), **kw}),
        heads=DECODER_HEADS,
        variants={  # the untied LM head, and the config switches of attention
            "untied": (dict(tie_word_embeddings=False), ("causal_lm",)),
            "attn_switches": (dict(n_inner=48, activation_function="relu", layer_norm_epsilon=1e-3,
                                   scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
                              ("causal_lm",)),
            "unscaled_attn": (dict(scale_attn_weights=False), (None,)),
        },
        init={"lm": ("causal_lm", dict(initializer_range=0.05)),
              "lm_untied": ("causal_lm", dict(initializer_range=0.05, tie_word_embeddings=False)),
              "classifier": ("sequence_classification", dict(initializer_range=0.05))},
        init_rules=_gpt2_init,
        # The generation room's own cases run on GPT-2 with the real tokenizer: tests/test_generation.py.
        generate=Generate(wide=dict(initializer_range=0.3),
                          beams={"early_true": dict(early_stopping=True)}),
    ),
    "bart": Family(
        config=lambda **kw: transformers.BartConfig(**{**_BART, **kw}),
        heads=SEQ2SEQ_HEADS, variants={"untied": (dict(tie_word_embeddings=False), (None, "seq2seq_lm"))},
        init={"lm": ("seq2seq_lm", dict(init_std=0.05))},
        generate=Generate(wide=dict(init_std=0.3), greedy=_BART_GREEDY, beams=_BART_BEAMS),
        **_BART_SEQ2SEQ),
    "mbart": Family(
        config=lambda **kw: transformers.MBartConfig(**{**_BART, "scale_embedding": True, **kw}),
        heads=SEQ2SEQ_HEADS, variants={"untied": (dict(tie_word_embeddings=False), ("seq2seq_lm",))},
        # mBART-50: decoding starts from EOS, then the target-language code is forced.
        generate=Generate(wide=dict(init_std=0.3, decoder_start_token_id=2),
                          settings=dict(forced_bos_token_id=VOCAB - 2), greedy=_BART_GREEDY,
                          beams=_BART_BEAMS),
        **{**_BART_SEQ2SEQ, "shift": (bart.mbart_shift_tokens_right, lambda c: (c.pad_token_id,)),
           "torch_shift": lambda labels, c: transformers.models.mbart.modeling_mbart.shift_tokens_right(
               labels, c.pad_token_id)}),
    # Marian's pad (its decoder start) is the last id of the vocabulary, as in the opus-mt checkpoints.
    "marian": Family(
        config=lambda **kw: transformers.MarianConfig(**{**_BART, **dict(
            pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1, eos_token_id=0,
            forced_eos_token_id=0, scale_embedding=True, activation_function="swish"), **kw}),
        heads=(None, "seq2seq_lm"),
        variants={  # its own decoder vocabulary: the LM head ties to decoder.embed_tokens, no `shared`
            "untied": (dict(tie_word_embeddings=False), ("seq2seq_lm",)),
            "unshared": (_MARIAN_UNSHARED, (None, "seq2seq_lm")),
            "unshared-untied": ({**_MARIAN_UNSHARED, "tie_word_embeddings": False}, ("seq2seq_lm",)),
        },
        init={"lm": ("seq2seq_lm", dict(init_std=0.05)), "base": (None, dict(init_std=0.05))},
        generate=Generate(wide=dict(init_std=0.3), greedy=_BART_GREEDY, beams=_BART_BEAMS),
        **{**_BART_SEQ2SEQ, "torch_shift": lambda labels, c: transformers.models.marian.modeling_marian
           .shift_tokens_right(labels, c.pad_token_id, c.decoder_start_token_id)}),
    "t5": Family(
        config=lambda **kw: transformers.T5Config(**{**_T5, **kw}),
        init={"lm": ("seq2seq_lm", {})},
        generate=Generate(wide=dict(initializer_factor=4.0),
                          beams={"tied": dict(num_beams=3, max_new_tokens=8, early_stopping=True)}),
        **_T5_SEQ2SEQ),
    # v1.1: gated GELU, its own lm_head, no rescale; a 3-layer decoder over the 2-layer encoder.
    "t5-v1_1": Family(
        config=lambda **kw: transformers.T5Config(**{**_T5, **dict(
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3), **kw}),
        init={"lm": ("seq2seq_lm", {})}, own_lm_head=True,
        # PyTorch's generate sizes its cache by num_layers, so it fails for a deeper decoder: 2 + 2.
        generate=Generate(wide=dict(initializer_factor=4.0, num_decoder_layers=2),
                          greedy={"plain": {}, "no_repeat_ngram": dict(no_repeat_ngram_size=2)},
                          beams={"early_true": dict(early_stopping=True),
                                 "early_false_length_penalty_short": dict(early_stopping=False,
                                                                          length_penalty=-1.0),
                                 "early_never_length_penalty_long_no_repeat": dict(
                                     early_stopping="never", length_penalty=2.0,
                                     no_repeat_ngram_size=3)}),
        **_T5_SEQ2SEQ),
    # mT5: v1.1's code under MT5Config (its random init and generate are v1.1's: not repeated).
    "mt5": Family(config=lambda **kw: transformers.MT5Config(**{**_T5, **kw}), own_lm_head=True,
                  **_T5_SEQ2SEQ),
}

TORCH = {None: "AutoModel", "causal_lm": "AutoModelForCausalLM", "seq2seq_lm": "AutoModelForSeq2SeqLM",
         "sequence_classification": "AutoModelForSequenceClassification",
         "token_classification": "AutoModelForTokenClassification",
         "question_answering": "AutoModelForQuestionAnswering",
         "text_encoding": "AutoModelForTextEncoding"}
AUTO = {None: flaxhf.FlaxAutoModel, "causal_lm": flaxhf.FlaxAutoModelForCausalLM,
        "seq2seq_lm": flaxhf.FlaxAutoModelForSeq2SeqLM,
        "sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
        "token_classification": flaxhf.FlaxAutoModelForTokenClassification,
        "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering}  # no auto class: REGISTRY's


@functools.lru_cache
def is_seq2seq(family):
  return FAMILIES[family].config().is_encoder_decoder


def lm_task(family):
  return "seq2seq_lm" if is_seq2seq(family) else "causal_lm"


def _name(*parts):
  return "-".join("base" if p is None else p for p in parts if p != "")


ROUNDTRIP = [(f, "", t) for f, row in FAMILIES.items() for t in row.heads] + [
    (f, v, t) for f, row in FAMILIES.items() for v, (_, tasks) in row.variants.items() for t in tasks]
INIT = [(f, case) for f, row in FAMILIES.items() for case in row.init]
GENERATIVE = [f for f, row in FAMILIES.items() if row.generate]
GREEDY = [(f, case) for f in GENERATIVE for case in FAMILIES[f].generate.greedy]
BEAMS = [(f, case) for f in GENERATIVE for case in FAMILIES[f].generate.beams]


# ---- twins, inputs, comparisons -------------------------------------------------------------------
def head_is_tied(pt):
  """Whether a PyTorch LM's output projection shares its storage with another weight."""
  ptr = pt.get_output_embeddings().weight.data_ptr()
  return sum(v.data_ptr() == ptr for v in pt.state_dict().values()) > 1


def torch_twin(family, task, variant="", seed=0, **kw):
  """A random transformers model in eval mode (eager attention: it returns attention probabilities)."""
  row = FAMILIES[family]
  torch.manual_seed(seed)
  overrides = {**(row.variants[variant][0] if variant else {}), **kw}
  config = row.config(num_labels=2 if task == "question_answering" else 3,
                      attn_implementation="eager", **overrides)
  pt = getattr(transformers, TORCH[task]).from_config(config).eval()
  if task in LM_TASKS and (row.own_lm_head or not config.tie_word_embeddings) and head_is_tied(pt):
    # transformers 5 ties the head unless the checkpoint's differ: make them differ.
    head = pt.get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.randn_like(head.weight) * head.weight.std())
  return pt


def twin(pt, task):
  """The flaxhf model with `pt`'s weights (built without an init of its own: no compile)."""
  model = REGISTRY[task][pt.config.model_type](pt.config, _do_init=False)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  return model


def make_inputs(family, config, task, lengths=None, seed=0):
  """A right-padded batch of 2 (row 1 shorter). Decoders get explicit 0..L-1 positions, as torch
  numbers every slot; encoder-decoders' sources end in EOS (the classifiers read the last one) and
  the base and LM models get right-padded decoder inputs (the classifiers derive theirs)."""
  src, tgt = lengths or FAMILIES[family].lengths
  rng = np.random.RandomState(seed)
  seq2seq = is_seq2seq(family)  # not config.is_encoder_decoder: T5EncoderModel's says False
  ids = rng.randint(3, 79 if seq2seq else VOCAB, size=(2, src))  # < 80: Marian's own decoder vocab
  mask = np.ones_like(ids)
  mask[1, src - 3:] = 0
  if seq2seq:
    ids[np.arange(2), mask.sum(1) - 1] = config.eos_token_id
  inputs = {"input_ids": np.where(mask == 1, ids, config.pad_token_id), "attention_mask": mask}
  if not seq2seq:
    inputs["position_ids"] = np.broadcast_to(np.arange(src), (2, src)).copy()
  elif task in (None, "seq2seq_lm"):
    dec_mask = np.ones((2, tgt), np.int64)
    dec_mask[1, tgt - 2:] = 0
    inputs["decoder_input_ids"] = np.where(dec_mask == 1, rng.randint(3, 79, size=(2, tgt)),
                                           config.pad_token_id)
    inputs["decoder_attention_mask"] = dec_mask
  return inputs


FIELDS = ("logits", "start_logits", "end_logits", "last_hidden_state", "encoder_last_hidden_state",
          "hidden_states", "encoder_hidden_states", "decoder_hidden_states", "attentions",
          "encoder_attentions", "decoder_attentions", "cross_attentions")


def assert_outputs_close(got, want):
  """Every output field transformers returns (tuples: each layer) equals flaxhf's within 1e-5."""
  compared = 0
  for name in FIELDS:
    w = getattr(want, name, None)
    if w is None or w == ():  # GPT-2 returns no cross-attention layers as ()
      continue
    g = getattr(got, name, None)
    assert g is not None, f"flaxhf returns no {name}"
    ws, gs = (w, g) if isinstance(w, tuple) else ((w,), (g,))
    assert len(gs) == len(ws) > 0, name
    for i, (gi, wi) in enumerate(zip(gs, ws)):
      np.testing.assert_allclose(np.asarray(gi), wi.detach().numpy(), atol=1e-5, rtol=1e-5,
                                 err_msg=f"{name}[{i}]")
    compared += 1
  assert compared


def saved_keys(path):
  return set(load_file(str(path / "model.safetensors")))


def load_torch(task, path):
  """transformers loads a flaxhf save with no key missing, unexpected or mismatched."""
  back, info = getattr(transformers, TORCH[task]).from_pretrained(path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  return back.eval()


# ---- round trips and exports ----------------------------------------------------------------------
@pytest.mark.parametrize("family,variant,task", ROUNDTRIP, ids=[_name(*c) for c in ROUNDTRIP])
def test_roundtrip_parity(family, variant, task, tmp_path):
  """PyTorch -> flaxhf (outputs, parameter count and paths) -> save -> PyTorch, bitwise."""
  pt = torch_twin(family, task, variant)
  pt.save_pretrained(tmp_path / "pt")
  inputs = make_inputs(family, pt.config, task)
  flags = dict(output_hidden_states=True, output_attentions=True)
  want = torch_outputs(pt, inputs, **flags)

  model = (AUTO.get(task) or REGISTRY[task][pt.config.model_type]).from_pretrained(str(tmp_path / "pt"))
  assert type(model) is REGISTRY[task][pt.config.model_type]
  assert type(model).__name__ == "Flax" + type(pt).__name__
  got = model(**inputs, **flags)
  assert_outputs_close(got, want)
  again = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, params=model.params,
                return_dict=False)  # v4 convention: explicit params, a tuple
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())

  # Every flaxhf key is a PyTorch key; the PyTorch keys it lacks are tied copies of ones it has.
  state = pt.state_dict()
  keys = set(flatten(model.params))
  assert keys <= set(state), keys - set(state)
  ptrs = {state[k].data_ptr() for k in keys}
  assert all(state[k].data_ptr() in ptrs for k in set(state) - keys), set(state) - keys
  if task in LM_TASKS:
    assert ("lm_head.weight" in keys) == (not head_is_tied(pt))

  model.save_pretrained(tmp_path / "flax")
  assert saved_keys(tmp_path / "flax") == saved_keys(tmp_path / "pt")
  back = load_torch(task, tmp_path / "flax")
  assert type(back) is type(pt)
  mine = back.state_dict()
  assert set(mine) == set(state)
  for k, v in state.items():
    assert torch.equal(mine[k], v), k
  if task in LM_TASKS:
    assert head_is_tied(back) == head_is_tied(pt)
  assert_outputs_close(got, torch_outputs(back, inputs, output_hidden_states=True))


def _find(flat, suffix):
  keys = [k for k in flat if k == suffix or k.endswith("." + suffix)]
  assert len(keys) == 1, (suffix, keys)
  return keys[0]


@pytest.mark.parametrize("family,case", INIT, ids=[_name(*c) for c in INIT])
def test_random_init_exports_to_torch(family, case, tmp_path):
  """flaxhf's own init (the family's rules) -> save -> transformers: bitwise the same weights, the
  keys transformers itself saves, the same outputs."""
  row = FAMILIES[family]
  task, overrides = row.init[case]
  config = row.config(num_labels=3, **overrides)
  model = (AUTO.get(task) or REGISTRY[task][config.model_type]).from_config(config, seed=3)
  flat = flatten(model.params)
  for suffix, rule in row.init_rules(config, task).items():
    key = _find(flat, suffix)
    if isinstance(rule, Std):
      np.testing.assert_allclose(np.std(flat[key]), rule.std, rtol=rule.rtol, err_msg=key)
    else:
      np.testing.assert_array_equal(flat[key], np.full_like(flat[key], rule), err_msg=key)
  model.save_pretrained(tmp_path / "flax")
  back = load_torch(task, tmp_path / "flax")
  state = back.state_dict()
  for k, v in flat.items():  # fixed tables transformers rebuilds on load (Marian's) included
    np.testing.assert_array_equal(state[k].numpy(), v, err_msg=k)
  back.save_pretrained(tmp_path / "torch")
  assert saved_keys(tmp_path / "flax") == saved_keys(tmp_path / "torch")
  inputs = make_inputs(family, config, task)
  assert_outputs_close(model(**inputs, output_hidden_states=True),
                       torch_outputs(back, inputs, output_hidden_states=True))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_labels_loss_matches_torch(family):
  """labels= alone: the loss ignores -100 and equals transformers' (encoder-decoders shift the
  labels right as transformers does: mBART wraps its language code round)."""
  task = lm_task(family)
  pt = torch_twin(family, task)
  c = pt.config
  inputs = make_inputs(family, c, task)
  if c.is_encoder_decoder:
    labels = inputs.pop("decoder_input_ids")
    inputs.pop("decoder_attention_mask")
    labels[:, -1] = c.eos_token_id
    labels[1, -2:] = -100
  else:
    labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
    labels[0, 4] = -100
  want = torch_outputs(pt, inputs, labels=torch.tensor(labels))
  model = twin(pt, task)
  got = model(**inputs, labels=labels)
  np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-5, rtol=1e-5)
  assert float(got.loss) > 1.0  # an untrained model over 99 tokens: about log(99)
  if c.is_encoder_decoder:  # explicit decoder inputs: the same as the shifted labels
    fn, args = FAMILIES[family].shift
    again = model(**inputs, decoder_input_ids=fn(labels, *args(c)), labels=labels)
    np.testing.assert_allclose(float(again.loss), float(got.loss), rtol=1e-6)


# ---- decoding with a cache ------------------------------------------------------------------------
@functools.lru_cache
def decoding_model(family):
  """A tiny random flaxhf LM (from a PyTorch init: no compile), shared by the decoding tests."""
  return twin(torch_twin(family, lm_task(family), seed=1), lm_task(family))


@functools.lru_cache
def _jitted_logits(model):
  return jax.jit(lambda params, inputs: model(**inputs, params=params).logits)


def logits_of(model, **inputs):
  """The model's logits without a cache, compiled once per shape (faster than op-by-op on CPU)."""
  return np.asarray(_jitted_logits(model)(model.params, inputs))


def _reorder(tree):
  """What beam search does to a cache: every array with a row axis gathered along it."""
  return jax.tree_util.tree_map(lambda x: x[::-1] if x.ndim else x, tree)


def _check_cache_layout(cache, batch, filled):
  flat = flatten(cache)
  index = [v for k, v in flat.items() if k.endswith("cache_index")]
  assert index and all(v.shape == () and int(v) == filled for v in index)
  assert all(v.shape[0] == batch for v in flat.values() if v.ndim)  # beam search gathers axis 0
  return flat


def _check_decoder_cache(model):
  """Prefill, 4 single tokens, then a chunk of 3, under jit, on a left-padded batch == one full pass."""
  prompt, total, max_length = 5, 12, 16
  rng = np.random.RandomState(0)
  ids = rng.randint(3, VOCAB, (2, total))
  mask = np.ones((2, total), np.int32)
  mask[1, :2] = 0  # row 1 is left-padded
  ids[1, :2] = model.config.pad_token_id
  positions = np.cumsum(mask, -1) - 1
  full = logits_of(model, input_ids=ids, attention_mask=mask, position_ids=positions)
  # The generation loop's mask: the prompt's padding, then every slot from the prompt's end on.
  cache_mask = np.ones((2, max_length), np.int32)
  cache_mask[:, :total] = mask

  @jax.jit
  def step(params, cache, ids_BxT, pos_BxT):
    out = model(ids_BxT, attention_mask=cache_mask, position_ids=pos_BxT, params=params,
                past_key_values=cache)
    return out.logits, out.past_key_values

  cache = model.init_cache(2, max_length)
  got = []
  for a, b in [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + 4)] + [(total - 3, total)]:
    logits, cache = step(model.params, cache, ids[:, a:b], positions[:, a:b])
    assert logits.shape == (2, b - a, VOCAB) and logits.dtype == jnp.float32
    got.append(np.asarray(logits))
  real = mask.astype(bool)  # padded queries see no key: their outputs are arbitrary
  np.testing.assert_allclose(np.concatenate(got, 1)[real], full[real], atol=1e-5, rtol=1e-5)
  _check_cache_layout(cache, 2, total)
  extra = rng.randint(3, VOCAB, (2, 1))
  logits = model(extra[::-1], attention_mask=cache_mask[::-1], position_ids=positions[::-1, -1:] + 1,
                 past_key_values=_reorder(cache)).logits
  mask_more = np.concatenate([mask, np.ones((2, 1), np.int32)], 1)
  want = logits_of(model, input_ids=np.concatenate([ids, extra], 1), attention_mask=mask_more,
                   position_ids=np.cumsum(mask_more, -1) - 1)[:, -1]
  np.testing.assert_allclose(np.asarray(logits)[::-1, 0], want, atol=1e-5, rtol=1e-5)

  # Generation's prefill and step: positions counted from the mask, so left padding shifts nothing.
  logits, state = model._generation_prefill(model.params, jnp.asarray(ids[:, :prompt]),
                                            jnp.asarray(mask[:, :prompt]), max_length, {})
  np.testing.assert_allclose(np.asarray(logits), full[:, prompt - 1], atol=1e-5, rtol=1e-5)
  for t in range(prompt, total - 1):
    logits, state = model._generation_step(model.params, jnp.asarray(ids[:, t]), state)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5, rtol=1e-5)
  logits, _ = model._generation_step(model.params, jnp.asarray(ids[::-1, -1]), _reorder(state))
  np.testing.assert_allclose(np.asarray(logits), full[::-1, -1], atol=1e-5, rtol=1e-5)


def _check_seq2seq_cache(family, model):
  """encode once + init_cache + decode (a 3-token prompt, then single tokens) under jit == one full
  pass; so does generation's prefill + step, whose steps never project the encoder states again."""
  row, c = FAMILIES[family], model.config
  inputs = make_inputs(family, c, "seq2seq_lm", (row.lengths[0], 9), seed=1)
  ids, enc_mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
  full_out = model(ids, attention_mask=enc_mask, decoder_input_ids=dec)
  full = np.asarray(full_out.logits)
  enc = model.encode(ids, attention_mask=enc_mask)
  np.testing.assert_allclose(np.asarray(enc.last_hidden_state),
                             np.asarray(full_out.encoder_last_hidden_state), atol=1e-6)
  max_length = 12
  cache_mask = np.ones((2, max_length), np.int32)

  @jax.jit
  def step(params, cache, ids_BxT, states):
    out = model.decode(ids_BxT, states, encoder_attention_mask=enc_mask,
                       decoder_attention_mask=cache_mask, past_key_values=cache, params=params)
    return out.logits, out.past_key_values

  cache = model.init_cache(2, max_length, enc)
  states = enc.last_hidden_state
  got = []
  for a, b in [(0, 3)] + [(t, t + 1) for t in range(3, 9)]:
    # A cache that holds the cross keys/values (T5's) needs the encoder states on its first call only.
    first_or_needed = a == 0 or not row.cache_holds_cross
    logits, cache = step(model.params, cache, dec[:, a:b], states if first_or_needed else None)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5, rtol=1e-5)
  flat = _check_cache_layout(cache, 2, 9)
  cross = [k for k in flat if k.endswith(f"{row.cross_attention}.cached_key")]
  assert bool(cross) == row.cache_holds_cross  # v4's BART cache: self-attention only
  assert all(flat[k].shape[:2] == (2, ids.shape[1]) for k in cross)
  extra = np.array([[5], [7]])
  logits = model.decode(extra[::-1], None if row.cache_holds_cross else states[::-1],
                        encoder_attention_mask=enc_mask[::-1], decoder_attention_mask=cache_mask,
                        past_key_values=_reorder(cache)).logits
  want = logits_of(model, input_ids=ids, attention_mask=enc_mask,
                   decoder_input_ids=np.concatenate([dec, extra], 1))
  np.testing.assert_allclose(np.asarray(logits)[::-1, 0], want[:, -1], atol=1e-5, rtol=1e-5)

  # Generation's path: the prefill caches the encoder's keys/values; the steps never project them
  # again, so they give the same logits with the cross-attention k/v projections set to NaN.
  n, p = 2, 3
  # Compiled, as generate runs them (op by op, T5's steps alone took tens of seconds).
  prefill = jax.jit(model._generation_prefill, static_argnums=3)
  gen_step = jax.jit(model._generation_step)
  logits, state = prefill(model.params, jnp.asarray(dec[:, :p]), jnp.ones((n, p), jnp.int32),
                          max_length, {"input_ids": ids, "attention_mask": enc_mask})
  np.testing.assert_allclose(np.asarray(logits), full[:, p - 1], atol=1e-5, rtol=1e-5)
  kv = (f"{row.cross_attention}.k", f"{row.cross_attention}.v")
  poisoned = {k: (np.full_like(v, np.nan) if any(s in k for s in kv) else v)
              for k, v in flatten(model.params).items()}
  layers = getattr(c, "decoder_layers", None) or c.num_decoder_layers
  assert sum(k.endswith("weight") and np.isnan(v).all() for k, v in poisoned.items()) == 2 * layers
  poisoned = model._params_from_state_dict(poisoned)
  for t in range(p, 8):
    logits, state = gen_step(poisoned, jnp.asarray(dec[:, t]), state)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5, rtol=1e-5)
  logits, _ = gen_step(poisoned, jnp.asarray(dec[::-1, 8]), _reorder(state))
  np.testing.assert_allclose(np.asarray(logits), full[::-1, 8], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decoding_matches_full_forward(family):
  model = decoding_model(family)
  if is_seq2seq(family):
    _check_seq2seq_cache(family, model)
  else:
    _check_decoder_cache(model)


# ---- generate == transformers' generate -----------------------------------------------------------
@functools.lru_cache
def gen_twins(family):
  """(PyTorch LM, flaxhf twin, ragged batch) with the same wide random weights."""
  task = lm_task(family)
  pt = torch_twin(family, task, **FAMILIES[family].generate.wide)
  c = pt.config
  rng = np.random.RandomState(1)
  lengths = (9, 4, 6)
  ids = np.full((3, max(lengths)), c.pad_token_id)
  mask = np.zeros_like(ids)
  for i, n in enumerate(lengths):
    row = slice(0, n) if c.is_encoder_decoder else slice(max(lengths) - n, None)  # prompts: left
    ids[i, row], mask[i, row] = rng.randint(3, VOCAB - 2, size=n), 1
    if c.is_encoder_decoder:  # sources right-padded, ending in EOS, as tokenizers make them
      ids[i, n - 1] = c.eos_token_id
  return pt, twin(pt, task), {"input_ids": ids, "attention_mask": mask}


def generate_both(family, **kwargs):
  pt, fx, batch = gen_twins(family)
  kwargs = {**FAMILIES[family].generate.settings, **kwargs}
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs)
  got = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
  want_seq = want.sequences if kwargs.get("return_dict_in_generate") else want
  np.testing.assert_array_equal(np.asarray(got.sequences), want_seq.numpy())
  check_start(family, np.asarray(got.sequences))
  return got, want


def new_tokens(family, seq):
  return seq[:, 1:] if is_seq2seq(family) else seq[:, gen_twins(family)[2]["input_ids"].shape[1]:]


@functools.lru_cache
def eos_candidates(family):
  """Tokens greedy decoding emits early on: as EOS ids they end rows at different steps."""
  pt, _, batch = gen_twins(family)
  kwargs = {**FAMILIES[family].generate.settings, **next(iter(FAMILIES[family].generate.greedy.values()))}
  with torch.no_grad():
    seq = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()}, do_sample=False,
                      max_new_tokens=8, eos_token_id=None, **kwargs).numpy()
  new = new_tokens(family, seq)
  return [int(new[0, 2]), int(new[2, 4])]


def check_start(family, seq):
  """Decoders continue the prompt; encoder-decoders start from decoder_start_token_id (Marian's and
  T5's pad id, mBART-50's EOS), then a forced language code where one is set."""
  pt, _, batch = gen_twins(family)
  if not is_seq2seq(family):
    prompts = np.repeat(batch["input_ids"], len(seq) // len(batch["input_ids"]), axis=0)  # beams
    np.testing.assert_array_equal(seq[:, :prompts.shape[1]], prompts)
    return
  assert (seq[:, 0] == pt.config.decoder_start_token_id).all()
  forced = FAMILIES[family].generate.settings.get("forced_bos_token_id")
  if forced is not None:
    assert (seq[:, 1] == forced).all()


@pytest.mark.parametrize("family,case", GREEDY, ids=[_name(*c) for c in GREEDY])
def test_greedy_equals_transformers(family, case):
  eos = eos_candidates(family)
  got, _ = generate_both(family, do_sample=False, max_new_tokens=12, eos_token_id=eos,
                         **FAMILIES[family].generate.greedy[case])
  new = new_tokens(family, np.asarray(got.sequences))
  ends = [int(np.argmax(np.isin(r, eos))) if np.isin(r, eos).any() else None for r in new]
  assert len(set(ends)) == len(ends), ends  # each row ends at a step of its own (or never)


@pytest.mark.parametrize("family,case", BEAMS, ids=[_name(*c) for c in BEAMS])
def test_beam_search_equals_transformers(family, case):
  kwargs = {**dict(num_beams=4, num_return_sequences=2, max_new_tokens=10),
            **FAMILIES[family].generate.beams[case]}
  got, want = generate_both(family, eos_token_id=eos_candidates(family), return_dict_in_generate=True,
                            output_scores=True, **kwargs)
  np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got.beam_indices), want.beam_indices.numpy())


# Generation features one family stands for; they reuse its twins (and compiled programs).
@pytest.mark.parametrize("family", ["bart"])
def test_generate_continues_a_decoder_prompt(family):
  """decoder_input_ids that start with the decoder start token are continued as given (P = 2)."""
  pt, fx, batch = gen_twins(family)
  start = pt.config.decoder_start_token_id
  dec = np.array([[start, 5], [start, 9], [start, 5]])
  greedy = dict(do_sample=False, max_new_tokens=12, **FAMILIES[family].generate.greedy[
      "repetition_penalty"])
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()},
                       decoder_input_ids=torch.tensor(dec), **greedy)
  got = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec,
                    **greedy).sequences
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  np.testing.assert_array_equal(np.asarray(got)[:, :2], dec)


@pytest.mark.parametrize("family", ["mbart"])
def test_generation_config_roundtrip(family, tmp_path):
  """transformers' generation_config.json (decoder start, forced BOS, EOS ids, length) loads with
  the model and drives generate as in PyTorch."""
  pt, fx, batch = gen_twins(family)
  settings = transformers.GenerationConfig.from_model_config(pt.config)
  settings.update(eos_token_id=eos_candidates(family), do_sample=False, max_new_tokens=12,
                  **FAMILIES[family].generate.settings, **FAMILIES[family].generate.greedy[
                      "repetition_penalty"])
  pt.generation_config = settings
  try:
    pt.save_pretrained(tmp_path)
  finally:
    pt.generation_config = transformers.GenerationConfig.from_model_config(pt.config)
  loaded = flaxhf.FlaxAutoModelForSeq2SeqLM.from_pretrained(str(tmp_path))
  assert loaded.generation_config.forced_bos_token_id == VOCAB - 2
  assert loaded.generation_config.decoder_start_token_id == 2
  # The loaded settings, on the twin whose program is compiled already.
  seq = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                    generation_config=loaded.generation_config).sequences
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()}, generation_config=settings)
  np.testing.assert_array_equal(np.asarray(seq), want.numpy())


# ---- shift_tokens_right, input errors -------------------------------------------------------------
SHIFTING = [f for f, row in FAMILIES.items() if row.shift]


@pytest.mark.parametrize("family", SHIFTING)
def test_shift_tokens_right_equals_transformers(family):
  """numpy, jax and jit inputs; v4 scripts import it from the model's module
  (`__import__(model.__module__).shift_tokens_right`), so that one is the family's."""
  row = FAMILIES[family]
  c = row.config()
  fn, args = row.shift
  labels = np.array([[5, 6, 7, 2, 98], [8, 9, 2, 98, -100], [4, 2, 98, 1, 1], [5, 6, -100, -100, -100]])
  want = row.torch_shift(torch.tensor(labels), c).numpy()
  got_np = fn(labels, *args(c))
  np.testing.assert_array_equal(np.asarray(got_np), want)
  if fn is t5.shift_tokens_right:
    assert isinstance(got_np, np.ndarray)  # data collators stay on the host
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(labels), *args(c))), want)
  jitted = jax.jit(fn, static_argnums=tuple(range(1, 1 + len(args(c)))))
  np.testing.assert_array_equal(np.asarray(jitted(jnp.asarray(labels), *args(c))), want)
  with pytest.raises(ValueError, match="pad_token_id has to be defined"):
    fn(labels, None, *args(c)[1:])
  other = row.config(pad_token_id=3, decoder_start_token_id=2)  # the arguments' order
  np.testing.assert_array_equal(np.asarray(fn(labels, *args(other))),
                                row.torch_shift(torch.tensor(labels), other).numpy())
  lm = REGISTRY["seq2seq_lm"][c.model_type]
  assert importlib.import_module(lm.__module__).shift_tokens_right is fn


@pytest.mark.parametrize("family", list(FAMILIES))
def test_input_errors(family):
  """The errors every family of a kind shares (its own limits: tests/test_<family>.py)."""
  model = decoding_model(family)
  if is_seq2seq(family):
    ids = np.array([[5, 6, 2]])
    enc = model.encode(ids)
    cache = model.init_cache(1, 8, enc)
    with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(1, 3\) but must be \(1, 8\)"):
      model.decode(ids, enc, past_key_values=cache, decoder_attention_mask=np.ones((1, 3)))
    with pytest.raises(ValueError, match="past_key_values must be the cache from model.init_cache"):
      model.decode(ids, enc, past_key_values={"x": np.zeros(2)})
    with pytest.raises(ValueError, match="decode needs encoder_outputs"):
      model.decode(ids, None)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\)"):
      model(ids, attention_mask=np.ones((1, 2)), decoder_input_ids=ids)
    with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(1, 2\)"):
      model(ids, decoder_input_ids=ids, decoder_attention_mask=np.ones((1, 2)))
    with pytest.raises(ValueError, match="dropout_rng"):
      model(ids, decoder_input_ids=ids, train=True)
    return
  ids = np.random.RandomState(0).randint(3, VOCAB, (2, 4))
  cache = model.init_cache(2, 8)
  with pytest.raises(ValueError, match="position_ids are required with past_key_values"):
    model(ids, attention_mask=np.ones((2, 8)), past_key_values=cache)
  with pytest.raises(ValueError, match=r"attention_mask must be \[batch, max_length\] = \(2, 8\)"):
    model(ids, attention_mask=np.ones((2, 4)), position_ids=np.zeros((2, 4)), past_key_values=cache)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\) but input_ids has \(2, 4\)"):
    model(ids, attention_mask=np.ones((2, 5)))
  with pytest.raises(ValueError, match=r"position_ids has shape \(2, 3\)"):
    model(ids, position_ids=np.zeros((2, 3)))
  with pytest.raises(ValueError, match="must be the cache from model.init_cache"):
    model(ids, position_ids=np.zeros((2, 4)), past_key_values={"not": "a cache"})
  with pytest.raises(ValueError, match="takes no token_type_ids"):
    model(ids, token_type_ids=np.zeros_like(ids))
  with pytest.raises(ValueError, match="dropout_rng"):
    model(ids, train=True)
  mt = model.config.model_type
  clf = REGISTRY["sequence_classification"][mt](model.config, _do_init=False)
  with pytest.raises(ValueError, match=f"past_key_values is for {REGISTRY[None][mt].__name__} and "
                                       f"{REGISTRY['causal_lm'][mt].__name__}"):
    clf(ids, position_ids=np.zeros((2, 4)), past_key_values=cache, params={})
