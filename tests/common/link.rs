//! A link emulator: a userspace UDP forwarder between devices and the relay that gives each
//! direction a delay, jitter, a bandwidth cap with a bounded queue, loss, reordering,
//! duplication and outages, so that tests and benchmarks see the links devices have (kernel
//! netem needs privileges these machines do not grant).
//!
//! Devices send to [`Link::addr`]; each device address seen there gets its own upstream socket
//! towards the relay (a flow), so the relay sees one address per device, and [`Link::rebind`]
//! moves every flow to a new upstream port, as a device that roams from Wi-Fi to LTE does.
//!
//! Every decision about a packet (lost, duplicated, held back, its jitter) comes from a seeded
//! generator per flow and direction, drawn in packet order: the same seed and the same packets
//! give the same decisions. Timing itself is the machine's.
//!
//! Shared by `tests/` and `benches/` (which include `tests/common`); it touches nothing of Ferry.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// The largest UDP payload forwarded (QUIC stays far below it).
const MAX_DATAGRAM: usize = 65_535;

/// What one direction of a link does to the packets crossing it.
#[derive(Debug, Clone, PartialEq)]
pub struct Direction {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Each packet's delay varies uniformly by up to this much either way; packets keep their
    /// order (as on a real link, where jitter comes from queues).
    pub jitter: Duration,
    /// Bits per second the link carries; `None` for no cap.
    pub rate_bps: Option<u64>,
    /// The longest a packet may wait for the link before it is dropped (the link's buffer).
    pub max_queue: Duration,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// Probability that a packet is held back past the packets behind it.
    pub reorder: f64,
    /// Probability that a packet arrives twice.
    pub duplicate: f64,
}

impl Direction {
    /// A direction that delays by `delay` and does nothing else.
    pub fn delay(delay: Duration) -> Direction {
        Direction {
            delay,
            jitter: Duration::ZERO,
            rate_bps: None,
            max_queue: Duration::from_secs(1),
            loss: 0.0,
            reorder: 0.0,
            duplicate: 0.0,
        }
    }
}

/// Regular outages: the link carries nothing for `length`, every `every`, the first after
/// `every` from the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outages {
    pub every: Duration,
    pub length: Duration,
}

/// A link: what it does to packets from the devices (`up`) and to them (`down`).
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub up: Direction,
    pub down: Direction,
    pub outages: Option<Outages>,
}

/// The names [`Profile::named`] knows, fastest first.
pub const PROFILES: [&str; 5] = ["lan", "broadband", "mobile", "bad-3g", "satellite"];

impl Profile {
    /// A symmetric link: `rtt` split evenly between the directions, `jitter` on each one-way
    /// delay, `mbit` megabits per second each way, `loss` each way.
    fn symmetric(
        name: &'static str,
        rtt_ms: u64,
        jitter_ms: u64,
        mbit: u64,
        loss: f64,
        max_queue_ms: u64,
    ) -> Profile {
        let direction = Direction {
            delay: Duration::from_millis(rtt_ms / 2),
            jitter: Duration::from_millis(jitter_ms),
            rate_bps: Some(mbit * 1_000_000),
            max_queue: Duration::from_millis(max_queue_ms),
            loss,
            reorder: 0.0,
            duplicate: 0.0,
        };
        Profile {
            name,
            up: direction.clone(),
            down: direction,
            outages: None,
        }
    }

    /// A named profile: `lan` (no delay, no cap), `broadband` (20 ms RTT, 50 Mbit/s), `mobile`
    /// (80 ms RTT ± 20 ms, 10 Mbit/s, 0.5% loss), `bad-3g` (300 ms RTT, 1 Mbit/s, 3% loss, a 2 s
    /// outage every 30 s), `satellite` (600 ms RTT, 5 Mbit/s).
    pub fn named(name: &str) -> Option<Profile> {
        Some(match name {
            "lan" => Profile {
                name: "lan",
                up: Direction::delay(Duration::ZERO),
                down: Direction::delay(Duration::ZERO),
                outages: None,
            },
            "broadband" => Profile::symmetric("broadband", 20, 0, 50, 0.0, 50),
            "mobile" => {
                // ± 20 ms on the round trip: ± 10 ms each way.
                let mut p = Profile::symmetric("mobile", 80, 10, 10, 0.005, 200);
                p.up.reorder = 0.001;
                p.down.reorder = 0.001;
                p
            }
            "bad-3g" => {
                let mut p = Profile::symmetric("bad-3g", 300, 20, 1, 0.03, 1_000);
                p.up.duplicate = 0.005;
                p.down.duplicate = 0.005;
                p.up.reorder = 0.01;
                p.down.reorder = 0.01;
                p.outages = Some(Outages {
                    every: Duration::from_secs(30),
                    length: Duration::from_secs(2),
                });
                p
            }
            "satellite" => Profile::symmetric("satellite", 600, 0, 5, 0.0, 300),
            _ => return None,
        })
    }

