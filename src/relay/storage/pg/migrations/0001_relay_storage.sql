-- The relay's storage, as the embedded engine keeps it (src/relay/storage/kv.rs), in tables.
-- Text is compared byte by byte (COLLATE "C"), as the embedded engine's keys are, so every
-- listing comes in the same order on both. Rows holding values carry `crc`: a CRC-32 of the
-- row's key and value computed by the relay, checked on every read (src/relay/storage/pg.rs).

-- One row per space: the head its appends lock (FOR UPDATE) and number from, the bytes of its
-- log entries (the account's quota), its compaction horizon, whether its conflict entries cover
-- its whole log, and the actor its HTTP writes are made under.
CREATE TABLE spaces (
    space text COLLATE "C" PRIMARY KEY,
    head bigint NOT NULL DEFAULT 0,
    log_bytes bigint NOT NULL DEFAULT 0,
    horizon bigint NOT NULL DEFAULT 0,
    conflicts_complete boolean NOT NULL DEFAULT false,
    web_actor text COLLATE "C"
);

-- Each space's change log; a purge entry has an empty change. `bytes` is what it adds to the
-- space's quota.
CREATE TABLE log_entries (
    space text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    origin text COLLATE "C" NOT NULL,
    hash bytea NOT NULL,
    change bytea NOT NULL,
    bytes bigint NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, seq)
);

-- The per-record dedup index: every change logged for a record, kept when compaction drops its
-- log entry.
CREATE TABLE record_changes (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    hash bytea NOT NULL,
    seq bigint NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, record, hash)
);

-- Each record's base: Automerge chunks, loadable as they are.
CREATE TABLE bases (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    base bytea NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, record)
);

-- Changes appended to a record since its base (their bytes are in the log).
CREATE TABLE tails (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, record, seq)
);
CREATE INDEX tails_by_seq ON tails (space, seq);

-- Each record's logged heads, 32 bytes each, sorted.
CREATE TABLE record_heads (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    heads bytea NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, record)
);

-- Conflicts found, per space, kind and collection: added to by each append.
CREATE TABLE conflict_counts (
    space text COLLATE "C" NOT NULL,
    kind text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    detected bigint NOT NULL,
    PRIMARY KEY (space, kind, collection)
);

-- The unique-value index: the records holding a value (JSON `Holders`), and the values each
-- record holds (JSON).
CREATE TABLE unique_holders (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    constraint_index bigint NOT NULL,
    value text COLLATE "C" NOT NULL,
    holders bytea NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, constraint_index, value)
);
CREATE TABLE unique_values (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    held bytea NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, record)
);

-- Conflict entries (JSON), whether each is open, and the record each is on.
CREATE TABLE conflicts (
    space text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    open boolean NOT NULL,
    entry bytea NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, id)
);
CREATE INDEX conflicts_open ON conflicts (space, id) WHERE open;
CREATE INDEX conflicts_by_record ON conflicts (space, collection, record, id);

-- The conflict each change (hex hash) brought.
CREATE TABLE change_conflicts (
    space text COLLATE "C" NOT NULL,
    change text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, change)
);

-- Time marks: the log's head at a time, while above the horizon.
CREATE TABLE time_marks (
    space text COLLATE "C" NOT NULL,
    time_ms bigint NOT NULL,
    head bigint NOT NULL,
    PRIMARY KEY (space, time_ms)
);

-- Tombstone notes: the change at `seq` left its record deleted.
CREATE TABLE tombstones (
    space text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    heads bytea NOT NULL,
    time_ms bigint NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, seq)
);

-- Purge markers: the seq of the purge entry that last ended a record's history.
CREATE TABLE purges (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    record text COLLATE "C" NOT NULL,
    seq bigint NOT NULL,
    crc integer NOT NULL,
    PRIMARY KEY (space, collection, record)
);

-- Accounts, devices, enrolment codes (by the SHA-256 of their secret), token families, signing
-- keys and passwords: each the record the embedded engine keeps (postcard), under its key.
CREATE TABLE accounts (
    name text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL,
    crc integer NOT NULL
);
CREATE TABLE devices (
    device text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL,
    crc integer NOT NULL
);
CREATE TABLE enrolments (
    code_hash bytea PRIMARY KEY,
    value bytea NOT NULL,
    crc integer NOT NULL
);
CREATE TABLE token_families (
    id text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL,
    crc integer NOT NULL
);
CREATE TABLE signing_keys (
    kid text COLLATE "C" PRIMARY KEY,
    value bytea NOT NULL,
    crc integer NOT NULL
);
CREATE TABLE passwords (
    account text COLLATE "C" PRIMARY KEY,
    phc text NOT NULL,
    crc integer NOT NULL
);
