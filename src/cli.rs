//! The `ferry` command line: set up a device, run the daemon, and inspect and repair data.
//!
//! Data commands talk to the daemon's socket when one runs, and otherwise open the store
//! directly (taking the data directory's lock). Both paths call the same `service` methods.
//! Every command that prints data takes `--json`.
//!
//! Exit codes: 0 success, 1 failure, 2 usage or invalid input, 3 not found.
//!
//! Must not touch: the store's internals; it uses the service's methods only.

use crate::alerts::Alert;
use crate::config::Config;
use crate::daemon::{self, DaemonError};
use crate::datadir::{DataDir, DataDirError, DirLock};
use crate::engine::ConnectionState;
use crate::ipc::{Client, ClientError, DaemonStatus, Notification};
use crate::record::Fields;
use crate::service::api::{self, Method};
use crate::service::{ApiError, Service, code};
use crate::store::{Applied, FieldsText, RecordView};
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use std::io::{BufRead as _, IsTerminal as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use zeroize::Zeroizing;

mod accounts;
mod conflicts;
mod import;
mod key;
mod relay_status;
mod space;
mod status;

/// The longest secret line (passphrase, key line, password) read from standard input.
const MAX_SECRET_LINE: u64 = 4096;

const EXAMPLE_CONFIG: &str = include_str!("../config.example.toml");

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Offline-first sync daemon and its tools"
)]
pub struct Cli {
    /// Data directory of the device [default: $XDG_DATA_HOME/ferry]
    #[arg(long, global = true, env = "FERRY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Config file [default: DATA_DIR/config.toml]
    #[arg(long, global = true, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the data directory, its config and the device's identity key
    Init,
    /// Run the daemon in the foreground (stops cleanly on SIGINT/SIGTERM)
    Daemon,
    /// Create or replace a record: `ferry put Customer/42 --data '{"name":"Ada"}'`;
    /// without an id (`ferry put Customer`) one is generated
    Put {
        /// COLLECTION/ID of the record, or COLLECTION alone to generate a time-ordered id
        address: String,
        /// The record's fields as a JSON object; `-` or absent reads standard input
        #[arg(long)]
        data: Option<String>,
    },
    /// Merge fields into a record
    Patch {
        /// COLLECTION/ID of the record
        address: String,
        /// Fields to set, as a JSON object
        #[arg(long)]
        data: Option<String>,
        /// A field to remove (repeatable)
        #[arg(long)]
        unset: Vec<String>,
    },
    /// Print a record
    Get {
        /// COLLECTION/ID of the record
        address: String,
    },
    /// List collections, or the records of one collection
    Ls {
        /// The collection whose records to list; absent: list the collections
        collection: Option<String>,
        /// How many records to print at most (fetched in as many calls as needed)
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this id (the `next` of the previous page)
        #[arg(long)]
        after: Option<String>,
        /// Only records meeting this condition (repeatable, all must hold): FIELD=VALUE,
        /// FIELD>VALUE, FIELD>=VALUE, FIELD<VALUE, FIELD<=VALUE, 'FIELD in V1,V2',
        /// 'FIELD exists', 'FIELD missing'; a VALUE that reads as JSON (2024, true, null) is that
        #[arg(long = "where", value_name = "CONDITION")]
        conditions: Vec<String>,
        /// Order by this top-level field (records without it first)
        #[arg(long, value_name = "FIELD")]
        order_by: Option<String>,
        /// With --order-by: largest first
        #[arg(long, requires = "order_by")]
        desc: bool,
    },
    /// Delete a record (a tombstone that syncs)
    Rm {
        /// COLLECTION/ID of the record
        address: String,
    },
    /// The changes of a record: when, which device, what fields
    History {
        /// COLLECTION/ID of the record
        address: String,
    },
    /// Load records from JSON Lines ({"collection": ..., "id": ..., "fields": {...}} per line),
    /// or one record's Automerge document made by any Automerge program, with its history
    Import {
        /// File to read; `-` or absent reads standard input
        file: Option<PathBuf>,
        /// jsonl: records, one per line; automerge: one binary document (needs --into)
        #[arg(long, value_enum, default_value_t = ImportFormat::Jsonl)]
        format: ImportFormat,
        /// COLLECTION/ID the Automerge document becomes (a record this device does not hold)
        #[arg(long, required_if_eq("format", "automerge"))]
        into: Option<String>,
        /// Records per call (at most ipc.max_import_records; with --atomic, the whole file)
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// All or nothing: import the whole file in one call, or no line of it if any is refused
        /// (the file must fit in one call: ipc.max_import_records, ipc.max_message_bytes)
        #[arg(long)]
        atomic: bool,
    },
    /// Export records as JSON, JSON Lines, or Automerge binary documents
    Export {
        /// A collection, or `collection/id` for one record; absent exports everything
        target: Option<String>,
        /// json: one array; jsonl: one record per line; automerge: the binary documents
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
        /// Output file (or directory, for several Automerge documents); absent: standard output
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Show SyncQueue entries, newest first
    Queue {
        /// pending, processing, completed or failed
        #[arg(long)]
        status: Option<String>,
        /// How many entries to print at most
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only entries older than this id (the `more:` hint of the previous page)
        #[arg(long, conflicts_with_all = ["after", "oldest_first"])]
        before: Option<u64>,
        /// List the oldest entries first
        #[arg(long)]
        oldest_first: bool,
        /// Only entries newer than this id, oldest first
        #[arg(long)]
        after: Option<u64>,
    },
    /// Conflicts between concurrent changes: list them (open ones by default), or `show` or
    /// `resolve` one
    #[command(args_conflicts_with_subcommands = true)]
    Conflicts {
        #[command(subcommand)]
        action: Option<conflicts::Action>,
        /// Which conflicts to list: waiting ones, settled by someone, settled by the strategy
        #[arg(long, value_enum, default_value_t = conflicts::StatusFilter::Open)]
        status: conflicts::StatusFilter,
        /// Only this collection's conflicts
        #[arg(long)]
        collection: Option<String>,
        /// How many conflicts to print at most
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this conflict id (the `next` of the previous page)
        #[arg(long)]
        after: Option<String>,
    },
    /// The account key that encrypts the fields collections declare `encrypted`
    Key {
        #[command(subcommand)]
        action: key::Action,
    },
    /// Put failed queue entries back to pending
    Retry {
        /// Ids of the queue entries to retry (as `ferry queue` shows them)
        #[arg(required_unless_present = "all_failed")]
        ids: Vec<u64>,
        /// Retry every entry that failed for good, instead of the ones named
        #[arg(long, conflicts_with = "ids")]
        all_failed: bool,
    },
    /// Show SyncLog entries, newest first
    Log {
        /// How many entries to print at most
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Device, store, queue and sync state: connection, last sync, whether this device holds
    /// everything the relay has
    Status,
    /// Read the whole store and say what is damaged or lost; `--repair` (daemon stopped)
    /// removes damaged values, puts back unsynced changes the journal kept, and has the device
    /// read the relay's data again where it needs to
    Doctor {
        /// Repair what is found (the daemon must be stopped)
        #[arg(long)]
        repair: bool,
    },
    /// Where the store's bytes go: the directory on disk, the journal, and the live bytes of
    /// each kind of key (records, indexes, queue, log, ...), for a device's store and a
    /// relay's (sled). Opens the store itself: stop the daemon or relay first
    Space {
        /// First rewrite each store compactly (the daemon does so by itself once its store
        /// takes twice its data; the relay after compacting its log)
        #[arg(long)]
        compact: bool,
    },
    /// Sync with the relay now and wait until done, showing progress (needs the daemon)
    Sync {
        #[command(subcommand)]
        action: Option<SyncAction>,
        /// First put failed queue entries back to pending, so they are uploaded again
        #[arg(long)]
        retry_failed: bool,
    },
    /// Run the relay in the foreground: stores every space's change log and serves devices over
    /// QUIC; prints the certificate fingerprint that devices pin (stops cleanly on SIGINT/SIGTERM)
    Relay {
        /// UDP address to listen on [default: relay.listen from the config]
        #[arg(long)]
        listen: Option<String>,
        /// Manage the relay's accounts and devices, or rebuild a damaged record, instead (works
        /// while the relay runs)
        #[command(subcommand)]
        action: Option<accounts::RelayAction>,
    },
    /// Register this device in an account of a relay, with a one-time code from the relay's
    /// operator (`ferry relay enrol ACCOUNT`); the daemon then syncs with that relay
    Register {
        /// The relay, as HOST:PORT; relays sharing one database: repeat the flag or separate
        /// them with commas (the daemon fails over between them)
        #[arg(long, required = true, value_delimiter = ',')]
        relay: Vec<String>,
        /// The SHA-256 fingerprint of the relay's certificate, as `ferry relay` printed it
        #[arg(long, required_unless_present = "ca_file")]
        fingerprint: Option<String>,
        /// A PEM file of CA certificates, for a relay with a CA-issued certificate
        #[arg(long)]
        ca_file: Option<String>,
        /// The name the relay's certificate is checked against
        #[arg(long, default_value = "localhost")]
        server_name: String,
        /// The enrolment code (ACCOUNT/SECRET); `-` reads it from standard input
        #[arg(long)]
        code: String,
    },
    /// Print record changes and conflicts as they happen (needs the daemon)
    Watch {
        /// Only this collection's records; absent: every collection
        collection: Option<String>,
        /// Only records with this id (in COLLECTION, or in any collection)
        #[arg(long)]
        id: Option<String>,
        /// Stop after this many notifications
        #[arg(long)]
        count: Option<usize>,
        /// First print every change after this feed number (the `seq` of the last change seen)
        #[arg(long)]
        since: Option<u64>,
        /// Print each changed record's fields too
        #[arg(long)]
        fields: bool,
    },
    /// Run the main job end to end: a daemon on a fresh data directory, writes and reads through
    /// its socket, a subscriber, a clean stop, and a check that everything is on disk
    Demo {
        /// How many records to import through the daemon's socket
        #[arg(long, default_value_t = 10_000)]
        records: usize,
    },
    /// Print a completion script for a shell: `ferry completions bash > /etc/bash_completion.d/ferry`
    Completions {
        /// The shell to complete in
        shell: clap_complete::Shell,
    },
    /// Print ferry's manual page (roff): `ferry man > ferry.1 && man ./ferry.1`
    Man,
}

#[derive(Subcommand, Debug)]
enum SyncAction {
    /// Stop syncing until `ferry sync resume`: the daemon ends its session and makes no
    /// connection; local writes go on and wait in the queue
    Pause {
        /// Stay paused after the daemon restarts too (works with no daemon running)
        #[arg(long)]
        remember: bool,
    },
    /// Sync again after `ferry sync pause` (and forget a remembered pause)
    Resume,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ImportFormat {
    Jsonl,
    Automerge,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum ExportFormat {
    Json,
    Jsonl,
    Automerge,
}

/// A command's failure: the message for people and the exit code for scripts.
#[derive(Debug)]
pub struct Failure {
    exit: u8,
    message: String,
}

const EXIT_FAILURE: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_NOT_FOUND: u8 = 3;

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: EXIT_USAGE,
            message: message.into(),
        }
    }

    fn failed(message: impl Into<String>) -> Self {
        Failure {
            exit: EXIT_FAILURE,
            message: message.into(),
        }
    }
}

impl From<ApiError> for Failure {
    fn from(e: ApiError) -> Self {
        let exit = match e.code {
            code::NOT_FOUND => EXIT_NOT_FOUND,
            code::INVALID_PARAMS
            | code::INVALID_REQUEST
            | code::METHOD_NOT_FOUND
            | code::UNKNOWN_COLLECTION
            | code::TOO_LARGE => EXIT_USAGE,
            _ => EXIT_FAILURE,
        };
        Failure {
            exit,
            message: e.message,
        }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Api(api) => api.into(),
            other => Failure::failed(other.to_string()),
        }
    }
}

