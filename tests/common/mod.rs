//! Shared helpers for the integration tests: temporary devices, real `ferry daemon` processes,
//! and waiting for conditions with a bounded timeout.
#![allow(dead_code)]

pub mod link;
pub mod postgres;

use ed25519_dalek::{Signer as _, SigningKey};
use ferry::datadir::DataDir;
use ferry::ipc::Client;
use ferry::store::kv::{Batch, Kv, KvError, MemoryKv, Pair};
use ferry::transport::{
    FrameReceiver, FrameSender, ServerTrust, TransportOptions, channel_binding, client_endpoint,
    connect, install_crypto_provider, open_session,
};
use ferry_proto::wire::{
    Credential, LogEntry, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, Secret, auth_transcript,
};
use serde_json::{Value, json};
use std::future::Future;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Polls `condition` until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    wait_for_ok(what, timeout, || {
        if condition() {
            Ok(())
        } else {
            Err("the condition does not hold".to_string())
        }
    })
}

/// Polls `probe` until it gives `Ok`, and returns that; panics with `what` and the last `Err`
/// (what was seen instead) after `timeout`.
pub fn wait_for_ok<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let seen = match probe() {
            Ok(value) => return value,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {seen}"
        );
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A device: an initialised data directory in a temp dir.
pub struct Device {
    _tmp: tempfile::TempDir,
    pub data_dir: PathBuf,
}

impl Device {
    pub fn new() -> Device {
        let tmp = tempfile::tempdir().expect("temp dir");
        let data_dir = tmp.path().join("device");
        let device = Device {
            _tmp: tmp,
            data_dir,
        };
        let out = device.ferry(&["init"]);
        assert!(out.status.success(), "ferry init failed: {out:?}");
        device
    }

    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("ferry.sock")
    }

    /// A `ferry` command on this device, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(ferry_bin());
        cmd.arg("--data-dir").arg(&self.data_dir).args(args);
        cmd.env_remove("FERRY_CONFIG").env_remove("RUST_LOG");
        cmd
    }

    /// Runs a `ferry` command to completion.
    pub fn ferry(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run ferry")
    }

    /// Runs a `ferry` command with `input` on standard input.
    pub fn ferry_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write as _;
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("write stdin");
        child.wait_with_output().expect("wait for ferry")
    }

    /// Starts `ferry daemon` without waiting for it; its standard error goes to `stderr`.
    pub fn spawn_daemon(&self, stderr: Stdio) -> Daemon {
        let child = self
            .command(&["daemon"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn ferry daemon");
        Daemon {
            child,
            socket: self.socket(),
        }
    }

    /// Starts `ferry daemon` and waits until its socket answers.
    pub fn start_daemon(&self) -> Daemon {
        self.start_daemon_with_stderr(Stdio::piped())
    }

    /// Starts `ferry daemon` with its log appended to `daemon.log` beside the data directory,
    /// where nothing has to read it for the daemon to keep going (a pipe would fill up) and it
    /// is still there to look at when a test fails.
    pub fn start_daemon_logged(&self) -> Daemon {
        self.start_daemon_with_stderr(Stdio::from(append_log(&self.log_path())))
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_file_name("daemon.log")
    }

    /// What a daemon that exited early said: its piped standard error, or else the end of
    /// `daemon.log`, so a failure shows why it stopped.
    fn early_exit_log(&self, daemon: &mut Daemon) -> String {
        let mut said = String::new();
        if let Some(mut stderr) = daemon.child.stderr.take() {
            let _ = stderr.read_to_string(&mut said);
        }
        if said.is_empty() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            said = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        }
        said
    }

    /// Starts `ferry daemon` with its standard error (its log) going to `stderr`, and waits
    /// until its socket answers.
    pub fn start_daemon_with_stderr(&self, stderr: Stdio) -> Daemon {
        let mut daemon = self.spawn_daemon(stderr);
        let socket = daemon.socket.clone();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if Client::connect(&socket).is_ok() {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!(
                    "ferry daemon exited before it was ready: {status}\n{}",
                    self.early_exit_log(&mut daemon)
                );
            }
            assert!(
                Instant::now() < deadline,
                "ferry daemon not ready after {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        daemon
    }
}

/// Sync settings for a device in a test: its relay, the fingerprint it pins, and reconnects
/// quick enough that a test does not wait on a backoff meant for real networks.
fn sync_config(config: &str, relay: &str, fingerprint: &str) -> String {
    let replaced = [
        ("\nrelay = \"\"", format!("\nrelay = \"{relay}\"")),
        (
            "\nfingerprint = \"\"",
            format!("\nfingerprint = \"{fingerprint}\""),
        ),
        (
            "\nbackoff_initial_ms = 500",
            "\nbackoff_initial_ms = 50".into(),
        ),
        ("\nbackoff_max_ms = 60000", "\nbackoff_max_ms = 500".into()),
        // Bounds a connection attempt to a relay that is down, so reconnects are quick too.
        (
            "\nrequest_timeout_ms = 30000",
            "\nrequest_timeout_ms = 2000".into(),
        ),
    ];
    replaced
        .iter()
        .fold(config.to_string(), |text, (from, to)| {
            assert!(text.contains(from), "the config has no line {from:?}");
            text.replacen(from, to, 1)
        })
}

impl Device {
    /// Points this device at `relay` and registers it in the relay's `default` account (it must
    /// not be running a daemon yet).
    pub fn join(&self, relay: &Relay) {
        self.join_account(relay, "default");
    }

    /// Points this device at `relay` and registers it in `account` (created if missing), the
    /// space it then syncs.
    pub fn join_account(&self, relay: &Relay, account: &str) {
        self.set_sync(&relay.addr, &relay.fingerprint);
        if account != "default" {
            relay.operator().add_account(account);
            self.edit_config(|text| {
                text.replacen(
                    "\nspace = \"default\"",
                    &format!("\nspace = \"{account}\""),
                    1,
                )
            });
        }
        self.register(relay, account);
    }

    /// Registers this device in `relay`'s `account` with a fresh enrolment code.
    pub fn register(&self, relay: &Relay, account: &str) {
        self.register_at(&relay.operator(), &relay.addr, &relay.fingerprint, account);
    }

    /// Registers this device with the relay at `addr` (pinning `fingerprint`) in `account`,
    /// with a code `operator` makes.
    pub fn register_at(&self, operator: &Operator, addr: &str, fingerprint: &str, account: &str) {
        let code = operator.enrol(account);
        let out = self.ferry(&[
            "register",
            "--relay",
            addr,
            "--fingerprint",
            fingerprint,
            "--code",
            &code,
        ]);
        assert!(out.status.success(), "ferry register failed: {out:?}");
    }

    /// Points this device at `addr`, pinning `fingerprint`.
    pub fn set_sync(&self, addr: &str, fingerprint: &str) {
        self.edit_config(|text| sync_config(text, addr, fingerprint));
    }

    /// Rewrites the device's config file.
    pub fn edit_config(&self, edit: impl FnOnce(&str) -> String) {
        let path = self.data_dir.join("config.toml");
        let text = std::fs::read_to_string(&path).expect("read config.toml");
        std::fs::write(&path, edit(&text)).expect("write config.toml");
    }
}

fn append_log(path: &std::path::Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open a log file")
}

/// The relay operator's commands, on a relay's data directory (they reach a running relay
/// through its socket).
pub struct Operator<'a>(pub &'a std::path::Path);

