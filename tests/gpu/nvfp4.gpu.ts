// The nvfp4 backend on the GPU (`deno test -A tests/gpu/nvfp4.gpu.ts`): nvfp4_experts_quant and
// nvfp4_silu_quant bit-exact against the CPU reference (values and swizzled scales, padding included,
// outputs poisoned first) for K = 16, 48, 80, 2048, 7168 and E = 1, 7, 60, 64, 257, 1024 (and the lookup
// boundaries 32 / 33 and 4096 / 4097), 0 to 300 rows per expert with empty experts, outliers, zero and
// negative-zero blocks, NaN and infinities, and values whose scaled magnitude is exactly an e2m1 rounding
// tie; the grid-stride loop over many trips; invalid device offsets; exact-size buffers with canaries;
// and the benchmark's variants. MOEFFI_GPU_PROBLEMS scales the problem count (the sanitizer runs use a few).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Context, type DeviceTensor, nvfp4ExpertsQuant, nvfp4ScaleRows, tensor, toBf16 } from "../../mod.ts";
import { nvfp4SiluQuant } from "../../core/ops.ts";
import type { TensorAddresses } from "../../ffi/abi.ts";
import { firstDiff, Rng, seed } from "../helpers.ts";
import { siluRows } from "../reference64.ts";
import { openVariants, type Variant, VARIANTS, variantWorkspace } from "../../bench/nvfp4.ts";

const SEED = seed();
const SCALE = Number(process.env.MOEFFI_GPU_PROBLEMS ?? 1);
/** Every case at scale 1; about SCALE of them (at least one) below. */
const some = <T>(xs: T[]) => (SCALE >= 1 ? xs : xs.filter((_, i) => i % Math.ceil(1 / SCALE) === 0));
console.log(`nvfp4.gpu.ts: MOEFFI_TEST_SEED=${SEED} MOEFFI_GPU_PROBLEMS=${SCALE}`);

const gpu = new Context({ device: "cuda:0" });
const cpu = new Context({ device: "cpu", backend: "reference" });
const cuda = gpu.cuda!;
const backend = () => {
  const b = gpu.registry.backends.find((x) => x.name === "nvfp4");
  assert.ok(b, `the nvfp4 backend did not load: ${JSON.stringify(gpu.registry.skipped)}`);
  return b;
};

type Op = "nvfp4_experts_quant" | "nvfp4_silu_quant";
const TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5];
const BUDGET = 6e6; // input elements per problem

interface Case {
  op: Op;
  m: number;
  cols: number; // K (quant) or N (silu: the input has 2N columns)
  experts: number;
  offsets: Int32Array;
  gs: Float32Array;
  x: Uint16Array;
}
const inCols = (c: Case) => (c.op === "nvfp4_silu_quant" ? 2 * c.cols : c.cols);
const describe = (c: Case) => `${c.op} E=${c.experts} M=${c.m} ${c.op === "nvfp4_silu_quant" ? "N" : "K"}=${c.cols}`;

/**
 * A problem: rows per expert from 0 to maxRows (a third of the experts empty), normal values with
 * outliers; `special` adds zero and negative-zero blocks, NaN and infinities; `ties` makes every block
 * of some experts a power-of-two scale case whose elements scale exactly onto e2m1 ties.
 */