impl From<DaemonError> for Failure {
    fn from(e: DaemonError) -> Self {
        Failure::failed(e.to_string())
    }
}

impl From<DataDirError> for Failure {
    fn from(e: DataDirError) -> Self {
        Failure::failed(e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::failed(e.to_string())
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Daemon) {
        // Like other Unix tools, end quietly when the reader of our output goes away
        // (`ferry ls | head`) instead of failing on a broken pipe. The daemon keeps the default
        // Rust behaviour: a vanished socket peer is an error to handle, not a reason to exit.
        // SAFETY: setting a signal disposition to SIG_DFL before any threads start.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.exit)
        }
    }
}

struct Context {
    dir: DataDir,
    config: Config,
    json: bool,
}

fn run(cli: Cli) -> Result<(), Failure> {
    let dir = DataDir::resolve(cli.data_dir.as_deref())?;
    let config_path = cli.config.clone().unwrap_or_else(|| dir.config_path());
    let config = Config::load(&config_path, cli.config.is_some())
        .map_err(|e| Failure::failed(e.to_string()))?;
    let quiet = !matches!(
        cli.command,
        Command::Daemon | Command::Demo { .. } | Command::Relay { action: None, .. }
    );
    init_logging(&config, quiet);
    let ctx = Context {
        dir,
        config,
        json: cli.json,
    };
    match cli.command {
        Command::Init => init(&ctx),
        Command::Completions { shell } => completions(shell),
        Command::Man => manual(),
        Command::Daemon => run_daemon(&ctx),
        Command::Demo { records } => demo(&ctx, cli.data_dir.is_some(), records),
        Command::Watch {
            collection,
            id,
            count,
            since,
            fields,
        } => watch(
            &ctx,
            api::SubscribeParams {
                collection,
                id,
                since,
                fields,
            },
            count,
        ),
        Command::Import {
            file,
            format: ImportFormat::Automerge,
            into,
            ..
        } => import::document(&ctx, file.as_deref(), into.as_deref().unwrap_or_default()),
        Command::Import {
            file,
            batch,
            atomic,
            ..
        } => import::run(
            &ctx,
            import::ImportArgs {
                file,
                batch,
                atomic,
            },
        ),
        Command::Sync {
            action: None,
            retry_failed,
        } => sync(&ctx, retry_failed),
        Command::Sync {
            action: Some(action),
            ..
        } => pause_or_resume(&ctx, action),
        Command::Conflicts {
            action,
            status,
            collection,
            limit,
            after,
        } => conflicts::run(
            &ctx,
            action,
            conflicts::ListArgs {
                status,
                collection,
                limit,
                after,
            },
        ),
        Command::Relay {
            listen,
            action: None,
        } => run_relay(&ctx, listen.as_deref()),
        Command::Relay {
            action: Some(action),
            ..
        } => accounts::relay_admin(&ctx, action),
        Command::Register {
            relay,
            fingerprint,
            ca_file,
            server_name,
            code,
        } => accounts::register(
            &ctx,
            accounts::RegisterArgs {
                relay,
                fingerprint,
                ca_file,
                server_name,
                code,
            },
        ),
        Command::Key { action } => key::run(&ctx, action),
        Command::Space { compact } => space::run(&ctx, compact),
        Command::Export {
            target,
            format,
            out,
        } => export(&ctx, target.as_deref(), format, out.as_deref()),
        Command::Doctor { repair: true } => {
            let socket = daemon::socket_path(&ctx.dir, &ctx.config);
            let backend = match Client::connect(&socket) {
                Ok(client) => Backend::Daemon(client),
                Err(_) => match daemon::open_or_set_aside(&ctx.dir, &ctx.config)? {
                    daemon::OpenedOrSetAside::Opened(open) => Backend::local(&ctx, open),
                    daemon::OpenedOrSetAside::SetAside(aside) => {
                        eprintln!(
                            "the store cannot be opened at all: it is kept at {}, and a new one \
                             is made from its journal of unsynced changes and, at the next sync, \
                             the relay",
                            aside.display()
                        );
                        Backend::connect(&ctx)?
                    }
                },
            };
            run_data_command(&ctx, backend, Command::Doctor { repair: true })
        }
        other => data_command(&ctx, other),
    }
}

