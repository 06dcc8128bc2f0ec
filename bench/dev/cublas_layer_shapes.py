"""cuBLAS FP8 (torch._scaled_mm, row-wise scales, bf16 out) on the MoE presets' GEMM shapes at prefill sizes, against
its own 8192^3 rate in the same run: how close the vendor library gets to the issue's prefill bar (GEMM FLOPs / time as
a share of the 8192^3 rate) on these K and N, without expert boundaries. For each preset and M: the dense equivalent of
GEMM 1 ([M * topk, K] x [K, 2N]) and GEMM 2 ([M * topk, N] x [N, K]), i.e. all routed rows against one weight matrix
(an optimistic bound for a grouped kernel: same FLOPs, no per-expert tails, no routing, quantization or combine), and
the per-expert shapes under uniform routing ([M * topk / E, K] x [K, 2N] and the GEMM 2 one) timed alone. CUDA-graph
replays, median of 30. Device only: python3 bench/dev/cublas_layer_shapes.py [--m 4096,1024] > shapes.json
"""
import argparse
import json
import statistics
import sys

import torch

FP8 = torch.float8_e4m3fn
PRESETS = {  # bench/presets.ts
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "deepseek-v3-ep8": (7168, 2048, 32, 8),
    "qwen1.5-moe-a2.7b": (2048, 1408, 60, 4),
}


def gemm_us(m, n, k, dev, reps=30):
    a = torch.randn(m, k, device=dev).to(FP8)
    b = torch.randn(n, k, device=dev).to(FP8)
    sa, sb = torch.rand(m, 1, device=dev) + 0.5, torch.rand(1, n, device=dev) + 0.5
    fn = lambda: torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16)
    fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        g.replay()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="4096,1024")
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    ref_us = gemm_us(8192, 8192, 8192, dev)
    ref = 2 * 8192 ** 3 / ref_us / 1e6
    out = {"gpu": torch.cuda.get_device_name(0), "ref_8192_tflops": ref, "rows": []}
    print(f"{out['gpu']}: cuBLAS FP8 row-wise 8192^3 {ref:.0f} TFLOP/s", file=sys.stderr)
    for name, (K, N, E, topk) in PRESETS.items():
        for M in map(int, args.m.split(",")):
            P, r = M * topk, max(1, M * topk // E)
            shapes = {"dense1": (P, 2 * N, K), "dense2": (P, K, N), "expert1": (r, 2 * N, K), "expert2": (r, K, N)}
            us = {key: gemm_us(m, n, k, dev) for key, (m, n, k) in shapes.items()}
            fl = {key: 2 * m * n * k for key, (m, n, k) in shapes.items()}
            row = {"preset": name, "m": M, "rows_per_expert": r}
            for key in shapes:
                row[key] = {"us": us[key], "share": fl[key] / us[key] / 1e6 / ref}
            row["dense_layer_share"] = (fl["dense1"] + fl["dense2"]) / (us["dense1"] + us["dense2"]) / 1e6 / ref
            row["expert_layer_share"] = (fl["expert1"] + fl["expert2"]) / (us["expert1"] + us["expert2"]) / 1e6 / ref
            out["rows"].append(row)
            print(f"{name} M={M}: dense GEMMs {row['dense1']['share']:.2f} / {row['dense2']['share']:.2f} "
                  f"(layer {row['dense_layer_share']:.2f}), one expert's ({r} rows) {row['expert1']['share']:.2f} / "
                  f"{row['expert2']['share']:.2f} of the 8192^3 rate", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
