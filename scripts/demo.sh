#!/usr/bin/env bash
# Set up, build a small Pixtral-Large-like model offline (random weights, the real v7m1 tokenizer), and run the
# whole pipeline on it: convert -> tokenize -> quantize -> run (with an image) -> eval. Output in ./work/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e . "mistral-common>=1.5"   # mistral-common only supplies the real tokenizer file
W=work/demo
IMG="$(pwd)/calib_data/images/bar_chart.png"
TOK=$(python -c "import mistral_common, pathlib; print(pathlib.Path(mistral_common.__file__).parent / 'data' / 'mistral_instruct_tokenizer_241114.model.v7m1')")
rm -rf "$W" "work/.demo"* && mkdir -p "$W"
python -m quantkit.synthetic tiny-pixtral-large "$W/native" --tokenizer "$TOK"
quantkit convert "$W/native" "$W/hf"
quantkit inspect "$W/hf"
cat > "$W/messages.json" <<JSON
[{"role": "system", "content": "You are a careful analyst."},
 {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "$IMG"}},
                              {"type": "text", "text": "What does this chart show?"}]}]
JSON
quantkit tokenize "$W/hf" --messages "$W/messages.json"
quantkit quantize "$W/hf" "$W/q4" --format quantkit --bits 4 --group-size 64 --rows 8 --seq-len 256
quantkit inspect "$W/q4"
quantkit run "$W/q4" --image "$IMG" --prompt "What does this chart show?" --max-new-tokens 16
quantkit eval "$W/q4" --reference "$W/hf" --rows 4 --seq-len 256
