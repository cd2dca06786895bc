//! The QUIC transport between daemons and the relay: endpoints, the relay's certificate, how a
//! daemon trusts the relay (a pinned fingerprint or a CA file), the TLS channel binding, and
//! [`ferry_proto::wire`] frames carried over one bidirectional stream per session.
//!
//! TLS 1.3 only, ALPN `ferry/1`, the ring crypto provider.
//!
//! Must not touch: the session state machines (what the frames mean), the store, the data
//! directory layout beyond the two certificate files it is told to keep.

use crate::config::Congestion;
use crate::metrics::Counter;
use ferry_proto::wire::{
    ErrorKind, FRAME_HEADER_BYTES, FrameError, Message, decode_frame_body, encode_frame,
    frame_length,
};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest as _;
use std::fmt;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The application protocol both ends must offer; a peer speaking anything else is refused
/// during the handshake.
pub const ALPN: &[u8] = b"ferry/1";
/// File names of the relay's self-signed certificate and key inside its directory.
pub const CERT_FILE_NAME: &str = "relay-cert.pem";
pub const KEY_FILE_NAME: &str = "relay-key.pem";
/// TLS exporter label for [`channel_binding`].
const CHANNEL_BINDING_LABEL: &[u8] = b"EXPORTER-ferry-sync-auth";
/// The frame length field; the length it holds counts the flags byte and the body.
const LENGTH_PREFIX_BYTES: usize = FRAME_HEADER_BYTES - 1;
/// A session is one bidirectional stream opened by the daemon.
const SESSION_STREAMS: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot listen on UDP {addr}: {source}: pick a free port or another address")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot read or write {path}: {source}: check that the directory exists and this user may write it"
    )]
    CertificateIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not usable: {reason}: replace it with a valid PEM file")]
    CertificateInvalid { path: PathBuf, reason: String },
    #[error("relay key {path} is readable by other users (mode {mode:o}): run `chmod 600 {path}`")]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("cannot create a certificate for {names:?}: {reason}: give DNS names or IP addresses")]
    CertificateGeneration { names: Vec<String>, reason: String },
    #[error(
        "the relay's certificate has fingerprint {actual}, not the pinned {expected}: if the relay's \
         certificate was replaced on purpose, pin the new fingerprint; otherwise something is \
         intercepting the connection"
    )]
    FingerprintMismatch {
        expected: Fingerprint,
        actual: Fingerprint,
    },
    #[error("TLS failed: {0}: check the relay's certificate and the trust settings")]
    Tls(String),
    #[error("{0:?} is not a valid server name: give a DNS name or an IP address")]
    InvalidServerName(String),
    #[error(
        "cannot connect to the relay at {addr}: {reason}: check the relay address and that the relay runs"
    )]
    Connect { addr: SocketAddr, reason: String },
    #[error("no answer from the relay at {addr}: check the relay address and that the relay runs")]
    ConnectTimeout { addr: SocketAddr },
    #[error("the peer stopped answering (idle timeout): reconnect when the network is back")]
    TimedOut,
    #[error("connection lost: {0}: reconnect")]
    ConnectionLost(String),
    /// The peer ended the session on purpose (finished its stream, or closed the connection
    /// with code 0): not a failure.
    #[error("the session was closed: {0}")]
    PeerClosed(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("message of {len} bytes is over the frame limit of {max}: send smaller batches")]
    FrameTooLarge { len: usize, max: usize },
    #[error(
        "the peer ended the stream inside a frame ({got} of {expected} bytes): the session is broken"
    )]
    Truncated { expected: usize, got: usize },
}

