//! The link emulator (`tests/common/link.rs`) does what its profiles say: delay, a bandwidth cap
//! with a bounded queue, loss drawn from its seed, outages, reordering, duplication, and moving
//! a flow to a new source port. A UDP echo stands in for the relay.
//!
//! Only lower bounds of time are checked (a packet can never arrive before its delay); what the
//! link decided is checked against its counters and its seed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::unreachable
)]

mod common;

use common::TIMEOUT;
use common::link::{Direction, Fate, Link, PROFILES, Profile, Rng, Stats};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A UDP echo on 127.0.0.1 that remembers every source address it heard from.
struct Echo {
    addr: SocketAddr,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    socket: UdpSocket,
}

impl Echo {
    fn start() -> Echo {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let sources = Arc::new(Mutex::new(Vec::new()));
        let (theirs, seen) = (socket.try_clone().unwrap(), sources.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = theirs.recv_from(&mut buf) {
                if &buf[..n] == b"stop" {
                    return;
                }
                seen.lock().unwrap().push(from);
                let _ = theirs.send_to(&buf[..n], from);
            }
        });
        Echo {
            addr,
            sources,
            socket,
        }
    }

    fn sources(&self) -> Vec<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.socket.send_to(b"stop", self.addr);
    }
}

/// A device's socket talking to the echo through `link`.
struct Client(UdpSocket);

impl Client {
    fn new(link: &Link) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(link.addr()).unwrap();
        Client(socket)
    }

    fn send(&self, payload: &[u8]) {
        self.0.send(payload).unwrap();
    }

    /// Packets received until `quiet` passes with nothing more.
    fn drain(&self, quiet: Duration) -> Vec<Vec<u8>> {
        self.0.set_read_timeout(Some(quiet)).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = self.0.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// The next packet, or `None` after `timeout`.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.0.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 2048];
        self.0.recv(&mut buf).ok().map(|n| buf[..n].to_vec())
    }
}

fn profile(up: Direction, down: Direction) -> Profile {
    Profile {
        name: "test",
        up,
        down,
        outages: None,
    }
}

fn numbered(k: u32, len: usize) -> Vec<u8> {
    let mut p = k.to_be_bytes().to_vec();
    p.resize(len, 0);
    p
}

fn number(p: &[u8]) -> u32 {
    u32::from_be_bytes(p[..4].try_into().unwrap())
}

