"""GPT-2: parity with transformers both ways for every head, the KV cache, causality, padding, packing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import flaxhf
from flaxhf.models.base import REGISTRY, flatten
from model_utils import (DECODER_CONFIGS, DECODER_HEADS, HEADS, VOCAB, main_outputs, make_inputs,
                         torch_model, torch_outputs)

TASKS = [None, "causal_lm", "sequence_classification", "token_classification", "question_answering"]
AUTO = {None: flaxhf.FlaxAutoModel, "causal_lm": flaxhf.FlaxAutoModelForCausalLM,
        "sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
        "token_classification": flaxhf.FlaxAutoModelForTokenClassification,
        "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering}
# (task, config overrides): every head, plus the untied LM head and the config switches of attention.
CASES = [(t, {}) for t in TASKS] + [
    ("causal_lm", dict(tie_word_embeddings=False)),
    ("causal_lm", dict(n_inner=48, activation_function="relu", layer_norm_epsilon=1e-3,
                       scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)),
    (None, dict(scale_attn_weights=False)),
]
IDS = [f"{t or 'base'}{'-' + '-'.join(kw) if kw else ''}" for t, kw in CASES]


def config(**kw):
  return DECODER_CONFIGS["gpt2"](**kw)


def torch_class(task):
  return getattr(transformers, {**HEADS, **DECODER_HEADS}[task])


def gpt2_inputs(task, **kw):
  """make_inputs' right-padded batch with explicit 0..L-1 positions, as torch numbers every slot."""
  inputs = make_inputs("gpt2", task, **kw)
  b, l = inputs["input_ids"].shape
  inputs["position_ids"] = np.broadcast_to(np.arange(l), (b, l)).copy()
  return inputs


def assert_close(got, want, task, atol=1e-5):
  got, want = main_outputs(got, task), main_outputs(want, task)
  assert set(got) == set(want) and got
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=atol, rtol=1e-5, err_msg=name)


def export_and_check(model, inputs, task, tmp_path, want=None):
  """save_pretrained -> transformers loads with no key left over, to the same outputs."""
  model.save_pretrained(tmp_path / "flax")
  back, info = torch_class(task).from_pretrained(tmp_path / "flax", output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  got = model(**inputs)
  assert_close(got, torch_outputs(back.eval(), inputs), task)
  if want is not None:
    assert type(back) is type(want)
  return back


@pytest.mark.parametrize("task,overrides", CASES, ids=IDS)
def test_roundtrip_parity(task, overrides, tmp_path):
  """PyTorch -> flaxhf (outputs, hidden states, param count) -> save -> PyTorch, no keys left over."""
  pt = torch_model("gpt2", task, **overrides)
  pt.save_pretrained(tmp_path / "pt")
  inputs = gpt2_inputs(task)
  want = torch_outputs(pt, inputs, output_hidden_states=True)

  model = AUTO[task].from_pretrained(str(tmp_path / "pt"))
  assert type(model) is REGISTRY[task]["gpt2"]
  got = model(**inputs, output_hidden_states=True)
  assert_close(got, want, task)
  assert len(got.hidden_states) == len(want.hidden_states) == pt.config.n_layer + 1
  for g, w in zip(got.hidden_states, want.hidden_states):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=1e-5)
  again = model(**{k: jnp.asarray(v) for k, v in inputs.items()}, params=model.params,
                return_dict=False)  # v4 convention: explicit params, a tuple
  np.testing.assert_array_equal(np.asarray(again[0]), np.asarray(got[0]))
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())
  keys = set(flatten(model.params))
  assert ("lm_head.weight" in keys) == (task == "causal_lm" and not pt.config.tie_word_embeddings)
  back = export_and_check(model, inputs, task, tmp_path, want=pt)
  if task == "causal_lm" and pt.config.tie_word_embeddings:
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("task,tied", [("causal_lm", True), ("causal_lm", False),
                                       ("sequence_classification", True)])
def test_random_init_exports_to_torch(task, tied, tmp_path):
  """flaxhf's own init (GPT-2's scaled c_proj) -> save -> transformers: same outputs."""
  c = config(tie_word_embeddings=tied, initializer_range=0.05, num_labels=3)
  model = AUTO[task].from_config(c, seed=3)
  flat = flatten(model.params)
  # transformers' _init_weights: normal(initializer_range), c_proj over sqrt(2 * n_layer), zero biases.
  np.testing.assert_allclose(np.std(flat["transformer.h.0.attn.c_attn.weight"]), 0.05, rtol=0.1)
  for k in ("transformer.h.1.attn.c_proj.weight", "transformer.h.0.mlp.c_proj.weight"):
    np.testing.assert_allclose(np.std(flat[k]), 0.05 / 2, rtol=0.1)
  assert not np.any(flat["transformer.h.0.mlp.c_fc.bias"])
  np.testing.assert_array_equal(flat["transformer.ln_f.weight"], 1.0)
  export_and_check(model, gpt2_inputs(task), task, tmp_path)


