#!/usr/bin/env python3
"""The bf16-dequant path that issue 6 measures batch_invariant_fp8 against, in stock PyTorch.

Usage: python3 bench/peers/torch_bf16_dequant.py --out bf16.json [--presets a,b] [--m 256,1024,4096] [--mm MxNxK,...]

FP8 weights (per-output-channel scales) turned into bf16, then cuBLAS bf16 GEMMs: the batch-invariant path vLLM PR
#40408 replaced. Two forms, both timed (CUDA graph when capture works, else eager; median of CUDA-event times):
  per_call:  every call dequantizes the weights it uses (w.to(bf16) * scale), then multiplies;
  stored:    the weights were dequantized once (twice the weight memory), each call only multiplies.
MoE layer: routing metadata on the device (argsort of the expert ids), x gathered per routed pair, torch._grouped_mm
(bf16, sm_90) for both GEMMs where it exists, else one torch.mm per expert (host sync, eager), SiLU(gate) * up in
bf16, weighted index_add_ combine in fp32. per_call dequantizes every expert's weights each call. Linear: x @ W.T.
"""
import argparse, json, statistics, sys, traceback

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
PRESETS = {  # moe.md section 9: hidden K, expert intermediate N, experts E, top-k (bench/presets.ts)
    "mixtral-8x7b": dict(K=4096, N=14336, E=8, topk=2),
    "qwen3-30b-a3b": dict(K=2048, N=768, E=128, topk=8),
    "deepseek-v3-ep8": dict(K=7168, N=2048, E=32, topk=8),
    "qwen1.5-moe-a2.7b": dict(K=2048, N=1408, E=60, topk=4),
}
MM_SHAPES = "256x1024x2048,1024x1024x2048,4096x1024x2048,256x4608x4096,1024x4608x4096,4096x4608x4096," \
            "256x7168x7168,1024x7168x7168,4096x7168x7168"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def time_us(fn, warmup=3, reps=20):
    """Median microseconds of fn() between CUDA events, as a CUDA graph when it captures, else eager."""
    try:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run, how = g.replay, "graph"
    except Exception:  # host syncs (the per-expert loop) cannot be captured
        torch.cuda.synchronize()
        run, how = fn, "eager"
    times = []
    for i in range(warmup + reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b) * 1000)
    return statistics.median(times), how


def fp8_weights(shape, dev):
    return (torch.randn(shape, device=dev) * 64).clamp(-448, 448).to(FP8)


def dequant(w, s):  # w fp8 [..., rows, cols], s fp32 [..., rows]
    return w.to(torch.bfloat16) * s.unsqueeze(-1).to(torch.bfloat16)


def grouped(x, w, offs, ends):
    """x [R, K] bf16 in expert order, w [E, n, K] bf16 -> [R, n]."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    out, start = x.new_empty(x.shape[0], w.shape[1]), 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e].t()
        start = end
    return out


def moe(preset, m, dev):
    p = PRESETS[preset]
    K, N, E, topk = p["K"], p["N"], p["E"], p["topk"]
    w13, w2 = fp8_weights((E, 2 * N, K), dev), fp8_weights((E, K, N), dev)
    s13, s2 = torch.rand(E, 2 * N, device=dev) / 512 + 1e-4, torch.rand(E, K, device=dev) / 512 + 1e-4
    x = torch.randn(m, K, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, E, (m, topk), device=dev, dtype=torch.int32)
    tw = torch.rand(m, topk, device=dev)
    stored = (dequant(w13, s13), dequant(w2, s2))

    def layer(weights):
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, device=dev, dtype=torch.int64).scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
        offs = torch.cumsum(counts, 0).to(torch.int32)
        a = x[order // topk]
        y1 = grouped(a, weights[0], offs, offs)
        h = F.silu(y1[:, :N]) * y1[:, N:]
        y2 = grouped(h, weights[1], offs, offs).float() * tw.flatten()[order].unsqueeze(1)
        return torch.zeros(m, K, device=dev).index_add_(0, order // topk, y2).to(torch.bfloat16)

    per_call, how1 = time_us(lambda: layer((dequant(w13, s13), dequant(w2, s2))))
    kept, how2 = time_us(lambda: layer(stored))
    impl = "torch._grouped_mm" if hasattr(torch, "_grouped_mm") else "per-expert torch.mm"
    return dict(preset=preset, m=m, per_call_us=per_call, stored_us=kept, timing=f"{how1}/{how2}", impl=impl)


def mm(M, N, K, dev):
    w, s = fp8_weights((N, K), dev), torch.rand(N, device=dev) / 256 + 1e-4
    x, stored = torch.randn(M, K, device=dev, dtype=torch.bfloat16), dequant(w, s)
    per_call, how1 = time_us(lambda: x @ dequant(w, s).t())
    kept, how2 = time_us(lambda: x @ stored.t())
    return dict(m=M, n=N, k=K, per_call_us=per_call, stored_us=kept, timing=f"{how1}/{how2}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--m", default="256,1024,4096")
    ap.add_argument("--mm", default=MM_SHAPES, help="fp8_scaled_mm shapes, MxNxK")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, moe=[], mm=[])
    for preset in filter(None, args.presets.split(",")):
        for m in map(int, args.m.split(",")):
            try:
                res["moe"].append(moe(preset, m, dev))
            except Exception as e:
                traceback.print_exc()
                res["moe"].append(dict(preset=preset, m=m, error=f"{type(e).__name__}: {e}"))
            log(json.dumps(res["moe"][-1]))
            torch.cuda.empty_cache()
    for shape in filter(None, args.mm.split(",")):
        M, N, K = map(int, shape.split("x"))
        try:
            res["mm"].append(mm(M, N, K, dev))
        except Exception as e:
            traceback.print_exc()
            res["mm"].append(dict(m=M, n=N, k=K, error=f"{type(e).__name__}: {e}"))
        log(json.dumps(res["mm"][-1]))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
