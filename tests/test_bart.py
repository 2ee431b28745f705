"""BART, mBART and Marian: parity with transformers both ways for every head and embedding layout,
labels, shift_tokens_right, the decoder cache, and generate token-for-token against PyTorch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import flaxhf
from flaxhf.models import bart
from flaxhf.models.base import REGISTRY, flatten, unflatten

VOCAB = 99
COMMON = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
              decoder_ffn_dim=48, max_position_embeddings=64)
# Marian's pad (its decoder start) is the last id of the vocabulary, as in the opus-mt checkpoints.
ARCHS = {
    "bart": lambda **kw: transformers.BartConfig(**{**COMMON, **kw}),
    "mbart": lambda **kw: transformers.MBartConfig(**{**COMMON, "scale_embedding": True, **kw}),
    "marian": lambda **kw: transformers.MarianConfig(**{**COMMON, **dict(
        pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1, eos_token_id=0,
        forced_eos_token_id=0, scale_embedding=True, activation_function="swish"), **kw}),
}
# Embedding layouts: (architecture, config overrides).
VARIANTS = {
    "bart": ("bart", {}), "bart-untied": ("bart", dict(tie_word_embeddings=False)),
    "mbart": ("mbart", {}), "mbart-untied": ("mbart", dict(tie_word_embeddings=False)),
    "marian": ("marian", {}), "marian-untied": ("marian", dict(tie_word_embeddings=False)),
    # Own decoder vocabulary: the LM head ties to decoder.embed_tokens (or not), no `shared`.
    "marian-unshared": ("marian", dict(share_encoder_decoder_embeddings=False, decoder_vocab_size=80,
                                       pad_token_id=79, decoder_start_token_id=79)),
    "marian-unshared-untied": ("marian", dict(share_encoder_decoder_embeddings=False,
                                              decoder_vocab_size=80, pad_token_id=79,
                                              decoder_start_token_id=79, tie_word_embeddings=False)),
}
TORCH = {None: "AutoModel", "seq2seq_lm": "AutoModelForSeq2SeqLM",
         "sequence_classification": "AutoModelForSequenceClassification",
         "question_answering": "AutoModelForQuestionAnswering"}
AUTO = {None: flaxhf.FlaxAutoModel, "seq2seq_lm": flaxhf.FlaxAutoModelForSeq2SeqLM,
        "sequence_classification": flaxhf.FlaxAutoModelForSequenceClassification,
        "question_answering": flaxhf.FlaxAutoModelForQuestionAnswering}
HEADS = [None, "seq2seq_lm", "sequence_classification", "question_answering"]
CASES = ([("bart", t) for t in HEADS] + [("mbart", t) for t in HEADS]
         + [("bart-untied", None), ("bart-untied", "seq2seq_lm"), ("mbart-untied", "seq2seq_lm"),
            ("marian", None), ("marian", "seq2seq_lm"), ("marian-untied", "seq2seq_lm"),
            ("marian-unshared", None), ("marian-unshared", "seq2seq_lm"),
            ("marian-unshared-untied", "seq2seq_lm")])


def config(variant, **kw):
  arch, overrides = VARIANTS[variant]
  return ARCHS[arch](**{**overrides, **kw})


def torch_model(variant, task, seed=0, **kw):
  torch.manual_seed(seed)
  c = config(variant, num_labels=3, attn_implementation="eager", **kw)  # eager: it returns attentions
  return getattr(transformers, TORCH[task]).from_config(c).eval()


def make_inputs(c, task, batch=2, length=9, target=6, seed=0):
  """Right-padded encoder inputs ending in EOS; explicit right-padded decoder inputs for the
  base and LM models (the classifiers derive theirs from input_ids, as transformers does)."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 79, size=(batch, length))
  mask = np.ones_like(ids)
  mask[-1, length - 3:] = 0
  ids[np.arange(batch), mask.sum(1) - 1] = c.eos_token_id
  ids = np.where(mask == 1, ids, c.pad_token_id)
  inputs = {"input_ids": ids, "attention_mask": mask}
  if task in (None, "seq2seq_lm"):
    dec_mask = np.ones((batch, target), np.int64)
    dec_mask[-1, target - 2:] = 0
    inputs["decoder_input_ids"] = np.where(dec_mask == 1, rng.randint(3, 79, size=(batch, target)),
                                           c.pad_token_id)
    inputs["decoder_attention_mask"] = dec_mask
  return inputs


