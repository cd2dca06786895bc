//! What the real-process benchmarks share: child processes that cannot outlive the benchmark
//! (guards that kill them when dropped, and signal handlers that stop them), JSON-RPC calls
//! that must succeed, and the measurements (latency percentiles, rates, memory, disk use).
//!
//! Must not touch: the workloads themselves (each benchmark target owns its phases) and the
//! record shape (that is `workload`).
#![allow(dead_code)]

use crate::common::{self, Daemon, Device};
use ferry::ipc::{Client, ClientError};
use ferry::service::api::Method;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Processes that cannot outlive the benchmark.

/// Pids of running children (daemons, relays), for the signal handler. Zero is a free slot.
static CHILD_PIDS: [AtomicI32; 8] = [const { AtomicI32::new(0) }; 8];
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    for slot in &CHILD_PIDS {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe; the pid is a child we have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP every child is asked to stop; the benchmark then fails at its
/// next step and unwinds, which waits for the children and removes the temp dirs.
pub fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only touches atomics and calls kill(2), both async-signal-safe.
        unsafe {
            libc::signal(
                sig,
                on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

pub fn check_interrupted() {
    if INTERRUPTED.load(Ordering::SeqCst) {
        panic!("interrupted by a signal: stopping (the child processes were asked to stop)");
    }
}

/// A child's pid held in the signal handler's table while the child runs.
struct Registration(usize);

impl Registration {
    fn new(pid: u32) -> Registration {
        let slot = CHILD_PIDS
            .iter()
            .position(|s| {
                s.compare_exchange(0, pid as i32, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            })
            .expect("a free child slot");
        Registration(slot)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        CHILD_PIDS[self.0].store(0, Ordering::SeqCst);
    }
}

/// A running daemon, registered with the signal handler; killed when dropped.
pub struct Running {
    // Field order matters: the registration goes before the daemon is killed and reaped, so
    // the handler never signals a pid that may have been reused.
    registration: Option<Registration>,
    daemon: Option<Daemon>,
}

impl Running {
    pub fn start(device: &Device) -> Running {
        Running::adopt(device.start_daemon())
    }

    /// Starts the daemon with its standard error (its log) going to `log`.
    pub fn start_logging(device: &Device, log: &Path) -> Running {
        let file = std::fs::File::create(log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        Running::adopt(device.start_daemon_with_stderr(file.into()))
    }

    fn adopt(daemon: Daemon) -> Running {
        check_interrupted();
        Running {
            registration: Some(Registration::new(daemon.child.id())),
            daemon: Some(daemon),
        }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    pub fn pid(&self) -> u32 {
        self.daemon().child.id()
    }

    pub fn client(&self) -> Client {
        self.daemon().client()
    }

    /// The daemon's socket, for a client that speaks to it directly.
    pub fn socket(&self) -> &Path {
        &self.daemon().socket
    }

    /// SIGTERM and wait for the clean exit (the store is flushed). A daemon caught in a
    /// compaction finishes it first: about 40 s for a store of a million records, past the 30 s
    /// the tests give it, so a benchmark waits longer and says how long it took.
    pub fn stop(mut self) -> ExitStatus {
        self.registration = None;
        let mut daemon = self.daemon.take().expect("running");
        common::signal(daemon.child.id(), libc::SIGTERM);
        let started = Instant::now();
        loop {
            if let Some(status) = daemon.child.try_wait().expect("wait for the daemon") {
                let took = started.elapsed();
                if took > Duration::from_secs(5) {
                    eprintln!("  (the daemon took {took:.1?} to stop)");
                }
                return status;
            }
            assert!(
                started.elapsed() < STOP_PATIENCE,
                "the daemon did not stop within {STOP_PATIENCE:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// How long `Running::stop` waits for the daemon to exit.
const STOP_PATIENCE: Duration = Duration::from_secs(300);

/// Any other child process, registered with the signal handler; SIGKILLed and reaped when
/// dropped.
pub struct Guarded {
    registration: Option<Registration>,
    child: Option<Child>,
}

impl Guarded {
    pub fn new(child: Child) -> Guarded {
        let registration = Registration::new(child.id());
        Guarded {
            registration: Some(registration),
            child: Some(child),
        }
    }

    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("running")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait (boundedly) for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.registration = None;
        let mut child = self.child.take().expect("running");
        common::signal(child.id(), libc::SIGTERM);
        let mut status = None;
        common::wait_for(
            "a child process to stop after SIGTERM",
            common::TIMEOUT,
            || {
                status = child.try_wait().expect("wait for a child");
                status.is_some()
            },
        );
        status.expect("exited")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.registration = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One JSON-RPC call that must succeed.
pub fn call(client: &mut Client, method: &str, params: Value) -> Value {
    client
        .call(method, params)
        .unwrap_or_else(|e| failed(method, e))
}

/// One typed call that must succeed, its answer read as an app using `ferry::ipc::Client` reads it.
pub fn request<M: Method>(client: &mut Client, params: M) -> M::Answer {
    client
        .request(params)
        .unwrap_or_else(|e| failed(M::NAME, e))
}

fn failed(method: &str, e: ClientError) -> ! {
    check_interrupted();
    panic!("{method} failed: {e}");
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// Latency percentiles in microseconds (nearest rank).
pub fn latency(samples: &mut [Duration]) -> Value {
    assert!(!samples.is_empty(), "no samples");
    samples.sort_unstable();
    let us = |d: Duration| (d.as_secs_f64() * 1e7).round() / 10.0;
    let rank =
        |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    let total: Duration = samples.iter().sum();
    json!({
        "p50": us(rank(0.50)),
        "p99": us(rank(0.99)),
        "max": us(samples[samples.len() - 1]),
        "mean": us(total / samples.len() as u32),
    })
}

pub fn per_second(count: u64, elapsed: Duration) -> u64 {
    (count as f64 / elapsed.as_secs_f64().max(1e-9)).round() as u64
}

pub fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// (VmRSS, VmHWM) of a process, in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The CPU time a process has used so far, all its threads (those that ended too), user and
/// system, in microseconds (`/proc/<pid>/stat`, in clock ticks of 10 ms, the kernel's
/// `USER_HZ` on Linux): what a workload cost, apart from how busy the machine was.
pub fn cpu_us(pid: u32) -> u64 {
    let (ticks, _, _) = proc_stat(pid).unwrap_or_else(|| panic!("no CPU time in /proc/{pid}/stat"));
    ticks * 10_000
}

/// (utime + stime, cutime + cstime) of process `pid` in clock ticks, and its parent; `None` when
/// it is gone.
pub fn proc_stat(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |i: usize| -> Option<u64> { fields.get(i)?.parse().ok() };
    // ppid is field 4 of the line; utime, stime, cutime, cstime fields 14 to 17 (2, 11..=14
    // after the name).
    Some((
        field(11)? + field(12)?,
        field(13)? + field(14)?,
        u32::try_from(field(1)?).ok()?,
    ))
}

/// CPU ticks of the PostgreSQL server whose data directory is `data`: the postmaster (with its children that ended) and every
/// process whose parent chain leads to it.
pub fn postgres_cpu(data: &Path) -> u64 {
    let pidfile = std::fs::read_to_string(data.join("postmaster.pid")).expect("postmaster.pid");
    let postmaster: u32 = pidfile
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the postmaster's pid on postmaster.pid's first line");
    let mut parents = std::collections::HashMap::new();
    let mut ticks = std::collections::HashMap::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Some(pid) = entry
            .ok()
            .and_then(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        else {
            continue;
        };
        if let Some((own, children, parent)) = proc_stat(pid) {
            parents.insert(pid, parent);
            let ended = if pid == postmaster { children } else { 0 };
            ticks.insert(pid, own + ended);
        }
    }
    let under_postmaster = |mut pid: u32| loop {
        if pid == postmaster {
            return true;
        }
        match parents.get(&pid) {
            Some(&parent) if parent != 0 && parent != pid => pid = parent,
            _ => return false,
        }
    };
    ticks
        .iter()
        .filter(|(pid, _)| under_postmaster(**pid))
        .map(|(_, t)| t)
        .sum()
}

/// (bytes allocated on disk, as `du` counts them; apparent bytes) of a directory tree.
pub fn disk_usage(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    let mut total = (meta.blocks() * 512, meta.len());
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).expect("read dir") {
            let (du, apparent) = disk_usage(&entry.expect("dir entry").path());
            total.0 += du;
            total.1 += apparent;
        }
    }
    total
}

/// Waits until `condition` holds, checking every `pause`; panics with `what` after `timeout`.
/// Returns when it first held, as seen by the check.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    pause: Duration,
    mut condition: impl FnMut() -> bool,
) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted();
        if condition() {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(pause);
    }
}

// ---------------------------------------------------------------------------------------------
// Where a store's bytes go.

/// `ferry --json space` on a data directory whose daemon or relay is stopped: each store's
/// disk, journal and live bytes by kind of key.
pub fn space(data_dir: &Path) -> Value {
    space_run(data_dir, false)
}

/// `space`, each store rewritten compactly first (`ferry space --compact`): what the engine
/// keeps beyond the live data once its old versions are gone.
pub fn space_compacted(data_dir: &Path) -> Value {
    space_run(data_dir, true)
}

fn space_run(data_dir: &Path, compact: bool) -> Value {
    let mut args = vec!["--json", "space"];
    if compact {
        args.push("--compact");
    }
    let out = std::process::Command::new(common::ferry_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args(&args)
        .env_remove("FERRY_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ferry space");
    assert!(
        out.status.success(),
        "ferry space failed: {}",
        common::stderr(&out)
    );
    serde_json::from_str(&common::stdout(&out)).expect("ferry space --json output")
}

/// The one store of `kind` (`device` or `relay`) in a `space` report, per record: the disk and
/// what it holds, each kind of key's live bytes (key and value), the checksums, the journal,
/// and what is left, the engine's own (sled's old node versions and free space), each next to
/// the record's JSON size (`json_bytes`, as `ferry export` writes it).
pub fn space_per_record(report: &Value, kind: &str, records: u64, json_bytes: f64) -> Value {
    let store = report["stores"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["store"] == kind))
        .unwrap_or_else(|| panic!("no {kind} store in {report}"));
    let n = records.max(1) as f64;
    let per = |v: &Value| (v.as_f64().unwrap_or(0.0) / n * 10.0).round() / 10.0;
    let bytes = |v: &Value| v.as_u64().unwrap_or(0);
    let disk = bytes(&store["disk_bytes"]);
    let accounted = bytes(&store["live_bytes"])
        + bytes(&store["checksum_bytes"])
        + bytes(&store["journal_bytes"]);
    let mut kinds = serde_json::Map::new();
    for k in store["kinds"].as_array().into_iter().flatten() {
        let total = bytes(&k["key_bytes"]) + bytes(&k["value_bytes"]);
        kinds.insert(
            k["kind"].as_str().unwrap_or("?").to_owned(),
            json!({ "keys": k["keys"], "bytes_per_record": per(&json!(total)) }),
        );
    }
    json!({
        "records": records,
        "json_bytes_per_record": (json_bytes * 10.0).round() / 10.0,
        "disk_bytes": disk,
        "disk_per_record": per(&json!(disk)),
        "disk_to_json": ((disk as f64 / n / json_bytes.max(1.0)) * 100.0).round() / 100.0,
        "live_per_record": per(&store["live_bytes"]),
        "checksums_per_record": per(&store["checksum_bytes"]),
        "journal_per_record": per(&store["journal_bytes"]),
        "engine_overhead_per_record": per(&json!(disk.saturating_sub(accounted))),
        "kinds": kinds,
    })
}

/// Summary lines of a `space_per_record` figure.
pub fn space_lines(label: &str, s: &Value) -> Vec<String> {
    let mut kinds: Vec<(String, f64)> = s["kinds"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v["bytes_per_record"].as_f64().unwrap_or(0.0)))
        .collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = kinds
        .iter()
        .filter(|(_, b)| *b >= 0.5)
        .map(|(k, b)| format!("{k} {b:.0}"))
        .collect();
    vec![
        format!(
            "{label}: {} B/record on disk = {}x the record's JSON ({} B); live {} B, \
             checksums {} B, journal {} B, engine (sled) {} B",
            s["disk_per_record"],
            s["disk_to_json"],
            s["json_bytes_per_record"],
            s["live_per_record"],
            s["checksums_per_record"],
            s["journal_per_record"],
            s["engine_overhead_per_record"],
        ),
        format!("  live bytes/record by kind: {}", parts.join(", ")),
    ]
}
