#!/usr/bin/env bash
# Set up the environment if needed, then run the demo: the CLI on a real recording shipped in fixtures/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
.venv/bin/lorascope --help
.venv/bin/lorascope info fixtures/tiny_run.h5
