//! Shared helpers for the integration tests: temporary devices, real `ferry daemon` processes,
//! and waiting for conditions with a bounded timeout.
#![allow(dead_code)]

use ferry::ipc::Client;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TIMEOUT: Duration = Duration::from_secs(30);

pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Polls `condition` until it holds; panics with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
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

    /// Starts `ferry daemon` and waits until its socket answers.
    pub fn start_daemon(&self) -> Daemon {
        let child = self
            .command(&["daemon"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry daemon");
        let mut daemon = Daemon {
            child,
            socket: self.socket(),
        };
        let socket = daemon.socket.clone();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if Client::connect(&socket).is_ok() {
                break;
            }
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("ferry daemon exited before it was ready: {status}");
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
