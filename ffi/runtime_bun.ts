/// <reference types="bun-types" />
// Bun side of the FFI adapter (see runtime.ts). Bun has no per-symbol alias, so each C symbol is
// opened once and keys that share it get the same function; "nonblocking" does not exist in Bun.
import { CString, dlopen, type Pointer, ptr, toArrayBuffer } from "bun:ffi";
import type { NativeFunction, NativeLibrary, NativeType, Runtime, SymbolTable } from "./runtime.ts";

const BUN_TYPE: Record<NativeType, string> = { u32: "u32", i32: "i32", u64: "u64", buffer: "ptr", void: "void" };

export const runtime: Runtime = {
  name: "bun",
  open<T extends SymbolTable>(path: string, symbols: T): NativeLibrary<T> {
    const defs: Record<string, { args: string[]; returns: string }> = {};
    for (const [key, spec] of Object.entries(symbols)) {
      defs[spec.name ?? key] = { args: spec.parameters.map((p) => BUN_TYPE[p]), returns: BUN_TYPE[spec.result] };
    }
    // deno-lint-ignore no-explicit-any
    const lib = dlopen(path, defs as any);
    const fns: Record<string, NativeFunction> = {};
    for (const [key, spec] of Object.entries(symbols)) {
      fns[key] = (lib.symbols as Record<string, NativeFunction>)[spec.name ?? key];
    }
    return { symbols: fns as NativeLibrary<T>["symbols"], close: () => lib.close() };
  },
  addressOf(view: ArrayBufferView): bigint {
    return view.byteLength === 0 ? 0n : BigInt(ptr(view as unknown as Uint8Array));
  },
  memory(address: bigint, bytes: number): ArrayBuffer {
    return toArrayBuffer(Number(address) as Pointer, 0, bytes);
  },
  cString(address: bigint): string {
    return new CString(Number(address) as Pointer).toString();
  },
  env(name: string): string | undefined {
    return process.env[name];
  },
};