function makeCase(
  r: Rng,
  op: Op,
  experts: number,
  cols: number,
  o: { maxRows?: number; special?: boolean; ties?: boolean; rows?: number[] } = {},
): Case {
  const width = op === "nvfp4_silu_quant" ? 2 * cols : cols;
  const maxRows = o.maxRows ?? Math.max(1, Math.min(300, Math.floor(BUDGET / (experts * width) * 1.4)));
  const offsets = new Int32Array(experts + 1);
  for (let e = 0; e < experts; e++) {
    const rows = o.rows ? o.rows[e % o.rows.length] : r.next() < 0.3 ? 0 : r.int(0, maxRows);
    offsets[e + 1] = offsets[e] + rows;
  }
  const m = offsets[experts];
  const gs = Float32Array.from({ length: experts }, () => (448 * 6) / (20 * 2 ** (r.next() * 4 - 2)));
  const x = toBf16(r.values(m * width, 3));
  if (o.special) {
    for (let b = 0; b < (m * width) / 16; b++) {
      const u = r.next();
      if (u < 0.04) x.fill(r.next() < 0.5 ? 0x0000 : 0x8000, b * 16, b * 16 + 16); // zero / negative-zero block
      else if (u < 0.06) x[b * 16 + r.int(0, 15)] = r.pick([0x7fc1, 0xffc1, 0x7f80, 0xff80, 0x8000]); // NaN, inf, -0
    }
  }
  if (o.ties && op === "nvfp4_experts_quant") {
    for (let e = 0; e < experts; e += 2) { // every other expert: gs = 2^t, each block's amax 6 * 2^s / gs
      const t = r.int(-2, 2);
      gs[e] = 2 ** t;
      for (let row = offsets[e]; row < offsets[e + 1]; row++) {
        for (let b = 0; b < cols / 16; b++) {
          const s = r.int(-4, 4), unit = 2 ** (s - t), base = row * cols + b * 16;
          for (let k = 0; k < 16; k++) {
            const v = r.next() < 0.7 ? r.pick(TIES) * unit : r.next() * 6 * unit;
            x[base + k] = toBf16([r.next() < 0.5 ? -v : v])[0];
          }
          x[base + r.int(0, 15)] = toBf16([(r.next() < 0.5 ? -6 : 6) * unit])[0]; // the block amax: sf = 2^s exactly
        }
      }
    }
  }
  return { op, m, cols, experts, offsets, gs, x };
}

const poisoned = (c: Case) => ({
  packed: tensor("u8", [c.m, c.cols / 2], new Uint8Array((c.m * c.cols) / 2).fill(0xa5)),
  scales: tensor(
    "u8",
    [nvfp4ScaleRows(c.m, c.experts), Math.ceil(c.cols / 64) * 4],
    new Uint8Array(nvfp4ScaleRows(c.m, c.experts) * Math.ceil(c.cols / 64) * 4).fill(0xa5),
  ),
});
const opOf = (op: Op) => (op === "nvfp4_silu_quant" ? nvfp4SiluQuant : nvfp4ExpertsQuant);

/** The op on the CPU reference (host tensors, poisoned outputs). */
async function onCpu(c: Case): Promise<{ packed: Uint8Array; scales: Uint8Array }> {
  const out = poisoned(c);
  await opOf(c.op)(
    tensor("bf16", [c.m, inCols(c)], c.x),
    tensor("i32", [c.experts + 1], c.offsets),
    tensor("f32", [c.experts], c.gs),
    { context: cpu, ...out },
  );
  return { packed: out.packed.data, scales: out.scales.data };
}

/** The op on the GPU (exact-size device tensors, poisoned outputs), by the nvfp4 backend unless told. */
async function onGpu(c: Case, x = c.x, op: Op = c.op): Promise<{ packed: Uint8Array; scales: Uint8Array }> {
  const width = op === "nvfp4_silu_quant" ? 2 * c.cols : c.cols;
  const host = poisoned(c);
  const t = {
    x: cuda.upload(tensor("bf16", [c.m, width], x)),
    off: cuda.upload(tensor("i32", [c.experts + 1], c.offsets)),
    gs: cuda.upload(tensor("f32", [c.experts], c.gs)),
    packed: cuda.upload(host.packed),
    scales: cuda.upload(host.scales),
  };
  try {
    await opOf(op)(t.x, t.off, t.gs, { context: gpu, backend: "nvfp4", packed: t.packed, scales: t.scales });
    return { packed: (await t.packed.download()).data, scales: (await t.scales.download()).data };
  } finally {
    for (const d of Object.values(t)) d[Symbol.dispose]();
  }
}

