// The one runtime adapter: symbol tables are declared once, in Deno's notation, and opened with
// Deno.dlopen or bun:ffi. It hides how each runtime represents pointers (objects in Deno, numbers
// in Bun): addresses leave this module as bigint, and buffers are passed as typed arrays.

/** Native types used by moeffi symbol tables. Handles travel as "u64" so no pointer object is needed. */
export type NativeType = "u32" | "i32" | "u64" | "buffer" | "void";

export interface SymbolSpec {
  readonly parameters: readonly NativeType[];
  readonly result: NativeType;
  /** Deno runs the call on a worker thread and returns a Promise; Bun ignores it and blocks. */
  readonly nonblocking?: boolean;
  /** The C symbol, when it differs from the key (one C function bound twice). */
  readonly name?: string;
}
export type SymbolTable = Readonly<Record<string, SymbolSpec>>;

// deno-lint-ignore no-explicit-any
export type NativeFunction = (...args: any[]) => any;
export interface NativeLibrary<T extends SymbolTable> {
  readonly symbols: { readonly [K in keyof T]: NativeFunction };
  close(): void;
}

export interface Runtime {
  readonly name: "deno" | "bun";
  open<T extends SymbolTable>(path: string, symbols: T): NativeLibrary<T>;
  /** The address of a typed array's first byte; 0n for an empty one (Deno passes those as NULL). */
  addressOf(view: ArrayBufferView): bigint;
  /** The `bytes` bytes of native memory at `address` as an ArrayBuffer (no copy). */
  memory(address: bigint, bytes: number): ArrayBuffer;
  /** The NUL-terminated string at `address`. */
  cString(address: bigint): string;
  env(name: string): string | undefined;
}

const isBun = typeof (globalThis as { Bun?: unknown }).Bun !== "undefined";
// A computed specifier keeps Deno's type checker away from bun:ffi (and Bun's from Deno types).
const adapter = isBun ? "./runtime_bun.ts" : "./runtime_deno.ts";
export const runtime: Runtime = (await import(adapter)).runtime;
