// Shared test helpers: a seeded generator of random problems and inputs, fixture plugins, and the
// comparison rules (each tolerance is justified where it is defined).
import { mkdirSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { compileShared, ROOT } from "../backends/build.ts";
import { bf16ToF32, f32ToBf16, toBf16 } from "../core/dtypes.ts";
import { ACT_SCALES, type ActScale, WEIGHT_SCALES, type WeightScale } from "../ffi/abi.ts";
import { tensor } from "../core/tensor.ts";
import { weightScaleShape } from "../core/validate.ts";

/** Seed from MOEFFI_TEST_SEED, else fresh each run (printed so a failure can be replayed). */
export function seed(): number {
  const fromEnv = Number(process.env.MOEFFI_TEST_SEED);
  const s = Number.isFinite(fromEnv) && process.env.MOEFFI_TEST_SEED ? fromEnv : (Math.random() * 2 ** 32) >>> 0;
  return s;
}

/** mulberry32: small, fast, good enough for test data. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    let t = (this.s = (this.s + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  }
  int(lo: number, hi: number): number { // inclusive
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(0, xs.length - 1)];
  }
  normal(): number {
    return Math.sqrt(-2 * Math.log(1 - this.next())) * Math.cos(2 * Math.PI * this.next());
  }
  /** Normal values with rare outliers (x30), the shape real activations have. */
  values(n: number, amp = 1): Float32Array {
    const v = new Float32Array(n);
    for (let i = 0; i < n; i++) v[i] = amp * this.normal() * (this.next() < 0.01 ? 30 : 1);
    return v;
  }
  /** Positive scales spread over a factor of 4 around `base`. */
  scales(n: number, base: number): Float32Array {
    return Float32Array.from({ length: n }, () => base * 2 ** (this.next() * 2 - 1));
  }
}

/** A multiple of 16 in [16, max], biased to small, sometimes not a multiple of 128. */
export const dim16 = (r: Rng, max: number) => 16 * r.int(1, Math.max(1, Math.floor(max / 16)));

export interface MoeCase {
  m: number;
  n: number;
  k: number;
  experts: number;
  topk: number;
  weightScale: WeightScale;
  actScale: ActScale;
  x: Uint16Array;
  topkIds: Int32Array;
  topkWeights: Float32Array;
  w13: Uint8Array;
  w13Scale: Float32Array;
  w2: Uint8Array;
  w2Scale: Float32Array;
  a1Scale?: number;
  a2Scale?: number;
}

/** Random fp8 codes over the whole format (magnitudes 2^-9 to 448), NaN codes excluded. */
export function fp8Weights(r: Rng, n: number): Uint8Array {
  const w = new Uint8Array(n);
  for (let i = 0; i < n; i += 4) {
    const bits = r.next() * 2 ** 32;
    for (let j = 0; j < 4 && i + j < n; j++) {
      const b = (bits >>> (8 * j)) & 0xff;
      w[i + j] = (b & 0x7f) === 0x7f ? b ^ 1 : b;
    }
  }
  return w;
}

export function randomMoe(r: Rng, o: Partial<MoeCase> = {}): MoeCase {
  const experts = o.experts ?? r.pick([1, 2, 3, 8, 13, 60, 64, 100, 128, 257, 300, r.int(1, 300)]);
  const topk = o.topk ?? r.int(1, Math.min(8, experts));
  // Keep the weight bytes (E*3*K*N) and the float64 reference's work bounded per problem.
  const k = o.k ?? dim16(r, Math.min(512, Math.sqrt(1e6 / experts)));
  const n = o.n ?? dim16(r, Math.min(512, 1e6 / experts / k));
  const m = o.m ?? Math.min(r.pick([0, 1, 2, 5, 16, 17, 33, r.int(0, 300)]), Math.floor(4e6 / (topk * 3 * k * n)) + 1);
  const weightScale = o.weightScale ?? r.pick(WEIGHT_SCALES);
  const actScale = o.actScale ?? r.pick(ACT_SCALES);
  const topkIds = new Int32Array(m * topk);
  for (let i = 0; i < topkIds.length; i++) topkIds[i] = r.next() < 0.05 ? -1 : r.int(0, experts - 1); // repeats allowed
  const topkWeights = Float32Array.from({ length: m * topk }, () => r.next());
  const ws = (rows: number, cols: number) =>
    r.scales(weightScaleShape(weightScale, rows, cols, experts).reduce((a, b) => a * b), 1 / 2048);
  return {
    m,
    n,
    k,
    experts,
    topk,
    weightScale,
    actScale,
    x: toBf16(r.values(m * k)),
    topkIds,
    topkWeights,
    w13: fp8Weights(r, experts * 2 * n * k),
    w13Scale: ws(2 * n, k),
    w2: fp8Weights(r, experts * k * n),
    w2Scale: ws(k, n),
    // static scales near amax/448 of the data, sometimes small enough to saturate
    ...(actScale === "static-tensor"
      ? { a1Scale: 4 / 448 * 2 ** (r.next() * 2 - 1), a2Scale: 0.5 / 448 * 2 ** (r.next() * 2 - 1) }
      : {}),
    ...o,
  };
}