function assertSame(
  got: { packed: Uint8Array; scales: Uint8Array },
  want: { packed: Uint8Array; scales: Uint8Array },
  what: string,
) {
  const p = firstDiff(got.packed, want.packed), s = firstDiff(got.scales, want.scales);
  assert.equal(p, -1, `${what}: packed byte ${p}: got ${got.packed[p]}, want ${want.packed[p]}`);
  assert.equal(s, -1, `${what}: scale byte ${s}: got ${got.scales[s]}, want ${want.scales[s]}`);
}

const KS = [16, 48, 80, 2048, 7168], ES = [1, 7, 60, 64, 257, 1024];

test("the oracle picks nvfp4 for both NVFP4 ops on the GPU", () => {
  backend();
  for (
    const spec of [{ op: "nvfp4_experts_quant" as const, m: 64, k: 7168, experts: 256 }, {
      op: "nvfp4_silu_quant" as const,
      m: 64,
      n: 2048,
      experts: 256,
    }]
  ) {
    assert.equal(gpu.explain(spec).find((v) => v.chosen)?.backend, "nvfp4");
  }
});

test("nvfp4_experts_quant: every K x E (K = 16..7168, E = 1..1024, lookup boundaries) bit-exact, padding zero", async () => {
  backend();
  const r = new Rng(SEED);
  const cases: Case[] = [];
  for (const k of KS) {
    for (const e of ES) {
      cases.push(makeCase(r, "nvfp4_experts_quant", e, k, { special: cases.length % 3 === 1, ties: cases.length % 3 === 2 }));
    }
  }
  for (const e of [32, 33, 4096, 4097]) {
    cases.push(makeCase(r, "nvfp4_experts_quant", e, r.pick([16, 80, 256]), { special: true }));
  }
  cases.push(makeCase(r, "nvfp4_experts_quant", 5, 64, { rows: [0] })); // M = 0: the whole buffer is padding
  cases.push(makeCase(r, "nvfp4_experts_quant", 3, 48, { rows: [128, 0, 256] })); // no partial tile
  for (const [i, c] of some(cases).entries()) assertSame(await onGpu(c), await onCpu(c), `case ${i} (${describe(c)})`);
});

test("nvfp4_experts_quant: many grid-stride trips (register and shared-memory lookups, experts spanning trips)", async () => {
  backend();
  const r = new Rng(SEED + 1);
  // a tiled random pattern keeps the host side fast
  const pattern = toBf16(r.values(1 << 20, 3));
  for (const experts of some([8, 64, 300])) {
    const c = makeCase(r, "nvfp4_experts_quant", experts, 2048, { rows: [0] });
    const offsets = new Int32Array(experts + 1);
    for (let e = 0; e < experts; e++) offsets[e + 1] = offsets[e] + (e % 5 === 3 ? 0 : r.int(1, Math.floor(60000 / experts)));
    const m = offsets[experts], x = new Uint16Array(m * 2048);
    for (let i = 0; i < x.length; i += pattern.length) x.set(pattern.subarray(0, Math.min(pattern.length, x.length - i)), i);
    Object.assign(c, { m, offsets, x });
    assertSame(await onGpu(c), await onCpu(c), describe(c));
  }
});

test("nvfp4_silu_quant: bit-exact for N x E, and equal to nvfp4_experts_quant of h on the GPU", async () => {
  backend();
  const r = new Rng(SEED + 2);
  const cases: Case[] = [];
  for (const n of [16, 48, 80, 2048]) {
    for (const e of [1, 7, 60, 257, 1024]) {
      cases.push(makeCase(r, "nvfp4_silu_quant", e, n, { special: cases.length % 4 === 1 }));
    }
  }
  cases.push(makeCase(r, "nvfp4_silu_quant", 4097, 32, { special: true }));
  for (const [i, c] of some(cases).entries()) {
    const got = await onGpu(c);
    assertSame(got, await onCpu(c), `case ${i} (${describe(c)})`);
    // the composition, entirely on the GPU: h from the float64 reference, then the quant kernel
    assertSame(
      got,
      await onGpu(c, siluRows(c.x, c.m, c.cols), "nvfp4_experts_quant"),
      `case ${i} (${describe(c)}): fused vs silu then quant`,
    );
  }
});