impl TransportError {
    /// The class of failure, so the daemon can tell a bad pin from a down network.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TransportError::Bind { .. }
            | TransportError::InvalidServerName(_)
            | TransportError::Connect { .. }
            | TransportError::ConnectionLost(_)
            | TransportError::PeerClosed(_) => ErrorKind::Network,
            // Certificate and trust files decide whom a connection trusts.
            TransportError::CertificateIo { .. }
            | TransportError::CertificateInvalid { .. }
            | TransportError::KeyExposed { .. }
            | TransportError::CertificateGeneration { .. }
            | TransportError::FingerprintMismatch { .. }
            | TransportError::Tls(_) => ErrorKind::Authentication,
            TransportError::ConnectTimeout { .. } | TransportError::TimedOut => ErrorKind::Timeout,
            TransportError::Frame(e) => e.code().kind(),
            TransportError::FrameTooLarge { .. } | TransportError::Truncated { .. } => {
                ErrorKind::Validation
            }
        }
    }

    fn from_connection(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::TimedOut => TransportError::TimedOut,
            quinn::ConnectionError::ApplicationClosed(ref close)
                if close.error_code == quinn::VarInt::from_u32(0) =>
            {
                TransportError::PeerClosed(e.to_string())
            }
            other => TransportError::ConnectionLost(other.to_string()),
        }
    }

    /// During the handshake the same QUIC errors mean something else: nobody answered, or the
    /// TLS layer refused.
    fn from_handshake(e: quinn::ConnectionError, addr: SocketAddr) -> Self {
        let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
        match e {
            quinn::ConnectionError::TimedOut => TransportError::ConnectTimeout { addr },
            quinn::ConnectionError::TransportError(ref t) if crypto(t.code) => {
                TransportError::Tls(e.to_string())
            }
            quinn::ConnectionError::ConnectionClosed(ref c) if crypto(c.error_code) => {
                TransportError::Tls(format!("the relay refused the handshake: {c}"))
            }
            other => TransportError::Connect {
                addr,
                reason: other.to_string(),
            },
        }
    }

    fn from_read(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => TransportError::from_connection(c),
            other => TransportError::ConnectionLost(other.to_string()),
        }
    }

    fn from_write(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => TransportError::from_connection(c),
            other => TransportError::ConnectionLost(other.to_string()),
        }
    }
}

/// Installs ring as the process's default rustls provider. Everything in this module names its
/// provider explicitly; this is for other rustls users in the process, which would otherwise
/// panic when more than one provider is compiled in. Calling it again does nothing.
pub fn install_crypto_provider() {
    // Err only means a provider is already installed, which is all this function wants.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of a certificate's DER bytes: what a daemon pins to trust a self-signed relay.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of_certificate(der: &[u8]) -> Self {
        Fingerprint(sha2::Sha256::digest(der).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(":")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a certificate fingerprint: expected 64 hex digits (SHA-256), optionally with \
     colons between bytes and a `sha256:` prefix, as `ferry relay` prints it"
)]
pub struct FingerprintParseError(String);

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || FingerprintParseError(s.to_owned());
        let trimmed = s.trim();
        let hex = trimmed
            .get(..7)
            .zip(trimmed.get(7..))
            .filter(|(prefix, _)| prefix.eq_ignore_ascii_case("sha256:"))
            .map_or(trimmed, |(_, rest)| rest);
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(invalid());
        }
        // Colons are only allowed between bytes, all of them or none, so a typo that drops or
        // doubles a digit cannot shift the pairs and still parse.
        let colons = hex.len() - digits.len();
        let well_placed = colons == 0
            || (colons == 31
                && hex
                    .as_bytes()
                    .chunks(3)
                    .all(|c| c.len() == 2 || c.get(2) == Some(&b':')));
        if digits.len() != 64 || !well_placed {
            return Err(invalid());
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
            let text = std::str::from_utf8(pair).map_err(|_| invalid())?;
            *byte = u8::from_str_radix(text, 16).map_err(|_| invalid())?;
        }
        Ok(Fingerprint(out))
    }
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The relay's certificate chain and private key, checked to belong together.
#[derive(Debug, Clone)]
pub struct RelayCertificate {
    key: Arc<CertifiedKey>,
    fingerprint: Fingerprint,
    /// Keys the relay's stateless resets and its connection ids; derived from the private key so
    /// that they are the same after a restart.
    reset_key: ring::hmac::Key,
    connection_id_key: u64,
}

