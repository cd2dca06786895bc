//! The configuration file: what each key means and its default. `config.example.toml` at the
//! repository root lists every key with its default, and a test keeps the two in step.
//!
//! Must not touch: the store or the network; it only parses and validates.

use ferry_proto::Limits;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Below this a frame could not carry one record's change.
const MIN_FRAME_BYTES: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub store: StoreConfig,
    pub limits: Limits,
    pub ipc: IpcConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub sync: SyncConfig,
    pub relay: RelayConfig,
    pub alerts: crate::alerts::AlertsConfig,
    /// Per-collection settings, keyed by collection name.
    pub collections: BTreeMap<String, CollectionConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Documents kept loaded in memory (each costs about 17 KB).
    pub cache_docs: usize,
    /// sled's page cache, in MiB.
    pub sled_cache_mb: u64,
    /// When false, only collections with a `[collections.NAME]` section may be written.
    pub allow_undeclared_collections: bool,
    /// Most writes made durable by one flush (group commit).
    pub group_commit_max: usize,
    /// Completed queue entries are forgotten this many days after they completed (0: kept).
    pub keep_completed_days: u64,
    /// SyncLog entries are forgotten after this many days (0: kept).
    pub keep_log_days: u64,
    /// The change feed keeps this many of its newest changes (0: all), for subscribers that
    /// resume with `since` (and the few older ones kept under the same key as the oldest, `store::feed`).
    pub keep_feed_changes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            cache_docs: 1024,
            sled_cache_mb: 16,
            allow_undeclared_collections: true,
            group_commit_max: 256,
            keep_completed_days: 30,
            keep_log_days: 90,
            keep_feed_changes: 1_000_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpcConfig {
    /// Socket path; empty means `ferry.sock` in the data directory.
    pub socket: String,
    /// Longest JSON-RPC message (one line), in bytes.
    pub max_message_bytes: usize,
    /// Most apps connected at once.
    pub max_connections: usize,
    /// Most records in one `import` call.
    pub max_import_records: usize,
    /// Most records in one `list` page.
    pub max_list_limit: usize,
}

impl Default for IpcConfig {
    fn default() -> Self {
        IpcConfig {
            socket: String::new(),
            max_message_bytes: 16 * 1024 * 1024,
            max_connections: 64,
            max_import_records: 10_000,
            max_list_limit: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `ferry=debug,sled=warn`, ...; `RUST_LOG` overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// The daemon's Prometheus metrics endpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served in plain HTTP, such as `127.0.0.1:9464`; empty: nowhere.
    pub listen: String,
}

/// How this device syncs with a relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// False: this device does not sync, whatever relay it is registered with or configured for.
    pub enabled: bool,
    /// The relay's `host:port`, or several separated by commas (relays sharing one database,
    /// tried in turn when one is down; a host that resolves to several addresses is tried at
    /// each); empty: the relays `ferry register` joined, if any.
    pub relay: String,
    /// The name the relay's certificate is checked against.
    pub server_name: String,
    /// SHA-256 fingerprint of the relay's certificate, as `ferry relay` prints it.
    pub fingerprint: String,
    /// PEM file of CA certificates for a CA-issued relay certificate (when no fingerprint).
    pub ca_file: String,
    /// The space: the set of records that this device shares with others.
    pub space: String,
    /// Sync at least this often, even when nothing happened, in seconds.
    pub interval_secs: u64,
    /// Wait after a local write before uploading, in ms. 0 uploads at once; writes made while
    /// a batch is on its way go in the next batch either way.
    pub debounce_ms: u64,
    /// Upload attempts per queue entry before it is marked failed.
    pub max_retries: u32,
    /// First wait before reconnecting, in ms; it doubles (with jitter) up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Most changes in one upload batch (the relay may ask for fewer).
    pub batch_changes: u32,
    /// Most log entries in one download page.
    pub download_changes: u32,
    /// Most records in one page of the relay's snapshot.
    pub snapshot_records: u32,
    /// A new device takes the relay's snapshot (each record's document) instead of reading the
    /// whole log; false: it reads the log from its start (the snapshot is still taken when the
    /// log's start was compacted away).
    pub snapshot: bool,
    /// Largest frame sent or accepted, in bytes.
    pub max_frame_bytes: u32,
    /// Longest wait for the relay to answer a connection attempt or a request, in ms.
    pub request_timeout_ms: u64,
    /// A quiet connection to the relay is pinged this often, in ms.
    pub keep_alive_ms: u64,
    /// A connection that hears nothing from the relay (pings included) for this long is taken
    /// for dead, in ms: this bounds how long status can call a dead relay connected.
    pub idle_timeout_ms: u64,
    /// QUIC congestion controller for what this device sends.
    pub congestion: Congestion,
    /// Sync only these collections (empty: every one). The relay sends only their records;
    /// the others cannot be written here. A collection added later is backfilled: the device
    /// reads the relay's log from the start again (PROTOCOL.md, section 5.9).
    pub collections: Vec<String>,
}

/// QUIC congestion controllers (quinn's). Each side runs its own for what it sends: the relay's
/// decides downloads and pushes, a device's its uploads. BBR by default: CUBIC and NewReno take
/// every loss for congestion, and the random loss of a mobile link (0.5%) held W1 to a third of
/// the link's bandwidth under CUBIC (benches/README.md, "Sync over emulated links").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Congestion {
    Cubic,
    #[default]
    Bbr,
    NewReno,
}

