"""Trains a subword tokenizer on local text and saves it as a transformers tokenizer folder.

No pretrained seq2seq tokenizer is reachable offline, so a from-scratch translation or summarization
run trains its own: a Unigram model (sentencepiece's algorithm, as T5 and Marian use) or byte-level
BPE (as BART, mBART and GPT-2 use), with the special tokens laid out as the family expects:
  t5, marian:  <pad>=0 </s>=1 <unk>=2; every text ends with </s> (no BOS).
  bart, mbart: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4; texts are <s> ... </s>.
  gpt2:        <|endoftext|>=0 is BOS, EOS and UNK, as in GPT-2's; texts get no special tokens
               (the causal-LM and SFT data add EOS themselves). For any decoder-only family
               (gpt2, llama, mistral, qwen2/3, gemma, phi3) trained from scratch.
mBART's language codes (e.g. "en_XX,ro_RO") become extra special tokens after those.
The folder loads with `AutoTokenizer.from_pretrained` as a `PreTrainedTokenizerFast`.
"""

import gzip
import hashlib
import json
import os
import tempfile
from typing import Callable, Iterable, List, Optional, Sequence

FAMILIES = ("t5", "marian", "bart", "mbart", "gpt2")
_EOT = "<|endoftext|>"
LAYOUTS = {
    "t5": dict(pad="<pad>", eos="</s>", unk="<unk>", bos=None, mask=None),
    "bart": dict(bos="<s>", pad="<pad>", eos="</s>", unk="<unk>", mask="<mask>"),
    "gpt2": dict(bos=_EOT, eos=_EOT, unk=_EOT, pad=None, mask=None),
}


def _layout(family: str) -> dict:
  if family not in FAMILIES:
    raise ValueError(f"Unknown tokenizer family {family!r}; choose one of {FAMILIES}.")
  return LAYOUTS[{"marian": "t5", "mbart": "bart"}.get(family, family)]


def special_tokens(family: str, lang_codes: Sequence[str] = ()) -> List[str]:
  """The special tokens in id order (ids 0, 1, 2, ...), language codes last."""
  layout = _layout(family)
  if family == "gpt2":
    return [_EOT] + list(lang_codes)
  order = ("pad", "eos", "unk") if layout["bos"] is None else ("bos", "pad", "eos", "unk", "mask")
  return [layout[k] for k in order] + list(lang_codes)


