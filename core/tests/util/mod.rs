//! The test harness: two channels joined by seeded links, in virtual time.
//!
//! Modelled on quinn-proto's `tests/util.rs` `Pair`: time jumps straight to the earliest deadline (a
//! packet's arrival or a channel's timer), so a run covering minutes of retransmission timeouts takes
//! milliseconds, and a step bound turns a livelock into a failed test instead of a hung one.
#![allow(dead_code)] // each test binary uses a different part

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use bytes::{Bytes, BytesMut};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{Channel, Config, Event, Transport};

/// How a link mistreats what crosses it.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Fixed one-way delay.
    pub latency: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per packet; reorders datagrams.
    pub jitter: Duration,
    /// Probability a datagram is dropped.
    pub drop: f64,
    /// Probability a datagram is delivered twice (the copy with its own jitter).
    pub duplicate: f64,
    /// Stream links: the largest chunk a transmission is cut into (0 = never cut).
    pub max_chunk: usize,
}

impl Faults {
    /// A perfect link with `latency`.
    pub fn clean(latency: Duration) -> Self {
        Faults {
            latency,
            jitter: Duration::ZERO,
            drop: 0.0,
            duplicate: 0.0,
            max_chunk: 0,
        }
    }
}

/// One direction of the network between the two channels.
pub struct Link {
    faults: Faults,
    transport: Transport,
    rng: Pcg64Mcg,
    /// (arrival, order of sending, bytes): a min-heap on arrival, FIFO among equal arrivals.
    queue: BinaryHeap<Reverse<(Instant, u64, Bytes)>>,
    sent: u64,
    /// Stream links never reorder: nothing may arrive before what was sent earlier.
    last_arrival: Instant,
    pub packets: u64,
    pub dropped: u64,
    pub duplicated: u64,
}

impl Link {
    pub fn new(faults: Faults, transport: Transport, seed: u64) -> Self {
        if transport == Transport::Stream {
            assert!(
                faults.drop == 0.0 && faults.duplicate == 0.0,
                "a stream transport neither drops nor duplicates within a connection"
            );
        }
        Link {
            faults,
            transport,
            rng: Pcg64Mcg::seed_from_u64(seed),
            queue: BinaryHeap::new(),
            sent: 0,
            last_arrival: Instant::ZERO,
            packets: 0,
            dropped: 0,
            duplicated: 0,
        }
    }

    pub fn send(&mut self, now: Instant, bytes: Bytes) {
        self.packets += 1;
        match self.transport {
            Transport::Stream => {
                let mut rest = bytes;
                while !rest.is_empty() {
                    let n = match self.faults.max_chunk {
                        0 => rest.len(),
                        max => self.rng.random_range(1..=max.min(rest.len())),
                    };
                    let chunk = rest.split_to(n);
                    let at = (now + self.delay()).max(self.last_arrival);
                    self.last_arrival = at;
                    self.push(at, chunk);
                }
            }
            _ => {
                if self.rng.random_bool(self.faults.drop) {
                    self.dropped += 1;
                    return;
                }
                if self.rng.random_bool(self.faults.duplicate) {
                    self.duplicated += 1;
                    let at = now + self.delay();
                    self.push(at, bytes.clone());
                }
                let at = now + self.delay();
                self.push(at, bytes);
            }
        }
    }

    fn delay(&mut self) -> Duration {
        let jitter = self.faults.jitter.as_nanos() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            self.rng.random_range(0..=jitter)
        };
        self.faults.latency + Duration::from_nanos(extra)
    }

    fn push(&mut self, at: Instant, bytes: Bytes) {
        self.sent += 1;
        self.queue.push(Reverse((at, self.sent, bytes)));
    }

    pub fn next_arrival(&self) -> Option<Instant> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    pub fn pop_due(&mut self, now: Instant) -> Option<Bytes> {
        if self.next_arrival()? <= now {
            self.queue.pop().map(|Reverse((_, _, b))| b)
        } else {
            None
        }
    }

    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }
}

/// The harness gave up: the step bound was reached without the run settling.
#[derive(Debug)]
pub struct Stuck {
    pub steps: u64,
    pub now: Instant,
}

impl Stuck {
    /// Counts one step; past `max` the run is declared stuck (a livelock, not a slow test).
    pub fn count(steps: &mut u64, max: u64, now: Instant) -> Result<(), Stuck> {
        *steps += 1;
        if *steps > max {
            return Err(Stuck { steps: *steps, now });
        }
        Ok(())
    }
}