impl SyncConfig {
    /// The relays `relay` names, in the order given.
    pub fn relays(&self) -> Vec<String> {
        relay_list(&self.relay)
    }
}

/// The `host:port` entries of a comma-separated list, blanks dropped.
pub fn relay_list(relays: &str) -> Vec<String> {
    relays
        .split(',')
        .map(str::trim)
        .filter(|relay| !relay.is_empty())
        .map(str::to_owned)
        .collect()
}

impl Default for SyncConfig {
    fn default() -> Self {
        let session = ferry_proto::session::SessionConfig::default();
        SyncConfig {
            enabled: true,
            relay: String::new(),
            server_name: "localhost".into(),
            fingerprint: String::new(),
            ca_file: String::new(),
            space: "default".into(),
            interval_secs: 60,
            debounce_ms: 0,
            max_retries: 10,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            batch_changes: session.max_batch_changes,
            download_changes: session.max_download_changes,
            snapshot_records: session.max_snapshot_records,
            snapshot: true,
            max_frame_bytes: session.max_frame_bytes,
            request_timeout_ms: session.request_timeout_ms,
            keep_alive_ms: 1_000,
            idle_timeout_ms: 5_000,
            congestion: Congestion::default(),
            collections: Vec::new(),
        }
    }
}

/// How `ferry relay` serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// UDP address to listen on.
    pub listen: String,
    /// Names and IP addresses in the self-signed certificate made on first start.
    pub certificate_names: Vec<String>,
    /// A CA-issued certificate chain and its key (PEM), used instead of the self-signed one.
    pub cert_file: String,
    pub key_file: String,
    /// Most devices connected at once; more are refused with `Overloaded`.
    pub max_connections: usize,
    /// Most changes a device may upload in one batch.
    pub max_batch_changes: u32,
    /// Largest frame sent or accepted, in bytes.
    pub max_frame_bytes: u32,
    /// Most log entries sent in one `Changes`.
    pub max_download_changes: u32,
    /// Most records sent in one snapshot page.
    pub max_snapshot_records: u32,
    /// Documents kept loaded in memory.
    pub cache_docs: usize,
    /// sled's page cache, in MiB.
    pub sled_cache_mb: u64,
    /// Where the relay keeps everything: sled in its data directory, or a PostgreSQL database
    /// several relay processes share.
    pub storage: RelayStorageKind,
    /// The database, for `storage = "postgres"`: a URL or libpq key=value string.
    pub postgres_url: String,
    /// Most connections one relay process opens to the database.
    pub postgres_pool_size: usize,
    /// How long to wait for a database connection, in seconds.
    pub postgres_connect_timeout_secs: u64,
    /// The longest one statement may run before the database cancels it, in seconds.
    pub postgres_statement_timeout_secs: u64,
    /// From connection to an authenticated session, in ms.
    pub handshake_timeout_ms: u64,
    /// A connection silent this long is closed, in ms.
    pub idle_timeout_ms: u64,
    /// QUIC congestion controller for what the relay sends.
    pub congestion: Congestion,
    /// How long an access token (and a session opened with it) lasts, in seconds.
    pub access_token_secs: u64,
    /// How long a refresh token lasts unused, in days.
    pub refresh_token_days: u64,
    /// A new token signing key is made this often, in hours.
    pub signing_key_rotation_hours: u64,
    /// How long a replaced signing key still verifies tokens, in seconds (at least
    /// `access_token_secs`, so tokens it signed live out their lifetime).
    pub signing_key_overlap_secs: u64,
    /// Sign-in attempts one client address may make per minute.
    pub sign_ins_per_minute: u32,
    /// Attempts with an enrolment code one client address may make per minute.
    pub enrolments_per_minute: u32,
    /// How long a code from `ferry relay enrol` stays valid, in hours (unless `--hours` says).
    pub enrolment_code_hours: u64,
    /// The TCP address of the HTTPS API; empty: no HTTP API.
    pub http_listen: String,
    /// Largest HTTP request body, in bytes.
    pub http_max_body_bytes: usize,
    /// Most records in one page of `GET /api/sync/download`.
    pub http_max_page: usize,
    /// The oldest app version `POST /api/sync/initialize` calls compatible; empty: any.
    pub min_app_version: String,
    /// Password sign-ins (`POST /api/auth/login`) one client address may try per minute.
    pub logins_per_minute: u32,
    /// The bearer token a Prometheus scraper shows for `GET /metrics` on the HTTPS API; empty:
    /// no metrics served.
    pub metrics_token: String,
    /// A space's log entries older than this many days are dropped once the records' documents
    /// hold them (0: no bound by age); a device that has not synced since bootstraps again.
    pub keep_log_days: u64,
    /// Only this many of a space's latest log entries are kept (0: no bound by count).
    pub keep_log_entries: u64,
    /// When a record's every logged change falls below the horizon (`keep_log_days`,
    /// `keep_log_entries`), its history is started again as one change holding what it shows,
    /// and devices drop the old history when they meet it (PROTOCOL.md, section 5.8).
    pub flatten_history: bool,
    /// A record deleted this many days ago (its last logged change deleted it) is purged, in
    /// the same passes as compaction: a purge entry is logged and its history dropped
    /// (PROTOCOL.md, section 5.8; 0: never). A fraction of a day is allowed (0.5: 12 hours).
    pub tombstone_days: f64,
    /// How often the relay compacts its spaces' logs, in seconds.
    pub compact_interval_secs: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        let session = ferry_proto::session::SessionConfig::default();
        RelayConfig {
            listen: "127.0.0.1:7443".into(),
            certificate_names: vec!["localhost".into(), "127.0.0.1".into()],
            cert_file: String::new(),
            key_file: String::new(),
            max_connections: 1024,
            max_batch_changes: session.max_batch_changes,
            max_frame_bytes: session.max_frame_bytes,
            max_download_changes: session.max_download_changes,
            max_snapshot_records: session.max_snapshot_records,
            cache_docs: 4096,
            sled_cache_mb: 32,
            storage: RelayStorageKind::Sled,
            postgres_url: String::new(),
            postgres_pool_size: 16,
            postgres_connect_timeout_secs: 10,
            postgres_statement_timeout_secs: 30,
            handshake_timeout_ms: session.handshake_timeout_ms,
            idle_timeout_ms: 30_000,
            congestion: Congestion::default(),
            access_token_secs: 600,
            refresh_token_days: 30,
            signing_key_rotation_hours: 24,
            signing_key_overlap_secs: 3600,
            sign_ins_per_minute: 60,
            enrolments_per_minute: 5,
            enrolment_code_hours: 24,
            http_listen: String::new(),
            http_max_body_bytes: 4 << 20,
            http_max_page: 1000,
            min_app_version: String::new(),
            logins_per_minute: 10,
            metrics_token: String::new(),
            keep_log_days: 0,
            keep_log_entries: 0,
            flatten_history: true,
            tombstone_days: 0.0,
            compact_interval_secs: 3600,
        }
    }
}