def twin(auto_or_class, pt):
  """The flaxhf model with `pt`'s weights (built without an init of its own: no compile)."""
  model = auto_or_class.from_config(pt.config, _do_init=False) if hasattr(
      auto_or_class, "model_class_for") else auto_or_class(pt.config, _do_init=False)
  model.params = model._params_from_state_dict({k: v.numpy() for k, v in pt.state_dict().items()})
  return model


def torch_outputs(model, inputs, **kwargs):
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in inputs.items()}, **kwargs)


MAIN = {None: ["last_hidden_state", "encoder_last_hidden_state"],
        "question_answering": ["start_logits", "end_logits"]}
SEQUENCES = ["encoder_hidden_states", "decoder_hidden_states", "encoder_attentions",
             "decoder_attentions", "cross_attentions"]


def assert_close(got, want, task, names=()):
  for name in MAIN.get(task, ["logits"]) + list(names):
    g, w = getattr(got, name), getattr(want, name)
    if isinstance(w, tuple):
      assert len(g) == len(w), name
      for i, (gi, wi) in enumerate(zip(g, w)):
        np.testing.assert_allclose(np.asarray(gi), wi.numpy(), atol=1e-5, rtol=1e-5,
                                   err_msg=f"{name}[{i}]")
    else:
      np.testing.assert_allclose(np.asarray(g), w.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)


def saved_keys(path):
  return set(load_file(str(path / "model.safetensors")))


