//! A private PostgreSQL server for tests: `initdb` into a temporary directory (as the `postgres`
//! user when the tests run as root, which `initdb` refuses to be), on its own free port and
//! socket directory, a database per test. Needs the server binaries
//! (`/usr/lib/postgresql/*/bin`; `scripts/test` installs them).
//!
//! The tests' servers run with `fsync=off`: a crash here is the server's (`crash`: `-m immediate`,
//! recovered from its WAL on the next start), never the machine's, so nothing needs to reach
//! the disk. A benchmark's (`durable`) keeps fsync on, as a production server does.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferry::relay::storage::PgStorage;
use ferry::relay::storage::pg::PgOptions;

/// A running server; stopped (`pg_ctl -m fast`) and removed on drop, unless it is the shared
/// one, which a watchdog stops once the test binary exits.
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    shared: bool,
    /// fsync on: commits reach the disk.
    durable: bool,
}

/// The newest installed server's binaries.
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: `apt-get install -y postgresql` (scripts/test does)")
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("no /usr/lib/postgresql/*/bin/initdb")
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn checked(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

static DATABASES: AtomicUsize = AtomicUsize::new(0);

impl PgServer {
    /// A server of its own, for a test that stops or crashes it.
    pub fn start() -> PgServer {
        let server = PgServer::init(false);
        server.start_again();
        server
    }

    /// One server for the whole test binary: each test makes its own database on it.
    pub fn shared() -> &'static PgServer {
        static SHARED: OnceLock<PgServer> = OnceLock::new();
        SHARED.get_or_init(|| PgServer::for_process(false))
    }

    /// One server for the whole benchmark, with fsync on: each run makes its own database.
    pub fn durable() -> &'static PgServer {
        static DURABLE: OnceLock<PgServer> = OnceLock::new();
        DURABLE.get_or_init(|| PgServer::for_process(true))
    }

    /// A server that runs until this process exits.
    fn for_process(durable: bool) -> PgServer {
        // Owned until it serves: a failed start removes what it made.
        let mut server = PgServer::init(durable);
        server.start_again();
        server.watch(std::process::id());
        server.shared = true;
        server
    }

    /// A new cluster, not started; removed on drop if what follows fails.
    fn init(durable: bool) -> PgServer {
        let bin = server_bin();
        let dir = tempfile::Builder::new()
            .prefix("ferry-pg")
            .tempdir()
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        if as_root() {
            checked(
                "chown",
                Command::new("chown")
                    .arg("postgres")
                    .arg(&dir)
                    .output()
                    .unwrap(),
            );
        }
        let server = PgServer {
            dir,
            bin,
            port: free_port(),
            shared: false,
            durable,
        };
        // Data checksums: PostgreSQL finds a damaged page itself.
        checked(
            "initdb",
            server
                .as_server_user("initdb")
                .arg("-D")
                .arg(server.data())
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "ferry",
                    "--no-sync",
                    "--data-checksums",
                ])
                .output()
                .unwrap(),
        );
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A server binary run as the user owning the data directory.
    fn as_server_user(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        self.as_server_user("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Starts the server (again, after `crash` or `stop`) and waits until it takes connections.
    /// `FERRY_PG_OPTIONS` adds server options (say, to load `pg_stat_statements`).
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400{}",
            self.port,
            self.dir.display(),
            if self.durable { "" } else { " -c fsync=off" }
        ) + &std::env::var("FERRY_PG_OPTIONS")
            .map(|o| format!(" {o}"))
            .unwrap_or_default();
        let log = self.dir.join("log");
        checked(
            "pg_ctl start",
            self.pg_ctl(&[
                "-w",
                "-t",
                "60",
                "-l",
                &log.to_string_lossy(),
                "start",
                "-o",
                &options,
            ]),
        );
    }

    /// A clean stop.
    pub fn stop(&self) {
        checked("pg_ctl stop", self.pg_ctl(&["-m", "fast", "-w", "stop"]));
    }

    /// A crash: the server stops without a checkpoint; the next start recovers from its WAL.
    pub fn crash(&self) {
        checked(
            "pg_ctl stop",
            self.pg_ctl(&["-m", "immediate", "-w", "stop"]),
        );
    }

    /// Stops the server and removes its directory once process `pid` (the test binary) exits.
    #[allow(
        clippy::zombie_processes,
        reason = "the watchdog outlives the test binary, which never waits for it"
    )]
    fn watch(&self, pid: u32) {
        let pg_ctl = self.bin.join("pg_ctl");
        let stop = if as_root() {
            format!("runuser -u postgres -- {}", pg_ctl.display())
        } else {
            pg_ctl.display().to_string()
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             {stop} -D {data} -m immediate stop >/dev/null 2>&1; rm -rf {dir}",
            data = self.data().display(),
            dir = self.dir.display(),
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://ferry@127.0.0.1:{}/{database}", self.port)
    }

    /// A relay's config.toml for `database` on this server, with limits that let tests
    /// register and sign in many devices from one address.
    pub fn relay_config(&self, database: &str) -> String {
        format!(
            "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n\
             storage = \"postgres\"\npostgres_url = \"{}\"\n",
            self.url(database)
        )
    }

    /// A new empty database; its name.
    pub fn create_database(&self) -> String {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    pub fn drop_database(&self, name: &str) {
        self.sql(
            "postgres",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        );
    }

    /// Runs `sql` on `database` with psql; its output (tuples only, unaligned).
    pub fn sql(&self, database: &str, sql: &str) -> String {
        checked(
            "psql",
            Command::new(self.bin.join("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
                .args(["-h", "127.0.0.1", "-U", "ferry"])
                .arg("-p")
                .arg(self.port.to_string())
                .args(["-d", database, "-c", sql])
                .output()
                .unwrap(),
        )
    }

    /// A `psql` session on `database` reading statements from its stdin as they are written,
    /// so that a test can hold a transaction open.
    pub fn session(&self, database: &str) -> std::process::Child {
        Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-U", "ferry"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-d", database])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Options for the relay's engine on `database`.
    pub fn options(&self, database: &str) -> PgOptions {
        PgOptions {
            url: self.url(database),
            pool_size: 4,
            connect_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(60),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if !self.shared {
            // Already stopped by the test, or not: either way nothing is left running.
            let _ = self.pg_ctl(&["-m", "fast", "-w", "stop"]);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh database on the test binary's server, dropped with it.
pub struct Database {
    pub server: &'static PgServer,
    pub name: String,
}

impl Database {
    pub fn new() -> Self {
        let server = PgServer::shared();
        Database {
            server,
            name: server.create_database(),
        }
    }

    pub fn options(&self) -> PgOptions {
        self.server.options(&self.name)
    }

    pub fn open(&self) -> PgStorage {
        PgStorage::open(&self.options()).unwrap()
    }

    pub fn sql(&self, sql: &str) -> String {
        self.server.sql(&self.name, sql).trim().to_owned()
    }

    /// A relay's config.toml for this database.
    pub fn relay_config(&self) -> String {
        self.server.relay_config(&self.name)
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        self.server.drop_database(&self.name);
    }
}
