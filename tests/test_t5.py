"""T5, T5 v1.1 and mT5: parity with transformers both ways, the cache, losses, generate == PyTorch's."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf.models import t5
from flaxhf.models.base import REGISTRY, flatten
from model_utils import VOCAB, torch_outputs

# Small bucket counts and distances so that sequences of ~10-20 tokens reach the log-spaced buckets.
_TINY = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=16,
             decoder_start_token_id=0, dropout_rate=0.1)
VARIANTS = {
    "t5": lambda **kw: transformers.T5Config(**{**_TINY, **kw}),
    # v1.1: gated GELU, untied lm_head, no rescale; a 3-layer decoder over the 2-layer encoder.
    "t5-v1_1": lambda **kw: transformers.T5Config(**{**_TINY, **dict(
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3), **kw}),
    "mt5": lambda **kw: transformers.MT5Config(**{**_TINY, **kw}),
}
PREFIX = {"t5": "T5", "t5-v1_1": "T5", "mt5": "MT5"}
CLASSES = ("Model", "ForConditionalGeneration", "EncoderModel")
TASK = {"Model": None, "ForConditionalGeneration": "seq2seq_lm", "EncoderModel": "text_encoding"}
CASES = [(v, c) for v in VARIANTS for c in CLASSES]


def torch_twin(variant, suffix, seed=0, **kw):
  """A random transformers model; v1.1 / mT5 LMs get their own lm_head, as released checkpoints do."""
  torch.manual_seed(seed)
  config = VARIANTS[variant](**kw)
  pt = getattr(transformers, PREFIX[variant] + suffix)(config).eval()
  if suffix == "ForConditionalGeneration" and t5.has_lm_head(config):
    # transformers 5 ties lm_head to shared unless the checkpoint's differ: make them differ.
    std = config.initializer_factor * config.d_model ** -0.5
    pt.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model) * std)
  return pt


def seq2seq_inputs(suffix, batch=2, src=13, tgt=11, seed=0):
  """Right-padded source and target rows (row 1 shorter in both)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(2, VOCAB, (batch, src))
  mask = np.ones_like(ids)
  mask[1, src - 4:] = 0
  inputs = {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask}
  if suffix != "EncoderModel":
    dec = rng.randint(2, VOCAB, (batch, tgt))
    dec[:, 0] = 0  # the decoder start token
    dec_mask = np.ones_like(dec)
    dec_mask[1, tgt - 3:] = 0
    inputs.update(decoder_input_ids=np.where(dec_mask == 1, dec, 0), decoder_attention_mask=dec_mask)
  return inputs


def compared(out):
  """The arrays to compare, by transformers field name."""
  names = ("logits", "last_hidden_state", "encoder_last_hidden_state", "decoder_hidden_states",
           "encoder_hidden_states", "hidden_states")
  result = {}
  for n in names:
    v = getattr(out, n, None)
    if v is None:
      continue
    for i, a in enumerate(v if isinstance(v, tuple) else (v,)):
      result[f"{n}.{i}"] = a.detach().numpy() if hasattr(a, "detach") else np.asarray(a)
  return result


def assert_close(got, want, atol=1e-5):
  got, want = compared(got), compared(want)
  assert set(got) == set(want) and got, (sorted(got), sorted(want))
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-5, err_msg=name)


