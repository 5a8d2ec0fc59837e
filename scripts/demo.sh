#!/usr/bin/env bash
# Set up, build a small Pixtral-Large-like model offline (random weights, the real v7m1 tokenizer), and run the
# whole pipeline on it: convert -> tokenize -> quantize -> run (with an image) -> eval. Output in ./work/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }
step "installing torch 2.13.0 (CPU wheel; a few minutes the first time)"
python -m pip install --progress-bar on torch==2.13.0
step "installing quantkit and mistral-common (it only supplies the real tokenizer file)"
python -m pip install --progress-bar on -e . "mistral-common>=1.5"
W=work/demo
IMG="$(pwd)/calib_data/images/bar_chart.png"
TOK=$(python -c "import mistral_common, pathlib; print(pathlib.Path(mistral_common.__file__).parent / 'data' / 'mistral_instruct_tokenizer_241114.model.v7m1')")
rm -rf "$W" "work/.demo"* && mkdir -p "$W"
step "building a tiny Pixtral-Large-like model with RANDOM weights: its answers are gibberish by design"
python -m quantkit.synthetic tiny-pixtral-large "$W/native" --tokenizer "$TOK"
step "convert, inspect, tokenize, quantize, run, eval"
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
step "done: outputs are in $W (native/, hf/, q4/)"
echo "The weights are random, so the answers above are noise; the pipeline and the figures are the point."
echo "Try next: quantkit inspect $W/q4 --card; quantkit run $W/q4 (interactive chat, /help);"
echo "          quantkit quantize $W/hf $W/q3 --bpw 3.0 --group-size 64 --rows 8 --seq-len 256"
