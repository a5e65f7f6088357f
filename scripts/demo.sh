#!/usr/bin/env bash
# Set up the environment if needed, then run the main job on its built-in default: `lorascope demo` pretrains a
# small transformer, records its full fine-tuning on a memorization task, analyses the recording and writes the
# report folder lorascope-demo/ (report/report.html, report/summary.json, ...).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/lorascope demo -o lorascope-demo --force "$@"