def export_and_check(model, pt_class, inputs, tmp_path):
  """save_pretrained -> transformers loads with no key left over, to the same outputs."""
  model.save_pretrained(tmp_path / "flax")
  back, info = pt_class.from_pretrained(tmp_path / "flax", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert_close(model(**inputs, output_hidden_states=True),
               torch_outputs(back.eval(), inputs, output_hidden_states=True))
  return back


def flax_class(variant, suffix):
  return getattr(flaxhf, f"Flax{PREFIX[variant]}{suffix}")


def load(variant, suffix, path):
  """Through the auto class where transformers has one for the head (the encoder has none in v4)."""
  auto = {"Model": flaxhf.FlaxAutoModel, "ForConditionalGeneration": flaxhf.FlaxAutoModelForSeq2SeqLM}
  return (auto.get(suffix) or flax_class(variant, suffix)).from_pretrained(str(path))


@pytest.mark.parametrize("variant,suffix", CASES, ids=[f"{v}-{c}" for v, c in CASES])
def test_roundtrip_parity(variant, suffix, tmp_path):
  """PyTorch -> flaxhf (outputs, hidden states, param count) -> save -> PyTorch, no keys left over."""
  pt = torch_twin(variant, suffix)
  pt.save_pretrained(tmp_path / "pt")
  inputs = seq2seq_inputs(suffix)
  want = torch_outputs(pt, inputs, output_hidden_states=True)
  model = load(variant, suffix, tmp_path / "pt")
  assert type(model) is flax_class(variant, suffix)
  got = model(**inputs, output_hidden_states=True)
  assert_close(got, want)
  again = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, params=model.params,
                return_dict=False)  # v4 convention: explicit params, a tuple
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())
  keys = set(flatten(model.params))
  assert ("lm_head.weight" in keys) == (suffix == "ForConditionalGeneration" and variant != "t5")
  assert not any("embed_tokens" in k for k in keys)  # one `shared` table
  stacks = ("encoder",) if suffix == "EncoderModel" else ("decoder", "encoder")
  assert sorted(k for k in keys if "relative_attention_bias" in k) == [  # block 0 of each stack only
      f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight" for s in stacks]
  back = export_and_check(model, type(pt), inputs, tmp_path)
  if suffix == "ForConditionalGeneration":
    tied = back.lm_head.weight.data_ptr() == back.shared.weight.data_ptr()
    assert tied == (variant == "t5")


def test_relative_attention_bias_only_in_block_0():
  model = flaxhf.FlaxT5ForConditionalGeneration(VARIANTS["t5-v1_1"](), _do_init=False)
  keys = sorted(k for k in flatten(model.param_shapes()) if "relative_attention_bias" in k)
  assert keys == ["decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
  assert len([k for k in flatten(model.param_shapes()) if k.startswith("decoder.block.2.")]) == 14


@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])  # mT5 differs from v1.1 by its config class
def test_random_init_exports_to_torch(variant, tmp_path):
  """flaxhf's own init (transformers' T5 rules) -> save -> transformers: same outputs."""
  # A wider factor is drawn correctly too, but then float32 rounding on both sides (not a bug: each
  # is as far from a float64 run) passes 1e-5 at these sizes.
  config = VARIANTS[variant]()
  model = flaxhf.FlaxAutoModelForSeq2SeqLM.from_config(config, seed=3)
  flat = flatten(model.params)
  d, f = config.d_model, config.initializer_factor
  for key, std in (("shared.weight", f), ("encoder.block.0.layer.0.SelfAttention.q.weight",
                                         f * (d * config.d_kv) ** -0.5),
                   ("decoder.block.1.layer.1.EncDecAttention.k.weight", f * d ** -0.5),
                   ("encoder.block.1.layer.0.SelfAttention.o.weight", f * 32 ** -0.5),
                   ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                    f * d ** -0.5)):
    np.testing.assert_allclose(np.std(flat[key]), std, rtol=0.15, err_msg=key)
  np.testing.assert_array_equal(flat["encoder.final_layer_norm.weight"], f)
  wo = "decoder.block.0.layer.2.DenseReluDense.wo.weight"
  np.testing.assert_allclose(np.std(flat[wo]), f * config.d_ff ** -0.5, rtol=0.15)
  export_and_check(model, getattr(transformers, PREFIX[variant] + "ForConditionalGeneration"),
                   seq2seq_inputs("ForConditionalGeneration"), tmp_path)


def test_attentions_match_torch_eager():
  pt = torch_twin("t5-v1_1", "ForConditionalGeneration")
  pt.set_attn_implementation("eager")  # sdpa returns no attention probabilities
  model = flaxhf.FlaxT5ForConditionalGeneration(pt.config, _do_init=False)
  params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = seq2seq_inputs("ForConditionalGeneration")
  want = torch_outputs(pt, inputs, output_attentions=True)
  got = model(**inputs, params=params, output_attentions=True)
  for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
    g, w = getattr(got, name), getattr(want, name)
    assert len(g) == len(w) > 0, name
    for a, b in zip(g, w):
      np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5, err_msg=name)


