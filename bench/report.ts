// Renders a GPU benchmark report (JSON) as a markdown table and an SVG chart of time against M.
// bench/gpu.ts calls it; `deno run -A bench/report.ts bench/results/<gpu>.json` re-renders a saved one.
import { readFileSync, writeFileSync } from "node:fs";

export interface Peer {
  gpu: string;
  ceilings: { copy_tb_s: number; fp8_gemm_tflops_rowwise: number; fp8_gemm_tflops_per_tensor: number };
  peer: { preset: string; m: number; eager_us: number; graph_us: number | null; error?: string }[];
}
export interface Row {
  preset: string;
  m: number;
  backend: string;
  us: number;
  spread: number;
  tflops: number;
  tbs: number;
  floor_us?: number;
  of_floor?: number;
  peer_us?: number;
  vs_peer?: number;
}
export interface Report {
  date: string;
  gpu: string;
  capability: number[];
  scheme: string[];
  reps: number;
  sets?: number;
  ceilings?: Peer["ceilings"];
  peer?: Peer["peer"];
  rows: Row[];
}

/** Writes base.json, base.md and base.svg; returns the markdown. */
export function writeReport(report: Report, base: string): string {
  writeFileSync(`${base}.json`, JSON.stringify(report, null, 2) + "\n");
  const md = markdown(report);
  writeFileSync(`${base}.md`, md + "\n");
  writeFileSync(`${base}.svg`, chart(report));
  return md;
}

function markdown({ gpu, date, ceilings, scheme, reps, sets, rows }: Report): string {
  return [
    `# moeffi on ${gpu} (${date.slice(0, 10)})`,
    "",
    ceilings
      ? `Ceilings in the same run: copy ${ceilings.copy_tb_s.toFixed(2)} TB/s, cuBLAS FP8 8192^3 ${
        ceilings.fp8_gemm_tflops_rowwise.toFixed(0)
      } TFLOP/s (row-wise scales), ${ceilings.fp8_gemm_tflops_per_tensor.toFixed(0)} (per-tensor).`
      : "No peer/ceiling file was given.",
    `Scheme ${
      scheme.join(" weights, ")
    } activations. Time = median device time of one whole forward (CUDA events, ${reps} reps, ${
      sets ?? 3
    } input sets). TB/s counts the touched experts' fp8 weight bytes once; floor = max(FLOPs / FP8 GEMM rate, bytes / copy bandwidth).`,
    "",
    "| preset | M | backend | time (us) | TFLOP/s | TB/s | floor (us) | floor / time | peer (us) | peer / time |",
    "|---|---|---|---|---|---|---|---|---|---|",
    ...rows.map((r) =>
      `| ${r.preset} | ${r.m} | ${r.backend} | ${r.us} | ${r.tflops} | ${r.tbs} | ${r.floor_us ?? "-"} | ${r.of_floor ?? "-"} | ${
        r.peer_us ?? "-"
      } | ${r.vs_peer ?? "-"} |`
    ),
  ].join("\n");
}

/** Log-log time against M, one panel per preset, one line per backend plus the peer. */
function chart({ rows, peer }: Report): string {
  const W = 340, H = 230, L = 58, R = 12, T = 40, B = 30;
  const presets = [...new Set(rows.map((r) => r.preset))], ms = [...new Set(rows.map((r) => r.m))].sort((a, b) => a - b);
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
  const lx = Math.log10;
  const panels = presets.map((name, pi) => {
    const series: Record<string, [number, number][]> = {};
    for (const r of rows.filter((r) => r.preset === name)) (series[r.backend] ??= []).push([r.m, r.us]);
    for (const p of peer?.filter((p) => p.preset === name && !p.error) ?? []) {
      (series["pytorch peer"] ??= []).push([p.m, p.graph_us ?? p.eager_us]);
    }
    const ts = Object.values(series).flat().map((a) => a[1]);
    const [x0, x1] = [lx(ms[0]), lx(ms[ms.length - 1])],
      [y0, y1] = [Math.floor(lx(Math.min(...ts))), Math.ceil(lx(Math.max(...ts)))];
    const px = (m: number) => L + ((lx(m) - x0) / (x1 - x0 || 1)) * (W - L - R);
    const py = (t: number) => H - B - ((lx(t) - y0) / (y1 - y0 || 1)) * (H - B - T);
    const lines = Object.entries(series).map(([b, pts], i) =>
      `<polyline fill="none" stroke="${colors[i % colors.length]}" stroke-width="2" points="${
        pts.map(([m, t]) => `${px(m).toFixed(1)},${py(t).toFixed(1)}`).join(" ")
      }"/>` +
      `<text x="${L + 4 + 110 * i}" y="${T - 6}" font-size="10" fill="${colors[i % colors.length]}">${b}</text>`
    ).join("");
    const ticks = ms.map((m) =>
      `<text x="${px(m).toFixed(1)}" y="${H - B + 14}" font-size="9" text-anchor="middle">${m}</text>`
    ).join("") +
      Array.from({ length: y1 - y0 + 1 }, (_, i) =>
        `<text x="${L - 4}" y="${(py(10 ** (y0 + i)) + 3).toFixed(1)}" font-size="9" text-anchor="end">${10 ** (y0 + i)}</text>`)
        .join("");
    return `<g transform="translate(${(pi % 2) * W},${Math.floor(pi / 2) * H})"><rect x="${L}" y="${T}" width="${
      W - L - R
    }" height="${H - B - T}" fill="none" stroke="#ccc"/>` +
      `<text x="${L}" y="14" font-size="11" font-weight="bold">${name}: time (us) against M</text>${ticks}${lines}</g>`;
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${2 * W}" height="${
    Math.ceil(presets.length / 2) * H
  }" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>${panels.join("")}</svg>\n`;
}

if (import.meta.main) {
  const file = (globalThis as { process?: { argv: string[] } }).process?.argv.at(-1) ?? "";
  writeReport(JSON.parse(readFileSync(file, "utf8")), file.replace(/\.json$/, ""));
}