@pytest.mark.parametrize("variant,task", CASES, ids=[f"{v}-{t or 'base'}" for v, t in CASES])
def test_roundtrip_parity(variant, task, tmp_path):
  """PyTorch -> flaxhf (outputs, hidden states, attentions, parameter count) -> save -> PyTorch
  loads it with no key missing or left over, and transformers would have saved the same keys."""
  pt = torch_model(variant, task)
  pt.save_pretrained(tmp_path / "pt")
  inputs = make_inputs(pt.config, task)
  want = torch_outputs(pt, inputs, output_hidden_states=True, output_attentions=True)

  model = AUTO[task].from_pretrained(str(tmp_path / "pt"))
  assert type(model) is REGISTRY[task][pt.config.model_type]
  assert type(model).__name__ == "Flax" + type(pt).__name__
  got = model(**inputs, output_hidden_states=True, output_attentions=True)
  assert_close(got, want, task, SEQUENCES)
  assert len(got.decoder_hidden_states) == pt.config.decoder_layers + 1
  assert model.num_parameters() == sum(p.numel() for p in pt.parameters())

  # Every flaxhf key is a PyTorch key; the PyTorch keys it lacks are tied copies of ones it has.
  state = pt.state_dict()
  keys = set(flatten(model.params))
  assert keys <= set(state)
  ptrs = {state[k].data_ptr() for k in keys}
  assert all(state[k].data_ptr() in ptrs for k in set(state) - keys), set(state) - keys

  model.save_pretrained(tmp_path / "flax")
  assert saved_keys(tmp_path / "flax") == saved_keys(tmp_path / "pt")
  back, info = getattr(transformers, TORCH[task]).from_pretrained(tmp_path / "flax",
                                                                  output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  assert type(back) is type(pt)
  assert_close(got, torch_outputs(back.eval(), inputs, output_hidden_states=True), task,
               SEQUENCES[:2])


@pytest.mark.parametrize("variant,cls", [("bart", "FlaxBartForConditionalGeneration"),
                                         ("marian", "FlaxMarianMTModel"),
                                         ("marian", "FlaxMarianModel")])
def test_random_init_exports_to_torch(variant, cls, tmp_path):
  """flaxhf's own init (normal(init_std), zero biases and final_logits_bias, Marian's fixed
  sinusoidal table) -> save -> transformers: the same outputs, no key missing."""
  c = config(variant, init_std=0.05)
  model = getattr(flaxhf, cls)(c, seed=3)
  flat = flatten(model.params)
  prefix = "" if cls == "FlaxMarianModel" else "model."
  np.testing.assert_allclose(np.std(flat[prefix + "encoder.layers.0.fc1.weight"]), 0.05, rtol=0.1)
  assert not np.any(flat[prefix + "decoder.layers.1.encoder_attn.q_proj.bias"])
  if "final_logits_bias" in flat:
    assert flat["final_logits_bias"].shape == (1, VOCAB) and not np.any(flat["final_logits_bias"])
  model.save_pretrained(tmp_path)
  task = "seq2seq_lm" if "Generation" in cls or "MT" in cls else None
  back, info = getattr(transformers, TORCH[task]).from_pretrained(tmp_path, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  inputs = make_inputs(c, task)
  assert_close(model(**inputs), torch_outputs(back.eval(), inputs), task)
  if variant == "marian":  # transformers rebuilds the table; flaxhf's equals it
    table = back.get_encoder().embed_positions.weight.detach().numpy()
    np.testing.assert_array_equal(flat[prefix + "encoder.embed_positions.weight"], table)
    # MarianMTModel leaves the tables out of its checkpoint (_keys_to_ignore_on_save), MarianModel not.
    assert any("embed_positions" in k for k in saved_keys(tmp_path)) == (cls == "FlaxMarianModel")


@pytest.mark.parametrize("variant", ["bart", "mbart", "marian"])
def test_labels_loss_matches_torch(variant):
  """labels= without decoder_input_ids: shifted right as transformers does (mBART wraps its
  language code round); the loss ignores -100; final_logits_bias (and Marian's table) get no gradient."""
  pt = torch_model(variant, "seq2seq_lm")
  inputs = make_inputs(pt.config, None)
  labels = inputs.pop("decoder_input_ids")
  labels[:, -1] = pt.config.eos_token_id
  labels[1, -2:] = -100
  inputs.pop("decoder_attention_mask")
  want = torch_outputs(pt, inputs, labels=torch.tensor(labels))
  model = twin(flaxhf.FlaxAutoModelForSeq2SeqLM, pt)
  got = model(**inputs, labels=labels)
  np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-5, rtol=1e-5)
  assert float(got.loss) > 1.0

  if variant == "marian":  # the buffer and the frozen tables get no gradient, as in transformers
    flat = flatten(model.params)
    keys = ["final_logits_bias", "model.encoder.embed_positions.weight",
            "model.decoder.layers.1.final_layer_norm.weight"]  # the last: a trained control

    def loss(sub):
      return model(**inputs, labels=labels, params=unflatten({**flat, **sub}, model.params)).loss
    grads = jax.grad(loss)({k: flat[k] for k in keys})
    assert not np.any(grads[keys[0]]) and not np.any(grads[keys[1]]) and np.any(grads[keys[2]])


def test_shift_tokens_right_matches_transformers():
  from transformers.models.bart.modeling_bart import shift_tokens_right as bart_shift
  from transformers.models.mbart.modeling_mbart import shift_tokens_right as mbart_shift
  labels = np.array([[5, 6, 7, 2, 98], [8, 9, 2, 98, -100], [4, 2, 98, 1, 1]])
  np.testing.assert_array_equal(np.asarray(bart.shift_tokens_right(labels, 1, 2)),
                                bart_shift(torch.tensor(labels), 1, 2).numpy())
  np.testing.assert_array_equal(np.asarray(bart.mbart_shift_tokens_right(labels, 1)),
                                mbart_shift(torch.tensor(labels), 1).numpy())
  np.testing.assert_array_equal(np.asarray(bart.mbart_shift_tokens_right(labels, 1))[:, 0],
                                [98, 98, 98])  # the language code starts the decoder
  with pytest.raises(ValueError, match="pad_token_id has to be defined"):
    bart.shift_tokens_right(labels, None, 2)
  # v4 scripts import it from the model's module, e.g. __import__(model.__module__).shift_tokens_right.
  from flaxhf.models.marian import shift_tokens_right as marian_shift
  from flaxhf.models.mbart import shift_tokens_right as mbart_v4
  assert marian_shift is bart.shift_tokens_right and mbart_v4 is bart.mbart_shift_tokens_right
  for cls, fn in ((flaxhf.FlaxBartForConditionalGeneration, bart.shift_tokens_right),
                  (flaxhf.FlaxMBartForConditionalGeneration, bart.mbart_shift_tokens_right),
                  (flaxhf.FlaxMarianMTModel, bart.shift_tokens_right)):
    assert __import__(cls.__module__, fromlist=["shift_tokens_right"]).shift_tokens_right is fn


@functools.lru_cache
def own_model(variant):
  """A tiny random LM, wide enough that logits differ clearly (flaxhf's own init is tested above)."""
  return twin(flaxhf.FlaxAutoModelForSeq2SeqLM, torch_model(variant, "seq2seq_lm", seed=1,
                                                            init_std=0.1))


@pytest.mark.parametrize("variant", ["bart", "mbart", "marian-unshared"])
def test_cached_decoding_matches_full_forward(variant):
  """encode + init_cache + decode (a 3-token prompt, then single tokens) == one full pass; so
  does generation's prefill/step, which caches the cross-attention keys/values once."""
  model = own_model(variant)
  inputs = make_inputs(model.config, "seq2seq_lm", batch=2, length=7, target=8, seed=1)
  enc_ids, enc_mask, dec = inputs["input_ids"], inputs["attention_mask"], inputs["decoder_input_ids"]
  full = np.asarray(model(enc_ids, attention_mask=enc_mask, decoder_input_ids=dec).logits)
  max_length = 10

  enc = model.encode(enc_ids, attention_mask=enc_mask)
  cache = model.init_cache(2, max_length, enc)
  got = []
  for a, b in [(0, 3)] + [(t, t + 1) for t in range(3, 8)]:
    out = model.decode(dec[:, a:b], enc, encoder_attention_mask=enc_mask, past_key_values=cache)
    got.append(np.asarray(out.logits))
    cache = out.past_key_values
  np.testing.assert_allclose(np.concatenate(got, 1), full, atol=1e-5, rtol=1e-5)
  assert int(flatten(cache)["model.decoder.layers.1.self_attn.cache_index"]) == 8
  assert not any("encoder_attn" in k for k in flatten(cache))  # v4's cache: self-attention only

  # Generation's path: the prefill caches the encoder's keys/values; the steps never project them
  # again, so they give the same logits with encoder_attn.k_proj/v_proj set to NaN.
  n, p = 2, 3
  logits, state = model._generation_prefill(
      model.params, jnp.asarray(dec[:, :p]), jnp.ones((n, p), jnp.int32), max_length,
      {"input_ids": enc_ids, "attention_mask": enc_mask})
  np.testing.assert_allclose(np.asarray(logits), full[:, p - 1], atol=1e-5, rtol=1e-5)
  cross = flatten(state["cache"])["model.decoder.layers.0.encoder_attn.cached_key"]
  assert cross.shape == (n, enc_ids.shape[1], 4, 8)
  poisoned = {k: (np.full_like(v, np.nan) if "encoder_attn.k_proj" in k or "encoder_attn.v_proj" in k
                  else v) for k, v in flatten(model.params).items()}
  poisoned = model._params_from_state_dict(poisoned)
  run = model._generation_step  # generate runs it under jit (the generate tests below)
  for t in range(p, 7):
    logits, state = run(poisoned, jnp.asarray(dec[:, t]), state)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=1e-5, rtol=1e-5)
  # Beam search reorders every array with a row axis; decoding follows the reordered rows.
  swapped = jax.tree_util.tree_map(lambda x: x[::-1] if x.ndim else x, state)
  logits, _ = run(poisoned, jnp.asarray(dec[::-1, 7]), swapped)
  np.testing.assert_allclose(np.asarray(logits), full[::-1, 7], atol=1e-5, rtol=1e-5)


