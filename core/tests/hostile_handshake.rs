//! Hostile peers at the session layer, each against one `Server` driven by hand: a flood of
//! connections past the pending-handshake bound, handshakes too slow to finish, frames over the
//! size limit, a client advertising a huge window, acknowledgements of what was never sent, an
//! endless stream of out-of-order sequence numbers, and resumes with wrong tokens. Each test
//! asserts the bound it relies on as a number: bytes, counts or a deadline.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use steadfast_core::config::RECV_RANGES;
use steadfast_core::frame::{AckFrame, AckRanges, DataFrame, DecodeError, DecodeLimits, Frame};
use steadfast_core::frame::{HelloFrame, RefuseFrame};
use steadfast_core::framing::{self, StreamDecoder};
use steadfast_core::identity::{Resume, SessionId, Token};
use steadfast_core::server::{ConnId, Server, ServerConfig, ServerEvent};
use steadfast_core::session::{DisconnectCause, LostReason, RefuseCode, SessionEvent};
use steadfast_core::time::{Duration, Instant};
use steadfast_core::{CLOSE_PROTOCOL_VIOLATION, Config, Mode, ProtocolError, Transport, varint};
use util::net::entropy;

mod util;

/// A server and hand-driven peers on it, reading what the server writes back.
struct Bench {
    server: Server,
    now: Instant,
    /// Per connection: its decoder of the server's bytes, the frames read, whether it was closed.
    peers: BTreeMap<ConnId, Peer>,
    events: Vec<ServerEvent>,
}

struct Peer {
    decoder: StreamDecoder,
    frames: Vec<Frame>,
    closed_at: Option<Instant>,
    /// Bytes the server wrote to it.
    written: usize,
}

impl Bench {
    fn new(config: ServerConfig) -> Self {
        Bench {
            server: Server::new(config, Instant::ZERO, entropy(7)).expect("valid config"),
            now: Instant::ZERO,
            peers: BTreeMap::new(),
            events: Vec::new(),
        }
    }

    fn connect(&mut self, conn: ConnId) {
        self.server.on_connection(self.now, conn);
        self.peers.insert(
            conn,
            Peer {
                decoder: StreamDecoder::new(DecodeLimits::default()),
                frames: Vec::new(),
                closed_at: None,
                written: 0,
            },
        );
    }

    fn send(&mut self, conn: ConnId, bytes: Bytes) {
        self.server.handle_input(self.now, conn, bytes);
        self.drain();
    }

    /// Reads everything the server writes; a connection it closes is closed.
    fn drain(&mut self) {
        let mut buf = BytesMut::new();
        let mut polls = 0;
        while let Some(t) = self.server.poll_transmit(self.now, &mut buf) {
            polls += 1;
            assert!(polls < 100_000, "poll_transmit does not end");
            let bytes = buf.split_to(t.len);
            let peer = self
                .peers
                .get_mut(&t.conn)
                .expect("a connection the bench opened");
            assert!(peer.closed_at.is_none(), "bytes after the close");
            peer.written += bytes.len();
            peer.decoder.feed(&bytes);
            while let Some(f) = peer.decoder.next_frame().expect("the server writes frames") {
                peer.frames.push(f);
            }
            if t.close {
                peer.closed_at = Some(self.now);
            }
        }
        self.events
            .extend(std::iter::from_fn(|| self.server.poll_event()));
    }

    /// Runs the server's timers up to `until`, in order.
    fn run_until(&mut self, until: Instant) {
        while let Some(t) = self.server.poll_timeout().filter(|t| *t <= until) {
            self.now = self.now.max(t);
            self.server.handle_timeout(self.now);
            self.drain();
        }
        self.now = until;
    }

    fn closed(&self, conn: ConnId) -> bool {
        self.peers[&conn].closed_at.is_some()
    }

    fn refusal(&self, conn: ConnId) -> Option<RefuseFrame> {
        self.peers[&conn].frames.iter().find_map(|f| match f {
            Frame::Refuse(r) => Some(r.clone()),
            _ => None,
        })
    }

    /// Opens `conn` and completes a new session on it; returns the session and its token.
    fn session(&mut self, conn: ConnId, recv_window: u64) -> (SessionId, Token) {
        self.connect(conn);
        self.send(conn, stream(&[hello(recv_window, None)], true));
        match self.peers[&conn].frames.last() {
            Some(Frame::Welcome(w)) => (w.session, w.token),
            other => panic!("no welcome: {other:?}"),
        }
    }
}

