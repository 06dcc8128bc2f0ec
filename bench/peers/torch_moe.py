#!/usr/bin/env python3
"""PyTorch peer for moeffi's fp8_moe op, plus same-run hardware ceilings.

Usage: python3 bench/peers/torch_moe.py --out results.json [--presets a,b] [--m 1,16,128] [--quick]

The peer is a whole FP8 MoE layer written with stock PyTorch ops (definition: shared/reference/
performance.md, "The same layer whole, in PyTorch"): device-side routing metadata (no host sync),
per-token dynamic FP8 activations, per-output-channel FP8 weights, torch._scaled_grouped_mm for both
GEMMs, SwiGLU in fp32, weighted index_add_ combine. Timed eager and as one CUDA graph. If the grouped
GEMM is unusable, a per-expert torch._scaled_mm loop ("fallback", host sync, eager only) stands in.
The routing itself (softmax + topk) is an input of the op and is not timed.
"""
import argparse, json, math, statistics, sys, time, traceback

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
SCALE_MIN = 1.0 / (448.0 * 512.0)
PAD = 16          # rows of each expert group are padded to a multiple of this
VAL_M = 64        # tokens used for the correctness check of each preset
VAL_TOL = 3e-2    # relative L2 error allowed against the fp32 reference
PRESETS = {       # moe.md section 9: hidden K, expert intermediate N, experts E, top-k
    "mixtral-8x7b": dict(K=4096, N=14336, E=8, topk=2),
    "qwen3-30b-a3b": dict(K=2048, N=768, E=128, topk=8),
    "deepseek-v3-ep8": dict(K=7168, N=2048, E=32, topk=8),
    "qwen1.5-moe-a2.7b": dict(K=2048, N=1408, E=60, topk=4),
}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- timing
def time_us(fns, warmup=5, reps=30):
    """Median (and min, max) microseconds of fns[i % len(fns)]() between CUDA events."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (s, e) in enumerate(ev):
        s.record()
        fns[i % len(fns)]()
        e.record()
    torch.cuda.synchronize()
    t = [s.elapsed_time(e) * 1e3 for s, e in ev]
    return statistics.median(t), min(t), max(t)


def ceilings(dev, reps):
    out = {}
    n = 1 << 30  # 1 GiB of random bytes, copied device to device: 2 GiB of traffic per copy
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    out["copy_tb_s"] = 2 * n / time_us([lambda: dst.copy_(src)], reps=reps)[0] / 1e6
    del src, dst
    S = 8192
    fl = 2 * S ** 3
    a = torch.randn(S, S, device=dev).to(FP8)
    b = torch.randn(S, S, device=dev).to(FP8)   # row-major [N, K]; b.t() is the column-major operand
    one = torch.tensor(0.5, device=dev)
    sa, sb = torch.rand(S, 1, device=dev) + 0.5, torch.rand(1, S, device=dev) + 0.5
    cases = {"fp8_gemm_tflops_per_tensor": lambda: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16),
             "fp8_gemm_tflops_rowwise": lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16)}
    for k, fn in cases.items():
        try:
            out[k] = fl / time_us([fn], reps=reps)[0] / 1e6
        except Exception as e:  # keep going: a missing ceiling is reported as null
            log(f"ceiling {k} failed: {e}")
            out[k] = None
    del a, b
    a16 = torch.randn(S, S, device=dev, dtype=torch.bfloat16)
    b16 = torch.randn(S, S, device=dev, dtype=torch.bfloat16)
    out["bf16_gemm_tflops"] = fl / time_us([lambda: a16 @ b16.t()], reps=reps)[0] / 1e6
    del a16, b16
    torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------- the layer
def quant_rows(v):
    """Per-row dynamic FP8: s = max(amax/448, 1/(448*512)), q = e4m3(v * (1/s)). Returns q, s [rows]."""
    s = v.abs().amax(dim=1, keepdim=True).div_(FP8_MAX).clamp_(min=SCALE_MIN)
    q = (v * s.reciprocal()).clamp_(-FP8_MAX, FP8_MAX).to(FP8)  # clamp: torch's cast does not saturate
    return q, s.squeeze(1)


def make_layer(K, N, E, topk, dev, gen):
    """Random FP8 weights w13 [E,2N,K], w2 [E,K,N] (row-major) and per-output-channel fp32 scales."""
    w13 = torch.empty(E, 2 * N, K, dtype=FP8, device=dev)
    w2 = torch.empty(E, K, N, dtype=FP8, device=dev)
    for e in range(E):  # one expert at a time keeps the fp32 temporaries small
        w13[e] = torch.randn(2 * N, K, device=dev, generator=gen).to(FP8)
        w2[e] = torch.randn(K, N, device=dev, generator=gen).to(FP8)
    w13_s = (torch.rand(E, 2 * N, device=dev, generator=gen) + 0.5) / math.sqrt(K)
    w2_s = (torch.rand(E, K, device=dev, generator=gen) + 0.5) / math.sqrt(N)
    return dict(K=K, N=N, E=E, topk=topk, w13=w13, w2=w2, w13_s=w13_s, w2_s=w2_s)


def make_inputs(L, M, dev, gen):
    """x [M,K] bf16 and routing from random logits: softmax (fp32), topk, renormalize."""
    x = torch.randn(M, L["K"], device=dev, generator=gen).to(torch.bfloat16)
    logits = torch.randn(M, L["E"], device=dev, generator=gen)
    tw, ids = torch.topk(torch.softmax(logits, dim=-1), L["topk"], dim=-1)
    return x, ids, (tw / tw.sum(dim=-1, keepdim=True)).float()


def grouped_gemm(a, w, a_s, w_s, offs, ends_host):
    """out[r] = (a[r] * a_s[r]) @ (w[e] * w_s[e][:, None]).T for the rows r of group e, bf16.
    a: fp8 [R, Kin] row-major; w: fp8 [E, Nout, Kin] row-major; a_s [R]; w_s [E, Nout];
    offs: int32 [E] cumulative group ends on the device. Rows past offs[-1] are left unwritten."""
    if ends_host is None:
        # mat2 must be "transposed" (column-major [E, Kin, Nout]): the view w.transpose(-2, -1).
        return torch._scaled_grouped_mm(a, w.transpose(-2, -1), a_s, w_s, offs=offs, out_dtype=torch.bfloat16)
    # fallback: one row-wise torch._scaled_mm per non-empty expert (needs the ends on the host)
    out = torch.zeros(a.shape[0], w.shape[1], dtype=torch.bfloat16, device=a.device)
    start = 0
    for e, end in enumerate(ends_host):
        if end > start:
            out[start:end] = torch._scaled_mm(a[start:end], w[e].t(), a_s[start:end].unsqueeze(1),
                                              w_s[e].unsqueeze(0), out_dtype=torch.bfloat16)
        start = end
    return out


def moe_forward(x, ids, tw, L, fallback=False):
    """The whole layer; no host sync unless fallback. Shapes depend only on M (graph-capturable)."""
    M, K = x.shape
    E, topk, N = L["E"], L["topk"], L["N"]
    dev = x.device
    T = M * topk
    R = T + (PAD - 1) * E  # static upper bound of the padded row count
    # routing metadata: sort the (token, slot) pairs by expert, count, pad each group to PAD rows
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                 # pair indices in expert order
    sorted_e = flat[order]
    ends = torch.searchsorted(sorted_e, torch.arange(E, device=dev, dtype=sorted_e.dtype), right=True)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    pcounts = (counts + PAD - 1) // PAD * PAD
    pends = torch.cumsum(pcounts, 0)
    rank = torch.arange(T, device=dev) - (ends - counts)[sorted_e]   # position inside its expert
    dest = (pends - pcounts)[sorted_e] + rank                         # padded row of each sorted pair
    row_of = torch.empty_like(dest).scatter_(0, order, dest)          # (token, slot) -> padded row
    offs = pends.to(torch.int32)
    ends_host = pends.tolist() if fallback else None                  # fallback only: host sync
    # per-token quantization once, then gather rows (as bytes) into the padded expert-major buffer
    xq, xs = quant_rows(x.float())
    tok = order // topk
    a_q = torch.zeros(R, K, dtype=torch.uint8, device=dev)            # padding rows: fp8 zeros
    a_q.index_copy_(0, dest, xq.view(torch.uint8).index_select(0, tok))
    a_s = torch.ones(R, dtype=torch.float32, device=dev)
    a_s.index_copy_(0, dest, xs.index_select(0, tok))
    y1 = grouped_gemm(a_q.view(FP8), L["w13"], a_s, L["w13_s"], offs, ends_host)  # [R, 2N] bf16
    h = F.silu(y1[:, :N].float()) * y1[:, N:].float()                 # SwiGLU in fp32
    hq, hs = quant_rows(h)                                            # rows past offs[-1]: unused
    y2 = grouped_gemm(hq, L["w2"], hs, L["w2_s"], offs, ends_host)    # [R, K] bf16
    contrib = y2.index_select(0, row_of).float() * tw.reshape(-1, 1)  # [T, K], (token, slot) order
    out = torch.zeros(M, K, dtype=torch.float32, device=dev)
    out.index_add_(0, torch.arange(T, device=dev) // topk, contrib)
    return out.to(torch.bfloat16)


def reference(x, ids, tw, L):
    """fp32 reference on the dequantized tensors, same per-token activation quantization (moe.md s1)."""
    N = L["N"]
    xq, xs = quant_rows(x.float())
    xd = xq.float() * xs[:, None]
    out = torch.zeros(x.shape[0], L["K"], dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        gu = xd[t] @ (L["w13"][e].float() * L["w13_s"][e][:, None]).t()
        hq, hs = quant_rows(F.silu(gu[:, :N]) * gu[:, N:])
        y = (hq.float() * hs[:, None]) @ (L["w2"][e].float() * L["w2_s"][e][:, None]).t()
        out.index_add_(0, t, y * tw[t, j][:, None])
    return out


def rel_l2(got, ref):
    return ((got.float() - ref).norm() / ref.norm()).item()


def validate(L, dev, gen, fallback):
    x, ids, tw = make_inputs(L, VAL_M, dev, gen)
    return rel_l2(moe_forward(x, ids, tw, L, fallback), reference(x, ids, tw, L))


# ----------------------------------------------------------------------------- benchmark
def graph_us(sets, L, reps):
    """Capture the whole forward once per input set (shared memory pool), time the replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs recommends
        for x, ids, tw in sets:
            moe_forward(x, ids, tw, L)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    graphs, outs = [], []
    for x, ids, tw in sets:  # replayed in capture order, never concurrently: sharing the pool is safe
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            outs.append(moe_forward(x, ids, tw, L))
        graphs.append(g)
    torch.cuda.synchronize()
    t = time_us([g.replay for g in graphs], warmup=3, reps=reps)
    del graphs, outs
    return t


