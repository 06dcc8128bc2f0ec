// A safetensors reader that never loads a whole file: the header is parsed and checked once, then
// each tensor (or a range of its rows) is read at its offset with node:fs. Checkpoints of hundreds
// of GB are read one expert at a time this way. Sharded checkpoints go through
// model.safetensors.index.json, opening shards only when one of their tensors is read.
//
// Format: an 8-byte little-endian u64 header length, the UTF-8 JSON header
// {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {string: string}}, then the
// data section; offsets are relative to its start. Every value is little-endian. A header is
// refused when an entry's offsets leave the data section, disagree with its dtype and shape, or
// overlap another entry's; unindexed gaps between tensors are tolerated (they cannot change a read).
import { closeSync, existsSync, fstatSync, openSync, readdirSync, readFileSync, readSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { MoeffiError } from "./errors.ts";
import { type DType, numel, Tensor } from "./tensor.ts";

/** A malformed or inconsistent checkpoint; the message names the file and, where one is involved, the tensor. */
export class CheckpointError extends MoeffiError {
  /** "CheckpointError" */
  override name = "CheckpointError";
  /** An error about one file and, when given, one of its tensors (code "invalid_argument"). */
  constructor(
    /** The file (or index json) at fault. */
    readonly file: string,
    /** The tensor at fault, if one is. */
    readonly tensor: string | undefined,
    detail: string,
  ) {
    super("invalid_argument", `${file}${tensor === undefined ? "" : `: tensor ${tensor}`}: ${detail}`);
  }
}

// Bits per element of every dtype the format defines, so a header is checked in full even when it
// holds tensors moeffi never reads (an I64 position table, F8_E5M2 weights, ...).
const DTYPE_BITS: Record<string, number> = {
  BOOL: 8,
  U8: 8,
  I8: 8,
  F8_E5M2: 8,
  F8_E4M3: 8,
  F8_E8M0: 8,
  F4: 4,
  F6_E2M3: 6,
  F6_E3M2: 6,
  I16: 16,
  U16: 16,
  F16: 16,
  BF16: 16,
  I32: 32,
  U32: 32,
  F32: 32,
  I64: 64,
  U64: 64,
  F64: 64,
  C64: 64,
};

/** The safetensors dtypes moeffi reads, and the Tensor dtype each becomes (F16 is widened to f32, exactly). */
export const READABLE_DTYPES: Readonly<Record<string, DType>> = {
  F8_E4M3: "fp8_e4m3",
  BF16: "bf16",
  F16: "f32",
  F32: "f32",
  I32: "i32",
  U8: "u8",
};

// The reference implementation refuses larger headers too; it stops a corrupt length from
// allocating gigabytes before the JSON is even looked at.
const MAX_HEADER_BYTES = 100_000_000;
// readSync moves at most about 2 GiB per call on Linux; larger reads are split.
const MAX_READ = 1 << 30;
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Where one tensor lies, as its file's header says (checked against the file's size). */
export interface TensorInfo {
  /** The tensor's name in the header. */
  readonly name: string;
  /** The file holding it. */
  readonly file: string;
  /** safetensors dtype name, e.g. "F8_E4M3". */
  readonly dtype: string;
  /** Dimensions, row-major. */
  readonly shape: readonly number[];
  /** Absolute byte range in the file: [start, end). */
  readonly start: number;
  /** End of the byte range (exclusive). */
  readonly end: number;
}

/** f16 bits -> the exact same value as a float (every half is exactly representable in fp32). */
export function f16ToF32(h: number): number {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24; // zero and subnormals
  if (exp === 31) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}

/** An array of f16 bits widened to fp32 values. */
export function fromF16(a: Uint16Array): Float32Array {
  // A 64K-entry table would be faster, but weights are not F16 in the checkpoints we load; scales are tiny.
  const out = new Float32Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = f16ToF32(a[i]);
  return out;
}

const isDims = (v: unknown): v is number[] => Array.isArray(v) && v.every((d) => Number.isSafeInteger(d) && d >= 0);
const fmt = (v: readonly unknown[]) => `[${v.join(", ")}]`;

