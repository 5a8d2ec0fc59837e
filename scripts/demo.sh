#!/usr/bin/env bash
# Set up, build a small Pixtral-Large-like model offline (random weights, the real v7m1 tokenizer),
# and run the pipeline on it. Everything lands in ./work/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e . "mistral-common>=1.5"   # mistral-common only supplies the real tokenizer file
W=work/demo
TOK=$(python -c "import mistral_common, pathlib; print(pathlib.Path(mistral_common.__file__).parent / 'data' / 'mistral_instruct_tokenizer_241114.model.v7m1')")
rm -rf "$W" && mkdir -p "$W"
python -m quantkit.synthetic tiny-pixtral-large "$W/native" --tokenizer "$TOK"
quantkit inspect "$W/native"
quantkit convert "$W/native" "$W/hf"
quantkit inspect "$W/hf"