impl Operator<'_> {
    /// A `ferry` command on the relay's data directory, not yet started.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(ferry_bin());
        command
            .arg("--data-dir")
            .arg(self.0)
            .args(args)
            .env_remove("FERRY_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    pub fn ferry(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ferry")
    }

    /// Creates `account` unless it exists (a restarted relay has its accounts already).
    pub fn add_account(&self, account: &str) {
        let out = self.ferry(&["relay", "account", "add", account]);
        assert!(
            out.status.success() || stderr(&out).contains("already exists"),
            "creating the relay's account failed: {out:?}"
        );
    }

    /// Creates `account` and sets its password for the HTTPS API and the web interface.
    pub fn add_account_with_password(&self, account: &str, password: &str) {
        self.add_account(account);
        let out = self
            .command(&["relay", "account", "password", account])
            .env("FERRY_PASSWORD", password)
            .output()
            .expect("ferry relay account password");
        assert!(out.status.success(), "setting the password: {out:?}");
    }

    /// A one-time code that registers one device in `account`.
    pub fn enrol(&self, account: &str) -> String {
        let out = self.ferry(&["--json", "relay", "enrol", account]);
        assert!(out.status.success(), "ferry relay enrol failed: {out:?}");
        let answer: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("enrol prints JSON");
        answer["code"].as_str().expect("a code").to_string()
    }
}

/// A running `ferry relay` process; killed with SIGKILL when dropped. Its log goes to
/// `relay.log` beside its data directory.
pub struct Relay {
    child: Child,
    pub data_dir: PathBuf,
    /// `127.0.0.1:PORT`, as devices are configured with it.
    pub addr: String,
    pub port: u16,
    pub fingerprint: String,
    /// The HTTPS API's `127.0.0.1:PORT`, when the relay's config asks for one.
    pub http: Option<String>,
}

impl Relay {
    /// Starts `ferry relay` on `data_dir` (created if missing) and waits for the line it prints
    /// once it serves. `port: None` picks a free port; give the port of an earlier relay to
    /// restart it where its devices look for it.
    pub fn start(data_dir: &std::path::Path, port: Option<u16>) -> Relay {
        // Tests register many devices from one address: the default limits are for the internet.
        if !data_dir.join("config.toml").exists() {
            Relay::write_config(
                data_dir,
                "[relay]\nenrolments_per_minute = 10000\nsign_ins_per_minute = 100000\n",
            );
        }
        Relay::launch(data_dir, port)
    }

    /// Starts `ferry relay` on `data_dir` (created if missing) with `config` as its
    /// config.toml, replacing any there.
    pub fn start_with_config(data_dir: &std::path::Path, port: Option<u16>, config: &str) -> Relay {
        Relay::write_config(data_dir, config);
        Relay::launch(data_dir, port)
    }

    fn write_config(data_dir: &std::path::Path, config: &str) {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(data_dir)
            .expect("relay data dir");
        std::fs::write(data_dir.join("config.toml"), config).expect("write the relay's config");
    }

