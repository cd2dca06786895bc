//! A real relay (`ferry::relay::run`, in-process on 127.0.0.1) against misbehaving clients: raw
//! bytes and messages out of order on one connection. Each time the relay must end that session
//! with an error that says what was wrong, while a well-behaved device on another connection
//! keeps uploading and downloading.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use ed25519_dalek::{Signer as _, SigningKey};
use ferry::config::Config;
use ferry::datadir::DataDir;
use ferry::relay::{Listening, RelayError};
use ferry::transport::{
    FrameReceiver, FrameSender, ServerTrust, TransportError, TransportOptions, channel_binding,
    client_endpoint, connect, install_crypto_provider, open_session,
};
use ferry_proto::wire::{
    ChangeOutcome, Credential, ErrorCode, MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, Secret,
    UploadChange, auth_transcript, encode_frame,
};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;

/// Bound on every wait; the tests never measure time, they only refuse to hang.
const LIMIT: Duration = Duration::from_secs(20);
const SPACE: &str = "frames";

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

/// A connection and the sending half of its stream, kept alive together.
type Raw = (quinn::Connection, quinn::SendStream);

/// A relay running on this test's runtime, stopped cleanly by `stop`.
struct TestRelay {
    addr: SocketAddr,
    trust: ServerTrust,
    /// The relay operator's socket.
    admin: std::path::PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), RelayError>>,
    _dir: tempfile::TempDir,
}

impl TestRelay {
    async fn start(max_connections: usize) -> TestRelay {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = DataDir::resolve(Some(&tmp.path().join("relay"))).expect("data dir");
        let admin = tmp.path().join("relay").join("relay.sock");
        let mut config = Config::default();
        config.relay.max_connections = max_connections;
        // Every good device here enrols anew on each connection, all from one address.
        config.relay.enrolments_per_minute = 100_000;
        config.relay.sign_ins_per_minute = 100_000;
        let (ready_tx, ready) = oneshot::channel::<Listening>();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            ferry::relay::run(&dir, &config, Some("127.0.0.1:0"), shutdown, |listening| {
                let _ = ready_tx.send(listening.clone());
            })
            .await
        });
        let listening = within("the relay to start", ready)
            .await
            .expect("the relay started");
        let relay = TestRelay {
            addr: listening.listen,
            trust: ServerTrust::Pinned(listening.fingerprint),
            admin,
            stop,
            task,
            _dir: tmp,
        };
        relay
            .operator("account.add", serde_json::json!({ "name": SPACE }))
            .await;
        relay
    }

    /// Calls the relay operator's socket.
    async fn operator(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let socket = self.admin.clone();
        let method = method.to_string();
        within(
            "the operator's call",
            tokio::task::spawn_blocking(move || {
                ferry::ipc::Client::connect(&socket)
                    .expect("operator socket")
                    .call(&method, params)
                    .expect("operator call")
            }),
        )
        .await
        .expect("operator task")
    }

    /// A fresh enrolment code for the test's account.
    async fn code(&self) -> Credential {
        let code = self
            .operator("enrol", serde_json::json!({ "account": SPACE }))
            .await;
        Credential::Enrol(Secret::new(code["code"].as_str().expect("code")))
    }

    async fn connect(&self) -> quinn::Connection {
        install_crypto_provider();
        let endpoint = client_endpoint(self.addr).expect("client endpoint");
        within(
            "connect",
            connect(
                &endpoint,
                self.addr,
                "localhost",
                &self.trust,
                &TransportOptions::default(),
            ),
        )
        .await
        .expect("connected")
    }

    /// A session stream on a new connection, with nothing sent yet.
    async fn session(&self) -> (quinn::Connection, FrameSender, FrameReceiver) {
        let conn = self.connect().await;
        let (tx, rx) = within("open", open_session(&conn, &TransportOptions::default()))
            .await
            .expect("session stream");
        (conn, tx, rx)
    }

    /// Writes `bytes` as they are on a new connection's session stream (finishing it when
    /// asked) and returns the stream's halves: the sending one to keep it open as long as the
    /// test needs, the receiving one for the relay's answer.
    async fn raw(&self, bytes: &[u8], finish: bool) -> (Raw, FrameReceiver) {
        let conn = self.connect().await;
        let (mut send, recv) = within("open", conn.open_bi()).await.expect("stream");
        within("write", send.write_all(bytes))
            .await
            .expect("write raw bytes");
        if finish {
            send.finish().expect("finish");
        }
        let max = TransportOptions::default().max_frame_bytes;
        ((conn, send), FrameReceiver::new(recv, max))
    }

    /// Stops the relay: each of `devices` is told it is shutting down, then leaves.
    async fn stop(self, devices: Vec<GoodDevice>) {
        let _ = self.stop.send(());
        for mut device in devices {
            match device.answer().await {
                Message::Error {
                    code: ErrorCode::ShuttingDown,
                    ..
                } => {}
                other => panic!("expected ShuttingDown, got {other:?}"),
            }
            // Dropping the device closes its connection, which the relay waits for.
        }
        let result = within("the relay to stop", self.task)
            .await
            .expect("the relay task");
        result.expect("the relay stopped cleanly");
    }
}