test("invalid offsets on the device: device_error on synchronize, values untouched, scale buffer zeroed", async () => {
  backend();
  const r = new Rng(SEED + 3);
  for (const experts of [7, 60, 4097]) { // register, shared-memory and global lookups
    for (const op of ["nvfp4_experts_quant", "nvfp4_silu_quant"] as const) {
      const c = makeCase(r, op, experts, 64, { maxRows: 40 });
      const bad = [
        (o: Int32Array) => ((o[0] = 1), o), // does not start at 0
        (o: Int32Array) => ((o[experts] = c.m + 1), o), // does not end at M
        (o: Int32Array) => ((o[Math.ceil(experts / 2)] = c.m + 5), o), // decreases after
      ];
      for (const [i, spoil] of bad.entries()) {
        const host = poisoned(c);
        const t = {
          x: cuda.upload(tensor("bf16", [c.m, inCols(c)], c.x)),
          off: cuda.upload(tensor("i32", [experts + 1], spoil(c.offsets.slice()))),
          gs: cuda.upload(tensor("f32", [experts], c.gs)),
          packed: cuda.upload(host.packed),
          scales: cuda.upload(host.scales),
        };
        await opOf(op)(t.x, t.off, t.gs, { context: gpu, backend: "nvfp4", packed: t.packed, scales: t.scales });
        await assert.rejects(gpu.synchronize(), /expert offsets not 0\.\.M non-decreasing/, `${op} E=${experts} spoil ${i}`);
        const packed = (await t.packed.download()).data, scales = (await t.scales.download()).data;
        assert.ok(packed.every((v) => v === 0xa5), `${op} E=${experts} spoil ${i}: values were written`);
        assert.ok(scales.every((v) => v === 0), `${op} E=${experts} spoil ${i}: the scale buffer is not all zero`);
        for (const d of Object.values(t)) d[Symbol.dispose]();
      }
    }
  }
});

test("exact-size buffers (E = 60, 257, 4097): nothing read or written past them (canaries; memcheck run)", async () => {
  const b = backend();
  const r = new Rng(SEED + 4);
  for (const experts of [60, 257, 4097]) {
    for (const op of ["nvfp4_experts_quant", "nvfp4_silu_quant"] as const) {
      const c = makeCase(r, op, experts, 80, { maxRows: 150 });
      const p = gpu.problem(op === "nvfp4_silu_quant" ? { op, m: c.m, n: c.cols, experts } : { op, m: c.m, k: c.cols, experts });
      const wsBytes = b.workspaceSize(p),
        outBytes = (c.m * c.cols) / 2,
        sfBytes = nvfp4ScaleRows(c.m, experts) * Math.ceil(c.cols / 64) * 4;
      // inputs at their exact sizes (what compute-sanitizer memcheck checks), outputs with canaries after
      const x = cuda.upload(tensor("bf16", [c.m, inCols(c)], c.x)), off = cuda.upload(tensor("i32", [experts + 1], c.offsets));
      const gs = cuda.upload(tensor("f32", [experts], c.gs));
      const ws = cuda.empty("u8", [wsBytes + 4096]),
        out = cuda.empty("u8", [outBytes + 4096]),
        sf = cuda.empty("u8", [sfBytes + 4096]);
      for (const d of [ws, out, sf]) cuda.fill(d, 0xa5);
      const slots: Partial<TensorAddresses> = {
        x: x.address(),
        expertOffsets: off.address(),
        globalScale: gs.address(),
        out: out.address(),
        outAux: sf.address(),
        workspace: ws.address(),
        workspaceBytes: BigInt(wsBytes),
        stream: cuda.stream,
        errorFlags: cuda.errorFlags,
      };
      await b.run(p, 0n, slots, []);
      const what = `${op} E=${experts} M=${c.m}`;
      const [wsHost, outHost, sfHost] = await Promise.all([ws.download(), out.download(), sf.download()]);
      assert.ok(wsHost.data.subarray(wsBytes).every((v) => v === 0xa5), `${what}: wrote past its ${wsBytes}-byte workspace`);
      assert.ok(outHost.data.subarray(outBytes).every((v) => v === 0xa5), `${what}: wrote past the ${outBytes}-byte values`);
      assert.ok(sfHost.data.subarray(sfBytes).every((v) => v === 0xa5), `${what}: wrote past the ${sfBytes}-byte scales`);
      assertSame({ packed: outHost.data.subarray(0, outBytes), scales: sfHost.data.subarray(0, sfBytes) }, await onCpu(c), what);
      if (wsBytes > 0) await assert.rejects(b.run(p, 0n, { ...slots, workspaceBytes: BigInt(wsBytes - 1) }, []), /invalid/);
      else assert.ok(experts <= 4096, "only the global lookup (E > 4096) needs a workspace");
      for (const d of [x, off, gs, ws, out, sf]) d[Symbol.dispose]();
    }
  }
});

