"""What `quantkit eval` computes: perplexity of a float or quantized model folder, and KL / top-1 agreement
against a reference.

Rows are built like calibration rows (quantkit.calib, the bundled mix by default) with another seed, so documents
are drawn and cut differently from what the quantizer saw. The bundled mix is small, though: the default rows reuse
its documents, so for held-out figures pass --dataset with text the quantizer did not calibrate on. Both models see
the same token ids, tokenized with MODEL's tokenizer; the reference must share its vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.calib.rows import CalibRows, tokenized_rows
from quantkit.calib.sources import load_calibration
from quantkit.errors import QuantkitError
from quantkit.metrics import EvalResult, evaluate
from quantkit.model.config import load_model_config
from quantkit.model.text import Transformer
from quantkit.quantized_model import load_any

EVAL_SEED = 1234  # the quantizer calibrates with seed 0: a different draw of documents and cuts


@dataclass
class EvalSettings:
    dataset: str | None = None
    split: str = "train"
    text_field: str = "text"
    rows: int = 32
    seq_len: int = 2048
    seed: int = EVAL_SEED
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "auto"


def eval_rows(folder: Path, s: EvalSettings) -> CalibRows:
    """[rows, seq_len] token ids from the dataset, tokenized as the quantizer does (BOS at each document start)."""
    from quantkit.tokenizer.chat import ChatTokenizer

    context = load_model_config(folder).text.max_seq_len
    if s.seq_len > context:
        raise QuantkitError(f"--seq-len {s.seq_len} is longer than the model's context of {context} tokens")
    tok = ChatTokenizer.from_folder(folder)
    calib = load_calibration(s.dataset, split=s.split, text_field=s.text_field)
    return tokenized_rows(tok, calib, s.rows, s.seq_len, s.seed)


def logits_fn(model: Transformer):
    """ids [1, T] -> logits [1, T, vocab] of a whole-sequence forward (no KV cache)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(ids)

    return fn


def run_eval(model_dir: Path, reference_dir: Path | None, s: EvalSettings, progress: bool = True) -> EvalResult:
    """Evaluate model_dir (and compare with reference_dir) on the rows eval_rows builds."""
    model_dir = Path(model_dir)
    vocab = load_model_config(model_dir).text.vocab_size
    if reference_dir is not None and load_model_config(reference_dir).text.vocab_size != vocab:
        raise QuantkitError(f"{Path(reference_dir).name} has another vocabulary than {model_dir.name}: cannot compare")
    rows = eval_rows(model_dir, s).ids
    if int(rows.max()) >= vocab:
        raise QuantkitError(f"the tokenizer gives ids up to {int(rows.max())} but {model_dir.name} has {vocab} tokens")
    model = load_any(model_dir, s.device, s.dtype, s.backend, progress)
    reference = None if reference_dir is None else load_any(reference_dir, s.device, s.dtype, s.backend, progress)
    return evaluate(logits_fn(model), rows, logits_fn(reference) if reference else None, progress=progress)
