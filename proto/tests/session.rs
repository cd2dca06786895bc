//! The session state machines against each other, with the store's side played by plain vectors:
//! the handshake and its failures, upload and download, pushes, limits and timeouts.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use std::collections::BTreeSet;

use ed25519_dalek::SigningKey;
use ferry_proto::session::{
    Bootstrap, DeviceEffect, DeviceEvent, DeviceOutput, DeviceSession, Grant, LogSlice,
    MAX_DOWNLOADS_IN_FLIGHT, MAX_UPLOADS_IN_FLIGHT, MAX_UPLOADS_IN_FLIGHT_PIPELINED, Output,
    OwnEntry, RelayEffect, RelayEvent, RelayOutput, RelaySession, SessionConfig, SessionError,
    device_id, uploads_in_flight,
};
use ferry_proto::wire::{
    ChangeOutcome, ChangeResult, Credential, ErrorCode, ErrorKind, FLATTEN_VERSION, IndexPosition,
    IndexValue, LogEntry, MAX_CREDENTIAL_BYTES, Message, PROTOCOL_VERSION, RecordName, Secret,
    SnapshotPage, SnapshotRecord, Tokens, UniqueHolders, UniqueIndexPage, UploadChange,
};

const BINDING: &[u8] = b"channel-binding-of-this-connection";

/// A relay log shared by all sessions, and a device's pending queue.
#[derive(Default)]
struct World {
    log: Vec<(String, LogEntry)>,
    pending: Vec<UploadChange>,
    uploaded: Vec<u64>,
    applied: Vec<LogEntry>,
    /// The device's own uploads the relay left out of its pages, as the device was told of them.
    own: Vec<OwnEntry>,
    cursor: u64,
    abandoned: Vec<u64>,
    /// Records a snapshot brought, and the heads of its pages.
    snapshot: Vec<RecordName>,
    snapshot_heads: Vec<u64>,
    /// The relay's compaction horizon: the log up to it is no longer kept.
    horizon: u64,
    /// The relay's unique values, in order; the device's pages of them as it took them
    /// (each page's values and head), and whether it downloaded anything before the last.
    unique_values: Vec<String>,
    index_pages: Vec<(Vec<String>, u64)>,
    index_complete: bool,
    downloaded_before_index: bool,
}

impl World {
    fn head(&self) -> u64 {
        self.log.len() as u64
    }

    fn read(&self, since: u64, max: u32) -> LogSlice {
        let entries: Vec<LogEntry> = self
            .log
            .iter()
            .skip(since as usize)
            .take(max as usize)
            .map(|(_, entry)| entry.clone())
            .collect();
        let through = entries.last().map_or(since, |e| e.seq);
        LogSlice {
            after: since,
            through,
            head: self.head(),
            horizon: self.horizon,
            entries,
        }
    }

    /// The log's records in key order after `after`, at most `max`, as of the head (a
    /// document's bytes are its changes laid end to end).
    /// Only records of `collections` are listed (`None`: all), the page still naming the last
    /// record it went through.
    fn snapshot_page(
        &self,
        after: Option<&RecordName>,
        max: u32,
        collections: Option<&BTreeSet<String>>,
    ) -> SnapshotPage {
        let mut records: std::collections::BTreeMap<RecordName, Vec<u8>> = Default::default();
        for (_, entry) in &self.log {
            let name = RecordName {
                collection: entry.collection.clone(),
                record: entry.record.clone(),
            };
            if after.is_none_or(|a| name > *a) {
                records
                    .entry(name)
                    .or_default()
                    .extend_from_slice(&entry.change);
            }
        }
        let complete = records.len() <= max as usize;
        let records: Vec<_> = records.into_iter().take(max as usize).collect();
        SnapshotPage {
            head: self.head(),
            horizon: 0,
            last: records.last().map(|(name, _)| name.clone()),
            records: records
                .into_iter()
                .filter(|(name, _)| collections.is_none_or(|c| c.contains(&name.collection)))
                .map(|(name, document)| SnapshotRecord {
                    collection: name.collection,
                    record: name.record,
                    document,
                    conflicts: b"[]".to_vec(),
                })
                .collect(),
            complete,
        }
    }

    /// A page of the relay's unique-value index after `after`: its values, then one page of
    /// no conflict entries, the last.
    fn index_page(&self, after: Option<&IndexPosition>, max: u32) -> UniqueIndexPage {
        let value = |v: &String| IndexValue {
            collection: "Customer".into(),
            constraint: 0,
            value: v.clone(),
        };
        let values: Vec<UniqueHolders> = match after {
            Some(IndexPosition::Conflict(_)) => Vec::new(),
            _ => self
                .unique_values
                .iter()
                .map(value)
                .filter(|v| match after {
                    Some(IndexPosition::Value(a)) => v > a,
                    _ => true,
                })
                .take(max as usize)
                .map(|value| UniqueHolders {
                    value,
                    holders: b"{}".to_vec(),
                })
                .collect(),
        };
        let last = match values.last() {
            Some(v) => Some(IndexPosition::Value(v.value.clone())),
            None => Some(IndexPosition::Conflict(String::new())),
        };
        UniqueIndexPage {
            head: self.head(),
            complete: values.is_empty(),
            values,
            conflicts: b"[]".to_vec(),
            last,
        }
    }

    fn append(&mut self, origin: &str, changes: &[UploadChange]) -> Vec<ChangeResult> {
        changes
            .iter()
            .map(|c| {
                let seq = self.head() + 1;
                self.log.push((
                    origin.to_string(),
                    LogEntry {
                        seq,
                        collection: c.collection.clone(),
                        record: c.record.clone(),
                        change: c.change.clone(),
                    },
                ));
                ChangeResult {
                    entry: c.entry,
                    outcome: ChangeOutcome::Stored { seq },
                }
            })
            .collect()
    }
}

fn change(entry: u64) -> UploadChange {
    UploadChange {
        entry,
        collection: "Customer".into(),
        record: format!("r{entry}"),
        change: vec![entry as u8; 10],
    }
}

/// The session lifetime the test relay grants: ten minutes.
const LIFETIME_MS: u64 = 600_000;

/// Tokens numbered `n`, so a test can tell which were issued when.
fn tokens(n: u32, now: u64) -> Tokens {
    Tokens {
        access: Secret::new(format!("access-{n}")),
        access_expires_ms: now + LIFETIME_MS,
        refresh: Secret::new(format!("refresh-{n}")),
        refresh_expires_ms: now + 100 * LIFETIME_MS,
    }
}

struct Pair {
    device: DeviceSession,
    relay: RelaySession,
    device_id: String,
    device_events: Vec<DeviceEvent>,
    relay_events: Vec<RelayEvent>,
    /// The time both sides are told.
    now: u64,
    /// Credentials the relay was shown, in order.
    shown: Vec<Credential>,
    issued: u32,
    /// The relay's answer to a credential: `None` lets it in.
    refuse: Option<(ErrorCode, String)>,
    /// The heads checks the relay was asked for.
    digests_asked: Vec<(Option<RecordName>, u32)>,
    /// The collections each heads check and snapshot page was asked for.
    collections_asked: Vec<Option<BTreeSet<String>>>,
}

/// The digest the test relay answers every heads check with.
const DIGEST: [u8; 32] = [7; 32];

impl Pair {
    fn new(key: [u8; 32], cursor: u64) -> Self {
        Pair::with_credential(key, cursor, Credential::Key, None)
    }

    /// Hands the relay the device's `Hello` as a build that speaks up to `max_version` sends it.
    fn hello_as_version(&mut self, max_version: u16) {
        let Some(Output::Transmit(Message::Hello {
            min_version,
            public_key,
            space,
            time_ms,
            ..
        })) = self.device.poll_output()
        else {
            panic!("a device session starts with Hello");
        };
        let hello = Message::Hello {
            min_version,
            max_version,
            public_key,
            space,
            time_ms,
        };
        self.relay.handle_message(hello, 1);
    }

    fn with_credential(
        key: [u8; 32],
        cursor: u64,
        credential: Credential,
        refresh: Option<Secret>,
    ) -> Self {
        Pair::configured(key, cursor, credential, refresh, SessionConfig::default())
    }

    /// A pair whose relay runs with `relay` as its limits.
    fn configured(
        key: [u8; 32],
        cursor: u64,
        credential: Credential,
        refresh: Option<Secret>,
        relay: SessionConfig,
    ) -> Self {
        let key = SigningKey::from_bytes(&key);
        let device_id = device_id(&key.verifying_key().to_bytes());
        Pair {
            device: DeviceSession::new(
                SessionConfig::default(),
                key,
                "team".into(),
                BINDING.to_vec(),
                cursor,
                credential,
                refresh,
                0,
            ),
            relay: RelaySession::new(relay, [9; 32], BINDING.to_vec(), 0),
            device_id,
            device_events: Vec::new(),
            relay_events: Vec::new(),
            now: 1,
            shown: Vec::new(),
            issued: 0,
            refuse: None,
            digests_asked: Vec::new(),
            collections_asked: Vec::new(),
        }
    }

