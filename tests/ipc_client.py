#!/usr/bin/env python3
"""A Ferry app in a few lines of Python: the standard library is all it takes.

Usage: ipc_client.py SOCKET [COLLECTION]

The daemon speaks JSON-RPC 2.0 over a Unix socket, one JSON message per line. This script:

1. subscribes to COLLECTION (default "Note") on one connection,
2. on a second connection, creates, patches, reads, lists and deletes records, including one
   JSON-RPC batch (several requests on one line, answered with one array),
3. reads the change notifications the subscription received and checks them,

then prints a JSON summary on stdout. Any mismatch prints the reason on stderr and exits 1.
The integration test tests/ipc.rs runs it against a real daemon.
"""

import json
import socket
import sys

TIMEOUT_SECONDS = 30


class RpcError(Exception):
    """An error reply: `code` is the JSON-RPC error code, `message` says what to do."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Connection:
    """One connection to the daemon. Replies come back in request order; notifications
    (messages with a "method" and no "id") may arrive in between and are kept aside."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_SECONDS)
        self.sock.connect(path)
        self.lines = self.sock.makefile("rb")
        self.next_id = 1
        self.notifications = []

    def send(self, message):
        self.sock.sendall(json.dumps(message).encode("utf-8") + b"\n")

    def receive(self):
        """The next reply (a dict, or a list for a batch), setting notifications aside."""
        while True:
            line = self.lines.readline()
            if not line:
                raise ConnectionError("the daemon closed the connection")
            message = json.loads(line)
            if isinstance(message, dict) and "method" in message and "id" not in message:
                self.notifications.append(message)
                continue
            return message

    def request(self, method, params):
        """A request object with a fresh id (to send alone or in a batch)."""
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        self.next_id += 1
        return message

    def call(self, method, params):
        """Calls one method and returns its result, or raises RpcError."""
        request = self.request(method, params)
        self.send(request)
        return result_of(self.receive(), request["id"])

    def next_notification(self):
        if not self.notifications:
            line = self.lines.readline()
            if not line:
                raise ConnectionError("the daemon closed the connection")
            self.notifications.append(json.loads(line))
        return self.notifications.pop(0)

    def close(self):
        self.lines.close()
        self.sock.close()


def result_of(reply, expected_id):
    if reply.get("id") != expected_id:
        raise AssertionError(f"reply to id {reply.get('id')!r}, expected {expected_id!r}")
    if "error" in reply:
        raise RpcError(reply["error"]["code"], reply["error"]["message"])
    return reply["result"]


def check(condition, what):
    if not condition:
        raise AssertionError(what)


def main():
    if len(sys.argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    path = sys.argv[1]
    collection = sys.argv[2] if len(sys.argv) == 3 else "Note"

    # 1. Subscribe first, on its own connection, so no change is missed.
    watcher = Connection(path)
    subscription = watcher.call("subscribe", {"collection": collection})["subscription"]

    # 2. Write on a second connection.
    app = Connection(path)
    written = []  # (operation, id) in the order the daemon acknowledged them

    r = app.call("put", {"collection": collection, "id": "a", "fields": {"title": "first", "n": 1}})
    check(r["operation"] == "create", f"put a: {r}")
    written.append(("create", "a"))

    r = app.call("put", {"collection": collection, "fields": {"title": "no id given"}})
    generated = r["id"]
    check(r["operation"] == "create" and generated, f"put without id: {r}")
    written.append(("create", generated))

    r = app.call("patch", {"collection": collection, "id": "a", "fields": {"n": 2},
                           "unset": ["title"]})
    check(r["operation"] == "update", f"patch a: {r}")
    written.append(("update", "a"))

    record = app.call("get", {"collection": collection, "id": "a"})
    check(record["fields"] == {"n": 2}, f"get a after the patch: {record}")

    # Writes to another collection must not reach this subscription.
    app.call("put", {"collection": "Elsewhere", "id": "x", "fields": {"ignored": True}})

    # A batch: one line, several requests, one array of replies. A request without an id is a
    # notification: it runs, but gets no reply.
    put_b = app.request("put", {"collection": collection, "id": "b", "fields": {"tags": ["x"]}})
    get_a = app.request("get", {"collection": collection, "id": "a"})
    bogus = app.request("no_such_method", {})
    put_c = {"jsonrpc": "2.0", "method": "put",
             "params": {"collection": collection, "id": "c", "fields": {"quiet": True}}}
    app.send([put_b, get_a, bogus, put_c])
    replies = app.receive()
    check(isinstance(replies, list) and len(replies) == 3, f"batch replies: {replies}")
    by_id = {reply["id"]: reply for reply in replies}
    check(result_of(by_id[put_b["id"]], put_b["id"])["operation"] == "create", "batch put b")
    check(result_of(by_id[get_a["id"]], get_a["id"])["fields"] == {"n": 2}, "batch get a")
    try:
        result_of(by_id[bogus["id"]], bogus["id"])
        raise AssertionError("an unknown method in a batch succeeded")
    except RpcError as e:
        check(e.code == -32601 and "no_such_method" in e.message, f"unknown method: {e}")
    written.append(("create", "b"))
    written.append(("create", "c"))

    r = app.call("delete", {"collection": collection, "id": "b"})
    check(r["operation"] == "delete", f"delete b: {r}")
    written.append(("delete", "b"))

    try:
        app.call("get", {"collection": collection, "id": "b"})
        raise AssertionError("a deleted record can still be read")
    except RpcError as e:
        not_found = {"code": e.code, "message": e.message}
        check(e.code == -32001, f"get of a deleted record: {e}")

    listing = app.call("list", {"collection": collection})
    listed = sorted(r["id"] for r in listing["records"])
    check(listed == sorted(["a", "c", generated]), f"list: {listing}")

    # 3. Every acknowledged change, in order, and nothing else.
    notifications = []
    for operation, record_id in written:
        n = watcher.next_notification()
        p = n["params"]
        check(n["method"] == "change" and p["subscription"] == subscription,
              f"notification: {n}")
        check((p["operation"], p["collection"], p["id"]) == (operation, collection, record_id),
              f"expected {operation} {collection}/{record_id}, got {n}")
        notifications.append({"operation": operation, "id": record_id, "heads": p["heads"]})

    r = watcher.call("unsubscribe", {"subscription": subscription})
    check(r == {"unsubscribed": subscription}, f"unsubscribe: {r}")
    check(not watcher.notifications, f"unexpected notifications: {watcher.notifications}")
    watcher.close()
    app.close()

    print(json.dumps({
        "collection": collection,
        "subscription": subscription,
        "generated_id": generated,
        "notifications": notifications,
        "listed": listed,
        "not_found": not_found,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (AssertionError, RpcError, OSError, ValueError, KeyError) as e:
        print(f"ipc_client.py: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
