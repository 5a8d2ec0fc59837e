"""Compile every kernel launch the runtime would make for sm_80 (A100) and sm_90 (H100/H200), with no GPU.

How: quantkit.kernels.triton_dequant.triton_matmul (and exl3_triton.decode_inner / gemv, the EXL3 kernels) is called
on empty CPU tensors with the kernel object (`_qmm`, `_decode_tiles`, `_gemv`) swapped for a recorder, so each launch
(grid, arguments, constexprs, warps, stages) comes from the real launch code and the real JSON configs. Each launch is
specialised as triton.runtime.jit.JITFunction.run does, but for the CUDA backend of an explicit GPUTarget, and
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)); registers and spills come from
ptxas -v, shared memory from the kernel's metadata. triton.compile needs a CUDA driver only when no target is given,
so this runs on CPU (it needs the ptxas Triton ships).

python -m quantkit.kernels.compile_check [--arch 90 80] [--sweeps ci|full|configs,variants,...] [--bits 3 5 ...]
Exit status 1 when a kernel fails to compile, spills, or needs more shared memory than the arch allows.
tests/test_compile.py runs the `ci` sweeps (every bit width against every shipped config entry, plus the
variants: bf16, fp32, group sizes, per channel, zero points, mixed segments, bias; and the EXL3 decode and GEMV at
every K and codebook). `autotune` compiles every
candidate of quantkit.kernels.autotune at every bit width (hundreds of kernels: minutes per arch).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # most dynamic shared memory one block may opt in to
SM_COUNT = {90: 132, 80: 108}  # H100 SXM / H200, A100 SXM: only changes the split-K count (a runtime int)
BITS = (2, 3, 4, 5, 6, 7, 8)
SHAPE = (12288, 1024)  # (in, out): Pixtral-Large's k/v projection; constexprs do not depend on the shape here
VARIANTS = ("bf16", "fp32", "g32", "g64", "per_channel", "zeros", "mixed", "bias", "fixup", "fixup_mixed")
SWEEPS = ("configs", "variants", "index", "autotune", "exl3")
PRESETS = {"ci": ("configs", "variants", "exl3"), "full": ("configs", "variants", "index", "autotune", "exl3")}
KERNELS = {  # what each recorded launch compiles: the dequant-matmul, the EXL3 tile decode and the EXL3 GEMV
    "qmm": ("quantkit.kernels.triton_dequant", "_qmm"),
    "exl3": ("quantkit.kernels.exl3_triton", "_decode_tiles"),
    "exl3_gemv": ("quantkit.kernels.exl3_triton", "_gemv"),
    "exl3_viterbi": ("quantkit.kernels.exl3_triton", "_viterbi_forward"),
    "exl3_viterbi_back": ("quantkit.kernels.exl3_triton", "_viterbi_back"),
}
EXL3_TILES = (8, 8)  # tiles of the trellis a recorded EXL3 decode launch covers (the grid only; K and book specialise)


def shipped_configs() -> dict[str, dict]:
    """{file stem: merged config} for default.json and every per-GPU file next to it."""
    from quantkit.kernels.config import CONFIG_DIR

    out = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        cfg = json.loads((CONFIG_DIR / "default.json").read_text())
        cfg.update(json.loads(path.read_text()))
        out[path.stem] = cfg
    return out


def config_launches(cfg: dict) -> list[tuple[str, int, dict]]:
    """(path, M, entry) for each entry of a config, with an M that picks it."""
    out = []
    for path in ("skinny", "tiled"):
        lo = 1 if path == "skinny" else cfg["skinny_max_m"] + 1
        for entry in cfg[path]:
            m = entry.get("max_m") or max(lo, 512)
            out.append((path, m, entry))
            lo = m + 1
    return out


def _layer(k: int, n: int, bits, group: int | None, sym: bool, bias: bool):
    """A PackedLinear of empty tensors (never read: the recorder only looks at shapes, dtypes and strides)."""
    import torch

    from quantkit.formats.packed import PackedLinear, Segment, padded_layout, plane_widths

    g, segs = padded_layout(k, bits, group)
    segments = [
        Segment(b, nc, [torch.empty(nc * w // 32, n, dtype=torch.int32) for w in plane_widths(b)]) for b, nc in segs
    ]
    k_pad = sum(nc for _, nc in segs)
    scales = torch.empty(k_pad // g, n, dtype=torch.float16)
    zeros = None if sym else torch.empty(k_pad // g, n, dtype=torch.uint8)
    return PackedLinear(
        k, n, g, segments, scales, zeros, torch.randperm(k).int(), torch.empty(n, dtype=torch.float16) if bias else None
    )


def launch_cases(sweeps: Iterable[str], bits: Iterable[int]) -> list[dict]:
    """Every (layer, M, dtype, launch entry) to record; each dict also says where it comes from."""
    import torch

    bits = tuple(bits)
    k, n = SHAPE
    cases = []
    for name, cfg in shipped_configs().items():
        launches = config_launches(cfg)
        if "configs" in sweeps:
            for b, (path, m, entry) in itertools.product(bits, launches):
                cases.append(dict(sweep="configs", config=name, bits=b, m=m, path=path, entry=entry))
        if "variants" in sweeps:  # each variant at one width (cycling through them), on every entry of the config
            for i, variant in enumerate(VARIANTS):
                for path, m, entry in launches:
                    cases.append(dict(sweep="variants", variant=variant, config=name, bits=bits[i % len(bits)], m=m,
                                      path=path, entry=entry))
        if "index" in sweeps:  # the other unpack mode (configs may choose it)
            for b, (path, m, entry) in itertools.product(bits, launches):
                index = dict(entry, unpack="index")
                cases.append(dict(sweep="index", config=name, bits=b, m=m, path=path, entry=index))
    if "autotune" in sweeps:
        from quantkit.kernels.config import BUCKETS, candidates

        for path, ms in BUCKETS.items():
            for m in ms:
                for b, cand in itertools.product(bits, candidates(path, m)):
                    cases.append(dict(sweep="autotune", config="candidate", bits=b, m=m, path=path, entry=cand))
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for c in cases:  # the dequant-matmul cases; the EXL3 ones below carry what they need
        v = c.get("variant")
        c["dtype"] = dtypes.get(v, torch.float16)
        c["group"] = {"g32": 32, "g64": 64, "per_channel": None}.get(v, 128)
        c["sym"] = v != "zeros"
        c["bias"] = v in ("bias", "fixup")
        other = 4 if c["bits"] != 4 else 3
        c["layout"] = [(c["bits"], 4096), (other, k - 4096)] if v in ("mixed", "fixup_mixed") else c["bits"]
        if v in ("fixup", "fixup_mixed"):  # the self-clearing split-K reduction (config "reduce": "fixup")
            c["entry"] = dict(c["entry"], reduce="fixup")
    if "exl3" in sweeps:  # kernels/exl3_triton.py at every K and codebook a folder may hold: the tile decode (fp32,
        from quantkit.formats.exl3 import CODEBOOKS  # fp16 / bf16 for the prefill) and the GEMV per activation dtype

        floats = (torch.float32, torch.float16, torch.bfloat16)
        for k, book, dtype in itertools.product(range(1, 9), CODEBOOKS, floats):
            cases.append(dict(sweep="exl3", config="-", bits=k, book=book, m=0, path="decode", dtype=dtype))
            if dtype != torch.float32:
                cases.append(dict(sweep="exl3", config="-", bits=k, book=book, m=1, path="gemv", dtype=dtype))
        for k, book, start in itertools.product(range(1, 9), CODEBOOKS, (False, True)):  # the encoder's Viterbi
            cases.append(dict(sweep="exl3", config="-", bits=k, book=book, m=start, path="viterbi",
                              dtype=torch.float32))  # fmt: skip
    return cases


def make_specialiser(kernel, arch: int) -> Callable:
    """f(args, kwargs) -> (key, compile inputs), as JITFunction.run specialises a launch, for GPUTarget arch."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)

    def specialise(args, kwargs):
        kw = dict(kwargs)
        kw["debug"] = kw.get("debug", kernel.debug) or knobs.runtime.debug
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        bound, spec, opts = binder(*args, **kw)
        options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
        key = json.dumps(
            [arch, signature, sorted((str(a), v) for a, v in constexprs.items()),
             sorted((str(a), v) for a, v in attrs.items()), options.hash()],
            default=str,
        )
        return key, dict(arch=arch, signature=signature, constexprs=constexprs, attrs=attrs,
                         options=dict(options.__dict__))

    return specialise