fn hello(recv_window: u64, resume: Option<Resume>) -> Frame {
    Frame::Hello(HelloFrame {
        nonce: 5,
        recv_window,
        resume,
        credentials: Bytes::new(),
    })
}

fn stream(frames: &[Frame], preface: bool) -> Bytes {
    let mut w = BytesMut::new();
    if preface {
        framing::encode_preface(&mut w);
    }
    for f in frames {
        framing::encode_stream_frame(f, &mut w);
    }
    w.freeze()
}

fn data(seq: u64, len: usize) -> Frame {
    Frame::Data(DataFrame {
        stream: 0,
        seq,
        ack: None,
        unordered: false,
        payload: Bytes::from(vec![7; len]),
    })
}

fn config() -> ServerConfig {
    ServerConfig::new(Config::new(Transport::Stream))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn connections_past_the_pending_handshake_bound_are_closed_unread_without_a_byte() {
    let mut c = config();
    c.max_pending_handshakes = 4;
    let mut b = Bench::new(c);
    for conn in 1..=4 {
        b.connect(conn);
    }
    for conn in 5..=1000 {
        b.connect(conn);
        b.send(conn, stream(&[hello(64, None)], true));
    }
    b.drain();
    for conn in 1..=4 {
        assert!(!b.closed(conn), "a connection within the bound stays open");
    }
    for conn in 5..=1000 {
        assert!(
            b.closed(conn),
            "connection {conn} past the bound is closed at once"
        );
        assert_eq!(b.peers[&conn].written, 0, "not even a preface or a refusal");
    }
    assert_eq!(b.server.connection_count(), 4);
    assert_eq!(
        b.server.session_count(),
        0,
        "no hello past the bound was read"
    );
    // One of the four completes its handshake: a place is free again.
    b.send(1, stream(&[hello(64, None)], true));
    assert_eq!(b.server.session_count(), 1);
    b.connect(1001);
    b.send(1001, stream(&[hello(64, None)], true));
    assert!(!b.closed(1001));
    assert_eq!(b.server.session_count(), 2);
}

#[test]
fn a_handshake_that_does_not_finish_is_closed_at_its_deadline_however_it_trickles() {
    let mut c = config();
    c.handshake_timeout = Duration::from_secs(2);
    let deadline = Instant::ZERO + Duration::from_secs(2);
    let mut b = Bench::new(c);
    let silent = 1;
    let trickle = 2;
    b.connect(silent);
    b.connect(trickle);
    b.drain();
    // The trickler sends the preface and a hello one byte every 130 ms: all but the last byte by
    // the deadline.
    let whole = stream(&[hello(64, None)], true);
    for i in 0..whole.len() - 1 {
        b.run_until(Instant::ZERO + ms(130 * i as u64));
        b.send(trickle, whole.slice(i..i + 1));
    }
    assert!(130 * (whole.len() as u64 - 2) < 2000);
    b.run_until(Instant::ZERO + (Duration::from_secs(2) - Duration::from_nanos(1)));
    assert!(
        !b.closed(silent) && !b.closed(trickle),
        "not before the deadline"
    );
    b.run_until(deadline + Duration::from_secs(1));
    assert_eq!(b.peers[&silent].closed_at, Some(deadline));
    assert_eq!(
        b.peers[&trickle].closed_at,
        Some(deadline),
        "bytes do not extend it"
    );
    assert_eq!(b.server.connection_count(), 0);
    assert_eq!(b.server.session_count(), 0);
    assert_eq!(b.server.poll_timeout(), None, "nothing is left to wake for");
}

#[test]
fn a_frame_announced_over_the_size_limit_closes_the_connection_before_its_body_is_buffered() {
    let mut c = config();
    c.channel.max_frame_size = 4096;
    let mut b = Bench::new(c);
    let (id, _) = b.session(1, 64);
    // A frame of exactly the limit is accepted; one byte more is not, on the length alone.
    let payload = 4096 - DataFrame::header_len(0, 0, None);
    b.send(1, stream(&[data(0, payload)], false));
    assert!(!b.closed(1));
    assert!(b.events.iter().any(|e| matches!(e,
        ServerEvent::Session { event: SessionEvent::Received(m), .. } if m.payload.len() == payload)));
    let mut prefix = BytesMut::new();
    varint::encode(4097, &mut prefix);
    b.send(1, prefix.freeze());
    assert!(b.closed(1));
    assert!(b.events.iter().any(|e| matches!(
        e,
        ServerEvent::Session {
            session,
            event: SessionEvent::Disconnected {
                cause: DisconnectCause::Decode(DecodeError::FrameTooLarge { len: 4097, max: 4096 })
            }
        } if *session == id
    )));
    // A length prefix of a gigabyte, on another session: refused on its 5 bytes.
    let (id2, _) = b.session(2, 64);
    let mut prefix = BytesMut::new();
    varint::encode(1 << 30, &mut prefix);
    b.send(2, prefix.freeze());
    assert!(b.closed(2));
    assert!(
        !b.server.is_connected(id2),
        "the session waits for a resume, detached"
    );
    // Bytes after the close are not read.
    b.send(2, Bytes::from(vec![0u8; 64 * 1024]));
    assert_eq!(b.server.connection_count(), 0);
}

#[test]
fn a_client_advertising_a_huge_window_gets_no_more_in_flight_than_the_servers_own_limit() {
    let mut c = config();
    // Below the queue bound, so that the two bounds show apart.
    c.channel.max_in_flight = 1000;
    c.channel.max_queued_messages = 4096;
    let limit = c.channel.in_flight_limit(varint::MAX);
    assert_eq!(limit, 1000);
    let mut b = Bench::new(c);
    let (id, _) = b.session(1, varint::MAX);
    let mut accepted = 0u64;
    for i in 0..10_000u32 {
        if b.server
            .send(id, 0, Mode::Ordered, Bytes::from(i.to_be_bytes().to_vec()))
            .is_ok()
        {
            accepted += 1;
        }
    }
    b.drain();
    b.run_until(Instant::ZERO + Duration::from_secs(10));
    let sent: std::collections::BTreeSet<u64> = b.peers[&1]
        .frames
        .iter()
        .filter_map(|f| match f {
            Frame::Data(d) => Some(d.seq),
            _ => None,
        })
        .collect();
    assert_eq!(
        accepted, 4096,
        "the queue bound (max_queued_messages) holds the rest back"
    );
    assert_eq!(
        sent.len() as u64,
        limit,
        "never acknowledged, so exactly the server's in-flight limit went out"
    );
    assert_eq!(sent.last().copied(), Some(limit - 1));
}

#[test]
fn an_ack_of_what_was_never_sent_ends_the_session_as_a_violation() {
    let mut b = Bench::new(config());
    let (id, _) = b.session(1, 64);
    b.server
        .send(id, 0, Mode::Ordered, Bytes::from_static(b"one"))
        .unwrap();
    b.drain();
    let mut ranges = AckRanges::new();
    ranges.push(5..9).unwrap();
    let forged = Frame::Ack(AckFrame {
        cumulative: 1,
        delay_micros: 0,
        ranges,
    });
    b.send(1, stream(&[forged], false));
    b.run_until(b.now + Duration::from_secs(2));
    let lost = b.events.iter().find_map(|e| match e {
        ServerEvent::Session {
            session,
            event:
                SessionEvent::SessionLost {
                    reason,
                    unacknowledged,
                },
        } if *session == id => Some((reason.clone(), unacknowledged.len())),
        _ => None,
    });
    assert!(
        matches!(
            lost,
            Some((LostReason::Violation(ProtocolError::AckOfUnsent(_)), _))
        ),
        "{lost:?}"
    );
    let close = b.peers[&1].frames.iter().find_map(|f| match f {
        Frame::Close(c) => Some(c.code),
        _ => None,
    });
    assert_eq!(
        close,
        Some(CLOSE_PROTOCOL_VIOLATION),
        "the client is told why"
    );
    assert!(b.closed(1));
    assert_eq!(b.server.session_count(), 0);
}

#[test]
fn a_resume_claiming_more_than_was_ever_sent_is_refused_and_ends_the_session() {
    let mut b = Bench::new(config());
    let (id, token) = b.session(1, 64);
    b.server
        .send(id, 0, Mode::Ordered, Bytes::from_static(b"one"))
        .unwrap();
    b.drain();
    b.server.on_disconnected(b.now, 1);
    b.connect(2);
    let resume = Resume {
        session: id,
        token,
        epoch: 2,
        received: 1000,
    };
    b.send(2, stream(&[hello(64, Some(resume))], true));
    assert!(b.closed(2));
    assert!(
        !b.peers[&2]
            .frames
            .iter()
            .any(|f| matches!(f, Frame::Welcome(_)))
    );
    // Regression: this refusal went out as `Other(CLOSE_PROTOCOL_VIOLATION)`, whose wire value (2)
    // is `BadToken`'s, so the client was told its token was wrong.
    assert_eq!(
        b.refusal(2).map(|r| RefuseCode::from_wire(r.code)),
        Some(RefuseCode::Violation)
    );
    assert_eq!(b.server.session_count(), 0);
}

#[test]
fn endless_out_of_order_sequence_numbers_never_grow_the_receivers_state_past_its_bounds() {
    let mut c = config();
    c.channel.recv_window = 256;
    c.channel.max_reorder_bytes = 8 * 1024;
    let window = c.channel.recv_window;
    let max_reorder = c.channel.max_reorder_bytes;
    let mut b = Bench::new(c);
    let (id, _) = b.session(1, 64);
    // 100,000 frames, none of them sequence number 0: every other number in the window, then
    // numbers beyond it, and the same ones again, in a scrambled order.
    let mut peak = (0, 0, 0);
    for round in 0..100_000u64 {
        let seq = match round % 3 {
            0 => 1 + (round * 7919) % (window - 1),
            1 => window + (round * 104_729) % (1 << 40),
            _ => 1 + 2 * (round % (window / 2 - 1)),
        };
        b.send(1, stream(&[data(seq, 64)], false));
        let r = b.server.channel(id).expect("the session stays").receiver();
        assert!(r.reorder_bytes() <= max_reorder);
        assert!(r.reorder_slots() as u64 <= window);
        assert!(r.ranges().len() <= RECV_RANGES);
        peak = (
            peak.0.max(r.reorder_bytes()),
            peak.1.max(r.reorder_slots()),
            peak.2.max(r.ranges().len()),
        );
    }
    assert!(!b.closed(1), "well-formed, however scrambled: never fatal");
    let received = |b: &Bench| {
        b.events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    ServerEvent::Session {
                        event: SessionEvent::Received(_),
                        ..
                    }
                )
            })
            .count()
    };
    assert_eq!(
        received(&b),
        0,
        "nothing is delivered ahead of sequence number 0"
    );
    // The bounds were reached, not just respected: 8 KiB of 64-byte payloads is 128 messages.
    assert_eq!(peak.0, 128 * 64, "peak reorder bytes");
    // Then the gap fills: what was held comes out in order.
    b.send(1, stream(&[data(0, 64)], false));
    let delivered = received(&b);
    assert!(delivered > 1, "{delivered}");
    assert!(b.server.channel(id).unwrap().receiver().reorder_bytes() < max_reorder);
}

