// Deno side of the FFI adapter (see runtime.ts).
import type { NativeLibrary, Runtime, SymbolTable } from "./runtime.ts";

export const runtime: Runtime = {
  name: "deno",
  open<T extends SymbolTable>(path: string, symbols: T): NativeLibrary<T> {
    // deno-lint-ignore no-explicit-any
    return Deno.dlopen(path, symbols as any) as unknown as NativeLibrary<T>;
  },
  addressOf(view: ArrayBufferView): bigint {
    if (view.byteLength === 0) return 0n;
    return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(view as Uint8Array<ArrayBuffer>)));
  },
  memory(address: bigint, bytes: number): ArrayBuffer {
    return Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(address)!, bytes);
  },
  cString(address: bigint): string {
    return Deno.UnsafePointerView.getCString(Deno.UnsafePointer.create(address)!);
  },
  env(name: string): string | undefined {
    try {
      return Deno.env.get(name);
    } catch {
      return undefined; // no --allow-env: behave as if unset
    }
  },
};
