// Drives Ferry's web interface in headless Chromium for tests/web_ui.rs, which starts the relay
// and the daemons and tells this script what to expect through the environment. Steps that need
// the test to act (a daemon writing, checking a daemon) are a line on stdout (`await NAME`)
// answered by a line on stdin. A screenshot of each page goes to FERRY_SHOTS.
import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = env("FERRY_URL");
const shots = env("FERRY_SHOTS");
const expect = JSON.parse(env("FERRY_EXPECT"));
const TIMEOUT = 20000;

mkdirSync(shots, { recursive: true });
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
async function handOver(step) {
  console.log(`await ${step}`);
  const { value, done } = await lines.next();
  if (done || value.trim() !== "ok") throw new Error(`the test did not answer ${step}: ${value}`);
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let page;
try {
  // The relay's own certificate is self-signed (devices pin it); the browser is told to accept it.
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1200, height: 800 } });
  page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT);
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("dialog", (dialog) => dialog.accept());
  const shot = async (name) => {
    await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
    console.log(`screenshot ${shots}/${name}.png`);
  };

  // Sign in: a wrong password is refused with a message, the right one shows the records.
  await page.goto(url);
  await page.getByRole("button", { name: "Sign in" }).waitFor();
  check(!(await page.locator("#nav").isVisible()), "the sections are hidden until signed in");
  check(!(await page.getByRole("button", { name: "Sign out" }).isVisible()), "no sign-out before sign-in");
  await page.getByLabel("Account").fill(expect.account);
  await page.getByLabel("Password").fill("not the password");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#sign-in-error").filter({ hasText: /./ }).waitFor();
  await shot("sign-in");
  await page.getByLabel("Password").fill(expect.password);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#nav").waitFor({ state: "visible" });
  await page.locator(".live.on").waitFor();
  await page.locator(`.alert[data-alert="${expect.alert}"]`).waitFor();

  // The record a daemon wrote, in its collection's list and on its own page with its history.
  const { collection, id, field, value } = expect.record;
  await page.getByRole("link", { name: new RegExp(`^${collection} `) }).click();
  const row = page.locator(`tr[data-record="${id}"]`);
  await row.waitFor();
  check((await row.innerText()).includes(value), `the ${collection} list shows ${value}`);
  await shot("records");
  await row.getByRole("link", { name: id }).click();
  await page.locator(`tr[data-field="${field}"] td.value`, { hasText: value }).waitFor();
  const history = page.getByRole("table", { name: "History" });
  check((await history.locator("tbody tr").count()) >= 1, "the record's history has its changes");
  await shot("record");

  // Live: a record a daemon writes now appears without reloading the page.
  await page.getByRole("link", { name: `← ${collection}` }).click();
  await row.waitFor();
  await handOver("live-write");
  await page.locator(`tr[data-record="${expect.live_id}"]`).waitFor();
  await shot("live-update");

  // The conflict queue: both sides field by field; resolving by clicking.
  await page.getByRole("link", { name: /Conflicts/ }).click();
  const card = page.locator("article.conflict").first();
  await card.waitFor();
  const cardText = await card.innerText();
  for (const side of expect.conflict_values) {
    check(cardText.includes(side), `the conflict shows ${side}: ${cardText}`);
  }
  await shot("conflicts");
  await card.getByRole("button", { name: "Keep client" }).click();
  await page.locator("#no-conflicts").waitFor();
  await shot("conflicts-resolved");
  await handOver("resolved");

  // Devices, the sync log and the charts.
  await page.getByRole("link", { name: "Devices" }).click();
  await page.getByRole("table", { name: "Devices" }).waitFor();
  check((await page.locator("tr[data-device]").count()) >= 3, "two daemons and this browser are listed");
  await shot("devices");
  await page.getByRole("link", { name: "Sync log" }).click();
  await page.getByRole("table", { name: "Sync log" }).waitFor();
  await shot("sync-log");
  await page.getByRole("link", { name: "Activity" }).click();
  await page.locator("svg.chart").first().waitFor();
  check((await page.locator("svg.chart rect").count()) > 0, "the volume chart has bars");
  await shot("activity");

  check(errors.length === 0, `the page threw: ${errors.join("; ")}`);
  console.log("done");
} catch (e) {
  if (page) await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
  console.error(e.stack || String(e));
  process.exitCode = 1;
} finally {
  await browser.close();
  process.exit();
}
