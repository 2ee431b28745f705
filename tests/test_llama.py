"""The rotary decoder families (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2/3): parity with transformers
both ways, every head, rope types, generate.

One table row per family, each switching its features on; a new family joins by adding a row.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf.models import decoder
from flaxhf.models.base import REGISTRY, flatten
from model_utils import VOCAB, torch_outputs

BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=VOCAB - 1)
ROPE = {
    "default": dict(rope_type="default", rope_theta=500.0),
    "linear": dict(rope_type="linear", rope_theta=1000.0, factor=2.0),
    # The sequences outgrow max_position_embeddings (8) while generating: the frequencies change.
    "dynamic": dict(rope_type="dynamic", rope_theta=1000.0, factor=2.0),
    "yarn": dict(rope_type="yarn", rope_theta=1000.0, factor=4.0, original_max_position_embeddings=16,
                 beta_fast=8.0, beta_slow=1.0),
    "llama3": dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8),
    "longrope": dict(rope_type="longrope", rope_theta=1000.0, original_max_position_embeddings=8,
                     short_factor=[1.0 + i / 10 for i in range(8)],
                     long_factor=[2.0 + i / 5 for i in range(8)]),
}
WINDOW = 5  # shorter than the test sequences and the generated ones
GEMMA = dict(head_dim=24, hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=2.0,
             query_pre_attn_scalar=20, sliding_window=WINDOW, num_hidden_layers=3,
             layer_types=["sliding_attention", "full_attention", "sliding_attention"])
# Phi-3 rotates half of each head: 4 frequencies. Generation stays below original_max (transformers
# recomputes the whole cache with the long factors on crossing it; test_phi3_longrope crosses it).
PHI3_ROPE = dict(rope_type="longrope", rope_theta=1000.0, partial_rotary_factor=0.5,
                 original_max_position_embeddings=32, short_factor=[1.0, 1.1, 1.3, 1.6],
                 long_factor=[2.0, 2.5, 3.0, 4.0])
# family -> every feature on: GQA, a scaled rope, biases, head_dim != hidden / heads, (un)tied
# embeddings, sliding windows (Qwen: on the layers from max_window_layers on), Qwen3's q/k norm.
FAMILIES = {
    "llama": lambda **kw: transformers.LlamaConfig(**{**BASE, **dict(
        head_dim=24, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        rope_parameters=ROPE["llama3"]), **kw}),
    "mistral": lambda **kw: transformers.MistralConfig(**{**BASE, **dict(
        sliding_window=WINDOW, rope_parameters=ROPE["yarn"]), **kw}),
    "qwen2": lambda **kw: transformers.Qwen2Config(**{**BASE, **dict(
        num_hidden_layers=3, use_sliding_window=True, max_window_layers=1, sliding_window=WINDOW,
        tie_word_embeddings=True, max_position_embeddings=8, rope_parameters=ROPE["dynamic"]), **kw}),
    "qwen3": lambda **kw: transformers.Qwen3Config(**{**BASE, **dict(
        head_dim=32, attention_bias=True, use_sliding_window=True, max_window_layers=1,
        sliding_window=WINDOW, tie_word_embeddings=False, rope_parameters=ROPE["linear"]), **kw}),
    "phi3": lambda **kw: transformers.Phi3Config(**{**BASE, **dict(
        sliding_window=WINDOW, resid_pdrop=0.1, original_max_position_embeddings=32,
        tie_word_embeddings=False, rope_parameters=PHI3_ROPE), **kw}),
    "gemma": lambda **kw: transformers.GemmaConfig(**{**BASE, **dict(
        head_dim=24, hidden_act="gelu_pytorch_tanh", attention_bias=True,
        rope_parameters=ROPE["llama3"]), **kw}),
    # Gemma 2 runs eager attention in transformers (no SDPA): padded queries average every value.
    # The attention cap is small, as this tiny random model's attention logits are.
    "gemma2": lambda **kw: transformers.Gemma2Config(**{**BASE, **GEMMA, **dict(
        attn_logit_softcapping=0.05, max_position_embeddings=8, rope_parameters=ROPE["dynamic"]), **kw}),
    "gemma3": lambda **kw: transformers.Gemma3TextConfig(**{**BASE, **GEMMA, **dict(
        head_dim=32, rope_parameters={"full_attention": ROPE["linear"],
                                      "sliding_attention": dict(rope_type="default", rope_theta=100.0)}),
        **kw}),
}
TORCH_HEADS = {"causal_lm": "AutoModelForCausalLM", None: "AutoModel",
               "sequence_classification": "AutoModelForSequenceClassification",
               "token_classification": "AutoModelForTokenClassification",
               "question_answering": "AutoModelForQuestionAnswering"}
FIELDS = {None: ["last_hidden_state"], "question_answering": ["start_logits", "end_logits"]}


def torch_model(family, task="causal_lm", **kw):
  """A fresh random PyTorch twin (fresh: dynamic rope keeps state between calls in transformers)."""
  torch.manual_seed(0)
  config = FAMILIES[family](num_labels=2 if task == "question_answering" else 3, **kw)
  return getattr(transformers, TORCH_HEADS[task]).from_config(config).eval()


def left_padded(batch_lengths, width, seed=0):
  """Ids and mask of a ragged batch, left-padded to `width` (as decoder-only prompts are)."""
  rng = np.random.RandomState(seed)
  ids, mask = np.zeros((len(batch_lengths), width), np.int64), np.zeros((len(batch_lengths), width), np.int64)
  for i, n in enumerate(batch_lengths):
    ids[i, width - n:], mask[i, width - n:] = rng.randint(3, VOCAB - 1, n), 1
  return ids, mask


def assert_outputs_close(got, want, task):
  """Each head's outputs, padded slots included (a query that sees no key gets zero context there)."""
  for name in FIELDS.get(task, ["logits"]):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), getattr(want, name).detach().numpy(),
                               atol=1e-5, rtol=1e-5, err_msg=name)


