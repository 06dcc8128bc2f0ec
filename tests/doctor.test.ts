// `deno task doctor` / `bun run tools/doctor.ts` in a subprocess of the runtime running this test:
// every section is there, the reference backend is listed with its manifest, and each preset's
// ops name the backend the oracle picks (whatever the machine: the assertions hold with or without a GPU).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { join } from "node:path";
import process from "node:process";
import { ROOT } from "../backends/build.ts";
import { OPS } from "../ffi/abi.ts";
import { PRESETS } from "../tools/doctor.ts";

const isBun = "Bun" in globalThis;

/** Runs the doctor under this runtime; resolves with its exit code and output. */
function runDoctor(): Promise<{ code: number; stdout: string; stderr: string }> {
  const args = isBun ? ["run", join(ROOT, "tools", "doctor.ts")] : ["run", "-A", join(ROOT, "tools", "doctor.ts")];
  // Selection variables of the caller would change the verdicts; the plugin path is kept out too.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("MOEFFI_")));
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      args,
      { cwd: ROOT, env: { ...env, NO_COLOR: "1" }, timeout: 60_000, maxBuffer: 8 << 20 },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : -1) : 0, stdout, stderr }),
    );
  });
}

test("the doctor reports runtime, GPU, toolkit, backends and the oracle's pick for every preset and op", async () => {
  const { code, stdout, stderr } = await runDoctor();
  assert.equal(code, 0, `exit ${code}\n${stdout}\n${stderr}`);
  for (const section of ["Runtime", "GPU", "CUDA toolkit", "Backends", "Oracle"]) {
    assert.match(stdout, new RegExp(`^${section}`, "m"), `no ${section} section:\n${stdout}`);
  }
  assert.match(stdout, isBun ? /^ {2}bun \d+\.\d+/m : /^ {2}deno \d+\.\d+/m);
  assert.match(stdout, /^ {2}OS: \w+ \w+/m);
  assert.match(stdout, /^ {2}driver: /m);
  assert.match(stdout, /^ {2}(GPUs: none \(.+\)|cuda:0: .+compute capability \d+\.\d+)/m);
  assert.match(stdout, /^ {2}nvcc: /m);
  assert.match(stdout, /^ {2}reference \S+: loaded \(built-in\), device cpu/m);
  assert.match(stdout, /^ {6}ops: fp8_moe, fp8_scaled_mm, topk_softmax, nvfp4_experts_quant/m);
  assert.match(stdout, /^ {6}path: .*libmoeffi_reference\.so$/m);
  for (const p of PRESETS) {
    const start = stdout.indexOf(`  ${p.name}: K=${p.k} N=${p.n} E=${p.experts} topk=${p.topk}, M=16`);
    assert.ok(start >= 0, `no ${p.name} preset:\n${stdout}`);
    const block = stdout.slice(start).split(/\n {2}(?=\S)/)[0];
    for (const op of OPS) {
      assert.match(block, new RegExp(`^ {4}${op}: \\S+ \\(priority -?\\d+: .+\\)$`, "m"), `${p.name} ${op}:\n${block}`);
    }
    assert.match(block, /^ {6}\* \S+: yes/m, "the chosen backend is marked");
  }
});
