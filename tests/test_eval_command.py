"""`quantkit eval` (issue 8, must-show 2): perplexity against an independent computation with transformers' logits,
a model against itself (KL 0, top-1 agreement 1), and a quantized model against its float source."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from quantkit.calib.rows import build_rows
from quantkit.calib.sources import load_calibration
from quantkit.cli import main
from quantkit.evaluation import EVAL_SEED, EvalSettings, eval_rows
from quantkit.metrics import evaluate, evaluate_many
from quantkit.tokenizer.chat import ChatTokenizer

ROWS, SEQ_LEN = 3, 48
SIZE = ["--rows", ROWS, "--seq-len", SEQ_LEN, "--device", "cpu", "--quiet"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def eval_json(*args) -> dict:
    result = cli("eval", *args, *SIZE, "--json")
    assert result.exit_code == 0, result.output + str(result.exception)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def float_model(tiny_models):
    return tiny_models.get("mistral_large")


def test_perplexity_is_exp_mean_nll_of_transformers_logits(float_model):
    folder = float_model["hf"]
    tok = ChatTokenizer.from_folder(folder)
    rows = build_rows(
        load_calibration(None),
        encode=lambda text: [tok.bos_id, *tok.encode_text(text)],
        rows=ROWS,
        seq_len=SEQ_LEN,
        seed=EVAL_SEED,
        encode_chat=lambda messages, tools: tok.encode_chat(messages, tools).input_ids,
    ).ids
    assert torch.equal(eval_rows(folder, EvalSettings(rows=ROWS, seq_len=SEQ_LEN)).ids, rows)
    with torch.no_grad():
        logits = float_model["reference"](rows).logits.double()  # [rows, T, V], transformers' model
    logp = logits[:, :-1] - logits[:, :-1].exp().sum(-1, keepdim=True).log()
    nll = -logp.gather(-1, rows[:, 1:, None]).mean().item()
    report = eval_json(folder)
    assert report["tokens"] == ROWS * (SEQ_LEN - 1)
    assert report["nll"] == pytest.approx(nll, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(report["nll"]), rel=1e-12)
    assert F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()).item() == pytest.approx(nll, rel=1e-9)


def test_model_against_itself_has_zero_kl_and_full_agreement(float_model):
    report = eval_json(float_model["hf"], "--reference", float_model["hf"])
    assert report["kl_divergence"] == 0.0
    assert report["top1_agreement"] == 1.0
    assert report["reference_perplexity"] == report["perplexity"]


def test_quantized_against_float_has_positive_kl(float_model, tmp_path):
    quantized = tmp_path / "q3"
    args = ["--bits", "3", "--group-size", "32", "--rows", "4", "--seq-len", "64", "--quiet"]
    result = cli("quantize", float_model["hf"], quantized, *args)
    assert result.exit_code == 0, result.output + str(result.exception)
    report = eval_json(quantized, "--reference", float_model["hf"])
    assert 0 < report["kl_divergence"] < 5
    assert 0 < report["top1_agreement"] < 1
    assert report["perplexity"] != report["reference_perplexity"]
    table = cli("eval", quantized, "--reference", float_model["hf"], *SIZE)
    assert table.exit_code == 0, table.output
    assert f"{report['kl_divergence']:.6f}" in table.stdout and "top-1 agreement" in table.stdout


def test_seq_len_beyond_context_is_one_line_error(float_model):
    result = cli("eval", float_model["hf"], "--rows", 1, "--seq-len", 10**7, "--device", "cpu", "--quiet")
    assert result.exit_code == 1 and "longer than the model's context" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_evaluate_many_equals_one_at_a_time_and_runs_the_reference_once_per_row():
    torch.manual_seed(0)
    vocab, rows = 11, torch.randint(0, 11, (4, 9))
    tables = {k: torch.randn(vocab, vocab) for k in ("ref", "a", "b")}
    calls = {k: 0 for k in tables}

    def model(k):
        def fn(ids):
            calls[k] += 1
            return tables[k][ids]

        return fn

    together = evaluate_many({"a": model("a"), "b": model("b")}, rows, model("ref"), progress=False)
    assert calls["ref"] == rows.shape[0]
    for k in ("a", "b"):
        alone = evaluate(model(k), rows, model("ref"), progress=False)
        assert together[k].as_dict() == pytest.approx(alone.as_dict(), rel=1e-12)
        per_token = -F.log_softmax(tables[k][rows[:, :-1]], -1).gather(2, rows[:, 1:, None])[..., 0]
        assert together[k].row_nll == pytest.approx(per_token.mean(1).tolist(), rel=1e-6)
        assert together[k].nll == pytest.approx(float(per_token.mean()), rel=1e-6)
        assert "row_nll" not in together[k].as_dict()
    assert together["a"].kl_divergence != together["b"].kl_divergence