    /// The round trip with no queueing and no jitter.
    pub fn rtt(&self) -> Duration {
        self.up.delay + self.down.delay
    }

    /// The slower direction's rate, if either is capped.
    pub fn bottleneck_bps(&self) -> Option<u64> {
        match (self.up.rate_bps, self.down.rate_bps) {
            (Some(u), Some(d)) => Some(u.min(d)),
            (rate, None) | (None, rate) => rate,
        }
    }
}

/// Counts of what the link did, both directions together.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub forwarded: u64,
    pub bytes: u64,
    pub lost: u64,
    /// Dropped because the link's queue was full.
    pub overflowed: u64,
    /// Dropped because the link was out.
    pub blacked_out: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicU64,
    overflowed: AtomicU64,
    blacked_out: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A small deterministic generator (SplitMix64): the emulator's decisions must replay from a
/// seed, whatever version of a random-number crate is around.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// What the link decided for one packet, before timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fate {
    pub lost: bool,
    pub duplicate: bool,
    pub reorder: bool,
    /// In [-1, 1): the share of the direction's jitter added to its delay.
    pub jitter: f64,
}

impl Fate {
    /// Draws one packet's fate: always four draws, so one decision never shifts the others.
    pub fn draw(rng: &mut Rng, d: &Direction) -> Fate {
        let (lost, duplicate, reorder) = (rng.unit(), rng.unit(), rng.unit());
        Fate {
            lost: d.loss > 0.0 && lost < d.loss,
            duplicate: d.duplicate > 0.0 && duplicate < d.duplicate,
            reorder: d.reorder > 0.0 && reorder < d.reorder,
            jitter: rng.unit() * 2.0 - 1.0,
        }
    }
}

/// The timing of one direction: when the link is free again and when the last in-order packet
/// leaves, so that jitter never reorders on its own.
struct Schedule {
    direction: Direction,
    link_free: Instant,
    last_departure: Instant,
}

impl Schedule {
    fn new(direction: Direction, now: Instant) -> Schedule {
        Schedule {
            direction,
            link_free: now,
            last_departure: now,
        }
    }

    /// When a packet of `len` bytes arriving `now` leaves the far end, or `None` when the
    /// link's queue is full.
    fn departure(&mut self, now: Instant, len: usize, fate: &Fate) -> Option<Instant> {
        let d = &self.direction;
        let start = self.link_free.max(now);
        if start.duration_since(now) > d.max_queue {
            return None;
        }
        let serialise = d.rate_bps.map_or(Duration::ZERO, |bps| {
            Duration::from_nanos((len as u64 * 8).saturating_mul(1_000_000_000) / bps.max(1))
        });
        self.link_free = start + serialise;
        let jitter = d.jitter.mul_f64(fate.jitter.abs());
        let delay = if fate.jitter < 0.0 {
            d.delay.saturating_sub(jitter)
        } else {
            d.delay + jitter
        };
        let on_time = self.link_free + delay;
        if fate.reorder {
            // Held back by a quarter of the delay (at least 1 ms): the next packets overtake it.
            return Some(on_time + (d.delay / 4).max(Duration::from_millis(1)));
        }
        let departure = on_time.max(self.last_departure);
        self.last_departure = departure;
        Some(departure)
    }
}