def roundtrip(pt, task, tmp_path, inputs, labels=None):
  """PyTorch -> flaxhf (outputs, hidden states, loss) -> save_pretrained -> PyTorch, bitwise."""
  pt.save_pretrained(tmp_path / "pt")
  want = torch_outputs(pt, inputs, output_hidden_states=True,
                       **({"labels": torch.tensor(labels)} if labels is not None else {}))
  auto = {None: flaxhf.FlaxAutoModel, "causal_lm": flaxhf.FlaxAutoModelForCausalLM,
          "sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
          "token_classification": flaxhf.FlaxAutoModelForTokenClassification,
          "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering}[task]
  model = auto.from_pretrained(str(tmp_path / "pt"))
  assert type(model) is REGISTRY[task][pt.config.model_type]
  got = model(**inputs, output_hidden_states=True, labels=labels)
  assert_outputs_close(got, want, task)
  assert len(got.hidden_states) == len(want.hidden_states) == pt.config.num_hidden_layers + 1
  for g, w in zip(got.hidden_states, want.hidden_states):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=1e-5)
  if labels is not None:
    np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())

  model.save_pretrained(tmp_path / "flax")
  back, info = getattr(transformers, TORCH_HEADS[task]).from_pretrained(
      tmp_path / "flax", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert type(back) is type(pt)
  mine, theirs = pt.state_dict(), back.state_dict()
  assert set(mine) == set(theirs)
  for k in mine:
    assert torch.equal(mine[k], theirs[k]), k
  assert_outputs_close(got, torch_outputs(back.eval(), inputs), task)
  return model


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_roundtrip(family, tmp_path):
  pt = torch_model(family)
  ids, mask = left_padded((12, 7), 12)
  labels = np.where(mask == 1, ids, -100)
  model = roundtrip(pt, "causal_lm", tmp_path, {"input_ids": ids, "attention_mask": mask}, labels)
  keys = set(flatten(model.params))
  assert ("lm_head.weight" in keys) == (not pt.config.tie_word_embeddings)
  # The static cache holds the KV heads only (GQA): [batch, slots, num_key_value_heads, head_dim].
  cache = flatten(model.init_cache(2, 16))
  head_dim = decoder.rope_head_dim(pt.config)
  assert cache["model.layers.0.self_attn.cached_key"].shape == (2, 16, 2, head_dim)


# Every other head, each on another family (they share one head module per task).
HEAD_CASES = [(None, "mistral"), ("sequence_classification", "llama"),
              ("token_classification", "qwen3"), ("question_answering", "qwen2"),
              (None, "gemma2"), ("sequence_classification", "gemma3"),
              ("token_classification", "gemma"), ("sequence_classification", "phi3"),
              ("token_classification", "phi3")]


@pytest.mark.parametrize("task,family", HEAD_CASES, ids=[f"{t}-{f}" for t, f in HEAD_CASES])
def test_heads_roundtrip(task, family, tmp_path):
  pt = torch_model(family, task)
  ids, mask = left_padded((9, 6, 2), 9, seed=1)
  labels = {"sequence_classification": np.array([0, 2, 1]),
            "token_classification": np.where(mask == 1, ids % 3, -100)}.get(task)
  inputs = {"input_ids": ids, "attention_mask": mask}
  if task == "question_answering":
    inputs.update(start_positions=np.array([1, 4, 7]), end_positions=np.array([3, 5, 8]))
  roundtrip(pt, task, tmp_path, inputs, labels)


@pytest.mark.parametrize("kind", ROPE)
def test_rope_frequencies_equal_transformers(kind):
  """decoder.rope_frequencies (numpy, jax for the length-dependent kinds) == ROPE_INIT_FUNCTIONS."""
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  config = FAMILIES["llama"](rope_parameters=ROPE[kind], max_position_embeddings=8, head_dim=16)
  for seq_len in (None, 6, 20):
    if kind == "default":
      want, want_factor = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding \
          .compute_default_rope_parameters(config)
    else:
      want, want_factor = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
    got, factor = decoder.rope_frequencies(config, seq_len)
    if kind == "dynamic" and seq_len == 6:  # transformers keeps the original below the limit
      want = ROPE_INIT_FUNCTIONS[kind](config, None)[0]
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=2e-7, err_msg=f"{seq_len}")
    assert factor == pytest.approx(want_factor)


