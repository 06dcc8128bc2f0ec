// Where the built-in backend libraries come from when moeffi is imported from a URL (Deno:
// `import ... from "https://.../mod.ts"`), where there is no build/lib folder beside the code.
// In order: MOEFFI_LIB_DIR; the cache folder ($XDG_CACHE_HOME or ~/.cache)/moeffi/<version>/<platform>/;
// else the platform's archive from the release (MOEFFI_RELEASE_URL), verified against the sha256
// in ./checksums.ts, which ships with the code (written by `deno task release`), so the code one
// trusts vouches for the binaries it loads. The download goes to a temp file beside the cache
// folder, is verified, unpacked into a temp folder and renamed into place in one step: the cache
// folder either holds a verified release or does not exist. This runs once, at module load (top-level
// await), so the plugin loader stays synchronous; any failure fails the import with a message that
// says what to do (a refused archive must never degrade silently into "no backends").
// Deno permissions for a URL import: --allow-import (hosts other than Deno's defaults), --allow-net
// (the release host, first run only), --allow-read/--allow-write (the cache), --allow-env, --allow-ffi;
// or simply -A. Archives are unpacked by ./tar.ts, not by a `tar` binary.
import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import denoJson from "../deno.json" with { type: "json" };
import { CHECKSUMS, type PlatformChecksum, VERSION as CHECKSUMS_VERSION } from "./checksums.ts";
import { runtime } from "./runtime.ts";
import { unpackTarGz } from "./tar.ts";

/** moeffi's version (deno.json); it names the cache folder and the release. */
export const VERSION: string = denoJson.version;

/** Raised when prebuilt libraries cannot be found, fetched or trusted; the message says what to do. */
export class LibraryFetchError extends Error {
  override name = "LibraryFetchError";
}

/** This machine's platform as release archives name it, e.g. "linux-x64", "darwin-arm64". */
export function platformName(): string {
  return `${process.platform}-${process.arch}`;
}

/** The release archive's file name for a version and platform. */
export function archiveName(version: string, platform: string): string {
  return `moeffi-${version}-${platform}.tar.gz`;
}

/** Where releases are downloaded from unless MOEFFI_RELEASE_URL says otherwise. */
export function defaultReleaseUrl(version: string): string {
  return `https://github.com/moeffi/moeffi/releases/download/v${version}`;
}

type Env = (name: string) => string | undefined;
// runtime.env: a Deno run without --allow-env reads every variable as unset instead of throwing.
const processEnv: Env = (name) => runtime.env(name) || undefined;

/** The cache folder for one version and platform (it may not exist yet). */
export function cacheDir(version: string, platform: string, env: Env = processEnv): string {
  const base = env("XDG_CACHE_HOME") ?? join(env("HOME") ?? homedir(), ".cache");
  return join(base, "moeffi", version, platform);
}

/** What resolveLibDir needs; every field has a default from this module and the environment. */
export interface LibSource {
  version?: string;
  platform?: string;
  checksums?: Readonly<Record<string, PlatformChecksum>>;
  env?: Env;
  /** Progress and status lines (default: stderr). */
  log?: (line: string, final: boolean) => void;
}

/** The folder of verified prebuilt libraries: from MOEFFI_LIB_DIR, the cache, or a fresh download. */
export async function resolveLibDir(source: LibSource = {}): Promise<string> {
  const { version = VERSION, platform = platformName(), checksums = CHECKSUMS, env = processEnv, log = stderrLine } = source;
  const explicit = env("MOEFFI_LIB_DIR");
  if (explicit) {
    if (!isDir(explicit)) throw new LibraryFetchError(`MOEFFI_LIB_DIR=${explicit} is not a folder`);
    return explicit;
  }
  const dir = cacheDir(version, platform, env);
  if (isDir(dir)) return dir; // only ever created by the rename below, so complete and verified
  if (checksums === CHECKSUMS && CHECKSUMS_VERSION !== version) {
    throw new LibraryFetchError(
      `ffi/checksums.ts was written for moeffi ${CHECKSUMS_VERSION}, but this is ${version}: run \`deno task release\` again`,
    );
  }
  const expected = checksums[platform];
  if (!expected) {
    throw new LibraryFetchError(
      `no prebuilt moeffi ${version} backends for ${platform} (this release has: ${
        Object.keys(checksums).join(", ") || "none"
      }); ` +
        "build them with `deno task build` in a checkout and set MOEFFI_LIB_DIR to its build/lib folder",
    );
  }
  const base = (env("MOEFFI_RELEASE_URL") ?? defaultReleaseUrl(version)).replace(/\/+$/, "");
  await install(`${base}/${expected.archive}`, expected.sha256, dir, log);
  return dir;
}