impl RelayCertificate {
    /// Loads `relay-cert.pem` and `relay-key.pem` from `dir`, creating a self-signed pair for
    /// `names` (DNS names or IP addresses; `localhost`, 127.0.0.1 and ::1 when empty) the first
    /// time. The certificate is renamed into place last, so a start interrupted while creating
    /// leaves no certificate and the next start creates both again. A key file that other
    /// users can read is refused.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, TransportError> {
        let cert_path = dir.join(CERT_FILE_NAME);
        let key_path = dir.join(KEY_FILE_NAME);
        if !cert_path
            .try_exists()
            .map_err(|source| TransportError::CertificateIo {
                path: cert_path.clone(),
                source,
            })?
        {
            let (cert, key) = Self::generate_pem(names)?;
            write_atomically(&key_path, key.as_bytes())?;
            write_atomically(&cert_path, cert.as_bytes())?;
        }
        let mode = std::fs::metadata(&key_path)
            .map_err(|source| TransportError::CertificateIo {
                path: key_path.clone(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(TransportError::KeyExposed {
                path: key_path,
                mode,
            });
        }
        Self::from_pem_files(&cert_path, &key_path)
    }

    /// A new self-signed certificate for `names` (`localhost`, 127.0.0.1 and ::1 when empty)
    /// and its key, PEM: (certificate, key).
    pub fn generate_pem(names: &[String]) -> Result<(String, String), TransportError> {
        let names = if names.is_empty() {
            vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
        } else {
            names.to_vec()
        };
        let generated = rcgen::generate_simple_self_signed(names.clone()).map_err(|e| {
            TransportError::CertificateGeneration {
                names,
                reason: e.to_string(),
            }
        })?;
        Ok((generated.cert.pem(), generated.signing_key.serialize_pem()))
    }

    /// A certificate chain (leaf first) and its key from PEM files, as a CA such as Let's
    /// Encrypt issues them.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TransportError> {
        Self::from_pem(&read_file(cert)?, cert, &read_file(key)?, key)
    }

    /// A certificate chain (leaf first) and its key, PEM, read from `cert` and `key` (what
    /// errors name).
    pub fn from_pem(
        cert_pem: &[u8],
        cert: &Path,
        key_pem: &[u8],
        key: &Path,
    ) -> Result<Self, TransportError> {
        let invalid = |path: &Path, reason: String| TransportError::CertificateInvalid {
            path: path.to_owned(),
            reason,
        };
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(cert, e.to_string()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| invalid(cert, "no CERTIFICATE block found".into()))?;
        let fingerprint = Fingerprint::of_certificate(leaf);
        let key_der =
            PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid(key, e.to_string()))?;
        let derive = |label: &[u8]| {
            sha2::Sha256::new()
                .chain_update(label)
                .chain_update(key_der.secret_der())
                .finalize()
        };
        let reset_secret = derive(b"ferry stateless reset v1\0");
        let connection_ids: [u8; 32] = derive(b"ferry connection ids v1\0").into();
        let connection_id_key = connection_ids
            .first_chunk::<8>()
            .copied()
            .unwrap_or_default();
        let certified = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
            invalid(
                key,
                format!(
                    "{e} (the key must be the one {} was issued for)",
                    cert.display()
                ),
            )
        })?;
        Ok(RelayCertificate {
            key: Arc::new(certified),
            fingerprint,
            reset_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_secret),
            connection_id_key: u64::from_le_bytes(connection_id_key),
        })
    }

    /// The fingerprint of the leaf certificate, for daemons to pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::CertificateIo {
        path: path.to_owned(),
        source,
    })
}

