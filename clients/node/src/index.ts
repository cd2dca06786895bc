/**
 * A client for the Ferry daemon's local socket: JSON-RPC 2.0, one JSON message per line, over a
 * Unix socket (docs/IPC.md). Every method returns a Promise; calls made without awaiting the
 * previous ones are pipelined on the one connection and their answers matched by id.
 * Subscriptions are async iterators; errors are `FerryError` subclasses named after the stable
 * codes. No runtime dependencies.
 */

import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };
export type Fields = { [field: string]: Json };

export interface WriteResult {
  collection: string;
  id: string;
  operation: "create" | "update" | "delete" | null;
  heads: string[];
  queue_id: number | null;
  /** Its number in the change feed (null when nothing changed). */
  seq: number | null;
}

export interface RecordView {
  collection: string;
  id: string;
  fields: Fields;
  heads: string[];
  conflicts: string[];
}

export interface RecordPage {
  records: RecordView[];
  next: string | null;
}

export interface Imported {
  imported: number;
  changed: number;
  ids: string[];
}

export interface SyncPaused {
  paused: boolean;
  remembered: boolean;
}

/** A notification for a subscription: a change, a conflict, or `lagged`. */
export interface Notification {
  method: "change" | "conflict" | "lagged";
  params: { subscription: number; [key: string]: Json };
}

/** An error answer: `code` is the stable JSON-RPC code, `message` says what to do. */
export class FerryError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(`${message} (${code})`);
    this.name = new.target.name;
  }
}
export class InvalidParams extends FerryError {}
export class NotFound extends FerryError {}
export class TooLarge extends FerryError {}
export class UnknownCollection extends FerryError {}
export class DiskFull extends FerryError {}
export class StorageError extends FerryError {}
export class StoreDamaged extends FerryError {}
export class Unavailable extends FerryError {}
export class InvalidState extends FerryError {}
export class Busy extends FerryError {}
export class SyncFailed extends FerryError {}
export class AlreadySettled extends FerryError {}
export class NoAccountKey extends FerryError {}
export class DecryptionFailed extends FerryError {}

const BY_CODE: Record<number, new (code: number, message: string) => FerryError> = {
  [-32602]: InvalidParams,
  [-32001]: NotFound,
  [-32002]: TooLarge,
  [-32003]: UnknownCollection,
  [-32004]: DiskFull,
  [-32005]: StorageError,
  [-32006]: StoreDamaged,
  [-32007]: Unavailable,
  [-32008]: InvalidState,
  [-32009]: Busy,
  [-32010]: SyncFailed,
  [-32011]: AlreadySettled,
  [-32012]: NoAccountKey,
  [-32013]: DecryptionFailed,
};

function errorOf(error: { code: number; message: string }): FerryError {
  const Kind = BY_CODE[error.code] ?? FerryError;
  return new Kind(error.code, error.message);
}

/**
 * The socket of the daemon on `dataDir` (default: $FERRY_DATA_DIR, else $XDG_DATA_HOME/ferry,
 * else ~/.local/share/ferry): its config's `ipc.socket`, or DATA_DIR/ferry.sock.
 */
export function socketPath(dataDir?: string): string {
  const dir =
    dataDir ??
    process.env.FERRY_DATA_DIR ??
    path.join(process.env.XDG_DATA_HOME ?? path.join(os.homedir(), ".local", "share"), "ferry");
  let configured: string | undefined;
  try {
    configured = ipcSocketOf(fs.readFileSync(path.join(dir, "config.toml"), "utf8"));
  } catch {
    configured = undefined;
  }
  // An empty `socket` means the default.
  return configured || path.join(dir, "ferry.sock");
}

/** The `socket` key of the config's `[ipc]` table: a small reader for that one string. */
function ipcSocketOf(toml: string): string | undefined {
  let table = "";
  for (const raw of toml.split("\n")) {
    const line = raw.trim();
    const header = /^\[([^\]]+)\]$/.exec(line);
    if (header) {
      table = header[1].trim();
      continue;
    }
    const entry = /^socket\s*=\s*"((?:[^"\\]|\\.)*)"/.exec(line);
    if (table === "ipc" && entry) {
      return JSON.parse(`"${entry[1]}"`) as string;
    }
  }
  return undefined;
}

type Waiter = { resolve: (value: Json) => void; reject: (error: Error) => void };

/** Notifications for one subscription, in the order the daemon sent them. */
export class Subscription implements AsyncIterable<Notification> {
  private readonly queued: Notification[] = [];
  private readonly waiting: Array<(result: IteratorResult<Notification>) => void> = [];
  private ended: Error | null = null;

  constructor(
    private readonly client: FerryClient,
    readonly number: number,
  ) {}

  /** Called by the client as notifications arrive. */
  push(note: Notification): void {
    const next = this.waiting.shift();
    if (next) next({ value: note, done: false });
    else this.queued.push(note);
  }

