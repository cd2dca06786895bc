"""A client for the Ferry daemon's local socket, standard library only.

The daemon speaks JSON-RPC 2.0, one JSON message per line, over a Unix socket
(docs/IPC.md). `Client` is blocking; `AsyncClient` is the same API for asyncio. Both
connect by data directory (reading its config for `ipc.socket`) or by socket path, offer
every method as a Python method, deliver subscriptions as iterators, raise `FerryError`
subclasses named after the stable error codes, and pipeline: requests go out without
waiting for earlier answers, which are matched by id.
"""

import asyncio
import itertools
import json
import os
import socket
import threading
import tomllib

__all__ = [
    "AsyncClient",
    "Client",
    "FerryError",
    "NotFound",
    "TooLarge",
    "UnknownCollection",
    "DiskFull",
    "StorageError",
    "StoreDamaged",
    "Unavailable",
    "InvalidState",
    "Busy",
    "SyncFailed",
    "AlreadySettled",
    "NoAccountKey",
    "DecryptionFailed",
    "InvalidParams",
    "socket_path",
]


class FerryError(Exception):
    """An error answer: `code` is the stable JSON-RPC code, `message` says what to do."""

    code = None

    def __init__(self, code, message):
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class InvalidParams(FerryError):
    code = -32602


class NotFound(FerryError):
    code = -32001


class TooLarge(FerryError):
    code = -32002


class UnknownCollection(FerryError):
    code = -32003


class DiskFull(FerryError):
    code = -32004


class StorageError(FerryError):
    code = -32005


class StoreDamaged(FerryError):
    code = -32006


class Unavailable(FerryError):
    code = -32007


class InvalidState(FerryError):
    code = -32008


class Busy(FerryError):
    code = -32009


class SyncFailed(FerryError):
    code = -32010


class AlreadySettled(FerryError):
    code = -32011


class NoAccountKey(FerryError):
    code = -32012


class DecryptionFailed(FerryError):
    code = -32013


_BY_CODE = {
    cls.code: cls
    for cls in FerryError.__subclasses__()
    if cls.code is not None
}


def _error(error):
    code = error.get("code")
    return _BY_CODE.get(code, FerryError)(code, error.get("message", ""))


def socket_path(data_dir=None):
    """The socket of the daemon on `data_dir` (default: $FERRY_DATA_DIR, else
    $XDG_DATA_HOME/ferry, else ~/.local/share/ferry): its config's `ipc.socket`, or
    DATA_DIR/ferry.sock."""
    if data_dir is None:
        data_dir = os.environ.get("FERRY_DATA_DIR") or os.path.join(
            os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "ferry"
        )
    try:
        with open(os.path.join(data_dir, "config.toml"), "rb") as f:
            configured = tomllib.load(f).get("ipc", {}).get("socket")
    except FileNotFoundError:
        configured = None
    return configured or os.path.join(data_dir, "ferry.sock")


def _params(**given):
    return {k: v for k, v in given.items() if v is not None}


class _Methods:
    """Every method of the socket, written once over `_call(method, params)`; the blocking
    client returns answers, the asyncio one awaitables."""

    def put(self, collection, fields, id=None):
        return self._call("put", _params(collection=collection, id=id, fields=fields))

    def patch(self, collection, id, fields=None, unset=None):
        return self._call("patch", _params(collection=collection, id=id, fields=fields, unset=unset))

    def delete(self, collection, id):
        return self._call("delete", {"collection": collection, "id": id})

    def get(self, collection, id):
        return self._call("get", {"collection": collection, "id": id})

    def list(self, collection, limit=None, after=None):
        return self._call("list", _params(collection=collection, limit=limit, after=after))

    def collections(self):
        return self._call("collections", {})

    def history(self, collection, id):
        return self._call("history", {"collection": collection, "id": id})

    def import_records(self, records):
        """`records`: dicts of `collection`, `id` (optional) and `fields`; all land or none."""
        return self._call("import", {"records": records})

    def export(self, collection, id):
        return self._call("export", {"collection": collection, "id": id})

    def queue(self, status=None, limit=None, after=None, before=None, newest_first=None):
        return self._call(
            "queue",
            _params(status=status, limit=limit, after=after, before=before, newest_first=newest_first),
        )

    def retry(self, ids=None, all_failed=None):
        return self._call("retry", _params(ids=ids, all_failed=all_failed))

    def log(self, before=None, limit=None):
        return self._call("log", _params(before=before, limit=limit))

    def status(self):
        return self._call("status", {})

    def sync(self, retry_failed=None):
        return self._call("sync", _params(retry_failed=retry_failed))

    def sync_pause(self, remember=None):
        return self._call("sync.pause", _params(remember=remember))

    def sync_resume(self):
        return self._call("sync.resume", {})

    def conflicts(self, status=None, collection=None, after=None, limit=None):
        return self._call(
            "conflicts.list", _params(status=status, collection=collection, after=after, limit=limit)
        )

    def conflict(self, id):
        return self._call("conflicts.get", {"id": id})

    def resolve(self, id, take, data=None):
        return self._call("conflicts.resolve", _params(id=id, take=take, data=data))

    def key_reload(self):
        return self._call("key.reload", {})

    def doctor(self, repair=None):
        return self._call("doctor", _params(repair=repair))


