// The number-format shortcuts of cuda/numerics.cuh that the nvfp4 backend relies on (magic-add e2m1 and
// e4m3, the exact division by 6, the correctly rounded exp of the SiLU, prmt sign packing), checked on the
// host by tests/nvfp4_numerics_check.cu in its quick mode (1 in 61 of the 2^32 floats; run it without
// `quick` for the exhaustive check). Skipped where nvcc is missing.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { nvccPath, ROOT } from "../backends/build.ts";

const run = promisify(execFile);
const nvcc = nvccPath();

test(
  "nvfp4 numerics: the shortcuts equal their definitions (host check, quick mode)",
  { skip: !nvcc && "nvcc not found" },
  async () => {
    const exe = join(mkdtempSync(join(tmpdir(), "moeffi-numerics-")), "check");
    await run(nvcc!, [
      "-O2",
      "-Xcompiler",
      "-fopenmp",
      "-I",
      join(ROOT, "cuda"),
      "-I",
      join(ROOT, "backends"),
      join(ROOT, "tests", "nvfp4_numerics_check.cu"),
      "-o",
      exe,
    ]);
    const { stdout } = await run(exe, ["quick"], { timeout: 120_000 });
    assert.match(stdout, /^6 passed, 0 failed$/m, stdout);
  },
);