    /// Both sides' clocks move to `now`, and each handles its timeouts.
    fn advance(&mut self, now: u64, world: &mut World) {
        self.now = now;
        self.device.handle_timeout(now);
        self.relay.handle_timeout(now);
        self.run(world);
    }

    fn grant(&mut self, credential: &Credential) -> Grant {
        let issue = !matches!(credential, Credential::Access(_));
        self.issued += u32::from(issue);
        Grant {
            expires_ms: self.now + LIFETIME_MS,
            tokens: issue.then(|| tokens(self.issued, self.now)),
        }
    }

    /// Runs both sides, with `world` answering every effect, until nothing moves. Each side's
    /// output is taken in order, each effect answered before the next output.
    fn run(&mut self, world: &mut World) {
        loop {
            let mut moved = false;
            while let Some(output) = self.device.poll_output() {
                moved = true;
                self.device_output(output, world);
            }
            while let Some(output) = self.relay.poll_output() {
                moved = true;
                self.relay_output(output, world);
            }
            if !moved {
                return;
            }
        }
    }

    fn relay_output(&mut self, output: RelayOutput, world: &mut World) {
        let now = self.now;
        let effect = match output {
            Output::Transmit(m) => return self.device.handle_message(m, now),
            Output::Event(event) => return self.relay_events.push(event),
            Output::Effect(effect) => effect,
        };
        match effect {
            RelayEffect::Authorize { credential, .. } => {
                self.shown.push(credential.clone());
                match self.refuse.clone() {
                    Some((code, message)) => self.relay.refused(code, message),
                    None => {
                        let grant = self.grant(&credential);
                        self.relay.authorized(world.head(), grant, now);
                    }
                }
            }
            RelayEffect::Refresh { refresh } => {
                let credential = Credential::Refresh(refresh);
                self.shown.push(credential.clone());
                match self.refuse.clone() {
                    Some((code, message)) => self.relay.refused(code, message),
                    None => {
                        let grant = self.grant(&credential);
                        let issued = grant.tokens.unwrap_or_else(|| tokens(0, now));
                        self.relay.refreshed(grant.expires_ms, issued, now);
                    }
                }
            }
            RelayEffect::Store { batch, changes } => {
                let results = world.append(&self.device_id, &changes);
                self.relay.stored(batch, results, world.head());
            }
            RelayEffect::Read {
                since, max_changes, ..
            } => self.relay.read(world.read(since, max_changes)),
            RelayEffect::DigestHeads {
                after,
                max_records,
                collections,
            } => {
                self.digests_asked.push((after, max_records));
                self.collections_asked.push(collections);
                self.relay.heads_digest(world.head(), 1, None, true, DIGEST);
            }
            RelayEffect::ReadSnapshot {
                after,
                max_records,
                collections,
            } => {
                let page = world.snapshot_page(after.as_ref(), max_records, collections.as_ref());
                self.collections_asked.push(collections);
                self.relay.snapshot_read(page)
            }
            RelayEffect::ReadUniqueIndex {
                after, max_values, ..
            } => {
                let page = world.index_page(after.as_ref(), max_values);
                self.relay.unique_index_read(page)
            }
        }
    }

    fn device_output(&mut self, output: DeviceOutput, world: &mut World) {
        let effect = match output {
            Output::Transmit(m) => return self.relay.handle_message(m, self.now),
            Output::Event(event) => return self.device_events.push(event),
            Output::Effect(effect) => effect,
        };
        match effect {
            DeviceEffect::LoadUploadBatch { max_changes, .. } => {
                let n = world.pending.len().min(max_changes as usize);
                let batch: Vec<_> = world.pending.drain(..n).collect();
                self.device.upload(batch, 1);
            }
            DeviceEffect::RecordUploadResults { results, .. } => {
                world.uploaded.extend(results.iter().map(|r| r.entry));
                self.device.upload_recorded();
            }
            DeviceEffect::AbandonUpload { entries, .. } => world.abandoned.extend(entries),
            DeviceEffect::Apply {
                through,
                entries,
                own,
                ..
            } => {
                world.downloaded_before_index |=
                    !world.unique_values.is_empty() && !world.index_complete;
                world.applied.extend(entries);
                world.own.extend(own);
                world.cursor = through;
                self.device.applied(through, 1);
            }
            DeviceEffect::ApplySnapshot { page } => {
                world
                    .snapshot
                    .extend(page.records.iter().map(|r| RecordName {
                        collection: r.collection.clone(),
                        record: r.record.clone(),
                    }));
                world.snapshot_heads.push(page.head);
                if page.complete {
                    world.cursor = world.snapshot_heads[0];
                }
                self.device.snapshot_applied(world.cursor, 1);
            }
            DeviceEffect::ApplyUniqueIndex { page } => {
                world.index_pages.push((
                    page.values.iter().map(|v| v.value.value.clone()).collect(),
                    page.head,
                ));
                world.index_complete = page.complete;
                self.device.unique_index_applied(1);
            }
        }
    }
}

/// Everything a session has put out and nobody took yet, in order.
fn taken<E, V>(poll: impl FnMut() -> Option<Output<E, V>>) -> Vec<Output<E, V>> {
    std::iter::from_fn(poll).collect()
}

fn effects<E, V>(outputs: Vec<Output<E, V>>) -> Vec<E> {
    outputs
        .into_iter()
        .filter_map(|o| match o {
            Output::Effect(effect) => Some(effect),
            _ => None,
        })
        .collect()
}

fn events<E, V>(outputs: Vec<Output<E, V>>) -> Vec<V> {
    outputs
        .into_iter()
        .filter_map(|o| match o {
            Output::Event(event) => Some(event),
            _ => None,
        })
        .collect()
}

fn transmits<E, V>(outputs: Vec<Output<E, V>>) -> Vec<Message> {
    outputs
        .into_iter()
        .filter_map(|o| match o {
            Output::Transmit(message) => Some(message),
            _ => None,
        })
        .collect()
}

/// A device session taken through the handshake by hand (the relay's side not checked), the
/// `Welcome` at time `now` allowing `max_batch_changes`.
fn opened_by_hand(
    config: SessionConfig,
    key: [u8; 32],
    max_batch_changes: u32,
    now: u64,
) -> DeviceSession {
    opened_at(config, key, max_batch_changes, 2, 0, now)
}

/// A device session taken through the handshake by hand with a relay that chose `version` and
/// whose log ends at `head`.
fn opened_at(
    config: SessionConfig,
    key: [u8; 32],
    max_batch_changes: u32,
    version: u16,
    head: u64,
    now: u64,
) -> DeviceSession {
    let device = DeviceSession::new(
        config,
        SigningKey::from_bytes(&key),
        "team".into(),
        vec![],
        0,
        Credential::Key,
        None,
        0,
    );
    welcomed(device, max_batch_changes, version, head, now)
}

/// `device` taken through the handshake by hand, as [`opened_at`].
fn welcomed(
    mut device: DeviceSession,
    max_batch_changes: u32,
    version: u16,
    head: u64,
    now: u64,
) -> DeviceSession {
    let _hello = device.poll_output();
    device.handle_message(
        Message::Challenge {
            version,
            nonce: [0; 32],
            time_ms: 0,
        },
        0,
    );
    let _auth = device.poll_output();
    device.handle_message(
        Message::Welcome {
            time_ms: 0,
            head,
            max_batch_changes,
            max_frame_bytes: 1 << 20,
            expires_ms: LIFETIME_MS,
            tokens: None,
        },
        now,
    );
    device
}

fn closed_with(events: &[DeviceEvent]) -> Option<&SessionError> {
    events.iter().find_map(|e| match e {
        DeviceEvent::Closed { error } => error.as_ref(),
        _ => None,
    })
}

#[test]
fn a_device_uploads_its_queue_and_downloads_what_others_wrote() {
    let mut world = World::default();
    world.append("someone-else", &[change(100), change(101)]);
    world.pending = (1..=5).map(change).collect();
    let mut pair = Pair::new([1; 32], 0);
    pair.run(&mut world);

    assert!(pair.device.is_open() && pair.relay.is_open());
    assert_eq!(world.uploaded, vec![1, 2, 3, 4, 5]);
    // The device gets the other device's two entries, not its own five, but its cursor covers
    // all, and it is told where each of its own landed.
    assert_eq!(world.applied.len(), 2);
    assert_eq!(world.cursor, 7);
    let own: Vec<(u64, u64)> = world.own.iter().map(|o| (o.seq, o.entry)).collect();
    assert_eq!(own, vec![(3, 1), (4, 2), (5, 3), (6, 4), (7, 5)]);
    assert!(matches!(
        pair.device_events.last(),
        Some(DeviceEvent::Idle { cursor: 7 })
    ));
    assert!(pair.relay.is_live());
}