/// The relay's storage engine (`relay.storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayStorageKind {
    /// sled in the relay's data directory: one relay process.
    #[default]
    Sled,
    /// A PostgreSQL database (`relay.postgres_url`) any number of relay processes share.
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CollectionConfig {
    /// Upload order: higher first.
    pub priority: i32,
    /// How concurrent writes are settled: `merge`, `lww` or `manual`.
    pub strategy: crate::resolve::Strategy,
    /// What a record shows when a delete and an update were concurrent: `keep_update`,
    /// `keep_delete`, `latest` or `queue`; unset means the strategy's default.
    pub on_delete: Option<crate::resolve::DeleteRule>,
    /// Unique constraints, each a list of top-level fields (one field, or several together).
    pub unique: Vec<Vec<String>>,
    /// Top-level string fields merged character by character (Automerge text).
    pub text: Vec<String>,
    /// Top-level fields encrypted on the device with the account key (`ferry key set`): the
    /// relay stores and forwards them but cannot read them. Not allowed in `unique` or `text`.
    pub encrypted: Vec<String>,
    /// Secondary indexes on this device's store, each one top-level field or a list of them
    /// (`["email", ["customer", "year"]]`): queries whose conditions they serve read them.
    pub index: Vec<IndexFields>,
}

/// One index: a field, or several in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IndexFields {
    One(String),
    Several(Vec<String>),
}

