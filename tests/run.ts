// Runs the whole suite under Deno and under Bun, then the static checks, and prints one closing
// line for all: `N passed, N failed`. Exits non-zero when anything failed or a runner could not run.
import { spawn } from "node:child_process";

interface Count {
  passed: number;
  failed: number;
}

function runSuite(cmd: string, args: string[], parse: (out: string) => Count | undefined): Promise<Count & { ok: boolean }> {
  return new Promise((resolve) => {
    let out = "";
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"] });
    const tee = (stream: NodeJS.WritableStream) => (chunk: Buffer) => {
      out += chunk.toString();
      stream.write(chunk);
    };
    child.stdout.on("data", tee(process.stdout));
    child.stderr.on("data", tee(process.stderr));
    child.on("error", (e) => {
      console.error(`cannot start ${cmd}: ${e.message}`);
      resolve({ passed: 0, failed: 1, ok: false });
    });
    child.on("close", (code) => {
      // deno-lint-ignore no-control-regex
      const count = parse(out.replace(/\x1b\[[0-9;]*m/g, ""));
      if (!count) console.error(`${cmd}: no test summary found (exit ${code})`);
      resolve({ ...(count ?? { passed: 0, failed: 1 }), ok: code === 0 && count !== undefined });
    });
  });
}

// `ok | 12 passed | 0 failed` (Deno) and ` 12 pass` / ` 0 fail` (Bun).
const denoCount = (out: string) => {
  const m = [...out.matchAll(/(?:ok|FAILED) \| (\d+) passed(?: \(\d+ steps?\))? \| (\d+) failed/g)].at(-1);
  return m ? { passed: +m[1], failed: +m[2] } : undefined;
};
const bunCount = (out: string) => {
  const p = [...out.matchAll(/^\s*(\d+) pass$/gm)].at(-1), f = [...out.matchAll(/^\s*(\d+) fail$/gm)].at(-1);
  return p && f ? { passed: +p[1], failed: +f[1] } : undefined;
};

const deno = await runSuite("deno", ["test", "-A", "tests/"], denoCount);
const bun = await runSuite("bun", ["test", "--timeout", "600000", "tests/"], bunCount);

// Static checks, one count each: types (the Bun files against bun-types on their own, since they
// declare another global environment), lint, format, and documentation of every export.
const CHECKS: [string, string[]][] = [
  ["deno check", ["check", "mod.ts", "tests/", "bench/", "tools/", "examples/"]],
  ["deno check (Bun files, bun-types)", ["check", "ffi/runtime_bun.ts"]],
  ["deno lint", ["lint"]],
  ["deno fmt --check", ["fmt", "--check"]],
  ["deno doc --lint mod.ts", ["doc", "--lint", "mod.ts"]],
];
const checks = { passed: 0, failed: 0 };
for (const [name, args] of CHECKS) {
  const ok = await runSuite("deno", args, () => ({ passed: 0, failed: 0 }));
  console.log(`${ok.ok ? "ok" : "FAILED"}: ${name}`);
  ok.ok ? checks.passed++ : checks.failed++;
}

console.log(`\ndeno: ${deno.passed} passed, ${deno.failed} failed`);
console.log(`bun: ${bun.passed} passed, ${bun.failed} failed`);
console.log(`static checks: ${checks.passed} passed, ${checks.failed} failed`);
const failed = deno.failed + bun.failed + checks.failed + (deno.ok || deno.failed ? 0 : 1) + (bun.ok || bun.failed ? 0 : 1);
console.log(`${deno.passed + bun.passed + checks.passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