/** One entry of the header, checked on its own: known dtype, sane shape, offsets in the data section, exact size. */
function parseEntry(file: string, name: string, raw: unknown, dataStart: number, dataBytes: number): TensorInfo {
  const bad = (detail: string) => new CheckpointError(file, name, detail);
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) throw bad("header entry is not an object");
  const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
  if (typeof dtype !== "string" || !(dtype in DTYPE_BITS)) {
    throw bad(`unknown dtype ${JSON.stringify(dtype)} (safetensors dtypes: ${Object.keys(DTYPE_BITS).join(", ")})`);
  }
  if (!isDims(shape)) throw bad(`shape ${JSON.stringify(shape)} is not a list of non-negative integers`);
  if (!isDims(offsets) || offsets.length !== 2 || offsets[0] > offsets[1]) {
    throw bad(`data_offsets ${JSON.stringify(offsets)} are not [begin, end] with 0 <= begin <= end`);
  }
  const [begin, end] = offsets;
  if (end > dataBytes) {
    throw bad(
      `data_offsets ${
        fmt(offsets)
      } run past the end of the data section (${dataBytes} bytes): the file is truncated or its header lies`,
    );
  }
  const bits = numel(shape) * DTYPE_BITS[dtype];
  if (bits !== (end - begin) * 8) {
    throw bad(`data_offsets ${fmt(offsets)} hold ${end - begin} bytes, but ${dtype} ${fmt(shape)} needs ${bits / 8}`);
  }
  return { name, file, dtype, shape, start: dataStart + begin, end: dataStart + end };
}

/** Two tensors sharing bytes means the header lies about at least one of them. */
function checkNoOverlap(file: string, tensors: TensorInfo[]): void {
  const sorted = [...tensors].sort((a, b) => a.start - b.start || a.end - b.end);
  for (let i = 1; i < sorted.length; i++) {
    const prev = sorted[i - 1], cur = sorted[i];
    if (cur.start < prev.end) {
      throw new CheckpointError(
        file,
        cur.name,
        `its bytes [${cur.start}, ${cur.end}) overlap tensor ${prev.name} [${prev.start}, ${prev.end})`,
      );
    }
  }
}

function parseMetadata(file: string, raw: unknown): Record<string, string> {
  if (raw === undefined) return {};
  const ok = typeof raw === "object" && raw !== null && !Array.isArray(raw) &&
    Object.values(raw).every((v) => typeof v === "string");
  if (!ok) {
    throw new CheckpointError(
      file,
      undefined,
      `__metadata__ must map strings to strings, got ${JSON.stringify(raw).slice(0, 200)}`,
    );
  }
  return raw as Record<string, string>;
}

/** Reads exactly dest.length bytes at `position`; a short file is an error, never a partial tensor. */
function readExactly(fd: number, file: string, dest: Uint8Array, position: number): void {
  for (let done = 0; done < dest.length;) {
    const n = readSync(fd, dest, done, Math.min(dest.length - done, MAX_READ), position + done);
    if (n === 0) {
      throw new CheckpointError(
        file,
        undefined,
        `unexpected end of file at byte ${position + done} (the file shrank after it was opened?)`,
      );
    }
    done += n;
  }
}