#[test]
fn wrong_tokens_are_refused_counted_and_indistinguishable_wherever_they_differ() {
    let mut b = Bench::new(config());
    let (id, token) = b.session(1, 64);
    let mut refusals = Vec::new();
    let mut conn = 100;
    // Every single-bit change of the token, at each of its 128 bits, and 872 unrelated tokens.
    let mut forged: Vec<[u8; 16]> = (0..128)
        .map(|bit| {
            let mut t = *token.as_bytes();
            t[bit / 8] ^= 1 << (bit % 8);
            t
        })
        .collect();
    forged.extend((0..872u32).map(|i| {
        let mut t = [0u8; 16];
        t[..4].copy_from_slice(&i.to_le_bytes());
        t
    }));
    for t in &forged {
        conn += 1;
        b.connect(conn);
        let resume = Resume {
            session: id,
            token: Token::from_bytes(*t),
            epoch: 9,
            received: 0,
        };
        b.send(conn, stream(&[hello(64, Some(resume))], true));
        assert!(b.closed(conn));
        refusals.push(b.peers[&conn].frames.clone());
    }
    assert_eq!(b.server.refused_tokens(), 1000);
    // The same bytes whichever bit was wrong: a refusal says nothing about how close a guess was.
    assert!(refusals.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        b.refusal(101).map(|r| RefuseCode::from_wire(r.code)),
        Some(RefuseCode::BadToken)
    );
    assert!(
        b.server.is_connected(id),
        "the honest connection is untouched"
    );
    assert_eq!(b.server.epoch(id), Some(1), "no forger moved the epoch");
    // The real token still resumes.
    b.server.on_disconnected(b.now, 1);
    b.connect(2);
    let resume = Resume {
        session: id,
        token,
        epoch: 2,
        received: 0,
    };
    b.send(2, stream(&[hello(64, Some(resume))], true));
    assert!(
        b.peers[&2]
            .frames
            .iter()
            .any(|f| matches!(f, Frame::Welcome(w) if w.resumed))
    );
    assert_eq!(b.server.refused_tokens(), 1000);
}

