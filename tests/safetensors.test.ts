// The safetensors reader (core/safetensors.ts) and the FP8 checkpoint loaders (core/checkpoints.ts):
// round trips of every dtype, row slices that touch only their rows, each naming mapped to the
// canonical MoE layout element by element, a loaded layer computing bit-identically to one built
// from the same arrays, and a clear error for every way a file or checkpoint can be broken.
import { after, test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync, readFileSync, truncateSync, unlinkSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { Context } from "../core/context.ts";
import { MoeLayer } from "../core/ops.ts";
import { tensor } from "../core/tensor.ts";
import { fromBf16, toBf16 } from "../core/dtypes.ts";
import { type CheckpointFormat, loadMoeCheckpoint, openMoeCheckpoint } from "../core/checkpoints.ts";
import { CheckpointError, f16ToF32, openSafetensors, SafetensorsCheckpoint, SafetensorsFile } from "../core/safetensors.ts";
import { MoeffiError } from "../core/errors.ts";
import {
  encodeRaw,
  raw,
  type RawTensor,
  removeTempDirs,
  tempDir,
  writeMoeCheckpoint,
  type WriteOptions,
  writeSafetensors,
  type WrittenCheckpoint,
} from "./checkpoint_writer.ts";
import { firstDiff, fp8Weights, Rng, seed } from "./helpers.ts";

const SEED = seed();
console.log(`safetensors.test.ts: MOEFFI_TEST_SEED=${SEED}`);
const ctx = new Context({ device: "cpu" });
after(removeTempDirs);

/** Asserts that `fn` throws a CheckpointError (a MoeffiError) whose message matches every pattern. */
function throwsCheckpoint(fn: () => unknown, ...patterns: RegExp[]) {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof CheckpointError && e instanceof MoeffiError, `not a CheckpointError: ${e}`);
    for (const p of patterns) assert.match(e.message, p);
    return true;
  });
}

const sameArray = (got: ArrayLike<number>, want: ArrayLike<number>, what: string) => {
  const i = firstDiff(got, want);
  assert.equal(i, -1, `${what}: element ${i} is ${got[i]}, want ${want[i]} (lengths ${got.length}, ${want.length})`);
};

// ---- the reader ----

test("safetensors: every readable dtype round-trips, with metadata and an unreadable dtype alongside", () => {
  const r = new Rng(SEED);
  const fp8 = fp8Weights(r, 3 * 16), bf16 = toBf16(r.values(10)), f32 = r.values(6);
  const i32 = Int32Array.from({ length: 4 }, () => r.int(-1e9, 1e9)), u8 = Uint8Array.from({ length: 5 }, () => r.int(0, 255));
  const f16 = Uint16Array.of(0x3c00, 0xc000, 0x7bff, 0x0001, 0x8400, 0x3555, 0x0000);
  const path = writeSafetensors(join(tempDir(), "all.safetensors"), [
    ["fp8", raw("F8_E4M3", [3, 16], fp8)],
    ["bf16", raw("BF16", [2, 5], bf16)],
    ["f16", raw("F16", [7], f16)],
    ["f32", raw("F32", [2, 3], f32)],
    ["i32", raw("I32", [4], i32)],
    ["u8", raw("U8", [5], u8)],
    ["scalar", raw("F32", [], Float32Array.of(0.25))],
    ["empty", raw("F32", [0, 4], new Float32Array(0))],
    ["i64", raw("I64", [2], BigInt64Array.of(1n, 2n))],
  ], { format: "pt", note: "hello" });
  using f = new SafetensorsFile(path);
  assert.deepEqual(f.metadata, { format: "pt", note: "hello" });
  assert.deepEqual(f.names, ["fp8", "bf16", "f16", "f32", "i32", "u8", "scalar", "empty", "i64"]);
  const cases: [string, string, number[], ArrayLike<number>][] = [
    ["fp8", "fp8_e4m3", [3, 16], fp8],
    ["bf16", "bf16", [2, 5], bf16],
    ["f32", "f32", [2, 3], f32],
    ["i32", "i32", [4], i32],
    ["u8", "u8", [5], u8],
    ["scalar", "f32", [], [0.25]],
    ["empty", "f32", [0, 4], []],
    // F16 is widened to f32: 1, -2, 65504 (max), 2^-24 (smallest subnormal), -2^-14, 0x3555 = 0.333251953125, 0
    ["f16", "f32", [7], [1, -2, 65504, 2 ** -24, -(2 ** -14), 0.333251953125, 0]],
  ];
  for (const [name, dtype, shape, want] of cases) {
    const t = f.read(name);
    assert.equal(t.dtype, dtype, name);
    assert.deepEqual(t.shape, shape, name);
    sameArray(t.data, want, name);
  }
  assert.equal(f.info("f32").dtype, "F32");
  throwsCheckpoint(() => f.read("i64"), /all\.safetensors: tensor i64: dtype I64 is not readable/);
  throwsCheckpoint(() => f.read("nope"), /all\.safetensors: tensor nope: not found/);
  f[Symbol.dispose]();
  assert.throws(() => f.read("f32"), /used after dispose/);
});

