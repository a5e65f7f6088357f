#!/usr/bin/env bash
# Set up the environment if needed, then run the default test suite (slow studies excluded: -m slow runs them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/env.sh
exec .venv/bin/python -m pytest -n 2 --dist worksteal -q "$@"