/// Writes a file readable only by its owner, through a temporary file and a rename, so no reader
/// ever sees half of it.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), TransportError> {
    let tmp = path.with_extension("pem.tmp");
    let io = |source| TransportError::CertificateIo {
        path: path.to_owned(),
        source,
    };
    // A temporary file left by an interrupted start holds nothing anyone relies on.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(parent) = path.parent() {
        // The rename is durable only once the directory entry is.
        std::fs::File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// Limits and timers of the QUIC connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// How many connections the relay serves at once; its accept loop refuses the rest.
    pub max_concurrent_connections: usize,
    /// A connection with no traffic for this long is closed (also bounds the handshake).
    pub idle_timeout: Duration,
    /// How often an otherwise quiet connection is pinged so it does not reach the idle timeout.
    pub keep_alive: Duration,
    /// The largest frame either side sends or accepts.
    pub max_frame_bytes: usize,
    /// The congestion controller for what this side sends.
    pub congestion: Congestion,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            max_concurrent_connections: 1024,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            max_frame_bytes: 8 << 20,
            congestion: Congestion::default(),
        }
    }
}

fn transport_config(opts: &TransportOptions, bidi_streams: u32) -> Arc<quinn::TransportConfig> {
    // Only timeouts beyond 2^62 ms fail to convert: QUIC's longest is as good as "forever".
    let idle = quinn::IdleTimeout::try_from(opts.idle_timeout)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::MAX));
    let mut config = quinn::TransportConfig::default();
    config
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(opts.keep_alive))
        .max_concurrent_bidi_streams(bidi_streams.into())
        .max_concurrent_uni_streams(0u32.into());
    let controller: Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> =
        match opts.congestion {
            Congestion::Cubic => Arc::new(quinn::congestion::CubicConfig::default()),
            Congestion::Bbr => Arc::new(quinn::congestion::BbrConfig::default()),
            Congestion::NewReno => Arc::new(quinn::congestion::NewRenoConfig::default()),
        };
    config.congestion_controller_factory(controller);
    Arc::new(config)
}

/// The TLS configuration of the relay's HTTPS API: TLS 1.3 only, the relay's certificate (the
/// one devices pin), HTTP/2 or HTTP/1.1.
pub fn https_server_config(
    cert: &RelayCertificate,
) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.key.clone())));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// A TLS 1.3 client configuration that trusts the relay as `trust` says, without an ALPN (for
/// HTTPS clients of the relay's API: tests, tools).
pub fn client_tls(trust: &ServerTrust) -> Result<rustls::ClientConfig, TransportError> {
    client_rustls(trust, &Arc::new(OnceLock::new()))
}

/// A relay endpoint listening on `addr` with `cert`.
pub fn server_endpoint(
    addr: SocketAddr,
    cert: &RelayCertificate,
    opts: &TransportOptions,
) -> Result<quinn::Endpoint, TransportError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.key.clone())));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport_config(opts, SESSION_STREAMS));
    // A relay killed and started again answers packets of its previous connections with a
    // stateless reset only if it still recognises their connection ids, and the daemons accept
    // the reset only if it is keyed as before. With quinn's random keys per start they would
    // hold dead connections until their idle timeout.
    let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(cert.reset_key.clone()));
    let connection_id_key = cert.connection_id_key;
    endpoint_config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(
            connection_id_key,
        ))
    });
    let bind = |source| TransportError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind(std::io::Error::other("no tokio runtime is running")))?;
    quinn::Endpoint::new(endpoint_config, Some(config), socket, runtime).map_err(bind)
}

/// A daemon endpoint on an ephemeral port of the same address family as `server_addr`.
pub fn client_endpoint(server_addr: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    let addr = match server_addr {
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    };
    quinn::Endpoint::client(addr).map_err(|source| TransportError::Bind { addr, source })
}

/// How a daemon decides that it talks to its relay.
///
/// There is no system-roots option: the platform verifier is not built in. For a relay with a
/// publicly issued certificate, point [`ServerTrust::CaFile`] at the system's CA bundle (for
/// example `/etc/ssl/certs/ca-certificates.crt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// Accept exactly the certificate with this SHA-256 fingerprint, whatever its names and
    /// dates: for a relay with a self-signed certificate.
    Pinned(Fingerprint),
    /// Accept certificates that chain to a root in this PEM file and name the server.
    CaFile(PathBuf),
}