    fn launch(data_dir: &std::path::Path, port: Option<u16>) -> Relay {
        use std::io::BufRead as _;
        let listen = format!("127.0.0.1:{}", port.unwrap_or(0));
        let mut child = Command::new(ferry_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--json", "relay", "--listen", &listen])
            .env_remove("FERRY_CONFIG")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(append_log(
                &data_dir.with_file_name("relay.log"),
            )))
            .spawn()
            .expect("spawn ferry relay");
        let stdout = child.stdout.take().expect("relay stdout");
        // The line is read on its own thread so that a relay that never prints cannot hang the
        // test past its timeout.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("ferry relay did not say it serves within {TIMEOUT:?}");
            }
        };
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            let status = child.try_wait();
            panic!("ferry relay printed {line:?} ({e}); exit status {status:?}")
        });
        let addr = ready["listen"].as_str().expect("listen").to_string();
        let fingerprint = ready["fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_string();
        let port = addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("a port in the listen address");
        let relay = Relay {
            child,
            data_dir: data_dir.to_owned(),
            addr,
            port,
            fingerprint,
            http: ready["http"].as_str().map(str::to_string),
        };
        relay.operator().add_account("default");
        relay
    }

    pub fn operator(&self) -> Operator<'_> {
        Operator(&self.data_dir)
    }

    /// What the relay has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_file_name("relay.log")).unwrap_or_default()
    }

    /// SIGTERM, then waits (bounded) for the relay to exit; returns its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        wait_for_ok("the relay to exit after SIGTERM", TIMEOUT, || {
            match self.child.try_wait().expect("wait for the relay") {
                Some(status) => Ok(status),
                None => Err("still running".into()),
            }
        })
    }

    /// SIGKILL: whatever the relay had not made durable is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `ferry daemon` process; killed when dropped.
pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn client(&self) -> Client {
        Client::connect(&self.socket).expect("connect to the daemon")
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for a clean exit; returns its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for daemon") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Calls `method` on the daemon's socket; panics with the method, its params and the error.
pub fn call(daemon: &Daemon, method: &str, params: Value) -> Value {
    daemon
        .client()
        .call(method, params.clone())
        .unwrap_or_else(|e| panic!("{method} {params}: {e}"))
}

pub fn status(daemon: &Daemon) -> Value {
    call(daemon, "status", json!({}))
}

pub fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a count"))
}

/// Queue entries not yet settled: pending or being uploaded.
pub fn unsent(status: &Value) -> u64 {
    count(&status["queue"]["pending"]) + count(&status["queue"]["processing"])
}

/// Whether the device holds the relay's whole log, which ends at `head`, and has nothing left
/// to upload.
pub fn caught_up(status: &Value, head: u64) -> bool {
    let sync = &status["sync"];
    sync["up_to_date"] == json!(true)
        && sync["cursor"] == json!(head)
        && sync["relay_head"] == json!(head)
        && unsent(status) == 0
        && status["queue"]["failed"] == json!(0)
}

/// Waits until every daemon is caught up with a relay log of exactly `head` entries.
pub fn wait_converged(daemons: &[&Daemon], head: u64) {
    wait_for_ok(
        &format!("every device in sync at relay head {head}"),
        TIMEOUT,
        || {
            let seen: Vec<Value> = daemons.iter().map(|d| status(d)).collect();
            if seen.iter().all(|s| caught_up(s, head)) {
                Ok(())
            } else {
                let brief: Vec<Value> = seen
                    .iter()
                    .map(|s| json!({ "queue": s["queue"], "sync": s["sync"] }))
                    .collect();
                Err(Value::Array(brief).to_string())
            }
        },
    );
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid we spawned and a valid signal number has no memory effects.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Where two JSON values first differ, or `None` when they are the same value. Stricter than
/// `==`: numbers must also agree in kind (unsigned integer, negative integer, float), and floats
/// bit for bit, so `1` differs from `1.0` and `0.0` from `-0.0`.
pub fn json_difference(actual: &serde_json::Value, expected: &serde_json::Value) -> Option<String> {
    json_difference_at(actual, expected, "$")
}

fn json_difference_at(
    actual: &serde_json::Value,
    expected: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    let differ = || Some(format!("at {path}: got {actual}, expected {expected}"));
    match (actual, expected) {
        (Value::Number(a), Value::Number(b)) => {
            (number_kind(a) != number_kind(b)).then(differ).flatten()
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return differ();
            }
            a.iter()
                .zip(b)
                .enumerate()
                .find_map(|(i, (x, y))| json_difference_at(x, y, &format!("{path}[{i}]")))
        }
        (Value::Object(a), Value::Object(b)) => {
            if !a.keys().eq(b.keys()) {
                return differ();
            }
            a.iter()
                .zip(b.values())
                .find_map(|((k, x), y)| json_difference_at(x, y, &format!("{path}[{k:?}]")))
        }
        _ => (actual != expected).then(differ).flatten(),
    }
}

#[derive(Debug, PartialEq)]
enum NumberKind {
    Unsigned(u64),
    Negative(i64),
    FloatBits(u64),
}