/** The header of an open file: tensors by name, metadata, and where data starts. */
function readHeader(fd: number, file: string, size: number) {
  if (size < 8) {
    throw new CheckpointError(file, undefined, `file is ${size} bytes, too short for the 8-byte header length (truncated?)`);
  }
  const lenBytes = new Uint8Array(8);
  readExactly(fd, file, lenBytes, 0);
  const len = new DataView(lenBytes.buffer).getBigUint64(0, true);
  if (len > BigInt(size - 8)) {
    throw new CheckpointError(
      file,
      undefined,
      `header length ${len} runs past the end of the file (${size} bytes): truncated, or not a safetensors file`,
    );
  }
  if (len > BigInt(MAX_HEADER_BYTES)) {
    throw new CheckpointError(file, undefined, `header length ${len} exceeds the ${MAX_HEADER_BYTES}-byte limit`);
  }
  const headerBytes = new Uint8Array(Number(len));
  readExactly(fd, file, headerBytes, 8);
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(headerBytes));
  } catch (e) {
    throw new CheckpointError(file, undefined, `header is not valid UTF-8 JSON: ${(e as Error).message}`);
  }
  if (typeof json !== "object" || json === null || Array.isArray(json)) {
    throw new CheckpointError(file, undefined, "header is not a JSON object");
  }
  const dataStart = 8 + Number(len);
  const { __metadata__, ...entries } = json as Record<string, unknown>;
  const tensors = Object.entries(entries).map(([name, raw]) => parseEntry(file, name, raw, dataStart, size - dataStart));
  checkNoOverlap(file, tensors);
  return { metadata: parseMetadata(file, __metadata__), tensors: new Map(tensors.map((t) => [t.name, t])) };
}

/** Rows of a tensor: its first dimension; a scalar is one row. */
const rowCount = (info: TensorInfo) => info.shape.length === 0 ? 1 : info.shape[0];

/** Bytes per row of a tensor. */
function rowBytes(info: TensorInfo): number {
  const rows = rowCount(info);
  return rows === 0 ? 0 : (info.end - info.start) / rows;
}

/** Raw little-endian bytes -> a moeffi Tensor of the matching dtype. */
function toTensor(info: TensorInfo, shape: number[], bytes: Uint8Array<ArrayBuffer>): Tensor {
  const dtype = READABLE_DTYPES[info.dtype];
  if (!LITTLE_ENDIAN) throw new CheckpointError(info.file, info.name, "safetensors data is little-endian; this host is not");
  const { buffer, byteOffset: o, length: n } = bytes;
  switch (info.dtype) {
    case "F16":
      return new Tensor(dtype, shape, fromF16(new Uint16Array(buffer, o, n / 2)));
    case "BF16":
      return new Tensor(dtype, shape, new Uint16Array(buffer, o, n / 2));
    case "F32":
      return new Tensor(dtype, shape, new Float32Array(buffer, o, n / 4));
    case "I32":
      return new Tensor(dtype, shape, new Int32Array(buffer, o, n / 4));
    default:
      return new Tensor(dtype, shape, bytes); // F8_E4M3, U8
  }
}

/** The read interface shared by one file and a whole (sharded) checkpoint. */
export interface TensorSource extends Disposable {
  /** The file, or the index json, named in errors. */
  readonly path: string;
  /** Every tensor name, in header (or index) order. */
  readonly names: readonly string[];
  /** Whether a tensor of that name exists. */
  has(name: string): boolean;
  /** Where a tensor lies; a CheckpointError when it does not exist. */
  info(name: string): TensorInfo;
  /** A whole tensor as a host Tensor (F16 widened to f32). */
  read(name: string): Tensor;
  /** Rows [start, end) of the first dimension, reading only their bytes. */
  readRows(name: string, start: number, end: number): Tensor;
  /** Raw bytes of a tensor (or rows [start, end)) into `dest`, which must be exactly that long. */
  readInto(name: string, dest: Uint8Array, start?: number, end?: number): void;
}

/** One .safetensors file, open until disposed. The header is checked in full when it is opened. */
export class SafetensorsFile implements TensorSource {
  /** The header's __metadata__ (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** File size in bytes. */
  readonly size: number;
  readonly #tensors: Map<string, TensorInfo>;
  #names?: readonly string[];
  #fd: number | undefined;

