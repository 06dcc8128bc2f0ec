// Test helper: writes small safetensors files, and whole FP8 MoE checkpoints in the DeepSeek-V3,
// Qwen3-MoE and Mixtral namings (optionally sharded with an index json), keeping every array it
// wrote so a test can compare what a loader produced element by element.
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { CheckpointFormat } from "../core/checkpoints.ts";
import { fp8Weights, Rng } from "./helpers.ts";

/** One tensor as the file stores it: a safetensors dtype, a shape, little-endian bytes. */
export interface RawTensor {
  dtype: string;
  shape: number[];
  bytes: Uint8Array;
}

/** A RawTensor viewing a typed array's bytes (no copy). */
export const raw = (dtype: string, shape: number[], data: ArrayBufferView): RawTensor => ({
  dtype,
  shape,
  bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength),
});

const made: string[] = [];
/** A fresh temporary folder, removed by removeTempDirs. */
export function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "moeffi-ckpt-"));
  made.push(dir);
  return dir;
}

/** Removes every folder tempDir made (call it from an after() hook). */
export function removeTempDirs(): void {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
}

/** A file from a header (an object, or any string, to write headers that lie) and a data section. */
export function encodeRaw(header: unknown, data: Uint8Array): Uint8Array {
  let json = typeof header === "string" ? header : JSON.stringify(header);
  // Writers pad the header with spaces to 8 bytes, so the data section is aligned.
  json += " ".repeat((8 - (new TextEncoder().encode(json).length % 8)) % 8);
  const head = new TextEncoder().encode(json);
  const out = new Uint8Array(8 + head.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.length), true);
  out.set(head, 8);
  out.set(data, 8 + head.length);
  return out;
}

/** A valid safetensors file: tensors laid out back to back in the given order. */
export function encodeSafetensors(tensors: Iterable<[string, RawTensor]>, metadata?: Record<string, string>): Uint8Array {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {};
  const parts: Uint8Array[] = [];
  let offset = 0;
  for (const [name, t] of tensors) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    parts.push(t.bytes);
    offset += t.bytes.length;
  }
  const data = new Uint8Array(offset);
  let at = 0;
  for (const p of parts) data.set(p, at), (at += p.length);
  return encodeRaw(header, data);
}

/** Writes encodeSafetensors(...) to `path`. */
export function writeSafetensors(
  path: string,
  tensors: Iterable<[string, RawTensor]>,
  metadata?: Record<string, string>,
): string {
  writeFileSync(path, encodeSafetensors(tensors, metadata));
  return path;
}

/** What one expert was written with. Scales are as stored: 1 value, or one per row (Mixtral), or blocks. */
export interface ExpertSource {
  gate: Uint8Array; // fp8 [N, K]
  up: Uint8Array; // fp8 [N, K]
  down: Uint8Array; // fp8 [K, N]
  gateScale: Float32Array;
  upScale: Float32Array;
  downScale: Float32Array;
  /** Mixtral static input scales (gate, up, down). */
  input?: [number, number, number];
}

/** A checkpoint on disk and everything that went into it. */
export interface WrittenCheckpoint {
  /** The folder (holding model.safetensors or the index and shards). */
  dir: string;
  format: CheckpointFormat;
  layer: number;
  experts: number;
  hidden: number; // K
  intermediate: number; // N
  source: ExpertSource[];
  /** Every tensor written, by name (after tamper). */
  tensors: Map<string, RawTensor>;
}

/** What writeMoeCheckpoint writes. */
export interface WriteOptions {
  format: CheckpointFormat;
  experts: number;
  hidden: number;
  intermediate: number;
  seed: number;
  /** The MoE layer's index (default 1: layer 0 is dense, as DeepSeek-V3's first layers are). */
  layer?: number;
  /** 2: split over two shard files and model.safetensors.index.json. */
  shards?: 1 | 2;
  /** Mixtral: write input_scale for every matrix (default true). */
  staticInput?: boolean;
  /** Edits the tensors before they are written (to make broken checkpoints). */
  tamper?: (tensors: Map<string, RawTensor>) => void;
}

const EXPERTS: Record<CheckpointFormat, { experts: string; gate: string; up: string; down: string }> = {
  "deepseek-v3": { experts: "mlp.experts", gate: "gate_proj", up: "up_proj", down: "down_proj" },
  "qwen3-moe": { experts: "mlp.experts", gate: "gate_proj", up: "up_proj", down: "down_proj" },
  mixtral: { experts: "block_sparse_moe.experts", gate: "w1", up: "w3", down: "w2" },
};

const cdiv = (a: number, b: number) => Math.ceil(a / b);
const bf16Noise = (r: Rng, n: number) => Uint16Array.from({ length: n }, () => 0x3c00 + r.int(0, 0x7ff));

/** Scales as Mixtral checkpoints store them: shape [] or [1] (expert e % 3 = 0, 1), or one per row (e % 3 = 2). */
function mixtralScale(r: Rng, e: number, rows: number): { shape: number[]; v: Float32Array } {
  if (e % 3 === 2) return { shape: [rows], v: r.scales(rows, 1 / 2048) };
  return { shape: e % 3 === 0 ? [] : [1], v: r.scales(1, 1 / 2048) };
}

