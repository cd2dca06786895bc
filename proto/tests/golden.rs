//! Golden vectors: one checked-in frame per message variant (plus a compressed frame and the
//! error codes and change outcomes inside messages), built from fixed values. They pin the wire
//! format byte for byte, so a change to a message, to postcard or to the framing shows up here
//! before it reaches a peer running another build.
//!
//! `FERRY_BLESS=1 cargo test -p ferry-proto --test golden` rewrites the files.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use ferry_proto::wire::{
    ChangeOutcome, ChangeResult, Credential, ErrorCode, IndexPosition, IndexValue, LogEntry,
    MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, RecordName, Secret, SnapshotRecord, Tokens,
    UniqueHolders, UploadChange, decode_frame_body, encode_frame, frame_length,
};
use std::path::{Path, PathBuf};

const FLAG_ZSTD: u8 = 1;
/// The default frame limit: every vector must be acceptable to a receiver using it.
const MAX_FRAME_BYTES: usize = 8 << 20;

/// Every error code, in tag order. `error_code_tag` makes adding a variant without a vector a
/// compile error.
const ERROR_CODES: [ErrorCode; 15] = [
    ErrorCode::Malformed,
    ErrorCode::UnsupportedVersion,
    ErrorCode::AuthenticationFailed,
    ErrorCode::Forbidden,
    ErrorCode::TooLarge,
    ErrorCode::UnexpectedMessage,
    ErrorCode::InvalidChange,
    ErrorCode::MissingDependencies,
    ErrorCode::Overloaded,
    ErrorCode::Internal,
    ErrorCode::ShuttingDown,
    ErrorCode::Timeout,
    ErrorCode::TokenExpired,
    ErrorCode::RateLimited,
    ErrorCode::RecordPurged,
];

fn error_code_tag(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Malformed => 0,
        ErrorCode::UnsupportedVersion => 1,
        ErrorCode::AuthenticationFailed => 2,
        ErrorCode::Forbidden => 3,
        ErrorCode::TooLarge => 4,
        ErrorCode::UnexpectedMessage => 5,
        ErrorCode::InvalidChange => 6,
        ErrorCode::MissingDependencies => 7,
        ErrorCode::Overloaded => 8,
        ErrorCode::Internal => 9,
        ErrorCode::ShuttingDown => 10,
        ErrorCode::Timeout => 11,
        ErrorCode::TokenExpired => 12,
        ErrorCode::RateLimited => 13,
        ErrorCode::RecordPurged => 14,
    }
}

fn message_tag(message: &Message) -> u8 {
    match message {
        Message::Hello { .. } => 0,
        Message::Challenge { .. } => 1,
        Message::Authenticate { .. } => 2,
        Message::Welcome { .. } => 3,
        Message::Upload { .. } => 4,
        Message::UploadAck { .. } => 5,
        Message::Download { .. } => 6,
        Message::Changes { .. } => 7,
        Message::Error { .. } => 8,
        Message::Refresh { .. } => 9,
        Message::Refreshed { .. } => 10,
        Message::CheckHeads { .. } => 11,
        Message::HeadsDigest { .. } => 12,
        Message::Snapshot { .. } => 13,
        Message::SnapshotPage { .. } => 14,
        Message::Compacted { .. } => 15,
        Message::Collections { .. } => 16,
        Message::UniqueIndex { .. } => 17,
        Message::UniqueIndexPage { .. } => 18,
    }
}

const MESSAGE_VARIANTS: u8 = 19;

fn sample_tokens() -> Tokens {
    Tokens {
        access: Secret::new("eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhY21lIn0.c2ln"),
        access_expires_ms: 1_764_000_600_300,
        refresh: Secret::new("rt1.00112233445566778899aabbccddeeff.cmVmcmVzaA"),
        refresh_expires_ms: 1_766_592_000_300,
    }
}

/// Bytes that count up from `start`, so that a swapped or shifted field shows in a hex dump.
fn counting<const N: usize>(start: u8) -> [u8; N] {
    std::array::from_fn(|i| start.wrapping_add(i as u8))
}

/// Change-like bytes: a fixed header and field names with a varying value, close enough to an
/// Automerge change for zstd to find what it finds in real batches.
fn change_bytes(n: u64) -> Vec<u8> {
    let mut bytes = vec![0x85, 0x6f, 0x4a, 0x83, 0x01, 0x02];
    for field in ["name", "email", "phone", "city", "country"] {
        bytes.extend_from_slice(field.as_bytes());
        bytes.extend_from_slice(format!("={field}-{n:04}").as_bytes());
    }
    bytes
}

