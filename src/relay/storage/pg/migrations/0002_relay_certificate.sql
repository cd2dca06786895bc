-- The TLS certificate and key every relay on this database presents, so that one pinned
-- fingerprint fits them all: the first relay to start stores its own (or a new one), the others
-- take it. One row at most. `crc`: a CRC-32 of both, checked on every read.
CREATE TABLE relay_certificate (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    cert text NOT NULL,
    key text NOT NULL,
    crc integer NOT NULL
);
