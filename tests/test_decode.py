"""The CPU decode path: kept dequantized weights, the backend resolved once, the static-cache decode step and its
on-device sampling, and the per-layer launch count."""

from __future__ import annotations

import pytest
import torch
from test_packed import random_packed
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.packed import pack_linear
from quantkit.kernels import qlinear
from quantkit.kernels.qlinear import QuantLinear
from quantkit.kernels.reference import reference_matmul
from quantkit.model.config import ModelConfig, TextConfig
from quantkit.model.generate import Batch, Sampling, generate, sample_on_device
from quantkit.model.modules import swap_linears
from quantkit.model.text import Transformer
from quantkit.quant.gptq import rtn_quantize
from quantkit.quantized_model import fuse_projections, keep_dequantized, set_backend


@pytest.mark.parametrize("bits,act,rot", [(4, True, 0), (3, False, 32), ((5, 128), True, 0)])
def test_kept_weight_gives_the_reference_output(bits, act, rot):
    layout = [(5, 128), (3, 128)] if isinstance(bits, tuple) else bits
    pl, _ = random_packed(48, 256, layout, 64, act_order=act, bias=True, rot_in=rot, rot_out=rot and 16)
    lin = QuantLinear(pl, backend="torch")
    keys = set(lin.state_dict())
    x = torch.randn(3, 5, 256)
    ref = reference_matmul(x, pl)
    lin.keep_dense(torch.float32)
    assert lin.has_dense
    y = lin(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert set(lin.state_dict()) == keys  # the kept weight is not part of the checkpoint
    lin.keep_dense(None)
    assert not lin.has_dense
    torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)


def test_backend_is_resolved_once_not_per_forward(monkeypatch):
    pl, _ = random_packed(32, 64, 4, 32)
    lin = QuantLinear(pl, backend="auto")
    calls = []
    real = qlinear.resolve_backend
    monkeypatch.setattr(qlinear, "resolve_backend", lambda *a: calls.append(a) or real(*a))
    x = torch.randn(1, 64)
    for _ in range(4):
        lin(x)
    assert len(calls) == 1
    lin.to("cpu")  # a move re-resolves (once)
    lin(x)
    lin(x)
    assert len(calls) == 2


def test_keep_dequantized_respects_the_budget_and_the_flag(monkeypatch):
    model = nn.Sequential(*(QuantLinear(random_packed(64, 128, 4, 64, seed=i)[0], backend="torch") for i in range(3)))
    model.append(nn.LayerNorm(64))
    assert set_backend(model, "torch") == 3
    one = model[0].dense_bytes(torch.float32)
    monkeypatch.setattr("quantkit.quantized_model.available_memory", lambda device: 2 * one + one // 2)
    assert keep_dequantized(model, fraction=1.0) == 2  # the third does not fit
    assert [m.has_dense for m in model[:3]] == [True, True, False]
    x = torch.randn(2, 128)
    for m in model[:3]:
        torch.testing.assert_close(m(x), reference_matmul(x, m.packed), rtol=1e-5, atol=1e-5)
    assert keep_dequantized(model, enabled=False) == 0
    assert not any(m.has_dense for m in model[:3])


def tiny_model(window: int | None = None, quantized: bool = False, device: str = "cpu") -> Transformer:
    """A random 2-layer Mistral (GQA 2:1) with float or 4-bit torch-backend linears."""
    t = TextConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=96,
                   norm_eps=1e-5, rope_theta=1e4, max_seq_len=64, sliding_window=window)
    torch.manual_seed(0)
    model = Transformer(ModelConfig("mistral", t))
    for name, p in model.named_parameters():
        p.data = torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.3
    if quantized:
        def factory(name: str, linear: nn.Linear):
            if not name.startswith("layers."):
                return None
            r = rtn_quantize(linear.weight.data, 4, 32)
            return QuantLinear(pack_linear(r.q, r.scales, r.zeros, 32, 4), backend="torch")

        swap_linears(model, factory)
    return model.eval().to(device)


@pytest.mark.parametrize("window,quantized", [(None, False), (6, False), (None, True)])
def test_static_decode_step_gives_the_eager_tokens(window, quantized):
    model = tiny_model(window, quantized)
    prompt = [5, 17, 3, 80, 41, 9, 22]
    eager = generate(model, prompt, max_new_tokens=16, decode="eager")
    static = generate(model, prompt, max_new_tokens=16, decode="static")
    assert len(eager.output_ids) == 16
    assert static.output_ids == eager.output_ids
    assert generate(model, prompt, max_new_tokens=16).output_ids == eager.output_ids  # auto on CPU: eager


def test_static_decode_samples_reproducibly_and_stops():
    model = tiny_model()
    kw = dict(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=3, decode="static")
    a, b = generate(model, [1, 2, 3], **kw), generate(model, [1, 2, 3], **kw)
    assert a.output_ids == b.output_ids and len(a.output_ids) == 12
    stop = a.output_ids[4]
    c = generate(model, [1, 2, 3], stop_ids=[stop], **kw)
    assert c.output_ids == a.output_ids[: a.output_ids.index(stop) + 1]


