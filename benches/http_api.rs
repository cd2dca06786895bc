//! HTTP API benchmark: a real `ferry relay` process serving its HTTPS API on loopback, an
//! account holding N records (written by a real daemon and synced over QUIC), and HTTP/1.1
//! clients on kept-alive TLS connections.
//!
//! - upload: U records created through `POST /api/sync/upload`, B operations per request, as
//!   the account's web actor (after the account's first HTTP request, one operation, timed on
//!   its own: the web actor then writes into a log of N entries it has never read). Records/s.
//! - download: every record through `GET /api/sync/download?since=0` one page (1,000 records)
//!   at a time, twice: the first pass renders each page, the second is served from the page
//!   cache (the log has not moved). Records/s, and with `Accept-Encoding: gzip`.
//! - since latency: `download?since=S&limit=100` for random cursors S over the whole log (each
//!   a page not rendered before): p50/p99.
//! - polling: P clients each poll `download?since=HEAD` with `If-None-Match` every I ms for T
//!   seconds while a daemon writes one record every W ms; the share of polls answered
//!   `304 Not Modified`.
//!
//! `cargo bench --bench http_api [-- --records N --uploads U --batch B --pollers P --poll-ms I
//! --write-ms W --secs T]`
//! prints one JSON object per phase on standard output; see benches/README.md. Without `--bench`
//! (as `cargo test --all-targets` runs it) it does a quick smoke run on a few records.

// A benchmark stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

#[path = "../tests/common/mod.rs"]
mod common;
mod harness;
mod workload;

use common::{Device, Relay};
use harness::{call, install_signal_handlers, latency, per_second, poll_until};
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use workload::{Rng, import_record};

const PASSWORD: &str = "benchmark password";
const PAGE: u64 = 1000;

struct Options {
    records: u64,
    uploads: u64,
    batch: u64,
    pollers: usize,
    poll_ms: u64,
    write_ms: u64,
    secs: u64,
    since_samples: usize,
}

fn options() -> Options {
    let bench = std::env::args().any(|a| a == "--bench");
    let mut o = if bench {
        Options {
            records: 100_000,
            uploads: 20_000,
            batch: 500,
            pollers: 20,
            poll_ms: 100,
            write_ms: 1000,
            secs: 20,
            since_samples: 1000,
        }
    } else {
        Options {
            records: 300,
            uploads: 100,
            batch: 20,
            pollers: 2,
            poll_ms: 50,
            write_ms: 200,
            secs: 1,
            since_samples: 20,
        }
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{arg} takes a number"))
        };
        match arg.as_str() {
            "--records" => o.records = value(),
            "--uploads" => o.uploads = value(),
            "--batch" => o.batch = value(),
            "--pollers" => o.pollers = value() as usize,
            "--poll-ms" => o.poll_ms = value(),
            "--write-ms" => o.write_ms = value(),
            "--secs" => o.secs = value(),
            "--since-samples" => o.since_samples = value() as usize,
            _ => {}
        }
    }
    o
}

/// An HTTPS client on one kept-alive connection, pinned to the relay's certificate.
struct Https {
    runtime: Arc<tokio::runtime::Runtime>,
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    token: String,
}

struct Answer {
    status: u16,
    etag: Option<String>,
    body: bytes::Bytes,
}

impl Https {
    fn connect(runtime: Arc<tokio::runtime::Runtime>, relay: &Relay, token: &str) -> Https {
        let (addr, tls) = (
            relay.http.clone().expect("HTTPS API"),
            common::https_tls(relay),
        );
        let sender = runtime.block_on(common::https_connect(&addr, tls));
        Https {
            runtime,
            sender,
            token: token.to_string(),
        }
    }

    fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Answer {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .expect("request");
        let sender = &mut self.sender;
        self.runtime.block_on(async {
            sender.ready().await.expect("connection ready");
            let response = sender.send_request(request).await.expect("response");
            let status = response.status().as_u16();
            let etag = response
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            Answer { status, etag, body }
        })
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", path, headers, Vec::new())
    }
}