fn number_kind(n: &serde_json::Number) -> NumberKind {
    if let Some(u) = n.as_u64() {
        NumberKind::Unsigned(u)
    } else if let Some(i) = n.as_i64() {
        NumberKind::Negative(i)
    } else {
        NumberKind::FloatBits(n.as_f64().map_or(u64::MAX, f64::to_bits))
    }
}

/// Panics naming the first difference (see `json_difference`).
#[track_caller]
pub fn assert_json_same(actual: &serde_json::Value, expected: &serde_json::Value, what: &str) {
    if let Some(diff) = json_difference(actual, expected) {
        panic!("{what}: {diff}");
    }
}

/// Proptest settings for the property tests: `PROPTEST_CASES` overrides `default_cases`, and the
/// seed is printed and read from `PROPTEST_RNG_SEED`, so a failing run replays exactly.
pub fn proptest_config(default_cases: u32) -> proptest::test_runner::Config {
    use std::hash::{BuildHasher as _, Hasher as _};
    let env_u64 = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse().ok());
    let cases = env_u64("PROPTEST_CASES").map_or(default_cases, |n: u64| n as u32);
    let seed = env_u64("PROPTEST_RNG_SEED").unwrap_or_else(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.finish()
    });
    eprintln!("proptest: {cases} cases, seed {seed} (replay with PROPTEST_RNG_SEED={seed})");
    proptest::test_runner::Config {
        cases,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    }
}

/// A clock for store tests: it starts at a fixed time and moves one millisecond per reading, so
/// times are distinct, increasing and the same on every run.
pub struct StepClock(std::sync::atomic::AtomicU64);

impl StepClock {
    pub fn new() -> std::sync::Arc<StepClock> {
        std::sync::Arc::new(StepClock(std::sync::atomic::AtomicU64::new(
            1_700_000_000_000,
        )))
    }

    /// The time the next reading will give.
    pub fn peek(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Moves the time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ferry::clock::Clock for StepClock {
    fn now_ms(&self) -> u64 {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }
}

/// The device id store tests open their stores with.
pub const TEST_DEVICE: &str = "0123456789abcdef0123456789abcdef";

/// Opens a store for `TEST_DEVICE` over `kv`, on `clock`.
pub fn open_test_store(
    kv: Box<dyn ferry::store::kv::Kv>,
    options: ferry::store::StoreOptions,
    clock: &std::sync::Arc<StepClock>,
) -> ferry::store::Store {
    ferry::store::Store::open(kv, TEST_DEVICE, options, clock.clone()).expect("open the store")
}

/// Opens sled at `path`. A `Db` dropped in this process lets go of its file lock only once
/// sled's background work has finished with it, so a reopen waits (boundedly) for that.
pub fn open_sled(path: &std::path::Path) -> ferry::store::kv::SledKv {
    use ferry::store::kv::{KvError, SledKv};
    let mut opened = None;
    wait_for("sled to release its file lock", TIMEOUT, || {
        match SledKv::open(path, 1 << 20) {
            Ok(kv) => opened = Some(kv),
            Err(KvError::Io(e)) if e.contains("could not acquire lock") => {}
            Err(e) => panic!("cannot open sled at {}: {e}", path.display()),
        }
        opened.is_some()
    });
    opened.expect("opened")
}

/// Waits until the sled database in `path` (a store's current generation directory), closed in
/// this process, is free for a `ferry` process to open: sled lets go of its lock on `db` once its background work is done with the
/// file, and a lock taken and dropped here shows that it has.
pub fn wait_sled_released(path: &std::path::Path) {
    let db = path.join("db");
    wait_for("sled to release the store", TIMEOUT, || {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(&db).expect("open the store's db file");
        // SAFETY: flock on a descriptor this function owns; the lock goes with the file.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    });
}

/// Each record's history is exactly the changes its SyncQueue entries carry, in the same order
/// and with the same operations: a change is never stored without its entry, nor the reverse.
pub fn assert_queue_matches_history(store: &ferry::store::Store, addresses: &[(&str, &str)]) {
    let entries = store.queue(None, None, usize::MAX).expect("queue");
    for (c, id) in addresses {
        let history = match store.history(c, id) {
            Ok(h) => h,
            Err(ferry::store::StoreError::NotFound { .. }) => Vec::new(),
            Err(e) => panic!("history of {c}/{id}: {e}"),
        };
        let carried: Vec<_> = entries
            .iter()
            .filter(|e| e.model_name == *c && e.object_id == *id)
            .collect();
        assert_eq!(
            carried.len(),
            history.len(),
            "{c}/{id}: queue entries vs history"
        );
        for (e, h) in carried.iter().zip(&history) {
            let change = ferry::store::completed::Held::of(&e.data)
                .hash()
                .unwrap_or_else(|| panic!("queue entry {} holds no change", e.id));
            assert_eq!(change.to_string(), h.hash, "{c}/{id}, entry {}", e.id);
            assert_eq!(
                e.operation.as_str(),
                h.operation,
                "{c}/{id}, entry {}",
                e.id
            );
            assert_eq!(h.device, TEST_DEVICE, "{c}/{id}");
        }
    }
}

/// The same value with its numbers in the other kind: integers become floats, integral floats
/// (below 2^53) integers, and zeros change sign; everything else stays. What a loose comparison
/// of numbers takes for the same value, `json_difference` does not.
pub fn look_alike(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::{Value, json};
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or_default();
            if f == 0.0 {
                json!(-f)
            } else if f.fract() == 0.0 && f.abs() < 9e15 {
                json!(f as i64)
            } else {
                v.clone()
            }
        }
        Value::Number(n) => json!(n.as_f64().unwrap_or_default()),
        Value::Array(items) => Value::Array(items.iter().map(look_alike).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), look_alike(v))).collect())
        }
        other => other.clone(),
    }
}