fn init_logging(config: &Config, quiet: bool) {
    let default = if quiet {
        "warn"
    } else {
        config.log.level.as_str()
    };
    let parse = |text: &str| tracing_subscriber::EnvFilter::try_new(log_filter(text)).ok();
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|text| parse(&text))
        .or_else(|| parse(default))
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(log_filter("info")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes in a log file or pipe split `field="value"` apart for whoever searches it.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The tracing filter for a `log.level` (or `RUST_LOG`) text. Automerge marks its parsing
/// functions `#[instrument]`, which is the info level: under a plain "info" filter every change
/// parsed, loaded or applied would build a span and format its fields, which took about a tenth
/// of a syncing daemon's CPU. Automerge's own logs and spans show only when the filter names it.
fn log_filter(text: &str) -> String {
    if text.contains("automerge") {
        text.to_string()
    } else if text.trim().is_empty() {
        "automerge=warn".to_string()
    } else {
        format!("{text},automerge=warn")
    }
}

/// Writes the completion script for `shell` to standard output.
fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut command = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut command, "ferry", &mut std::io::stdout());
    Ok(())
}

/// Writes the manual page (options, commands, version) to standard output.
fn manual() -> Result<(), Failure> {
    let mut page = Vec::new();
    clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
        .render(&mut page)
        .map_err(|e| Failure::failed(format!("cannot render the manual page: {e}")))?;
    std::io::stdout()
        .write_all(&page)
        .map_err(|e| Failure::failed(format!("cannot write the manual page: {e}")))
}

