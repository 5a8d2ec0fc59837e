"""The metrics of `quantkit eval` (its work is quantkit/evaluation.py): perplexity, and against a reference model
the KL divergence and top-1 agreement.

Both models see the same rows of token ids. Perplexity is exp(mean next-token NLL) over every predicted token;
KL is the mean over tokens of KL(P_ref || P_model) of the next-token distributions (the direction ExLlamaV3
and llama.cpp report); top-1 agreement is how often both models' most likely next token is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [1, T] -> logits [1, T, vocab]


@dataclass
class EvalResult:
    perplexity: float
    nll: float  # mean next-token negative log-likelihood (nats)
    tokens: int  # predicted tokens
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    reference_perplexity: float | None = None
    row_nll: list[float] | None = field(default=None, repr=False)  # mean NLL of each row, for paired comparisons

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "row_nll"}


def evaluate(model: LogitsFn, rows: torch.Tensor, reference: LogitsFn | None = None, progress: bool = True):
    """Run model (and reference) over rows [N, T] of token ids; every row predicts its tokens 1..T-1."""
    return evaluate_many({"model": model}, rows, reference, progress)["model"]


def evaluate_many(
    models: dict[str, LogitsFn], rows: torch.Tensor, reference: LogitsFn | None = None, progress: bool = True
) -> dict[str, EvalResult]:
    """Every model on the same rows, the reference run once per row: comparing many builds of one model costs one
    reference pass, and the per-row NLLs (EvalResult.row_nll) allow paired comparisons between builds."""
    row_nll: dict[str, list[float]] = {k: [] for k in models}
    kl = dict.fromkeys(models, 0.0)
    agree = dict.fromkeys(models, 0)
    ref_rows: list[float] = []
    tokens = 0
    for r in tqdm(range(rows.shape[0]), desc="eval", unit="row", disable=not progress):
        ids = rows[r : r + 1]  # [1, T]
        target = ids[0, 1:]  # [T-1]
        with torch.no_grad():
            ref_logp = None
            if reference is not None:
                ref_logp = F.log_softmax(reference(ids)[0, :-1].float(), dim=-1)  # [T-1, V]
                ref_rows.append(float(-ref_logp.gather(1, target[:, None].to(ref_logp.device)).mean()))
            for name, model in models.items():
                logp = F.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # [T-1, V]
                row_nll[name].append(float(-logp.gather(1, target[:, None].to(logp.device)).mean()))
                if ref_logp is not None:
                    ref = ref_logp.to(logp.device)
                    kl[name] += float((ref.exp() * (ref - logp)).sum())
                    agree[name] += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        tokens += target.numel()
    results = {}
    for name, per_row in row_nll.items():
        nll = sum(per_row) / len(per_row)  # every row predicts the same number of tokens
        result = EvalResult(perplexity=math.exp(nll), nll=nll, tokens=tokens, row_nll=per_row)
        if reference is not None:
            result.kl_divergence = kl[name] / tokens
            result.top1_agreement = agree[name] / tokens
            result.reference_perplexity = math.exp(sum(ref_rows) / len(ref_rows))
        results[name] = result
    return results