#[test]
fn new_entries_are_pushed_to_a_live_device_and_follow_on_its_cursor() {
    let mut world = World::default();
    let mut pair = Pair::new([2; 32], 0);
    pair.run(&mut world);
    assert!(pair.relay.is_live());

    world.append("other", &[change(1), change(2)]);
    pair.relay.appended(world.head());
    pair.run(&mut world);
    assert_eq!(world.cursor, 2);
    assert_eq!(world.applied.len(), 2);

    // A push that does not follow on the cursor is ignored and a download fetches the gap.
    pair.device.handle_message(
        Message::Changes {
            after: 5,
            through: 6,
            head: 6,
            pushed: true,
            entries: vec![LogEntry {
                seq: 6,
                collection: "c".into(),
                record: "r".into(),
                change: vec![1],
            }],
        },
        1,
    );
    world.append("other", &[change(3)]);
    pair.run(&mut world);
    assert_eq!(world.cursor, 3);
    assert!(pair.device.is_open());
}

#[test]
fn large_logs_download_in_pages() {
    let mut world = World::default();
    let changes: Vec<_> = (1..=5_000).map(change).collect();
    world.append("other", &changes);
    let mut pair = Pair::new([3; 32], 0);
    pair.run(&mut world);
    assert_eq!(world.cursor, 5_000);
    let pages = pair
        .device_events
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Downloaded { .. }))
        .count();
    assert_eq!(
        pages,
        5_000usize.div_ceil(SessionConfig::default().max_download_changes as usize)
    );
}

#[test]
fn a_resumed_device_starts_from_its_cursor() {
    let mut world = World::default();
    world.append("other", &(1..=10).map(change).collect::<Vec<_>>());
    let mut pair = Pair::new([4; 32], 6);
    pair.run(&mut world);
    let seqs: Vec<u64> = world.applied.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![7, 8, 9, 10]);
}

fn name(record: &str) -> RecordName {
    RecordName {
        collection: "Customer".into(),
        record: record.into(),
    }
}

#[test]
fn a_fresh_device_bootstraps_from_snapshot_pages_then_reads_the_log_after_them() {
    let mut world = World::default();
    // Five records, one of them written twice.
    world.append("other", &(1..=5).map(change).collect::<Vec<_>>());
    world.append("other", &[change(3)]);
    let mut pair = Pair::new([21; 32], 0);
    pair.device.set_bootstrap(Bootstrap::Fresh, false);
    // Pages of two records.
    pair.relay = RelaySession::new(
        SessionConfig {
            max_snapshot_records: 2,
            ..SessionConfig::default()
        },
        [9; 32],
        BINDING.to_vec(),
        0,
    );
    pair.run(&mut world);
    assert_eq!(
        world.snapshot,
        ["r1", "r2", "r3", "r4", "r5"].map(name).to_vec()
    );
    assert_eq!(world.snapshot_heads, [6, 6, 6]);
    // Nothing was replayed: the log after the pages is empty.
    assert_eq!(world.applied, []);
    assert_eq!(world.cursor, 6);
    assert!(matches!(
        pair.device_events.last(),
        Some(DeviceEvent::Idle { cursor: 6 })
    ));
    assert!(pair.relay.is_live(), "pushes follow, as after a download");
    world.append("other", &[change(6)]);
    pair.relay.appended(world.head());
    pair.run(&mut world);
    assert_eq!(world.cursor, 7);
    assert_eq!(world.applied.len(), 1);
}

#[test]
fn a_device_with_unique_constraints_takes_the_relays_index_after_the_pages_then_reads_the_log() {
    let mut world = World::default();
    world.append("other", &(1..=4).map(change).collect::<Vec<_>>());
    world.unique_values = ["\"a\"", "\"b\"", "\"c\""].map(String::from).to_vec();
    let mut pair = Pair::configured(
        [25; 32],
        0,
        Credential::Key,
        None,
        SessionConfig {
            max_snapshot_records: 2,
            ..SessionConfig::default()
        },
    );
    pair.device.set_bootstrap(Bootstrap::Fresh, true);
    pair.run(&mut world);
    assert_eq!(world.snapshot.len(), 4);
    let values = |pages: &[(Vec<String>, u64)]| -> Vec<Vec<String>> {
        pages.iter().map(|(values, _)| values.clone()).collect()
    };
    assert_eq!(
        values(&world.index_pages),
        [vec!["\"a\"", "\"b\""], vec!["\"c\""], vec![]]
    );
    assert!(world.index_pages.iter().all(|(_, head)| *head == 4));
    assert!(world.index_complete);
    assert!(
        !world.downloaded_before_index,
        "the log is read after the index"
    );
    assert_eq!(world.cursor, 4);
    world.append("other", &[change(5)]);
    pair.relay.appended(world.head());
    pair.run(&mut world);
    assert_eq!(world.cursor, 5);

    // Interrupted while reading the index: it goes on after the last page taken.
    let mut world = World::default();
    world.append("other", &(1..=4).map(change).collect::<Vec<_>>());
    world.unique_values = ["\"a\"", "\"b\""].map(String::from).to_vec();
    let mut pair = Pair::new([26; 32], 4);
    let after = IndexPosition::Value(IndexValue {
        collection: "Customer".into(),
        constraint: 0,
        value: "\"a\"".into(),
    });
    pair.device
        .set_bootstrap(Bootstrap::ResumeIndex(Some(after)), true);
    pair.run(&mut world);
    assert_eq!(values(&world.index_pages), [vec!["\"b\""], vec![]]);
    assert!(world.snapshot.is_empty());

    // A relay without the index: a fresh device reads the log instead of the pages.
    let mut world = World::default();
    world.append("other", &(1..=4).map(change).collect::<Vec<_>>());
    let mut pair = Pair::new([27; 32], 0);
    pair.device.set_bootstrap(Bootstrap::Fresh, true);
    pair.hello_as_version(6);
    pair.run(&mut world);
    assert!(world.snapshot.is_empty());
    assert!(world.index_pages.is_empty());
    assert_eq!(world.applied.len(), 4);
}

#[test]
fn an_interrupted_bootstrap_resumes_after_its_last_page_and_a_known_device_reads_the_log() {
    let mut world = World::default();
    world.append("other", &(1..=4).map(change).collect::<Vec<_>>());
    let mut pair = Pair::new([22; 32], 0);
    pair.device
        .set_bootstrap(Bootstrap::Resume(Some(name("r2"))), false);
    pair.run(&mut world);
    assert_eq!(world.snapshot, ["r3", "r4"].map(name).to_vec());
    assert_eq!(world.cursor, 4);
    // A device that has read the log before reads on from its cursor.
    let mut world = World::default();
    world.append("other", &(1..=4).map(change).collect::<Vec<_>>());
    let mut pair = Pair::new([23; 32], 2);
    pair.device.set_bootstrap(Bootstrap::Fresh, false);
    pair.run(&mut world);
    assert_eq!(world.snapshot, []);
    assert_eq!(world.applied.len(), 2);
}

#[test]
fn a_device_behind_the_horizon_is_answered_compacted_and_bootstraps_keeping_its_queue() {
    let mut world = World::default();
    world.append("other", &(1..=6).map(change).collect::<Vec<_>>());
    world.horizon = 4;
    // The device read up to 2 and holds a local change.
    world.pending = vec![change(50)];
    let mut pair = Pair::new([24; 32], 2);
    pair.device.set_bootstrap(Bootstrap::Fresh, false);
    pair.run(&mut world);
    assert_eq!(
        world.applied,
        [],
        "nothing below the horizon is read as log"
    );
    assert!(
        (1..=6).all(|n| world.snapshot.contains(&name(&format!("r{n}")))),
        "every record of the log came in the snapshot: {:?}",
        world.snapshot
    );
    assert_eq!(world.uploaded, [50], "the local change went up meanwhile");
    // The snapshot was taken at 6, before or after the upload at 7: the log is read from it.
    assert_eq!(world.cursor, 7);
    assert!(matches!(
        pair.device_events.last(),
        Some(DeviceEvent::Idle { cursor: 7 })
    ));
    assert!(closed_with(&pair.device_events).is_none());

    // A live device whose next push lies below a horizon that moved past what it was sent:
    // the push brings the head only, the device downloads, is answered Compacted, bootstraps.
    world.snapshot.clear();
    world.snapshot_heads.clear();
    world.append("other", &(7..=9).map(change).collect::<Vec<_>>());
    world.horizon = 9;
    pair.relay.appended(world.head());
    pair.run(&mut world);
    assert_eq!(world.applied, []);
    assert_eq!(world.snapshot.len(), 10);
    assert_eq!(world.cursor, 10);
    assert!(closed_with(&pair.device_events).is_none());

    // A device speaking version 3 cannot bootstrap: it is told to upgrade.
    let mut world = World::default();
    world.append("other", &(1..=3).map(change).collect::<Vec<_>>());
    world.horizon = 2;
    let mut pair = Pair::new([25; 32], 1);
    pair.hello_as_version(3);
    pair.run(&mut world);
    match closed_with(&pair.device_events) {
        Some(SessionError::Remote { code, message }) => {
            assert_eq!(*code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("upgrade"), "{message}");
        }
        other => panic!("a version 3 device behind the horizon is refused: {other:?}"),
    }
    assert_eq!(world.applied, []);
}