def _kernel(name: str):
    module, attr = KERNELS[name]
    return getattr(__import__(module, fromlist=[attr]), attr)


@contextlib.contextmanager
def _recording(kernel: str, arch: int, kernels: dict[str, dict], current: dict, path: str | None = None):
    """The kernel object swapped for a recorder while the launch code runs: each launch's specialisation for arch
    goes into kernels (keyed by what makes it distinct), with the case (current) that made it (its path renamed to
    `path` where one launch code runs two kernels)."""
    module, attr = KERNELS[kernel]
    mod = __import__(module, fromlist=[attr])
    specialise = make_specialiser(getattr(mod, attr), arch)

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                key, spec = specialise(args, kwargs)
                spec["kernel"] = kernel
                entry = kernels.setdefault(kernel + key, dict(spec=spec, cases=[]))  # two kernels' keys may match
                entry["cases"].append(dict(current, grid=list(grid), **({"path": path} if path else {})))

            return launch

    saved = getattr(mod, attr)
    setattr(mod, attr, Recorder())
    try:
        yield
    finally:
        setattr(mod, attr, saved)


def capture(arch: int, cases: list[dict]) -> dict[str, dict]:
    """{key: {spec, cases}}: the distinct kernels the cases launch on arch (the launch code run with a recorder)."""
    import torch

    from quantkit.kernels import exl3_triton
    from quantkit.kernels import triton_dequant as td

    kernels: dict[str, dict] = {}
    current: dict = {}
    saved = td._sm_count
    td._sm_count = lambda device: SM_COUNT[arch]
    try:
        with _recording("qmm", arch, kernels, current):
            for c in (c for c in cases if c["sweep"] != "exl3"):
                pl = _layer(SHAPE[0], SHAPE[1], c["layout"], c["group"], c["sym"], c["bias"])
                current.clear()
                current.update({a: v for a, v in c.items() if a not in ("entry", "layout", "group", "sym", "bias")})
                current["entry"] = {a: v for a, v in c["entry"].items() if a != "max_m"}
                td.triton_matmul(torch.empty(c["m"], SHAPE[0], dtype=c["dtype"]), pl, launch=c["entry"])
    finally:
        td._sm_count = saved
    with _recording("exl3", arch, kernels, current):
        for c in (c for c in cases if c["sweep"] == "exl3" and c["path"] == "decode"):
            current.clear()
            current.update(c)
            trellis = torch.empty(*EXL3_TILES, 16 * c["bits"], dtype=torch.int16)
            exl3_triton.decode_inner(trellis, c["book"], dtype=c["dtype"])
    with _recording("exl3_gemv", arch, kernels, current):
        for c in (c for c in cases if c["sweep"] == "exl3" and c["path"] == "gemv"):
            current.clear()
            current.update(c)
            n_in, n_out = SHAPE
            trellis = torch.empty(n_in // 16, n_out // 16, 16 * c["bits"], dtype=torch.int16)
            suh, svh = torch.empty(n_in, dtype=torch.float16), torch.empty(n_out, dtype=torch.float16)
            exl3_triton.gemv(torch.empty(c["m"], n_in, dtype=c["dtype"]), trellis, suh, svh, c["book"])
    with (
        _recording("exl3_viterbi", arch, kernels, current),
        _recording("exl3_viterbi_back", arch, kernels, current, path="viterbi_back"),
    ):
        for c in (c for c in cases if c["sweep"] == "exl3" and c["path"] == "viterbi"):
            current.clear()
            current.update(c)
            tiles, start = 4, torch.zeros(4, dtype=torch.long) if c["m"] else None
            arg = torch.zeros(256, tiles, (1 << 16) >> c["bits"], dtype=torch.uint8)
            exl3_triton.viterbi(torch.empty(tiles, 256), c["bits"], c["book"], start, arg)
    return kernels


def compile_one(spec: dict) -> dict:
    """Compile one specialisation for its arch: ok, registers, spill bytes, shared memory, or the error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    src = ASTSource(_kernel(spec["kernel"]), spec["signature"], spec["constexprs"], spec["attrs"])
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=GPUTarget("cuda", spec["arch"], 32), options=spec["options"])
    except Exception as e:  # noqa: BLE001 - every compile failure is reported verbatim
        return dict(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-3000:])
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    smem = re.search(r"(\d+) bytes smem", text)
    stack, st, ld = (int(g) for g in spill.groups()) if spill else (0, 0, 0)
    ptx = ck.asm["ptx"]
    return dict(ok=True, seconds=round(time.time() - t0, 1), regs=int(regs.group(1)) if regs else -1,
                spill=st + ld, stack=stack, shared=ck.metadata.shared + (int(smem.group(1)) if smem else 0),
                barriers=len(re.findall(r"\bbar\.sync\b", ptx)), local=len(re.findall(r"\b(?:ld|st)\.local\b", ptx)),
                **instruction_counts(ptx, _sass(ck)))


def _sass(ck) -> str:
    """The kernel's SASS (Triton runs cuobjdump / nvdisasm), without their format warnings on stderr."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            return ck.asm["sass"]
    finally:
        os.dup2(saved, 2)
        os.close(saved)


SASS_CONVERSIONS = ("I2F", "F2F", "F2I", "I2I")  # and their .P / packed forms (I2FP, F2FP, ...)


def instruction_counts(ptx: str, sass: str) -> dict:
    """Static instruction counts that show what dequantization costs: PTX cvt.* and packed-half (f16x2/bf16x2) math,
    SASS conversion-unit ops, and totals. The K loop is emitted once (not unrolled), so a change inside it moves
    these counts by its per-step cost."""
    ops = re.findall(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\b[^:\n]*;", ptx, re.M)
    sass_ops = [line.split()[1 if line.split()[0].startswith("@") else 0]
                for line in (row.split("\t", 1)[1] for row in sass.splitlines() if "\t" in row) if line.strip()]
    return dict(ptx=len(ops), cvt=sum(o.startswith("cvt.") for o in ops),
                f16x2=sum(bool(re.search(r"\.b?f16x2$", o)) and not o.startswith(("cvt.", "mov.")) for o in ops),
                sass=len(sass_ops), xu=sum(o.startswith(SASS_CONVERSIONS) for o in sass_ops))


def kernel_name(spec: dict) -> str:
    names = [p.name for p in _kernel(spec["kernel"]).params]
    cv = {names[a[0] if isinstance(a, tuple) else a]: v for a, v in spec["constexprs"].items()}
    o = spec["options"]
    if spec["kernel"].startswith("exl3"):
        from quantkit.kernels.exl3_triton import BOOK_IDS

        book = next((b for b, i in BOOK_IDS.items() if i == cv.get("BOOK")), "-")  # the way back decodes none
        tensor = "out" if spec["kernel"] == "exl3" else "x" if "x" in spec["signature"] else "arg"
        data = spec["signature"][tensor][1:]
        what = {"exl3": "decode", "exl3_gemv": "gemv", "exl3_viterbi": "viterbi", "exl3_viterbi_back": "way back"}[
            spec["kernel"]
        ]
        what += " start" if cv.get("HAS_START") else ""
        return f"exl3 {what} K{cv['K']} {book} {data} w{o['num_warps']}s{o['num_stages']}"
    ws = "+".join(str(cv[w]) for w in ("W0", "W1", "W2") if cv[w])
    x = spec["signature"]["x_ptr"][1:]
    return (
        f"x{x} w{ws} G{cv['GROUP']}{'' if cv['TILE_SCALES'] else '/elem'}{' z' if cv['HAS_ZEROS'] else ''}"
        f" {('fixup' if cv['FIXUP'] else 'atomic') if cv['ATOMIC'] else 'direct'}{'+bias' if cv['HAS_BIAS'] else ''}"
        f" {'reshape' if cv['RESHAPE'] else 'index'} {cv['BLOCK_M']}x{cv['BLOCK_N']}x{cv['BLOCK_K']}"
        f" w{o['num_warps']}s{o['num_stages']}"
    )


def problems(res: dict, arch: int) -> list[str]:
    if not res["ok"]:
        return ["COMPILE-ERROR"]
    out = []
    if res["shared"] > SMEM_LIMIT[arch]:
        out.append(f"SMEM>{SMEM_LIMIT[arch] // 1024}KiB")
    if res["spill"] or res["stack"] or res["local"]:
        out.append("SPILL")
    return out


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the interpreter would replace the compiler
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default; set only to silence its warning


def run(
    archs: Iterable[int], cases: list[dict], workers: int = 2, log: Callable[[str], None] = print
) -> list[dict]:
    """Capture and compile; one row per distinct kernel: arch, name, sweeps, result, problems."""
    jobs = []
    for arch in archs:
        t0 = time.time()
        kernels = capture(arch, cases)
        log(f"sm_{arch}: {len(cases)} launches recorded -> {len(kernels)} distinct kernels ({time.time() - t0:.1f}s)")
        jobs += list(kernels.values())
    results: list[dict | None] = [None] * len(jobs)
    t0 = time.time()
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
        futures = {ex.submit(compile_one, j["spec"]): i for i, j in enumerate(jobs)}
        for done, fut in enumerate(cf.as_completed(futures), 1):
            try:
                results[futures[fut]] = fut.result()
            except Exception as e:  # noqa: BLE001 - a crashed worker is a failure too
                results[futures[fut]] = dict(ok=False, error=f"worker: {type(e).__name__}: {e}")
            if done % 20 == 0 or done == len(jobs):
                log(f"  compiled {done}/{len(jobs)} ({time.time() - t0:.0f}s)")
    rows = []
    for job, res in zip(jobs, results, strict=True):
        arch = job["spec"]["arch"]
        sweeps = sorted({c["sweep"] + (f":{c['variant']}" if c.get("variant") else "") for c in job["cases"]})
        rows.append(dict(arch=arch, name=kernel_name(job["spec"]), paths=sorted({c["path"] for c in job["cases"]}),
                         sweeps=sweeps, example=job["cases"][0], result=res, problems=problems(res, arch),
                         cands=sorted({c["cand"] for c in job["cases"] if "cand" in c})))
    return sorted(rows, key=lambda r: (-r["arch"], r["name"]))


def usable(path: str, m: int, cands: list[dict], arch: int, bits: Iterable[int] = BITS, workers: int = 2) -> list[dict]:
    """The candidates that compile on arch at every bit width with no spills and shared memory within the limit.

    The autotuner times candidates at a few widths, but the chosen entry then serves every width: a candidate that
    fits at 3 and 4 bits may overflow shared memory at 7 (three planes), so each one is checked here first.
    """
    cases = [dict(sweep="autotune", config="candidate", bits=b, m=m, path=path, entry=c, cand=i)
             for i, c in enumerate(cands) for b in bits]
    import torch

    for c in cases:
        c.update(dtype=torch.float16, group=128, sym=True, bias=False, layout=c["bits"])
    bad = {i for r in run([arch], cases, workers, log=lambda s: None) if r["problems"] for i in r["cands"]}
    return [c for i, c in enumerate(cands) if i not in bad]


def table(rows: list[dict]) -> str:
    head = (f"{'arch':<6}{'kernel':<58}{'path':<13}{'regs':>5}{'spill':>7}{'smem':>8}{'bar':>5}{'cvt':>5}{'f16x2':>6}"
            f"{'ptx':>6}{'xu':>5}{'sass':>6}  {'sweeps':<30}problems")
    lines = [head, "-" * len(head)]
    for r in rows:
        res = r["result"]
        if res["ok"]:
            lines.append(
                f"sm_{r['arch']:<3}{r['name']:<58}{'/'.join(r['paths']):<13}{res['regs']:>5}{res['spill']:>7}"
                f"{res['shared']:>8}{res['barriers']:>5}{res['cvt']:>5}{res['f16x2']:>6}{res['ptx']:>6}{res['xu']:>5}"
                f"{res['sass']:>6}  {','.join(r['sweeps'])[:29]:<30}{' '.join(r['problems'])}"
            )
        else:
            lines.append(f"sm_{r['arch']:<3}{r['name']:<58}{'/'.join(r['paths']):<13} ERROR {res['error'][:150]}")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    bad = [r for r in rows if r["problems"]]
    parts = [f"{len(rows)} kernels, {len(bad)} with problems"]
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        ok = [r["result"] for r in rows if r["arch"] == arch and r["result"]["ok"]]
        if ok:
            parts.append(f"sm_{arch}: regs {min(o['regs'] for o in ok)}-{max(o['regs'] for o in ok)}, "
                         f"max smem {max(o['shared'] for o in ok)} B of {SMEM_LIMIT[arch]}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", type=int, default=[90, 80], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--sweeps", default="ci", help=f"ci, full, or a comma list of {', '.join(SWEEPS)}")
    ap.add_argument("--bits", nargs="+", type=int, default=list(BITS), choices=BITS)
    ap.add_argument("--launch", help="JSON launch entry replacing every config entry (to check one candidate)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", dest="json_out", help="write every row (results included) to this file")
    args = ap.parse_args(argv)
    sweeps = PRESETS.get(args.sweeps) or tuple(s for s in args.sweeps.split(",") if s)
    if set(sweeps) - set(SWEEPS):
        ap.error(f"unknown sweeps {sorted(set(sweeps) - set(SWEEPS))}")
    _worker_init()
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="quantkit-compile-check-")  # fresh: ptxas always runs
    import triton

    cases = launch_cases(sweeps, args.bits)
    if args.launch:
        override = json.loads(args.launch)
        cases = [dict(c, entry=dict(c["entry"], **override)) for c in cases]
    print(f"triton {triton.__version__}; sweeps {','.join(sweeps)}; bits {args.bits}; arch {args.arch}", flush=True)
    t0 = time.time()
    rows = run(args.arch, cases, args.workers, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(rows))
    for r in rows:
        if not r["result"]["ok"]:
            print(f"\n=== sm_{r['arch']} {r['name']}: {r['result']['error']}\n{r['result'].get('trace', '')}")
    print(f"{summary(rows)}; {time.time() - t0:.0f}s")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
