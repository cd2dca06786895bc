-- A new record's base is its first change, which the record's log entry holds too: rather than
-- repeat the change (about 390 bytes a record), the base row names that entry in `logged_seq`
-- and holds the seq's 8 big-endian bytes in `base` (which its crc covers). Compacting the log
-- copies such an entry's change into the base row before the entry goes. Rows written before
-- this migration hold their change (`logged_seq` NULL), as compaction's bases do.
ALTER TABLE bases ADD COLUMN logged_seq bigint;