test("safetensors: the f16 decoder is exact for all 65536 patterns", () => {
  const F16 = (globalThis as { Float16Array?: new (b: ArrayBuffer) => ArrayLike<number> }).Float16Array;
  const bits = Uint16Array.from({ length: 65536 }, (_, i) => i);
  // Independent check where the runtime has Float16Array; otherwise the definition of binary16.
  const want = F16 ? new F16(bits.buffer) : Array.from(bits, (h) => {
    const s = h >> 15 ? -1 : 1, e = (h >> 10) & 31, m = h & 1023;
    return e === 31 ? (m ? NaN : s * Infinity) : s * (e ? 2 ** (e - 15) * (1024 + m) / 1024 : m / 2 ** 24);
  });
  for (let h = 0; h < 65536; h++) {
    const got = f16ToF32(h);
    assert.ok(
      Object.is(got, want[h]) || (Number.isNaN(got) && Number.isNaN(want[h])),
      `0x${h.toString(16)}: ${got} vs ${want[h]}`,
    );
  }
  assert.ok(Object.is(f16ToF32(0x8000), -0));
});

test("safetensors: row slices read exactly their rows' bytes", () => {
  const r = new Rng(SEED + 1);
  const a = r.values(10 * 6), b = toBf16(r.values(9 * 4));
  const path = writeSafetensors(join(tempDir(), "rows.safetensors"), [["a", raw("F32", [10, 6], a)], [
    "b",
    raw("BF16", [9, 4], b),
  ]]);
  using f = new SafetensorsFile(path);
  for (const [s, e] of [[0, 10], [2, 5], [9, 10], [4, 4]]) {
    const t = f.readRows("a", s, e);
    assert.deepEqual(t.shape, [e - s, 6]);
    sameArray(t.data, a.subarray(s * 6, e * 6), `a rows [${s}, ${e})`);
  }
  // Garbage before rows 3..5 of b and the file cut right after them: a slice that strays reads garbage or fails.
  const info = f.info("b"), row = 4 * 2, end = info.start + 6 * row;
  truncateSync(path, end);
  const fd = openSync(path, "r+");
  const garbage = new Uint8Array(info.start + 3 * row - 8).fill(0xee);
  writeSync(fd, garbage, 0, garbage.length, 8);
  closeSync(fd);
  sameArray(f.readRows("b", 3, 6).data, b.subarray(12, 24), "b rows [3, 6) after the rest was overwritten");
  assert.notEqual(firstDiff(f.readRows("b", 0, 3).data, b.subarray(0, 12)), -1, "rows [0, 3) should read the garbage");
  throwsCheckpoint(() => f.readRows("b", 3, 7), /rows\.safetensors: unexpected end of file/);
  throwsCheckpoint(() => f.readRows("a", 5, 11), /tensor a: rows \[5, 11\) are not a range within its 10 rows/);
  throwsCheckpoint(() => f.readRows("a", 3, 2), /rows \[3, 2\)/);
});

test("safetensors: row slices of scalars are refused; readInto checks the destination size", () => {
  const path = writeSafetensors(join(tempDir(), "s.safetensors"), [["s", raw("F32", [], Float32Array.of(2))], [
    "m",
    raw("U8", [4, 2], new Uint8Array(8)),
  ]]);
  using f = new SafetensorsFile(path);
  throwsCheckpoint(() => f.readRows("s", 0, 1), /tensor s: is a scalar/);
  throwsCheckpoint(() => f.readInto("m", new Uint8Array(5)), /tensor m: destination holds 5 bytes, the read needs 8/);
  const dest = new Uint8Array(4);
  f.readInto("m", dest, 1, 3);
});

