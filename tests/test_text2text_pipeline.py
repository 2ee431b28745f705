"""flaxhf.pipeline("text2text-generation" / "summarization" / "translation") against transformers v4's
pipelines. transformers 5 removed them, so the reference is what they did: the same settings on the
PyTorch twin through `model.generate` and `tokenizer.batch_decode`, which must give identical text.

Tiny random BART, T5, Marian and mBART with wide weights (no near-ties between next tokens), with
tokenizers trained here. One max_new_tokens and few settings throughout: every source falls in one
encoder bucket, so each model compiles a handful of decode programs that the tests share.
"""

import logging

import pytest
import torch
import transformers

import flaxhf
from engine_utils import count_compiles
from flaxhf.data.tokenizer_training import train_tokenizer

INPUTS = ["The quick brown fox jumps over it.", "Hello world, how are you today?",
          "A stitch in time saves nine , they say ."]  # ragged: 3 sources of different lengths
CORPUS = INPUTS + ["summarize: translate English to Romanian: translate English to German:",
                   "Summaries are shorter than the documents they summarize.",
                   "Translation turns a sentence of one language into another one."]
NEW = 8
GREEDY = dict(num_beams=1, max_new_tokens=NEW, repetition_penalty=1.3)  # the penalty varies outputs
BEAM = dict(num_beams=2, num_return_sequences=2, max_new_tokens=NEW, repetition_penalty=1.3)
# T5's task settings, v4 style: max_length counts the decoder's start token, so 8 new tokens.
T5_TASKS = {
    "summarization": dict(prefix="summarize: ", max_length=NEW + 1, num_beams=1,
                          repetition_penalty=1.3),
    "translation_en_to_ro": dict(prefix="translate English to Romanian: ", max_length=NEW + 1,
                                 num_beams=2, early_stopping=True, repetition_penalty=1.3),
    "translation_en_to_de": dict(prefix="translate English to German: ", max_length=NEW + 1,
                                 num_beams=2, early_stopping=True, repetition_penalty=1.3),
}
TINY = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
            max_position_embeddings=64, init_std=0.3)


def _export(pt, tok, path):
  pt.save_pretrained(path)
  tok.save_pretrained(path)
  return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """{name: (model folder with tokenizer, PyTorch twin)} for BART, T5 and Marian."""
  root = tmp_path_factory.mktemp("t2t")
  bart_tok = train_tokenizer(CORPUS * 3, str(root / "bart_tok"), "bart", vocab_size=400)
  t5_tok = train_tokenizer(CORPUS * 3, str(root / "t5_tok"), "t5", vocab_size=200)
  torch.manual_seed(0)
  configs = {
      "bart": transformers.BartConfig(vocab_size=len(bart_tok), **TINY),
      "t5": transformers.T5Config(
          vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
          relative_attention_num_buckets=8, relative_attention_max_distance=16,
          decoder_start_token_id=0, initializer_factor=4.0, task_specific_params=T5_TASKS),
      # Marian on the T5-layout tokenizer (pad 0 = the decoder start, </s> 1).
      "marian": transformers.MarianConfig(
          vocab_size=len(t5_tok), pad_token_id=0, decoder_start_token_id=0, eos_token_id=1,
          forced_eos_token_id=1, scale_embedding=True, activation_function="swish", **TINY),
  }
  out = {}
  for name, config in configs.items():
    pt = transformers.AutoModelForSeq2SeqLM.from_config(config).eval()
    out[name] = (_export(pt, bart_tok if name == "bart" else t5_tok, root / name), pt)
  return out


@pytest.fixture(scope="module")
def pipes(models):
  """{name: flaxhf pipeline loaded from the folder}; later pipelines reuse its model (and so its
  compiled programs) and tokenizer."""
  tasks = {"bart": "text2text-generation", "t5": "summarization", "marian": "translation"}
  return {name: flaxhf.pipeline(tasks[name], model=models[name][0]) for name in models}


def reference(pt, tok, texts, batch_size=1, prefix="", clean=False, **settings):
  """What v4's pipeline produced: batches of `batch_size` sources right-padded by the tokenizer,
  PyTorch generate, batch_decode; one list of texts (and of token ids) per source."""
  texts_out, ids_out = [], []
  for b in range(0, len(texts), batch_size):
    chunk = texts[b:b + batch_size]
    enc = tok([prefix + t for t in chunk], padding=True, return_tensors="pt")
    with torch.no_grad():
      ids = pt.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **settings)
    decoded = tok.batch_decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=clean)
    k = len(ids) // len(chunk)
    texts_out += [decoded[i * k:(i + 1) * k] for i in range(len(chunk))]
    ids_out += [ids[i * k:(i + 1) * k].tolist() for i in range(len(chunk))]
  return texts_out, ids_out


