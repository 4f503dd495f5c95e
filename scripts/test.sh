#!/usr/bin/env bash
# The whole test suite; tests that need ../shared/data or the real SmolLM2 skip with a reason when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -rs "$@"