#[test]
fn every_named_refusal_has_its_own_wire_code() {
    let named = [
        RefuseCode::UnknownSession,
        RefuseCode::BadToken,
        RefuseCode::StaleEpoch,
        RefuseCode::AuthenticationFailed,
        RefuseCode::ServerFull,
        RefuseCode::NotAttached,
        RefuseCode::Violation,
    ];
    for code in named {
        assert_eq!(RefuseCode::from_wire(code.to_wire()), code);
    }
    let wire: std::collections::BTreeSet<u64> = named.iter().map(|c| c.to_wire()).collect();
    assert_eq!(wire.len(), named.len());
}

/// The comparison itself: `Token::matches` is `subtle::ConstantTimeEq` over the 16 bytes (see
/// identity.rs), which folds every byte into the result without a data-dependent branch; equality
/// of tokens (`==`) goes through it too, so no code path compares tokens with an early exit.
#[test]
fn token_equality_is_the_constant_time_comparison() {
    let t = Token::from_bytes([0x5a; 16]);
    for i in 0..16 {
        let mut other = [0x5a; 16];
        other[i] ^= 0x80;
        let other = Token::from_bytes(other);
        assert!(!t.matches(&other));
        assert_eq!(t == other, t.matches(&other));
    }
    assert!(t.matches(&Token::from_bytes([0x5a; 16])));
    assert_eq!(format!("{t:?}"), "Token(..)", "never printed");
}