fn vectors() -> Vec<(&'static str, Message)> {
    let one_of_each_outcome = vec![
        ChangeResult {
            entry: 100,
            outcome: ChangeOutcome::Stored { seq: 41 },
        },
        ChangeResult {
            entry: 101,
            outcome: ChangeOutcome::Duplicate { seq: 17 },
        },
        ChangeResult {
            entry: 102,
            outcome: ChangeOutcome::Rejected {
                code: ErrorCode::MissingDependencies,
                message: "upload the changes it depends on first".into(),
            },
        },
    ];
    let every_error_code = ERROR_CODES
        .iter()
        .zip(200..)
        .map(|(&code, entry)| ChangeResult {
            entry,
            outcome: ChangeOutcome::Rejected {
                code,
                message: format!("{code:?}"),
            },
        })
        .collect();
    vec![
        (
            "hello",
            Message::Hello {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                public_key: counting(0x10),
                space: "acme-sales".into(),
                time_ms: 1_764_000_000_000,
            },
        ),
        (
            "challenge",
            Message::Challenge {
                version: 2,
                nonce: counting(0x80),
                time_ms: 1_764_000_000_250,
            },
        ),
        (
            "authenticate",
            Message::Authenticate {
                signature: counting(0xc0),
                credential: Credential::Key,
            },
        ),
        (
            "authenticate_enrol",
            Message::Authenticate {
                signature: counting(0xc0),
                credential: Credential::Enrol(Secret::new("acme-sales/K7Q2M9XH4PDA3WZE")),
            },
        ),
        (
            "authenticate_access",
            Message::Authenticate {
                signature: counting(0xc0),
                credential: Credential::Access(sample_tokens().access),
            },
        ),
        (
            "authenticate_refresh",
            Message::Authenticate {
                signature: counting(0xc0),
                credential: Credential::Refresh(sample_tokens().refresh),
            },
        ),
        (
            "welcome",
            Message::Welcome {
                time_ms: 1_764_000_000_300,
                head: 1234,
                max_batch_changes: 1000,
                max_frame_bytes: 8 << 20,
                expires_ms: 1_764_000_600_300,
                tokens: Some(sample_tokens()),
            },
        ),
        (
            "welcome_resumed",
            Message::Welcome {
                time_ms: 1_764_000_000_300,
                head: 1234,
                max_batch_changes: 1000,
                max_frame_bytes: 8 << 20,
                expires_ms: 1_764_000_500_000,
                tokens: None,
            },
        ),
        (
            "upload",
            Message::Upload {
                batch: 7,
                changes: vec![
                    UploadChange {
                        entry: 100,
                        collection: "Customer".into(),
                        record: "c-0001".into(),
                        change: change_bytes(1),
                    },
                    UploadChange {
                        entry: 101,
                        collection: "Order".into(),
                        record: "o-0042".into(),
                        change: vec![0, 1, 127, 128, 255],
                    },
                ],
            },
        ),
        (
            "upload_ack",
            Message::UploadAck {
                batch: 7,
                results: one_of_each_outcome,
            },
        ),
        (
            "upload_ack_every_error_code",
            Message::UploadAck {
                batch: 8,
                results: every_error_code,
            },
        ),
        (
            "download",
            Message::Download {
                since: 300,
                max_changes: 1000,
            },
        ),
        (
            "changes",
            Message::Changes {
                after: 300,
                through: 305,
                head: 310,
                pushed: false,
                entries: vec![
                    LogEntry {
                        seq: 301,
                        collection: "Customer".into(),
                        record: "c-0001".into(),
                        change: change_bytes(301),
                    },
                    LogEntry {
                        seq: 304,
                        collection: "Order".into(),
                        record: "o-0042".into(),
                        change: vec![],
                    },
                ],
            },
        ),
        (
            "changes_pushed_compressed",
            Message::Changes {
                after: 310,
                through: 330,
                head: 330,
                pushed: true,
                entries: (311..=330)
                    .map(|seq| LogEntry {
                        seq,
                        collection: "Customer".into(),
                        record: format!("c-{seq:04}"),
                        change: change_bytes(seq),
                    })
                    .collect(),
            },
        ),
        (
            "refresh",
            Message::Refresh {
                refresh: sample_tokens().refresh,
            },
        ),
        (
            "refreshed",
            Message::Refreshed {
                time_ms: 1_764_000_450_000,
                expires_ms: 1_764_001_050_000,
                tokens: sample_tokens(),
            },
        ),
        (
            "check_heads",
            Message::CheckHeads {
                after: Some(RecordName {
                    collection: "Invoice".into(),
                    record: "inv-0042".into(),
                }),
                max_records: 1000,
            },
        ),
        (
            "heads_digest",
            Message::HeadsDigest {
                head: 4711,
                records: 2,
                last: Some(RecordName {
                    collection: "Invoice".into(),
                    record: "inv-0044".into(),
                }),
                complete: true,
                digest: counting(0x40),
            },
        ),
        (
            "snapshot",
            Message::Snapshot {
                after: Some(RecordName {
                    collection: "Invoice".into(),
                    record: "inv-0042".into(),
                }),
                max_records: 500,
            },
        ),
        (
            "snapshot_page",
            Message::SnapshotPage {
                head: 4711,
                horizon: 4000,
                records: vec![SnapshotRecord {
                    collection: "Invoice".into(),
                    record: "inv-0043".into(),
                    document: change_bytes(43),
                    conflicts: b"[]".to_vec(),
                }],
                last: Some(RecordName {
                    collection: "Invoice".into(),
                    record: "inv-0043".into(),
                }),
                complete: false,
            },
        ),
        ("compacted", Message::Compacted { horizon: 4000 }),
        (
            "collections",
            Message::Collections {
                names: vec!["Customer".into(), "Invoice".into()],
            },
        ),
        (
            "unique_index",
            Message::UniqueIndex {
                after: Some(IndexPosition::Value(IndexValue {
                    collection: "Customer".into(),
                    constraint: 0,
                    value: "[\"ada@example.com\"]".into(),
                })),
            },
        ),
        (
            "unique_index_page",
            Message::UniqueIndexPage {
                head: 4711,
                values: vec![UniqueHolders {
                    value: IndexValue {
                        collection: "Customer".into(),
                        constraint: 0,
                        value: "[\"bob@example.com\"]".into(),
                    },
                    holders: br#"{"records":["c-0007"],"open":[]}"#.to_vec(),
                }],
                conflicts: b"[]".to_vec(),
                last: Some(IndexPosition::Conflict("8f3a".into())),
                complete: false,
            },
        ),
        (
            "error_unsupported_version",
            Message::Error {
                code: ErrorCode::UnsupportedVersion,
                message: "relay speaks versions 2..=3".into(),
            },
        ),
        (
            "error_too_large",
            Message::Error {
                code: ErrorCode::TooLarge,
                message: "frame of 9000000 bytes is over the limit of 8388608".into(),
            },
        ),
    ]
}