/// The link's state shared by its tasks and its handle.
struct Shared {
    profile: Profile,
    seed: u64,
    relay: SocketAddr,
    started: Instant,
    /// Set by a test: the link carries nothing until this instant.
    down_until: Mutex<Option<Instant>>,
    /// Bumped by `rebind`: each flow moves to a new upstream socket when it sees a new value.
    generation: AtomicU64,
    counters: Counters,
    stop: AtomicBool,
}

impl Shared {
    fn is_down(&self, at: Instant) -> bool {
        let manual = self
            .down_until
            .lock()
            .unwrap()
            .is_some_and(|until| at < until);
        let scheduled = self.profile.outages.is_some_and(|o| {
            let since = at.duration_since(self.started).as_nanos();
            let every = o.every.as_nanos().max(1);
            since >= every && since % every < o.length.as_nanos()
        });
        manual || scheduled
    }
}

/// A packet waiting for its departure time.
struct Queued {
    at: Instant,
    order: u64,
    data: Vec<u8>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    // Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.order).cmp(&(self.at, self.order))
    }
}

/// Where a direction's packets go once they leave.
#[derive(Clone)]
enum Exit {
    /// Up: to the relay, from the flow's current upstream socket.
    Relay(Arc<Mutex<Arc<UdpSocket>>>),
    /// Down: to the device, from the link's listening socket.
    Device(Arc<UdpSocket>, SocketAddr),
}

impl Exit {
    async fn send(&self, relay: SocketAddr, data: &[u8]) {
        // A send that fails is a lost packet, as on any link.
        match self {
            Exit::Relay(socket) => {
                let socket = socket.lock().unwrap().clone();
                let _ = socket.send_to(data, relay).await;
            }
            Exit::Device(socket, device) => {
                let _ = socket.send_to(data, device).await;
            }
        }
    }
}

/// One direction of one flow: takes packets as they enter and lets them out when due.
async fn carry(
    shared: Arc<Shared>,
    direction: Direction,
    seed: u64,
    exit: Exit,
    mut packets: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut rng = Rng::new(seed);
    let mut schedule = Schedule::new(direction.clone(), Instant::now());
    let mut queue = BinaryHeap::<Queued>::new();
    let mut order = 0u64;
    let c = &shared.counters;
    loop {
        let next = queue.peek().map(|q| q.at);
        tokio::select! {
            packet = packets.recv() => {
                let Some(data) = packet else { return };
                let now = Instant::now();
                let fate = Fate::draw(&mut rng, &direction);
                if shared.is_down(now) {
                    Counters::add(&c.blacked_out, 1);
                    continue;
                }
                if fate.lost {
                    Counters::add(&c.lost, 1);
                    continue;
                }
                let Some(at) = schedule.departure(now, data.len(), &fate) else {
                    Counters::add(&c.overflowed, 1);
                    continue;
                };
                Counters::add(&c.reordered, u64::from(fate.reorder));
                if fate.duplicate {
                    Counters::add(&c.duplicated, 1);
                    order += 1;
                    queue.push(Queued { at, order, data: data.clone() });
                }
                order += 1;
                queue.push(Queued { at, order, data });
            }
            () = sleep_until(next) => {
                let now = Instant::now();
                while queue.peek().is_some_and(|q| q.at <= now) {
                    let Some(q) = queue.pop() else { break };
                    if shared.is_down(now) {
                        Counters::add(&c.blacked_out, 1);
                        continue;
                    }
                    Counters::add(&c.forwarded, 1);
                    Counters::add(&c.bytes, q.data.len() as u64);
                    exit.send(shared.relay, &q.data).await;
                }
            }
        }
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One device's path through the link.
struct Flow {
    up: mpsc::UnboundedSender<Vec<u8>>,
    down: mpsc::UnboundedSender<Vec<u8>>,
    upstream: Arc<Mutex<Arc<UdpSocket>>>,
    generation: u64,
}

async fn upstream_socket(relay: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let bind: SocketAddr = if relay.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    Ok(Arc::new(UdpSocket::bind(bind).await?))
}

/// Reads what the relay sends to one upstream socket and puts it on the flow's down direction,
/// until the socket is replaced.
fn read_relay(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    current: Arc<Mutex<Arc<UdpSocket>>>,
    down: mpsc::UnboundedSender<Vec<u8>>,
) {
    tokio::spawn(async move {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let received =
                tokio::time::timeout(Duration::from_millis(100), socket.recv_from(&mut buf)).await;
            if shared.stop.load(Ordering::Relaxed)
                || !Arc::ptr_eq(&current.lock().unwrap(), &socket)
            {
                // Replaced by a rebind: what the relay still sends to the old port is lost.
                return;
            }
            match received {
                Ok(Ok((n, from))) if from == shared.relay => {
                    if down.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(_)) => return,
            }
        }
    });
}

async fn serve(shared: Arc<Shared>, listen: Arc<UdpSocket>) {
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let received =
            tokio::time::timeout(Duration::from_millis(100), listen.recv_from(&mut buf)).await;
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(Ok((n, device))) = received else {
            continue;
        };
        let generation = shared.generation.load(Ordering::SeqCst);
        if !flows.contains_key(&device) {
            let Ok(socket) = upstream_socket(shared.relay).await else {
                continue;
            };
            let index = flows.len() as u64;
            let upstream = Arc::new(Mutex::new(socket.clone()));
            let (up_tx, up_rx) = mpsc::unbounded_channel();
            let (down_tx, down_rx) = mpsc::unbounded_channel();
            // Each flow and direction draws from its own stream of the seed.
            let seed = |direction: u64| Rng::new(shared.seed ^ (index << 1 | direction)).next_u64();
            tokio::spawn(carry(
                shared.clone(),
                shared.profile.up.clone(),
                seed(0),
                Exit::Relay(upstream.clone()),
                up_rx,
            ));
            tokio::spawn(carry(
                shared.clone(),
                shared.profile.down.clone(),
                seed(1),
                Exit::Device(listen.clone(), device),
                down_rx,
            ));
            read_relay(shared.clone(), socket, upstream.clone(), down_tx.clone());
            flows.insert(
                device,
                Flow {
                    up: up_tx,
                    down: down_tx,
                    upstream,
                    generation,
                },
            );
        }
        let Some(flow) = flows.get_mut(&device) else {
            continue;
        };
        if flow.generation != generation {
            if let Ok(socket) = upstream_socket(shared.relay).await {
                *flow.upstream.lock().unwrap() = socket.clone();
                read_relay(
                    shared.clone(),
                    socket,
                    flow.upstream.clone(),
                    flow.down.clone(),
                );
            }
            flow.generation = generation;
        }
        let _ = flow.up.send(buf[..n].to_vec());
    }
}