  /** Opens the file and checks its header; a CheckpointError when it cannot be read or is malformed. */
  constructor(
    /** The file's path. */
    readonly path: string,
  ) {
    let fd: number;
    try {
      fd = openSync(path, "r");
    } catch (e) {
      throw new CheckpointError(path, undefined, `cannot open: ${(e as Error).message}`);
    }
    try {
      this.size = fstatSync(fd).size;
      ({ metadata: this.metadata, tensors: this.#tensors } = readHeader(fd, path, this.size));
    } catch (e) {
      closeSync(fd); // a bad header must not leak the descriptor
      throw e;
    }
    this.#fd = fd;
  }

  get names(): readonly string[] {
    return (this.#names ??= Object.freeze([...this.#tensors.keys()]));
  }

  has(name: string): boolean {
    return this.#tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.#tensors.get(name);
    if (!t) throw new CheckpointError(this.path, name, `not found (the file holds ${this.#tensors.size} tensors)`);
    return t;
  }

  read(name: string): Tensor {
    const info = this.info(name);
    return this.#readTensor(info, 0, rowCount(info), [...info.shape]);
  }

  readRows(name: string, start: number, end: number): Tensor {
    const info = this.info(name);
    this.#checkRows(info, start, end);
    return this.#readTensor(info, start, end, [end - start, ...info.shape.slice(1)]);
  }

  readInto(name: string, dest: Uint8Array, start?: number, end?: number): void {
    const info = this.info(name);
    const whole = start === undefined && end === undefined;
    const [s, e] = whole ? [0, rowCount(info)] : [start ?? 0, end ?? info.shape[0]];
    if (!whole) this.#checkRows(info, s, e);
    const bytes = whole ? info.end - info.start : (e - s) * rowBytes(info);
    if (dest.length !== bytes) {
      throw new CheckpointError(this.path, name, `destination holds ${dest.length} bytes, the read needs ${bytes}`);
    }
    readExactly(this.#open(), this.path, dest, info.start + s * rowBytes(info));
  }

  #checkRows(info: TensorInfo, start: number, end: number) {
    if (info.shape.length === 0) throw new CheckpointError(this.path, info.name, "is a scalar: it has no rows to slice");
    if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || start > end || end > info.shape[0]) {
      throw new CheckpointError(this.path, info.name, `rows [${start}, ${end}) are not a range within its ${info.shape[0]} rows`);
    }
    if (!Number.isInteger(rowBytes(info))) {
      throw new CheckpointError(this.path, info.name, `its ${info.dtype} rows do not start on byte boundaries`);
    }
  }

  #readTensor(info: TensorInfo, start: number, end: number, shape: number[]): Tensor {
    if (!(info.dtype in READABLE_DTYPES)) {
      throw new CheckpointError(
        this.path,
        info.name,
        `dtype ${info.dtype} is not readable by moeffi (readable: ${Object.keys(READABLE_DTYPES).join(", ")})`,
      );
    }
    const bytes = new Uint8Array(new ArrayBuffer((end - start) * rowBytes(info)));
    readExactly(this.#open(), this.path, bytes, info.start + start * rowBytes(info));
    return toTensor(info, shape, bytes);
  }

  #open(): number {
    if (this.#fd === undefined) throw new MoeffiError("disposed", `${this.path}: file used after dispose()`);
    return this.#fd;
  }

  /** Closes the file descriptor (idempotent). */
  [Symbol.dispose](): void {
    if (this.#fd !== undefined) closeSync(this.#fd);
    this.#fd = undefined;
  }
}

/** The weight_map of a model.safetensors.index.json, checked: names -> shard files that exist. */
function readIndex(indexPath: string): Map<string, string> {
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(indexPath, "utf-8"));
  } catch (e) {
    throw new CheckpointError(indexPath, undefined, `cannot read the index: ${(e as Error).message}`);
  }
  const map = (json as { weight_map?: unknown } | null)?.weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map) || !Object.values(map).every((f) => typeof f === "string")) {
    throw new CheckpointError(indexPath, undefined, `"weight_map" must map tensor names to shard file names`);
  }
  const dir = dirname(indexPath), weights = new Map<string, string>();
  const checked = new Set<string>();
  for (const [name, shard] of Object.entries(map as Record<string, string>)) {
    const file = join(dir, shard);
    // Checked up front, so a missing download fails at open rather than halfway through a load.
    if (!checked.has(file) && !(existsSync(file) && statSync(file).isFile())) {
      throw new CheckpointError(indexPath, name, `is mapped to shard ${shard}, which does not exist (${file})`);
    }
    checked.add(file);
    weights.set(name, file);
  }
  return weights;
}

