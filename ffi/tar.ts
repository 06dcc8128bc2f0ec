// A minimal .tar.gz writer and reader for release archives: flat folders of regular files, nothing
// else. Written here rather than shelling out to `tar` so it works wherever the runtime does (no tar
// binary needed, same code on Deno and Bun), packing is reproducible (fixed mtime, owner and order;
// gzip bytes may still differ between runtimes' zlib builds), and unpacking refuses anything that is
// not a plain file with a plain name: an archive can never write outside the folder it lands in.
import { gunzipSync, gzipSync } from "node:zlib";

/** One file of a release archive. */
export interface TarEntry {
  /** A bare file name: no folders, no "..". */
  name: string;
  data: Uint8Array;
  /** Permission bits, e.g. 0o755 for a shared library. */
  mode: number;
}

const BLOCK = 512;
const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$/;

/** Writes `value` as a NUL-terminated octal field of `width` bytes at `offset`. */
function octal(header: Uint8Array, offset: number, width: number, value: number): void {
  const text = value.toString(8).padStart(width - 1, "0");
  if (text.length > width - 1) throw new Error(`tar: ${value} does not fit a ${width}-byte field`);
  header.set(new TextEncoder().encode(text), offset);
}

/** One ustar header block; mtime, uid and gid are 0 so the same files always pack to the same bytes. */
function header(entry: TarEntry): Uint8Array {
  const h = new Uint8Array(BLOCK);
  h.set(new TextEncoder().encode(entry.name), 0);
  octal(h, 100, 8, entry.mode & 0o7777);
  octal(h, 108, 8, 0); // uid
  octal(h, 116, 8, 0); // gid
  octal(h, 124, 12, entry.data.length);
  octal(h, 136, 12, 0); // mtime
  h.fill(0x20, 148, 156); // the checksum is computed with its own field as spaces
  h[156] = 0x30; // "0": regular file
  h.set(new TextEncoder().encode("ustar\x0000"), 257);
  const sum = h.reduce((a, b) => a + b, 0);
  octal(h, 148, 7, sum); // six digits, then NUL and the space left from fill()
  h[154] = 0;
  return h;
}

/** Packs flat files into gzip-compressed tar bytes, in the order given. */
export function packTarGz(entries: readonly TarEntry[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const e of entries) {
    if (!SAFE_NAME.test(e.name)) throw new Error(`tar: "${e.name}" is not a plain file name`);
    parts.push(header(e), e.data, new Uint8Array((BLOCK - (e.data.length % BLOCK)) % BLOCK));
  }
  parts.push(new Uint8Array(2 * BLOCK)); // end-of-archive marker
  const tar = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) (tar.set(p, at), (at += p.length));
  return new Uint8Array(gzipSync(tar, { level: 9 }));
}

/** A NUL-terminated text field. */
function field(block: Uint8Array, offset: number, width: number): string {
  const bytes = block.subarray(offset, offset + width);
  const end = bytes.indexOf(0);
  return new TextDecoder().decode(end < 0 ? bytes : bytes.subarray(0, end));
}

/** Unpacks gzip-compressed tar bytes; throws on anything but regular files with plain names. */
export function unpackTarGz(gz: Uint8Array): TarEntry[] {
  const tar = new Uint8Array(gunzipSync(gz));
  const entries: TarEntry[] = [];
  for (let at = 0; at + BLOCK <= tar.length;) {
    const h = tar.subarray(at, at + BLOCK);
    if (h.every((b) => b === 0)) return entries; // end-of-archive marker
    const stored = parseInt(field(h, 148, 8).trim(), 8);
    const sum = h.reduce((a, b, i) => a + (i >= 148 && i < 156 ? 0x20 : b), 0);
    if (stored !== sum) throw new Error(`tar: corrupt header at byte ${at}`);
    const name = field(h, 0, 100), size = parseInt(field(h, 124, 12).trim() || "0", 8), type = h[156];
    const start = at + BLOCK;
    if (start + size > tar.length) throw new Error(`tar: ${name} is truncated`);
    at = start + Math.ceil(size / BLOCK) * BLOCK;
    if (type === 0x35 && /^\.?\/?$/.test(name)) continue; // a "./" folder entry from other tar writers
    if (type !== 0x30 && type !== 0) throw new Error(`tar: ${name} is not a regular file (type ${String.fromCharCode(type)})`);
    const bare = name.replace(/^\.\//, "");
    if (!SAFE_NAME.test(bare)) throw new Error(`tar: "${name}" is not a plain file name`);
    entries.push({ name: bare, data: tar.slice(start, start + size), mode: parseInt(field(h, 100, 8).trim() || "644", 8) });
  }
  throw new Error("tar: archive ends without an end-of-archive marker");
}
