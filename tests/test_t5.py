"""T5, T5 v1.1 and mT5: what only this family does (relative position buckets, one shared table,
tied and untied heads, the base and encoder-only models). The checks every generative family shares
(round trips both ways, random-init export, labels, the cache, generate, shift_tokens_right, input
errors) run on its rows of tests/test_generative.py."""

import copy

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


def flax_class(variant, suffix):
  return getattr(flaxhf, f"Flax{PREFIX[variant]}{suffix}")


def test_one_shared_table_and_relative_attention_bias_only_in_block_0():
  """Parameter paths of every variant x class: one `shared` table (no embed_tokens copies), the
  relative bias in block 0 of each stack only (the round trips: tests/test_generative.py)."""
  for variant, suffix in CASES:
    keys = set(flatten(flax_class(variant, suffix)(VARIANTS[variant](), _do_init=False).param_shapes()))
    assert not any("embed_tokens" in k for k in keys), (variant, suffix)
    stacks = ("encoder",) if suffix == "EncoderModel" else ("decoder", "encoder")
    assert sorted(k for k in keys if "relative_attention_bias" in k) == [
        f"{s}.block.0.layer.0.SelfAttention.relative_attention_bias.weight" for s in stacks]
    if (variant, suffix) == ("t5-v1_1", "ForConditionalGeneration"):
      assert len([k for k in keys if k.startswith("decoder.block.2.")]) == 14


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
  """T5's own (the errors every encoder-decoder shares: tests/test_generative.py)."""
  ids = np.array([[5, 6, 7]])
  with pytest.raises(ValueError, match="needs decoder_input_ids"):
    flaxhf.FlaxT5Model(lm.config, _do_init=False)(ids, params={})
  enc_model = flaxhf.FlaxT5EncoderModel(lm.config, _do_init=False)
  with pytest.raises(ValueError, match="encoder alone"):
    enc_model(ids, decoder_input_ids=ids, params={})
  with pytest.raises(ValueError, match="has no loss"):
    flaxhf.FlaxT5Model(lm.config, _do_init=False)(ids, decoder_input_ids=ids, labels=ids, params={})
  enc = lm.encode(ids)
  cache = lm.init_cache(1, 8, enc)
  with pytest.raises(ValueError, match=r"\[batch, max_length\]"):
    lm.decode(ids[:, :1], enc, past_key_values=cache, decoder_attention_mask=np.ones((1, 1)))
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