test("safetensors: a checkpoint opens from a file, a folder, or an index json, shards lazily", () => {
  const w = writeMoeCheckpoint({ format: "qwen3-moe", experts: 3, hidden: 64, intermediate: 128, seed: SEED, shards: 2 });
  for (const path of [w.dir, join(w.dir, "model.safetensors.index.json")]) {
    using ck = new SafetensorsCheckpoint(path);
    assert.equal(ck.files.length, 2);
    assert.deepEqual(new Set(ck.names), new Set(w.tensors.keys()));
    for (
      const name of ["model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"]
    ) {
      sameArray(new Uint8Array(ck.read(name).data.buffer), w.tensors.get(name)!.bytes, name);
    }
  }
  const single = writeMoeCheckpoint({ format: "mixtral", experts: 3, hidden: 32, intermediate: 16, seed: SEED });
  using ck = openSafetensors(join(single.dir, "model.safetensors"));
  assert.equal(ck.files.length, 1);
  throwsCheckpoint(() => new SafetensorsCheckpoint(join(single.dir, "nothing-here")), /nothing-here: no such file or folder/);
  throwsCheckpoint(() => new SafetensorsCheckpoint(tempDir()), /found no model\.safetensors\.index\.json/);
});

// ---- broken files ----

/** Writes bytes to a fresh file and opens it as safetensors. */
const openBytes = (bytes: Uint8Array, name = "bad.safetensors") => {
  const path = join(tempDir(), name);
  writeFileSync(path, bytes);
  return () => new SafetensorsFile(path)[Symbol.dispose]();
};
const f32Entry = (shape: number[], begin: number, end: number) => ({ dtype: "F32", shape, data_offsets: [begin, end] });

test("safetensors errors: truncated files", () => {
  const good = writeSafetensors(join(tempDir(), "t.safetensors"), [["w", raw("F32", [64], new Float32Array(64))]]);
  truncateSync(good, 100);
  throwsCheckpoint(
    () => new SafetensorsFile(good),
    /t\.safetensors: tensor w: data_offsets \[0, 256\] run past the end of the data section/,
    /truncated/,
  );
  truncateSync(good, 5);
  throwsCheckpoint(() => new SafetensorsFile(good), /t\.safetensors: file is 5 bytes, too short/);
  const long = encodeRaw({ w: f32Entry([1], 0, 4) }, new Uint8Array(4));
  new DataView(long.buffer).setBigUint64(0, 1n << 40n, true);
  throwsCheckpoint(openBytes(long), /header length 1099511627776 runs past the end of the file/);
});

test("safetensors errors: headers that are not JSON or not a header", () => {
  throwsCheckpoint(openBytes(encodeRaw("{not json", new Uint8Array(0))), /bad\.safetensors: header is not valid UTF-8 JSON/);
  throwsCheckpoint(openBytes(encodeRaw("[1, 2]", new Uint8Array(0))), /header is not a JSON object/);
  throwsCheckpoint(openBytes(encodeRaw({ w: 3 }, new Uint8Array(0))), /tensor w: header entry is not an object/);
  throwsCheckpoint(
    openBytes(encodeRaw({ w: { dtype: "F12", shape: [1], data_offsets: [0, 1] } }, new Uint8Array(1))),
    /tensor w: unknown dtype "F12"/,
  );
  throwsCheckpoint(
    openBytes(encodeRaw({ w: { dtype: "F32", shape: [-1], data_offsets: [0, 4] } }, new Uint8Array(4))),
    /tensor w: shape \[-1\] is not/,
  );
  throwsCheckpoint(
    openBytes(encodeRaw({ w: f32Entry([1], 4, 0) }, new Uint8Array(4))),
    /tensor w: data_offsets \[4,0\] are not \[begin, end\]/,
  );
  throwsCheckpoint(
    openBytes(encodeRaw({ __metadata__: { n: 1 } }, new Uint8Array(0))),
    /__metadata__ must map strings to strings/,
  );
});

test("safetensors errors: offsets that lie", () => {
  // past the end of the data section
  throwsCheckpoint(
    openBytes(encodeRaw({ w: f32Entry([4], 0, 16) }, new Uint8Array(8))),
    /tensor w: data_offsets \[0, 16\] run past the end of the data section \(8 bytes\)/,
  );
  // overlapping, in either header order
  const overlap = encodeRaw({ b: f32Entry([4], 8, 24), a: f32Entry([4], 0, 16) }, new Uint8Array(24));
  throwsCheckpoint(openBytes(overlap), /tensor b: its bytes .* overlap tensor a/);
  // a byte range that does not fit the shape
  throwsCheckpoint(
    openBytes(encodeRaw({ w: f32Entry([5], 0, 16) }, new Uint8Array(16))),
    /tensor w: data_offsets \[0, 16\] hold 16 bytes, but F32 \[5\] needs 20/,
  );
});