def test_sequence_classification_reads_the_last_eos(tmp_path):
  pt = torch_model("bart", "sequence_classification")
  model = twin(flaxhf.FlaxBartForSequenceClassification, pt)
  ids = np.array([[5, 2, 7, 8, 2, 1], [9, 2, 4, 2, 1, 1]])  # two EOS per row, the last at 4 and 3
  inputs = {"input_ids": ids, "attention_mask": (ids != 1).astype(np.int64)}
  labels = np.array([0, 2])
  got, want = model(**inputs, labels=labels), torch_outputs(pt, inputs, labels=torch.tensor(labels))
  np.testing.assert_allclose(np.asarray(got.logits), want.logits.numpy(), atol=1e-5)
  np.testing.assert_allclose(float(got.loss), float(want.loss), rtol=1e-5)
  ragged = ids.copy()
  ragged[0, 1] = 6  # one EOS in row 0, two in row 1
  with pytest.raises(ValueError, match="same number of <eos> tokens"):
    torch_outputs(pt, {"input_ids": ragged})
  with pytest.raises(ValueError, match=r"same number of <eos> tokens.*\[1, 2\]"):
    model(ragged)
  with pytest.raises(ValueError, match="at least one <eos> token"):
    model(np.array([[5, 6, 7]]))


def test_input_errors():
  model = own_model("bart")
  marian = flaxhf.FlaxMarianModel(config("marian"), _do_init=False)
  ids = np.array([[5, 6, 2]])
  with pytest.raises(ValueError, match="needs decoder_input_ids"):
    marian(ids)
  enc = jnp.zeros((1, 3, 32))
  with pytest.raises(ValueError, match=r"decoder_attention_mask has shape \(1, 3\) but must be \(1, 8\)"):
    model.decode(ids, enc, past_key_values=model.init_cache(1, 8), decoder_attention_mask=np.ones((1, 3)))
  with pytest.raises(ValueError, match="past_key_values must be the cache from model.init_cache"):
    model.decode(ids, enc, past_key_values={"x": np.zeros(2)})
  with pytest.raises(ValueError, match="decode needs encoder_outputs"):
    model.decode(ids, None)
  with pytest.raises(ValueError, match="max_position_embeddings=64"):
    model.init_cache(1, 65)
  with pytest.raises(ValueError, match="dropout_rng"):
    model(ids, train=True)
  with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\)"):
    model(ids, attention_mask=np.ones((1, 2)))
  # train=True applies dropout (BART's config has dropout 0.1).
  trained = model(ids, train=True, dropout_rng=jax.random.key(0)).logits
  assert np.abs(np.asarray(trained) - np.asarray(model(ids).logits)).max() > 1e-3