@pytest.mark.parametrize("kind", ["default", "longrope"])
def test_other_rope_types_forward(kind, tmp_path):
  """The rope types no family row uses, through a forward past original_max_position_embeddings."""
  pt = torch_model("llama", rope_parameters=ROPE[kind], head_dim=16)
  ids, mask = left_padded((11, 5), 11, seed=2)
  roundtrip(pt, "causal_lm", tmp_path, {"input_ids": ids, "attention_mask": mask})


def test_phi3_longrope_past_original_max(tmp_path):
  """Phi-3's longrope (partial rotary, attention factor from max / original max positions) on a
  forward that outgrows original_max_position_embeddings, so the long factors apply."""
  pt = torch_model("phi3", original_max_position_embeddings=8,
                   rope_parameters={**PHI3_ROPE, "original_max_position_embeddings": 8})
  ids, mask = left_padded((11, 5), 11, seed=2)
  roundtrip(pt, "causal_lm", tmp_path, {"input_ids": ids, "attention_mask": mask})


@functools.lru_cache
def flax_lm(family):
  pt = torch_model(family)
  model = REGISTRY["causal_lm"][pt.config.model_type](pt.config, _do_init=False)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_transformers(family, num_beams):
  """Greedy and beam search on a ragged left-padded batch, past the sliding window (5 slots) and,
  for dynamic rope, past max_position_embeddings: token for token."""
  ids, mask = left_padded((7, 3), 7, seed=3)
  kwargs = dict(max_new_tokens=8, num_beams=num_beams, do_sample=False, pad_token_id=0)
  got = flax_lm(family).generate(ids, attention_mask=mask, **kwargs).sequences
  pt = torch_model(family)
  with torch.no_grad():
    want = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())


