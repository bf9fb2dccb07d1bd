// Launching Debian's Chromium for the drivers, and measuring its memory.

import { readFileSync, readdirSync } from "node:fs";
import { chromium } from "playwright-core";

const FLAGS = [
  "--no-sandbox",
  "--disable-gpu-sandbox",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
  "--disable-quic",
];

/// A browser on `profile` (kept between launches, so its caches persist); `webgpu` exposes Chromium's software
/// adapter (SwiftShader).
export function launch(executablePath, profile, { webgpu = false } = {}) {
  return chromium.launchPersistentContext(profile, {
    executablePath,
    headless: true,
    args: [...FLAGS, ...(webgpu ? ["--enable-unsafe-webgpu"] : [])],
  });
}

/// The summed PSS of the processes started with this profile, in bytes.
export function browserPss(profile) {
  let total = 0;
  for (const pid of readdirSync("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      if (!readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(profile)) continue;
      const m = /^Pss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, "utf8"));
      if (m) total += Number(m[1]) * 1024;
    } catch {
      // The process ended between the listing and the read.
    }
  }
  return total;
}
