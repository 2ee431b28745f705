"""GPT-2's own checks: positions, causality, padding, packing, old checkpoints, mappings, sharding.

What every generative family shares (round trips for every head, init, loss, the KV cache, generate,
input errors) is in tests/test_generative.py, GPT-2 one row there.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import flaxhf
from flaxhf.models.base import REGISTRY, flatten
from flaxhf.models.gpt2 import positions_from_mask
from model_utils import DECODER_CONFIGS, VOCAB, make_inputs, torch_model, torch_outputs


def config(**kw):
  return DECODER_CONFIGS["gpt2"](**kw)


def gpt2_inputs(task, **kw):
  """make_inputs' right-padded batch with explicit 0..L-1 positions, as torch numbers every slot."""
  inputs = make_inputs("gpt2", task, **kw)
  b, l = inputs["input_ids"].shape
  inputs["position_ids"] = np.broadcast_to(np.arange(l), (b, l)).copy()
  return inputs


def test_default_positions_follow_the_mask():
  """Without position_ids: right-padded real tokens get 0..n-1, so they match torch's arange."""
  pt = torch_model("gpt2", "causal_lm")
  model = flaxhf.FlaxGPT2LMHeadModel(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = make_inputs("gpt2", "causal_lm")
  real = inputs["attention_mask"].astype(bool)
  got = np.asarray(model(**inputs).logits)[real]
  np.testing.assert_allclose(got, torch_outputs(pt, inputs).logits.numpy()[real], atol=1e-5)
  np.testing.assert_array_equal(positions_from_mask(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])),
                                [[1, 1, 0, 1, 2], [0, 1, 2, 1, 1]])


def test_left_padded_forward_counts_positions_like_transformers():
  """A plain forward without position_ids numbers slots 0..L-1 as transformers does, padding or not
  (generate derives them from the mask instead, on both sides)."""
  pt = torch_model("gpt2", "causal_lm")
  model = flaxhf.FlaxGPT2LMHeadModel(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = make_inputs("gpt2", "causal_lm")
  inputs["attention_mask"] = inputs["attention_mask"][:, ::-1].copy()  # row 1 left-padded
  inputs["input_ids"] = inputs["input_ids"][:, ::-1].copy()
  want = torch_outputs(pt, inputs, output_hidden_states=True)
  got = model(**inputs, output_hidden_states=True)
  # Every slot: a padded query that sees no key gets zero context, as torch's SDPA gives it.
  np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-5)
  for g, w in zip(got.hidden_states, want.hidden_states):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def lm():
  """A tiny random flaxhf GPT-2 LM (its own init), shared by the decoding tests."""
  return flaxhf.FlaxGPT2LMHeadModel(config(), seed=1)


def random_ids(shape, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB, size=shape)


@functools.lru_cache
def _jitted_logits(model):
  return jax.jit(lambda params, ids, mask, pos: model(
      ids, attention_mask=mask, position_ids=pos, params=params).logits)


def logits_of(model, ids, mask=None, positions=None):
  """The model's logits without a cache, compiled once per shape (faster than op-by-op on CPU)."""
  return np.asarray(_jitted_logits(model)(model.params, ids, mask, positions))


def test_decode_inside_while_loop(lm):
  """Teacher-forced decoding in lax.while_loop (no Python control flow on traced values)."""
  prompt, steps = 3, 5
  ids = random_ids((2, prompt + steps), seed=2)
  full = logits_of(lm, ids)
  mask = jnp.ones((2, prompt + steps), jnp.int32)

  @jax.jit
  def run(params, ids_BxN):
    out = lm(ids_BxN[:, :prompt], attention_mask=mask, position_ids=jnp.broadcast_to(
        jnp.arange(prompt), (2, prompt)), params=params, past_key_values=lm.init_cache(2, prompt + steps))

    def body(carry):
      t, cache, logits_BxSxV = carry
      tok = jax.lax.dynamic_slice_in_dim(ids_BxN, t, 1, axis=1)
      o = lm(tok, attention_mask=mask, position_ids=jnp.full((2, 1), t), params=params,
             past_key_values=cache)
      return t + 1, o.past_key_values, logits_BxSxV.at[:, t - prompt].set(o.logits[:, 0])

    init = (jnp.int32(prompt), out.past_key_values, jnp.zeros((2, steps, VOCAB), jnp.float32))
    return jax.lax.while_loop(lambda c: c[0] < prompt + steps, body, init)[2]

  np.testing.assert_allclose(np.asarray(run(lm.params, ids)), full[:, prompt:], atol=1e-5, rtol=1e-5)