fn init(ctx: &Context) -> Result<(), Failure> {
    let created = ctx.dir.init(EXAMPLE_CONFIG)?;
    let device = ctx.dir.identity()?.device_id();
    let path = ctx.dir.path().display().to_string();
    if ctx.json {
        print_json(&json!({ "data_dir": path, "device_id": device, "created": created }));
    } else if created {
        println!("initialised {path} (device {device})");
    } else {
        println!("{path} is already initialised (device {device}); nothing changed");
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    daemon::runtime().map_err(|e| Failure::failed(format!("cannot start the async runtime: {e}")))
}

fn run_daemon(ctx: &Context) -> Result<(), Failure> {
    if ctx.dir.init(EXAMPLE_CONFIG)? {
        eprintln!("initialised {}", ctx.dir.path().display());
    }
    runtime()?.block_on(async {
        daemon::run(&ctx.dir, &ctx.config, stop_signal(), |socket| {
            eprintln!("ferry daemon listening on {}", socket.display());
        })
        .await
    })?;
    Ok(())
}

/// How long the relay's process waits, once everything is flushed, for blocking tasks still
/// running (a disk measurement, a metrics scrape) before it exits anyway.
const RELAY_EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

fn run_relay(ctx: &Context, listen: Option<&str>) -> Result<(), Failure> {
    let json = ctx.json;
    let runtime = runtime()?;
    let ran = runtime
        .block_on(async {
            crate::relay::run(&ctx.dir, &ctx.config, listen, stop_signal(), |ready| {
                if json {
                    print_json(&json!(ready));
                } else {
                    println!("ferry relay listening on {} (QUIC)", ready.listen);
                    if let Some(http) = ready.http {
                        println!("HTTPS API on https://{http}/api (same certificate)");
                    }
                    println!("certificate fingerprint (sha256): {}", ready.fingerprint);
                    println!(
                        "devices pin it: set sync.fingerprint = \"{}\" in their config",
                        ready.fingerprint
                    );
                }
                // Whoever started the relay may be waiting for these lines.
                let _ = std::io::stdout().flush();
            })
            .await
        })
        .map_err(|e| Failure::failed(e.to_string()));
    // Dropping the runtime would wait for every blocking task however long it takes.
    runtime.shutdown_timeout(RELAY_EXIT_GRACE);
    ran
}

/// How long `register` and `sync` wait for the relay before saying they are waiting.
const RELAY_WAIT_NOTICE: std::time::Duration = std::time::Duration::from_secs(1);

/// Says on standard error that the relay has not answered yet, once `RELAY_WAIT_NOTICE` has
/// passed with no answer, so that a dead relay address does not look like a hung command.
/// A command answered sooner prints nothing.
struct RelayWait {
    answered: Option<std::sync::mpsc::Sender<()>>,
    notice: Option<std::thread::JoinHandle<()>>,
}

impl RelayWait {
    fn start(relay: &str) -> RelayWait {
        let (answered, answer) = std::sync::mpsc::channel::<()>();
        let relay = if relay.is_empty() {
            "the relay".to_owned()
        } else {
            format!("relay {relay}")
        };
        let notice = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                answer.recv_timeout(RELAY_WAIT_NOTICE)
            {
                eprintln!("waiting for {relay} … (no answer yet; Ctrl-C stops)");
            }
        });
        RelayWait {
            answered: Some(answered),
            notice: Some(notice),
        }
    }

    /// The relay answered: no notice is due any more.
    fn answered(&mut self) {
        if let Some(answered) = self.answered.take() {
            let _ = answered.send(());
        }
    }
}

impl Drop for RelayWait {
    fn drop(&mut self) {
        self.answered();
        if let Some(notice) = self.notice.take() {
            let _ = notice.join();
        }
    }
}

/// The relay this device syncs with: its registration's, unless the config names one.
fn sync_relay(ctx: &Context) -> String {
    crate::auth::credentials::Registration::sync_config(ctx.dir.path(), &ctx.config.sync)
        .map_or_else(|_| ctx.config.sync.relay.clone(), |sync| sync.relay)
}

/// `ferry sync pause|resume`: through the daemon, or on the store when none runs (a
/// remembered pause, which the daemon reads when it starts).
fn pause_or_resume(ctx: &Context, action: SyncAction) -> Result<(), Failure> {
    let mut backend = Backend::connect(ctx)?;
    let now = match action {
        SyncAction::Pause { remember } => backend.call(api::SyncPauseParams { remember })?,
        SyncAction::Resume => backend.call(api::SyncResumeParams {})?,
    };
    if ctx.json {
        print_json(&now);
    } else if now.paused {
        println!(
            "sync paused{}: `ferry sync resume` resumes it",
            if now.remembered {
                ", also after a restart"
            } else {
                " until the daemon restarts"
            }
        );
    } else {
        println!("sync resumed");
    }
    Ok(())
}