/** A path given by the user -> a .safetensors file or an index json. */
function resolveCheckpoint(path: string): { index?: string; file?: string } {
  if (!existsSync(path)) throw new CheckpointError(path, undefined, "no such file or folder");
  if (!statSync(path).isDirectory()) return path.endsWith(".json") ? { index: path } : { file: path };
  const entries = readdirSync(path).sort();
  const pick = (xs: string[]) => xs.length === 1 ? join(path, xs[0]) : undefined;
  if (entries.includes("model.safetensors.index.json")) return { index: join(path, "model.safetensors.index.json") };
  const index = pick(entries.filter((f) => f.endsWith(".safetensors.index.json")));
  if (index) return { index };
  if (entries.includes("model.safetensors")) return { file: join(path, "model.safetensors") };
  const file = pick(entries.filter((f) => f.endsWith(".safetensors")));
  if (file) return { file };
  throw new CheckpointError(
    path,
    undefined,
    "found no model.safetensors.index.json, no model.safetensors and not exactly one other *.safetensors file to read",
  );
}

/**
 * A checkpoint: one .safetensors file or shards listed by an index json. Shards are opened on first
 * use and closed together on dispose.
 */
export class SafetensorsCheckpoint implements TensorSource {
  /** The index json, or the single file. */
  readonly path: string;
  readonly #weights: Map<string, string>;
  readonly #open = new Map<string, SafetensorsFile>();
  #names?: readonly string[];
  #disposed = false;

  /** `path`: a .safetensors file, an index json, or a folder holding either. */
  constructor(path: string) {
    const { index, file } = resolveCheckpoint(path);
    this.path = index ?? file!;
    if (index) {
      this.#weights = readIndex(index);
    } else {
      const single = new SafetensorsFile(file!);
      this.#open.set(file!, single);
      this.#weights = new Map(single.names.map((n) => [n, file!]));
    }
  }

  get names(): readonly string[] {
    return (this.#names ??= Object.freeze([...this.#weights.keys()]));
  }

  /** The distinct files of the checkpoint. */
  get files(): readonly string[] {
    return [...new Set(this.#weights.values())];
  }

  has(name: string): boolean {
    return this.#weights.has(name);
  }

  info(name: string): TensorInfo {
    return this.#fileOf(name).info(name);
  }

  read(name: string): Tensor {
    return this.#fileOf(name).read(name);
  }

  readRows(name: string, start: number, end: number): Tensor {
    return this.#fileOf(name).readRows(name, start, end);
  }

  readInto(name: string, dest: Uint8Array, start?: number, end?: number): void {
    this.#fileOf(name).readInto(name, dest, start, end);
  }

  #fileOf(name: string): SafetensorsFile {
    if (this.#disposed) throw new MoeffiError("disposed", `${this.path}: checkpoint used after dispose()`);
    const path = this.#weights.get(name);
    if (path === undefined) {
      throw new CheckpointError(this.path, name, `not found (the checkpoint holds ${this.#weights.size} tensors)`);
    }
    let f = this.#open.get(path);
    if (!f) this.#open.set(path, f = new SafetensorsFile(path));
    if (!f.has(name)) throw new CheckpointError(this.path, name, `the index maps it to ${path}, which does not hold it`);
    return f;
  }

  /** Closes every shard opened so far. */
  [Symbol.dispose](): void {
    for (const f of this.#open.values()) f[Symbol.dispose]();
    this.#open.clear();
    this.#disposed = true;
  }
}

/** Opens a checkpoint (a .safetensors file, an index json, or a folder holding either); dispose it, or `using`. */
export function openSafetensors(path: string): SafetensorsCheckpoint {
  return new SafetensorsCheckpoint(path);
}