@pytest.mark.parametrize("variant", ["t5", "t5-v1_1"])
def test_labels_loss_matches_torch(variant):
  pt = torch_twin(variant, "ForConditionalGeneration")
  model = flaxhf.FlaxT5ForConditionalGeneration(pt.config, _do_init=False)
  params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = seq2seq_inputs("ForConditionalGeneration")
  labels = np.random.RandomState(1).randint(2, VOCAB, (2, 7))
  labels[1, 4:] = -100  # padding, ignored
  with torch.no_grad():
    want = pt(input_ids=torch.tensor(inputs["input_ids"]),
              attention_mask=torch.tensor(inputs["attention_mask"]), labels=torch.tensor(labels))
  got = model(inputs["input_ids"], inputs["attention_mask"], labels=labels, params=params)
  np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-5, rtol=1e-5)
  assert float(got.loss) > 1.0
  # Explicit decoder inputs: the same as the shifted labels.
  shifted = t5.shift_tokens_right(labels, 0, 0)
  again = model(inputs["input_ids"], inputs["attention_mask"], decoder_input_ids=shifted,
                labels=labels, params=params)
  np.testing.assert_allclose(float(again.loss), float(got.loss), rtol=1e-6)


def test_shift_tokens_right_equals_transformers():
  pt = torch_twin("t5", "ForConditionalGeneration")
  labels = np.array([[5, 6, -100, -100], [7, 8, 9, 1]])
  want = pt._shift_right(torch.tensor(labels)).numpy()
  got_np = t5.shift_tokens_right(labels, 0, 0)
  assert isinstance(got_np, np.ndarray)  # data collators stay on the host
  np.testing.assert_array_equal(got_np, want)
  np.testing.assert_array_equal(np.asarray(t5.shift_tokens_right(jnp.asarray(labels), 0, 0)), want)
  np.testing.assert_array_equal(t5.shift_tokens_right(labels, 3, 2)[:, 0], [2, 2])  # start, pad args
  np.testing.assert_array_equal(t5.shift_tokens_right(labels, 3, 2)[0], [2, 5, 6, 3])
  np.testing.assert_array_equal(
      np.asarray(jax.jit(t5.shift_tokens_right, static_argnums=(1, 2))(jnp.asarray(labels), 0, 0)),
      want)


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets,distance", [(32, 128), (8, 16)])
def test_relative_position_bucket_equals_transformers(bidirectional, buckets, distance):
  rel = np.arange(-300, 301)[None, :] - np.zeros((1, 1), np.int64)
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
  got = t5.relative_position_bucket(jnp.asarray(rel), bidirectional, buckets, distance)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())


@pytest.fixture(scope="module")
def lm():
  """A tiny random flaxhf T5 v1.1 LM (its own init), shared by the decoding tests."""
  return flaxhf.FlaxT5ForConditionalGeneration(VARIANTS["t5-v1_1"](), seed=1)


@functools.lru_cache
def _jitted_logits(model):
  return jax.jit(lambda params, ids, mask, dec, dec_mask: model(
      ids, mask, dec, dec_mask, params=params).logits)


def test_encode_decode_with_cache_matches_full_forward(lm):
  """encode once; decode a 3-token prompt, then single tokens under jit, over a 16-slot cache."""
  inputs = seq2seq_inputs("ForConditionalGeneration", tgt=9)
  ids, mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
  full = np.asarray(_jitted_logits(lm)(lm.params, ids, mask, dec, np.ones_like(dec)))
  enc = lm.encode(ids, mask)
  np.testing.assert_allclose(np.asarray(enc.last_hidden_state), np.asarray(
      lm(ids, mask, dec).encoder_last_hidden_state), atol=1e-6)
  max_length = 16
  cache = lm.init_cache(2, max_length, enc)
  cache_mask = np.ones((2, max_length), np.int32)

  @jax.jit
  def step(params, cache, dec_ids, states):
    out = lm.decode(dec_ids, states, encoder_attention_mask=mask, decoder_attention_mask=cache_mask,
                    past_key_values=cache, params=params)
    return out.logits, out.past_key_values

  got = []
  logits, cache = step(lm.params, cache, dec[:, :3], enc)
  got.append(np.asarray(logits))
  for t in range(3, 9):  # the cross keys/values stored by the first call are reused
    logits, cache = step(lm.params, cache, dec[:, t:t + 1], None)
    got.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5, rtol=1e-5)
  flat = flatten(cache)
  index = flat["decoder.block.0.layer.0.SelfAttention.cache_index"]
  assert index.shape == () and int(index) == 9
  assert flat["decoder.block.2.layer.1.EncDecAttention.cached_key"].shape == (2, 13, 4, 8)
  # Every non-scalar cache array has the row axis first: beam search reorders by gathering it.
  assert all(v.shape[0] == 2 for v in flat.values() if v.ndim)

  swapped = jax.tree_util.tree_map(lambda x: x[::-1] if x.ndim else x, cache)
  extra = np.array([[5], [7]])
  logits = lm.decode(extra[::-1], None, encoder_attention_mask=mask[::-1],
                     decoder_attention_mask=cache_mask, past_key_values=swapped).logits
  want = _jitted_logits(lm)(lm.params, ids, mask, np.concatenate([dec, extra], 1),
                            np.ones((2, 10), np.int32))[:, -1]
  np.testing.assert_allclose(np.asarray(logits)[::-1, 0], np.asarray(want), atol=1e-5, rtol=1e-5)


