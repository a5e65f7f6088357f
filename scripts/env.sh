#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install lorascope with every extra.
# torch 2.13.0 is installed first and pinned: it is the CPU build on these machines, and an unpinned torch
# pulled in by another package would resolve to a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.lorascope-installed
want=$(cat pyproject.toml scripts/env.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet torch==2.13.0
  .venv/bin/python -m pip install --quiet -e ".[hf,lightning,trackers,trl,dev]" torch==2.13.0
  echo "$want" > "$stamp"
fi