def bench_preset(name, ms, dev, reps, nsets):
    cfg = PRESETS[name]
    K, N, E, topk = cfg["K"], cfg["N"], cfg["E"], cfg["topk"]
    gen = torch.Generator(device=dev)
    gen.manual_seed(1234)
    L = make_layer(K, N, E, topk, dev, gen)
    val = {}  # fallback flag -> (rel L2, None) when usable, else (rel L2 or None, reason)

    def usable(fb):  # validate each implementation once, lazily: a broken peer is never timed
        if fb not in val:
            kind = "fallback" if fb else "grouped"
            try:
                r = validate(L, dev, gen, fb)
                log(f"{name}: {kind} validation rel L2 = {r:.4g} at M={VAL_M}")
                val[fb] = (r, None if r < VAL_TOL else f"{kind} validation failed: rel L2 {r:.4g} >= {VAL_TOL}")
            except Exception as e:
                val[fb] = (None, f"{kind}: {type(e).__name__}: {str(e)[:400]}")
            torch.cuda.empty_cache()
            if val[fb][1]:
                log(f"{name}: {val[fb][1]}")
        return val[fb][1] is None

    modes = [False, True] if hasattr(torch, "_scaled_grouped_mm") else [True]
    rows = []
    for M in ms:
        ent = dict(preset=name, m=M, eager_us=None, graph_us=None, flops=6 * M * topk * K * N, touched_bytes=None)
        errors = [] if modes[0] is False else ["torch._scaled_grouped_mm missing"]
        try:
            sets = [make_inputs(L, M, dev, gen) for _ in range(nsets)]
            touched = [torch.unique(ids).numel() for _, ids, _ in sets]  # host sync, outside timing
            ent["touched_bytes"] = int(round(statistics.mean(touched))) * 3 * K * N
            for fb in modes:  # grouped first; the per-expert fallback only if grouped is unusable here
                kind = "fallback" if fb else "grouped"
                if not usable(fb):
                    errors.append(val[fb][1])
                    continue
                fns = [lambda s=s: moe_forward(*s, L, fb) for s in sets]
                try:
                    ent["eager_us"], ent["eager_min_us"], ent["eager_max_us"] = time_us(fns, warmup=5, reps=reps)
                except Exception as e:
                    errors.append(f"{kind} at M={M}: {type(e).__name__}: {str(e)[:400]}")
                    torch.cuda.empty_cache()
                    continue
                ent.update(impl=kind, fallback=fb, val_rel_l2=val[fb][0])
                if not fb:
                    try:
                        ent["graph_us"], ent["graph_min_us"], ent["graph_max_us"] = graph_us(sets, L, reps)
                    except Exception as e:
                        ent["graph_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                        try:
                            torch.cuda.synchronize()
                        except Exception:
                            pass
                break
            del sets
        except Exception as e:  # e.g. out of memory while making inputs
            errors.append(f"{type(e).__name__}: {str(e)[:400]}")
            log(traceback.format_exc(limit=3))
        if errors:
            ent["error" if ent["eager_us"] is None else "grouped_error"] = "; ".join(errors)
        torch.cuda.empty_cache()
        rows.append(ent)
        g = f"{ent['graph_us']:.1f}" if ent["graph_us"] else "-"
        e_ = f"{ent['eager_us']:.1f}" if ent["eager_us"] else "-"
        log(f"{name:>18} M={M:<5} eager {e_:>9} us  graph {g:>9} us  {ent.get('impl', '')} "
            f"{ent.get('error', '')}{ent.get('graph_error', '')}")
    del L
    torch.cuda.empty_cache()
    return rows


MM_SHAPES = [(8192, 8192, 8192), (4096, 7168, 16384)] + [(m, 7168, 7168) for m in (1, 16, 64, 128)]


def sustained_us(replay, seconds):
    """Mean time per call over `seconds` of back-to-back replays (20 per synchronize): the rate once the
    GPU sits at its power cap, which a median of short bursts does not see."""
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            replay()
        torch.cuda.synchronize()
        n += 20
    return (time.perf_counter() - t0) / n * 1e6


def scaled_mm_graph(M, N, K, dev):
    """A CUDA graph of one cuBLAS FP8 GEMM [M, K] x [K, N] (torch._scaled_mm, row-wise scales, bf16 out) on random
    operands; returns the graph and its operands (which must outlive the graph's replays)."""
    a = torch.randn(M, K, device=dev).to(FP8)
    b = torch.randn(N, K, device=dev).to(FP8)
    sa, sb = torch.rand(M, 1, device=dev) + 0.5, torch.rand(1, N, device=dev) + 0.5
    fn = lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16)
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g, (a, b, sa, sb)