@pytest.mark.parametrize("num_beams", [1, 3])
def test_phi3_generate_across_original_max_rebuilds_the_cache(num_beams):
  """Generating across Phi-3's original_max_position_embeddings (32 here): transformers recomputes
  the whole cache with the long factors at the step that crosses it; flaxhf does the same, so the
  tokens after it stay equal (keeping the short-factor keys would change them)."""
  ids, mask = left_padded((7, 3), 7, seed=3)
  kwargs = dict(max_new_tokens=30, num_beams=num_beams, do_sample=False, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True)
  got = flax_lm("phi3").generate(ids, attention_mask=mask, **kwargs)
  pt = torch_model("phi3")
  with torch.no_grad():
    want = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)
  assert want.sequences.shape[1] > 33
  np.testing.assert_array_equal(np.asarray(got.sequences), want.sequences.numpy())
  # The scores of every step (random tiny models rarely flip a token): 1e-4 after the crossing.
  assert len(got.scores) == len(want.scores) == 30
  for step, (g, w) in enumerate(zip(got.scores, want.scores)):
    w = w.numpy()
    np.testing.assert_allclose(np.where(np.isfinite(w), np.asarray(g), 0), np.where(
        np.isfinite(w), w, 0), atol=1e-4, err_msg=f"step {step}")


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_classes_and_mappings(family):
  """Each family has exactly the heads transformers' auto classes have for its model_type, exported
  from flaxhf and registered under its config class, each exporting to its PyTorch twin."""
  from transformers.models.auto import modeling_auto as torch_auto
  config_class = type(FAMILIES[family]())
  model_type = config_class.model_type
  for task, mapping, torch_names in (
      ("causal_lm", flaxhf.FLAX_MODEL_FOR_CAUSAL_LM_MAPPING, torch_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
      (None, flaxhf.FLAX_MODEL_MAPPING, torch_auto.MODEL_MAPPING_NAMES),
      ("sequence_classification", flaxhf.FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
       torch_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
      ("token_classification", flaxhf.FLAX_MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING,
       torch_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
      ("question_answering", flaxhf.FLAX_MODEL_FOR_QUESTION_ANSWERING_MAPPING,
       torch_auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES)):
    cls = REGISTRY.get(task, {}).get(model_type)
    assert (cls is not None) == (model_type in torch_names), (task, model_type)
    if cls is None:
      continue
    assert mapping[config_class] is cls and getattr(flaxhf, cls.__name__) is cls
    assert cls.torch_architecture == torch_names[model_type] == cls.__name__[len("Flax"):]


@pytest.mark.parametrize("overrides,match", [
    (dict(rope_parameters=dict(rope_type="su", rope_theta=1e4)), "rope_type 'su'.*not supported"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5 is not supported"),
    (dict(hidden_act="swiglu_unknown"), "Unsupported activation 'swiglu_unknown'"),
])
def test_unsupported_config_switches_are_named(overrides, match):
  config = FAMILIES["llama"]()
  for k, v in overrides.items():
    setattr(config, k, v)
  with pytest.raises(ValueError, match=match):
    flaxhf.FlaxLlamaForCausalLM(config, _do_init=False)


@pytest.mark.parametrize("family,overrides,match", [
    ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention=True is not"),
    ("gemma2", dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)),
     "partial_rotary_factor=0.5 is not supported by flaxhf's gemma2"),
    ("gemma3", dict(rope_parameters={"full_attention": dict(rope_type="su", rope_theta=1e4),
                                     "sliding_attention": dict(rope_type="default", rope_theta=1e4)}),
     "rope_type 'su'.*not supported"),
    ("gemma3", dict(rope_parameters={"full_attention": dict(rope_type="default", rope_theta=1e4)}),
     "rope_parameters has no entry for layer type 'sliding_attention'"),
    ("gemma2", dict(hidden_activation="swiglu_unknown"), "Unsupported activation 'swiglu_unknown'"),
    ("phi3", dict(rope_parameters=dict(rope_type="su", rope_theta=1e4)), "rope_type 'su'.*not supported"),
])
def test_unsupported_switches_of_other_families(family, overrides, match):
  config = FAMILIES[family]()
  for k, v in overrides.items():
    setattr(config, k, v)
  with pytest.raises(ValueError, match=match):
    REGISTRY["causal_lm"][config.model_type](config, _do_init=False)


def test_unknown_layer_type_is_named():
  config = FAMILIES["qwen2"]()
  config.layer_types = ["full_attention", "chunked_attention", "sliding_attention"]
  with pytest.raises(ValueError, match=r"layer_types \['chunked_attention'\] are not supported"):
    flaxhf.FlaxQwen2Model(config, _do_init=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_scan_and_remat_equal_the_layer_loop(family):
  """Scanned, rematerialised layers give the loop's logits, for every family (Qwen2's sliding
  window and Gemma 3's rope differ by layer, so the scanned layer looks them up by the traced
  layer index)."""
  pt = torch_model(family)
  ids, mask = left_padded((9, 4), 9, seed=4)
  want = np.asarray(flax_lm(family)(ids, attention_mask=mask).logits)
  scanned = REGISTRY["causal_lm"][pt.config.model_type](pt.config, _do_init=False, scan_layers=True,
                                                        remat="nothing_saveable")
  scanned.params = scanned._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  assert flatten(scanned.params)["model.layers.mlp.down_proj.weight"].shape[0] == pt.config.num_hidden_layers
  np.testing.assert_allclose(np.asarray(scanned(ids, attention_mask=mask).logits), want, atol=1e-5)


def test_phi3_residual_dropout_is_live_in_training():
  """resid_pdrop (the only dropout of the Phi-3 row) drops the attention and MLP outputs when
  training, reproducibly per rng, and never at eval."""
  model, (ids, mask) = flax_lm("phi3"), left_padded((9, 4), 9, seed=5)
  evaluated = np.asarray(model(ids, attention_mask=mask).logits)
  trained = [np.asarray(model(ids, attention_mask=mask, train=True,
                              dropout_rng=jax.random.key(s)).logits) for s in (0, 0, 1)]
  np.testing.assert_array_equal(trained[0], trained[1])
  assert not np.allclose(trained[0], evaluated) and not np.allclose(trained[0], trained[2])


def test_sharded_bf16_folder_loads_in_bf16_onto_the_mesh_and_exports_bf16(tmp_path):
  """A bf16 checkpoint in safetensors shards with an index, as the hub serves Llama: with
  param_dtype=bfloat16 every weight lands on its mesh shards still bf16 (bitwise the file's), a
  float32 compute over them equals PyTorch's float32 model of the same weights, and
  save_pretrained writes bf16 that transformers reads back bitwise."""
  import jax.numpy as jnp
  from flaxhf import sharding
  pt = torch_model("llama").to(torch.bfloat16)
  pt.save_pretrained(tmp_path / "pt", max_shard_size="100KB")
  files = sorted(p.name for p in (tmp_path / "pt").iterdir())
  assert "model.safetensors.index.json" in files
  assert len([f for f in files if f.endswith(".safetensors")]) >= 2
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = flaxhf.FlaxAutoModelForCausalLM.from_pretrained(str(tmp_path / "pt"), param_dtype="bfloat16",
                                                          mesh=mesh, rules="fsdp_tp")
  leaves = flatten(model.params)
  assert {v.dtype for v in leaves.values()} == {np.dtype(jnp.bfloat16)}
  q = leaves["model.layers.0.self_attn.q_proj.weight"]
  assert len(q.sharding.device_set) == 8 and q.addressable_shards[0].data.shape != q.shape
  want = {k: v.view(torch.int16).numpy() for k, v in pt.state_dict().items()}
  got = model.state_dict()
  assert set(got) == set(want)
  for k, v in got.items():
    assert v.dtype == jnp.bfloat16 and np.array_equal(v.view(np.int16), want[k]), k

  ids, mask = left_padded((12, 7), 12)
  logits = model(ids, attention_mask=mask).logits  # dtype float32: the bf16 weights computed in fp32
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), torch_outputs(pt.float(), {
      "input_ids": ids, "attention_mask": mask}).logits.numpy(), atol=1e-5, rtol=1e-5)

  model.save_pretrained(tmp_path / "flax")
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "flax")
  assert back.dtype == torch.bfloat16
  for k, v in back.state_dict().items():
    assert v.dtype == torch.bfloat16 and np.array_equal(v.view(torch.int16).numpy(), want[k]), k
  # v4's casts: to_fp32 then to_bf16 gives the same weights back, bitwise.
  fp32 = model.to_fp32()
  assert {v.dtype for v in flatten(fp32).values()} == {np.dtype(np.float32)}
  for k, v in flatten(model.to_bf16(fp32)).items():
    assert np.array_equal(np.asarray(v).view(np.int16), np.asarray(leaves[k]).view(np.int16)), k
  with pytest.raises(ValueError, match="param_dtype=int8 is not a weight dtype"):
    flaxhf.FlaxAutoModelForCausalLM.from_pretrained(str(tmp_path / "pt"), param_dtype="int8")