/// Two channels, `a` and `b`, joined by a link each way, in virtual time.
pub struct Pair {
    pub a: Channel,
    pub b: Channel,
    pub ab: Link,
    pub ba: Link,
    pub now: Instant,
    pub a_events: Vec<Event>,
    pub b_events: Vec<Event>,
    pub steps: u64,
    pub max_steps: u64,
    buf: BytesMut,
}

impl Pair {
    pub fn new(config: Config, faults: Faults, seed: u64) -> Self {
        Self::with_configs(config.clone(), config, faults, seed)
    }

    pub fn with_configs(a: Config, b: Config, faults: Faults, seed: u64) -> Self {
        let transport = a.transport;
        let now = Instant::ZERO;
        Pair {
            a: Channel::new(a, now).expect("valid config"),
            b: Channel::new(b, now).expect("valid config"),
            ab: Link::new(faults, transport, seed),
            ba: Link::new(faults, transport, seed ^ 0x9e37_79b9_7f4a_7c15),
            now,
            a_events: Vec::new(),
            b_events: Vec::new(),
            steps: 0,
            max_steps: 1_000_000,
            buf: BytesMut::new(),
        }
    }

    /// One step: flush both channels' transmissions onto the links, deliver one due packet, or jump
    /// time to the next deadline. Returns `false` when nothing is left to happen.
    pub fn step(&mut self) -> Result<bool, Stuck> {
        Stuck::count(&mut self.steps, self.max_steps, self.now)?;
        let now = self.now;
        while let Some(n) = self.a.poll_transmit(now, &mut self.buf) {
            self.ab.send(now, self.buf.split_to(n).freeze());
        }
        while let Some(n) = self.b.poll_transmit(now, &mut self.buf) {
            self.ba.send(now, self.buf.split_to(n).freeze());
        }
        self.a_events
            .extend(std::iter::from_fn(|| self.a.poll_event()));
        self.b_events
            .extend(std::iter::from_fn(|| self.b.poll_event()));
        if let Some(p) = self.ab.pop_due(now) {
            self.b.handle_input(now, p);
            return Ok(true);
        }
        if let Some(p) = self.ba.pop_due(now) {
            self.a.handle_input(now, p);
            return Ok(true);
        }
        let next = [
            self.ab.next_arrival(),
            self.ba.next_arrival(),
            self.a.poll_timeout(),
            self.b.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        match next {
            None => Ok(false),
            Some(t) => {
                self.now = self.now.max(t);
                self.a.handle_timeout(self.now);
                self.b.handle_timeout(self.now);
                Ok(true)
            }
        }
    }

    /// Steps until nothing is left to happen.
    pub fn drive(&mut self) -> Result<(), Stuck> {
        while self.step()? {}
        Ok(())
    }

    /// Steps until `done` holds or nothing is left to happen; returns whether `done` held.
    pub fn drive_until(&mut self, mut done: impl FnMut(&Pair) -> bool) -> Result<bool, Stuck> {
        loop {
            if done(self) {
                return Ok(true);
            }
            if !self.step()? {
                return Ok(done(self));
            }
        }
    }

    /// Sends every payload from `a` to `b`, waiting out backpressure by driving the pair; returns the
    /// sequence numbers assigned.
    pub fn send_all_from_a(&mut self, payloads: &[Bytes]) -> Result<Vec<u64>, Stuck> {
        let mut seqs = Vec::with_capacity(payloads.len());
        for p in payloads {
            loop {
                match self.a.send(p.clone()) {
                    Ok(seq) => {
                        seqs.push(seq);
                        break;
                    }
                    Err(steadfast_core::SendError::QueueFull(_)) => {
                        let before = self.a.sender().queued_messages();
                        let freed =
                            self.drive_until(|p| p.a.sender().queued_messages() < before)?;
                        assert!(freed, "backpressure never released");
                    }
                    Err(e) => panic!("send refused: {e}"),
                }
            }
        }
        Ok(seqs)
    }
}

/// The payloads of the `Received` events, in order.
pub fn received(events: &[Event]) -> Vec<Bytes> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Received(m) => Some(m.payload.clone()),
            _ => None,
        })
        .collect()
}

/// `n` distinct payloads, each `size` bytes and tagged with its index so swaps and duplicates show.
pub fn payloads(n: usize, size: usize) -> Vec<Bytes> {
    (0..n)
        .map(|i| {
            let mut v = (i as u64).to_be_bytes().to_vec();
            v.resize(size.max(8), (i % 251) as u8);
            Bytes::from(v)
        })
        .collect()
}
#[allow(dead_code)]
pub mod cluster;
pub mod net;