def test_sources_share_one_encoder_bucket(pipes):
  """Per model and prefix, every source pads to one encoder bucket: no extra programs."""
  from flaxhf.generation.generate import prompt_bucket
  for name, fp in pipes.items():
    prefixes = ("", "summarize: ", "translate English to Romanian: ") if name == "t5" else ("",)
    for prefix in prefixes:
      lengths = [len(fp.tokenizer(prefix + t)["input_ids"]) for t in INPUTS]
      assert len({prompt_bucket(n, None) for n in lengths}) == 1, (name, prefix, lengths)


CASES = {
    "greedy": dict(GREEDY),
    "tensors": dict(GREEDY, return_tensors=True),
    "return_text": dict(GREEDY, return_text=True, return_tensors=False),
    "cleanup": dict(GREEDY, clean_up_tokenization_spaces=True),
    "beam": dict(BEAM),
    "beam_tensors": dict(BEAM, return_type=0),  # v4's ReturnType.TENSORS
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_text2text_matches_torch(pipes, models, case):
  fp, (_, pt) = pipes["bart"], models["bart"]
  kwargs = CASES[case]
  settings = {k: v for k, v in kwargs.items() if k not in fp.defaults}
  tensors = kwargs.get("return_tensors") or kwargs.get("return_type") == 0
  k = kwargs.get("num_return_sequences", 1)
  key = "generated_token_ids" if tensors else "generated_text"

  def expected(texts, batch_size):
    text, ids = reference(pt, fp.tokenizer, texts, batch_size,
                          clean=kwargs.get("clean_up_tokenization_spaces", False), **settings)
    return [[{key: x} for x in (ids if tensors else text)[i]] for i in range(len(texts))]

  single = fp(INPUTS[0], **kwargs)
  assert single == expected(INPUTS[:1], 1)[0] and len(single) == k
  # A list: one record per source (v4 flattened them) when k == 1, else a list per source.
  batched = fp(INPUTS, batch_size=2, **kwargs)
  want = expected(INPUTS, 2)
  assert batched == (want if k > 1 else [r[0] for r in want])
  assert len(batched) == 3 and batched[0] != batched[1]
  if tensors:  # the decoder's start token first, as generate returns it
    rows = [r for rs in batched for r in rs] if k > 1 else batched
    assert all(r[key][0] == pt.config.decoder_start_token_id for r in rows)


def test_stop_sequence_and_no_recompile(pipes, models):
  """stop_sequence: its first token is the EOS (v4); the EOS ids are traced, so no new program."""
  fp, (_, pt) = pipes["bart"], models["bart"]
  tok = fp.tokenizer
  ids = fp(INPUTS[0], return_tensors=True, **GREEDY)[0]["generated_token_ids"]
  # A token generated mid-way whose text encodes back to it first (BPE merges may not).
  stop_id = next(t for t in ids[2:-1] if tok.encode(tok.decode([t]), add_special_tokens=False)[0] == t)
  stop = tok.decode([stop_id])
  with count_compiles("decode_program") as compiles:
    got = fp(INPUTS[0], stop_sequence=stop, **GREEDY)
    again = fp(INPUTS[0], **GREEDY)
  assert compiles == []
  want, _ = reference(pt, fp.tokenizer, INPUTS[:1], eos_token_id=stop_id, **GREEDY)
  assert got == [{"generated_text": want[0][0]}]
  assert len(got[0]["generated_text"]) < len(again[0]["generated_text"])


def test_summarization_applies_task_params(pipes, models):
  """T5: config.task_specific_params["summarization"] gives the "summarize: " prefix and the
  generation settings (under the constructor's and the call's), as v4."""
  fp, (_, pt) = pipes["t5"], models["t5"]
  settings = dict(T5_TASKS["summarization"])
  prefix = settings.pop("prefix")
  assert fp.task_prefix == prefix and fp.prepare_generate_kwargs({}) == settings
  # The config itself is left as it was (v4 popped the prefix out of it).
  assert fp.model.config.task_specific_params["summarization"]["prefix"] == prefix
  sources, _ = fp.encode(INPUTS[:1], fp.params)
  assert sources[0] == fp.tokenizer(prefix + INPUTS[0])["input_ids"]
  want, _ = reference(pt, fp.tokenizer, INPUTS[1:2], prefix=prefix, **settings)
  assert fp(INPUTS[1]) == [{"summary_text": want[0][0]}]
  want, _ = reference(pt, fp.tokenizer, INPUTS, 2, prefix=prefix, **settings)
  assert fp(INPUTS, batch_size=2) == [{"summary_text": w[0]} for w in want]
  # text2text-generation on the same model has no task settings: v4's pipeline defaults apply.
  plain = flaxhf.pipeline("text2text-generation", model=fp.model, tokenizer=fp.tokenizer)
  assert plain.task_prefix is None
  assert plain.prepare_generate_kwargs({}) == dict(max_new_tokens=256, num_beams=4)


def test_translation_task_names(pipes, models, caplog):
  """translation_en_to_ro picks T5's "translate English to Romanian: " entry; plain "translation"
  falls back to the config's first translation entry with v4's warning; src_lang/tgt_lang name
  other entries."""
  t5, (_, pt) = pipes["t5"], models["t5"]
  fp = flaxhf.pipeline("translation_en_to_ro", model=t5.model, tokenizer=t5.tokenizer)
  settings = dict(T5_TASKS["translation_en_to_ro"])
  prefix = settings.pop("prefix")
  assert (fp.task_key, fp.langs, fp.task_prefix) == ("translation_en_to_ro", ("en", "ro"), prefix)
  want, _ = reference(pt, t5.tokenizer, INPUTS, 2, prefix=prefix, **settings)
  assert fp(INPUTS, batch_size=2) == [{"translation_text": w[0]} for w in want]
  assert fp(INPUTS[2], src_lang="en", tgt_lang="ro") == [{"translation_text": want[2][0]}]
  with caplog.at_level(logging.WARNING, logger="flaxhf"):
    fallback = flaxhf.pipeline("translation", model=t5.model, tokenizer=t5.tokenizer)
  # config.json keeps its keys sorted: en_to_de comes first.
  assert "defaulting to 'translation_en_to_de'" in caplog.text
  assert (fallback.task_key, fallback.langs) == ("translation_en_to_de", ("en", "de"))
  de = flaxhf.pipeline("translation", model=t5.model, tokenizer=t5.tokenizer, src_lang="en",
                       tgt_lang="de")
  assert de.task_prefix == "translate English to German: "
  # The constructor's settings over the task's, the call's over both.
  three = flaxhf.pipeline("translation_en_to_de", model=t5.model, tokenizer=t5.tokenizer,
                          num_beams=3)
  assert three.prepare_generate_kwargs({})["num_beams"] == 3
  assert three.prepare_generate_kwargs({"num_beams": 1})["num_beams"] == 1
  # A call's generation_config replaces the pipeline's settings (v4), pipeline defaults filled in.
  given = three.prepare_generate_kwargs({"generation_config": transformers.GenerationConfig(
      num_beams=5)})
  assert list(given) == ["generation_config"]
  assert (given["generation_config"].num_beams, given["generation_config"].max_new_tokens) == (5, 256)


def test_marian_needs_no_languages(pipes, models):
  """A single-direction Marian model translates with plain "translation". Three sources in a
  batch of 4 run as 4 rows (a filler copy), beams return num_return_sequences lists."""
  fp, (_, pt) = pipes["marian"], models["marian"]
  assert fp.langs == (None, None) and fp.task_prefix is None
  want, _ = reference(pt, fp.tokenizer, INPUTS, 4, **GREEDY)
  assert fp(INPUTS, batch_size=4, **GREEDY) == [{"translation_text": w[0]} for w in want]
  want, _ = reference(pt, fp.tokenizer, INPUTS[1:2], **BEAM)
  assert fp(INPUTS[1:2], **BEAM) == [[{"translation_text": w} for w in want[0]]]


def test_mbart_language_codes(tmp_path):
  """Tokenizers that set language codes (mBART): src_lang marks the source, tgt_lang's code is
  forced as the first generated token, as v4's _build_translation_inputs path."""
  words = sorted({w.strip(".,!").lower() for t in INPUTS for w in t.split()})
  vocab = ([(t, 0.0) for t in ("<s>", "<pad>", "</s>", "<unk>")]
           + [("▁" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]
           + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz.,!"])
  tok = transformers.MBartTokenizer(vocab=vocab)
  torch.manual_seed(0)
  config = transformers.MBartConfig(vocab_size=len(tok), scale_embedding=True,
                                    decoder_start_token_id=2, **TINY)
  pt = transformers.MBartForConditionalGeneration(config).eval()
  path = _export(pt, tok, tmp_path)
  model = flaxhf.FlaxAutoModelForSeq2SeqLM.from_pretrained(path)
  with pytest.raises(ValueError, match="needs both src_lang= and tgt_lang="):
    flaxhf.pipeline("translation", model=model, tokenizer=tok)
  fp = flaxhf.pipeline("translation", model=model, tokenizer=tok, src_lang="en_XX", tgt_lang="ro_RO")
  texts = [t.lower() for t in INPUTS[:2]]
  ro = tok.convert_tokens_to_ids("ro_RO")
  tok.src_lang = "en_XX"
  want, want_ids = reference(pt, tok, texts, 2, forced_bos_token_id=ro, **GREEDY)
  assert fp(texts, batch_size=2, **GREEDY) == [{"translation_text": w[0]} for w in want]
  got = fp(texts, batch_size=2, return_tensors=True, **GREEDY)
  assert [r["translation_token_ids"] for r in got] == [w[0] for w in want_ids]
  assert all(r["translation_token_ids"][1] == ro for r in got)
  assert fp.encode(texts[:1], fp.params)[0][0][-2:] == [2, tok.convert_tokens_to_ids("en_XX")]


def test_truncation_cuts_to_the_encoder(pipes):
  fp = pipes["bart"]
  long = " ".join(INPUTS * 8)
  p = fp.call_params({"truncation": True})
  assert len(fp.encode([long], p)[0][0]) == fp.model.config.max_position_embeddings == 64
  with pytest.raises(ValueError, match="Input 0 has .* tokens but FlaxBartForConditionalGeneration "
                                       "encodes at most 64: pass truncation=True"):
    fp(long, **GREEDY)


def test_errors(pipes, models):
  bart, t5 = pipes["bart"], pipes["t5"]
  with pytest.raises(ValueError, match="Unknown task 'summarise'.*translation_XX_to_YY"):
    flaxhf.pipeline("summarise", model=bart.model, tokenizer=bart.tokenizer)
  with pytest.raises(ValueError, match="Invalid translation task 'translation_en_ro'"):
    flaxhf.pipeline("translation_en_ro", model=models["bart"][0])
  for empty in ("", "   ", ["Hello", ""]):
    with pytest.raises(ValueError, match="is empty"):
      bart(empty, **GREEDY)
  for bad in ([], ["Hello", 3], 3):
    with pytest.raises(ValueError, match="str or a non-empty list"):
      bart(bad)
  with pytest.raises(TypeError,
                     match=r"'text2text-generation' pipeline got unknown.*\['max_new_tokenz'\]"):
    bart(INPUTS[0], max_new_tokenz=3)
  with pytest.raises(ValueError, match="does not support padding="):
    bart(INPUTS[0], padding=True)
  with pytest.raises(ValueError, match="mutually exclusive"):
    bart(INPUTS[0], return_text=True, return_tensors=True)
  with pytest.raises(ValueError, match="return_text=False leaves nothing"):
    bart(INPUTS[0], return_text=False)
  with pytest.raises(ValueError, match="num_return_sequences"):  # generate's own check
    bart(INPUTS[0], num_beams=2, num_return_sequences=3, max_new_tokens=NEW)
  # A decoder-only model.
  gpt2 = flaxhf.FlaxGPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=len(bart.tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64), _do_init=False)
  with pytest.raises(ValueError,
                     match="'summarization' pipeline needs an encoder-decoder.*decoder-only"):
    flaxhf.pipeline("summarization", model=gpt2, tokenizer=bart.tokenizer)
  # T5 without translation settings, or without the asked direction: it would not know the task.
  config = transformers.T5Config(**{**t5.model.config.to_dict(), "task_specific_params": None})
  bare = flaxhf.FlaxT5ForConditionalGeneration(config, _do_init=False)
  for task in ("translation", "translation_en_to_ro"):
    with pytest.raises(ValueError, match="told its task by a text prefix.*pass prefix="):
      flaxhf.pipeline(task, model=bare, tokenizer=t5.tokenizer)
  ok = flaxhf.pipeline("translation_en_to_ro", model=bare, tokenizer=t5.tokenizer,
                       prefix="translate English to Romanian: ")
  assert ok.prefix(ok.params) == "translate English to Romanian: "
  with pytest.raises(ValueError, match=r"'translation_en_to_fr'.*it has \['translation_en_to_de', "
                                       r"'translation_en_to_ro'\]"):
    flaxhf.pipeline("translation_en_to_fr", model=t5.model, tokenizer=t5.tokenizer)
  ro = flaxhf.pipeline("translation_en_to_ro", model=t5.model, tokenizer=t5.tokenizer)
  with pytest.raises(ValueError, match="differ from this pipeline's direction.*translation_en_to_de"):
    ro(INPUTS[0], tgt_lang="de")
