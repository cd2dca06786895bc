"""The client against a real daemon: `FERRY_BIN` names the `ferry` binary (the workspace's
tests set it; by hand: `FERRY_BIN=target/debug/ferry python3 -m unittest discover -s
clients/python/tests -t clients/python`)."""

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

import ferry_client
from ferry_client import AsyncClient, Client

TIMEOUT = 30


class Daemon:
    """`ferry init` and `ferry daemon` on a fresh data directory."""

    def __init__(self):
        self.binary = os.environ["FERRY_BIN"]
        self.dir = tempfile.mkdtemp(prefix="ferry-py-")
        self.data = os.path.join(self.dir, "data")
        subprocess.run([self.binary, "--data-dir", self.data, "init"], check=True,
                       capture_output=True, timeout=TIMEOUT)
        self.process = subprocess.Popen([self.binary, "--data-dir", self.data, "daemon"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = ferry_client.socket_path(self.data)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(path)
                probe.close()
                break
            except OSError:
                probe.close()
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the daemon did not start")
                time.sleep(0.02)

    def stop(self):
        self.process.terminate()
        self.process.wait(TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)


class BlockingClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def connect(self):
        client = Client.connect(data_dir=self.daemon.data, timeout=TIMEOUT)
        self.addCleanup(client.close)
        return client

    def test_every_kind_of_call_and_typed_errors(self):
        ferry = self.connect()
        made = ferry.put("Customer", {"name": "Ada", "tier": "gold"}, id="42")
        self.assertEqual(made["operation"], "create")
        generated = ferry.put("Customer", {"name": "Bob"})
        self.assertEqual(len(generated["id"]), 26)
        ferry.patch("Customer", "42", fields={"city": "Paris"}, unset=["tier"])
        self.assertEqual(ferry.get("Customer", "42")["fields"], {"name": "Ada", "city": "Paris"})
        page = ferry.list("Customer", limit=1)
        self.assertEqual(len(page["records"]), 1)
        self.assertIsNotNone(page["next"])
        names = {c["name"] for c in ferry.collections()["collections"]}
        self.assertIn("Customer", names)
        ops = [c["operation"] for c in ferry.history("Customer", "42")["changes"]]
        self.assertEqual(ops, ["create", "update"])
        self.assertEqual(ferry.import_records([{"collection": "Customer", "id": "i1", "fields": {"n": 1}}])["imported"], 1)
        self.assertTrue(ferry.export("Customer", "42")["automerge_base64"])
        self.assertGreaterEqual(ferry.queue()["counts"]["pending"], 4)
        self.assertTrue(ferry.status()["daemon"])
        self.assertEqual(ferry.call("conflicts.list")["conflicts"], [])
        ferry.delete("Customer", "42")
        with self.assertRaises(ferry_client.NotFound) as caught:
            ferry.get("Customer", "42")
        self.assertEqual(caught.exception.code, -32001)
        with self.assertRaises(ferry_client.InvalidParams):
            ferry.call("put", collection="Customer", fields="not an object")
        with self.assertRaises(ferry_client.FerryError):
            ferry.call("no.such.method")
        # No relay is configured: sync cannot run, a remembered pause can be kept.
        with self.assertRaises(ferry_client.Unavailable):
            ferry.sync()
        self.assertEqual(ferry.sync_pause(remember=True), {"paused": True, "remembered": True})
        self.assertEqual(ferry.sync_resume(), {"paused": False, "remembered": False})

    def test_pipelined_writes_land_in_order(self):
        ferry = self.connect()
        calls = [("put", {"collection": "Pipe", "id": "same", "fields": {"n": n}}) for n in range(200)]
        calls.append(("get", {"collection": "Pipe", "id": "same"}))
        answers = ferry.call_many(calls)
        self.assertEqual(answers[-1]["fields"], {"n": 199})
        self.assertTrue(all(not isinstance(a, ferry_client.FerryError) for a in answers))

    def test_a_subscription_iterates_over_changes(self):
        watcher = self.connect()
        writer = self.connect()
        changes = watcher.subscribe(collection="Watched")
        writer.put("Watched", {"v": 1}, id="w1")
        writer.delete("Watched", "w1")
        writer.put("Other", {"v": 1}, id="o1")
        seen = [next(changes)["params"] for _ in range(2)]
        self.assertEqual([(s["operation"], s["id"]) for s in seen], [("create", "w1"), ("delete", "w1")])
        self.assertEqual(seen[0]["origin"], "local")
        changes.close()
        # Resuming from a change's number, with the records' fields.
        again = watcher.subscribe(collection="Watched", since=seen[0]["seq"], fields=True)
        resumed = next(again)["params"]
        self.assertEqual((resumed["operation"], resumed["seq"], resumed["fields"]), ("delete", seen[1]["seq"], None))


class AsyncClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.daemon = Daemon()

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()

    def test_concurrent_calls_subscriptions_and_errors(self):
        async def scenario():
            async with await AsyncClient.connect(data_dir=self.daemon.data) as ferry:
                changes = await ferry.subscribe(collection="Async")
                written = await asyncio.gather(
                    *(ferry.put("Async", {"n": n}, id=f"a{n:03}") for n in range(100))
                )
                self.assertEqual({w["operation"] for w in written}, {"create"})
                listed = await ferry.list("Async", limit=1000)
                self.assertEqual(len(listed["records"]), 100)
                with self.assertRaises(ferry_client.NotFound):
                    await ferry.get("Async", "missing")
                ids = set()
                async for note in changes:
                    ids.add(note["params"]["id"])
                    if len(ids) == 100:
                        break
                await changes.close()

        asyncio.run(asyncio.wait_for(scenario(), TIMEOUT))


if __name__ == "__main__":
    unittest.main()
