// Importing moeffi from a URL: a copy of the module tree with its own checksum module is served on
// 127.0.0.1 next to a release archive packed from build/lib, and a Deno subprocess imports mod.ts
// over HTTP with a fresh cache folder. Checks: the archive is downloaded, verified and cached; a
// corrupted archive is refused with nothing left in the cache; a warm cache works with the server
// gone. Bun cannot import URLs, so under Bun this test still drives Deno as the subprocess.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, relative } from "node:path";
import process from "node:process";
import { LIB_DIR, ROOT } from "../backends/build.ts";
import { cacheDir, platformName, resolveLibDir, VERSION } from "../ffi/fetch_libs.ts";
import { packTarGz, unpackTarGz } from "../ffi/tar.ts";
import { checksumModule, packRelease } from "../tools/release.ts";

const PLATFORM = platformName();

/** Deno itself when the test runs under Deno; else the one installed in node_modules, else PATH's. */
function denoBinary(): string {
  if (!("Bun" in globalThis) && /deno(\.exe)?$/.test(process.execPath)) return process.execPath;
  const local = join(ROOT, "node_modules", ".bin", "deno");
  return existsSync(local) ? local : "deno";
}

/** Copies the module tree (what `import ".../mod.ts"` reaches): no tests, builds or dependencies. */
function copyModuleTree(to: string): void {
  const copy = (from: string) => {
    const target = join(to, relative(ROOT, from));
    mkdirSync(dirname(target), { recursive: true });
    copyFileSync(from, target);
  };
  for (const f of ["mod.ts", "deno.json"]) copy(join(ROOT, f));
  for (const dir of ["core", "ffi", "cuda"]) {
    for (const f of readdirSync(join(ROOT, dir))) if (f.endsWith(".ts")) copy(join(ROOT, dir, f));
  }
}

/** The bytes behind a request path: /mod/<file of the tree> or /release/<archive>. */
function lookup(path: string, tree: string, release: Map<string, Uint8Array>): Uint8Array | undefined {
  if (path.includes("..")) return undefined;
  if (path.startsWith("/release/")) return release.get(path.slice("/release/".length));
  const file = join(tree, path.replace(/^\/mod\//, ""));
  return path.startsWith("/mod/") && existsSync(file) && statSync(file).isFile() ? readFileSync(file) : undefined;
}

/** A static server on 127.0.0.1; it answers at most `maxRequests` requests, and the test closes it. */
function serve(tree: string, release: Map<string, Uint8Array>, maxRequests = 300): Promise<{ server: Server; url: string }> {
  let requests = 0;
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname);
    const body = ++requests > maxRequests ? undefined : lookup(path, tree, release);
    if (!body) return void res.writeHead(requests > maxRequests ? 503 : 404).end();
    const type = path.endsWith(".ts")
      ? "application/typescript"
      : path.endsWith(".json")
      ? "application/json"
      : "application/gzip";
    res.writeHead(200, { "content-type": type, "content-length": body.length }).end(body);
  });
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(
      0,
      "127.0.0.1",
      () => resolve({ server, url: `http://127.0.0.1:${(server.address() as { port: number }).port}` }),
    );
  });
}

/** The user's program: a tiny CPU MoE forward through moeffi imported over HTTP. */
function userScript(modUrl: string): string {
  return `import { MoeLayer, tensor, toBf16, topkSoftmax } from "${modUrl}";
const h = 16, n = 16, e = 2, m = 2;
const codes = (count) => Uint8Array.from({ length: count }, (_, i) => (i * 37) % 0x60);
using layer = new MoeLayer({ hidden: h, intermediate: n, experts: e, topk: 1, weightScale: "per-channel", actScale: "dynamic-token" });
layer.load({
  w13: tensor("fp8_e4m3", [e, 2 * n, h], codes(e * 2 * n * h)),
  w13Scale: tensor("f32", [e, 2 * n], new Float32Array(e * 2 * n).fill(1 / 64)),
  w2: tensor("fp8_e4m3", [e, h, n], codes(e * h * n)),
  w2Scale: tensor("f32", [e, h], new Float32Array(e * h).fill(1 / 64)),
});
const { ids, weights } = await topkSoftmax(tensor("f32", [m, e], [1, 0, 0, 1]), 1);
const out = await layer.forward(tensor("bf16", [m, h], toBf16(new Float32Array(m * h).fill(0.5))), ids, weights);
console.log("backend " + layer.backendName + ", out " + out.shape.join("x"));
`;
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs the user script under Deno with its own caches; never throws, so failures show their output. */
function runDeno(script: string, env: Record<string, string>): Promise<Run> {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("MOEFFI_")));
  return new Promise((resolve) => {
    execFile(
      denoBinary(),
      ["run", "-A", "--no-lock", "--no-config", script],
      { env: { ...clean, NO_COLOR: "1", MOEFFI_DEVICE: "cpu", ...env }, timeout: 45_000, maxBuffer: 8 << 20 },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : -1) : 0, stdout, stderr }),
    );
  });
}