/// Accepts the one pinned certificate. The handshake signature is still checked, so the relay
/// must hold the certificate's key, not merely present a copy of the certificate.
#[derive(Debug)]
struct PinnedVerifier {
    expected: Fingerprint,
    /// Where a mismatch is left for [`connect`] to report; rustls errors cannot carry it.
    mismatch: Arc<OnceLock<Fingerprint>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = Fingerprint::of_certificate(end_entity);
        if actual == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            // Only the first value matters: one verifier serves one handshake.
            let _ = self.mismatch.set(actual);
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_rustls(
    trust: &ServerTrust,
    mismatch: &Arc<OnceLock<Fingerprint>>,
) -> Result<rustls::ClientConfig, TransportError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let tls = match trust {
        ServerTrust::Pinned(expected) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                expected: *expected,
                mismatch: mismatch.clone(),
                provider,
            }))
            .with_no_client_auth(),
        ServerTrust::CaFile(path) => {
            let pem = read_file(path)?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| TransportError::CertificateInvalid {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                roots
                    .add(cert)
                    .map_err(|e| TransportError::CertificateInvalid {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
            }
            if roots.is_empty() {
                return Err(TransportError::CertificateInvalid {
                    path: path.clone(),
                    reason: "no CERTIFICATE block found".into(),
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(tls)
}

/// The TLS sessions a daemon keeps between its connections to the relay: a reconnect resumes
/// one (no certificate sent or checked again, fewer bytes and less work on a slow link) where
/// the relay still knows it, and falls back to a full handshake where it does not.
pub type SessionStore = Arc<dyn rustls::client::ClientSessionStore>;

/// An empty [`SessionStore`] for one process's connections to its relay.
pub fn session_store() -> SessionStore {
    // One relay per daemon; a few tickets cover reconnects that overlap.
    Arc::new(rustls::client::ClientSessionMemoryCache::new(8))
}

fn client_config(
    trust: &ServerTrust,
    opts: &TransportOptions,
    mismatch: &Arc<OnceLock<Fingerprint>>,
    sessions: &SessionStore,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = client_rustls(trust, mismatch)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::store(sessions.clone());
    // No 0-RTT: early data can be replayed by anyone on the path, and an upload is not
    // idempotent. A resumed connection still waits for the handshake, and its channel binding
    // (a TLS exporter) is its own.
    tls.enable_early_data = false;
    let quic = QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    // The relay never opens streams towards a daemon.
    config.transport_config(transport_config(opts, 0));
    Ok(config)
}

/// Connects to the relay at `addr` and completes the TLS handshake. `server_name` is checked
/// against the certificate under [`ServerTrust::CaFile`] and only sent as SNI when pinned.
/// Nothing is resumed: see [`connect_resuming`].
pub async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    trust: &ServerTrust,
    opts: &TransportOptions,
) -> Result<quinn::Connection, TransportError> {
    connect_resuming(endpoint, addr, server_name, trust, opts, &session_store()).await
}

/// [`connect`], resuming a TLS session from `sessions` when the relay still holds it, and
/// keeping the session this connection makes there for the next one.
pub async fn connect_resuming(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    trust: &ServerTrust,
    opts: &TransportOptions,
    sessions: &SessionStore,
) -> Result<quinn::Connection, TransportError> {
    let mismatch = Arc::new(OnceLock::new());
    let config = client_config(trust, opts, &mismatch, sessions)?;
    let connecting = endpoint
        .connect_with(config, addr, server_name)
        .map_err(|e| match e {
            quinn::ConnectError::InvalidServerName(name) => TransportError::InvalidServerName(name),
            other => TransportError::Connect {
                addr,
                reason: other.to_string(),
            },
        })?;
    connecting.await.map_err(|e| match (trust, mismatch.get()) {
        (ServerTrust::Pinned(expected), Some(actual)) => TransportError::FingerprintMismatch {
            expected: *expected,
            actual: *actual,
        },
        _ => TransportError::from_handshake(e, addr),
    })
}

/// 32 bytes that both ends of `conn` derive from its TLS session and nobody else can: a daemon
/// signs them so its authentication is worthless on any other connection.
pub fn channel_binding(conn: &quinn::Connection) -> Result<[u8; 32], TransportError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, CHANNEL_BINDING_LABEL, b"")
        .map_err(|_| TransportError::Tls("the TLS session cannot export keying material".into()))?;
    Ok(out)
}

/// The sending half of a session: whole messages in, frames out.
#[derive(Debug)]
pub struct FrameSender {
    stream: quinn::SendStream,
    max_frame_bytes: usize,
    /// Where the bytes of each frame sent are added, if anywhere.
    sent: Option<Arc<Counter>>,
}

impl FrameSender {
    pub fn new(stream: quinn::SendStream, max_frame_bytes: usize) -> Self {
        FrameSender {
            stream,
            max_frame_bytes,
            sent: None,
        }
    }

    /// Adds the bytes of every frame sent from now on (length prefix included) to `sent`.
    pub fn count_into(&mut self, sent: Arc<Counter>) {
        self.sent = Some(sent);
    }

    /// Sends one message as one frame; a message whose frame would be over `max_frame_bytes` is
    /// refused before anything is written, and the stream stays usable.
    pub async fn send(&mut self, msg: &Message) -> Result<(), TransportError> {
        let frame = encode_frame(msg)?;
        let len = frame.len().saturating_sub(LENGTH_PREFIX_BYTES);
        if len > self.max_frame_bytes {
            return Err(TransportError::FrameTooLarge {
                len,
                max: self.max_frame_bytes,
            });
        }
        self.stream
            .write_all(&frame)
            .await
            .map_err(TransportError::from_write)?;
        if let Some(sent) = &self.sent {
            sent.inc_by(frame.len() as u64);
        }
        Ok(())
    }

    /// Tells the peer no more frames follow; its receiver then returns `Ok(None)`.
    pub fn finish(&mut self) -> Result<(), TransportError> {
        self.stream
            .finish()
            .map_err(|e| TransportError::ConnectionLost(e.to_string()))
    }
}

/// The receiving half of a session: frames in, whole messages out. After an error the stream
/// is beyond repair: end the session.
#[derive(Debug)]
pub struct FrameReceiver {
    stream: quinn::RecvStream,
    max_frame_bytes: usize,
    /// Reused for every frame body; it grows to the largest frame seen, never past the limit.
    buffer: Vec<u8>,
    /// Where the bytes of each whole frame received are added, if anywhere.
    received: Option<Arc<Counter>>,
}

/// Messages received on a session, in order; the last item is the error that ended the stream
/// (a clean finish arrives as `PeerClosed`).
pub type Received = tokio::sync::mpsc::Receiver<Result<Message, TransportError>>;

impl FrameReceiver {
    /// Reads frames on a task of their own into a channel of `capacity` messages, so that a
    /// session loop can wait on them next to timers and commands without cutting a frame in
    /// half (`recv` is not cancel-safe), and a slow loop holds back the peer through QUIC flow
    /// control rather than growing memory. `peer` names the other side in the end-of-stream error.
    pub fn into_channel(
        mut self,
        capacity: usize,
        peer: &'static str,
    ) -> (Received, tokio::task::JoinHandle<()>) {
        let (frames, received) = tokio::sync::mpsc::channel(capacity);
        let task = tokio::spawn(async move {
            loop {
                let next = match self.recv().await {
                    Ok(Some(message)) => Ok(message),
                    Ok(None) => Err(TransportError::PeerClosed(format!(
                        "the {peer} finished its stream"
                    ))),
                    Err(e) => Err(e),
                };
                let last = next.is_err();
                if frames.send(next).await.is_err() || last {
                    return;
                }
            }
        });
        (received, task)
    }

    pub fn new(stream: quinn::RecvStream, max_frame_bytes: usize) -> Self {
        FrameReceiver {
            stream,
            max_frame_bytes,
            buffer: Vec::new(),
            received: None,
        }
    }

    /// Adds the bytes of every whole frame received from now on (length prefix included) to
    /// `received`.
    pub fn count_into(&mut self, received: Arc<Counter>) {
        self.received = Some(received);
    }

    /// The next message, or `None` when the peer finished the stream between frames.
    pub async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        let mut header = [0u8; LENGTH_PREFIX_BYTES];
        match self.stream.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(quinn::ReadExactError::FinishedEarly(got)) => {
                return Err(TransportError::Truncated {
                    expected: header.len(),
                    got,
                });
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(TransportError::from_read(e)),
        }
        // Checked before a byte of the body is read or a buffer for it allocated.
        let len = frame_length(header, self.max_frame_bytes)?;
        self.buffer.clear();
        self.buffer.resize(len, 0);
        match self.stream.read_exact(&mut self.buffer).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(got)) => {
                return Err(TransportError::Truncated { expected: len, got });
            }
            Err(quinn::ReadExactError::ReadError(e)) => return Err(TransportError::from_read(e)),
        }
        if let Some(received) = &self.received {
            received.inc_by((LENGTH_PREFIX_BYTES + len) as u64);
        }
        Ok(Some(decode_frame_body(&self.buffer, self.max_frame_bytes)?))
    }
}