def test_sampling_on_device_follows_the_top_p_distribution():
    logits = torch.tensor([2.0, 0.5, 1.0, -1.0, 0.0, 1.5])
    assert int(sample_on_device(logits, 0.0, 1.0, torch.zeros(1))) == 0
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.75)]:
        probs = torch.softmax(logits / temperature, -1).double()
        order = probs.argsort(descending=True)
        keep = probs[order].cumsum(0) - probs[order] < top_p
        want = torch.zeros_like(probs)
        want[order[keep]] = probs[order[keep]] / probs[order[keep]].sum()
        grid = (torch.arange(20000) + 0.5) / 20000  # evenly spread draws: frequencies are the distribution
        got = torch.bincount(torch.cat([sample_on_device(logits, temperature, top_p, u.view(1)) for u in grid]),
                             minlength=6).double() / grid.numel()
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


def test_graph_decode_needs_cuda():
    with pytest.raises(QuantkitError, match="one CUDA device"):
        generate(tiny_model(), [1, 2], max_new_tokens=3, decode="graph")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("quantized", [False, True])
def test_captured_decode_gives_the_eager_tokens(quantized):
    model = tiny_model(quantized=quantized, device="cuda")
    if quantized:
        set_backend(model, "triton")
    prompt = [5, 17, 3, 80, 41, 9, 22]
    eager = generate(model, prompt, max_new_tokens=24, decode="eager")
    graph = generate(model, prompt, max_new_tokens=24, decode="graph")
    assert graph.output_ids == eager.output_ids
    assert generate(model, prompt, max_new_tokens=24).output_ids == eager.output_ids  # auto on CUDA: graph


@pytest.mark.parametrize("keep", [True, False])
def test_fused_projections_give_the_same_tokens_and_logits(keep):
    model = tiny_model(quantized=True)
    keep_dequantized(model, enabled=keep)
    ids = torch.tensor([[5, 17, 3, 80, 41]])
    with torch.inference_mode():
        before = model(ids)
    want = generate(model, [5, 17, 3], max_new_tokens=10, decode="eager").output_ids
    assert fuse_projections(model) == 4  # 2 layers x (q/k/v, gate/up)
    keep_dequantized(model, enabled=keep)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.q_proj is None and mlp.gate_proj is None
    assert attn.qkv_proj.out_features == 64 + 2 * 32 and mlp.gate_up_proj.out_features == 2 * 128
    assert attn.qkv_proj.has_dense == keep
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), before, rtol=1e-4, atol=1e-4)
    assert generate(model, [5, 17, 3], max_new_tokens=10, decode="static").output_ids == want


def test_projections_with_different_layouts_stay_apart():
    model = tiny_model(quantized=True)
    attn = model.layers[0].self_attn
    r = rtn_quantize(torch.randn(32, 64), 3, 32)  # k_proj at 3 bits: its planes cannot join q's and v's
    attn.k_proj = QuantLinear(pack_linear(r.q, r.scales, r.zeros, 32, 3), backend="torch")
    assert fuse_projections(model) == 3
    assert attn.qkv_proj is None and attn.q_proj is not None and model.layers[1].self_attn.qkv_proj is not None


@pytest.mark.parametrize("layout", [4, [(5, 128), (3, 128)]])
def test_fused_triton_launch_matches_the_reference_of_the_parts(layout):
    from dataclasses import replace

    sizes = (48, 16, 16)
    parts = [random_packed(n, 256, layout, 64, act_order=True, seed=i, bias=True)[0] for i, n in enumerate(sizes)]
    parts = [replace(p, perm=parts[0].perm) for p in parts]  # one input: one act-order permutation
    fused = qlinear.fuse([QuantLinear(p, backend="triton") for p in parts])
    assert fused is not None and fused.packed.layout == parts[0].layout
    x = torch.randn(2, 256, dtype=torch.float16)
    want = torch.cat([reference_matmul(x, p) for p in parts], dim=-1).float()
    got = fused(x).float()
    assert float((got - want).abs().max() / want.abs().max()) < 3e-3


def test_triton_matmul_custom_op_passes_opcheck_and_traces_whole():
    from quantkit.kernels import triton_dequant as td

    pl, _ = random_packed(40, 128, [(5, 64), (3, 64)], 32, act_order=True, bias=True)
    planes = [p for s in pl.segments for p in s.planes]
    x = torch.randn(3, 128)
    args = (x, planes, pl.scales, pl.zeros, pl.perm, pl.bias, pl.had_in, pl.had_out, td._meta(pl))
    torch.library.opcheck(td.quant_linear_op, args, test_utils=("test_schema", "test_faketensor"))
    lin = QuantLinear(pl, backend="triton")
    eager = lin(x)  # builds the packed view (from buffer values: not something to trace)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)  # fullgraph: no break at the launch
    torch.testing.assert_close(compiled(x), eager, rtol=0, atol=0)
    torch.testing.assert_close(eager, reference_matmul(x, pl), rtol=1e-4, atol=1e-4)


