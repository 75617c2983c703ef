//! A state-machine property: random sequences of sends, replies, connection resets, blackholes,
//! half-open connections, process freezes and time passing, run against a reference model of what
//! must be delivered. After every step nothing is duplicated, reordered or invented; once the faults
//! stop, everything sent has been delivered. Failures shrink to a short sequence of steps.

mod util;

use bytes::Bytes;
use proptest::prelude::*;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};
use steadfast_core::client::ClientConfig;
use steadfast_core::identity::SessionId;
use steadfast_core::server::{ServerConfig, ServerEvent};
use steadfast_core::session::SessionEvent;
use steadfast_core::time::Duration;
use steadfast_core::{Config, Mode, Transport};
use util::net::Net;

#[derive(Debug, Clone)]
enum Step {
    ClientSends(u8),
    ServerSends(u8),
    ClientRepliesToNewest,
    Reset,
    Blackhole,
    HalfOpen,
    Freeze(u16),
    Advance(u16),
}

/// The model: how many messages each side has been asked to send, which fixes their payloads.
#[derive(Debug, Clone, Default)]
struct Model {
    up: u32,
    down: u32,
}

struct Reference;

impl ReferenceStateMachine for Reference {
    type State = Model;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(_: &Model) -> BoxedStrategy<Step> {
        prop_oneof![
            4 => (1u8..20).prop_map(Step::ClientSends),
            4 => (1u8..20).prop_map(Step::ServerSends),
            2 => Just(Step::ClientRepliesToNewest),
            1 => Just(Step::Reset),
            1 => Just(Step::Blackhole),
            1 => Just(Step::HalfOpen),
            1 => (100u16..10_000).prop_map(Step::Freeze),
            3 => (1u16..5_000).prop_map(Step::Advance),
        ]
        .boxed()
    }

    fn apply(mut state: Model, step: &Step) -> Model {
        match step {
            Step::ClientSends(n) => state.up += u32::from(*n),
            Step::ServerSends(n) => state.down += u32::from(*n),
            _ => {}
        }
        state
    }
}

/// The system under test, with the ledger of what it was asked to deliver.
struct Sut {
    net: Net,
    session: Option<SessionId>,
    up: Vec<Bytes>,
    down: Vec<Bytes>,
    /// Replies sent, by the sequence number they answer.
    replies: Vec<u64>,
}

fn tagged(side: &str, i: u32) -> Bytes {
    Bytes::from(format!("{side}-{i}"))
}

impl Sut {
    fn delivered_to_server(&self) -> Vec<Bytes> {
        self.net
            .server_events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Session {
                    event: SessionEvent::Received(m),
                    ..
                } => Some(m.payload.clone()),
                _ => None,
            })
            .collect()
    }

    fn delivered_to_client(&self) -> Vec<Bytes> {
        self.net.client_received(0)
    }

    fn replies_received(&self) -> Vec<u64> {
        self.net
            .server_events
            .iter()
            .filter_map(|e| match e {
                ServerEvent::Session {
                    event: SessionEvent::Reply { to, .. },
                    ..
                } => Some(*to),
                _ => None,
            })
            .collect()
    }

    fn check(&self) {
        let to_server = self.delivered_to_server();
        assert!(
            to_server.len() <= self.up.len() && to_server[..] == self.up[..to_server.len()],
            "server got {to_server:?}, client sent {:?}",
            self.up
        );
        let to_client = self.delivered_to_client();
        assert!(
            to_client.len() <= self.down.len() && to_client[..] == self.down[..to_client.len()],
            "client got {to_client:?}, server sent {:?}",
            self.down
        );
        let replies = self.replies_received();
        assert!(
            replies.len() <= self.replies.len() && replies[..] == self.replies[..replies.len()],
            "replies received {replies:?}, sent {:?}",
            self.replies
        );
        let events = &self.net.client_events[0];
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, SessionEvent::SessionLost { .. })),
            "the session was lost: {events:?}"
        );
    }
}

struct SessionUnderFaults;

impl StateMachineTest for SessionUnderFaults {
    type SystemUnderTest = Sut;
    type Reference = Reference;

    fn init_test(_: &Model) -> Sut {
        let mut server = ServerConfig::new(Config::new(Transport::Stream));
        server.retention = Duration::from_secs(120);
        let client = ClientConfig::new(Config::new(Transport::Stream), 1);
        let mut net = Net::new(server, vec![client], 1);
        net.max_steps = 200_000;
        Sut {
            net,
            session: None,
            up: Vec::new(),
            down: Vec::new(),
            replies: Vec::new(),
        }
    }

    fn apply(mut sut: Sut, model: &Model, step: Step) -> Sut {
        match step {
            Step::ClientSends(n) => {
                let first = model.up - u32::from(n);
                for i in first..model.up {
                    let p = tagged("up", i);
                    sut.net.clients[0]
                        .send(0, Mode::Ordered, p.clone())
                        .expect("queue has room");
                    sut.up.push(p);
                }
            }
            Step::ServerSends(n) => {
                let first = model.down - u32::from(n);
                // Before the first welcome the server has no session to send to: those are skipped.
                if let Some(id) = sut.session {
                    for i in first..model.down {
                        let p = tagged("down", i);
                        sut.net
                            .server
                            .send(id, 0, Mode::Ordered, p.clone())
                            .expect("queue has room");
                        sut.down.push(p);
                    }
                }
            }
            Step::ClientRepliesToNewest => {
                let newest = sut.net.client_events[0].iter().rev().find_map(|e| match e {
                    SessionEvent::Received(m) => Some(m.seq),
                    _ => None,
                });
                if let Some(to) = newest
                    && !sut.replies.contains(&to)
                {
                    sut.net.clients[0]
                        .reply(to, Bytes::from_static(b"ok"))
                        .expect("reply queued");
                    sut.replies.push(to);
                }
            }
            Step::Reset => sut.net.reset(0),
            Step::Blackhole => sut.net.blackhole(0),
            Step::HalfOpen => sut.net.half_open(0),
            Step::Freeze(ms) => sut.net.freeze(0, Duration::from_millis(ms.into())),
            Step::Advance(ms) => sut
                .net
                .run_for(Duration::from_millis(ms.into()))
                .expect("no livelock"),
        }
        sut.net.step().expect("no livelock");
        sut.session = sut.session.or(sut.net.clients[0].session());
        sut
    }

    fn check_invariants(sut: &Sut, _: &Model) {
        sut.check();
    }

    fn teardown(mut sut: Sut) {
        // The faults stop; within a bounded time everything must have arrived.
        sut.net
            .run_for(Duration::from_secs(60))
            .expect("no livelock");
        sut.check();
        assert_eq!(
            sut.delivered_to_server(),
            sut.up,
            "client to server incomplete"
        );
        assert_eq!(
            sut.delivered_to_client(),
            sut.down,
            "server to client incomplete"
        );
        assert_eq!(sut.replies_received(), sut.replies, "replies incomplete");
    }
}

prop_state_machine! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn a_session_delivers_everything_exactly_once_in_order_whatever_the_faults(
        sequential 1..40 => SessionUnderFaults
    );
}