// ---- the loaders ----

/** The canonical weights, built directly from what the writer put in (the loaders' specification). */
function canonical(w: WrittenCheckpoint) {
  const { experts: e, hidden: k, intermediate: n, source } = w, nk = n * k;
  const w13 = new Uint8Array(e * 2 * nk), w2 = new Uint8Array(e * k * n);
  source.forEach((x, i) => (w13.set(x.gate, 2 * i * nk), w13.set(x.up, (2 * i + 1) * nk), w2.set(x.down, i * nk)));
  const weights = { w13: tensor("fp8_e4m3", [e, 2 * n, k], w13), w2: tensor("fp8_e4m3", [e, k, n], w2) };
  if (w.format !== "mixtral") {
    const gs = source[0].gateScale.length, ds = source[0].downScale.length;
    const s13 = new Float32Array(e * 2 * gs), s2 = new Float32Array(e * ds);
    source.forEach((
      x,
      i,
    ) => (s13.set(x.gateScale, 2 * i * gs), s13.set(x.upScale, (2 * i + 1) * gs), s2.set(x.downScale, i * ds)));
    const b = (rows: number, cols: number) => [e, Math.ceil(rows / 128), Math.ceil(cols / 128)];
    const scales = { w13Scale: tensor("f32", b(2 * n, k), s13), w2Scale: tensor("f32", b(k, n), s2) };
    return { weightScale: "block-128", actScale: "dynamic-group-128", weights: { ...weights, ...scales } } as const;
  }
  const rows = (s: Float32Array, count: number) => s.length === 1 ? new Float32Array(count).fill(s[0]) : s;
  const s13 = new Float32Array(e * 2 * n), s2 = new Float32Array(e * k);
  source.forEach((
    x,
    i,
  ) => (s13.set(rows(x.gateScale, n), 2 * i * n),
    s13.set(rows(x.upScale, n), (2 * i + 1) * n),
    s2.set(rows(x.downScale, k), i * k))
  );
  const scales = { w13Scale: tensor("f32", [e, 2 * n], s13), w2Scale: tensor("f32", [e, k], s2) };
  if (!source[0].input) {
    return { weightScale: "per-channel", actScale: "dynamic-tensor", weights: { ...weights, ...scales } } as const;
  }
  const max = (xs: number[]) => Math.max(...xs.map(Math.fround));
  const a1 = max(source.flatMap((x) => [x.input![0], x.input![1]])), a2 = max(source.map((x) => x.input![2]));
  return {
    weightScale: "per-channel",
    actScale: "static-tensor",
    weights: { ...weights, ...scales, a1Scale: tensor("f32", [1], [a1]), a2Scale: tensor("f32", [1], [a2]) },
  } as const;
}

const CASES: (Omit<WriteOptions, "seed"> & { detected: CheckpointFormat; label: string })[] = [
  {
    label: "DeepSeek-V3, K not a multiple of 128",
    format: "deepseek-v3",
    detected: "deepseek-v3",
    experts: 4,
    hidden: 80,
    intermediate: 128,
  },
  {
    label: "DeepSeek-V3 sharded over 2 files",
    format: "deepseek-v3",
    detected: "deepseek-v3",
    experts: 3,
    hidden: 272,
    intermediate: 256,
    shards: 2,
  },
  { label: "Qwen3-MoE", format: "qwen3-moe", detected: "qwen3-moe", experts: 3, hidden: 144, intermediate: 128, layer: 0 },
  { label: "Mixtral, static input scales", format: "mixtral", detected: "mixtral", experts: 4, hidden: 80, intermediate: 48 },
  {
    label: "Mixtral, dynamic, sharded",
    format: "mixtral",
    detected: "mixtral",
    experts: 3,
    hidden: 64,
    intermediate: 32,
    staticInput: false,
    shards: 2,
    layer: 2,
  },
];