function isDir(path: string): boolean {
  return existsSync(path) && statSync(path).isDirectory();
}

/** Downloads, verifies and unpacks an archive into `dir`, atomically; leaves nothing behind on failure. */
async function install(url: string, sha256: string, dir: string, log: NonNullable<LibSource["log"]>): Promise<void> {
  const parent = join(dir, "..");
  mkdirSync(parent, { recursive: true });
  const unique = `${process.pid}-${Date.now().toString(36)}`;
  const file = join(parent, `.download-${unique}.tar.gz`);
  let staging: string | undefined;
  try {
    const got = await download(url, file, log);
    if (got !== sha256.toLowerCase()) {
      throw new LibraryFetchError(
        `checksum mismatch for ${url}: expected sha256 ${sha256}, got ${got}; the archive was refused and nothing was cached`,
      );
    }
    staging = mkdtempSync(join(parent, `.unpack-${unique}-`));
    const entries = unpackTarGz(readFileSync(file));
    if (!entries.some((e) => /\.(so|dylib|dll)$/.test(e.name))) throw new LibraryFetchError(`${url} holds no libraries`);
    for (const e of entries) writeFileSync(join(staging, e.name), e.data, { mode: e.mode });
    try {
      renameSync(staging, dir);
      staging = undefined;
    } catch (e) {
      if (!isDir(dir)) throw e; // else another process installed the same verified release first
    }
    log(`moeffi: prebuilt backends installed in ${dir}`, true);
  } finally {
    rmSync(file, { force: true });
    if (staging) rmSync(staging, { recursive: true, force: true });
  }
}

/** Streams `url` into `file`, reporting progress; returns the sha256 (hex) of what arrived. */
async function download(url: string, file: string, log: NonNullable<LibSource["log"]>): Promise<string> {
  let res: Response;
  try {
    res = await fetch(url);
  } catch (e) {
    throw new LibraryFetchError(`cannot download ${url}: ${(e as Error).message}`);
  }
  if (!res.ok || !res.body) {
    await res.body?.cancel();
    throw new LibraryFetchError(`cannot download ${url}: HTTP ${res.status} ${res.statusText}`);
  }
  const total = Number(res.headers.get("content-length")) || 0;
  const hash = createHash("sha256");
  const fd = openSync(file, "wx");
  let received = 0, shown = 0;
  const show = (final: boolean) =>
    log(
      `moeffi: downloading ${url}: ${received} / ${total || "?"} bytes${
        total ? ` (${Math.floor((100 * received) / total)}%)` : ""
      }`,
      final,
    );
  try {
    const reader = res.body.getReader();
    for (let r = await reader.read(); !r.done; r = await reader.read()) {
      writeSync(fd, r.value);
      hash.update(r.value);
      received += r.value.length;
      if (performance.now() - shown > 200) (show(false), (shown = performance.now()));
    }
  } finally {
    closeSync(fd);
  }
  show(true);
  return hash.digest("hex");
}

let plainShown = -Infinity;
/** Progress overwrites itself on a terminal; elsewhere (logs, CI) a line every few seconds, and the last. */
function stderrLine(line: string, final: boolean): void {
  if (process.stderr.isTTY) return void process.stderr.write(`\r${line}${final ? "\n" : ""}`);
  if (!final && performance.now() - plainShown < 5000) return;
  plainShown = performance.now();
  process.stderr.write(`${line}\n`);
}

/** The prebuilt library folder when this module was loaded from a URL; undefined for a local checkout. */
export const PREBUILT_LIB_DIR: string | undefined = import.meta.url.startsWith("file:") ? undefined : await resolveLibDir();