/// `rounds` comparisons of `token` with `guess`, kept from being optimised away.
fn compare(token: &Token, guess: &Token, rounds: u32) -> u32 {
    (0..rounds)
        .map(|_| u32::from(std::hint::black_box(token).matches(std::hint::black_box(guess))))
        .sum()
}

#[inline(never)]
fn compare_first_byte_wrong(token: &Token, rounds: u32) -> u32 {
    let mut g = *token.as_bytes();
    g[0] ^= 1;
    compare(token, &Token::from_bytes(g), rounds)
}

#[inline(never)]
fn compare_last_byte_wrong(token: &Token, rounds: u32) -> u32 {
    let mut g = *token.as_bytes();
    g[15] ^= 1;
    compare(token, &Token::from_bytes(g), rounds)
}

#[inline(never)]
fn compare_all_right(token: &Token, rounds: u32) -> u32 {
    compare(token, &Token::from_bytes(*token.as_bytes()), rounds)
}

/// The instructions a comparison costs do not depend on where a guess goes wrong. `cargo test`
/// only checks the answers; the cost is counted under callgrind, each function's inclusive
/// instruction count being `rounds` comparisons (measured: 19,600,030 for a wrong first byte, the
/// same for a wrong last byte, 19,600,025 for the right token: 196 per comparison each):
///
/// ```text
/// valgrind --tool=callgrind --callgrind-out-file=/tmp/token.cg \
///     target/release/deps/hostile_handshake-* token_comparison --test-threads 1
/// callgrind_annotate --inclusive=yes /tmp/token.cg | grep compare_
/// ```
#[test]
fn token_comparison_costs_the_same_wherever_the_tokens_differ() {
    let token = Token::from_bytes(*b"0123456789abcdef");
    let rounds = 100_000;
    assert_eq!(compare_first_byte_wrong(&token, rounds), 0);
    assert_eq!(compare_last_byte_wrong(&token, rounds), 0);
    assert_eq!(compare_all_right(&token, rounds), rounds);
}