def mm_peer(dev, reps, sustain=0.0):
    """cuBLAS FP8 GEMM (torch._scaled_mm, row-wise scales, bf16 out) at the fp8_scaled_mm target shapes,
    timed as CUDA-graph replays. Per-token activation quantization is not included (the op's x is fp8).
    With sustain > 0, the shapes with M >= 4096 also get sustained_us over that many seconds."""
    rows = []
    for M, N, K in MM_SHAPES:
        g, operands = scaled_mm_graph(M, N, K, dev)
        us = time_us([g.replay], reps=reps)[0]
        rows.append(dict(m=M, n=N, k=K, us=us, tflops=2 * M * N * K / us / 1e6))
        if sustain > 0 and M >= 4096:
            rows[-1]["us_sustained"] = sustained_us(g.replay, sustain)
        log(f"mm peer {M}x{N}x{K}: {us:.1f} us" + (f", sustained {rows[-1]['us_sustained']:.1f} us" if "us_sustained" in rows[-1] else ""))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--m", default="1,16,128,1024,4096")
    ap.add_argument("--quick", action="store_true", help="qwen3-30b-a3b at M in {1,128} only (smoke test)")
    ap.add_argument("--sustain", type=float, default=0.0,
                    help="seconds of back-to-back replays for the large fp8_scaled_mm shapes (the power-capped rate)")
    args = ap.parse_args()
    presets = ["qwen3-30b-a3b"] if args.quick else [p for p in args.presets.split(",") if p]
    ms = [1, 128] if args.quick else [int(v) for v in args.m.split(",") if v]
    bad = [p for p in presets if p not in PRESETS]
    if bad:
        ap.error(f"unknown presets {bad}; known: {list(PRESETS)}")
    if not torch.cuda.is_available():
        sys.exit("torch_moe.py needs a CUDA device")
    torch.set_float32_matmul_precision("highest")  # the fp32 reference must not use TF32
    dev = torch.device("cuda")
    reps = 10 if args.quick else 30
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__)
    res["ceilings"] = ceilings(dev, 20)
    log("ceilings: " + ", ".join(f"{k} {v:.3g}" if v else f"{k} -" for k, v in res["ceilings"].items()))
    try:
        res["mm"] = mm_peer(dev, 20, args.sustain)
    except Exception as e:  # the MoE peer still runs
        log(f"mm peer failed: {e}")
    res["peer"] = []
    with open(args.out, "w") as f:  # the ceilings and mm peers alone (--presets "")
        json.dump(res, f, indent=1)
    for p in presets:
        res["peer"] += bench_preset(p, ms, dev, reps, nsets=3)
        with open(args.out, "w") as f:  # rewrite after each preset so a crash keeps what was measured
            json.dump(res, f, indent=1)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