/// Waits until the link's counters account for `packets` packets entering it.
fn wait_accounted(link: &Link, packets: u64, counted: impl Fn(&Stats) -> u64) -> Stats {
    common::wait_for_ok("the link to account for every packet", TIMEOUT, || {
        let s = link.stats();
        if counted(&s) >= packets {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    })
}

#[test]
fn every_named_profile_exists_with_its_round_trip() {
    let rtts: Vec<u64> = PROFILES
        .iter()
        .map(|name| Profile::named(name).unwrap().rtt().as_millis() as u64)
        .collect();
    assert_eq!(rtts, [0, 20, 80, 300, 600]);
    assert_eq!(
        Profile::named("mobile").unwrap().bottleneck_bps(),
        Some(10_000_000)
    );
    assert!(Profile::named("bad-3g").unwrap().outages.is_some());
    assert!(Profile::named("dial-up").is_none());
}

#[test]
fn a_packet_takes_at_least_the_round_trip() {
    let echo = Echo::start();
    let d = Direction::delay(Duration::from_millis(40));
    let link = Link::start(echo.addr, profile(d.clone(), d), 1);
    let client = Client::new(&link);
    let sent = Instant::now();
    client.send(b"ping");
    assert_eq!(client.recv(TIMEOUT).as_deref(), Some(&b"ping"[..]));
    assert!(sent.elapsed() >= Duration::from_millis(80));
}

#[test]
fn loss_follows_the_seed() {
    let echo = Echo::start();
    let mut up = Direction::delay(Duration::ZERO);
    up.loss = 0.3;
    let down = Direction::delay(Duration::ZERO);
    let seed = 7;
    let link = Link::start(echo.addr, profile(up.clone(), down), seed);
    let client = Client::new(&link);
    let n = 200u32;
    for k in 0..n {
        client.send(&numbered(k, 32));
    }
    let stats = wait_accounted(&link, u64::from(n), |s| {
        s.lost + s.forwarded / 2 + s.forwarded % 2
    });
    // The first flow's up direction draws from the seed's stream 0, one fate per packet.
    let mut rng = Rng::new(Rng::new(seed).next_u64());
    let expected: Vec<u32> = (0..n).filter(|_| !Fate::draw(&mut rng, &up).lost).collect();
    assert_eq!(stats.lost, u64::from(n) - expected.len() as u64);
    let mut got: Vec<u32> = client
        .drain(Duration::from_millis(300))
        .iter()
        .map(|p| number(p))
        .collect();
    got.sort_unstable();
    assert_eq!(got, expected, "the packets the seed keeps, and only those");
}

#[test]
fn a_capped_link_takes_its_time_and_drops_what_its_queue_cannot_hold() {
    let echo = Echo::start();
    let mut up = Direction::delay(Duration::ZERO);
    up.rate_bps = Some(1_000_000);
    up.max_queue = Duration::from_millis(100);
    let link = Link::start(echo.addr, profile(up, Direction::delay(Duration::ZERO)), 3);
    let client = Client::new(&link);
    // 1250 bytes is 10 ms at 1 Mbit/s: five packets take at least 40 ms after the first.
    let started = Instant::now();
    for k in 0..5 {
        client.send(&numbered(k, 1250));
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(number(&client.recv(TIMEOUT).expect("a packet")));
    }
    assert!(started.elapsed() >= Duration::from_millis(40));
    assert_eq!(got, [0, 1, 2, 3, 4]);

    // 40 packets at once (few enough for the socket buffers): the queue holds 100 ms of them,
    // about 10, and the rest overflow.
    for k in 0..40 {
        client.send(&numbered(k, 1250));
    }
    let stats = wait_accounted(&link, 2 * (5 + 40), |s| s.forwarded + s.overflowed * 2);
    assert!(stats.overflowed >= 20, "{stats:?}");
    assert!(stats.overflowed <= 35, "{stats:?}");
}

#[test]
fn nothing_crosses_during_an_outage_and_everything_after_it() {
    let echo = Echo::start();
    let d = Direction::delay(Duration::ZERO);
    let link = Link::start(echo.addr, profile(d.clone(), d), 5);
    let client = Client::new(&link);
    client.send(b"before");
    assert_eq!(client.recv(TIMEOUT).as_deref(), Some(&b"before"[..]));
    let started = Instant::now();
    link.outage(Duration::from_millis(300));
    client.send(b"during");
    wait_accounted(&link, 1, |s| s.blacked_out);
    // Sent again until one gets through: the first answer comes only once the outage is over.
    let answer = common::wait_for_ok("the link to come back", TIMEOUT, || {
        client.send(b"after");
        client
            .recv(Duration::from_millis(20))
            .ok_or("no answer".to_string())
    });
    assert_eq!(answer, b"after");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(echo.sources().len() >= 2);
}

#[test]
fn a_scheduled_outage_comes_back_every_period() {
    let echo = Echo::start();
    let d = Direction::delay(Duration::ZERO);
    let mut p = profile(d.clone(), d);
    p.outages = Some(common::link::Outages {
        every: Duration::from_millis(200),
        length: Duration::from_millis(100),
    });
    let link = Link::start(echo.addr, p, 9);
    let client = Client::new(&link);
    // Probe until a packet is blacked out and another gets through after it.
    common::wait_for_ok("an outage and a recovery", TIMEOUT, || {
        client.send(b"probe");
        let _ = client.recv(Duration::from_millis(5));
        let s = link.stats();
        (s.blacked_out > 0 && s.forwarded > 2)
            .then_some(())
            .ok_or(format!("{s:?}"))
    });
}

#[test]
fn duplicated_packets_arrive_twice_and_reordered_ones_are_overtaken() {
    let echo = Echo::start();
    let mut up = Direction::delay(Duration::from_millis(20));
    up.duplicate = 1.0;
    let link = Link::start(echo.addr, profile(up, Direction::delay(Duration::ZERO)), 11);
    let client = Client::new(&link);
    for k in 0..10 {
        client.send(&numbered(k, 16));
    }
    let got: Vec<u32> = client
        .drain(Duration::from_millis(300))
        .iter()
        .map(|p| number(p))
        .collect();
    assert_eq!(got.len(), 20);
    assert_eq!(link.stats().duplicated, 10);

    let mut up = Direction::delay(Duration::from_millis(40));
    up.reorder = 0.3;
    let link = Link::start(echo.addr, profile(up, Direction::delay(Duration::ZERO)), 12);
    let client = Client::new(&link);
    for k in 0..50 {
        client.send(&numbered(k, 16));
    }
    let got: Vec<u32> = client
        .drain(Duration::from_millis(400))
        .iter()
        .map(|p| number(p))
        .collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..50).collect::<Vec<_>>(), "nothing lost or added");
    assert!(link.stats().reordered > 0);
    assert_ne!(got, sorted, "held-back packets arrive after later ones");
}

#[test]
fn a_rebind_moves_the_flow_to_a_new_source_port_and_answers_still_arrive() {
    let echo = Echo::start();
    let d = Direction::delay(Duration::ZERO);
    let link = Link::start(echo.addr, profile(d.clone(), d), 13);
    let client = Client::new(&link);
    client.send(b"one");
    assert_eq!(client.recv(TIMEOUT).as_deref(), Some(&b"one"[..]));
    link.rebind();
    client.send(b"two");
    assert_eq!(client.recv(TIMEOUT).as_deref(), Some(&b"two"[..]));
    let sources = echo.sources();
    assert_eq!(sources.len(), 2);
    assert_ne!(
        sources[0], sources[1],
        "the relay sees the device at a new address"
    );
}