/** The MoeCase as host tensors for MoeLayer.load / forward. */
export function moeTensors(c: MoeCase) {
  const f32 = (v: number) => tensor("f32", [1], [v]);
  return {
    weights: {
      w13: tensor("fp8_e4m3", [c.experts, 2 * c.n, c.k], c.w13),
      w13Scale: tensor("f32", weightScaleShape(c.weightScale, 2 * c.n, c.k, c.experts), c.w13Scale),
      w2: tensor("fp8_e4m3", [c.experts, c.k, c.n], c.w2),
      w2Scale: tensor("f32", weightScaleShape(c.weightScale, c.k, c.n, c.experts), c.w2Scale),
      ...(c.a1Scale !== undefined ? { a1Scale: f32(c.a1Scale), a2Scale: f32(c.a2Scale!) } : {}),
    },
    x: tensor("bf16", [c.m, c.k], c.x),
    topkIds: tensor("i32", [c.m, c.topk], c.topkIds),
    topkWeights: tensor("f32", [c.m, c.topk], c.topkWeights),
  };
}

/** A bf16 output buffer filled with NaN, so an element the backend never wrote cannot pass. */
export const poisonedBf16 = (shape: number[]) =>
  tensor("bf16", shape, new Uint16Array(shape.reduce((a, b) => a * b, 1)).fill(0x7fc1));

/**
 * Compares a bf16 output with a float64 reference, row by row. Tolerance per element:
 *   relTol |ref|      default 2^-8: the bf16 rounding of the output (half an ulp of an 8-bit significand), plus
 *   rowTol * max|ref row|  fp32 accumulation and, for fp8_moe, the rare one-ulp fp8 flip of an
 *                          intermediate element sitting on a rounding midpoint, which moves a whole
 *                          output row by a fraction of its largest term.
 * Returns the first violation, or undefined.
 */
export function compareBf16(
  got: Uint16Array,
  ref: Float64Array,
  cols: number,
  rowTol: number,
  relTol = 2 ** -8,
): string | undefined {
  for (let r = 0; r * cols < ref.length; r++) {
    let rowMax = 0;
    for (let c = 0; c < cols; c++) rowMax = Math.max(rowMax, Math.abs(ref[r * cols + c]));
    for (let c = 0; c < cols; c++) {
      const i = r * cols + c, g = bf16ToF32(got[i]), want = ref[i];
      const tol = relTol * Math.abs(want) + rowTol * rowMax + 1e-30;
      if (!(Math.abs(g - want) <= tol)) {
        return `[${r}, ${c}]: got ${g}, want ${want} (|diff| ${Math.abs(g - want).toExponential(3)} > tol ${
          tol.toExponential(3)
        }, row max ${rowMax.toExponential(3)})`;
      }
    }
  }
}

/** ||got - ref|| / ||ref|| over a whole output (0 when ref is all zero and got matches). */
export function relativeL2(got: Uint16Array, ref: Float64Array): number {
  let e = 0, r = 0;
  for (let i = 0; i < ref.length; i++) (e += (bf16ToF32(got[i]) - ref[i]) ** 2), (r += ref[i] ** 2);
  return r > 0 ? Math.sqrt(e / r) : Math.sqrt(e);
}

/** Index of the first differing element (or length mismatch), -1 when equal; fast in both runtimes. */
export function firstDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i] && !(a[i] !== a[i] && b[i] !== b[i])) return i;
  return -1;
}

/** Rounds a float64 reference to bf16 and back, for exact comparisons. */
export const roundBf16 = (v: Float64Array) => Float64Array.from(v, (x) => bf16ToF32(f32ToBf16(x)));

let fixtureRoot: string | undefined;
/** Builds a fixture plugin (tests/fixtures/plugin.c by default) into a fresh folder of its own. */
export async function buildFixture(file: string, defines: string[], source = "plugin.c", flags: string[] = []): Promise<string> {
  fixtureRoot ??= mkdtempSync(join(tmpdir(), "moeffi-fixtures-"));
  const dir = join(fixtureRoot, file.replace(/\W/g, "_"));
  mkdirSync(dir, { recursive: true });
  const out = join(dir, `${file}.so`);
  await compileShared(file, [join(ROOT, "tests", "fixtures", source)], out, [...defines.map((d) => `-D${d}`), ...flags]);
  return dir;
}