fn sync(ctx: &Context, retry_failed: bool) -> Result<(), Failure> {
    let socket = daemon::socket_path(&ctx.dir, &ctx.config);
    let mut client = Client::connect(&socket).map_err(|_| {
        Failure::failed(format!(
            "no daemon is listening on {}: start `ferry daemon` (it syncs in the background)",
            socket.display()
        ))
    })?;
    let progress = (!ctx.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let mut waiting = RelayWait::start(&sync_relay(ctx));
    let result = client.sync(api::SyncParams { retry_failed }, |s| {
        if s.state == ConnectionState::Connected {
            waiting.answered();
        }
        if let Some(bar) = &progress {
            bar.set_message(format!(
                "{} · uploaded {} · downloaded {} · log {}/{}",
                label(&s.state),
                s.uploaded,
                s.downloaded,
                s.cursor,
                s.relay_head
            ));
        }
    });
    drop(waiting);
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    let r = result?;
    let (report, status) = (&r.report, &r.status);
    if ctx.json {
        print_json(&r);
    } else {
        let done = format!(
            "uploaded {} changes, downloaded {}, at {} of the relay's {}",
            report.uploaded, report.downloaded, report.cursor, report.relay_head
        );
        if status.up_to_date {
            println!("in sync: {done}");
        } else {
            println!("not in sync: {done}");
            for line in status.summary(crate::clock::now_ms()) {
                println!("  {line}");
            }
        }
        for refused in &report.refused {
            eprintln!("{}", refused.describe());
        }
    }
    match (report.refused.len(), status.up_to_date) {
        (0, true) => Ok(()),
        (0, false) => Err(Failure::failed(
            "the sync ended with the device not up to date (see above)",
        )),
        (n, _) => Err(Failure::failed(format!(
            "{n} local changes were refused: see `ferry queue --status failed`"
        ))),
    }
}

async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "SIGTERM cannot be caught; stop with SIGINT");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Where a data command's calls go: the running daemon, or the store opened here.
enum Backend {
    Daemon(Client),
    Local { service: Service, _lock: DirLock },
}

impl Backend {
    fn connect(ctx: &Context) -> Result<Backend, Failure> {
        let socket = daemon::socket_path(&ctx.dir, &ctx.config);
        if let Ok(client) = Client::connect(&socket) {
            return Ok(Backend::Daemon(client));
        }
        // The lock is held by a daemon that is starting (its socket answers in a moment), or by
        // another command working on the store: wait for either.
        let mut daemon = None;
        let mut told = false;
        let lock = ctx.dir.lock_within(daemon::LOCK_PATIENCE, |pid| {
            daemon = Client::connect(&socket).ok();
            if daemon.is_none() && !told {
                told = true;
                let pid = pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
                eprintln!("waiting for the data directory, in use by another ferry process{pid} …");
            }
            daemon.is_none()
        });
        if let Some(client) = daemon {
            return Ok(Backend::Daemon(client));
        }
        let open = daemon::open_locked_store(lock?, &ctx.dir, &ctx.config)?;
        Ok(Backend::local(ctx, open))
    }

    /// Works on a store this command opened.
    fn local(ctx: &Context, open: daemon::OpenStore) -> Backend {
        let service = Service::new(
            open.store,
            daemon::service_options(&ctx.dir, &ctx.config, false),
        );
        Backend::Local {
            service,
            _lock: open.lock,
        }
    }

    fn call<M: Method>(&mut self, params: M) -> Result<M::Answer, Failure> {
        Ok(self.try_call(params)?)
    }

    /// `call`, with the error as the daemon gave it (its code tells what went wrong).
    fn try_call<M: Method>(&mut self, params: M) -> Result<M::Answer, ClientError> {
        match self {
            Backend::Daemon(client) => client.request(params),
            Backend::Local { service, .. } => Ok(service.call(params)?),
        }
    }
}

/// `Collection/id` (the id may itself contain `/`), or just `Collection` where allowed.
fn split_address(address: &str) -> (String, Option<String>) {
    match address.split_once('/') {
        Some((collection, id)) => (collection.to_owned(), Some(id.to_owned())),
        None => (address.to_owned(), None),
    }
}

fn full_address(address: &str) -> Result<(String, String), Failure> {
    match split_address(address) {
        (c, Some(id)) if !id.is_empty() => Ok((c, id)),
        _ => Err(Failure::usage(format!(
            "{address:?} is not a record address: write COLLECTION/ID, e.g. Customer/42"
        ))),
    }
}

fn read_fields(data: Option<&str>, max_bytes: usize) -> Result<Fields, Failure> {
    let text = match data {
        Some("-") | None => {
            if std::io::stdin().is_terminal() {
                return Err(Failure::usage(
                    "give the fields with --data '{...}' or on standard input",
                ));
            }
            let mut text = String::new();
            std::io::stdin()
                .take(max_bytes as u64 + 1)
                .read_to_string(&mut text)?;
            if text.len() > max_bytes {
                return Err(too_long("standard input", max_bytes));
            }
            text
        }
        Some(text) => text.to_owned(),
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err(Failure::usage(
            "the fields must be a JSON object, e.g. '{\"name\": \"Ada\"}'",
        )),
        Err(e) => Err(Failure::usage(format!(
            "the fields are not valid JSON: {e}"
        ))),
    }
}

fn too_long(what: &str, max_bytes: usize) -> Failure {
    Failure::usage(format!(
        "{what} is over {max_bytes} bytes (ipc.max_message_bytes): split the data"
    ))
}

enum LineRead {
    Line,
    End,
    TooLong,
}

