"""Trains a tokenizer for a from-scratch run and saves it as a transformers tokenizer folder.

  python launch/train_tokenizer.py --train_file FILE --fields F1,F2 --out DIR
      [--family t5|marian|bart|mbart|gpt2] [--vocab_size 4000] [--lang_codes en_XX,ro_RO] [--max_rows N]

--fields names JSON-lines fields, dotted for nested ones: "translation.en,translation.ro" for
translation rows, "dialogue,summary" for DialogSum. A plain text file trains on its lines. Then:
  python launch/run.py --config configs/translation.py:local --workdir W --config.model.tokenizer=DIR
--family gpt2 (byte-level BPE, <|endoftext|> as BOS/EOS) serves every decoder-only family:
  python launch/train_tokenizer.py --train_file input.txt --family gpt2 --vocab_size 2000 --out DIR
  python launch/run.py --config configs/clm.py:tinyshakespeare,local,family=llama --workdir W \
      --config.model.tokenizer=DIR
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flaxhf.data import tokenizer_training  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--train_file", required=True, help="JSON lines (or plain text) to train on.")
  p.add_argument("--fields", default="", help="Comma-separated (dotted) fields of each row.")
  p.add_argument("--out", required=True, help="Folder to save the tokenizer to.")
  p.add_argument("--family", default="t5", choices=tokenizer_training.FAMILIES,
                 help="Special-token layout: t5/marian <pad>=0 </s>=1 <unk>=2 (Unigram); "
                      "bart/mbart <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4 (byte-level BPE); gpt2 "
                      "<|endoftext|>=0 as BOS/EOS (byte-level BPE, for decoder-only families).")
  p.add_argument("--vocab_size", type=int, default=4000)
  p.add_argument("--lang_codes", default="", help="mBART language codes, e.g. en_XX,ro_RO.")
  p.add_argument("--skip_rows", type=int, default=0, help="Leave out the first N rows (held out).")
  p.add_argument("--max_rows", type=int, default=None, help="Train on at most N rows.")
  args = p.parse_args(argv)
  fields = [f for f in args.fields.split(",") if f]
  if args.train_file.endswith((".json", ".jsonl")) and not fields:
    p.error("--fields is required for JSON lines, e.g. --fields translation.en,translation.ro")
  texts = tokenizer_training.read_texts(args.train_file, fields, args.skip_rows, args.max_rows)
  codes = [c for c in args.lang_codes.split(",") if c]
  tok = tokenizer_training.train_tokenizer(texts, args.out, args.family, args.vocab_size, codes)
  print(f"Saved a {len(tok)}-token {args.family} tokenizer trained on {len(texts)} texts to "
        f"{args.out} (pad={tok.pad_token_id} eos={tok.eos_token_id} unk={tok.unk_token_id} "
        f"bos={tok.bos_token_id}).")


if __name__ == "__main__":
  main()