#[test]
fn the_next_snapshot_page_is_asked_for_as_a_page_arrives_and_at_most_two_wait_to_be_applied() {
    let mut world = World::default();
    world.append("other", &(1..=8).map(change).collect::<Vec<_>>());
    let config = SessionConfig {
        max_snapshot_records: 2,
        ..SessionConfig::default()
    };
    let mut device = DeviceSession::new(
        config,
        SigningKey::from_bytes(&[26; 32]),
        "team".into(),
        vec![],
        0,
        Credential::Key,
        None,
        0,
    );
    device.set_bootstrap(Bootstrap::Fresh, false);
    let mut device = welcomed(device, 10, PROTOCOL_VERSION, world.head(), 0);
    let asked_after = |outputs: Vec<DeviceOutput>| -> Vec<Option<RecordName>> {
        transmits(outputs)
            .into_iter()
            .filter_map(|m| match m {
                Message::Snapshot { after, .. } => Some(after),
                _ => None,
            })
            .collect()
    };
    let page_after = |after: Option<&RecordName>| {
        let page = world.snapshot_page(after, 2, None);
        Message::SnapshotPage {
            head: page.head,
            horizon: page.horizon,
            records: page.records,
            last: page.last,
            complete: page.complete,
        }
    };
    assert_eq!(asked_after(taken(|| device.poll_output())), [None]);

    // The first page arrives: the second is asked for before the first is applied.
    device.handle_message(page_after(None), 0);
    let outputs = taken(|| device.poll_output());
    assert!(matches!(
        outputs.as_slice(),
        [
            Output::Transmit(Message::Snapshot { .. }),
            Output::Effect(DeviceEffect::ApplySnapshot { .. })
        ]
    ));
    assert_eq!(asked_after(outputs), [Some(name("r2"))]);

    // The second arrives while the first is still being applied: two wait, no third is asked.
    device.handle_message(page_after(Some(&name("r2"))), 0);
    let outputs = taken(|| device.poll_output());
    assert_eq!(effects(outputs).len(), 1);
    assert_eq!(device.poll_timeout(), None, "no Snapshot is out");

    // The first is applied: the third is asked for.
    device.snapshot_applied(0, 1);
    assert_eq!(
        asked_after(taken(|| device.poll_output())),
        [Some(name("r4"))]
    );
    // The second is applied long after the third was asked for: the third's answer is given
    // a whole timeout from then, not from when it was asked for.
    device.snapshot_applied(0, 20_000);
    assert_eq!(
        device.poll_timeout(),
        Some(20_000 + SessionConfig::default().request_timeout_ms)
    );
    device.handle_message(page_after(Some(&name("r4"))), 1);
    assert_eq!(
        asked_after(taken(|| device.poll_output())),
        [Some(name("r6"))]
    );
    // The last page arrives; the bootstrap ends once every page is applied, not before.
    device.handle_message(page_after(Some(&name("r6"))), 1);
    let outputs = taken(|| device.poll_output());
    assert_eq!(asked_after(outputs), []);
    device.snapshot_applied(0, 2);
    assert!(device.is_bootstrapping());
    device.snapshot_applied(8, 2);
    assert!(!device.is_bootstrapping());
    let sent = transmits(taken(|| device.poll_output()));
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::Download { since: 8, .. })),
        "the log is read from the cursor the last page left: {sent:?}"
    );
}

#[test]
fn a_snapshot_page_that_names_no_last_record_is_a_protocol_error() {
    let mut world = World::default();
    world.append("other", &[change(1)]);
    let mut pair = Pair::new([24; 32], 0);
    pair.device.set_bootstrap(Bootstrap::Fresh, false);
    let _ = taken(|| pair.device.poll_output());
    // The handshake by hand, up to the device's Snapshot.
    let mut relay_out = Vec::new();
    pair.relay.handle_message(
        Message::Hello {
            min_version: 2,
            max_version: ferry_proto::wire::PROTOCOL_VERSION,
            public_key: SigningKey::from_bytes(&[24; 32]).verifying_key().to_bytes(),
            space: "team".into(),
            time_ms: 0,
        },
        0,
    );
    relay_out.extend(taken(|| pair.relay.poll_output()));
    let challenge = transmits(relay_out).remove(0);
    pair.device.handle_message(challenge, 0);
    let authenticate = transmits(taken(|| pair.device.poll_output())).remove(0);
    pair.relay.handle_message(authenticate, 0);
    let _ = taken(|| pair.relay.poll_output());
    pair.relay.authorized(
        world.head(),
        Grant {
            expires_ms: LIFETIME_MS,
            tokens: None,
        },
        0,
    );
    let welcome = transmits(taken(|| pair.relay.poll_output())).remove(0);
    pair.device.handle_message(welcome, 0);
    let sent = transmits(taken(|| pair.device.poll_output()));
    assert!(
        sent.iter()
            .any(|m| matches!(m, Message::Snapshot { after: None, .. })),
        "{sent:?}"
    );
    pair.device.handle_message(
        Message::SnapshotPage {
            head: 1,
            horizon: 0,
            records: vec![],
            last: None,
            complete: false,
        },
        0,
    );
    assert!(pair.device.is_closed());
    let events = events(taken(|| pair.device.poll_output()));
    assert!(matches!(
        closed_with(&events),
        Some(SessionError::Protocol {
            code: ErrorCode::Malformed,
            ..
        })
    ));
}

fn in_collection(collection: &str, entry: u64) -> UploadChange {
    UploadChange {
        collection: collection.into(),
        ..change(entry)
    }
}

/// A device that syncs some collections says so once the session is open: downloads and pushes
/// hold only their entries, its cursor still moves over every log position, and the snapshot
/// pages and heads checks it asks for are of those collections only.
#[test]
fn a_device_syncing_some_collections_gets_only_their_entries_and_its_cursor_covers_the_log() {
    let mut world = World::default();
    world.append(
        "other",
        &[change(1), in_collection("Invoice", 2), change(3)],
    );
    let mut pair = Pair::new([30; 32], 0);
    pair.device.set_collections(vec!["Invoice".into()]);
    pair.run(&mut world);
    let seqs = |world: &World| world.applied.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(&world), [2]);
    assert_eq!(world.cursor, 3);

    world.append("other", &[change(4), in_collection("Invoice", 5)]);
    pair.relay.appended(world.head());
    pair.run(&mut world);
    assert_eq!(seqs(&world), [2, 5]);
    assert_eq!(world.cursor, 5);

    // A fresh device bootstrapping, a record a page: pages of the other collection come back
    // empty but name how far they went.
    let mut world = World {
        log: world.log,
        ..World::default()
    };
    let mut pair = Pair::new([31; 32], 0);
    pair.device.set_bootstrap(Bootstrap::Fresh, false);
    pair.device.set_collections(vec!["Invoice".into()]);
    pair.relay = RelaySession::new(
        SessionConfig {
            max_snapshot_records: 1,
            ..SessionConfig::default()
        },
        [9; 32],
        BINDING.to_vec(),
        0,
    );
    pair.run(&mut world);
    let invoices = ["r2", "r5"].map(|r| RecordName {
        collection: "Invoice".into(),
        record: r.into(),
    });
    assert_eq!(world.snapshot, invoices.to_vec());
    assert_eq!(world.cursor, 5);
    let only = Some(BTreeSet::from(["Invoice".to_owned()]));
    assert!(!pair.collections_asked.is_empty());
    assert!(pair.collections_asked.iter().all(|c| *c == only));
}

/// A device that syncs some collections refuses a relay that cannot send only those.
#[test]
fn a_relay_without_collections_is_refused_by_a_device_syncing_some() {
    let mut world = World::default();
    world.append("other", &[change(1)]);
    let mut pair = Pair::new([32; 32], 0);
    pair.device.set_collections(vec!["Invoice".into()]);
    pair.hello_as_version(5);
    pair.run(&mut world);
    assert!(pair.device.is_closed());
    assert!(world.applied.is_empty());
    match closed_with(&pair.device_events) {
        Some(SessionError::Protocol {
            code: ErrorCode::UnsupportedVersion,
            message,
        }) => assert!(message.contains("sync.collections"), "{message}"),
        other => panic!("closed with {other:?}"),
    }
}