/// The storage engine under a `TestStore`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Engine {
    /// sled in a temp dir.
    Sled,
    /// `MemoryKv`, whose crash loses everything not flushed.
    Memory,
}

/// A store for `TEST_DEVICE` that a test can close and open again, or crash.
pub struct TestStore {
    pub engine: Engine,
    pub clock: std::sync::Arc<StepClock>,
    dir: tempfile::TempDir,
    memory: ferry::store::kv::MemoryKv,
    options: ferry::store::StoreOptions,
    store: Option<ferry::store::Store>,
}

impl TestStore {
    pub fn new(engine: Engine, options: ferry::store::StoreOptions) -> TestStore {
        let mut t = TestStore {
            engine,
            clock: StepClock::new(),
            dir: tempfile::tempdir().expect("temp dir"),
            memory: ferry::store::kv::MemoryKv::new(),
            options,
            store: None,
        };
        t.open();
        t
    }

    fn open(&mut self) {
        let kv: Box<dyn ferry::store::kv::Kv> = match self.engine {
            Engine::Sled => Box::new(open_sled(self.dir.path())),
            Engine::Memory => Box::new(self.memory.clone()),
        };
        self.store = Some(open_test_store(kv, self.options.clone(), &self.clock));
    }

    pub fn store(&self) -> &ferry::store::Store {
        self.store.as_ref().expect("the store is open")
    }

    pub fn clock(&self) -> &StepClock {
        &self.clock
    }

    /// A clean stop (flush, close) and a new store over the same data.
    pub fn reopen(&mut self) {
        self.store().flush().expect("flush");
        self.store = None;
        self.open();
    }

    /// A power cut and a restart: `MemoryKv` loses whatever was not flushed; sled, which cannot
    /// be cut off in-process, gets a clean reopen. True when unflushed data was dropped.
    pub fn crash(&mut self) -> bool {
        match self.engine {
            Engine::Sled => {
                self.reopen();
                false
            }
            Engine::Memory => {
                self.store = None;
                self.memory.crash();
                self.open();
                true
            }
        }
    }
}

/// An in-memory storage engine on a disk that fills up: `apply` fails with `DiskFull` once the bytes stored reach `capacity`,
/// and `flush` fails while `flush_fails` is set. Clones share the disk.
#[derive(Clone)]
pub struct FaultyKv {
    pub inner: MemoryKv,
    pub disk: Arc<Disk>,
}

pub struct Disk {
    pub capacity: AtomicUsize,
    pub flush_fails: AtomicBool,
}

impl FaultyKv {
    pub fn new(capacity: usize) -> Self {
        FaultyKv {
            inner: MemoryKv::new(),
            disk: Arc::new(Disk {
                capacity: AtomicUsize::new(capacity),
                flush_fails: AtomicBool::new(false),
            }),
        }
    }

    pub fn used(&self) -> Result<usize, KvError> {
        let all = self.inner.range(b"", &[0xff], usize::MAX)?;
        Ok(all.iter().map(|(k, v)| k.len() + v.len()).sum())
    }

    pub fn free_space(&self) {
        self.disk.capacity.store(usize::MAX, Ordering::SeqCst);
    }

    /// Every later `apply` fails, as on a disk with no space left.
    pub fn fill_disk(&self) {
        self.disk.capacity.store(0, Ordering::SeqCst);
    }
}

impl Kv for FaultyKv {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.get(key)
    }

    fn range(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>, KvError> {
        self.inner.range(start, end, limit)
    }

    fn last_key(&self, start: &[u8], end: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        self.inner.last_key(start, end)
    }

    fn count(&self, start: &[u8], end: &[u8]) -> Result<u64, KvError> {
        self.inner.count(start, end)
    }

    fn apply(&self, batch: Batch) -> Result<(), KvError> {
        let capacity = self.disk.capacity.load(Ordering::SeqCst);
        if self.used()? >= capacity {
            return Err(KvError::DiskFull(format!(
                "No space left on device: test disk of {capacity} bytes"
            )));
        }
        self.inner.apply(batch)
    }

    fn flush(&self) -> Result<(), KvError> {
        if self.disk.flush_fails.load(Ordering::SeqCst) {
            return Err(KvError::DiskFull("No space left on device (flush)".into()));
        }
        self.inner.flush()
    }

    fn size_on_disk(&self) -> Result<u64, KvError> {
        self.inner.size_on_disk()
    }

    fn live_bytes(&self) -> Result<u64, KvError> {
        self.inner.live_bytes()
    }
    fn journal(&self, each: &mut dyn FnMut(&[u8])) -> Result<bool, KvError> {
        self.inner.journal(each)
    }
    fn journal_bytes(&self) -> u64 {
        self.inner.journal_bytes()
    }
    fn rewrite_journal(&self, keep: ferry::store::kv::JournalKeep<'_>) -> Result<(), KvError> {
        self.inner.rewrite_journal(keep)
    }
}