impl IndexFields {
    pub fn fields(&self) -> Vec<String> {
        match self {
            IndexFields::One(field) => vec![field.clone()],
            IndexFields::Several(fields) => fields.clone(),
        }
    }
}

impl RelayConfig {
    fn validate_postgres(&self) -> Result<(), String> {
        if self.storage == RelayStorageKind::Postgres && self.postgres_url.is_empty() {
            return Err(
                "relay.storage = \"postgres\" needs relay.postgres_url, the database to keep \
                 everything in (postgres://user@host:port/database)"
                    .into(),
            );
        }
        if !self.postgres_url.is_empty() {
            // The error names what is wrong, never the URL, which may hold a password.
            <tokio_postgres::Config as std::str::FromStr>::from_str(&self.postgres_url).map_err(
                |e| {
                    format!(
                        "relay.postgres_url is not a PostgreSQL connection URL such as \
                         postgres://user@host:port/database ({e})"
                    )
                },
            )?;
        }
        Ok(())
    }

    pub fn token_policy(&self) -> crate::auth::token::TokenPolicy {
        crate::auth::token::TokenPolicy {
            access_ttl_s: self.access_token_secs,
            refresh_ttl_s: self.refresh_token_days.saturating_mul(86_400),
            overlap_s: self.signing_key_overlap_secs,
            ..crate::auth::token::TokenPolicy::default()
        }
    }

    /// `tombstone_days` in milliseconds (0: never purge).
    pub fn tombstone_ms(&self) -> u64 {
        // Validated finite and not negative; `as` saturates at u64::MAX.
        (self.tombstone_days * 86_400_000.0) as u64
    }
}

impl CollectionConfig {
    pub fn policy(&self) -> crate::resolve::Policy {
        crate::resolve::Policy {
            strategy: self.strategy,
            on_delete: self
                .on_delete
                .unwrap_or(crate::resolve::DeleteRule::default_for(self.strategy)),
            unique: self.unique.clone(),
            text: std::sync::Arc::new(self.text.iter().cloned().collect()),
            encrypted: std::sync::Arc::new(self.encrypted.iter().cloned().collect()),
        }
    }
}

impl CollectionConfig {
    fn validate_indexes(&self, name: &str) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for index in &self.index {
            let fields = index.fields();
            if fields.is_empty() {
                return Err(format!(
                    "[collections.{name}] index: an index names one or more fields"
                ));
            }
            if let Some(field) = fields.iter().find(|f| {
                f.is_empty()
                    || f.starts_with('$')
                    || f.contains(',')
                    || f.chars().any(char::is_control)
            }) {
                return Err(format!(
                    "[collections.{name}] index: {field:?} is not a top-level field name (empty, starting with `$`, or holding a comma or a control character)"
                ));
            }
            if let Some(field) = fields.iter().find(|f| self.encrypted.contains(f)) {
                return Err(format!(
                    "[collections.{name}] index: {field:?} is encrypted: its values are sealed on the device (each sealing of one value differs), so they cannot be ordered or compared; index other fields"
                ));
            }
            let distinct: std::collections::BTreeSet<&String> = fields.iter().collect();
            if distinct.len() != fields.len() {
                return Err(format!(
                    "[collections.{name}] index: {fields:?} names a field twice"
                ));
            }
            if !seen.insert(fields.clone()) {
                return Err(format!(
                    "[collections.{name}] index: {fields:?} is listed twice"
                ));
            }
        }
        Ok(())
    }
}

