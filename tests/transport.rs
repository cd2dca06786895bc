//! The QUIC transport over real sockets on 127.0.0.1: the relay certificate's life on disk,
//! pinned and CA trust, the channel binding, and framing over a session stream, including what a
//! misbehaving peer's raw bytes do to the receiver.

// A test stops at the first thing that goes wrong: panicking is how it reports it.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

use ferry::transport::{
    ALPN, CERT_FILE_NAME, FrameReceiver, KEY_FILE_NAME, RelayCertificate, ServerTrust,
    TransportError, TransportOptions, accept_session, channel_binding, client_endpoint, connect,
    connect_resuming, install_crypto_provider, open_session, server_endpoint, session_store,
};
use ferry_proto::wire::{
    ErrorCode, ErrorKind, FrameError, LogEntry, Message, encode_frame, frame_length,
};
use rustls::pki_types::pem::PemObject as _;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Bound on every wait; the tests never measure time, they only refuse to hang.
const LIMIT: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {LIMIT:?}"))
}

struct Relay {
    dir: tempfile::TempDir,
    cert: RelayCertificate,
    addr: SocketAddr,
    /// Connections whose handshake completed, in order.
    accepted: mpsc::UnboundedReceiver<quinn::Connection>,
    _endpoint: quinn::Endpoint,
}

impl Relay {
    fn start() -> Relay {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let cert = RelayCertificate::load_or_create(dir.path(), &[]).unwrap();
        let endpoint = server_endpoint(
            "127.0.0.1:0".parse().unwrap(),
            &cert,
            &TransportOptions::default(),
        )
        .unwrap();
        let addr = endpoint.local_addr().unwrap();
        let (tx, accepted) = mpsc::unbounded_channel();
        let server = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    // Refused handshakes are what several tests provoke: only completed ones
                    // are handed on.
                    if let Ok(conn) = incoming.await {
                        let _ = tx.send(conn);
                    }
                });
            }
        });
        Relay {
            dir,
            cert,
            addr,
            accepted,
            _endpoint: endpoint,
        }
    }

    fn pinned(&self) -> ServerTrust {
        ServerTrust::Pinned(self.cert.fingerprint())
    }

    async fn connect(&self, trust: &ServerTrust) -> Result<quinn::Connection, TransportError> {
        let endpoint = client_endpoint(self.addr).unwrap();
        within(
            "connect",
            connect(
                &endpoint,
                self.addr,
                "localhost",
                trust,
                &TransportOptions::default(),
            ),
        )
        .await
    }

    async fn next_accepted(&mut self) -> quinn::Connection {
        within("accept", self.accepted.recv())
            .await
            .expect("the accept loop ended")
    }
}

fn big_changes() -> Message {
    let entries: Vec<LogEntry> = (1..=4000)
        .map(|seq| LogEntry {
            seq,
            collection: "Customer".into(),
            record: format!("customer-{seq:06}"),
            change: format!(
                "{{\"name\":\"Customer {seq}\",\"city\":\"Lisbon\",\"note\":\"{}\"}}",
                "x".repeat(200)
            )
            .into_bytes(),
        })
        .collect();
    Message::Changes {
        after: 0,
        through: 4000,
        head: 4000,
        pushed: false,
        entries,
    }
}