#[test]
fn a_signature_for_another_connection_is_refused() {
    let key = SigningKey::from_bytes(&[5; 32]);
    let mut device = DeviceSession::new(
        SessionConfig::default(),
        key,
        "team".into(),
        b"binding-of-connection-A".to_vec(),
        0,
        Credential::Key,
        None,
        0,
    );
    let mut relay = RelaySession::new(
        SessionConfig::default(),
        [1; 32],
        b"binding-of-connection-B".to_vec(),
        0,
    );
    let (mut device_events, mut relay_effects) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        while let Some(output) = device.poll_output() {
            match output {
                Output::Transmit(m) => relay.handle_message(m, 0),
                Output::Event(event) => device_events.push(event),
                Output::Effect(effect) => panic!("no store work before sign-in: {effect:?}"),
            }
        }
        while let Some(output) = relay.poll_output() {
            match output {
                Output::Transmit(m) => device.handle_message(m, 0),
                Output::Effect(effect) => relay_effects.push(effect),
                Output::Event(_) => {}
            }
        }
    }
    assert!(relay.is_closed() && device.is_closed());
    assert_eq!(relay_effects, vec![], "nothing is authorized");
    let events = device_events;
    assert!(matches!(
        closed_with(&events),
        Some(SessionError::Remote {
            code: ErrorCode::AuthenticationFailed,
            ..
        })
    ));
}

#[test]
fn no_common_version_and_bad_spaces_are_refused_with_a_reason() {
    let mut relay = RelaySession::new(SessionConfig::default(), [1; 32], vec![], 0);
    relay.handle_message(
        Message::Hello {
            min_version: 9,
            max_version: 10,
            public_key: [0; 32],
            space: "team".into(),
            time_ms: 0,
        },
        0,
    );
    assert!(matches!(
        relay.poll_output(),
        Some(Output::Transmit(Message::Error {
            code: ErrorCode::UnsupportedVersion,
            ..
        }))
    ));
    assert!(relay.is_closed());

    let mut relay = RelaySession::new(SessionConfig::default(), [1; 32], vec![], 0);
    relay.handle_message(
        Message::Hello {
            min_version: 2,
            max_version: 2,
            public_key: [0; 32],
            space: "../etc".into(),
            time_ms: 0,
        },
        0,
    );
    assert!(matches!(
        relay.poll_output(),
        Some(Output::Transmit(Message::Error {
            code: ErrorCode::Forbidden,
            ..
        }))
    ));
}

#[test]
fn messages_out_of_order_end_the_session_with_unexpected_message() {
    let mut relay = RelaySession::new(SessionConfig::default(), [1; 32], vec![], 0);
    relay.handle_message(
        Message::Download {
            since: 0,
            max_changes: 10,
        },
        0,
    );
    assert!(matches!(
        taken(|| relay.poll_output()).as_slice(),
        [
            Output::Transmit(Message::Error {
                code: ErrorCode::UnexpectedMessage,
                ..
            }),
            Output::Event(RelayEvent::Closed { .. }),
        ]
    ));

    // An open session takes as many uploads before the first is answered as its version
    // allows (two up to version 3, four from version 4), not one more.
    let mut world = World::default();
    let mut pair = Pair::new([6; 32], 0);
    pair.run(&mut world);
    assert_eq!(
        uploads_in_flight(PROTOCOL_VERSION),
        MAX_UPLOADS_IN_FLIGHT_PIPELINED
    );
    assert_eq!(uploads_in_flight(3), MAX_UPLOADS_IN_FLIGHT);
    for batch in 50..50 + uploads_in_flight(PROTOCOL_VERSION) as u64 {
        pair.relay.handle_message(
            Message::Upload {
                batch,
                changes: vec![change(batch)],
            },
            1,
        );
    }
    assert!(pair.relay.is_open());
    pair.relay.handle_message(
        Message::Upload {
            batch: 99,
            changes: vec![change(99)],
        },
        1,
    );
    assert!(pair.relay.is_closed());
}