def test_v4_mappings():
  from flaxhf import FLAX_MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING as SEQ2SEQ
  assert SEQ2SEQ[transformers.BartConfig] is flaxhf.FlaxBartForConditionalGeneration
  assert SEQ2SEQ[transformers.MBartConfig] is flaxhf.FlaxMBartForConditionalGeneration
  assert SEQ2SEQ[transformers.MarianConfig] is flaxhf.FlaxMarianMTModel
  assert flaxhf.FLAX_MODEL_MAPPING[transformers.MarianConfig] is flaxhf.FlaxMarianModel
  with pytest.raises(ValueError, match="no ForSequenceClassification model for model_type 'marian'"):
    flaxhf.FlaxAutoModelForSequenceClassification.from_config(config("marian"))


# ---- generate == transformers' generate ------------------------------------------------------------
# Wide weights make the next-token distribution peaked, so no two candidates sit within rounding.
GEN_ARCHS = {"bart": {}, "mbart": dict(decoder_start_token_id=2), "marian": {}}
FORCED = {"mbart": dict(forced_bos_token_id=VOCAB - 2)}  # mBART-50's target-language code


@functools.lru_cache
def gen_twins(arch):
  torch.manual_seed(0)
  c = ARCHS[arch](init_std=0.3, **GEN_ARCHS[arch])
  pt = transformers.AutoModelForSeq2SeqLM.from_config(c).eval()
  fx = twin(flaxhf.FlaxAutoModelForSeq2SeqLM, pt)
  # Ragged sources, right-padded with the pad id as tokenizers pad them.
  rng = np.random.RandomState(1)
  lengths = (9, 4, 6)
  ids = np.full((3, max(lengths)), c.pad_token_id)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.randint(3, VOCAB - 2, size=n)
    ids[i, n - 1] = c.eos_token_id
  return pt, fx, {"input_ids": ids, "attention_mask": (ids != c.pad_token_id).astype(np.int64)}


def generate_both(arch, **kwargs):
  pt, fx, batch = gen_twins(arch)
  kwargs = {**FORCED.get(arch, {}), **kwargs}
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()}, **kwargs)
  got = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
  want_seq = want.sequences if kwargs.get("return_dict_in_generate") else want
  np.testing.assert_array_equal(np.asarray(got.sequences), want_seq.numpy())
  return got, want