/** One expert's tensors under `base` (model.layers.L.<experts>.e), and what they hold. */
function writeExpert(r: Rng, o: WriteOptions, e: number, base: string, out: Map<string, RawTensor>): ExpertSource {
  const { hidden: k, intermediate: n } = o, names = EXPERTS[o.format];
  const src: ExpertSource = {
    gate: fp8Weights(r, n * k),
    up: fp8Weights(r, n * k),
    down: fp8Weights(r, k * n),
    gateScale: new Float32Array(0),
    upScale: new Float32Array(0),
    downScale: new Float32Array(0),
  };
  const mats = [[names.gate, src.gate, [n, k], "gateScale"], [names.up, src.up, [n, k], "upScale"], [
    names.down,
    src.down,
    [k, n],
    "downScale",
  ]] as const;
  for (const [proj, w, [rows, cols], key] of mats) {
    out.set(`${base}.${proj}.weight`, raw("F8_E4M3", [rows, cols], w));
    if (o.format === "mixtral") {
      const s = mixtralScale(r, e, rows);
      src[key] = s.v;
      out.set(`${base}.${proj}.weight_scale`, raw("F32", s.shape, s.v));
    } else {
      const shape = [cdiv(rows, 128), cdiv(cols, 128)];
      src[key] = r.scales(shape[0] * shape[1], 1 / 2048);
      out.set(`${base}.${proj}.weight_scale_inv`, raw("F32", shape, src[key]));
    }
  }
  if (o.format === "mixtral" && (o.staticInput ?? true)) {
    src.input = [0, 1, 2].map(() => 4 / 448 * 2 ** (r.next() * 2 - 1)) as [number, number, number];
    mats.forEach(([proj], i) => out.set(`${base}.${proj}.input_scale`, raw("F32", [], Float32Array.of(src.input![i]))));
  }
  return src;
}

/** The tensors around the experts that real checkpoints have (and the format detection looks at). */
function writeSurroundings(r: Rng, o: WriteOptions, layer: number, out: Map<string, RawTensor>) {
  const { hidden: k, intermediate: n, experts: e } = o;
  out.set("model.embed_tokens.weight", raw("BF16", [8, k], bf16Noise(r, 8 * k)));
  if (layer > 0 && o.format !== "mixtral") {
    // a dense first layer, FP8 like DeepSeek-V3's
    out.set("model.layers.0.mlp.gate_proj.weight", raw("F8_E4M3", [n, k], fp8Weights(r, n * k)));
    out.set(
      "model.layers.0.mlp.gate_proj.weight_scale_inv",
      raw("F32", [cdiv(n, 128), cdiv(k, 128)], r.scales(cdiv(n, 128) * cdiv(k, 128), 1)),
    );
  }
  const router = o.format === "mixtral" ? "block_sparse_moe.gate" : "mlp.gate";
  out.set(`model.layers.${layer}.${router}.weight`, raw("BF16", [e, k], bf16Noise(r, e * k)));
  if (o.format === "deepseek-v3") {
    out.set(`model.layers.${layer}.mlp.gate.e_score_correction_bias`, raw("F32", [e], new Float32Array(e)));
    out.set(`model.layers.${layer}.mlp.shared_experts.down_proj.weight`, raw("F8_E4M3", [k, n], fp8Weights(r, k * n)));
  }
}

/** Writes a one-MoE-layer checkpoint in `o.format` into a fresh temp folder. */
export function writeMoeCheckpoint(o: WriteOptions): WrittenCheckpoint {
  const r = new Rng(o.seed), layer = o.layer ?? 1, dir = tempDir();
  const tensors = new Map<string, RawTensor>();
  writeSurroundings(r, o, layer, tensors);
  const source = Array.from(
    { length: o.experts },
    (_, e) => writeExpert(r, o, e, `model.layers.${layer}.${EXPERTS[o.format].experts}.${e}`, tensors),
  );
  o.tamper?.(tensors);
  const entries = [...tensors];
  if ((o.shards ?? 1) === 1) {
    writeSafetensors(join(dir, "model.safetensors"), entries, { format: "pt" });
  } else {
    // Half the tensors in each shard, so one layer's experts are split across files.
    const half = Math.ceil(entries.length / 2), files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"];
    writeSafetensors(join(dir, files[0]), entries.slice(0, half));
    writeSafetensors(join(dir, files[1]), entries.slice(half));
    const weight_map = Object.fromEntries(entries.map(([name], i) => [name, files[i < half ? 0 : 1]]));
    const total_size = entries.reduce((s, [, t]) => s + t.bytes.length, 0);
    writeFileSync(join(dir, "model.safetensors.index.json"), JSON.stringify({ metadata: { total_size }, weight_map }, null, 2));
  }
  return { dir, format: o.format, layer, experts: o.experts, hidden: o.hidden, intermediate: o.intermediate, source, tensors };
}