def train_tokenizer(texts: Iterable[str], out_dir: str, family: str = "t5", vocab_size: int = 4000,
                    lang_codes: Sequence[str] = (), model_max_length: int = 1024):
  """Trains on `texts`, saves a transformers tokenizer folder to `out_dir`, returns the tokenizer."""
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  layout, specials = _layout(family), special_tokens(family, lang_codes)
  if family in ("t5", "marian"):
    # Unigram over metaspace-marked words, as sentencepiece: "▁" marks a word start, so decoding
    # restores the spaces exactly.
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      unk_token=layout["unk"], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok = _canonical_unigram(tok, len(specials))
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {layout['eos']}", pair=f"$A {layout['eos']} $B {layout['eos']}",
        special_tokens=[(layout["eos"], specials.index(layout["eos"]))])
  else:
    # Byte-level: every byte is in the alphabet, so nothing is unknown (GPT-2's BPE has no UNK
    # in its model either).
    tok = Tokenizer(models.BPE(unk_token=None if family == "gpt2" else layout["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if family != "gpt2":  # GPT-2 adds no special tokens to a text
      bos, eos = layout["bos"], layout["eos"]
      tok.post_processor = processors.TemplateProcessing(
          single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
          special_tokens=[(bos, specials.index(bos)), (eos, specials.index(eos))])
  names = {f"{k}_token": v for k, v in layout.items() if v is not None}
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                 additional_special_tokens=list(lang_codes) or None, **names)
  os.makedirs(out_dir, exist_ok=True)
  fast.save_pretrained(out_dir)
  return fast


def _canonical_unigram(tok, num_special: int, tie: float = 1.5e-4):
  """The same tokenizer from the same texts every time. The Unigram trainer breaks score ties in
  hash order (the characters it appends get min_score - k * 1e-4 in whatever order they come), so
  token ids changed between runs; within each such chain of tied scores the pieces are put in
  sorted order, each taking the chain's scores from the highest down."""
  from tokenizers import Tokenizer
  state = json.loads(tok.to_str())
  vocab = state["model"]["vocab"]
  head, rest = vocab[:num_special], sorted(vocab[num_special:], key=lambda ps: -ps[1])
  out, i = [], 0
  while i < len(rest):
    j = i + 1
    while j < len(rest) and rest[j - 1][1] - rest[j][1] <= tie:
      j += 1
    chain = rest[i:j]
    out += [[piece, score] for (piece, _), (_, score) in zip(sorted(chain), chain)]
    i = j
  state["model"]["vocab"] = head + out
  if state["model"].get("unk_id") is not None:
    unk = vocab[state["model"]["unk_id"]][0]
    state["model"]["unk_id"] = [p for p, _ in head + out].index(unk)
  return Tokenizer.from_str(json.dumps(state))


def read_lines(path: str, skip_rows: int = 0, max_rows: Optional[int] = None) -> List[str]:
  """The non-blank lines [skip_rows, skip_rows + max_rows) of a text file (gzip if *.gz)."""
  with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  return lines[skip_rows:None if max_rows is None else skip_rows + max_rows]


def expand_lang_paths(path: str, fields: Sequence[str]) -> List[str]:
  """The files behind `path`: itself, or one per language field when it holds "{lang}"."""
  if "{lang}" not in path:
    return [path]
  return [path.format(lang=field.split(".")[-1]) for field in fields]


def read_texts(path: str, fields: Sequence[str], skip_rows: int = 0,
               max_rows: Optional[int] = None) -> List[str]:
  """Texts to train on from a JSON-lines file: each named field of each row ("translation.en" reads
  row["translation"]["en"]; "messages.content" each message's content of a chat row), rows
  [skip_rows, skip_rows + max_rows); a plain text file gives its non-blank lines; a path with
  "{lang}" names line-aligned parallel text files (Multi30k's train.{lang}.gz), one per field's
  language."""
  if "{lang}" in path:  # parallel text: "translation.de" reads path with {lang} = de
    return [text for field in fields
            for text in read_lines(path.format(lang=field.split(".")[-1]), skip_rows, max_rows)]
  texts = []
  lines = read_lines(path, skip_rows, max_rows)
  if not path.endswith((".json", ".jsonl")):
    return lines
  for n, line in enumerate(lines, skip_rows + 1):
    row = json.loads(line)
    for field in fields:
      values = [row]
      for key in field.split("."):
        # A list (a chat's "messages") continues the path in each of its items.
        values = [v for value in values for v in (value if isinstance(value, list) else [value])]
        if not all(isinstance(value, dict) and key in value for value in values):
          raise ValueError(f"{path} line {n} has no field {field!r} (keys: {sorted(row)}).")
        values = [value[key] for value in values]
      texts += [value for value in values if isinstance(value, str) and value.strip()]
  if not texts:
    raise ValueError(f"{path}: no text in fields {list(fields)}.")
  return texts


def cache_root(cache_dir: Optional[str] = None) -> str:
  """Where built tokenizers are cached: `cache_dir`, else $FLAXHF_CACHE, else ~/.cache/flaxhf."""
  return cache_dir or os.environ.get("FLAXHF_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "flaxhf")


def build_folder_once(out: str, build: Callable[[str], None]) -> str:
  """`out`, built by `build(tmp_dir)` unless it already holds a tokenizer.json. The folder is built
  under a temporary name and renamed when complete, so concurrent builders never see half of it."""
  if os.path.isfile(os.path.join(out, "tokenizer.json")):
    return out
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent)
  build(tmp)
  try:
    os.rename(tmp, out)
  except OSError:  # another process finished first
    if not os.path.isfile(os.path.join(out, "tokenizer.json")):
      raise
  return out


def cached_tokenizer_dir(path: str, fields: Sequence[str], family: str, vocab_size: int,
                         lang_codes: Sequence[str] = (), skip_rows: int = 0,
                         max_rows: Optional[int] = None, cache_dir: Optional[str] = None) -> str:
  """A tokenizer trained on `path`'s fields (rows from skip_rows on: a held-out head stays unseen),
  built once per (file, fields, family, size, rows) and cached."""
  files = [(os.path.abspath(f), os.stat(f).st_size, int(os.stat(f).st_mtime))
           for f in expand_lang_paths(path, fields)]
  key = json.dumps([files, list(fields), family, vocab_size, list(lang_codes), skip_rows,
                    max_rows])
  out = os.path.join(cache_root(cache_dir),
                     f"{family}-tokenizer-{hashlib.sha1(key.encode()).hexdigest()[:12]}")
  return build_folder_once(out, lambda tmp: train_tokenizer(
      read_texts(path, fields, skip_rows, max_rows), tmp, family, vocab_size, lang_codes))