/// The upload body creating records `from..to` of the `WebOrder` collection.
fn creates(device: &str, from: u64, to: u64) -> Vec<u8> {
    let now = ferry::clock::now_ms();
    let operations: Vec<Value> = (from..to)
        .map(|n| {
            json!({
                "operation": "create", "model": "WebOrder", "object_id": format!("w{n:08}"),
                "data": { "customer": format!("c{}", n % 997), "total": n % 10_000, "status": "new",
                          "note": "created over HTTP by the benchmark" },
                "timestamp": now, "device_id": device,
            })
        })
        .collect();
    serde_json::to_vec(&operations).expect("JSON")
}

fn upload(api: &mut Https, body: Vec<u8>, expected: u64) {
    let answer = api.send("POST", "/api/sync/upload", &[], body);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let results: Value = serde_json::from_slice(&answer.body).expect("results");
    let applied = results["results"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["status"] == "applied").count());
    assert_eq!(applied as u64, expected, "every create applied");
}

fn login(runtime: &Arc<tokio::runtime::Runtime>, relay: &Relay) -> (String, String) {
    let mut anonymous = Https::connect(runtime.clone(), relay, "");
    let answer = anonymous.send(
        "POST",
        "/api/auth/login",
        &[],
        json!({ "account": "default", "password": PASSWORD, "label": "bench" })
            .to_string()
            .into_bytes(),
    );
    assert_eq!(answer.status, 200, "login");
    let tokens: Value = serde_json::from_slice(&answer.body).expect("tokens");
    (
        tokens["access_token"].as_str().expect("token").to_string(),
        tokens["device"].as_str().expect("device").to_string(),
    )
}

/// Pages through the whole log; returns the records seen and the bytes received.
fn download_all(client: &mut Https, gzip: bool) -> (u64, u64) {
    let (mut since, mut records, mut bytes) = (0u64, 0u64, 0u64);
    let headers: &[(&str, &str)] = if gzip {
        &[("accept-encoding", "gzip")]
    } else {
        &[]
    };
    loop {
        let answer = client.get(
            &format!("/api/sync/download?since={since}&limit={PAGE}"),
            headers,
        );
        assert_eq!(answer.status, 200);
        bytes += answer.body.len() as u64;
        let page: Value = if gzip {
            let mut text = Vec::new();
            std::io::Read::read_to_end(
                &mut flate2::read::GzDecoder::new(answer.body.as_ref()),
                &mut text,
            )
            .expect("gzip");
            serde_json::from_slice(&text).expect("page")
        } else {
            serde_json::from_slice(&answer.body).expect("page")
        };
        records += page["records"].as_array().map_or(0, |r| r.len() as u64);
        match page["next"].as_u64() {
            Some(next) => since = next,
            None => return (records, bytes),
        }
    }
}