def test_causality(lm):
  ids = random_ids((1, 10), seed=3)
  base = logits_of(lm, ids)
  for t in (0, 4, 9):
    changed = ids.copy()
    changed[0, t] = 3 + (ids[0, t] - 3 + 1) % (VOCAB - 3)
    logits = logits_of(lm, changed)
    np.testing.assert_array_equal(logits[:, :t], base[:, :t])
    assert np.abs(logits[:, t:] - base[:, t:]).max(axis=-1).min() > 1e-4  # later positions see it


def test_left_padded_batch_equals_rows_alone(lm):
  lengths, width = (7, 4, 2), 7
  rows = [random_ids((1, n), seed=10 + n) for n in lengths]
  ids = np.zeros((3, width), np.int64)
  mask = np.zeros((3, width), np.int64)
  for i, r in enumerate(rows):
    ids[i, width - r.shape[1]:], mask[i, width - r.shape[1]:] = r[0], 1
  batch = logits_of(lm, ids, mask, np.asarray(positions_from_mask(jnp.asarray(mask))))
  for i, r in enumerate(rows):
    np.testing.assert_allclose(batch[i, width - r.shape[1]:], logits_of(lm, r)[0], atol=1e-5)


def test_packed_documents_with_3d_mask(lm):
  """Two documents in one row: a per-document [B, L, L] mask + restarted positions == each alone."""
  a, b = random_ids((1, 5), seed=20), random_ids((1, 3), seed=21)
  ids = np.concatenate([a, b], 1)
  doc = np.array([0] * 5 + [1] * 3)
  mask_LxL = (doc[:, None] == doc[None, :]).astype(np.int32)[None]  # the causal part is the model's
  positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2]])
  want = np.concatenate([logits_of(lm, a), logits_of(lm, b)], 1)
  np.testing.assert_allclose(logits_of(lm, ids, mask_LxL, positions), want, atol=1e-5)
  # Without position_ids they restart per document too: counted from the mask.
  np.testing.assert_allclose(logits_of(lm, ids, mask_LxL), want, atol=1e-5)
  unpacked = logits_of(lm, ids)
  assert np.abs(unpacked[0, 5:] - want[0, 5:]).max() > 1e-3  # the mask did separate them


def test_sequence_classification_reads_last_non_pad_token(tmp_path):
  pt = torch_model("gpt2", "sequence_classification")
  pt.save_pretrained(tmp_path)
  model = flaxhf.FlaxAutoModelForSequenceClassification.from_pretrained(str(tmp_path))
  ids = random_ids((3, 8), seed=4)
  mask = np.ones_like(ids)
  for row, n in ((1, 5), (2, 1)):  # right-padded rows of 5 and 1 real tokens
    ids[row, n:], mask[row, n:] = 0, 0
  inputs = {"input_ids": ids, "attention_mask": mask}
  want = torch_outputs(pt, inputs).logits.numpy()
  np.testing.assert_allclose(np.asarray(model(**inputs).logits), want, atol=1e-5)
  # The row's own last token, not the batch's last column: dropping the padding changes nothing.
  alone = model(ids[1:2, :5]).logits
  np.testing.assert_allclose(np.asarray(alone)[0], want[1], atol=1e-5)

  # pad_token_id None: the last column, for a batch of one only (transformers' rule and message).
  pt.config.pad_token_id = None
  model.config.pad_token_id = None
  np.testing.assert_allclose(np.asarray(model(ids[:1]).logits), torch_outputs(pt, {
      "input_ids": ids[:1]}).logits.numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"):
    torch_outputs(pt, {"input_ids": ids})
  with pytest.raises(ValueError, match="Cannot handle batch sizes > 1 if no padding token is defined"
                     r".*pad_token_id"):
    model(ids)


def test_input_errors(lm):
  """GPT-2's own limit (the shared input errors: tests/test_generative.py)."""
  with pytest.raises(ValueError, match="exceeds GPT-2's n_positions=64"):
    lm.init_cache(1, 65)


def test_wrong_config_or_checkpoint(tmp_path):
  bert = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=4, intermediate_size=64)
  with pytest.raises(TypeError, match="FlaxGPT2LMHeadModel needs a GPT2Config, got BertConfig"):
    flaxhf.FlaxGPT2LMHeadModel(bert)
  with pytest.raises(ValueError, match="no ForCausalLM model for model_type 'bert'.*'gpt2'"):
    flaxhf.FlaxAutoModelForCausalLM.from_config(bert)
  transformers.BertModel(bert).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="holds a 'bert' model, not 'gpt2'"):
    flaxhf.FlaxGPT2Model.from_pretrained(str(tmp_path))