# Untrained tiny models repeat themselves; the penalty makes greedy paths varied (same on both sides).
GREEDY = dict(do_sample=False, max_new_tokens=12, repetition_penalty=1.3)


@functools.lru_cache
def eos_candidates(arch):
  """Tokens greedy decoding emits early on: as EOS ids they end rows at different steps."""
  eos = gen_twins(arch)[0].config.eos_token_id
  # Two EOS ids (the same twice) give the program of the greedy test below: one compile for both.
  got, _ = generate_both(arch, eos_token_id=[eos, eos], **GREEDY)
  seq = np.asarray(got.sequences)
  return [int(seq[0, 3]), int(seq[2, 5])]


def check_start(arch, seq):
  """Marian starts from its pad id, BART and mBART-50 from EOS, mBART then forces the language code."""
  c = gen_twins(arch)[0].config
  assert (seq[:, 0] == c.decoder_start_token_id).all()
  if arch == "marian":
    assert c.decoder_start_token_id == c.pad_token_id
  if arch == "mbart":
    assert (seq[:, 1] == FORCED["mbart"]["forced_bos_token_id"]).all()


BEAM = {
    "early_true": dict(num_beams=4, early_stopping=True, length_penalty=1.5, repetition_penalty=1.2),
    "early_false_no_repeat": dict(num_beams=3, early_stopping=False, no_repeat_ngram_size=2),
    "early_never": dict(num_beams=4, early_stopping="never", length_penalty=-0.5),
}


@pytest.mark.parametrize("arch", sorted(GEN_ARCHS))
def test_greedy_equals_transformers(arch):
  pad = gen_twins(arch)[0].config.pad_token_id
  got, _ = generate_both(arch, eos_token_id=eos_candidates(arch), **GREEDY)
  seq = np.asarray(got.sequences)
  check_start(arch, seq)
  # Rows end at different steps; finished ones are padded.
  lengths = (seq[:, 1:] != pad).sum(axis=1)
  assert len(set(lengths.tolist())) > 1, seq


def test_generate_continues_a_decoder_prompt():
  """decoder_input_ids that start with the decoder start token are continued as given (P = 2)."""
  pt, fx, batch = gen_twins("bart")
  dec = np.array([[2, 5], [2, 9], [2, 5]])
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()},
                       decoder_input_ids=torch.tensor(dec), **GREEDY)
  got = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec,
                    **GREEDY).sequences
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  np.testing.assert_array_equal(np.asarray(got)[:, :2], dec)


@pytest.mark.parametrize("case", sorted(BEAM))
@pytest.mark.parametrize("arch", sorted(GEN_ARCHS))
def test_beam_search_equals_transformers(arch, case):
  got, want = generate_both(arch, num_return_sequences=2, max_new_tokens=10,
                            eos_token_id=eos_candidates(arch), return_dict_in_generate=True,
                            output_scores=True, **BEAM[case])
  check_start(arch, np.asarray(got.sequences))
  np.testing.assert_allclose(np.asarray(got.sequences_scores), want.sequences_scores.numpy(),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(got.beam_indices), want.beam_indices.numpy())


def test_generation_config_roundtrip(tmp_path):
  """transformers' generation_config.json (decoder start, forced BOS, EOS ids, length) loads with
  the model and drives generate as in PyTorch."""
  pt, fx, batch = gen_twins("mbart")
  settings = transformers.GenerationConfig.from_model_config(pt.config)
  settings.update(forced_bos_token_id=VOCAB - 2, eos_token_id=eos_candidates("mbart"), **GREEDY)
  pt.generation_config = settings
  pt.save_pretrained(tmp_path)
  loaded = flaxhf.FlaxAutoModelForSeq2SeqLM.from_pretrained(str(tmp_path))
  assert loaded.generation_config.forced_bos_token_id == VOCAB - 2
  assert loaded.generation_config.decoder_start_token_id == 2
  # The loaded settings, on the twin whose program is compiled already.
  seq = fx.generate(batch["input_ids"], attention_mask=batch["attention_mask"],
                    generation_config=loaded.generation_config).sequences
  with torch.no_grad():
    want = pt.generate(**{k: torch.tensor(v) for k, v in batch.items()})
  np.testing.assert_array_equal(np.asarray(seq), want.numpy())