test("the benchmark's variants (sector and flat kernels, plain, forced lookups, memset first, float amax) write the bytes moeffi_run writes", async () => {
  const b = backend();
  const variants = openVariants(b.path);
  const r = new Rng(SEED + 5);
  try {
    for (
      const c of some([
        makeCase(r, "nvfp4_experts_quant", 8, 7168, { rows: [1, 0, 2, 1, 0, 3, 1, 0] }),
        makeCase(r, "nvfp4_experts_quant", 60, 80, { special: true }),
        makeCase(r, "nvfp4_experts_quant", 257, 2048, { maxRows: 40 }),
        makeCase(r, "nvfp4_silu_quant", 7, 48, {}),
        makeCase(r, "nvfp4_experts_quant", 5, 80, { maxRows: 300, special: true }), // sector kernel, register lookup
        makeCase(r, "nvfp4_silu_quant", 40, 208, { maxRows: 200 }), // sector kernel, shared-memory lookup
      ])
    ) {
      const want = await onCpu(c);
      const p = gpu.problem(
        c.op === "nvfp4_silu_quant"
          ? { op: c.op, m: c.m, n: c.cols, experts: c.experts }
          : { op: c.op, m: c.m, k: c.cols, experts: c.experts },
      );
      const host = poisoned(c);
      const t = {
        x: cuda.upload(tensor("bf16", [c.m, inCols(c)], c.x)),
        off: cuda.upload(tensor("i32", [c.experts + 1], c.offsets)),
        gs: cuda.upload(tensor("f32", [c.experts], c.gs)),
        packed: cuda.upload(host.packed),
        scales: cuda.upload(host.scales),
        ws: cuda.empty("u8", [variantWorkspace(c.experts)]),
      };
      for (const v of Object.keys(VARIANTS) as Variant[]) {
        cuda.write(t.packed as DeviceTensor<"u8">, host.packed), cuda.write(t.scales as DeviceTensor<"u8">, host.scales);
        variants.run(p, {
          x: t.x.address(),
          expertOffsets: t.off.address(),
          globalScale: t.gs.address(),
          out: t.packed.address(),
          outAux: t.scales.address(),
          workspace: t.ws.address(),
          workspaceBytes: BigInt(t.ws.bytes),
          stream: cuda.stream,
          errorFlags: cuda.errorFlags,
        }, v);
        assertSame(
          { packed: (await t.packed.download()).data, scales: (await t.scales.download()).data },
          want,
          `${describe(c)} variant ${v}`,
        );
      }
      for (const d of Object.values(t)) d[Symbol.dispose]();
    }
  } finally {
    variants.close();
  }
});
