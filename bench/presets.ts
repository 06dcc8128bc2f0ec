// The MoE layer shapes the GPU benchmark and `deno task tune` use (moe.md section 9): hidden size k,
// expert intermediate size n, experts, experts per token.
export const PRESETS: Record<string, { k: number; n: number; experts: number; topk: number }> = {
  "mixtral-8x7b": { k: 4096, n: 14336, experts: 8, topk: 2 },
  "qwen3-30b-a3b": { k: 2048, n: 768, experts: 128, topk: 8 },
  "deepseek-v3-ep8": { k: 7168, n: 2048, experts: 32, topk: 8 },
  "qwen1.5-moe-a2.7b": { k: 2048, n: 1408, experts: 60, topk: 4 },
};
