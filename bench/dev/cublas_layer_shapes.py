"""cuBLAS FP8 (torch._scaled_mm, row-wise scales, bf16 out) on the MoE presets' GEMM shapes at prefill sizes, against
its own 8192^3 rate in the same run: how close the vendor library gets to the issue's prefill bar (GEMM FLOPs / time as
a share of the 8192^3 rate) on these K and N, without expert boundaries. For each preset and M: the dense equivalent of
GEMM 1 ([M * topk, K] x [K, 2N]) and GEMM 2 ([M * topk, N] x [N, K]), i.e. all routed rows against one weight matrix
(an optimistic bound for a grouped kernel: same FLOPs, no per-expert tails, no routing, quantization or combine), and
the per-expert shapes under uniform routing ([M * topk / E, K] x [K, 2N] and the GEMM 2 one) timed alone (CUDA-graph
replays, median of 30: bench/peers/torch_moe.py's timing).
Device only: python3 bench/dev/cublas_layer_shapes.py [--m 4096,1024] > shapes.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "peers"))
from torch_moe import PRESETS, scaled_mm_graph, time_us  # noqa: E402


def gemm_us(m, n, k, dev):
    try:
        g, operands = scaled_mm_graph(m, n, k, dev)
        return time_us([g.replay], reps=30)[0]
    except Exception as e:  # a shape cuBLAS refuses is reported, not fatal
        print(f"{m}x{n}x{k}: {e}", file=sys.stderr)
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="4096,1024")
    args = ap.parse_args()
    dev = torch.device("cuda:0")
    ref_us = gemm_us(8192, 8192, 8192, dev)
    ref = 2 * 8192 ** 3 / ref_us / 1e6
    out = {"gpu": torch.cuda.get_device_name(0), "ref_8192_tflops": ref, "rows": []}
    print(f"{out['gpu']}: cuBLAS FP8 row-wise 8192^3 {ref:.0f} TFLOP/s", file=sys.stderr)
    for name, cfg in PRESETS.items():
        K, N, E, topk = cfg["K"], cfg["N"], cfg["E"], cfg["topk"]
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
