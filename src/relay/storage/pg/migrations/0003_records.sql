-- The records as devices show them, for backends that read the central data with SQL: one row
-- per record of each space, its fields as its collection's policy shows them (encrypted fields
-- as the envelopes the relay holds), written only by the relays' materializer
-- (src/relay/materializer.rs), which follows each space's log. `log_position` is the seq of the
-- last log entry that touched the record; `updated_at` the time of its latest change (the
-- writing device's clock).
CREATE TABLE records (
    space text COLLATE "C" NOT NULL,
    collection text COLLATE "C" NOT NULL,
    id text COLLATE "C" NOT NULL,
    fields jsonb NOT NULL,
    deleted boolean NOT NULL,
    updated_at timestamptz NOT NULL,
    log_position bigint NOT NULL,
    PRIMARY KEY (space, collection, id)
);

-- How far each space's log is in `records`: every entry up to `position`, no further, moved in
-- the transaction that writes the rows. A relay materializes a space only while it holds the
-- lease (`leased_by` until `lease_until`), so relays share the spaces without doing one twice.
CREATE TABLE records_progress (
    space text COLLATE "C" PRIMARY KEY,
    position bigint NOT NULL DEFAULT 0,
    leased_by text COLLATE "C",
    lease_until timestamptz
);

-- When each entry was logged, so that the materializer's lag can be told in seconds. Entries
-- logged before this migration take its time (a constant default: no table rewrite).
ALTER TABLE log_entries ADD COLUMN logged_at timestamptz NOT NULL DEFAULT now();
