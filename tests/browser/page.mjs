// Drives the chat page (web/) like a user, for tests/tests/chat_page.rs.
//
// Usage: node page.mjs PLAN_JSON. The plan: { chromium, userDataDir, url, question, codec?, screenshot?,
// killPid?, compare?, phoneScreenshot?, reload? }. Opens the page, waits for the model, picks the first shared context, asks `question` by
// keyboard, waits for the streamed answer and reads the live panel; with `killPid`, kills that process (the cloud)
// as soon as the question is sent; with `compare`, asks again with a local prefill; with `phoneScreenshot`, shoots
// the page at phone width; with `reload`, reloads and reads the model status again. Prints one JSON line.

import { launch } from "./launch.mjs";

const plan = JSON.parse(process.argv[2]);
// Without WebGPU: the page runs its default engine on the CPU (Chromium's software adapter would take minutes per
// answer); tests/tests/browser.rs checks the WebGPU engine.
const context = await launch(plan.chromium, plan.userDataDir, { webgpu: false });
const out = { logs: [] };
try {
  const page = await context.newPage();
  page.on("console", (m) => out.logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => out.logs.push(`pageerror: ${e.message}`));
  await page.setViewportSize({ width: 1200, height: 800 });
  await page.goto(plan.url);
  await page.waitForSelector("#app[data-ready=true]", { timeout: 120_000 });
  out.modelStatus = await page.textContent("#model-status");

  await page.waitForSelector("#context option:nth-child(2)", { state: "attached" });
  await page.selectOption("#context", { index: 1 });
  await page.waitForSelector("#context[data-text=ready]");
  if (plan.codec) await page.selectOption("#codec", plan.codec);
  await page.focus("#prompt");
  await page.keyboard.type(plan.question);
  await page.keyboard.press("Enter");
  if (plan.killPid) process.kill(plan.killPid, "SIGKILL");
  // Streaming shows: some text arrives before the answer is complete.
  await page.waitForSelector(".message.assistant.streaming", { timeout: 120_000 });
  await page.waitForFunction(
    () => (document.querySelector(".message.assistant")?.textContent ?? "").length > 0,
    null,
    { timeout: 120_000 },
  );
  out.sawStreaming = (await page.$(".message.assistant.streaming")) !== null;
  await page.waitForSelector(".message.assistant:not(.streaming)", { timeout: 180_000 });
  out.answer = await page.textContent(".message.assistant");
  out.notice = (await page.isVisible("#notice")) ? await page.textContent("#notice") : null;
  out.panel = await page.evaluate(() =>
    Object.fromEntries([...document.querySelectorAll("#panel [data-field]")].map((e) => [e.dataset.field, e.textContent])),
  );
  out.timelineBars = await page.locator("#panel .timeline rect").count();
  if (plan.screenshot) await page.screenshot({ path: plan.screenshot, fullPage: true });
  if (plan.compare) {
    await page.click("#compare");
    await page.waitForFunction(
      () => (document.querySelector("#compare-result")?.textContent ?? "").startsWith("Local prefill:"),
      null,
      { timeout: 300_000 },
    );
    out.compare = await page.textContent("#compare-result");
  }
  if (plan.phoneScreenshot) {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.screenshot({ path: plan.phoneScreenshot, fullPage: true });
    out.phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
  }
  out.history = await page.locator("#history li").count();
  if (plan.reload) {
    await page.reload();
    await page.waitForSelector("#app[data-ready=true]", { timeout: 120_000 });
    out.reloadedStatus = await page.textContent("#model-status");
    out.historyAfterReload = await page.locator("#history li").count();
  }
} catch (e) {
  out.error = String(e.stack ?? e);
} finally {
  await context.close();
}
console.log(JSON.stringify(out));