fn hello(key: &SigningKey) -> Message {
    Message::Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        public_key: key.verifying_key().to_bytes(),
        space: SPACE.into(),
        time_ms: 0,
    }
}

async fn send(tx: &mut FrameSender, message: &Message) {
    within("send", tx.send(message))
        .await
        .unwrap_or_else(|e| panic!("send {}: {e}", message.name()));
}

async fn recv(rx: &mut FrameReceiver) -> Message {
    match within("recv", rx.recv()).await {
        Ok(Some(message)) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The relay's session is over: its stream ends (or the connection goes) with nothing more.
async fn assert_ended(rx: &mut FrameReceiver) {
    let end = within("the end of the session", rx.recv()).await;
    assert!(
        matches!(
            end,
            Ok(None) | Err(TransportError::ConnectionLost(_) | TransportError::PeerClosed(_))
        ),
        "{end:?}"
    );
}

/// The relay's next message is an error with `code`, whose message contains `words`, and the
/// session ends after it.
async fn expect_error(rx: &mut FrameReceiver, code: ErrorCode, words: &str) {
    match recv(rx).await {
        Message::Error { code: c, message } if c == code => {
            assert!(message.contains(words), "{code:?}: {message:?}");
        }
        other => panic!("expected Error {{ {code:?} }}, got {other:?}"),
    }
    assert_ended(rx).await;
}

/// Receives the Challenge that answers a Hello.
async fn challenge(rx: &mut FrameReceiver) -> [u8; 32] {
    match recv(rx).await {
        Message::Challenge { nonce, .. } => nonce,
        other => panic!("expected a Challenge, got {other:?}"),
    }
}

/// One Automerge change, the first of a new record, so it depends on nothing.
/// A new record's first change, written by the device whose key is `key` (the relay logs only a
/// device's own changes).
fn first_change(key: &SigningKey, value: u64) -> Vec<u8> {
    use automerge::transaction::Transactable as _;
    let device = ferry_proto::session::device_id(&key.verifying_key().to_bytes());
    let actor = automerge::ActorId::try_from(device.as_str()).expect("a device id is hex");
    let mut doc = automerge::AutoCommit::new().with_actor(actor);
    doc.put(automerge::ROOT, "n", value).expect("put");
    doc.commit();
    let change = doc.get_last_local_change().expect("a change");
    change.raw_bytes().to_vec()
}

/// A device that follows the protocol, on its own connection.
struct GoodDevice {
    key: SigningKey,
    _conn: quinn::Connection,
    tx: FrameSender,
    rx: FrameReceiver,
    batch: u64,
}

impl GoodDevice {
    async fn connect(relay: &TestRelay, seed: u8) -> GoodDevice {
        GoodDevice::try_connect(relay, seed)
            .await
            .expect("the relay is not at its connection limit")
    }

    /// `None` when the relay is at its connection limit.
    async fn try_connect(relay: &TestRelay, seed: u8) -> Option<GoodDevice> {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let (conn, mut tx, mut rx) = relay.session().await;
        send(&mut tx, &hello(&key)).await;
        let nonce = match recv(&mut rx).await {
            Message::Challenge { nonce, .. } => nonce,
            Message::Error {
                code: ErrorCode::Overloaded,
                ..
            } => {
                conn.close(0u32.into(), b"overloaded");
                return None;
            }
            other => panic!("expected a Challenge, got {other:?}"),
        };
        let binding = channel_binding(&conn).expect("channel binding");
        let public_key = key.verifying_key().to_bytes();
        let transcript = auth_transcript(&nonce, &binding, SPACE, &public_key);
        let signature = key.sign(&transcript).to_bytes();
        let credential = relay.code().await;
        send(
            &mut tx,
            &Message::Authenticate {
                signature,
                credential,
            },
        )
        .await;
        match recv(&mut rx).await {
            Message::Welcome { .. } => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        Some(GoodDevice {
            key,
            _conn: conn,
            tx,
            rx,
            batch: 0,
        })
    }

    /// The next message that is not a push of the log (pushes may come at any time once the
    /// device has downloaded).
    async fn answer(&mut self) -> Message {
        loop {
            match recv(&mut self.rx).await {
                Message::Changes { pushed: true, .. } => {}
                other => return other,
            }
        }
    }

    /// Uploads one new change, which the relay must store at the end of the log, then downloads
    /// the log and finds it ends there. Returns that seq.
    async fn round_trip(&mut self) -> u64 {
        self.batch += 1;
        let batch = self.batch;
        let change = UploadChange {
            entry: batch,
            collection: "Doc".into(),
            record: format!("r{batch}"),
            change: first_change(&self.key, batch),
        };
        send(
            &mut self.tx,
            &Message::Upload {
                batch,
                changes: vec![change],
            },
        )
        .await;
        let seq = match self.answer().await {
            Message::UploadAck { batch: b, results } if b == batch => match results.as_slice() {
                [r] if r.entry == batch => match r.outcome {
                    ChangeOutcome::Stored { seq } => seq,
                    ref other => panic!("upload not stored: {other:?}"),
                },
                other => panic!("UploadAck results {other:?}"),
            },
            other => panic!("expected UploadAck for batch {batch}, got {other:?}"),
        };
        send(
            &mut self.tx,
            &Message::Download {
                since: 0,
                max_changes: 1000,
            },
        )
        .await;
        match self.answer().await {
            Message::Changes {
                after: 0,
                through,
                head,
                pushed: false,
                ..
            } => {
                assert_eq!((through, head), (seq, seq), "the log after storing {seq}");
            }
            other => panic!("expected the Download's Changes, got {other:?}"),
        }
        seq
    }
}

/// Runs `misbehave` against a relay while a good device is connected, and checks the good
/// device uploads and downloads before and after.
async fn with_good_device<F, Fut>(misbehave: F)
where
    F: FnOnce(TestRelay) -> Fut,
    Fut: Future<Output = TestRelay>,
{
    let relay = TestRelay::start(16).await;
    let mut good = GoodDevice::connect(&relay, 1).await;
    assert_eq!(good.round_trip().await, 1);
    let relay = misbehave(relay).await;
    assert_eq!(good.round_trip().await, 2);
    // A device that connects afterwards is served too.
    let mut late = GoodDevice::connect(&relay, 2).await;
    assert_eq!(late.round_trip().await, 3);
    relay.stop(vec![good, late]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_whose_body_is_garbage_is_malformed() {
    with_good_device(|relay| async move {
        // A valid header for 9 bytes: no flags, then bytes that decode as no message (0xff
        // starts a variant tag that never ends).
        let mut frame = 9u32.to_be_bytes().to_vec();
        frame.push(0);
        frame.extend([0xff, 0x13, 0x37, 0xff, 0xee, 0xff, 0x01, 0xff]);
        let (_raw, mut rx) = relay.raw(&frame, false).await;
        expect_error(&mut rx, ErrorCode::Malformed, "not a valid message").await;
        relay
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_ends_the_session() {
    with_good_device(|relay| async move {
        let mut frame = encode_frame(&hello(&SigningKey::from_bytes(&[3; 32]))).unwrap();
        frame.truncate(frame.len() - 5);
        let (_raw, mut rx) = relay.raw(&frame, true).await;
        assert_ended(&mut rx).await;
        relay
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_is_refused_before_any_body() {
    with_good_device(|relay| async move {
        // 2 GiB announced and not one byte of it sent: the answer cannot wait for the body.
        let (_raw, mut rx) = relay.raw(&0x8000_0000u32.to_be_bytes(), false).await;
        expect_error(&mut rx, ErrorCode::TooLarge, "2147483648 bytes").await;
        relay
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_out_of_order_are_unexpected() {
    with_good_device(|relay| async move {
        let key = SigningKey::from_bytes(&[4; 32]);

        let (_conn, mut tx, mut rx) = relay.session().await;
        let download = Message::Download {
            since: 0,
            max_changes: 10,
        };
        send(&mut tx, &download).await;
        expect_error(
            &mut rx,
            ErrorCode::UnexpectedMessage,
            "Download is not expected",
        )
        .await;

        let (_conn, mut tx, mut rx) = relay.session().await;
        send(&mut tx, &hello(&key)).await;
        challenge(&mut rx).await;
        let upload = Message::Upload {
            batch: 1,
            changes: vec![UploadChange {
                entry: 1,
                collection: "Doc".into(),
                record: "sneaky".into(),
                change: first_change(&key, 7),
            }],
        };
        send(&mut tx, &upload).await;
        expect_error(
            &mut rx,
            ErrorCode::UnexpectedMessage,
            "Upload is not expected",
        )
        .await;

        let (_conn, mut tx, mut rx) = relay.session().await;
        send(&mut tx, &hello(&key)).await;
        challenge(&mut rx).await;
        send(&mut tx, &hello(&key)).await;
        expect_error(
            &mut rx,
            ErrorCode::UnexpectedMessage,
            "Hello is not expected",
        )
        .await;
        relay
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_signature_fails_authentication() {
    with_good_device(|relay| async move {
        let (_conn, mut tx, mut rx) = relay.session().await;
        send(&mut tx, &hello(&SigningKey::from_bytes(&[5; 32]))).await;
        challenge(&mut rx).await;
        send(
            &mut tx,
            &Message::Authenticate {
                signature: [0; 64],
                credential: Credential::Key,
            },
        )
        .await;
        expect_error(&mut rx, ErrorCode::AuthenticationFailed, "signature").await;
        relay
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_overloaded() {
    let relay = TestRelay::start(2).await;
    let mut first = GoodDevice::connect(&relay, 1).await;
    let second = GoodDevice::connect(&relay, 2).await;

    let (extra_conn, mut tx, mut rx) = relay.session().await;
    send(&mut tx, &hello(&SigningKey::from_bytes(&[3; 32]))).await;
    expect_error(&mut rx, ErrorCode::Overloaded, "connection limit").await;
    extra_conn.close(0u32.into(), b"done");
    assert_eq!(first.round_trip().await, 1);

    // A slot comes free once a device leaves; the relay notices that on its own time.
    drop(second);
    let mut third = within("a connection slot to come free", async {
        loop {
            if let Some(device) = GoodDevice::try_connect(&relay, 4).await {
                return device;
            }
        }
    })
    .await;
    assert_eq!(third.round_trip().await, 2);
    assert_eq!(first.round_trip().await, 3);
    relay.stop(vec![first, third]).await;
}