#[test]
fn a_device_keeps_two_uploads_in_flight_and_records_them_in_order() {
    let mut device = opened_by_hand(SessionConfig::default(), [15; 32], 1, 0);
    let (mut loaded, mut sent) = (0, Vec::new());
    while let Some(output) = device.poll_output() {
        match output {
            Output::Effect(DeviceEffect::LoadUploadBatch { .. }) => {
                loaded += 1;
                device.upload(vec![change(loaded)], 0);
            }
            Output::Transmit(Message::Upload { batch, .. }) => sent.push(batch),
            Output::Transmit(Message::Download { .. })
            | Output::Event(DeviceEvent::Authenticated { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent, vec![1, 2]);
    assert_eq!(loaded, 2, "no third batch before an answer");
    // Answers must come in the order of the uploads.
    let ack = |batch: u64, entry: u64| Message::UploadAck {
        batch,
        results: vec![ChangeResult {
            entry,
            outcome: ChangeOutcome::Stored { seq: entry },
        }],
    };
    device.handle_message(ack(1, 1), 0);
    assert!(matches!(
        device.poll_output(),
        Some(Output::Effect(DeviceEffect::RecordUploadResults {
            batch: 1,
            ..
        }))
    ));
    device.upload_recorded();
    // Reported once recorded; then the freed room is filled.
    assert!(matches!(
        taken(|| device.poll_output()).as_slice(),
        [
            Output::Event(DeviceEvent::Uploaded {
                batch: 1,
                stored: 1,
                ..
            }),
            Output::Effect(DeviceEffect::LoadUploadBatch { .. }),
        ]
    ));
    device.upload(vec![change(3)], 0);
    // Closing hands back every batch still waiting for its answer, each on its own.
    device.connection_lost("gone".into());
    let abandoned = effects(taken(|| device.poll_output()));
    let handed_back = |entry| DeviceEffect::AbandonUpload {
        entries: vec![entry],
        error: "network: the connection was lost: gone".into(),
        kind: ErrorKind::Network,
    };
    assert_eq!(abandoned, vec![handed_back(2), handed_back(3)]);
}

#[test]
fn an_upload_over_the_batch_limit_is_refused() {
    let mut world = World::default();
    let mut pair = Pair::new([7; 32], 0);
    pair.run(&mut world);
    let limit = SessionConfig::default().max_batch_changes as u64;
    pair.relay.handle_message(
        Message::Upload {
            batch: 1,
            changes: (0..=limit).map(change).collect(),
        },
        1,
    );
    let outputs = taken(|| pair.relay.poll_output());
    assert!(matches!(
        outputs.first(),
        Some(Output::Transmit(Message::Error {
            code: ErrorCode::TooLarge,
            ..
        }))
    ));
    assert_eq!(effects(outputs), vec![], "nothing was stored");
}

#[test]
fn an_upload_without_an_answer_times_out_and_hands_its_entries_back() {
    let config = SessionConfig::default();
    let timeout = config.request_timeout_ms;
    let mut device = opened_by_hand(config, [8; 32], 100, 10);
    assert!(matches!(
        taken(|| device.poll_output()).as_slice(),
        [
            Output::Event(DeviceEvent::Authenticated { .. }),
            Output::Effect(DeviceEffect::LoadUploadBatch {
                max_changes: 100,
                max_bytes,
                max_change_bytes,
            }),
            Output::Transmit(Message::Download { since: 0, .. }),
        ] if *max_bytes == 1 << 19
            && *max_change_bytes == (1 << 20) - ferry_proto::wire::CHANGE_ENVELOPE_BYTES
    ));
    device.upload(vec![change(1), change(2)], 10);
    // The next batch is loaded while this one is on its way; the queue has no more.
    assert!(matches!(
        taken(|| device.poll_output()).as_slice(),
        [
            Output::Transmit(Message::Upload { batch: 1, .. }),
            Output::Effect(DeviceEffect::LoadUploadBatch { .. }),
        ]
    ));
    device.upload(vec![], 10);
    assert_eq!(device.poll_timeout(), Some(10 + timeout));
    device.handle_timeout(10 + timeout - 1);
    assert!(device.is_open());
    device.handle_timeout(10 + timeout);
    assert!(device.is_closed());
    assert!(matches!(
        effects(taken(|| device.poll_output())).as_slice(),
        [DeviceEffect::AbandonUpload { entries, error, kind: ErrorKind::Timeout }] if *entries == vec![1, 2] && error.starts_with("timeout")
    ));
}

#[test]
fn a_batch_loaded_after_the_session_closed_is_handed_back() {
    let mut world = World::default();
    let mut pair = Pair::new([10; 32], 0);
    pair.run(&mut world);
    world.pending = vec![change(1)];
    pair.device.local_changes();
    assert!(matches!(
        pair.device.poll_output(),
        Some(Output::Effect(DeviceEffect::LoadUploadBatch { .. }))
    ));
    pair.device.connection_lost("reset".into());
    pair.device.upload(vec![change(1)], 2);
    assert!(matches!(
        effects(taken(|| pair.device.poll_output())).as_slice(),
        [DeviceEffect::AbandonUpload { entries, .. }] if *entries == vec![1]
    ));
}

#[test]
fn the_handshake_has_a_deadline_on_both_sides() {
    let config = SessionConfig::default();
    let mut relay = RelaySession::new(config.clone(), [1; 32], vec![], 100);
    assert_eq!(
        relay.poll_timeout(),
        Some(100 + config.handshake_timeout_ms)
    );
    relay.handle_timeout(100 + config.handshake_timeout_ms);
    assert!(relay.is_closed());
    assert!(matches!(
        relay.poll_output(),
        Some(Output::Transmit(Message::Error {
            code: ErrorCode::Timeout,
            ..
        }))
    ));
}

#[test]
fn a_relay_error_ends_the_device_session_with_its_kind() {
    let mut world = World::default();
    let mut pair = Pair::new([11; 32], 0);
    pair.run(&mut world);
    pair.relay.shut_down();
    pair.run(&mut world);
    let error = closed_with(&pair.device_events).expect("closed with an error");
    assert_eq!(error.kind().as_str(), "server");
}

#[test]
fn empty_uploads_empty_downloads_and_cursors_beyond_the_log_are_refused() {
    let mut world = World::default();
    let mut pair = Pair::new([12; 32], 0);
    pair.run(&mut world);
    pair.relay.handle_message(
        Message::Upload {
            batch: 9,
            changes: vec![],
        },
        1,
    );
    assert!(matches!(
        pair.relay.poll_output(),
        Some(Output::Transmit(Message::Error {
            code: ErrorCode::Malformed,
            ..
        }))
    ));

    let mut pair = Pair::new([13; 32], 0);
    pair.run(&mut world);
    pair.relay.handle_message(
        Message::Download {
            since: 0,
            max_changes: 0,
        },
        1,
    );
    assert!(pair.relay.is_closed());

    // A device whose cursor is past the relay's head: the relay lost part of its log.
    world.append("other", &[change(1)]);
    let mut pair = Pair::new([14; 32], 5);
    pair.run(&mut world);
    assert!(matches!(
        closed_with(&pair.device_events),
        Some(SessionError::Remote {
            code: ErrorCode::UnexpectedMessage,
            ..
        })
    ));
    assert_eq!(world.applied.len(), 0);
}

fn issued_tokens(events: &[DeviceEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Tokens { tokens } => Some(tokens.refresh.expose().to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn the_credential_reaches_the_relay_and_new_tokens_reach_the_device() {
    let mut world = World::default();
    let mut pair = Pair::with_credential(
        [20; 32],
        0,
        Credential::Enrol(Secret::new("team/CODE")),
        None,
    );
    pair.run(&mut world);
    assert!(pair.device.is_open());
    assert_eq!(
        pair.shown,
        vec![Credential::Enrol(Secret::new("team/CODE"))]
    );
    assert_eq!(issued_tokens(&pair.device_events), vec!["refresh-1"]);
}

#[test]
fn a_device_with_a_refresh_token_refreshes_its_session_before_it_expires() {
    let mut world = World::default();
    let mut pair = Pair::with_credential(
        [21; 32],
        0,
        Credential::Access(Secret::new("access-0")),
        Some(Secret::new("refresh-0")),
    );
    pair.run(&mut world);
    assert!(pair.device.is_open());
    assert!(
        issued_tokens(&pair.device_events).is_empty(),
        "a valid access token gets no new tokens"
    );
    // Three quarters of the way to expiry the device refreshes with the token it holds, then
    // with the one it was given, and the session outlives many lifetimes.
    for round in 1..=5u64 {
        let refresh_at = pair.device.poll_timeout().expect("a refresh is scheduled");
        assert!(
            refresh_at < pair.now + LIFETIME_MS,
            "refreshes before expiry"
        );
        pair.advance(refresh_at, &mut world);
        assert!(
            pair.device.is_open() && pair.relay.is_open(),
            "round {round}"
        );
    }
    let refreshes: Vec<_> = pair
        .shown
        .iter()
        .filter_map(|c| match c {
            Credential::Refresh(s) => Some(s.expose().to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        refreshes,
        vec![
            "refresh-0",
            "refresh-1",
            "refresh-2",
            "refresh-3",
            "refresh-4"
        ]
    );
    assert_eq!(issued_tokens(&pair.device_events).len(), 5);
}

#[test]
fn a_session_that_is_not_refreshed_ends_at_expiry_with_a_retryable_code() {
    let mut world = World::default();
    // No refresh token: the device cannot refresh, so the relay ends the session on time.
    let mut pair = Pair::with_credential(
        [22; 32],
        0,
        Credential::Access(Secret::new("access-0")),
        None,
    );
    pair.run(&mut world);
    assert!(pair.device.is_open());
    assert_eq!(pair.device.poll_timeout(), None, "nothing to refresh with");
    pair.advance(LIFETIME_MS, &mut world);
    assert!(pair.relay.is_open(), "open until the expiry itself");
    pair.advance(LIFETIME_MS + 1, &mut world);
    assert!(pair.relay.is_closed() && pair.device.is_closed());
    let error = closed_with(&pair.device_events).expect("closed with an error");
    assert!(matches!(
        error,
        SessionError::Remote {
            code: ErrorCode::TokenExpired,
            ..
        }
    ));
    assert!(ErrorCode::TokenExpired.is_retryable());
}

#[test]
fn a_refused_credential_or_refresh_ends_the_session_with_the_relays_reason() {
    let mut world = World::default();
    let mut pair = Pair::with_credential(
        [23; 32],
        0,
        Credential::Refresh(Secret::new("refresh-old")),
        None,
    );
    pair.refuse = Some((
        ErrorCode::AuthenticationFailed,
        "refresh token reused".into(),
    ));
    pair.run(&mut world);
    assert!(pair.device.is_closed());
    assert!(matches!(
        closed_with(&pair.device_events),
        Some(SessionError::Remote { code: ErrorCode::AuthenticationFailed, message })
            if message == "refresh token reused"
    ));

    // Let in, then the refresh is refused: the session ends then.
    let mut pair =
        Pair::with_credential([24; 32], 0, Credential::Key, Some(Secret::new("refresh-0")));
    pair.run(&mut world);
    assert!(pair.device.is_open());
    pair.refuse = Some((ErrorCode::Forbidden, "family revoked".into()));
    let refresh_at = pair.device.poll_timeout().expect("a refresh is scheduled");
    pair.advance(refresh_at, &mut world);
    assert!(pair.device.is_closed() && pair.relay.is_closed());
}

#[test]
fn a_revoked_device_is_cut_off_at_once() {
    let mut world = World::default();
    let mut pair = Pair::new([25; 32], 0);
    pair.run(&mut world);
    assert!(pair.relay.is_open());
    pair.relay.revoked("this device was revoked".into());
    pair.run(&mut world);
    assert!(pair.device.is_closed());
    assert!(matches!(
        closed_with(&pair.device_events),
        Some(SessionError::Remote {
            code: ErrorCode::Forbidden,
            ..
        })
    ));
}

#[test]
fn an_oversized_credential_is_refused_unread() {
    let mut world = World::default();
    let huge = "x".repeat(MAX_CREDENTIAL_BYTES + 1);
    let mut pair = Pair::with_credential([26; 32], 0, Credential::Access(Secret::new(huge)), None);
    pair.run(&mut world);
    assert!(pair.shown.is_empty(), "never handed to the relay's checks");
    assert!(matches!(
        closed_with(&pair.device_events),
        Some(SessionError::Remote {
            code: ErrorCode::TooLarge,
            ..
        })
    ));
}

#[test]
fn an_unasked_refreshed_is_a_protocol_violation() {
    let mut world = World::default();
    let mut pair = Pair::new([27; 32], 0);
    pair.run(&mut world);
    pair.device.handle_message(
        Message::Refreshed {
            time_ms: 1,
            expires_ms: 2,
            tokens: tokens(9, 1),
        },
        1,
    );
    assert!(pair.device.is_closed());
}

#[test]
fn a_heads_check_is_answered_one_at_a_time_as_of_the_logs_head() {
    let mut world = World::default();
    world.append("someone-else", &[change(1), change(2)]);
    let mut pair = Pair::new([28; 32], 0);
    pair.run(&mut world);
    let after = RecordName {
        collection: "Customer".into(),
        record: "r1".into(),
    };
    assert!(pair.device.check_heads(Some(after.clone()), 50, pair.now));
    assert!(
        !pair.device.check_heads(None, 50, pair.now),
        "one check at a time"
    );
    pair.run(&mut world);
    assert_eq!(pair.digests_asked, [(Some(after), 50)]);
    let answers: Vec<_> = pair
        .device_events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::HeadsDigest { head, digest, .. } => Some((*head, *digest)),
            _ => None,
        })
        .collect();
    assert_eq!(answers, [(2, DIGEST)]);
    assert!(
        pair.device.check_heads(None, 50, pair.now),
        "answered: the next may go"
    );
}

#[test]
fn a_heads_check_needs_version_3_and_an_answer_in_time() {
    let old = opened_by_hand(SessionConfig::default(), [29; 32], 100, 10);
    let mut old = old;
    taken(|| old.poll_output());
    assert!(
        !old.check_heads(None, 10, 10),
        "a version 2 relay is not asked"
    );
    assert_eq!(old.poll_output(), None);

    let mut world = World::default();
    let mut pair = Pair::new([30; 32], 0);
    pair.run(&mut world);
    assert!(pair.device.check_heads(None, 10, 100));
    let deadline = pair.device.poll_timeout().expect("the answer is due");
    assert_eq!(deadline, 100 + SessionConfig::default().request_timeout_ms);
    pair.device.handle_timeout(deadline);
    let events = events(taken(|| pair.device.poll_output()));
    assert!(
        matches!(
            closed_with(&events),
            Some(SessionError::Timeout("heads check"))
        ),
        "{events:?}"
    );
}

#[test]
fn a_second_heads_check_before_the_answer_ends_the_relays_session() {
    let mut world = World::default();
    let mut pair = Pair::new([31; 32], 0);
    pair.run(&mut world);
    let check = Message::CheckHeads {
        after: None,
        max_records: 10,
    };
    pair.relay.handle_message(check.clone(), pair.now);
    pair.relay.handle_message(check, pair.now);
    assert!(pair.relay.is_closed());
    assert!(matches!(
        transmits(taken(|| pair.relay.poll_output())).as_slice(),
        [Message::Error {
            code: ErrorCode::UnexpectedMessage,
            ..
        }]
    ));
}

/// The `since` of every `Download` among `messages`.
fn downloads_asked(messages: &[Message]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|m| match m {
            Message::Download { since, .. } => Some(*since),
            _ => None,
        })
        .collect()
}

/// A `Changes` answering a download of `after..=through`, with an entry for each seq.
fn answer(after: u64, through: u64, head: u64) -> Message {
    Message::Changes {
        after,
        through,
        head,
        pushed: false,
        entries: (after + 1..=through)
            .map(|seq| LogEntry {
                seq,
                collection: "Customer".into(),
                record: format!("r{seq}"),
                change: vec![1],
            })
            .collect(),
    }
}

/// The `(after, through)` of every `Apply` among `effects`.
fn applies(effects: &[DeviceEffect]) -> Vec<(u64, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            DeviceEffect::Apply { after, through, .. } => Some((*after, *through)),
            _ => None,
        })
        .collect()
}

#[test]
fn from_version_4_a_device_keeps_several_ranges_asked_and_applies_them_in_order() {
    let config = SessionConfig::default();
    let page = u64::from(config.max_download_changes);
    let mut device = opened_at(config, [40; 32], 100, 4, 10 * page, 1);
    let out = taken(|| device.poll_output());
    // The window fills at once: the initial sync does not wait a round trip per page.
    let asked: Vec<u64> = (0..MAX_DOWNLOADS_IN_FLIGHT as u64)
        .map(|k| k * page)
        .collect();
    assert_eq!(downloads_asked(&transmits(out)), asked);

    // The first range arrives: it is applied, and nothing more is asked while it is (the
    // window counts what waits to be applied).
    device.handle_message(answer(0, page, 10 * page), 2);
    let out = taken(|| device.poll_output());
    assert_eq!(applies(&effects(out)), [(0, page)]);
    // The second arrives while the first is applied: it waits its turn.
    device.handle_message(answer(page, 2 * page, 10 * page), 3);
    assert_eq!(applies(&effects(taken(|| device.poll_output()))), []);
    // Applying the first starts the second and frees a place in the window for the next range.
    device.applied(page, 4);
    let out = taken(|| device.poll_output());
    assert_eq!(applies(&effects(out.clone())), [(page, 2 * page)]);
    assert_eq!(
        downloads_asked(&transmits(out)),
        [MAX_DOWNLOADS_IN_FLIGHT as u64 * page]
    );
    assert!(!device.is_idle());
}

#[test]
fn a_relay_before_version_4_is_asked_one_page_at_a_time() {
    let config = SessionConfig::default();
    let page = u64::from(config.max_download_changes);
    let mut device = opened_at(config, [41; 32], 100, 3, 10 * page, 1);
    assert_eq!(
        downloads_asked(&transmits(taken(|| device.poll_output()))),
        [0]
    );
    // A version 3 relay answers with a page of its own size: the next ask starts there.
    device.handle_message(answer(0, 700, 10 * page), 2);
    assert_eq!(transmits(taken(|| device.poll_output())), []);
    device.applied(700, 3);
    assert_eq!(
        downloads_asked(&transmits(taken(|| device.poll_output()))),
        [700]
    );
}

#[test]
fn ranges_asked_past_the_end_of_the_log_are_dropped_and_asked_again() {
    let config = SessionConfig::default();
    let page = u64::from(config.max_download_changes);
    let mut device = opened_at(config, [42; 32], 100, 4, page + 1, 1);
    assert_eq!(
        downloads_asked(&transmits(taken(|| device.poll_output()))),
        [0, page]
    );
    // The first range comes back short (a relay whose head went back: restored, say), so the
    // second one, asked from past its end, could leave a gap: its answer is not applied.
    device.handle_message(answer(0, 500, 500), 2);
    device.handle_message(answer(page, page + 1, page + 1), 3);
    let out = taken(|| device.poll_output());
    assert_eq!(applies(&effects(out.clone())), [(0, 500)]);
    // Once that answer is drained the log is asked for again from where the first ended.
    assert_eq!(downloads_asked(&transmits(out)), [500]);
    device.handle_message(answer(500, page + 1, page + 1), 4);
    device.applied(500, 5);
    let out = taken(|| device.poll_output());
    assert_eq!(applies(&effects(out)), [(500, page + 1)]);
}

#[test]
fn from_version_4_a_relay_answers_a_range_in_pages_of_its_own_and_pipelined_downloads_converge() {
    let mut world = World::default();
    world.append("other", &(1..=5_000).map(change).collect::<Vec<_>>());
    let relay = SessionConfig {
        max_download_changes: 700,
        ..SessionConfig::default()
    };
    let mut pair = Pair::configured([43; 32], 0, Credential::Key, None, relay);
    pair.run(&mut world);
    assert_eq!(world.cursor, 5_000);
    let seqs: Vec<u64> = world.applied.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=5_000).collect::<Vec<_>>(),
        "every entry once, in order"
    );
    // Ranges of 2,000 in parts of at most 700: 700 + 700 + 600, twice, then 700 + 300.
    let pages: Vec<usize> = pair
        .device_events
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Downloaded { entries, .. } => Some(*entries),
            _ => None,
        })
        .collect();
    assert_eq!(pages, [700, 700, 600, 700, 700, 600, 700, 300]);
    assert!(pair.relay.is_live());
    assert!(matches!(
        pair.device_events.last(),
        Some(DeviceEvent::Idle { cursor: 5_000 })
    ));
}