def test_old_checkpoint_buffers_are_ignored(tmp_path):
  """GPT-2 checkpoints from before transformers 4.3x carry attn.bias / attn.masked_bias buffers."""
  from safetensors.numpy import save_file
  pt = torch_model("gpt2", None)
  state = {k: v.numpy() for k, v in pt.state_dict().items()}
  for i in range(pt.config.n_layer):
    state[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
    state[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  pt.config.save_pretrained(tmp_path)
  model = flaxhf.FlaxAutoModelForCausalLM.from_pretrained(str(tmp_path))  # base checkpoint, tied head
  inputs = gpt2_inputs("causal_lm")
  want = torch_outputs(pt, inputs).last_hidden_state.numpy() @ state["wte.weight"].T
  np.testing.assert_allclose(np.asarray(model(**inputs).logits), want, atol=1e-5)


def test_v4_auto_mappings():
  m = flaxhf.FLAX_MODEL_FOR_CAUSAL_LM_MAPPING
  assert m[transformers.GPT2Config] is flaxhf.FlaxGPT2LMHeadModel
  assert transformers.GPT2Config in m and transformers.BertConfig not in m
  assert (transformers.GPT2Config, flaxhf.FlaxGPT2LMHeadModel) in m.items()
  assert flaxhf.FlaxGPT2LMHeadModel in m.values() and len(m) == len(REGISTRY["causal_lm"])
  # What v4's run_mlm_flax.py does with its mapping.
  model_types = tuple(conf.model_type for conf in list(flaxhf.FLAX_MODEL_FOR_MASKED_LM_MAPPING.keys()))
  assert {"albert", "bert", "distilbert", "electra", "roberta"} <= set(model_types)
  assert "gpt2" not in model_types and len(model_types) == len(REGISTRY["masked_lm"])
  assert flaxhf.FLAX_MODEL_MAPPING[transformers.GPT2Config] is flaxhf.FlaxGPT2Model
  assert flaxhf.FLAX_MODEL_MAPPING[transformers.BertConfig] is flaxhf.FlaxBertModel
  assert flaxhf.FLAX_MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[transformers.GPT2Config] is \
      flaxhf.FlaxGPT2ForSequenceClassification
  assert flaxhf.FLAX_MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING[transformers.GPT2Config] is \
      flaxhf.FlaxGPT2ForTokenClassification
  assert flaxhf.FLAX_MODEL_FOR_QUESTION_ANSWERING_MAPPING[transformers.GPT2Config] is \
      flaxhf.FlaxGPT2ForQuestionAnswering
  assert transformers.GPT2Config not in flaxhf.FLAX_MODEL_FOR_MULTIPLE_CHOICE_MAPPING
  assert transformers.RobertaConfig in flaxhf.FLAX_MODEL_FOR_MULTIPLE_CHOICE_MAPPING
  with pytest.raises(KeyError, match="no causal_lm model for .*BertConfig"):
    m[transformers.BertConfig]
  # Live: a family that registers later shows up without rebuilding the mapping.
  from flaxhf.models.base import model_class
  from flaxhf.models.gpt2 import FlaxGPT2PreTrainedModel, GPT2Module

  class ToyConfig(transformers.GPT2Config):
    model_type = "toy_seq2seq"

  seq2seq = flaxhf.FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
  before = len(seq2seq)
  base = type("FlaxToyPreTrainedModel", (FlaxGPT2PreTrainedModel,), {"config_class": ToyConfig})
  try:
    cls = model_class("FlaxToyForConditionalGeneration", base, GPT2Module, "seq2seq_lm")
    assert seq2seq[ToyConfig] is cls and len(seq2seq) == before + 1 and ToyConfig in seq2seq
  finally:
    REGISTRY["seq2seq_lm"].pop("toy_seq2seq")
    if not REGISTRY["seq2seq_lm"]:
      del REGISTRY["seq2seq_lm"]


def test_from_config_takes_v4_keywords():
  c = config()
  model = flaxhf.FlaxAutoModelForCausalLM.from_config(c, seed=7, dtype=jnp.bfloat16, input_shape=(1, 4))
  again = flaxhf.FlaxAutoModelForCausalLM.from_config(c, seed=7, trust_remote_code=False)
  for k, v in flatten(model.params).items():
    assert v.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(v), np.asarray(flatten(again.params)[k]), err_msg=k)
  assert model.dtype == jnp.bfloat16 and model.input_shape == (1, 4)
  lazy = flaxhf.FlaxAutoModelForSequenceClassification.from_config(c, _do_init=False)
  assert isinstance(lazy, flaxhf.FlaxGPT2ForSequenceClassification)
  with pytest.raises(ValueError, match="no params"):
    lazy.params
  with pytest.raises(ValueError, match="trust_remote_code=True is not supported"):
    flaxhf.FlaxAutoModel.from_config(c, trust_remote_code=True)


def test_dropout_and_bf16(lm):
  c = config(resid_pdrop=0.3, embd_pdrop=0.3, attn_pdrop=0.3)
  model = flaxhf.FlaxGPT2LMHeadModel(c, seed=1)
  ids = random_ids((2, 6))
  eval1 = logits_of(model, ids)
  np.testing.assert_array_equal(eval1, logits_of(lm, ids))  # dropout off outside train
  train = jax.jit(lambda rng: model(ids, train=True, dropout_rng=rng).logits)
  drop1, drop2 = np.asarray(train(jax.random.key(1))), np.asarray(train(jax.random.key(2)))
  assert np.abs(drop1 - eval1).max() > 1e-3 and np.abs(drop1 - drop2).max() > 1e-3
  bf16 = flaxhf.FlaxGPT2LMHeadModel(c, dtype=jnp.bfloat16, _do_init=False)
  bf16.params = model.params
  logits = logits_of(bf16, ids)
  assert logits.dtype == np.float32
  np.testing.assert_allclose(logits, eval1, atol=3e-2)
  assert jax.tree_util.tree_leaves(bf16.init_cache(2, 8))[1].dtype == jnp.bfloat16


def test_sharding_specs_and_sharded_forward():
  from jax.sharding import NamedSharding, PartitionSpec as P
  import flax.linen as nn
  from flaxhf import sharding
  model = flaxhf.FlaxGPT2LMHeadModel(config(vocab_size=96, tie_word_embeddings=False), seed=0)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  specs = flatten(sharding.param_partition_specs(model, "fsdp_tp", mesh))
  assert set(specs) == set(flatten(model.params))
  logical = flatten(model.logical_axes())
  assert {a for spec in logical.values() for a in spec if a is not None} <= set(sharding.LOGICAL_AXES)
  assert all(len(spec) == len(v.shape) for spec, v in zip(logical.values(), flatten(model.params).values()))
  layer = "transformer.h.0."
  assert specs[layer + "attn.c_attn.weight"] == P("fsdp", "tensor")
  assert specs[layer + "attn.c_attn.bias"] == P("tensor")
  assert specs[layer + "attn.c_proj.weight"] == P("tensor", "fsdp")
  assert specs[layer + "mlp.c_fc.weight"] == P("fsdp", "tensor")
  assert specs[layer + "mlp.c_proj.weight"] == P("tensor", "fsdp")
  assert specs[layer + "ln_1.weight"] == P("fsdp")
  assert specs["transformer.wte.weight"] == P("tensor", "fsdp")
  assert specs["transformer.wpe.weight"] == P(None, "fsdp")
  assert specs["lm_head.weight"] == P("tensor", "fsdp")
  ids = random_ids((4, 6))
  want = np.asarray(model(ids).logits)
  shardings = sharding.param_shardings(model, mesh, "fsdp_tp")
  params = jax.device_put(model.params, shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.get_rules("fsdp_tp")):
    got = jax.jit(lambda p, x: model(x, params=p).logits)(
        params, jax.device_put(ids, NamedSharding(mesh, P(("data", "fsdp")))))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