impl Config {
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Reads `path`; a missing file at the default location means the defaults.
    pub fn load(path: &Path, must_exist: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    fn validate(&self) -> Result<(), String> {
        self.alerts.validate()?;
        for (name, collection) in &self.collections {
            ferry_proto::validate_collection(name, &self.limits)
                .map_err(|e| format!("[collections.{name}]: {e}"))?;
            if let Some(fields) = collection
                .unique
                .iter()
                .find(|f| f.is_empty() || f.iter().any(|n| n.is_empty() || n.starts_with('$')))
            {
                return Err(format!(
                    "[collections.{name}] unique: {fields:?} must name one or more fields, none starting with `$`"
                ));
            }
            if let Some(field) = collection
                .encrypted
                .iter()
                .find(|f| f.is_empty() || f.starts_with('$'))
            {
                return Err(format!(
                    "[collections.{name}] encrypted: {field:?} is not a field name (empty or starting with `$`)"
                ));
            }
            collection.validate_indexes(name)?;
            if let Some(field) = collection.encrypted.iter().find(|f| {
                collection.text.contains(f) || collection.unique.iter().any(|u| u.contains(f))
            }) {
                return Err(format!(
                    "[collections.{name}] field {field:?} is both encrypted and in `unique` or `text`: an encrypted value is opaque to the relay and merged as a whole, so remove it from one of the lists"
                ));
            }
        }
        if !self.relay.tombstone_days.is_finite() || self.relay.tombstone_days < 0.0 {
            return Err(format!(
                "relay.tombstone_days must be a number of days, 0 or more (0: never purge); \
                 it is {}",
                self.relay.tombstone_days
            ));
        }
        for name in &self.sync.collections {
            ferry_proto::validate_collection(name, &self.limits)
                .map_err(|e| format!("sync.collections: {e}"))?;
        }
        if self.sync.collections.len() > ferry_proto::session::MAX_COLLECTIONS {
            return Err(format!(
                "sync.collections names {} collections, over the limit of {}",
                self.sync.collections.len(),
                ferry_proto::session::MAX_COLLECTIONS
            ));
        }
        let positive = [
            ("store.cache_docs", self.store.cache_docs),
            ("store.group_commit_max", self.store.group_commit_max),
            ("ipc.max_message_bytes", self.ipc.max_message_bytes),
            ("ipc.max_connections", self.ipc.max_connections),
            ("ipc.max_import_records", self.ipc.max_import_records),
            ("ipc.max_list_limit", self.ipc.max_list_limit),
            ("limits.max_depth", self.limits.max_depth),
            ("limits.max_record_bytes", self.limits.max_record_bytes),
            ("sync.interval_secs", self.sync.interval_secs as usize),
            ("sync.max_retries", self.sync.max_retries as usize),
            (
                "sync.backoff_initial_ms",
                self.sync.backoff_initial_ms as usize,
            ),
            ("sync.batch_changes", self.sync.batch_changes as usize),
            ("sync.download_changes", self.sync.download_changes as usize),
            ("sync.snapshot_records", self.sync.snapshot_records as usize),
            (
                "sync.request_timeout_ms",
                self.sync.request_timeout_ms as usize,
            ),
            ("sync.keep_alive_ms", self.sync.keep_alive_ms as usize),
            ("sync.idle_timeout_ms", self.sync.idle_timeout_ms as usize),
            ("relay.max_connections", self.relay.max_connections),
            (
                "relay.max_batch_changes",
                self.relay.max_batch_changes as usize,
            ),
            (
                "relay.max_download_changes",
                self.relay.max_download_changes as usize,
            ),
            (
                "relay.max_snapshot_records",
                self.relay.max_snapshot_records as usize,
            ),
            ("relay.cache_docs", self.relay.cache_docs),
            (
                "relay.compact_interval_secs",
                self.relay.compact_interval_secs as usize,
            ),
            (
                "relay.handshake_timeout_ms",
                self.relay.handshake_timeout_ms as usize,
            ),
            (
                "relay.access_token_secs",
                self.relay.access_token_secs as usize,
            ),
            (
                "relay.refresh_token_days",
                self.relay.refresh_token_days as usize,
            ),
            (
                "relay.signing_key_rotation_hours",
                self.relay.signing_key_rotation_hours as usize,
            ),
            (
                "relay.sign_ins_per_minute",
                self.relay.sign_ins_per_minute as usize,
            ),
            (
                "relay.enrolments_per_minute",
                self.relay.enrolments_per_minute as usize,
            ),
            (
                "relay.enrolment_code_hours",
                self.relay.enrolment_code_hours as usize,
            ),
            ("relay.http_max_body_bytes", self.relay.http_max_body_bytes),
            ("relay.http_max_page", self.relay.http_max_page),
            (
                "relay.logins_per_minute",
                self.relay.logins_per_minute as usize,
            ),
            ("relay.postgres_pool_size", self.relay.postgres_pool_size),
            (
                "relay.postgres_connect_timeout_secs",
                self.relay.postgres_connect_timeout_secs as usize,
            ),
            (
                "relay.postgres_statement_timeout_secs",
                self.relay.postgres_statement_timeout_secs as usize,
            ),
        ];
        self.relay.validate_postgres()?;
        if self.relay.signing_key_overlap_secs < self.relay.access_token_secs {
            return Err(
                "relay.signing_key_overlap_secs must be at least relay.access_token_secs: a \
                 replaced key must verify the tokens it signed until they expire"
                    .into(),
            );
        }
        if self.sync.backoff_max_ms < self.sync.backoff_initial_ms {
            return Err("sync.backoff_max_ms must be at least sync.backoff_initial_ms".into());
        }
        for (key, bytes) in [
            ("sync.max_frame_bytes", self.sync.max_frame_bytes),
            ("relay.max_frame_bytes", self.relay.max_frame_bytes),
        ] {
            if bytes < MIN_FRAME_BYTES {
                return Err(format!("{key} must be at least {MIN_FRAME_BYTES}"));
            }
        }
        if self.relay.cert_file.is_empty() != self.relay.key_file.is_empty() {
            return Err(
                "relay.cert_file and relay.key_file go together: set both or neither".into(),
            );
        }
        if self.sync.keep_alive_ms >= self.sync.idle_timeout_ms {
            return Err(format!(
                "sync.keep_alive_ms ({}) must be shorter than sync.idle_timeout_ms ({}), or a \
                 quiet connection would be taken for dead between two pings",
                self.sync.keep_alive_ms, self.sync.idle_timeout_ms
            ));
        }
        match positive.iter().find(|(_, v)| *v == 0) {
            Some((key, _)) => Err(format!("{key} must be at least 1")),
            None => Ok(()),
        }
    }

    /// Each collection's conflict policy (`[collections.NAME]`), the default for the others.
    pub fn policies(&self) -> crate::resolve::Policies {
        crate::resolve::Policies {
            default: crate::resolve::Policy::default(),
            collections: self
                .collections
                .iter()
                .map(|(name, c)| (name.clone(), c.policy()))
                .collect(),
        }
    }

    pub fn store_options(&self) -> crate::store::StoreOptions {
        crate::store::StoreOptions {
            limits: self.limits,
            cache_docs: self.store.cache_docs,
            priorities: self
                .collections
                .iter()
                .map(|(name, c)| (name.clone(), c.priority))
                .collect(),
            declared_collections: (!self.store.allow_undeclared_collections)
                .then(|| self.collections.keys().cloned().collect()),
            synced_collections: (!self.sync.collections.is_empty())
                .then(|| self.sync.collections.iter().cloned().collect()),
            policies: self.policies(),
            indexes: self
                .collections
                .iter()
                .filter(|(_, c)| !c.index.is_empty())
                .map(|(name, c)| {
                    (
                        name.clone(),
                        c.index.iter().map(IndexFields::fields).collect(),
                    )
                })
                .collect(),
            keyring: Default::default(),
            max_change_bytes: ferry_proto::wire::max_change_bytes(
                self.sync.max_frame_bytes as usize,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../config.example.toml");

    #[test]
    fn sync_relay_lists_several_relays() {
        let config = Config::parse(
            "[sync]\nrelay = \"a.example:4433, b.example:4433,,\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(config.sync.relays(), ["a.example:4433", "b.example:4433"]);
        assert!(SyncConfig::default().relays().is_empty());
    }

    #[test]
    fn example_parses_to_the_defaults() {
        let parsed = Config::parse(EXAMPLE, Path::new("config.example.toml")).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn example_names_every_key() {
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let mut missing = Vec::new();
        if let toml::Value::Table(sections) = defaults {
            for (section, body) in sections {
                assert!(
                    EXAMPLE.contains(&format!("[{section}")),
                    "[{section}] missing"
                );
                if let toml::Value::Table(keys) = body {
                    for key in keys.keys() {
                        if !EXAMPLE.contains(&format!("\n{key} = ")) {
                            missing.push(format!("{section}.{key}"));
                        }
                    }
                }
            }
        }
        assert!(
            missing.is_empty(),
            "keys missing from the example: {missing:?}"
        );
    }

    #[test]
    fn typos_and_bad_values_are_refused_with_the_key_named() {
        let err = Config::parse("[store]\ncache_doc = 5\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("cache_doc"), "{err}");
        let err = Config::parse("[ipc]\nmax_connections = 0\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("ipc.max_connections"), "{err}");
        let err = Config::parse("[collections.\"a b\"]\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("collections.a b"), "{err}");
    }

    #[test]
    fn the_commented_collection_example_parses_and_names_every_key() {
        let section: String = EXAMPLE
            .lines()
            .skip_while(|l| !l.starts_with("# [collections."))
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("# #") && l.len() > 2)
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let c = Config::parse(&section, Path::new("example")).unwrap();
        let (_, collection) = c.collections.iter().next().unwrap();
        let keys = toml::Value::try_from(collection).unwrap();
        for key in keys.as_table().unwrap().keys() {
            assert!(
                section.contains(&format!("\n{key} = ")),
                "{key} not in the example"
            );
        }
        assert_eq!(collection.encrypted, ["iban"]);
    }

    #[test]
    fn indexes_name_top_level_fields_never_encrypted_ones() {
        let text = "[collections.Invoice]\nindex = [\"email\", [\"customer\", \"year\"]]\n";
        let config = Config::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(
            config.store_options().indexes["Invoice"],
            [
                vec!["email".to_owned()],
                vec!["customer".into(), "year".into()]
            ]
        );
        for (bad, says) in [
            ("encrypted = [\"iban\"]\nindex = [\"iban\"]", "sealed"),
            ("index = [[]]", "one or more"),
            ("index = [\"$id\"]", "top-level"),
            ("index = [\"a,b\"]", "comma"),
            ("index = [[\"a\", \"a\"]]", "twice"),
            ("index = [\"a\", [\"a\"]]", "twice"),
        ] {
            let text = format!("[collections.C]\n{bad}\n");
            let err = Config::parse(&text, Path::new("c.toml")).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn an_encrypted_field_cannot_be_unique_or_text() {
        for clash in ["unique = [[\"iban\", \"bic\"]]", "text = [\"iban\"]"] {
            let text = format!("[collections.People]\nencrypted = [\"iban\"]\n{clash}\n");
            let err = Config::parse(&text, Path::new("c.toml")).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains("collections.People") && message.contains("\"iban\""),
                "{message}"
            );
        }
        let err = Config::parse(
            "[collections.People]\nencrypted = [\"$x\"]\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("encrypted"), "{err}");
    }

    #[test]
    fn postgres_storage_needs_a_url_that_parses() {
        let err =
            Config::parse("[relay]\nstorage = \"postgres\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("relay.postgres_url"), "{err}");
        let err = Config::parse(
            "[relay]\nstorage = \"postgres\"\npostgres_url = \"postgres://u:secret@h:notaport/db\"\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("relay.postgres_url is not"), "{message}");
        assert!(!message.contains("secret"), "{message}");
        let err = Config::parse("[relay]\nstorage = \"mysql\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("storage"), "{err}");
        let c = Config::parse(
            "[relay]\nstorage = \"postgres\"\npostgres_url = \"postgres://ferry@127.0.0.1:5432/ferry\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.relay.storage, RelayStorageKind::Postgres);
        let err =
            Config::parse("[relay]\npostgres_pool_size = 0\n", Path::new("c.toml")).unwrap_err();
        assert!(
            err.to_string().contains("relay.postgres_pool_size"),
            "{err}"
        );
    }

    #[test]
    fn declared_collections_and_priorities() {
        let c = Config::parse(
            "[store]\nallow_undeclared_collections = false\n[collections.Invoice]\npriority = 10\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let o = c.store_options();
        assert_eq!(o.priorities.get("Invoice"), Some(&10));
        assert!(o.declared_collections.unwrap().contains("Invoice"));
    }
}