for (const [i, c] of CASES.entries()) {
  test(`checkpoints: ${c.label} loads into the canonical layout and computes bit-identically`, async () => {
    const w = writeMoeCheckpoint({ ...c, seed: SEED + 10 + i });
    const want = canonical(w);
    const got = loadMoeCheckpoint(w.dir, { layer: w.layer });
    assert.equal(got.format, c.detected);
    assert.deepEqual(got.config, {
      hidden: c.hidden,
      intermediate: c.intermediate,
      experts: c.experts,
      weightScale: want.weightScale,
      actScale: want.actScale,
    });
    for (const key of ["w13", "w13Scale", "w2", "w2Scale", "a1Scale", "a2Scale"] as const) {
      const g = got.weights[key], x = (want.weights as Record<string, typeof g>)[key];
      assert.equal(g === undefined, x === undefined, `${key} present`);
      if (!g || !x) continue;
      assert.equal(g.dtype, x.dtype, key);
      assert.deepEqual(g.shape, x.shape, key);
      sameArray(g.data, x.data, key);
    }
    // One forward through a layer opened from the files, and one built from the writer's arrays.
    const r = new Rng(SEED + 100 + i), m = 7, topk = 2;
    const x = tensor("bf16", [m, c.hidden], toBf16(r.values(m * c.hidden)));
    const ids = tensor("i32", [m, topk], Int32Array.from({ length: m * topk }, (_, j) => (j * 3 + (j >> 1)) % c.experts));
    const tw = tensor("f32", [m, topk], Float32Array.from({ length: m * topk }, () => r.next()));
    using fromFile = openMoeCheckpoint(w.dir, { layer: w.layer, topk, context: ctx });
    using direct = new MoeLayer({
      hidden: c.hidden,
      intermediate: c.intermediate,
      experts: c.experts,
      topk,
      weightScale: want.weightScale,
      actScale: want.actScale,
      context: ctx,
    }).load(want.weights);
    const a = await fromFile.forward(x, ids, tw), b = await direct.forward(x, ids, tw);
    sameArray(a.data, b.data, "forward output bits");
    assert.ok(fromBf16(a.data).some((v) => v !== 0), "the output is not all zero");
    assert.ok(fromBf16(a.data).every(Number.isFinite), "the output is finite");
  });
}

test("checkpoints: an explicit format, an open checkpoint reused for several loads", () => {
  const w = writeMoeCheckpoint({ format: "deepseek-v3", experts: 3, hidden: 32, intermediate: 128, seed: SEED + 20, shards: 2 });
  using ck = new SafetensorsCheckpoint(w.dir);
  const a = loadMoeCheckpoint(ck, { layer: 1, format: "qwen3-moe" }); // same naming: reads the same
  const b = loadMoeCheckpoint(ck, { layer: 1 });
  assert.equal(a.format, "qwen3-moe");
  assert.equal(b.format, "deepseek-v3");
  sameArray(a.weights.w13.data, b.weights.w13.data, "w13");
  throwsCheckpoint(() => loadMoeCheckpoint(ck, { layer: 1, format: "mixtral" }), /layer 1 has no mixtral experts/);
  assert.throws(
    () => loadMoeCheckpoint(ck, { layer: 1, format: "llama" as CheckpointFormat }),
    /format: expected one of deepseek-v3, qwen3-moe, mixtral/,
  );
  assert.throws(() => loadMoeCheckpoint(ck, { layer: -1 }), /layer: expected an integer >= 0/);
});

// ---- broken checkpoints ----

/** A small DeepSeek-style checkpoint with `tamper` applied. */
const broken = (tamper: (t: Map<string, RawTensor>) => void, o: Partial<WriteOptions> = {}) =>
  writeMoeCheckpoint({ format: "deepseek-v3", experts: 4, hidden: 48, intermediate: 128, seed: SEED + 30, tamper, ...o });
const E = (e: number, rest: string) => `model.layers.1.mlp.experts.${e}.${rest}`;

test("checkpoint errors: a missing expert, a layer without experts", () => {
  const w = broken((t) => {
    for (const name of [...t.keys()]) if (name.startsWith(E(1, ""))) t.delete(name);
  });
  throwsCheckpoint(
    () => loadMoeCheckpoint(w.dir, { layer: 1 }),
    /model\.safetensors: tensor model\.layers\.1\.mlp\.experts\.1\.gate_proj\.weight: is missing: expert 1 of layer 1/,
    /experts 0-3/,
  );
  throwsCheckpoint(() => loadMoeCheckpoint(w.dir, { layer: 0 }), /layer 0 has no MoE experts .*; layers with experts: 1/);
  throwsCheckpoint(() => loadMoeCheckpoint(w.dir, { layer: 7 }), /layer 7 has no MoE experts/);
});