  /** Called by the client when the connection ends. */
  end(error: Error): void {
    this.ended = error;
    for (const next of this.waiting.splice(0)) next({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): AsyncIterator<Notification> {
    return {
      next: () => {
        const note = this.queued.shift();
        if (note) return Promise.resolve({ value: note, done: false });
        if (this.ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((resolve) => this.waiting.push(resolve));
      },
    };
  }

  async close(): Promise<void> {
    await this.client.call("unsubscribe", { subscription: this.number });
  }
}

/** One connection to the daemon. */
export class FerryClient {
  private nextId = 1;
  private readonly pending = new Map<number, Waiter>();
  private readonly subscriptions = new Map<number, Subscription>();
  private readonly early = new Map<number, Notification[]>();
  private buffered = "";
  private closedWith: Error | null = null;

  private constructor(private readonly socket: net.Socket) {
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.receive(chunk));
    socket.on("error", (error) => this.fail(error));
    socket.on("close", () => this.fail(new Error("the daemon closed the connection")));
  }

  /** Connects by data directory (its config's `ipc.socket`) or by socket path. */
  static connect(options: { dataDir?: string; socket?: string } = {}): Promise<FerryClient> {
    const where = options.socket ?? socketPath(options.dataDir);
    return new Promise((resolve, reject) => {
      const socket = net.createConnection({ path: where });
      socket.once("connect", () => {
        socket.removeListener("error", reject);
        resolve(new FerryClient(socket));
      });
      socket.once("error", reject);
    });
  }

  close(): void {
    this.socket.end();
  }

  private receive(chunk: string): void {
    this.buffered += chunk;
    let newline: number;
    while ((newline = this.buffered.indexOf("\n")) >= 0) {
      const line = this.buffered.slice(0, newline);
      this.buffered = this.buffered.slice(newline + 1);
      if (line.trim() === "") continue;
      this.dispatch(JSON.parse(line));
    }
  }

  private dispatch(message: {
    id?: number | null;
    result?: Json;
    error?: { code: number; message: string };
    method?: string;
    params?: { subscription: number };
  }): void {
    if (message.id !== undefined && message.id !== null) {
      const waiter = this.pending.get(message.id);
      if (!waiter) return;
      this.pending.delete(message.id);
      if (message.error) waiter.reject(errorOf(message.error));
      else waiter.resolve(message.result ?? null);
      return;
    }
    if (message.method === "change" || message.method === "conflict" || message.method === "lagged") {
      const note = message as Notification;
      const number = note.params.subscription;
      const subscription = this.subscriptions.get(number);
      if (subscription) subscription.push(note);
      else this.early.set(number, [...(this.early.get(number) ?? []), note]);
    }
  }

  private fail(error: Error): void {
    if (this.closedWith) return;
    this.closedWith = error;
    for (const waiter of this.pending.values()) waiter.reject(error);
    this.pending.clear();
    for (const subscription of this.subscriptions.values()) subscription.end(error);
  }

  /** Any method by its socket name. */
  call<T = Json>(method: string, params: { [key: string]: Json | undefined } = {}): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    const defined = Object.fromEntries(Object.entries(params).filter(([, v]) => v !== undefined));
    return new Promise<T>((resolve, reject) => {
      this.pending.set(id, { resolve: (v) => resolve(v as T), reject });
      this.socket.write(JSON.stringify({ jsonrpc: "2.0", id, method, params: defined }) + "\n");
    });
  }

  put(collection: string, fields: Fields, id?: string): Promise<WriteResult> {
    return this.call("put", { collection, id, fields });
  }
  patch(collection: string, id: string, fields?: Fields, unset?: string[]): Promise<WriteResult> {
    return this.call("patch", { collection, id, fields, unset });
  }
  delete(collection: string, id: string): Promise<WriteResult> {
    return this.call("delete", { collection, id });
  }
  get(collection: string, id: string): Promise<RecordView> {
    return this.call("get", { collection, id });
  }
  list(collection: string, options: { limit?: number; after?: string } = {}): Promise<RecordPage> {
    return this.call("list", { collection, ...options });
  }
  collections(): Promise<{ collections: { name: string; documents: number }[] }> {
    return this.call("collections");
  }
  history(collection: string, id: string): Promise<Json> {
    return this.call("history", { collection, id });
  }
  importRecords(records: { collection: string; id?: string; fields: Fields }[]): Promise<Imported> {
    return this.call("import", { records: records as Json });
  }
  export(collection: string, id: string): Promise<{ automerge_base64: string }> {
    return this.call("export", { collection, id });
  }
  queue(options: { status?: string; limit?: number; after?: number; before?: number; newest_first?: boolean } = {}): Promise<Json> {
    return this.call("queue", options);
  }
  retry(options: { ids?: number[]; all_failed?: boolean }): Promise<{ retried: number[] }> {
    return this.call("retry", options as { [key: string]: Json });
  }
  log(options: { before?: number; limit?: number } = {}): Promise<Json> {
    return this.call("log", options);
  }
  status(): Promise<{ [key: string]: Json }> {
    return this.call("status");
  }
  sync(options: { retry_failed?: boolean } = {}): Promise<Json> {
    return this.call("sync", options);
  }
  syncPause(remember?: boolean): Promise<SyncPaused> {
    return this.call("sync.pause", { remember });
  }
  syncResume(): Promise<SyncPaused> {
    return this.call("sync.resume");
  }
  conflicts(options: { status?: string; collection?: string; after?: string; limit?: number } = {}): Promise<Json> {
    return this.call("conflicts.list", options);
  }
  conflict(id: string): Promise<Json> {
    return this.call("conflicts.get", { id });
  }
  resolve(id: string, take: "server" | "client" | "merge", data?: Fields): Promise<Json> {
    return this.call("conflicts.resolve", { id, take, data });
  }
  keyReload(): Promise<Json> {
    return this.call("key.reload");
  }
  doctor(repair?: boolean): Promise<Json> {
    return this.call("doctor", { repair });
  }

  /**
   * Subscribes to changes and conflicts, optionally of one collection or record; with `since`
   * (a change's `seq`), first every change after it; with `fields`, each change carries the
   * record's fields.
   */
  async subscribe(
    filter: { collection?: string; id?: string; since?: number; fields?: boolean } = {},
  ): Promise<Subscription> {
    const answer = await this.call<{ subscription: number }>("subscribe", filter);
    const subscription = new Subscription(this, answer.subscription);
    for (const note of this.early.get(answer.subscription) ?? []) subscription.push(note);
    this.early.delete(answer.subscription);
    this.subscriptions.set(answer.subscription, subscription);
    return subscription;
  }
}