fn vector_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where two byte strings first differ, with a little context on each side.
fn diff_hint(expected: &[u8], actual: &[u8]) -> String {
    let at = expected
        .iter()
        .zip(actual)
        .position(|(a, b)| a != b)
        .unwrap_or(expected.len().min(actual.len()));
    let from = at.saturating_sub(8);
    let window = |b: &[u8]| hex(&b[from.min(b.len())..(at + 8).min(b.len())]);
    format!(
        "first difference at byte {at} (lengths {} checked in, {} now); from byte {from}:\n  \
         checked in: {}\n  now:        {}",
        expected.len(),
        actual.len(),
        window(expected),
        window(actual),
    )
}

const CHANGED: &str =
    "the wire format changed: if intended, bump PROTOCOL_VERSION and re-bless with FERRY_BLESS=1";

/// The flags byte and the body with compression undone, so that a compressed vector can be
/// compared on its content: another zstd version may pick other bytes, which peers accept alike.
fn plain_body(frame: &[u8]) -> Result<Vec<u8>, String> {
    let (&flags, body) = frame
        .get(4..)
        .and_then(|f| f.split_first())
        .ok_or("frame shorter than its header")?;
    let mut plain = vec![flags];
    if flags & FLAG_ZSTD != 0 {
        plain.extend(zstd::bulk::decompress(body, MAX_FRAME_BYTES).map_err(|e| e.to_string())?);
    } else {
        plain.extend_from_slice(body);
    }
    Ok(plain)
}