/// A JSON object as record fields (tests write them as `json!({...})`).
/// Queue entries as a device uploads them.
pub fn uploads(
    entries: &[ferry_proto::queue::SyncQueueEntry],
) -> Vec<ferry_proto::wire::UploadChange> {
    entries
        .iter()
        .map(|e| ferry_proto::wire::UploadChange {
            entry: e.id,
            collection: e.model_name.clone(),
            record: e.object_id.clone(),
            change: e.data.clone(),
        })
        .collect()
}

pub fn fields(v: serde_json::Value) -> ferry::record::Fields {
    match v {
        serde_json::Value::Object(m) => m,
        other => panic!("fields must be an object, not {other}"),
    }
}

/// A put of `v` as the record `collection/id`.
pub fn put(collection: &str, id: &str, v: serde_json::Value) -> ferry::store::Write {
    ferry::store::Write::Put {
        collection: collection.into(),
        id: Some(id.into()),
        fields: fields(v),
    }
}

/// The device id of the second store `Relayed` writes with.
pub const OTHER_DEVICE: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";

/// A second device and the relay's log between it and a device under test: each `sync` logs the
/// other device's pending changes, then the local device's, and hands the local device every
/// entry it has not seen (its own included, as the relay sends them back).
pub struct Relayed {
    pub other: ferry::store::Store,
    pub log: Vec<ferry_proto::wire::LogEntry>,
    /// How much of the log the local device has applied.
    cursor: usize,
}

impl Relayed {
    pub fn new(options: ferry::store::StoreOptions) -> Relayed {
        let other = ferry::store::Store::open(
            Box::new(MemoryKv::new()),
            OTHER_DEVICE,
            options,
            Arc::new(ferry::clock::SystemClock),
        )
        .expect("open the other device's store");
        Relayed {
            other,
            log: Vec::new(),
            cursor: 0,
        }
    }

    /// Logs the other device's changes, then `local`'s, and gives `apply` the entries `local`
    /// has not applied yet with the log position they reach.
    pub fn sync(
        &mut self,
        local: &ferry::store::Store,
        apply: impl FnOnce(&[ferry_proto::wire::LogEntry], u64),
    ) {
        upload(&mut self.log, &self.other);
        upload(&mut self.log, local);
        apply(&self.log[self.cursor..], self.log.len() as u64);
        self.cursor = self.log.len();
    }

    /// A same-field conflict on `collection/id`: the other device creates the record with
    /// `field` = "Ada", `local` receives it, then the other device sets `field` to "Bea" and
    /// `local` to "Grace" concurrently, and the relay logs the other device's change first.
    /// The conflict's server side is "Bea", its client side "Grace".
    pub fn same_field_conflict(
        &mut self,
        local: &ferry::store::Store,
        collection: &str,
        id: &str,
        field: &str,
        mut apply: impl FnMut(&[ferry_proto::wire::LogEntry], u64),
    ) {
        let set = |value: &str| ferry::store::Write::Patch {
            collection: collection.into(),
            id: id.into(),
            set: fields(serde_json::json!({ field: value })),
            unset: Vec::new(),
        };
        self.other
            .write(put(
                collection,
                id,
                serde_json::json!({ field: "Ada", "email": "ada@example.com" }),
            ))
            .expect("create on the other device");
        self.sync(local, &mut apply);
        self.other
            .write(set("Bea"))
            .expect("the other device's edit");
        local.write(set("Grace")).expect("the local edit");
        self.sync(local, &mut apply);
    }
}

/// Appends `store`'s pending changes to `log`, as the relay stores an upload.
pub fn upload(log: &mut Vec<ferry_proto::wire::LogEntry>, store: &ferry::store::Store) {
    use ferry::store::{BatchLimits, RetryPolicy};
    use ferry_proto::wire::{ChangeOutcome, ChangeResult, LogEntry};
    let batch = store
        .next_upload_batch(BatchLimits::of(10_000, usize::MAX))
        .expect("an upload batch");
    let mut results = Vec::new();
    for entry in batch.entries {
        let seq = log.len() as u64 + 1;
        log.push(LogEntry {
            seq,
            collection: entry.model_name.clone(),
            record: entry.object_id.clone(),
            change: entry.data.clone(),
        });
        results.push(ChangeResult {
            entry: entry.id,
            outcome: ChangeOutcome::Stored { seq },
        });
    }
    store
        .finish_upload(&results, &RetryPolicy::immediate(5))
        .expect("finish the upload");
}

impl Device {
    /// Lets `f` work on this device's store in this process (no daemon may be running), then
    /// closes it and waits until the store's files are free for a `ferry` process to open.
    pub fn with_store<T>(&self, f: impl FnOnce(&ferry::store::Store) -> T) -> T {
        let dir = ferry::datadir::DataDir::resolve(Some(&self.data_dir)).expect("data dir");
        let config =
            ferry::config::Config::load(&dir.config_path(), true).expect("load the config");
        let open = ferry::daemon::open_store(&dir, &config).expect("open the device's store");
        let result = f(&open.store);
        open.store.flush().expect("flush the store");
        drop(open);
        wait_sled_released(
            &ferry::store::kv::SledKv::current_dir(&dir.store_path())
                .expect("the store's directory"),
        );
        result
    }

