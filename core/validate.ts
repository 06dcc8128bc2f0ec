// Validation before any native call: a backend never sees a malformed tensor. Each failure is an
// ArgumentError naming the argument, its shape and what was expected.
import { ACT_SCALES, type ActScale, WEIGHT_SCALES, type WeightScale } from "../ffi/abi.ts";
import { ArgumentError } from "./errors.ts";
import type { Device, DType, TensorLike } from "./tensor.ts";

export const cdiv = (a: number, b: number) => Math.ceil(a / b);

/** A positive integer option (or >= min). */
export function expectInt(name: string, v: unknown, min = 1): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    throw new ArgumentError(name, undefined, `an integer >= ${min}`, `got ${String(v)}`);
  }
  return v;
}

/** K and N feed 16-byte fp8 vector loads and the FP4 16-element blocks. */
export function expectMultipleOf16(name: string, v: number): void {
  if (v % 16 !== 0) throw new ArgumentError(name, undefined, "a multiple of 16 (16-byte alignment of fp8 rows)", `got ${v}`);
}

export function expectScheme(weightScale: unknown, actScale: unknown): [WeightScale, ActScale] {
  if (!WEIGHT_SCALES.includes(weightScale as WeightScale)) {
    throw new ArgumentError("weightScale", undefined, `one of ${WEIGHT_SCALES.join(", ")}`, `got ${String(weightScale)}`);
  }
  if (!ACT_SCALES.includes(actScale as ActScale)) {
    throw new ArgumentError("actScale", undefined, `one of ${ACT_SCALES.join(", ")}`, `got ${String(actScale)}`);
  }
  return [weightScale as WeightScale, actScale as ActScale];
}

/** dtype, exact shape and device of a tensor argument. */
export function expectTensor(
  name: string,
  t: TensorLike | undefined,
  dtype: DType,
  shape: readonly number[],
  device: Device,
): void {
  const want = `${dtype} [${shape.join(", ")}] on ${device}`;
  if (!t || typeof t !== "object" || !("dtype" in t)) throw new ArgumentError(name, undefined, `a tensor ${want}`, "got none");
  if (t.dtype !== dtype) throw new ArgumentError(name, t.shape, want, `got dtype ${t.dtype}`);
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) throw new ArgumentError(name, t.shape, want);
  if (t.device !== device) throw new ArgumentError(name, t.shape, want, `got a tensor on ${t.device}`);
}

/** Host data of a tensor, when it has any (device tensors are checked on the device). */
const hostData = (t: TensorLike) => (t as { data?: ArrayLike<number> }).data;

/** Scales must be finite and > 0: a zero or NaN scale silently poisons every output. */
export function expectPositiveScales(name: string, t: TensorLike): void {
  const d = hostData(t);
  if (!d) return;
  for (let i = 0; i < d.length; i++) {
    if (!(d[i] > 0 && d[i] < Infinity)) {
      throw new ArgumentError(name, t.shape, "finite scales > 0", `element ${i} is ${d[i]}`);
    }
  }
}

export function expectFinite(name: string, t: TensorLike): void {
  const d = hostData(t);
  if (!d) return;
  for (let i = 0; i < d.length; i++) {
    if (!Number.isFinite(d[i])) throw new ArgumentError(name, t.shape, "finite values", `element ${i} is ${d[i]}`);
  }
}

/** Routing ids: an expert in [0, E) or -1 for an empty slot. */
export function expectIds(name: string, t: TensorLike, experts: number): void {
  const d = hostData(t);
  if (!d) return;
  const cols = t.shape[1];
  for (let i = 0; i < d.length; i++) {
    if (d[i] < -1 || d[i] >= experts) {
      throw new ArgumentError(
        name,
        t.shape,
        `expert ids in [0, ${experts}) or -1`,
        `[${Math.floor(i / cols)}, ${i % cols}] is ${d[i]}`,
      );
    }
  }
}

/** Expert row starts: offsets[0] = 0, non-decreasing, offsets[E] = rows. */
export function expectOffsets(name: string, t: TensorLike, rows: number): void {
  const d = hostData(t);
  if (!d) return;
  const bad = (i: number, why: string) =>
    new ArgumentError(name, t.shape, `row starts from 0 to ${rows}, non-decreasing`, `element ${i} ${why}`);
  if (d[0] !== 0) throw bad(0, `is ${d[0]}`);
  for (let i = 1; i < d.length; i++) if (d[i] < d[i - 1]) throw bad(i, `is ${d[i]} < ${d[i - 1]}`);
  if (d[d.length - 1] !== rows) throw bad(d.length - 1, `is ${d[d.length - 1]}, not ${rows}`);
}

/** Shape of a weight-scale tensor: per-tensor, per-channel or 128x128 blocks of a [rows, cols] matrix. */
export function weightScaleShape(scheme: WeightScale, rows: number, cols: number, experts?: number): number[] {
  const inner = scheme === "per-tensor" ? [] : scheme === "per-channel" ? [rows] : [cdiv(rows, 128), cdiv(cols, 128)];
  return experts === undefined ? (inner.length ? inner : [1]) : [experts, ...inner];
}