/// Reads the next line (without its `\n`) into `line`, refusing a line over `max_bytes` without
/// reading it whole.
fn read_line_bounded(
    reader: &mut dyn std::io::BufRead,
    line: &mut Vec<u8>,
    max_bytes: usize,
) -> std::io::Result<LineRead> {
    line.clear();
    let read = std::io::Read::take(&mut *reader, max_bytes as u64 + 1).read_until(b'\n', line)?;
    if read == 0 {
        return Ok(LineRead::End);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    Ok(if line.len() > max_bytes {
        LineRead::TooLong
    } else {
        LineRead::Line
    })
}

fn data_command(ctx: &Context, command: Command) -> Result<(), Failure> {
    run_data_command(ctx, Backend::connect(ctx)?, command)
}

fn run_data_command(ctx: &Context, mut backend: Backend, command: Command) -> Result<(), Failure> {
    match command {
        Command::Put { address, data } => {
            let (collection, id) = split_address(&address);
            let fields = read_fields(data.as_deref(), ctx.config.ipc.max_message_bytes)?;
            let r = backend.call(api::PutParams {
                collection,
                id,
                fields,
            })?;
            print_write(ctx, &r);
        }
        Command::Patch {
            address,
            data,
            unset,
        } => {
            let (collection, id) = full_address(&address)?;
            let fields = match (&data, unset.is_empty()) {
                (None, false) => Fields::new(),
                _ => read_fields(data.as_deref(), ctx.config.ipc.max_message_bytes)?,
            };
            let r = backend.call(api::PatchParams {
                collection,
                id,
                fields,
                unset,
            })?;
            print_write(ctx, &r);
        }
        Command::Rm { address } => {
            let (collection, id) = full_address(&address)?;
            let r = backend.call(api::DeleteParams::new(collection, id))?;
            print_write(ctx, &r);
        }
        Command::Get { address } => {
            let (collection, id) = full_address(&address)?;
            let r = backend.call(api::GetParams::new(collection, id))?;
            if ctx.json {
                print_json(&r);
            } else {
                match r.fields.parse() {
                    Ok(fields) => print_pretty(&fields),
                    Err(e) => return Err(Failure::failed(format!("the daemon's answer: {e}"))),
                }
            }
        }
        Command::Ls {
            collection: None, ..
        } => {
            let r = backend.call(api::CollectionsParams {})?;
            if ctx.json {
                print_json(&r);
            } else {
                for c in &r.collections {
                    println!("{}\t{}", c.name, c.documents);
                }
            }
        }
        Command::Ls {
            collection: Some(collection),
            limit,
            after,
            conditions,
            order_by,
            desc,
        } => {
            if limit == 0 {
                return Err(Failure::usage("--limit must be at least 1"));
            }
            let conditions = conditions
                .iter()
                .map(|c| crate::query::parse_condition(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Failure::usage(e.to_string()))?;
            let order = if desc {
                crate::query::Direction::Desc
            } else {
                crate::query::Direction::Asc
            };
            let mut records = Vec::new();
            let mut next = after;
            let mut plan = None;
            let page = ctx.config.ipc.max_list_limit.max(1);
            // One call returns at most `ipc.max_list_limit` records: ask for the rest page by page.
            while records.len() < limit {
                let wanted = (limit - records.len()).min(page);
                let r = backend.call(api::ListParams {
                    conditions: conditions.clone(),
                    order_by: order_by.clone(),
                    order,
                    ..api::ListParams::page(collection.clone(), Some(wanted), next)
                })?;
                records.extend(r.records);
                next = r.next;
                plan = r.plan;
                if next.is_none() {
                    break;
                }
            }
            if ctx.json {
                print_json(&api::RecordPage {
                    records,
                    next,
                    plan,
                });
            } else {
                for rec in &records {
                    println!("{}\t{}", rec.id, rec.fields);
                }
                if plan.as_deref() == Some("scan") {
                    eprintln!(
                        "(no index serves this query: it was answered by reading the collection)"
                    );
                }
                if let Some(next) = next {
                    eprintln!("more: ferry ls {collection} --after '{next}' (with the same query)");
                }
            }
        }
        Command::History { address } => {
            let (collection, id) = full_address(&address)?;
            let r = backend.call(api::HistoryParams::new(collection, id))?;
            if ctx.json {
                print_json(&r);
            } else {
                for c in &r.changes {
                    println!(
                        "{}\t{}\t{}\t{}",
                        format_ms(c.time),
                        c.device,
                        c.operation,
                        c.fields.join(",")
                    );
                }
            }
        }
        Command::Queue {
            status,
            limit,
            before,
            oldest_first,
            after,
        } => {
            let newest_first = !oldest_first && after.is_none();
            let r = backend.call(api::QueueParams {
                status: status.clone(),
                limit: Some(limit),
                after,
                before,
                newest_first,
            })?;
            if ctx.json {
                print_json(&r);
            } else {
                for e in &r.entries {
                    let conflict = e
                        .conflict
                        .as_deref()
                        .map(|c| format!("conflict={c}\t"))
                        .unwrap_or_default();
                    // Uploads go by priority first: shown when the collection has one.
                    let priority = match e.priority {
                        0 => String::new(),
                        p => format!("priority={p}\t"),
                    };
                    println!(
                        "{}\t{}\t{}\t{}/{}\tretries={}\t{priority}{conflict}{}",
                        e.id,
                        e.status.as_str(),
                        e.operation.as_str(),
                        e.model_name,
                        e.object_id,
                        e.retry_count,
                        e.last_error.as_deref().unwrap_or("")
                    );
                }
                if let Some(last) = r.entries.last().filter(|_| r.entries.len() == limit) {
                    let flag = if newest_first { "--before" } else { "--after" };
                    let status = status
                        .as_deref()
                        .map(|s| format!(" --status {s}"))
                        .unwrap_or_default();
                    eprintln!("more: ferry queue{status} {flag} {}", last.id);
                }
                let c = &r.counts;
                eprintln!(
                    "pending {} · processing {} · completed {} · failed {}",
                    c.pending, c.processing, c.completed, c.failed
                );
            }
        }
        Command::Retry { ids, all_failed } => {
            let params = if all_failed {
                api::RetryParams {
                    ids: None,
                    all_failed,
                }
            } else {
                api::RetryParams {
                    ids: Some(ids),
                    all_failed,
                }
            };
            let r = backend.call(params)?;
            if ctx.json {
                print_json(&r);
            } else {
                println!("retrying {}", json!(r.retried));
            }
        }
        Command::Log { limit } => {
            let r = backend.call(api::LogParams {
                before: None,
                limit: Some(limit),
            })?;
            if ctx.json {
                print_json(&r);
            } else {
                for e in &r.entries {
                    println!(
                        "{}\t{}\t{}\t{} records\t{}",
                        format_ms(i64::try_from(e.timestamp).unwrap_or(i64::MAX)),
                        label(&e.direction),
                        label(&e.status),
                        e.records_processed,
                        e.error_message.as_deref().unwrap_or("")
                    );
                }
            }
        }
        Command::Status => {
            let r = match &mut backend {
                Backend::Daemon(client) => client.status()?,
                Backend::Local { service, .. } => DaemonStatus {
                    status: service.call(api::StatusParams {})?,
                    sync: status::last_known(ctx, service)?,
                    alerts: None,
                },
            };
            if ctx.json {
                print_json(&r);
            } else {
                status::print(&r);
            }
        }
        Command::Doctor { repair } => {
            let r = backend.call(api::DoctorParams { repair })?;
            if ctx.json {
                print_json(&r);
            } else {
                status::print_doctor(&r);
            }
            if r.checkup.damage.is_some() && r.repaired.is_none() {
                return Err(Failure::failed(
                    "the store is damaged: `ferry doctor --repair` (with the daemon stopped) \
                     repairs it",
                ));
            }
        }
        Command::Init
        | Command::Daemon
        | Command::Demo { .. }
        | Command::Watch { .. }
        | Command::Import { .. }
        | Command::Sync { .. }
        | Command::Conflicts { .. }
        | Command::Relay { .. }
        | Command::Register { .. }
        | Command::Key { .. }
        | Command::Export { .. }
        | Command::Space { .. }
        | Command::Completions { .. }
        | Command::Man => {
            // `run` gives every other command to its own function.
            return Err(Failure::failed(
                "this command does not read or write records",
            ));
        }
    }
    Ok(())
}

/// One line per active alert: its kind, since when, and what to do.
fn print_alerts(alerts: &[Alert]) {
    if alerts.is_empty() {
        println!("alerts: none");
    }
    for a in alerts {
        println!(
            "alert {}: {} (since {})",
            label(&a.kind),
            a.message,
            format_ms(i64::try_from(a.since_ms).unwrap_or(i64::MAX))
        );
    }
}

fn print_write(ctx: &Context, r: &Applied) {
    if ctx.json {
        print_json(r);
        return;
    }
    let what = r.operation.map_or("unchanged", |o| o.as_str());
    println!("{what} {}/{}", r.collection, r.id);
}

fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string(v) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("the answer cannot be written as JSON: {e}"),
    }
}