def run_batch(model: Transformer, requests: list[tuple[list[int], Sampling]], max_batch: int, stop_ids=()) -> tuple:
    """Continuous batching as the server does it: requests join in order while there is room, leave when done."""
    batch, pending, out, sizes = Batch(model, max_batch), list(enumerate(requests)), {}, []
    which = {}
    for _ in range(200):  # bounded: 5 requests of at most 16 tokens take far fewer steps
        while pending and batch.free:
            i, (prompt, sampling) = pending.pop(0)
            which[id(batch.add(prompt, None, sampling, stop_ids))] = i
        for row in [r for r in batch.rows if r.done]:
            out[which[id(row)]] = row.output_ids
            batch.remove(row)
        if not batch.rows and not pending:
            break
        sizes.append(len(batch.step()))
    lengths = batch.cache_len
    batch.close()
    assert not any(layer.self_attn.kv_cache is not None for layer in model.layers)
    return [out[i] for i in range(len(requests))], sizes, lengths


PROMPTS = [[5, 17, 3, 80, 41, 9, 22], [1, 2], [7] * 11, [40, 41, 42], [3, 9, 27, 81, 50]]


@pytest.mark.parametrize("window,quantized", [(None, False), (6, False), (None, True)])
def test_batched_decode_gives_each_request_its_lone_greedy_tokens(window, quantized):
    """Different prompt lengths and answer lengths, three rows for five requests: rows join and leave mid-way and
    the cache grows when a longer request joins; every answer is generate()'s for that request alone."""
    model = tiny_model(window, quantized)
    requests = [(p, Sampling(max_new_tokens=10 + 2 * i)) for i, p in enumerate(PROMPTS)]
    alone = [generate(model, p, max_new_tokens=s.max_new_tokens).output_ids for p, s in requests]
    assert len({tuple(a) for a in alone}) == len(alone)
    got, sizes, cache_len = run_batch(model, requests, max_batch=3)
    assert got == alone
    assert max(sizes) == 3 and sizes.count(3) >= 5 and 1 in sizes  # really batched; the last one ran alone
    assert cache_len == max(len(p) + s.max_new_tokens for p, s in requests[:4])  # grown past the first's 17


def test_batched_decode_samples_each_row_with_its_own_seed_and_stops():
    model = tiny_model()
    requests = [(p, Sampling(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=i)) for i, p in enumerate(PROMPTS)]
    requests[1] = (PROMPTS[1], Sampling(max_new_tokens=12))  # greedy next to sampled rows
    kw = [dict(max_new_tokens=12, temperature=s.temperature, top_p=s.top_p, seed=s.seed) for _, s in requests]
    alone = [generate(model, p, decode="eager", **k).output_ids for (p, _), k in zip(requests, kw, strict=True)]
    got, sizes, _ = run_batch(model, requests, max_batch=4)
    assert got == alone and max(sizes) == 4
    stop = alone[0][3]
    got, _, _ = run_batch(model, requests, max_batch=4, stop_ids=[stop])
    pairs = zip(requests, kw, strict=True)
    want = [generate(model, p, decode="eager", stop_ids=[stop], **k).output_ids for (p, _), k in pairs]
    assert got == want and got[0] == alone[0][:4]


def test_batch_refuses_what_does_not_fit():
    model = tiny_model()
    batch = Batch(model, 2)
    with pytest.raises(QuantkitError, match="longer than the model's context"):
        batch.add(list(range(65)), None, Sampling(max_new_tokens=1))
    batch.add([1, 2], None, Sampling(max_new_tokens=3))
    batch.add([3, 4], None, Sampling(max_new_tokens=3))
    with pytest.raises(QuantkitError, match="already holds 2 requests"):
        batch.add([5], None, Sampling(max_new_tokens=3))
    batch.close()
    long = list(range(1, 63))  # 62 tokens of a 64-token context: the answer stops at the context, as generate()'s
    got, _, cache_len = run_batch(model, [(long, Sampling(max_new_tokens=50))], max_batch=2)
    assert got == [generate(model, long, max_new_tokens=50).output_ids] and len(got[0]) == 3 and cache_len == 64


@pytest.mark.parametrize("quantized", [False, True])
def test_a_lone_row_of_the_batch_gives_the_eager_logits_bit_for_bit(quantized):
    """Per-row positions, cache rows and masks add no rounding: a request alone in cache row 2 of a 3-row batch gets
    exactly the eager path's logits. (With B > 1 rows the linears' matmul kernel changes with the row count, which
    moves logits by ~1e-5; tokens stay the same, as the tests above show.)"""
    model = tiny_model(quantized=quantized)
    seen = []
    head = model.head
    model.head = lambda h: seen.append(head(h)[:, -1]) or seen[-1][:, None]
    generate(model, PROMPTS[0], max_new_tokens=4, decode="eager")
    eager, seen[:] = torch.cat(seen), []
    batch = Batch(model, 3)
    rows = [batch.add(p, None, Sampling(max_new_tokens=4)) for p in (PROMPTS[1], PROMPTS[2], PROMPTS[0])]
    batch.remove(rows[0])
    batch.remove(rows[1])
    seen[:] = seen[2:]
    while not rows[2].done:
        batch.step()
    batch.close()
    assert rows[2].row == 2 and torch.equal(torch.cat(seen), eager)