fn decode_whole_frame(frame: &[u8]) -> Result<Message, String> {
    let header = frame.first_chunk::<4>().ok_or("shorter than a header")?;
    let len = frame_length(*header, MAX_FRAME_BYTES).map_err(|e| e.to_string())?;
    let body = frame.get(4..).filter(|b| b.len() == len).ok_or(format!(
        "header says {len} bytes follow, file has {}",
        frame.len() - 4
    ))?;
    decode_frame_body(body, MAX_FRAME_BYTES).map_err(|e| e.to_string())
}

/// Compares one vector; `None` when it matches, else what is wrong.
fn check(name: &str, message: &Message, stored: &[u8]) -> Option<String> {
    let encoded = encode_frame(message).unwrap();
    let compressed = |f: &[u8]| f.get(4).is_some_and(|flags| flags & FLAG_ZSTD != 0);
    let (expected, actual) = if compressed(stored) && compressed(&encoded) {
        match (plain_body(stored), plain_body(&encoded)) {
            (Ok(e), Ok(a)) => (e, a),
            (e, a) => return Some(format!("{name}: bodies do not decompress: {e:?} {a:?}")),
        }
    } else {
        (stored.to_vec(), encoded)
    };
    let mut problems = Vec::new();
    if expected != actual {
        problems.push(diff_hint(&expected, &actual));
    }
    let decoded = decode_whole_frame(stored);
    if decoded.as_ref() != Ok(message) {
        problems.push(format!("the checked-in frame decodes to {decoded:?}"));
    }
    (!problems.is_empty()).then(|| format!("{name}: {}\n{CHANGED}", problems.join("\n")))
}

#[test]
fn frames_match_the_checked_in_vectors() {
    let dir = vector_dir();
    let bless = std::env::var("FERRY_BLESS").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for (name, message) in vectors() {
        let path = dir.join(format!("{name}.bin"));
        if bless {
            std::fs::write(&path, encode_frame(&message).unwrap())
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            continue;
        }
        match std::fs::read(&path) {
            Ok(stored) => failures.extend(check(name, &message, &stored)),
            Err(e) => failures.push(format!(
                "{}: {e}; write the vectors with FERRY_BLESS=1",
                path.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_variant_and_error_code_has_a_vector() {
    let vectors = vectors();
    let mut tags: Vec<u8> = vectors.iter().map(|(_, m)| message_tag(m)).collect();
    tags.sort();
    tags.dedup();
    assert_eq!(tags, (0..MESSAGE_VARIANTS).collect::<Vec<_>>());

    let codes: Vec<u8> = vectors
        .iter()
        .filter_map(|(_, m)| match m {
            Message::UploadAck { results, .. } => Some(results),
            _ => None,
        })
        .flatten()
        .filter_map(|r| match r.outcome {
            ChangeOutcome::Rejected { code, .. } => Some(error_code_tag(code)),
            _ => None,
        })
        .collect();
    for code in ERROR_CODES {
        assert!(
            codes.contains(&error_code_tag(code)),
            "no vector has {code:?}"
        );
    }

    let compressed = vectors
        .iter()
        .filter(|(_, m)| encode_frame(m).unwrap()[4] & FLAG_ZSTD != 0)
        .count();
    assert_eq!(compressed, 1, "exactly one vector is a compressed frame");
}

/// The tags in the vectors are the ones `PROTOCOL.md` lists: the message tag is the first body
/// byte, and each error code's tag is the byte before its message's length.
#[test]
fn tags_are_the_variant_indices() {
    for (name, message) in vectors() {
        let plain =
            plain_body(&encode_frame(&message).unwrap()).expect("our own frame decompresses");
        assert_eq!(plain[1], message_tag(&message), "{name}: first body byte");
    }
    for code in ERROR_CODES {
        let frame = encode_frame(&Message::Error {
            code,
            message: String::new(),
        })
        .unwrap();
        assert_eq!(
            &frame[4..],
            &[0, 8, error_code_tag(code), 0],
            "{code:?}: flags, Error tag, code tag, empty message"
        );
    }
}

#[test]
fn no_stray_vector_files() {
    let names: Vec<String> = vectors()
        .iter()
        .map(|(name, _)| format!("{name}.bin"))
        .collect();
    for entry in std::fs::read_dir(vector_dir()).expect("tests/vectors exists") {
        let file = entry.expect("list tests/vectors").file_name();
        let file = file.to_string_lossy();
        assert!(
            !file.ends_with(".bin") || names.iter().any(|n| *n == file),
            "{file} has no vector in golden.rs: delete it or add the message"
        );
    }
}