fn print_pretty(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("the answer cannot be written as JSON: {e}"),
    }
}

/// A value's name as the API spells it (an enum's serde name), for the human forms.
fn label(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_owned(),
    }
}

fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

fn export(
    ctx: &Context,
    target: Option<&str>,
    format: ExportFormat,
    out: Option<&Path>,
) -> Result<(), Failure> {
    let mut backend = Backend::connect(ctx)?;
    let single = target.map(split_address);
    let collections: Vec<String> = match &single {
        Some((c, _)) => vec![c.clone()],
        None => backend
            .call(api::CollectionsParams {})?
            .collections
            .into_iter()
            .map(|c| c.name)
            .collect(),
    };
    if format == ExportFormat::Automerge {
        return export_automerge(&mut backend, single, &collections, out);
    }
    let mut sink: Box<dyn std::io::Write> = match out {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut first = true;
    /// One exported record, its fields written as the daemon sent them (keys in the order
    /// `json!` gave them before: the lines stay the same).
    #[derive(serde::Serialize)]
    struct Line<'a> {
        collection: &'a str,
        fields: &'a FieldsText,
        id: &'a str,
    }
    let mut emit = |rec: &RecordView, sink: &mut dyn std::io::Write| -> std::io::Result<()> {
        let line = Line {
            collection: &rec.collection,
            fields: &rec.fields,
            id: &rec.id,
        };
        if format != ExportFormat::Jsonl {
            sink.write_all(if first { b"[\n" } else { b",\n" })?;
            first = false;
        }
        serde_json::to_writer(&mut *sink, &line)?;
        if format == ExportFormat::Jsonl {
            sink.write_all(b"\n")?;
        }
        Ok(())
    };
    if let Some((collection, Some(id))) = &single {
        let rec = backend.call(api::GetParams::new(collection, id))?;
        emit(&rec, &mut sink)?;
    } else {
        for collection in &collections {
            for_each_record(&mut backend, collection, |rec| Ok(emit(rec, &mut sink)?))?;
        }
    }
    if format == ExportFormat::Json {
        writeln!(sink, "{}", if first { "[]" } else { "\n]" })?;
    }
    sink.flush()?;
    Ok(())
}

fn for_each_record(
    backend: &mut Backend,
    collection: &str,
    mut f: impl FnMut(&RecordView) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let mut after: Option<String> = None;
    loop {
        let page = backend.call(api::ListParams::page(
            collection.to_owned(),
            Some(1000),
            after,
        ))?;
        for rec in &page.records {
            f(rec)?;
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(()),
        }
    }
}

fn export_automerge(
    backend: &mut Backend,
    single: Option<(String, Option<String>)>,
    collections: &[String],
    out: Option<&Path>,
) -> Result<(), Failure> {
    let fetch = |backend: &mut Backend, collection: &str, id: &str| -> Result<Vec<u8>, Failure> {
        let r = backend.call(api::ExportParams::new(collection, id))?;
        base64::engine::general_purpose::STANDARD
            .decode(r.automerge_base64)
            .map_err(|e| Failure::failed(format!("the daemon sent a bad document: {e}")))
    };
    if let Some((collection, Some(id))) = single {
        let bytes = fetch(backend, &collection, &id)?;
        match out {
            Some(p) => std::fs::write(p, bytes)?,
            None => std::io::stdout().lock().write_all(&bytes)?,
        }
        return Ok(());
    }
    let Some(dir) = out else {
        return Err(Failure::usage(
            "exporting several Automerge documents needs --out DIR (one file per record)",
        ));
    };
    let mut ids = Vec::new();
    for collection in collections {
        for_each_record(backend, collection, |rec| {
            ids.push((collection.clone(), rec.id.clone()));
            Ok(())
        })?;
    }
    for (collection, id) in ids {
        let bytes = fetch(backend, &collection, &id)?;
        let folder = dir.join(&collection);
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join(format!("{}.automerge", file_name(&id))), bytes)?;
    }
    Ok(())
}