def test_decode_without_cache_and_base_model_decode(lm):
  inputs = seq2seq_inputs("ForConditionalGeneration")
  out = lm(**inputs)
  enc = lm.encode(inputs["input_ids"], inputs["attention_mask"])
  dec = lm.decode(inputs["decoder_input_ids"], enc, encoder_attention_mask=inputs["attention_mask"],
                  decoder_attention_mask=inputs["decoder_attention_mask"])
  np.testing.assert_allclose(np.asarray(dec.logits), np.asarray(out.logits), atol=1e-6)
  assert dec.past_key_values is None
  base = flaxhf.FlaxT5Model(lm.config, _do_init=False)
  params = {k: v for k, v in lm.params.items() if k != "lm_head"}
  hidden = base.decode(inputs["decoder_input_ids"], enc, inputs["attention_mask"],
                       inputs["decoder_attention_mask"], params=params).last_hidden_state
  np.testing.assert_allclose(np.asarray(hidden) @ np.asarray(lm.params["lm_head"]["weight"]).T,
                             np.asarray(out.logits), atol=1e-5)


def test_missing_decoder_start_token_is_a_clear_error(lm):
  config = copy.deepcopy(lm.config)
  del config.decoder_start_token_id
  assert getattr(config, "decoder_start_token_id", None) is None  # as transformers 5's T5Config()
  model = flaxhf.FlaxT5ForConditionalGeneration(config, _do_init=False)
  ids = np.array([[5, 6, 7]])
  with pytest.raises(ValueError, match="no decoder_start_token_id.*config.decoder_start_token_id = "
                                       "config.pad_token_id"):
    model(ids, labels=np.array([[4, 5]]), params=lm.params)
  with pytest.raises(ValueError, match="decoder_start_token_id"):
    model.generate(ids, max_new_tokens=2, params=lm.params)
  model.config.decoder_start_token_id = 0
  assert model(ids, labels=np.array([[4, 5]]), params=lm.params).loss.shape == ()


def test_input_errors(lm):
  ids = np.array([[5, 6, 7]])
  with pytest.raises(ValueError, match="needs decoder_input_ids"):
    flaxhf.FlaxT5Model(lm.config, _do_init=False)(ids, params={})
  enc_model = flaxhf.FlaxT5EncoderModel(lm.config, _do_init=False)
  with pytest.raises(ValueError, match="encoder alone"):
    enc_model(ids, decoder_input_ids=ids, params={})
  with pytest.raises(ValueError, match="has no loss"):
    flaxhf.FlaxT5Model(lm.config, _do_init=False)(ids, decoder_input_ids=ids, labels=ids, params={})
  with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(1, 2\)"):
    lm(ids, decoder_input_ids=ids, decoder_attention_mask=np.ones((1, 2)))
  enc = lm.encode(ids)
  cache = lm.init_cache(1, 8, enc)
  with pytest.raises(ValueError, match=r"\[batch, max_length\]"):
    lm.decode(ids[:, :1], enc, past_key_values=cache, decoder_attention_mask=np.ones((1, 1)))
  with pytest.raises(ValueError, match="must be the cache from model.init_cache"):
    lm.decode(ids[:, :1], enc, past_key_values={"not": "a cache"})
  with pytest.raises(ValueError, match="needs encoder_outputs"):
    lm.decode(ids[:, :1], None)
  with pytest.raises(ValueError, match="batch_size=2"):
    lm.init_cache(2, 8, enc)