#[test]
fn certificate_is_created_once_then_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let names = vec!["relay.example".to_owned(), "10.0.0.7".to_owned()];
    let first = RelayCertificate::load_or_create(dir.path(), &names).unwrap();
    let key_path = dir.path().join(KEY_FILE_NAME);
    let cert_path = dir.path().join(CERT_FILE_NAME);
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let cert_pem = std::fs::read(&cert_path).unwrap();

    let again = RelayCertificate::load_or_create(dir.path(), &names).unwrap();
    assert_eq!(again.fingerprint(), first.fingerprint());
    assert_eq!(std::fs::read(&cert_path).unwrap(), cert_pem);
    let from_files = RelayCertificate::from_pem_files(&cert_path, &key_path).unwrap();
    assert_eq!(from_files.fingerprint(), first.fingerprint());

    // A key others can read is refused rather than served.
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = RelayCertificate::load_or_create(dir.path(), &names).unwrap_err();
    assert!(matches!(err, TransportError::KeyExposed { .. }), "{err}");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A key that does not belong to the certificate.
    let other = tempfile::tempdir().unwrap();
    RelayCertificate::load_or_create(other.path(), &[]).unwrap();
    let err = RelayCertificate::from_pem_files(&cert_path, &other.path().join(KEY_FILE_NAME))
        .unwrap_err();
    assert!(
        matches!(err, TransportError::CertificateInvalid { .. }),
        "{err}"
    );
    let err = RelayCertificate::from_pem_files(&key_path, &key_path).unwrap_err();
    assert!(
        matches!(&err, TransportError::CertificateInvalid { path, .. } if path == &key_path),
        "{err}"
    );
    let err =
        RelayCertificate::from_pem_files(&dir.path().join("absent.pem"), &key_path).unwrap_err();
    assert!(matches!(err, TransportError::CertificateIo { .. }), "{err}");

    // Creation that stopped before the certificate was in place starts over.
    std::fs::remove_file(&cert_path).unwrap();
    let fresh = RelayCertificate::load_or_create(dir.path(), &names).unwrap();
    assert_ne!(fresh.fingerprint(), first.fingerprint());

    let err = RelayCertificate::load_or_create(
        tempfile::tempdir().unwrap().path(),
        &["relé.example".to_owned()],
    )
    .unwrap_err();
    assert!(
        matches!(err, TransportError::CertificateGeneration { .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_session_carries_frames_both_ways() {
    let mut relay = Relay::start();
    let client = relay.connect(&relay.pinned()).await.unwrap();
    let server = relay.next_accepted().await;
    let opts = TransportOptions::default();

    let echo = tokio::spawn(async move {
        let (mut tx, mut rx) = accept_session(&server, &TransportOptions::default()).await?;
        while let Some(msg) = rx.recv().await? {
            tx.send(&msg).await?;
        }
        tx.finish()?;
        // Keeps the connection open until the client has read everything and closed it.
        server.closed().await;
        Ok::<_, TransportError>(())
    });

    let big = big_changes();
    let frame = encode_frame(&big).unwrap();
    assert!(frame.len() < 1 << 20, "big message not compressed");
    assert_eq!(frame[4] & 1, 1, "big message not compressed");
    assert!(postcard::to_stdvec(&big).unwrap().len() >= 1 << 20);
    let messages = vec![
        Message::Hello {
            min_version: 1,
            max_version: 1,
            public_key: [7; 32],
            space: "shop".into(),
            time_ms: 1_700_000_000_000,
        },
        Message::Download {
            since: 0,
            max_changes: 500,
        },
        big,
        Message::Error {
            code: ErrorCode::ShuttingDown,
            message: "bye".into(),
        },
    ];
    let (mut tx, mut rx) = within("open", open_session(&client, &opts)).await.unwrap();
    for msg in &messages {
        within("send", tx.send(msg)).await.unwrap();
        let back = within("echo", rx.recv()).await.unwrap();
        assert_eq!(back.as_ref(), Some(msg));
    }
    tx.finish().unwrap();
    assert_eq!(within("end", rx.recv()).await.unwrap(), None);
    client.close(0u32.into(), b"done");
    within("echo task", echo).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_and_ca_file_trust() {
    let relay = Relay::start();
    let wrong = "sha256:".to_owned() + &"ab".repeat(32);
    let err = relay
        .connect(&ServerTrust::Pinned(wrong.parse().unwrap()))
        .await
        .unwrap_err();
    match &err {
        TransportError::FingerprintMismatch { expected, actual } => {
            assert_eq!(expected.to_string(), "ab:".repeat(31) + "ab");
            assert_eq!(*actual, relay.cert.fingerprint());
        }
        other => panic!("expected a fingerprint mismatch, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Authentication);

    let ca = ServerTrust::CaFile(relay.dir.path().join(CERT_FILE_NAME));
    relay.connect(&ca).await.unwrap();

    let endpoint = client_endpoint(relay.addr).unwrap();
    let opts = TransportOptions::default();
    let err = within(
        "connect",
        connect(&endpoint, relay.addr, "other.example", &ca, &opts),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Authentication);

    let err = relay
        .connect(&ServerTrust::CaFile(relay.dir.path().join(KEY_FILE_NAME)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::CertificateInvalid { .. }),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_speaking_another_protocol_is_refused() {
    let relay = Relay::start();
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(relay.dir.path().join(CERT_FILE_NAME)).unwrap();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"other/1".to_vec()];
    assert_ne!(tls.alpn_protocols[0], ALPN);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let endpoint = client_endpoint(relay.addr).unwrap();
    let connecting = endpoint
        .connect_with(
            quinn::ClientConfig::new(Arc::new(quic)),
            relay.addr,
            "localhost",
        )
        .unwrap();
    match within("connect", connecting).await {
        Err(quinn::ConnectionError::ConnectionClosed(close)) => {
            // TLS alert 120, no_application_protocol, as a QUIC crypto error.
            assert_eq!(u64::from(close.error_code), 0x100 + 120, "{close}");
        }
        other => panic!("expected the relay to refuse the handshake, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_binding_is_shared_by_both_ends_and_unique_per_connection() {
    let mut relay = Relay::start();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let client = relay.connect(&relay.pinned()).await.unwrap();
        let server = relay.next_accepted().await;
        let ours = channel_binding(&client).unwrap();
        assert_eq!(ours, channel_binding(&server).unwrap());
        seen.push(ours);
    }
    assert_ne!(seen[0], seen[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_a_silent_address_times_out() {
    install_crypto_provider();
    // Holds the port so nothing else answers on it; it never replies.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let opts = TransportOptions {
        idle_timeout: Duration::from_millis(300),
        ..TransportOptions::default()
    };
    let trust = ServerTrust::Pinned("00".repeat(32).parse().unwrap());
    let endpoint = client_endpoint(addr).unwrap();
    let err = within(
        "connect",
        connect(&endpoint, addr, "localhost", &trust, &opts),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, TransportError::ConnectTimeout { addr: a } if a == addr),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Timeout);
    let err = within(
        "connect",
        connect(&endpoint, addr, "bad name!", &trust, &opts),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, TransportError::InvalidServerName(_)),
        "{err:?}"
    );
}

/// Writes `bytes` raw on a fresh session stream (then finishes it if asked) and returns what the
/// relay's receiver makes of them, with a frame limit of `max`.
async fn receive_raw(
    relay: &mut Relay,
    bytes: &[u8],
    finish: bool,
    max: usize,
) -> Vec<Result<Option<Message>, TransportError>> {
    let client = relay.connect(&relay.pinned()).await.unwrap();
    let (mut send, _recv) = within("open", client.open_bi()).await.unwrap();
    send.write_all(bytes).await.unwrap();
    if finish {
        send.finish().unwrap();
    }
    let server = relay.next_accepted().await;
    let (_tx, recv) = within("accept", server.accept_bi()).await.unwrap();
    let mut rx = FrameReceiver::new(recv, max);
    let mut results = Vec::new();
    // Reads until the first error or the end of the stream.
    loop {
        let result = within("recv", rx.recv()).await;
        let done = !matches!(result, Ok(Some(_)));
        results.push(result);
        if done {
            return results;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_handles_raw_bytes_from_a_misbehaving_peer() {
    let mut relay = Relay::start();
    let max = TransportOptions::default().max_frame_bytes;

    // Announces 2 GiB and sends nothing more: the error must come without waiting for a body.
    let huge = 0x8000_0000u32.to_be_bytes();
    let results = receive_raw(&mut relay, &huge, false, max).await;
    assert!(
        matches!(
            results.as_slice(),
            [Err(TransportError::Frame(FrameError::TooLarge { len: 0x8000_0000, max: m }))] if *m == max
        ),
        "{results:?}"
    );

    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[0; 10]);
    let results = receive_raw(&mut relay, &truncated, true, max).await;
    assert!(
        matches!(
            results.as_slice(),
            [Err(TransportError::Truncated {
                expected: 100,
                got: 10
            })]
        ),
        "{results:?}"
    );

    let results = receive_raw(&mut relay, &[0, 0], true, max).await;
    assert!(
        matches!(
            results.as_slice(),
            [Err(TransportError::Truncated {
                expected: 4,
                got: 2
            })]
        ),
        "{results:?}"
    );

    let garbage = [0, 0, 0, 3, 0, 0xff, 0xff];
    let results = receive_raw(&mut relay, &garbage, true, max).await;
    match results.as_slice() {
        [Err(e @ TransportError::Frame(f))] => {
            assert_eq!(f.code(), ErrorCode::Malformed, "{f}");
            assert_eq!(e.kind(), ErrorKind::Validation);
        }
        other => panic!("expected a malformed frame, got {other:?}"),
    }

    let results = receive_raw(&mut relay, &[0, 0, 0, 0], true, max).await;
    assert!(
        matches!(
            results.as_slice(),
            [Err(TransportError::Frame(FrameError::Empty))]
        ),
        "{results:?}"
    );

    // Two whole frames, then a clean finish.
    let first = Message::Download {
        since: 3,
        max_changes: 10,
    };
    let second = Message::Authenticate {
        signature: [1; 64],
        credential: ferry_proto::wire::Credential::Key,
    };
    let mut two = encode_frame(&first).unwrap();
    two.extend(encode_frame(&second).unwrap());
    let results = receive_raw(&mut relay, &two, true, max).await;
    assert!(
        matches!(
            results.as_slice(),
            [Ok(Some(a)), Ok(Some(b)), Ok(None)] if *a == first && *b == second
        ),
        "{results:?}"
    );

    let results = receive_raw(&mut relay, &[], true, max).await;
    assert!(matches!(results.as_slice(), [Ok(None)]), "{results:?}");

    // The limit the receiver was given applies, not the sender's idea of it.
    let frame = encode_frame(&first).unwrap();
    let len = frame_length(frame[..4].try_into().unwrap(), usize::MAX).unwrap();
    let results = receive_raw(&mut relay, &frame, true, len - 1).await;
    assert!(
        matches!(
            results.as_slice(),
            [Err(TransportError::Frame(FrameError::TooLarge { .. }))]
        ),
        "{results:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_refuses_a_frame_over_its_limit_and_stays_usable() {
    let mut relay = Relay::start();
    let client = relay.connect(&relay.pinned()).await.unwrap();
    let small = TransportOptions {
        max_frame_bytes: 1024,
        ..TransportOptions::default()
    };
    let (mut tx, _rx) = within("open", open_session(&client, &small)).await.unwrap();
    let err = within("send", tx.send(&big_changes())).await.unwrap_err();
    match &err {
        TransportError::FrameTooLarge { len, max } => {
            assert_eq!(*max, 1024);
            assert!(*len > 1024);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    let hello = Message::Download {
        since: 1,
        max_changes: 1,
    };
    within("send", tx.send(&hello)).await.unwrap();
    tx.finish().unwrap();

    let server = relay.next_accepted().await;
    let (_tx, mut rx) = within("accept", accept_session(&server, &small))
        .await
        .unwrap();
    assert_eq!(within("recv", rx.recv()).await.unwrap(), Some(hello));
    assert_eq!(within("recv", rx.recv()).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_the_pinned_certificate_without_its_key_is_refused() {
    install_crypto_provider();
    let genuine = tempfile::tempdir().unwrap();
    let cert = RelayCertificate::load_or_create(genuine.path(), &[]).unwrap();
    let impostor = tempfile::tempdir().unwrap();
    RelayCertificate::load_or_create(impostor.path(), &[]).unwrap();

    // The genuine certificate served with another key: the handshake signature cannot match.
    let chain: Vec<_> =
        rustls::pki_types::CertificateDer::pem_file_iter(genuine.path().join(CERT_FILE_NAME))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(impostor.path().join(KEY_FILE_NAME))
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signer = provider.key_provider.load_private_key(key).unwrap();
    let stolen = rustls::sign::CertifiedKey::new(chain, signer);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(stolen)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let server = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let accept = server.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accept.accept().await {
            tokio::spawn(async move {
                let _ = incoming.await;
            });
        }
    });

    let endpoint = client_endpoint(addr).unwrap();
    let trust = ServerTrust::Pinned(cert.fingerprint());
    let opts = TransportOptions::default();
    let err = within(
        "connect",
        connect(&endpoint, addr, "localhost", &trust, &opts),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::Tls(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Authentication);
}

/// A session store that counts the tickets put in and taken out.
#[derive(Debug)]
struct CountingSessions {
    inner: ferry::transport::SessionStore,
    inserted: std::sync::atomic::AtomicUsize,
    taken: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingSessions {
    fn set_kx_hint(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        group: rustls::NamedGroup,
    ) {
        self.inner.set_kx_hint(server_name, group)
    }

    fn kx_hint(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::NamedGroup> {
        self.inner.kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.inner.set_tls12_session(server_name, value)
    }

    fn tls12_session(
        &self,
        server_name: &rustls::pki_types::ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.inner.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &rustls::pki_types::ServerName<'static>) {
        self.inner.remove_tls12_session(server_name)
    }

    fn insert_tls13_ticket(
        &self,
        server_name: rustls::pki_types::ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.inserted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.insert_tls13_ticket(server_name, value)
    }

    fn take_tls13_ticket(
        &self,
        server_name: &rustls::pki_types::ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        let ticket = self.inner.take_tls13_ticket(server_name);
        if ticket.is_some() {
            self.taken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        ticket
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_offers_the_session_the_relay_issued_on_the_last_connection() {
    use std::sync::atomic::Ordering::SeqCst;
    let relay = Relay::start();
    let counting = Arc::new(CountingSessions {
        inner: session_store(),
        inserted: Default::default(),
        taken: Default::default(),
    });
    let sessions: ferry::transport::SessionStore = counting.clone();
    let endpoint = client_endpoint(relay.addr).unwrap();
    let options = TransportOptions::default();
    let trust = relay.pinned();
    let connect = || {
        connect_resuming(
            &endpoint,
            relay.addr,
            "localhost",
            &trust,
            &options,
            &sessions,
        )
    };
    let first = within("connect", connect()).await.unwrap();
    assert_eq!(counting.taken.load(SeqCst), 0, "nothing to resume yet");
    // The relay's tickets come after the handshake.
    within("a session ticket", async {
        while counting.inserted.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    first.close(0u32.into(), b"done");
    let second = within("reconnect", connect()).await.unwrap();
    assert_eq!(
        counting.taken.load(SeqCst),
        1,
        "the reconnect offered the ticket"
    );
    // The channel binding is still the connection's own.
    assert_ne!(channel_binding(&first).ok(), channel_binding(&second).ok());
}