    /// Makes `collection` settle conflicts by hand (`strategy = "manual"`), so they stay open.
    pub fn manual_collection(&self, collection: &str) {
        self.edit_config(|text| {
            format!("{text}\n[collections.{collection}]\nstrategy = \"manual\"\n")
        });
    }
}

impl Device {
    /// A device whose store holds one open same-field conflict on `Customer/1` (see
    /// `Relayed::same_field_conflict`: server "Bea", client "Grace" in `name`), and its id.
    pub fn with_conflict() -> (Device, String) {
        let dev = Device::new();
        dev.manual_collection("Customer");
        let id = dev.with_store(|store| {
            let mut relayed = Relayed::new(ferry::store::StoreOptions::default());
            relayed.same_field_conflict(store, "Customer", "1", "name", |entries, through| {
                store.apply_remote(entries, through).expect("apply the log");
            });
            let ids = store
                .record_conflicts("Customer", "1")
                .expect("the record's conflicts");
            assert_eq!(ids.len(), 1, "one conflict on Customer/1: {ids:?}");
            ids[0].clone()
        });
        (dev, id)
    }
}

/// A relay run in the test's own process, as `ferry relay` runs it, so its state (metrics,
/// alerts) can be read directly.
pub struct InProcessRelay {
    pub listening: ferry::relay::Listening,
    pub dir: ferry::datadir::DataDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ferry::relay::RelayError>>,
    runtime: tokio::runtime::Runtime,
}

impl InProcessRelay {
    /// Starts a relay on `dir` listening on `listen` with `config` (sign-in and enrolment limits
    /// raised for tests), and waits until it serves.
    pub fn start(
        dir: &ferry::datadir::DataDir,
        listen: &str,
        mut config: ferry::config::Config,
    ) -> InProcessRelay {
        config.relay.enrolments_per_minute = 10_000;
        config.relay.sign_ins_per_minute = 10_000;
        let runtime = ferry::daemon::runtime().expect("runtime");
        let (ready_tx, ready) = std::sync::mpsc::channel::<ferry::relay::Listening>();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (relay_dir, listen) = (dir.clone(), listen.to_string());
        let task = runtime.spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            ferry::relay::run(&relay_dir, &config, Some(&listen), shutdown, |l| {
                let _ = ready_tx.send(l.clone());
            })
            .await
        });
        let listening = ready.recv_timeout(TIMEOUT).expect("the relay serves");
        InProcessRelay {
            listening,
            dir: dir.clone(),
            stop: Some(stop),
            task,
            runtime,
        }
    }

    pub fn operator(&self) -> Operator<'_> {
        Operator(self.dir.path())
    }

    /// Stops the relay and waits for its clean exit.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let stopped = self
            .runtime
            .block_on(async { tokio::time::timeout(TIMEOUT, &mut self.task).await });
        stopped
            .expect("the relay stops in time")
            .expect("the relay task")
            .expect("the relay stops cleanly");
    }
}