/// Opens the session stream on a daemon's connection. The relay sees the stream only once the
/// first frame (the daemon's `Hello`) is sent.
pub async fn open_session(
    conn: &quinn::Connection,
    opts: &TransportOptions,
) -> Result<(FrameSender, FrameReceiver), TransportError> {
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(TransportError::from_connection)?;
    Ok((
        FrameSender::new(send, opts.max_frame_bytes),
        FrameReceiver::new(recv, opts.max_frame_bytes),
    ))
}

/// Waits for the daemon to open its session stream on the relay's side of `conn`.
pub async fn accept_session(
    conn: &quinn::Connection,
    opts: &TransportOptions,
) -> Result<(FrameSender, FrameReceiver), TransportError> {
    let (send, recv) = conn
        .accept_bi()
        .await
        .map_err(TransportError::from_connection)?;
    Ok((
        FrameSender::new(send, opts.max_frame_bytes),
        FrameReceiver::new(recv, opts.max_frame_bytes),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    fn sample() -> Fingerprint {
        Fingerprint(std::array::from_fn(|i| i as u8))
    }

    #[test]
    fn fingerprint_display_and_parse_round_trip() {
        let fp = sample();
        let shown = fp.to_string();
        assert_eq!(shown.len(), 32 * 3 - 1);
        assert_eq!(shown.replace(':', ""), HEX);
        for text in [
            shown.clone(),
            HEX.to_owned(),
            HEX.to_uppercase(),
            format!("sha256:{shown}"),
            format!("SHA256:{}", shown.to_uppercase()),
            format!("  {HEX}\n"),
        ] {
            assert_eq!(text.parse::<Fingerprint>(), Ok(fp), "{text:?}");
        }
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{shown}\""));
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
        assert!(serde_json::from_str::<Fingerprint>("\"abc\"").is_err());
    }

    #[test]
    fn fingerprint_rejects_what_is_not_one() {
        let shown = sample().to_string();
        let shifted = format!("0{}", &shown[..shown.len() - 1]);
        for text in [
            "",
            "sha256:",
            &HEX[..62],
            &format!("{HEX}00"),
            &HEX.replace('0', "g"),
            &format!("md5:{HEX}"),
            &shifted,
            &shown.replacen(':', "", 1),
            &format!("{shown}:"),
            &format!("é{}", &HEX[2..]),
        ] {
            let err = text.parse::<Fingerprint>().unwrap_err();
            assert!(err.to_string().contains("64 hex digits"), "{text:?}: {err}");
        }
    }
}