test("checkpoint errors: dtype and shape mismatches", () => {
  const bf16 = broken((t) => t.set(E(2, "gate_proj.weight"), raw("BF16", [128, 48], new Uint16Array(128 * 48).fill(0x3f80))));
  throwsCheckpoint(() => loadMoeCheckpoint(bf16.dir, { layer: 1 }), /experts\.2\.gate_proj\.weight: is BF16, expected F8_E4M3/);
  const shape = broken((t) => t.set(E(3, "down_proj.weight"), raw("F8_E4M3", [48, 112], new Uint8Array(48 * 112))));
  throwsCheckpoint(
    () => loadMoeCheckpoint(shape.dir, { layer: 1 }),
    /experts\.3\.down_proj\.weight: has shape \[48, 112\], expected \[48, 128\] \(from expert 0\)/,
  );
  const scale = broken((t) => t.set(E(0, "up_proj.weight_scale_inv"), raw("F32", [1, 2], new Float32Array(2).fill(1))));
  throwsCheckpoint(
    () => loadMoeCheckpoint(scale.dir, { layer: 1 }),
    /experts\.0\.up_proj\.weight_scale_inv: has shape \[1, 2\], expected \[1, 1\]/,
  );
  const i32 = broken((t) => t.set(E(0, "up_proj.weight_scale_inv"), raw("I32", [1, 1], Int32Array.of(1))));
  throwsCheckpoint(() => loadMoeCheckpoint(i32.dir, { layer: 1 }), /weight_scale_inv: is I32, expected an F32/);
});

test("checkpoint errors: missing or bad scales", () => {
  const missing = broken((t) => t.delete(E(2, "down_proj.weight_scale_inv")));
  throwsCheckpoint(
    () => loadMoeCheckpoint(missing.dir, { layer: 1 }),
    /experts\.2\.down_proj\.weight_scale_inv: is missing: every FP8 expert weight needs its scale/,
  );
  const zero = broken((t) => t.set(E(1, "gate_proj.weight_scale_inv"), raw("F32", [1, 1], Float32Array.of(0))));
  throwsCheckpoint(
    () => loadMoeCheckpoint(zero.dir, { layer: 1 }),
    /experts\.1\.gate_proj\.weight_scale_inv: element 0 is 0: scales must be finite and > 0/,
  );
  const partial = writeMoeCheckpoint({
    format: "mixtral",
    experts: 3,
    hidden: 32,
    intermediate: 16,
    seed: SEED + 31,
    tamper: (t) => t.delete("model.layers.1.block_sparse_moe.experts.2.w2.input_scale"),
  });
  throwsCheckpoint(
    () => loadMoeCheckpoint(partial.dir, { layer: 1 }),
    /experts\.2\.w2\.input_scale: is missing: some experts have static input scales/,
  );
});

test("checkpoint errors: an intermediate size block-128 cannot stack", () => {
  const w = writeMoeCheckpoint({ format: "qwen3-moe", experts: 3, hidden: 64, intermediate: 80, seed: SEED + 32 });
  throwsCheckpoint(() => loadMoeCheckpoint(w.dir, { layer: 1 }), /intermediate size N = 80 is not a multiple of 128/);
});

test("checkpoint errors: a missing shard, an index that lies", () => {
  const w = broken(() => {}, { shards: 2 });
  const index = join(w.dir, "model.safetensors.index.json");
  const json = JSON.parse(new TextDecoder().decode(readFileSync(index)));
  unlinkSync(join(w.dir, "model-00002-of-00002.safetensors"));
  throwsCheckpoint(
    () => loadMoeCheckpoint(w.dir, { layer: 1 }),
    /model\.safetensors\.index\.json: tensor .*: is mapped to shard model-00002-of-00002\.safetensors, which does not exist/,
  );
  // every tensor now points at shard 1, which holds only half of them
  for (const name of Object.keys(json.weight_map)) json.weight_map[name] = "model-00001-of-00002.safetensors";
  writeFileSync(index, JSON.stringify(json));
  throwsCheckpoint(
    () => loadMoeCheckpoint(w.dir, { layer: 1 }),
    /tensor .*: the index maps it to .*model-00001-of-00002\.safetensors, which does not hold it/,
  );
  writeFileSync(index, "{ weight_map: nope");
  throwsCheckpoint(() => loadMoeCheckpoint(w.dir, { layer: 1 }), /model\.safetensors\.index\.json: cannot read the index/);
  writeFileSync(index, JSON.stringify({ weight_map: [1] }));
  throwsCheckpoint(() => loadMoeCheckpoint(w.dir, { layer: 1 }), /"weight_map" must map tensor names to shard file names/);
});