#[test]
fn a_relay_takes_as_many_downloads_as_its_version_allows_and_no_more() {
    for (key, version, allowed) in [(44, 4, MAX_DOWNLOADS_IN_FLIGHT), (45, 3, 1)] {
        let mut world = World::default();
        world.append("other", &(1..=10).map(change).collect::<Vec<_>>());
        let mut relay = RelaySession::new(SessionConfig::default(), [9; 32], vec![], 0);
        let key = SigningKey::from_bytes(&[key; 32]);
        relay.handle_message(
            Message::Hello {
                min_version: 2,
                max_version: version,
                public_key: key.verifying_key().to_bytes(),
                space: "team".into(),
                time_ms: 0,
            },
            0,
        );
        let Some(Output::Transmit(Message::Challenge { nonce, .. })) = relay.poll_output() else {
            panic!("no challenge");
        };
        let transcript = ferry_proto::wire::auth_transcript(
            &nonce,
            &[],
            "team",
            &key.verifying_key().to_bytes(),
        );
        use ed25519_dalek::Signer as _;
        relay.handle_message(
            Message::Authenticate {
                signature: key.sign(&transcript).to_bytes(),
                credential: Credential::Key,
            },
            0,
        );
        taken(|| relay.poll_output());
        relay.authorized(
            world.head(),
            Grant {
                expires_ms: LIFETIME_MS,
                tokens: None,
            },
            0,
        );
        taken(|| relay.poll_output());
        for since in 0..allowed as u64 {
            relay.handle_message(
                Message::Download {
                    since: since * 2,
                    max_changes: 2,
                },
                1,
            );
        }
        assert!(relay.is_open(), "version {version}");
        relay.handle_message(
            Message::Download {
                since: 8,
                max_changes: 2,
            },
            1,
        );
        assert!(relay.is_closed(), "version {version}");
    }
}