/// A record id made safe as a file name: bytes other than letters, digits, `-`, `_` and `.` are
/// written as `%XX`, so every id maps to a distinct name.
fn file_name(id: &str) -> String {
    let mut name = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_') || (b == b'.' && !name.is_empty())
        {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    name
}

fn watch(
    ctx: &Context,
    subscription: api::SubscribeParams,
    count: Option<usize>,
) -> Result<(), Failure> {
    let socket = daemon::socket_path(&ctx.dir, &ctx.config);
    let mut client = Client::connect(&socket).map_err(|e| {
        Failure::failed(format!(
            "watch needs a running daemon, and none answers on {} ({e}): start `ferry daemon`",
            socket.display()
        ))
    })?;
    client.request(subscription)?;
    // Tell whoever started us that the subscription is in place.
    eprintln!("watching");
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        let note = client.next_event()?;
        if ctx.json {
            let wire = crate::ipc::notification(&note).map_err(|e| {
                Failure::failed(format!("a notification cannot be printed as JSON: {e}"))
            })?;
            print_json(&wire);
        } else {
            match &note {
                Notification::Conflict(c) => {
                    let c = &c.event;
                    println!(
                        "conflict {} {} {}/{} {}",
                        label(&c.status),
                        label(&c.kind),
                        c.collection,
                        c.record,
                        c.id
                    );
                }
                Notification::Change(c) => {
                    let fields = c
                        .event
                        .fields
                        .as_ref()
                        .map(|f| format!(" {f}"))
                        .unwrap_or_default();
                    let c = &c.event.change;
                    println!(
                        "change {} {} {}/{} by {}{fields}",
                        c.seq,
                        c.operation.as_str(),
                        c.collection,
                        c.id,
                        c.device
                    );
                }
                Notification::Lagged { missed, .. } => {
                    println!("lagged {missed} events were dropped: read the records again");
                }
                Notification::SyncProgress(s) => println!("sync.progress {}", label(&s.state)),
            }
        }
        std::io::stdout().flush()?;
        seen += 1;
    }
    Ok(())
}

fn demo(ctx: &Context, explicit_dir: bool, records: usize) -> Result<(), Failure> {
    let temp;
    let dir = if explicit_dir {
        ctx.dir.clone()
    } else {
        temp = TempDir::new()?;
        DataDir::resolve(Some(&temp.0))?
    };
    crate::demo::run(&dir, &ctx.config, records, ctx.json).map_err(Failure::failed)
}

/// A directory under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        let mut random = [0u8; 8];
        let _ = getrandom::fill(&mut random);
        let name = format!("ferry-demo-{}", u64::from_le_bytes(random));
        let path = std::env::temp_dir().join(name);
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The first line of standard input. On a terminal it is asked for with `prompt` (on standard
/// error) and not echoed, since it is a secret.
pub(super) fn read_secret_line(prompt: &str) -> Result<Zeroizing<String>, Failure> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("{prompt}");
        let _quiet = NoEcho::start();
        let mut line = Zeroizing::new(String::new());
        stdin.lock().take(MAX_SECRET_LINE).read_line(&mut line)?;
        eprintln!();
        return Ok(Zeroizing::new(
            line.trim_end_matches(['\r', '\n']).to_owned(),
        ));
    }
    let mut text = Zeroizing::new(String::new());
    stdin.take(MAX_SECRET_LINE).read_to_string(&mut text)?;
    let line = text.lines().next().unwrap_or_default();
    Ok(Zeroizing::new(line.to_owned()))
}

/// Turns the terminal's echo off until dropped.
struct NoEcho(Option<libc::termios>);

impl NoEcho {
    fn start() -> NoEcho {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own; failures leave echo on.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return NoEcho(None);
            }
            let mut quiet = saved;
            quiet.c_lflag &= !libc::ECHO;
            if libc::tcsetattr(0, libc::TCSANOW, &quiet) != 0 {
                return NoEcho(None);
            }
            NoEcho(Some(saved))
        }
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(saved) = self.0 {
            // SAFETY: restores the settings read in `start`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_filter_quiets_automerge_unless_named() {
        assert_eq!(log_filter("info"), "info,automerge=warn");
        assert_eq!(
            log_filter("ferry=debug,sled=warn"),
            "ferry=debug,sled=warn,automerge=warn"
        );
        assert_eq!(log_filter("debug,automerge=trace"), "debug,automerge=trace");
        assert_eq!(log_filter(" "), "automerge=warn");
        for text in ["info", "ferry=debug", ""] {
            let filter = tracing_subscriber::EnvFilter::try_new(log_filter(text));
            assert!(filter.is_ok(), "{text:?}: {filter:?}");
        }
    }

    #[test]
    fn every_command_and_argument_says_what_it_is() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_long_about().is_none() {
                    missing.push(path.clone());
                }
                walk(sub, &path, missing);
            }
        }
        let mut command = <Cli as clap::CommandFactory>::command();
        command.build();
        let mut missing = Vec::new();
        walk(&command, "ferry", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn addresses() {
        assert_eq!(split_address("C/a/b"), ("C".into(), Some("a/b".into())));
        assert_eq!(split_address("C"), ("C".into(), None));
        assert!(full_address("C/").is_err());
        assert!(full_address("C").is_err());
    }

    #[test]
    fn file_names_are_distinct_and_safe() {
        assert_eq!(file_name("a-b_c.d"), "a-b_c.d");
        assert_eq!(file_name("a/b"), "a%2Fb");
        assert_eq!(file_name(".."), "%2E.");
        assert_ne!(file_name("a%2Fb"), file_name("a/b"));
    }

    #[test]
    fn dates() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }
}