class Subscription:
    """Notifications for one subscription (`change`, `conflict` or `lagged` messages, each a
    dict with `method` and `params`), in the order the daemon sent them."""

    def __init__(self, client, number):
        self.client = client
        self.number = number

    def __iter__(self):
        return self

    def __next__(self):
        return self.client._next_notification(self.number)

    def close(self):
        self.client._call("unsubscribe", {"subscription": self.number})


class Client(_Methods):
    """A blocking connection to the daemon. Thread-safe: calls from several threads are
    pipelined on the one connection. `call_many` sends several requests before reading any
    answer."""

    def __init__(self, path, timeout=30.0):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(path)
        self._lines = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._replies = {}
        self._notes = {}
        self._reading = False

    @classmethod
    def connect(cls, data_dir=None, socket=None, timeout=30.0):
        return cls(socket or socket_path(data_dir), timeout)

    def close(self):
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _send(self, method, params):
        request_id = next(self._ids)
        line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        with self._lock:
            self._sock.sendall(line.encode("utf-8") + b"\n")
        return request_id

    def _read_one(self):
        line = self._lines.readline()
        if not line:
            raise ConnectionError("the daemon closed the connection")
        message = json.loads(line)
        if "id" in message:
            self._replies[message["id"]] = message
        elif message.get("method") in ("change", "conflict", "lagged"):
            number = message.get("params", {}).get("subscription")
            self._notes.setdefault(number, []).append(message)

    def _wait(self, ready):
        """Reads messages (one thread at a time) until `ready()` holds; returns its value."""
        with self._lock:
            while True:
                value = ready()
                if value is not None:
                    return value
                if self._reading:
                    self._lock.wait()
                    continue
                self._reading = True
                self._lock.release()
                try:
                    self._read_one()
                finally:
                    self._lock.acquire()
                    self._reading = False
                    self._lock.notify_all()

    def _answer(self, request_id):
        reply = self._wait(lambda: self._replies.pop(request_id, None))
        if "error" in reply:
            raise _error(reply["error"])
        return reply["result"]

    def _call(self, method, params):
        return self._answer(self._send(method, params))

    def call(self, method, **params):
        """Any method by its socket name, e.g. `call("conflicts.get", id=...)`."""
        return self._call(method, params)

    def call_many(self, calls):
        """Sends every `(method, params)` first, then returns their answers in order (an
        error answer is returned as its `FerryError`, not raised)."""
        ids = [self._send(method, params) for method, params in calls]
        answers = []
        for request_id in ids:
            try:
                answers.append(self._answer(request_id))
            except FerryError as e:
                answers.append(e)
        return answers

    def subscribe(self, collection=None, id=None, since=None, fields=None):
        """Changes (and conflicts) from now on; with `since` (a change's `seq`), first every
        change after it; with `fields`, each change carries the record's fields."""
        answer = self._call("subscribe", _params(collection=collection, id=id, since=since, fields=fields))
        return Subscription(self, answer["subscription"])

    def _next_notification(self, number):
        def ready():
            queued = self._notes.get(number)
            return queued.pop(0) if queued else None

        return self._wait(ready)


class AsyncSubscription:
    """Notifications for one subscription, as an async iterator."""

    def __init__(self, client, number, queue):
        self.client = client
        self.number = number
        self._queue = queue

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self._queue.get()
        if isinstance(message, Exception):
            raise message
        return message

    async def close(self):
        await self.client._call("unsubscribe", {"subscription": self.number})


class AsyncClient(_Methods):
    """An asyncio connection to the daemon: every method is a coroutine; concurrent calls are
    pipelined on the one connection and their answers matched by id."""

    def __init__(self, reader, writer):
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending = {}
        self._subscriptions = {}
        self._early = {}
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, data_dir=None, socket=None, limit=16 << 20):
        reader, writer = await asyncio.open_unix_connection(socket or socket_path(data_dir), limit=limit)
        return cls(reader, writer)

    async def close(self):
        self._task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _read(self):
        failure = ConnectionError("the daemon closed the connection")
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message = json.loads(line)
                if "id" in message:
                    waiter = self._pending.pop(message["id"], None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(message)
                elif message.get("method") in ("change", "conflict", "lagged"):
                    number = message.get("params", {}).get("subscription")
                    queue = self._subscriptions.get(number)
                    if queue is None:
                        # A notification can come before the subscribe's answer is taken.
                        self._early.setdefault(number, []).append(message)
                    else:
                        queue.put_nowait(message)
        except Exception as e:  # the connection broke: every waiter hears why
            failure = e
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(failure)
        for queue in self._subscriptions.values():
            queue.put_nowait(failure)

    async def _call(self, method, params):
        request_id = next(self._ids)
        waiter = asyncio.get_running_loop().create_future()
        self._pending[request_id] = waiter
        line = json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        self._writer.write(line.encode("utf-8") + b"\n")
        await self._writer.drain()
        reply = await waiter
        if "error" in reply:
            raise _error(reply["error"])
        return reply["result"]

    async def call(self, method, **params):
        return await self._call(method, params)

    async def subscribe(self, collection=None, id=None, since=None, fields=None):
        answer = await self._call("subscribe", _params(collection=collection, id=id, since=since, fields=fields))
        number = answer["subscription"]
        queue = asyncio.Queue()
        for message in self._early.pop(number, []):
            queue.put_nowait(message)
        self._subscriptions[number] = queue
        return AsyncSubscription(self, number, queue)
