//! Hostile input to the session endpoints: whatever arrives on a connection — garbage, forged
//! hellos, welcomes out of turn, data before any handshake — the server and client never panic,
//! never leave a deadline stuck in the past, and keep serving an honest client alongside.

mod util;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use steadfast_core::client::ClientConfig;
use steadfast_core::frame::{CloseFrame, DataFrame, Frame, HelloFrame, RefuseFrame, WelcomeFrame};
use steadfast_core::framing;
use steadfast_core::identity::{Resume, SessionId, Token};
use steadfast_core::server::ServerConfig;
use steadfast_core::time::Duration;
use steadfast_core::{Config, Mode, Transport};
use util::net::Net;

fn frame() -> impl Strategy<Value = Frame> {
    let resume =
        (any::<u64>(), any::<[u8; 16]>(), 0u64..5, 0u64..50).prop_map(|(s, t, e, r)| Resume {
            session: SessionId(s),
            token: Token::from_bytes(t),
            epoch: e,
            received: r,
        });
    prop_oneof![
        (
            any::<u64>(),
            0u64..2048,
            prop::option::of(resume),
            prop::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map(|(nonce, recv_window, resume, c)| Frame::Hello(HelloFrame {
                nonce,
                recv_window,
                resume,
                credentials: Bytes::from(c),
            })),
        (any::<u64>(), any::<u64>(), 0u64..5, any::<bool>(), 0u64..50).prop_map(
            |(nonce, s, epoch, resumed, received)| {
                Frame::Welcome(WelcomeFrame {
                    nonce,
                    session: SessionId(s),
                    token: Token::from_bytes([0; 16]),
                    epoch,
                    resumed,
                    received,
                    recv_window: 64,
                    retention_millis: 1000,
                })
            }
        ),
        (0u64..8, 0u64..4).prop_map(|(code, epoch)| Frame::Refuse(RefuseFrame {
            code,
            epoch,
            reason: Bytes::new()
        })),
        (0u64..100, prop::option::of(0u64..100), any::<bool>()).prop_map(
            |(seq, ack, unordered)| Frame::Data(DataFrame {
                stream: 0,
                seq,
                ack,
                unordered,
                payload: Bytes::from_static(b"x"),
            })
        ),
        (0u64..4).prop_map(|code| Frame::Close(CloseFrame {
            code,
            reason: Bytes::new()
        })),
        any::<u64>().prop_map(|id| Frame::Ping { id: id >> 2 }),
    ]
}

#[derive(Debug, Clone)]
enum Attack {
    /// A hostile connection opens (its id) and sends these.
    Frames(u8, Vec<Frame>),
    Garbage(u8, Vec<u8>),
    /// Time passes.
    Wait(u16),
}

fn attack() -> impl Strategy<Value = Attack> {
    prop_oneof![
        4 => (0u8..4, prop::collection::vec(frame(), 1..6)).prop_map(|(c, f)| Attack::Frames(c, f)),
        1 => (0u8..4, prop::collection::vec(any::<u8>(), 0..40)).prop_map(|(c, g)| Attack::Garbage(c, g)),
        2 => (1u16..4000).prop_map(Attack::Wait),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn hostile_connections_neither_crash_nor_stall_the_server_and_an_honest_client_is_served(
        attacks in prop::collection::vec(attack(), 1..20),
        preface in any::<bool>(),
    ) {
        let mut server = ServerConfig::new(Config::new(Transport::Stream));
        server.max_pending_handshakes = 3;
        let client = ClientConfig::new(Config::new(Transport::Stream), 1);
        let mut n = Net::new(server, vec![client], 5);
        prop_assert!(n.run_until(|n| n.clients[0].is_connected()).unwrap());
        let id = n.clients[0].session().unwrap();
        let mut opened = std::collections::BTreeSet::new();
        for a in attacks {
            match a {
                Attack::Frames(c, frames) => {
                    let conn = 1000 + u64::from(c);
                    if opened.insert(conn) {
                        n.server.on_connection(n.now, conn);
                    }
                    let mut wire = BytesMut::new();
                    if preface {
                        framing::encode_preface(&mut wire);
                    }
                    for f in &frames {
                        framing::encode_stream_frame(f, &mut wire);
                    }
                    n.server.handle_input(n.now, conn, wire.freeze());
                }
                Attack::Garbage(c, g) => {
                    let conn = 1000 + u64::from(c);
                    if opened.insert(conn) {
                        n.server.on_connection(n.now, conn);
                    }
                    n.server.handle_input(n.now, conn, Bytes::from(g));
                }
                Attack::Wait(ms) => n.run_for(Duration::from_millis(ms.into())).expect("no livelock"),
            }
            // Everything due now happens (the harness drains every transmit to its connection);
            // then no deadline may be left in the past, or a driver would spin.
            n.run_for(Duration::ZERO).expect("no livelock");
            let now = n.now;
            prop_assert!(n.server.poll_timeout().is_none_or(|t| t > now), "server deadline stuck in the past");
            prop_assert!(n.clients[0].poll_timeout().is_none_or(|t| t > now), "client deadline stuck in the past");
        }
        // The honest client is still served.
        n.server.send(id, 0, Mode::Ordered, Bytes::from_static(b"still here")).unwrap();
        n.run_for(Duration::from_secs(5)).expect("no livelock");
        let got = n.client_received(0);
        prop_assert_eq!(got.last(), Some(&Bytes::from_static(b"still here")));
    }
}
