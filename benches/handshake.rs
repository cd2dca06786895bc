//! The cost of one connection to the relay, by credential: a real relay (`relay::run`) on
//! 127.0.0.1 and `engine::sign_in` connecting to it again and again, each time a new QUIC + TLS
//! 1.3 connection, the challenge signed and checked, the credential checked, and `Welcome`
//! received (the time stops there; the connection's close is drained outside it).
//!
//! Cases: `connect_only` (QUIC + TLS and a session stream opened: the baseline without any
//! sign-in), `enrol` (a new device registers with a fresh code each time), `key`
//! (a new token family), `refresh` (the refresh token rotated), `access` (a valid access token:
//! nothing written). Sign-in cost = a case minus `connect_only`.
//!
//! `cargo bench --bench handshake [-- --connections N]` prints p50/p90/p99/mean per case, and a
//! JSON line.

// A benchmark stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ferry::config::{Config, SyncConfig};
use ferry::datadir::DataDir;
use ferry::engine::{self, SyncSettings};
use ferry::ipc::Client;
use ferry::relay::{self, Listening};
use ferry::transport;
use ferry_proto::wire::{Credential, Secret};
use serde_json::json;

const ACCOUNT: &str = "bench";

fn main() {
    let mut connections = 200usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--connections" {
            connections = args
                .next()
                .and_then(|n| n.parse().ok())
                .expect("--connections N");
        }
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = DataDir::resolve(Some(&tmp.path().join("relay"))).expect("data dir");
    let mut config = Config::default();
    config.relay.sign_ins_per_minute = u32::MAX;
    config.relay.enrolments_per_minute = u32::MAX;
    let runtime = ferry::daemon::runtime().expect("runtime");
    let (ready_tx, ready) = std::sync::mpsc::channel::<Listening>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let relay_dir = dir.clone();
    let relay = runtime.spawn(async move {
        relay::run(
            &relay_dir,
            &config,
            Some("127.0.0.1:0"),
            async {
                let _ = stopped.await;
            },
            |listening| {
                let _ = ready_tx.send(listening.clone());
            },
        )
        .await
    });
    let listening = ready
        .recv_timeout(Duration::from_secs(30))
        .expect("the relay serves");
    let mut operator =
        Client::connect(&relay::admin::socket_path(&dir)).expect("the operator's socket");
    relay::admin::request(
        &mut operator,
        relay::admin::AccountAdd {
            name: ACCOUNT.into(),
        },
    )
    .expect("account");
    let mut code = || {
        let answer = relay::admin::request(
            &mut operator,
            relay::admin::Enrol {
                account: ACCOUNT.into(),
                hours: None,
            },
        )
        .expect("enrolment code");
        Secret::new(answer.code)
    };
    let settings = SyncSettings::from_config(&SyncConfig {
        relay: listening.listen.to_string(),
        fingerprint: listening.fingerprint.to_string(),
        space: ACCOUNT.into(),
        ..SyncConfig::default()
    })
    .expect("settings")
    .expect("a relay");
    let closing = std::cell::RefCell::new(Vec::new());
    let closing_bare = std::cell::RefCell::new(Vec::<quinn::Endpoint>::new());
    let sign_in = |key: &SigningKey, credential: Credential| {
        let signed_in = runtime
            .block_on(engine::sign_in(&settings, key.clone(), credential))
            .expect("signed in");
        let tokens = signed_in.tokens.clone();
        closing.borrow_mut().push(signed_in);
        tokens
    };
    let key = SigningKey::from_bytes(&[7; 32]);
    let first = sign_in(&key, Credential::Enrol(code())).expect("tokens");

    let mut results = Vec::new();
    let mut measure = |name: &'static str, mut once: Box<dyn FnMut() + '_>| {
        once(); // warm up
        let mut times: Vec<Duration> = (0..connections)
            .map(|_| {
                let started = Instant::now();
                once();
                let took = started.elapsed();
                for signed_in in closing.borrow_mut().drain(..) {
                    runtime.block_on(signed_in.closed());
                }
                for endpoint in closing_bare.borrow_mut().drain(..) {
                    runtime.block_on(endpoint.wait_idle());
                }
                took
            })
            .collect();
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let at = |q: f64| ms(times[((times.len() - 1) as f64 * q) as usize]);
        let mean = ms(times.iter().sum::<Duration>()) / times.len() as f64;
        println!(
            "{name:>12}: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  mean {mean:.2} ms",
            at(0.5),
            at(0.9),
            at(0.99)
        );
        results.push(json!({ "case": name, "p50_ms": at(0.5), "p90_ms": at(0.9),
                             "p99_ms": at(0.99), "mean_ms": mean }));
    };

    measure(
        "connect_only",
        Box::new(|| {
            let endpoint = runtime.block_on(async {
                let addr = listening.listen;
                let options = transport::TransportOptions::default();
                let endpoint = transport::client_endpoint(addr).expect("endpoint");
                let connection = transport::connect(
                    &endpoint,
                    addr,
                    "localhost",
                    &transport::ServerTrust::Pinned(listening.fingerprint),
                    &options,
                )
                .await
                .expect("connected");
                let (mut sender, _receiver) = transport::open_session(&connection, &options)
                    .await
                    .expect("session stream");
                let _ = sender.finish();
                connection.close(0u32.into(), b"done");
                endpoint
            });
            closing_bare.borrow_mut().push(endpoint);
        }),
    );
    let mut seed = 100u8;
    measure(
        "enrol",
        Box::new(|| {
            seed = seed.wrapping_add(1);
            let device = SigningKey::from_bytes(&[seed; 32]);
            let credential = Credential::Enrol(code());
            sign_in(&device, credential);
        }),
    );
    measure(
        "key",
        Box::new(|| {
            sign_in(&key, Credential::Key);
        }),
    );
    let mut refresh = first.refresh.clone();
    measure(
        "refresh",
        Box::new(|| {
            let tokens = sign_in(&key, Credential::Refresh(refresh.clone())).expect("tokens");
            refresh = tokens.refresh;
        }),
    );
    let access = sign_in(&key, Credential::Key).expect("tokens").access;
    measure(
        "access",
        Box::new(|| {
            sign_in(&key, Credential::Access(access.clone()));
        }),
    );
    println!(
        "{}",
        json!({ "bench": "handshake", "connections": connections, "cases": results })
    );
    let _ = stop.send(());
    runtime
        .block_on(relay)
        .expect("relay task")
        .expect("relay stopped cleanly");
}
