// Drives Debian's Chromium (playwright-core) through the @tandem/edge package for tests/tests/browser.rs.
//
// Usage: node chat.mjs PLAN_JSON. The plan: { chromium, userDataDir, pageUrl, sessions: [{ webgpu, memory?, steps }] };
// each session launches the browser on the shared profile (so the Cache Storage persists between sessions), opens
// the page and runs its steps in order. Prints one JSON line: per session, per step, what happened, and with
// `memory: true` the browser's peak memory (the proportional set size of all its processes, sampled every 100 ms).
// Only sessions that ask are sampled: reading a process's PSS walks its page tables, and every 100 ms that took ~40%
// of a core while the engine's gigabyte was mapped, which on two cores slowed a two-thread decode by a third.
//
// Steps: { do: "load", cloudUrl, model, backend?, simd?, threads? } creates an engine (progress events counted); { do: "chat", request } streams
// one answer (pieces and the final stats); each step's report has its wall time (`ms`); { do: "reload" } reloads the page; { do: "poison-cache" } overwrites the
// cached weights with zeros of the same size; { do: "cache-keys" } lists the cached entries.

import { browserPss, launch } from "./launch.mjs";

const plan = JSON.parse(process.argv[2]);
async function step(page, s) {
  switch (s.do) {
    case "load":
      return page.evaluate(async ({ cloudUrl, model, backend, simd, threads }) => {
        const progress = { download: 0, cache: 0, load: 0, maxLoaded: 0 };
        try {
          window.engine?.terminate();
          const engine = await window.tandem.createEngine({
            cloudUrl,
            model,
            backend,
            simd,
            threads,
            onProgress: (p) => {
              progress[p.phase] += 1;
              progress.maxLoaded = Math.max(progress.maxLoaded, p.loaded);
            },
          });
          window.engine = engine;
          return { ok: true, info: engine.stats(), progress };
        } catch (e) {
          return { ok: false, error: String(e.message ?? e), progress };
        }
      }, s);
    case "chat":
      return page.evaluate(async (request) => {
        const pieces = [];
        let stats = null;
        try {
          for await (const chunk of await window.engine.chat.completions.create({ ...request, stream: true })) {
            const text = chunk.choices[0].delta.content;
            if (text !== undefined) pieces.push(text);
            if (chunk.tandem) stats = chunk.tandem;
          }
          return { ok: true, pieces, stats, engine: window.engine.stats() };
        } catch (e) {
          return { ok: false, error: String(e.message ?? e), pieces };
        }
      }, s.request);
    case "reload":
      await page.reload();
      await page.waitForFunction(() => document.title === "ready");
      return { ok: true };
    case "poison-cache":
      return page.evaluate(async () => {
        const cache = await caches.open("tandem-weights-v1");
        const keys = await cache.keys();
        for (const k of keys) {
          const size = (await (await cache.match(k)).arrayBuffer()).byteLength;
          await cache.put(k, new Response(new Uint8Array(size)));
        }
        return { ok: true, poisoned: keys.length };
      });
    case "cache-keys":
      return page.evaluate(async () => {
        const cache = await caches.open("tandem-weights-v1");
        return { ok: true, keys: (await cache.keys()).map((k) => k.url) };
      });
    default:
      throw new Error(`unknown step ${s.do}`);
  }
}

const report = [];
for (const session of plan.sessions) {
  const context = await launch(plan.chromium, plan.userDataDir, { webgpu: session.webgpu });
  const logs = [];
  let peakPss = 0;
  const sampler = session.memory
    ? setInterval(() => (peakPss = Math.max(peakPss, browserPss(plan.userDataDir))), 100)
    : undefined;
  try {
    const page = await context.newPage();
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
    await page.goto(plan.pageUrl);
    await page.waitForFunction(() => document.title === "ready", null, { timeout: 30_000 });
    const steps = [];
    for (const s of session.steps) {
      const t0 = Date.now();
      const result = await step(page, s);
      steps.push({ do: s.do, ms: Date.now() - t0, ...result });
    }
    report.push({ steps, logs, ...(session.memory ? { peakPss } : {}) });
  } catch (e) {
    report.push({ error: String(e.stack ?? e), logs });
  } finally {
    clearInterval(sampler);
    await context.close();
  }
}
console.log(JSON.stringify(report));