/// A running link emulator; stops when dropped.
pub struct Link {
    shared: Arc<Shared>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Link {
    /// Starts forwarding between a listening address on 127.0.0.1 and `relay`.
    pub fn start(relay: SocketAddr, profile: Profile, seed: u64) -> Link {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the link's runtime");
        let listen = runtime
            .block_on(UdpSocket::bind("127.0.0.1:0"))
            .expect("bind the link's listening socket");
        let addr = listen.local_addr().expect("the link's address");
        let shared = Arc::new(Shared {
            profile,
            seed,
            relay,
            started: Instant::now(),
            down_until: Mutex::new(None),
            generation: AtomicU64::new(0),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
        });
        let task = serve(shared.clone(), Arc::new(listen));
        let thread = std::thread::Builder::new()
            .name("link-emulator".into())
            .spawn(move || runtime.block_on(task))
            .expect("spawn the link's thread");
        Link {
            shared,
            addr,
            thread: Some(thread),
        }
    }

    /// Where devices send: `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn profile(&self) -> &Profile {
        &self.shared.profile
    }

    /// The link carries nothing, either way, for `length` from now.
    pub fn outage(&self, length: Duration) {
        *self.shared.down_until.lock().unwrap() = Some(Instant::now() + length);
    }

    /// Every flow moves to a new source port towards the relay from its next packet on, as when
    /// a device changes networks; packets the relay sends to the old port are lost.
    pub fn rebind(&self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            forwarded: get(&c.forwarded),
            bytes: get(&c.bytes),
            lost: get(&c.lost),
            overflowed: get(&c.overflowed),
            blacked_out: get(&c.blacked_out),
            duplicated: get(&c.duplicated),
            reordered: get(&c.reordered),
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
