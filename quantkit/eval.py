"""`quantkit eval`: perplexity, and against a reference model the KL divergence and top-1 agreement.

Both models see the same rows of token ids. Perplexity is exp(mean next-token NLL) over every predicted token;
KL is the mean over tokens of KL(P_ref || P_model) of the next-token distributions (the direction ExLlamaV3
and llama.cpp report); top-1 agreement is how often both models' most likely next token is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

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

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def evaluate(model: LogitsFn, rows: torch.Tensor, reference: LogitsFn | None = None, progress: bool = True):
    """Run model (and reference) over rows [N, T] of token ids; every row predicts its tokens 1..T-1."""
    nll = ref_nll = kl = 0.0
    agree = tokens = 0
    for r in tqdm(range(rows.shape[0]), desc="eval", unit="row", disable=not progress):
        ids = rows[r : r + 1]  # [1, T]
        target = ids[0, 1:]  # [T-1]
        with torch.no_grad():
            logp = F.log_softmax(model(ids)[0, :-1].float(), dim=-1)  # [T-1, V]
            nll += float(-logp.gather(1, target[:, None].to(logp.device)).sum())
            if reference is not None:
                ref_logp = F.log_softmax(reference(ids)[0, :-1].float().to(logp.device), dim=-1)  # [T-1, V]
                ref_nll += float(-ref_logp.gather(1, target[:, None].to(logp.device)).sum())
                kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        tokens += target.numel()
    result = EvalResult(perplexity=math.exp(nll / tokens), nll=nll / tokens, tokens=tokens)
    if reference is not None:
        result.kl_divergence = kl / tokens
        result.top1_agreement = agree / tokens
        result.reference_perplexity = math.exp(ref_nll / tokens)
    return result