def test_loading_tied_and_untied_heads(tmp_path):
  """transformers' own saves: a v1.1 model it ties has no lm_head.weight; a tied T5 must not differ."""
  pt = torch_twin("t5-v1_1", "ForConditionalGeneration")
  pt.lm_head.weight = pt.shared.weight  # tied, as transformers 5 makes a fresh v1.1 model
  pt.save_pretrained(tmp_path / "tied")
  model = flaxhf.FlaxT5ForConditionalGeneration.from_pretrained(str(tmp_path / "tied"))
  flat = flatten(model.params)
  np.testing.assert_array_equal(flat["lm_head.weight"], flat["shared.weight"])
  inputs = seq2seq_inputs("ForConditionalGeneration")
  assert_close(model(**inputs), torch_outputs(pt, inputs))

  # A T5Model checkpoint (no head) into the LM: the tied head reads `shared`.
  base = torch_twin("t5", "Model")
  base.save_pretrained(tmp_path / "base")
  lm = flaxhf.FlaxT5ForConditionalGeneration.from_pretrained(str(tmp_path / "base"))
  hidden = torch_outputs(base, inputs).last_hidden_state.numpy() * 32 ** -0.5
  np.testing.assert_allclose(np.asarray(lm(**inputs).logits),
                             hidden @ base.shared.weight.detach().numpy().T, atol=1e-5)
  # An LM checkpoint into the base and the encoder model: the head (and decoder) are dropped.
  full = torch_twin("t5-v1_1", "ForConditionalGeneration")
  full.save_pretrained(tmp_path / "full")
  enc = flaxhf.FlaxT5EncoderModel.from_pretrained(str(tmp_path / "full"))
  want = torch_outputs(full, inputs).encoder_last_hidden_state.numpy()
  got = enc(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  assert "lm_head" not in flaxhf.FlaxT5Model.from_pretrained(str(tmp_path / "full")).params

  # Original T5 ties its head; a checkpoint whose lm_head differs needs tie_word_embeddings=False.
  pt = torch_twin("t5", "ForConditionalGeneration")
  pt.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
  pt.save_pretrained(tmp_path / "odd")
  with pytest.raises(ValueError, match="lm_head.weight differs from shared.weight.*"
                                       "tie_word_embeddings = False"):
    flaxhf.FlaxT5ForConditionalGeneration.from_pretrained(str(tmp_path / "odd"))
  untied = flaxhf.FlaxT5ForConditionalGeneration.from_pretrained(str(tmp_path / "odd"),
                                                                 tie_word_embeddings=False)
  assert_close(untied(**inputs), torch_outputs(pt, inputs))  # rescaled, then its own head


def test_auto_classes_and_v4_mappings():
  assert flaxhf.FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[transformers.T5Config] is \
      flaxhf.FlaxT5ForConditionalGeneration
  assert flaxhf.FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[transformers.MT5Config] is \
      flaxhf.FlaxMT5ForConditionalGeneration
  assert flaxhf.FLAX_MODEL_MAPPING[transformers.T5Config] is flaxhf.FlaxT5Model
  assert REGISTRY["text_encoding"]["t5"] is flaxhf.FlaxT5EncoderModel  # AutoModelForTextEncoding's
  assert isinstance(flaxhf.FlaxAutoModel.from_config(VARIANTS["mt5"](), _do_init=False),
                    flaxhf.FlaxMT5Model)
  assert issubclass(flaxhf.FlaxMT5ForConditionalGeneration, flaxhf.FlaxT5PreTrainedModel)
  with pytest.raises(TypeError, match="needs a T5Config, got MT5Config"):
    flaxhf.FlaxT5Model(VARIANTS["mt5"]())


def test_dropout_and_sharding_specs(lm):
  from flaxhf import sharding
  inputs = seq2seq_inputs("ForConditionalGeneration")
  eval1 = np.asarray(lm(**inputs).logits)
  drop1 = np.asarray(lm(**inputs, train=True, dropout_rng=jax.random.key(1)).logits)
  drop2 = np.asarray(lm(**inputs, train=True, dropout_rng=jax.random.key(2)).logits)
  assert np.abs(drop1 - eval1).max() > 1e-3 and np.abs(drop1 - drop2).max() > 1e-3
  with pytest.raises(ValueError, match="dropout_rng"):
    lm(**inputs, train=True)
  bf16 = flaxhf.FlaxT5ForConditionalGeneration(lm.config, dtype=jnp.bfloat16, _do_init=False)
  got = bf16(**inputs, params=lm.params).logits
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), eval1, atol=0.1 * np.abs(eval1).max())
  cache = bf16.init_cache(2, 4, bf16.encode(inputs["input_ids"], params=lm.params))
  assert {v.dtype for v in jax.tree_util.tree_leaves(cache) if v.ndim} == {jnp.dtype(jnp.bfloat16)}
  specs = flatten(sharding.param_partition_specs(lm, "fsdp_tp"))
  assert set(specs) == set(flatten(lm.params))
  P = jax.sharding.PartitionSpec
  layer = "encoder.block.0.layer."
  assert specs[layer + "0.SelfAttention.q.weight"] == P("tensor", "fsdp")
  assert specs[layer + "0.SelfAttention.o.weight"] == P("fsdp", "tensor")
  assert specs[layer + "0.SelfAttention.relative_attention_bias.weight"] == P(None, "tensor")
  assert specs[layer + "1.DenseReluDense.wi_0.weight"] == P("tensor", "fsdp")
  assert specs[layer + "1.DenseReluDense.wo.weight"] == P("fsdp", "tensor")
  assert specs[layer + "0.layer_norm.weight"] == P("fsdp")
  assert specs["shared.weight"] == specs["lm_head.weight"] == P("tensor", "fsdp")