fn main() {
    install_signal_handlers();
    let o = options();
    let home = tempfile::tempdir().expect("temp dir");
    let relay = Relay::start_with_config(
        &home.path().join("relay"),
        None,
        "[relay]\nhttp_listen = \"127.0.0.1:0\"\nhttp_max_page = 1000\nlogins_per_minute = 100000\n\
         enrolments_per_minute = 1000\nsign_ins_per_minute = 100000\nhttp_max_body_bytes = 8388608\n",
    );
    relay
        .operator()
        .add_account_with_password("default", PASSWORD);

    // The account's records, written by a daemon and synced over QUIC.
    let device = Device::new();
    device.join(&relay);
    let running = harness::Running::start(&device);
    let mut client = running.client();
    let mut next = 0;
    while next < o.records {
        let end = (next + 5000).min(o.records);
        let records: Vec<Value> = (next..end).map(import_record).collect();
        call(&mut client, "import", json!({ "records": records }));
        next = end;
    }
    poll_until(
        "the relay holds every record",
        Duration::from_secs(600),
        Duration::from_millis(100),
        || common::caught_up(&call(&mut client, "status", json!({})), o.records),
    );

    let runtime = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime"),
    );
    let (token, web_client) = login(&runtime, &relay);
    let mut api = Https::connect(runtime.clone(), &relay, &token);

    // Upload: the account's first write over HTTP, then the rest.
    let started = Instant::now();
    upload(&mut api, creates(&web_client, 0, 1), 1);
    let first = started.elapsed();
    let started = Instant::now();
    let mut next = 1;
    while next < o.uploads {
        let end = (next + o.batch).min(o.uploads);
        upload(&mut api, creates(&web_client, next, end), end - next);
        next = end;
    }
    let took = started.elapsed();
    println!(
        "{}",
        json!({
            "phase": "upload", "records": o.uploads.saturating_sub(1), "batch": o.batch,
            "records_per_s": per_second(o.uploads.saturating_sub(1), took), "secs": took.as_secs_f64(),
            "first_request_ms": first.as_secs_f64() * 1e3, "log_before": o.records,
        })
    );
    let total = o.records + o.uploads;
    poll_until(
        "the daemon holds the uploaded records",
        Duration::from_secs(600),
        Duration::from_millis(100),
        || common::caught_up(&call(&mut client, "status", json!({})), total),
    );

    // Download throughput: rendered, then cached, then cached with gzip.
    for (pass, gzip) in [
        ("rendered", false),
        ("cached", false),
        ("cached_gzip", true),
    ] {
        let started = Instant::now();
        let (records, bytes) = download_all(&mut api, gzip);
        let took = started.elapsed();
        assert_eq!(records, total, "every record downloaded");
        println!(
            "{}",
            json!({
                "phase": "download", "pass": pass, "records": records,
                "records_per_s": per_second(records, took), "bytes_per_record": bytes / records.max(1),
                "secs": took.as_secs_f64(),
            })
        );
    }

    // Latency of `since` at random cursors (pages not rendered before).
    let mut rng = Rng::new(7);
    let mut samples = Vec::with_capacity(o.since_samples);
    for _ in 0..o.since_samples {
        let since = rng.below(total.saturating_sub(100).max(1));
        let started = Instant::now();
        let answer = api.get(&format!("/api/sync/download?since={since}&limit=100"), &[]);
        samples.push(started.elapsed());
        assert_eq!(answer.status, 200);
    }
    println!(
        "{}",
        json!({ "phase": "since_latency", "records": total, "limit": 100,
                "samples": samples.len(), "latency_us": latency(&mut samples) })
    );

    // Polling with If-None-Match while a daemon writes.
    let head = total;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pollers: Vec<_> = (0..o.pollers)
        .map(|_| {
            let mut poller = Https::connect(runtime.clone(), &relay, &token);
            let stop = stop.clone();
            let poll = Duration::from_millis(o.poll_ms);
            std::thread::spawn(move || {
                let (mut ok, mut not_modified, mut etag) = (0u64, 0u64, String::new());
                let mut latencies = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let started = Instant::now();
                    let answer = poller.get(
                        &format!("/api/sync/download?since={head}&limit=100"),
                        &[("if-none-match", etag.as_str())],
                    );
                    latencies.push(started.elapsed());
                    match answer.status {
                        304 => not_modified += 1,
                        200 => {
                            ok += 1;
                            etag = answer.etag.unwrap_or_default();
                        }
                        other => panic!("poll answered {other}"),
                    }
                    std::thread::sleep(poll.saturating_sub(started.elapsed()));
                }
                (ok, not_modified, latencies)
            })
        })
        .collect();
    let started = Instant::now();
    let mut writes = 0u64;
    while started.elapsed() < Duration::from_secs(o.secs) {
        call(
            &mut client,
            "put",
            json!({ "collection": "Customer", "id": format!("poll-{writes}"), "fields": { "n": writes } }),
        );
        writes += 1;
        std::thread::sleep(Duration::from_millis(o.write_ms));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut not_modified, mut all) = (0, 0, Vec::new());
    for poller in pollers {
        let (o_k, n_m, latencies) = poller.join().expect("poller");
        ok += o_k;
        not_modified += n_m;
        all.extend(latencies);
    }
    println!(
        "{}",
        json!({
            "phase": "polling", "pollers": o.pollers, "poll_ms": o.poll_ms, "writes": writes,
            "write_ms": o.write_ms, "polls": ok + not_modified, "answered_200": ok,
            "answered_304": not_modified,
            "rate_304": not_modified as f64 / (ok + not_modified).max(1) as f64,
            "latency_us": latency(&mut all),
        })
    );
    running.stop();
}