const show = (r: Run) => `exit ${r.code}\n--- stdout\n${r.stdout}\n--- stderr\n${r.stderr}`;

test("a URL import downloads, verifies and caches the prebuilt backends; refuses a bad archive; works offline", async () => {
  const libraries = readdirSync(LIB_DIR).filter((f) => /\.so$/.test(f)).map((f) => join(LIB_DIR, f));
  assert.ok(
    libraries.some((f) => f.endsWith("libmoeffi_reference.so")),
    "build/lib has no reference backend: run `deno task build`",
  );
  const tmp = mkdtempSync(join(tmpdir(), "moeffi-url-"));
  let server: Server | undefined;
  try {
    const tree = join(tmp, "tree");
    copyModuleTree(tree);
    const archive = packRelease({ libraries, outDir: join(tmp, "dist") });
    writeFileSync(join(tree, "ffi", "checksums.ts"), checksumModule(VERSION, { [PLATFORM]: archive }));
    const good = readFileSync(archive.path);
    const release = new Map([[archive.archive, new Uint8Array(good)]]);
    const served = await serve(tree, release);
    server = served.server;
    const script = join(tmp, "user.ts");
    writeFileSync(script, userScript(`${served.url}/mod/mod.ts`));
    const denoDir = join(tmp, "deno-dir"); // Deno's module cache, shared by the runs below
    const env = (cache: string) => ({ DENO_DIR: denoDir, XDG_CACHE_HOME: cache, MOEFFI_RELEASE_URL: `${served.url}/release/` });

    // 1. fresh cache: download with progress, verify, cache
    const cache = join(tmp, "cache-good");
    const first = await runDeno(script, env(cache));
    assert.equal(first.code, 0, show(first));
    assert.match(first.stdout, /backend reference, out 2x16/);
    assert.match(first.stderr, new RegExp(`${good.length} / ${good.length} bytes`), show(first));
    const libDir = cacheDir(VERSION, PLATFORM, (k) => ({ XDG_CACHE_HOME: cache } as Record<string, string>)[k]);
    assert.deepEqual(readdirSync(libDir).sort(), libraries.map((f) => f.split("/").at(-1)).sort());
    assert.deepEqual(readdirSync(dirname(libDir)), [PLATFORM], "no temp files beside the cache folder");

    // 2. same name, different bytes, fresh cache: refused, nothing half-written
    const bad = new Uint8Array(good);
    bad[bad.length >> 1] ^= 0xff;
    release.set(archive.archive, bad);
    const badCache = join(tmp, "cache-bad");
    const refused = await runDeno(script, env(badCache));
    assert.notEqual(refused.code, 0, show(refused));
    assert.match(refused.stderr, /checksum mismatch/, show(refused));
    const badParent = join(badCache, "moeffi", VERSION);
    assert.deepEqual(existsSync(badParent) ? readdirSync(badParent) : [], [], "the refused archive left files in the cache");

    // 3. the good cache, the server gone: no network needed
    await new Promise((resolve) => server!.close(resolve));
    server = undefined;
    const offline = await runDeno(script, env(cache));
    assert.equal(offline.code, 0, show(offline));
    assert.match(offline.stdout, /backend reference/);
    assert.doesNotMatch(offline.stderr, /downloading/);
  } finally {
    server?.closeAllConnections?.();
    server?.close();
    rmSync(tmp, { recursive: true, force: true });
  }
});

test("the library folder: MOEFFI_LIB_DIR wins, a missing one or an unknown platform says what to do", async () => {
  const tmp = mkdtempSync(join(tmpdir(), "moeffi-libdir-"));
  try {
    const env = (vars: Record<string, string>) => (k: string) => vars[k];
    assert.equal(await resolveLibDir({ env: env({ MOEFFI_LIB_DIR: tmp }) }), tmp);
    await assert.rejects(resolveLibDir({ env: env({ MOEFFI_LIB_DIR: join(tmp, "nope") }) }), /MOEFFI_LIB_DIR=.*is not a folder/);
    await assert.rejects(
      resolveLibDir({ platform: "plan9-mips", checksums: {}, env: env({ XDG_CACHE_HOME: tmp }) }),
      /no prebuilt moeffi .* backends for plan9-mips .*MOEFFI_LIB_DIR/,
    );
    assert.deepEqual(readdirSync(tmp), [], "a failed lookup writes nothing");
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
});

test("release archives: flat files round-trip with their modes; names with folders are refused", () => {
  const files = [
    { name: "libmoeffi_a.so", data: Uint8Array.from({ length: 1000 }, (_, i) => i & 0xff), mode: 0o755 },
    { name: "notes.txt", data: new Uint8Array(0), mode: 0o644 },
  ];
  assert.deepEqual(unpackTarGz(packTarGz(files)), files);
  assert.throws(() => packTarGz([{ name: "../evil.so", data: new Uint8Array(1), mode: 0o755 }]), /not a plain file name/);
  assert.throws(
    () => unpackTarGz(packTarGz(files).subarray(0, 40)),
    /unexpected end|incorrect|truncated|Z_BUF_ERROR|end of file/i,
  );
});