# ---- generate == transformers' generate ------------------------------------------------------------
# Wider weights than the default init peak the next-token distribution, so no two candidates sit
# within float rounding of each other and token equality is a fair test.
GEN_FACTOR = {"t5": 4.0, "t5-v1_1": 4.0}


@functools.lru_cache
def gen_twins(variant):
  """(PyTorch LM, flaxhf twin) with the same wide random weights, dropout off."""
  import tempfile
  # PyTorch's generate sizes its cache by num_layers, so it fails for a deeper decoder: 2 + 2 here.
  pt = torch_twin(variant, "ForConditionalGeneration", initializer_factor=GEN_FACTOR[variant],
                  num_decoder_layers=2)
  path = tempfile.mkdtemp(prefix=f"t5gen-{variant}-")
  pt.save_pretrained(path)
  return pt, flaxhf.FlaxAutoModelForSeq2SeqLM.from_pretrained(path)


def gen_batch():
  """Three source rows right-padded to 9 tokens (9, 6 and 3 real), with a task prefix's ids first."""
  rng = np.random.RandomState(5)
  ids = rng.randint(2, VOCAB, (3, 9))
  ids[:, :2] = [11, 12]  # the same "translate ...:" prefix on every row; plain tokens to the model
  mask = np.ones_like(ids)
  mask[1, 6:], mask[2, 3:] = 0, 0
  return {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask}


def generate_both(variant, **kwargs):
  pt, fx = gen_twins(variant)
  batch = gen_batch()
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs)
  got = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
  want_seq = want.sequences if kwargs.get("return_dict_in_generate") else want
  np.testing.assert_array_equal(np.asarray(got.sequences), want_seq.numpy())
  return got, want


@functools.lru_cache
def eos_candidates(variant):
  """Tokens greedy decoding emits early on: as EOS ids they make rows finish at different steps."""
  pt, _ = gen_twins(variant)
  batch = gen_batch()
  with torch.no_grad():
    seq = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()}, do_sample=False,
                      max_new_tokens=8, eos_token_id=None).numpy()
  return [int(seq[0, 3]), int(seq[2, 5])]


@pytest.mark.parametrize("variant", list(GEN_FACTOR))
def test_greedy_equals_transformers(variant):
  eos = eos_candidates(variant)
  got, _ = generate_both(variant, do_sample=False, max_new_tokens=12, eos_token_id=eos)
  seq = np.asarray(got.sequences)
  assert (seq[:, 0] == 0).all()  # decoding starts from decoder_start_token_id (the pad id)
  ends = [int(np.argmax(np.isin(r[1:], eos))) if np.isin(r[1:], eos).any() else None for r in seq]
  assert len(set(ends)) == 3, ends  # rows end at different steps, one not at all
  if variant == "t5-v1_1":
    generate_both(variant, do_sample=False, max_new_tokens=12, no_repeat_ngram_size=2)


BEAM_CASES = {
    "early_true": dict(early_stopping=True),
    "early_false_length_penalty_short": dict(early_stopping=False, length_penalty=-1.0),
    "early_never_length_penalty_long_no_repeat": dict(early_stopping="never", length_penalty=2.0,
                                                      no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("case", sorted(BEAM_CASES))
def test_beam_search_equals_transformers(case):
  variant = "t5-v1_1"
  got, want = generate_both(variant, num_beams=4, num_return_sequences=2, max_new_tokens=10,
                            eos_token_id=eos_candidates(variant), return_dict_in_generate=True,
                            output_scores=True, **BEAM_CASES[case])
  np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got.beam_indices), want.beam_indices.numpy())


def test_beam_search_tied_t5_equals_transformers():
  generate_both("t5", num_beams=3, num_return_sequences=2, max_new_tokens=8,
                eos_token_id=eos_candidates("t5"), early_stopping=True)
