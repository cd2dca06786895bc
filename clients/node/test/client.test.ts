// The client against a real daemon: FERRY_BIN names the `ferry` binary (the workspace's tests
// set it; by hand: `FERRY_BIN=../../target/debug/ferry npm test`).

import { strict as assert } from "node:assert";
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { after, before, test } from "node:test";

import { FerryClient, InvalidParams, NotFound, Unavailable, socketPath } from "../src/index.js";

const binary = process.env.FERRY_BIN;
if (!binary) throw new Error("set FERRY_BIN to the ferry binary");
const home = fs.mkdtempSync(path.join(os.tmpdir(), "ferry-node-"));
const dataDir = path.join(home, "data");
let daemon: ChildProcess;

async function reachable(where: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = net.createConnection({ path: where });
    probe.once("connect", () => {
      probe.end();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
}

before(async () => {
  execFileSync(binary, ["--data-dir", dataDir, "init"], { stdio: "ignore" });
  daemon = spawn(binary, ["--data-dir", dataDir, "daemon"], { stdio: "ignore" });
  const deadline = Date.now() + 30_000;
  while (!(await reachable(socketPath(dataDir)))) {
    if (daemon.exitCode !== null || Date.now() > deadline) throw new Error("the daemon did not start");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
});

after(async () => {
  daemon.kill("SIGTERM");
  await new Promise((resolve) => daemon.once("exit", resolve));
  fs.rmSync(home, { recursive: true, force: true });
});

test("every kind of call, with typed errors", async () => {
  const ferry = await FerryClient.connect({ dataDir });
  try {
    const made = await ferry.put("Customer", { name: "Ada", tier: "gold" }, "42");
    assert.equal(made.operation, "create");
    const generated = await ferry.put("Customer", { name: "Bob" });
    assert.equal(generated.id.length, 26);
    await ferry.patch("Customer", "42", { city: "Paris" }, ["tier"]);
    assert.deepEqual((await ferry.get("Customer", "42")).fields, { name: "Ada", city: "Paris" });
    const page = await ferry.list("Customer", { limit: 1 });
    assert.equal(page.records.length, 1);
    assert.notEqual(page.next, null);
    assert.ok((await ferry.collections()).collections.some((c) => c.name === "Customer"));
    assert.equal((await ferry.importRecords([{ collection: "Customer", id: "i1", fields: { n: 1 } }])).imported, 1);
    assert.ok((await ferry.export("Customer", "42")).automerge_base64.length > 0);
    assert.equal((await ferry.status()).daemon, true);
    await ferry.delete("Customer", "42");
    await assert.rejects(ferry.get("Customer", "42"), (e: unknown) => e instanceof NotFound && e.code === -32001);
    await assert.rejects(ferry.call("put", { collection: "Customer", fields: "no" }), InvalidParams);
    await assert.rejects(ferry.sync(), Unavailable);
    assert.deepEqual(await ferry.syncPause(true), { paused: true, remembered: true });
    assert.deepEqual(await ferry.syncResume(), { paused: false, remembered: false });
  } finally {
    ferry.close();
  }
});

test("pipelined writes land in the order they were sent", async () => {
  const ferry = await FerryClient.connect({ dataDir });
  try {
    const writes = Array.from({ length: 200 }, (_, n) => ferry.put("Pipe", { n }, "same"));
    const read = ferry.get("Pipe", "same");
    await Promise.all(writes);
    assert.deepEqual((await read).fields, { n: 199 });
  } finally {
    ferry.close();
  }
});

test("a subscription is an async iterator of changes", async () => {
  const watcher = await FerryClient.connect({ dataDir });
  const writer = await FerryClient.connect({ dataDir });
  try {
    const changes = await watcher.subscribe({ collection: "Watched" });
    await writer.put("Watched", { v: 1 }, "w1");
    await writer.put("Other", { v: 1 }, "o1");
    await writer.delete("Watched", "w1");
    const seen: string[] = [];
    for await (const note of changes) {
      seen.push(`${note.params.operation} ${note.params.id}`);
      if (seen.length === 2) break;
    }
    assert.deepEqual(seen, ["create w1", "delete w1"]);
    await changes.close();
  } finally {
    watcher.close();
    writer.close();
  }
});
