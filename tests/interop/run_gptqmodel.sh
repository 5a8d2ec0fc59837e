#!/usr/bin/env bash
# Interop check (issue 5): a tiny Mistral exported with `quantkit quantize --format gptq --bits 4 --group-size 32`,
# with and without act order, loads in GPTQModel on CPU and its logits match quantkit's own dequantized model
# within 1e-3 relative. Not run in CI: GPTQModel pulls a multi-GB torch build, so it lives in its own venv.
#
#   bash tests/interop/run_gptqmodel.sh          # everything under ~/.cache/quantkit-interop (or $QK_INTEROP_DIR)
#
# Steps: venv + `pip install gptqmodel` (once); with quantkit's python: synthetic tiny-mistral -> convert ->
# quantize (act order on, off) -> reference logits (quantkit_logits.py); in the venv: gptqmodel_logits.py.
# Set PYTHON for quantkit's python (default: python), REBUILD=1 to remake the models. Exits non-zero on failure.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DIR="${QK_INTEROP_DIR:-$HOME/.cache/quantkit-interop}"
VENV="$DIR/venv"
PY="${PYTHON:-python}"
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
mkdir -p "$DIR"
qk() { "$PY" -c 'import sys; from quantkit.cli import main; sys.exit(main(prog_name="quantkit"))' "$@"; }

if ! "$VENV/bin/python" -c "import gptqmodel" 2>/dev/null; then
    echo "== installing gptqmodel into $VENV (pulls torch from PyPI, several GB)"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --upgrade pip
    "$VENV/bin/python" -m pip install gptqmodel
fi

if [[ "${REBUILD:-0}" == 1 ]]; then
    rm -rf "$DIR/native" "$DIR/hf" "$DIR/gptq-act" "$DIR/gptq-noact" "$DIR"/.gptq-*.quantkit-work
fi
TOK="$("$PY" -c 'import mistral_common, pathlib
print(pathlib.Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")')"
[[ -d "$DIR/native" ]] || "$PY" -m quantkit.synthetic tiny-mistral "$DIR/native" --tokenizer "$TOK"
[[ -d "$DIR/hf" ]] || qk convert "$DIR/native" "$DIR/hf"
for order in act noact; do
    flag="--act-order"
    [[ $order == noact ]] && flag="--no-act-order"
    if [[ ! -f "$DIR/gptq-$order/config.json" ]]; then
        echo "== quantize ($flag)"
        qk quantize "$DIR/hf" "$DIR/gptq-$order" --format gptq --bits 4 --group-size 32 "$flag" \
            --rows 16 --seq-len 128 --quiet --force
    fi
    "$PY" "$HERE/quantkit_logits.py" "$DIR/hf" "$DIR/gptq-$order" "$DIR/ours-$order.safetensors"
done

echo "== GPTQModel (GPTQMODEL_CPU_WORKERS=$GPTQMODEL_CPU_WORKERS)"
"$VENV/bin/python" "$HERE/gptqmodel_logits.py" \
    "$DIR/gptq-act" "$DIR/ours-act.safetensors" "$DIR/gptq-noact" "$DIR/ours-noact.safetensors"
