// Bun has no URL imports: moeffi is installed as a package. This packs the repository with npm (the
// built libraries included, see package.json "files"), `bun add`s the tarball into a fresh project
// and runs a script there that imports "moeffi" and computes on the CPU.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT } from "../backends/build.ts";

const bun = join(ROOT, "node_modules", ".bin", "bun");

test('`bun add` of the packed tarball gives a working `import ... from "moeffi"`', () => {
  const dir = mkdtempSync(join(tmpdir(), "moeffi-bun-package-"));
  try {
    const tarball = execFileSync("npm", ["pack", "--silent", "--pack-destination", dir], { cwd: ROOT, encoding: "utf8" }).trim()
      .split("\n").at(-1)!;
    writeFileSync(join(dir, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
    execFileSync(bun, ["add", `./${tarball}`], { cwd: dir, stdio: "pipe" });
    writeFileSync(
      join(dir, "main.ts"),
      `import { Context, tensor, topkSoftmax } from "moeffi";
const ctx = new Context({ device: "cpu" });
const { ids } = await topkSoftmax(tensor("f32", [2, 4], [1, 3, 2, 0, 5, 4, 4, 1]), 2, { context: ctx });
console.log(JSON.stringify({ backends: ctx.registry.backends.map((b) => b.name), ids: [...ids.data] }));`,
    );
    const out = JSON.parse(execFileSync(bun, ["run", "main.ts"], { cwd: dir, encoding: "utf8" }).trim().split("\n").at(-1)!);
    assert.ok(out.backends.includes("reference"), `backends: ${out.backends}`);
    assert.deepEqual(out.ids, [1, 2, 0, 1]); // ties go to the lower expert id
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