/// A client TLS config for the relay's HTTPS API: its certificate pinned, HTTP/1.1.
pub fn https_tls(relay: &Relay) -> Arc<rustls::ClientConfig> {
    let fingerprint: ferry::transport::Fingerprint =
        relay.fingerprint.parse().expect("fingerprint");
    let mut tls = ferry::transport::client_tls(&ferry::transport::ServerTrust::Pinned(fingerprint))
        .expect("tls");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// One kept-alive HTTP/1.1 connection to the HTTPS API at `addr` (run on a tokio runtime).
pub async fn https_connect(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let connector = tokio_rustls::TlsConnector::from(tls);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let stream = connector.connect(name, tcp).await.expect("TLS");
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP handshake");
    tokio::spawn(connection);
    sender
}

/// Raw protocol clients: a device speaking the sync protocol by hand (a misbehaving one, or one
/// a test looks through).
/// Runs the raw clients of one test; their connections live as long as it.
pub struct Runtime(tokio::runtime::Runtime);

impl Runtime {
    pub fn new() -> Runtime {
        install_crypto_provider();
        Runtime(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("a tokio runtime"),
        )
    }

    pub fn run<T>(&self, what: &str, fut: impl Future<Output = T>) -> T {
        self.0
            .block_on(async { tokio::time::timeout(TIMEOUT, fut).await })
            .unwrap_or_else(|_| panic!("{what} did not finish within {TIMEOUT:?}"))
    }
}

/// A device speaking the protocol by hand, on its own connection to the relay.
pub struct RawClient {
    _endpoint: quinn::Endpoint,
    _conn: quinn::Connection,
    pub tx: FrameSender,
    pub rx: FrameReceiver,
}

impl RawClient {
    /// Says `Hello` for `space` with `key`, signs the challenge and shows `credential`; returns
    /// the client and the relay's answer (`Welcome` or `Error`).
    pub async fn sign_in(
        relay: &Relay,
        key: &SigningKey,
        space: &str,
        credential: Credential,
    ) -> (RawClient, Message) {
        let addr = relay.addr.parse().expect("the relay's address");
        let trust = ServerTrust::Pinned(relay.fingerprint.parse().expect("a fingerprint"));
        let endpoint = client_endpoint(addr).expect("client endpoint");
        let options = TransportOptions::default();
        let conn = connect(&endpoint, addr, "localhost", &trust, &options)
            .await
            .expect("connected");
        let (tx, rx) = open_session(&conn, &options).await.expect("session stream");
        let mut client = RawClient {
            _endpoint: endpoint,
            _conn: conn.clone(),
            tx,
            rx,
        };
        let public_key = key.verifying_key().to_bytes();
        client
            .send(Message::Hello {
                min_version: MIN_PROTOCOL_VERSION,
                max_version: PROTOCOL_VERSION,
                public_key,
                space: space.into(),
                time_ms: 0,
            })
            .await;
        let nonce = match client.recv().await {
            Message::Challenge { nonce, .. } => nonce,
            other => panic!("expected a Challenge, got {other:?}"),
        };
        let binding = channel_binding(&conn).expect("channel binding");
        let transcript = auth_transcript(&nonce, &binding, space, &public_key);
        client
            .send(Message::Authenticate {
                signature: key.sign(&transcript).to_bytes(),
                credential,
            })
            .await;
        let answer = client.recv().await;
        (client, answer)
    }

    pub async fn send(&mut self, message: Message) {
        self.tx
            .send(&message)
            .await
            .unwrap_or_else(|e| panic!("send {}: {e}", message.name()));
    }

    pub async fn recv(&mut self) -> Message {
        match self.rx.recv().await {
            Ok(Some(message)) => message,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The log of the session's space after `since`, in one answer: its head and entries.
    pub async fn download(&mut self, since: u64) -> (u64, Vec<LogEntry>) {
        self.send(Message::Download {
            since,
            max_changes: 10_000,
        })
        .await;
        loop {
            match self.recv().await {
                Message::Changes {
                    pushed: false,
                    after,
                    head,
                    entries,
                    ..
                } => {
                    assert_eq!(after, since, "the answer starts where asked");
                    return (head, entries);
                }
                Message::Changes { pushed: true, .. } => {}
                other => panic!("expected the Download's Changes, got {other:?}"),
            }
        }
    }
}

/// A one-time enrolment code for `account`, as a raw client shows it.
pub fn enrolment(relay: &Relay, account: &str) -> Credential {
    Credential::Enrol(Secret::new(relay.operator().enrol(account)))
}

/// The key a device's data directory holds, so a raw client can act as that device.
pub fn device_key(device: &Device) -> SigningKey {
    DataDir::resolve(Some(&device.data_dir))
        .and_then(|dir| dir.identity())
        .expect("the device's identity")
        .signing_key()
        .clone()
}

/// `(id, fields)` of every Doc record the daemon holds, in id order.
pub fn docs(daemon: &Daemon) -> Vec<(String, Value)> {
    let page = call(
        daemon,
        "list",
        json!({ "collection": "Doc", "limit": 1000 }),
    );
    page["records"]
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            (
                r["id"].as_str().expect("an id").to_string(),
                r["fields"].clone(),
            )
        })
        .collect()
}

/// Writes `Doc/id` with `fields` through the daemon.
pub fn put_doc(daemon: &Daemon, id: &str, fields: Value) {
    call(
        daemon,
        "put",
        json!({ "collection": "Doc", "id": id, "fields": fields }),
    );
}

/// Waits until the daemon is caught up with a relay log of exactly `head` entries.
pub fn wait_caught_up(daemon: &Daemon, head: u64) {
    wait_for_ok(&format!("caught up at {head}"), TIMEOUT, || {
        let s = status(daemon);
        if caught_up(&s, head) {
            Ok(())
        } else {
            Err(s["sync"].to_string())
        }
    });
}

/// Three changes to one record, as simulation seed 14's relay logged them (`Invoice/r0`): a
/// device's first change (actor a8c28d2a...), then two changes the hostile participant uploaded
/// under its own actor (6666...), seq 1 and seq 2, each a copy of the first: both depend on
/// nothing and number their operations 1 to 3. Automerge 0.12 built as it ships applies all
/// three, and saves a document it cannot load: the actor's second change reuses its first's
/// operation numbers and is not built on it.
pub fn seed_14_changes() -> [Vec<u8>; 3] {
    const BODY: &str = "061515340142025604570470027d082464656c65746564046369747905746f74616c\
                        0303017d0126247632cb010300";
    let hex = |s: String| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    };
    [
        hex(format!(
            "856f4a83e95b47c801510010a8c28d2ac33d6d4988cc9afaa36c23a40101fec597ffbc3106\
             63726561746500{BODY}"
        )),
        hex(format!(
            "856f4a831b5f1a22014b0010666666666666666666666666666666660101fec597ffbc310000{BODY}"
        )),
        hex(format!(
            "856f4a833e295911014b0010666666666666666666666666666666660201fec597ffbc310000{BODY}"
        )),
    ]
}

/// A tmpfs mounted for a test, unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!("mount -t tmpfs failed: {}", stderr(&out).trim()));
        }
        Ok(Tmpfs(dir.to_owned()))
    }

    pub fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .expect("run mount");
        assert!(out.status.success(), "remount: {}", stderr(&out));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).output();
    }
}
