#!/usr/bin/env bash
# Set up and run the test suite on a fresh machine (CPU only; no downloads beyond PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0        # the CPU wheel here; on a GPU machine keep your own torch
python -m pip install -q -e ".[test,serve]"
python -m ruff check .
python -m pytest -q "$@"