def test_default_positions_follow_the_mask():
  """Without position_ids: right-padded real tokens get 0..n-1, so they match torch's arange."""
  pt = torch_model("gpt2", "causal_lm")
  model = flaxhf.FlaxGPT2LMHeadModel(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = make_inputs("gpt2", "causal_lm")
  real = inputs["attention_mask"].astype(bool)
  got = np.asarray(model(**inputs).logits)[real]
  np.testing.assert_allclose(got, torch_outputs(pt, inputs).logits.numpy()[real], atol=1e-5)
  from flaxhf.models.gpt2 import positions_from_mask
  np.testing.assert_array_equal(positions_from_mask(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])),
                                [[1, 1, 0, 1, 2], [0, 1, 2, 1, 1]])


def test_attentions_match_torch_eager():
  pt = torch_model("gpt2", None, attn_implementation="eager")
  model = flaxhf.FlaxGPT2Model(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  inputs = gpt2_inputs(None)
  want = torch_outputs(pt, inputs, output_attentions=True).attentions
  got = model(**inputs, output_attentions=True).attentions
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5)


def test_causal_lm_loss_matches_torch():
  pt = torch_model("gpt2", "causal_lm")
  inputs = gpt2_inputs("causal_lm")
  labels = np.where(inputs["attention_mask"] == 1, inputs["input_ids"], -100)
  labels[0, 4] = -100
  want = torch_outputs(pt, inputs, labels=torch.tensor(labels)).loss
  model = flaxhf.FlaxGPT2LMHeadModel(pt.config)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  got = model(**inputs, labels=labels)
  np.testing.assert_allclose(float(got.loss), float(want), rtol=1e-5)
  assert float(got.loss) > 1.0  # an untrained model over 99 tokens: about log(99)


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


def test_incremental_decoding_matches_full_forward(lm):
  """Prefill, 4 single tokens, then a chunk of 3, under jit, on a left-padded batch == one full pass."""
  prompt, total, max_length = 5, 12, 16
  ids = random_ids((2, total))
  mask = np.ones((2, total), np.int32)
  mask[1, :2] = 0  # row 1 is left-padded
  ids[1, :2] = 0
  full = logits_of(lm, ids, mask)
  positions = np.asarray(np.cumsum(mask, -1) - 1)
  # The generation loop's mask: the prompt's padding, then every slot from the prompt's end on.
  cache_mask = np.ones((2, max_length), np.int32)
  cache_mask[:, :total] = mask

  @jax.jit
  def step(params, cache, ids_BxT, pos_BxT):
    out = lm(ids_BxT, attention_mask=cache_mask, position_ids=pos_BxT, params=params,
             past_key_values=cache)
    return out.logits, out.past_key_values

  cache = lm.init_cache(2, max_length)
  chunks = [(0, prompt)] + [(t, t + 1) for t in range(prompt, prompt + 4)] + [(total - 3, total)]
  got = []
  for a, b in chunks:
    logits, cache = step(lm.params, cache, ids[:, a:b], positions[:, a:b])
    assert logits.shape == (2, b - a, VOCAB) and logits.dtype == jnp.float32
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  index = flatten(cache)["transformer.h.0.attn.cache_index"]
  assert index.shape == () and int(index) == total
  real = mask.astype(bool)  # padded queries see no key: their outputs are arbitrary
  np.testing.assert_allclose(got[real], full[real], atol=1e-5, rtol=1e-5)

  # Beam search reorders the cache along axis 0 of every array that has one; decoding follows.
  swapped = jax.tree_util.tree_map(lambda x: x[::-1] if x.ndim else x, cache)
  extra = random_ids((2, 1), seed=1)
  logits = lm(extra[::-1], attention_mask=cache_mask[::-1], position_ids=positions[::-1, -1:] + 1,
              past_key_values=swapped).logits
  want = logits_of(lm, np.concatenate([ids, extra], 1),
                   np.concatenate([mask, np.ones((2, 1), np.int32)], 1))[:, -1]
  np.testing.assert_allclose(np.asarray(logits)[::-1, 0], want, atol=1e-5, rtol=1e-5)


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
  batch = logits_of(lm, ids, mask)
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
  ids = random_ids((2, 4))
  cache = lm.init_cache(2, 8)
  with pytest.raises(ValueError, match="position_ids are required with past_key_values"):
    lm(ids, attention_mask=np.ones((2, 8)), past_key_values=cache)
  with pytest.raises(ValueError, match=r"attention_mask must be \[batch, max_length\] = \(2, 8\)"):
    lm(ids, attention_mask=np.ones((2, 4)), position_ids=np.zeros((2, 4)), past_key_values=cache)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\) but input_ids has \(2, 4\)"):
    lm(ids, attention_mask=np.ones((2, 5)))
  with pytest.raises(ValueError, match=r"position_ids has shape \(2, 3\)"):
    lm(ids, position_ids=np.zeros((2, 3)))
  with pytest.raises(ValueError, match="must be the cache from model.init_cache"):
    lm(ids, position_ids=np.zeros((2, 4)), past_key_values={"not": "a cache"})
  with pytest.raises(ValueError, match="exceeds GPT-2's n_positions=64"):
    lm.init_cache(1, 65)
  with pytest.raises(ValueError, match="takes no token_type_ids"):
    lm(ids, token_type_ids=np.zeros_like(ids))
  clf = flaxhf.FlaxGPT2ForSequenceClassification(config(), _do_init=False)
  with pytest.raises(ValueError, match="past_key_values is for FlaxGPT2Model and FlaxGPT2LMHeadModel"):
    clf(ids, position_ids=np.zeros((2, 4)), past_key_values=cache, params={})


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