#[test]
fn own_uploads_are_left_out_only_for_the_session_that_uploaded_them() {
    let mut world = World {
        pending: (1..=3).map(change).collect(),
        ..World::default()
    };
    let mut pair = Pair::new([5; 32], 0);
    pair.run(&mut world);
    assert_eq!(
        (world.cursor, world.applied.len(), world.own.len()),
        (3, 0, 3)
    );

    // Another session of the same device, from an older cursor: nothing was uploaded on it, so
    // the relay sends the entries whole.
    let mut world = World {
        log: world.log,
        ..World::default()
    };
    let mut pair = Pair::new([5; 32], 1);
    pair.run(&mut world);
    let seqs: Vec<u64> = world.applied.iter().map(|e| e.seq).collect();
    assert_eq!((seqs, world.own.len(), world.cursor), (vec![2, 3], 0, 3));
}

/// A purge entry (an entry with no change) reaches a device of version 5 like any entry, in log
/// order; a version 4 device, which would take it for a change, is told to upgrade instead.
#[test]
fn a_purge_entry_is_sent_from_version_5_and_ends_a_version_4_session() {
    let log = |world: &mut World| {
        let mut purge = change(2);
        purge.record = "r1".into();
        purge.change.clear();
        world.append("other", &[change(1), purge, change(3)]);
    };
    let mut world = World::default();
    log(&mut world);
    let mut pair = Pair::new([26; 32], 1);
    pair.run(&mut world);
    assert!(closed_with(&pair.device_events).is_none());
    let applied: Vec<(u64, bool)> = world
        .applied
        .iter()
        .map(|e| (e.seq, e.is_purge()))
        .collect();
    assert_eq!((applied, world.cursor), (vec![(2, true), (3, false)], 3));

    let mut world = World::default();
    log(&mut world);
    let mut pair = Pair::new([27; 32], 1);
    pair.hello_as_version(4);
    pair.run(&mut world);
    match closed_with(&pair.device_events) {
        Some(SessionError::Remote { code, message }) => {
            assert_eq!(*code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("upgrade"), "{message}");
        }
        other => panic!("a version 4 device meeting a purge entry is refused: {other:?}"),
    }
    assert_eq!(world.applied, []);
}

/// A flatten entry (a change depending on nothing whose message is `flatten`) reaches a device
/// of version 8 like any entry; a version 7 device, which would keep it beside the record's old
/// history, is told to upgrade instead.
#[test]
fn a_flatten_entry_is_sent_from_version_8_and_ends_a_version_7_session() {
    // An Automerge change chunk's header: magic, checksum, type 1, body length; then no
    // dependency, a one-byte actor, sequence number 1, first operation 1, time 0, the message.
    let mut body = vec![0, 1, 7, 1, 1, 0, 7];
    body.extend_from_slice(b"flatten");
    let mut chunk = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 1, body.len() as u8];
    chunk.extend_from_slice(&body);
    let log = |world: &mut World| {
        let mut flatten = change(2);
        flatten.record = "r1".into();
        flatten.change = chunk.clone();
        world.append("other", &[change(1), flatten, change(3)]);
    };
    let mut world = World::default();
    log(&mut world);
    let mut pair = Pair::new([28; 32], 1);
    pair.run(&mut world);
    assert!(closed_with(&pair.device_events).is_none());
    let applied: Vec<(u64, bool)> = world
        .applied
        .iter()
        .map(|e| (e.seq, e.is_flatten()))
        .collect();
    assert_eq!((applied, world.cursor), (vec![(2, true), (3, false)], 3));

    let mut world = World::default();
    log(&mut world);
    let mut pair = Pair::new([29; 32], 1);
    pair.hello_as_version(7);
    pair.run(&mut world);
    match closed_with(&pair.device_events) {
        Some(SessionError::Remote { code, message }) => {
            assert_eq!(*code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("upgrade"), "{message}");
        }
        other => panic!("a version 7 device meeting a flatten entry is refused: {other:?}"),
    }
    assert_eq!(world.applied, []);
}

/// A relay that raises `min_device_version` (one that flattens histories) tells an older
/// device to upgrade at its `Hello`, and lets a current one in.
#[test]
fn a_relay_lets_in_no_device_older_than_its_min_device_version() {
    let config = SessionConfig {
        min_device_version: FLATTEN_VERSION,
        ..SessionConfig::default()
    };
    for (max_version, refused) in [(FLATTEN_VERSION - 1, true), (PROTOCOL_VERSION, false)] {
        let mut relay = RelaySession::new(config.clone(), [1; 32], vec![], 0);
        relay.handle_message(
            Message::Hello {
                min_version: 2,
                max_version,
                public_key: [0; 32],
                space: "team".into(),
                time_ms: 0,
            },
            0,
        );
        let answer = relay.poll_output();
        match answer {
            Some(Output::Transmit(Message::Error {
                code: ErrorCode::UnsupportedVersion,
                ref message,
            })) => assert!(refused && message.contains("upgrade"), "{message}"),
            Some(Output::Transmit(Message::Challenge { version, .. })) => {
                assert!(!refused && version == PROTOCOL_VERSION)
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_version_3_device_gets_its_own_uploads_whole() {
    let mut world = World {
        pending: (1..=3).map(change).collect(),
        ..World::default()
    };
    let mut pair = Pair::new([6; 32], 0);
    pair.hello_as_version(3);
    pair.run(&mut world);
    assert!(
        pair.device_events
            .iter()
            .any(|e| matches!(e, DeviceEvent::Authenticated { version: 3, .. })),
        "{:?}",
        pair.device_events
    );
    let seqs: Vec<u64> = world.applied.iter().map(|e| e.seq).collect();
    assert_eq!((seqs, world.own.len(), world.cursor), (vec![1, 2, 3], 0, 3));
}

#[test]
fn a_page_missing_entries_the_device_did_not_upload_ends_the_session() {
    let mut device = opened_by_hand(SessionConfig::default(), [7; 32], 100, 1);
    let _ = taken(|| device.poll_output());
    device.handle_message(
        Message::Changes {
            after: 0,
            through: 3,
            head: 3,
            pushed: false,
            entries: vec![LogEntry {
                seq: 2,
                collection: "c".into(),
                record: "r".into(),
                change: vec![1],
            }],
        },
        2,
    );
    let events = events(taken(|| device.poll_output()));
    match closed_with(&events) {
        Some(SessionError::Protocol { code, message }) => {
            assert_eq!(*code, ErrorCode::Malformed);
            assert!(message.contains("did not upload"), "{message}");
        }
        other => panic!("the session should end for the gap: {other:?}"),
    }
}

/// Answers every effect the device asks for with nothing (no entries to upload, pages applied at
/// once), and returns the messages it sent.
fn settle_device(
    device: &mut DeviceSession,
    pending: &mut Vec<UploadChange>,
    now: u64,
) -> Vec<Message> {
    let mut sent = Vec::new();
    while let Some(output) = device.poll_output() {
        match output {
            Output::Transmit(m) => sent.push(m),
            Output::Event(_) => {}
            Output::Effect(DeviceEffect::LoadUploadBatch { .. }) => {
                device.upload(std::mem::take(pending), now)
            }
            Output::Effect(DeviceEffect::RecordUploadResults { .. }) => device.upload_recorded(),
            Output::Effect(DeviceEffect::Apply { through, .. }) => device.applied(through, now),
            Output::Effect(other) => panic!("unexpected effect {other:?}"),
        }
    }
    sent
}

#[test]
fn a_device_is_not_idle_while_an_upload_it_saw_stored_is_past_its_cursor() {
    let mut device = opened_by_hand(SessionConfig::default(), [8; 32], 100, 1);
    let mut pending = vec![change(1)];
    let mut sent = settle_device(&mut device, &mut pending, 1);
    // Caught up with an empty log first.
    assert!(
        sent.iter().any(|m| matches!(m, Message::Download { .. })),
        "{sent:?}"
    );
    device.handle_message(
        Message::Changes {
            after: 0,
            through: 0,
            head: 0,
            pushed: false,
            entries: vec![],
        },
        2,
    );
    sent.extend(settle_device(&mut device, &mut pending, 2));
    let Some(Message::Upload { batch, .. }) =
        sent.iter().find(|m| matches!(m, Message::Upload { .. }))
    else {
        panic!("the device uploads its change: {sent:?}");
    };
    device.handle_message(
        Message::UploadAck {
            batch: *batch,
            results: vec![ChangeResult {
                entry: 1,
                outcome: ChangeOutcome::Stored { seq: 1 },
            }],
        },
        3,
    );
    settle_device(&mut device, &mut pending, 3);
    // The relay has the change at 1 and has not said so in a page yet: not up to date.
    assert!(!device.is_idle());
    device.handle_message(
        Message::Changes {
            after: 0,
            through: 1,
            head: 1,
            pushed: true,
            entries: vec![],
        },
        4,
    );
    settle_device(&mut device, &mut pending, 4);
    assert!(device.is_idle());
}
