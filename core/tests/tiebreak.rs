//! Tie-breaking from both ends: for every pair of nonces (equal ones included) the two ends' arbiters
//! name the same favourite, overall and per key; a simultaneous claim is won on exactly one end; and
//! claims and answers on a few contended keys, interleaved in any order over two ordered channels,
//! always leave the ends agreeing on every claim.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use steadfast_core::tiebreak::{Arbiter, ClaimError, ClaimOutcome, Claims, Role};

/// Nonce pairs, with equal and nearly equal pairs far more often than chance would give them.
fn nonces() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        any::<(u64, u64)>(),
        any::<u64>().prop_map(|n| (n, n)),
        (any::<u64>(), 0u64..3).prop_map(|(n, d)| (n, n.wrapping_add(d))),
        (any::<u64>(), 0u64..3).prop_map(|(n, d)| (n.wrapping_add(d), n)),
        (0u64..3, 0u64..3),
        Just((u64::MAX, u64::MAX)),
    ]
}

/// The two ends' arbiters: each built from its own point of view.
fn arbiters(client_nonce: u64, server_nonce: u64) -> (Arbiter, Arbiter) {
    (
        Arbiter::new(Role::Client, client_nonce, server_nonce),
        Arbiter::new(Role::Server, server_nonce, client_nonce),
    )
}

/// One end of the claims model: its table, the model's id for each of its pending claims, and its
/// outgoing ordered channel.
struct End {
    claims: Claims,
    pending: BTreeMap<u64, usize>,
    outbox: VecDeque<Msg>,
}

#[derive(Debug, Clone, Copy)]
enum Msg {
    Claim {
        key: u64,
        id: usize,
    },
    /// `answers` is the model's id of the claim answered; the table under test never sees it.
    Answer {
        key: u64,
        granted: bool,
        answers: usize,
    },
}

/// What each end concluded about one claim: does it stand?
#[derive(Debug, Default, Clone, Copy)]
struct Views {
    owner: Option<bool>,
    peer: Option<bool>,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    /// End 0 (client) or 1 (server) claims `key`.
    Claim(usize, u64),
    /// The next message from end `from` is delivered; `grant` is the receiving application's answer
    /// if it is a claim it may grant.
    Deliver { from: usize, grant: bool },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0usize..2, 0u64..4).prop_map(|(end, key)| Step::Claim(end, key)),
        (0usize..2, prop::bool::weighted(0.85))
            .prop_map(|(from, grant)| Step::Deliver { from, grant }),
    ];
    prop::collection::vec(step, 0..150)
}

struct Model {
    ends: [End; 2],
    max_pending: usize,
    claims: Vec<Views>,
    races: usize,
}

impl Model {
    fn new(client_nonce: u64, server_nonce: u64, max_pending: usize) -> Self {
        let (at_c, at_s) = arbiters(client_nonce, server_nonce);
        let end = |arbiter| End {
            claims: Claims::new(arbiter, max_pending),
            pending: BTreeMap::new(),
            outbox: VecDeque::new(),
        };
        Model {
            ends: [end(at_c), end(at_s)],
            max_pending,
            claims: Vec::new(),
            races: 0,
        }
    }

    fn claim(&mut self, e: usize, key: u64) -> Result<(), TestCaseError> {
        let end = &mut self.ends[e];
        let result = end.claims.claim(key);
        if end.pending.contains_key(&key) {
            prop_assert_eq!(result, Err(ClaimError::AlreadyPending { key }));
        } else if end.pending.len() >= self.max_pending {
            prop_assert_eq!(
                result,
                Err(ClaimError::TooManyPending {
                    max_pending: self.max_pending
                })
            );
        } else {
            prop_assert_eq!(result, Ok(()));
            let id = self.claims.len();
            self.claims.push(Views::default());
            end.pending.insert(key, id);
            end.outbox.push_back(Msg::Claim { key, id });
        }
        prop_assert_eq!(end.claims.pending(), end.pending.len());
        Ok(())
    }

    /// Delivers the next message `from` sent, if any, following the documented message rules.
    fn deliver(&mut self, from: usize, grant: bool) -> Result<(), TestCaseError> {
        let Some(msg) = self.ends[from].outbox.pop_front() else {
            return Ok(());
        };
        let to = 1 - from;
        let end = &mut self.ends[to];
        match msg {
            Msg::Claim { key, id } => {
                let outcome = end.claims.on_peer_claim(key);
                match end.pending.remove(&key) {
                    Some(ours) => {
                        // A race: decided locally, no message.
                        self.races += 1;
                        let won = match outcome {
                            ClaimOutcome::Won => true,
                            ClaimOutcome::Lost => false,
                            other => {
                                return Err(TestCaseError::fail(format!("race gave {other:?}")));
                            }
                        };
                        prop_assert_eq!(won, end.claims.arbiter().local_wins_for(key));
                        self.claims[ours].owner = Some(won);
                        self.claims[id].peer = Some(!won);
                    }
                    None => {
                        prop_assert_eq!(outcome, ClaimOutcome::Granted);
                        self.claims[id].peer = Some(grant);
                        end.outbox.push_back(Msg::Answer {
                            key,
                            granted: grant,
                            answers: id,
                        });
                    }
                }
            }
            Msg::Answer {
                key,
                granted,
                answers,
            } => {
                let outcome = end.claims.on_peer_answer(key, granted);
                // Under the rules an answer always meets exactly the claim it answers.
                prop_assert_eq!(
                    end.pending.remove(&key),
                    Some(answers),
                    "answer misattributed"
                );
                let expected = if granted {
                    ClaimOutcome::Won
                } else {
                    ClaimOutcome::Lost
                };
                prop_assert_eq!(outcome, Some(expected));
                self.claims[answers].owner = Some(granted);
            }
        }
        prop_assert_eq!(end.claims.pending(), end.pending.len());
        Ok(())
    }

    /// Claims resolved on both ends must agree; a claim never stands on one end and not the other.
    fn check_agreement(&self) -> Result<(), TestCaseError> {
        for (id, v) in self.claims.iter().enumerate() {
            if let (Some(owner), Some(peer)) = (v.owner, v.peer) {
                prop_assert_eq!(owner, peer, "claim {} resolved differently: {:?}", id, v);
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(5000))]

    #[test]
    fn both_ends_name_the_same_favourite_overall_and_for_every_key(
        (c, s) in nonces(),
        keys in prop::collection::vec(any::<u64>(), 1..32),
    ) {
        let (at_c, at_s) = arbiters(c, s);
        prop_assert_eq!(at_c.favourite(), at_s.favourite());
        prop_assert_ne!(at_c.local_wins(), at_s.local_wins());
        prop_assert_eq!(at_c.favourite() == Role::Client, c >= s, "larger nonce, client on a tie");
        for key in keys.into_iter().chain(0..8) {
            prop_assert_eq!(at_c.favourite_for(key), at_s.favourite_for(key), "key {}", key);
            prop_assert_ne!(at_c.local_wins_for(key), at_s.local_wins_for(key), "key {}", key);
        }
    }

    #[test]
    fn a_simultaneous_claim_is_won_on_exactly_one_end_and_lost_on_the_other(
        (c, s) in nonces(),
        key in any::<u64>(),
    ) {
        let (at_c, at_s) = arbiters(c, s);
        let mut client = Claims::new(at_c, 1);
        let mut server = Claims::new(at_s, 1);
        client.claim(key).unwrap();
        server.claim(key).unwrap();
        let outcomes = (client.on_peer_claim(key), server.on_peer_claim(key));
        let expected = if at_c.favourite_for(key) == Role::Client {
            (ClaimOutcome::Won, ClaimOutcome::Lost)
        } else {
            (ClaimOutcome::Lost, ClaimOutcome::Won)
        };
        prop_assert_eq!(outcomes, expected);
        prop_assert_eq!((client.pending(), server.pending()), (0, 0));
    }

    #[test]
    fn any_interleaving_of_claims_and_answers_leaves_both_ends_agreeing_on_every_claim(
        (c, s) in nonces(),
        max_pending in 1usize..5,
        steps in steps(),
    ) {
        let mut model = Model::new(c, s, max_pending);
        for step in steps {
            match step {
                Step::Claim(end, key) => model.claim(end, key)?,
                Step::Deliver { from, grant } => model.deliver(from, grant)?,
            }
            model.check_agreement()?;
        }
        // Drain both channels: every claim resolves, on both ends, the same way.
        while !(model.ends[0].outbox.is_empty() && model.ends[1].outbox.is_empty()) {
            model.deliver(0, true)?;
            model.deliver(1, true)?;
            model.check_agreement()?;
        }
        for (id, v) in model.claims.iter().enumerate() {
            prop_assert!(v.owner.is_some() && v.peer.is_some(), "claim {} unresolved: {:?}", id, v);
        }
        prop_assert_eq!(model.ends[0].claims.pending(), 0);
        prop_assert_eq!(model.ends[1].claims.pending(), 0);
    }
}

/// The interleaving property is only worth something if races actually happen in it.
#[test]
fn the_interleaving_model_exercises_races() {
    let mut model = Model::new(1, 1, 4);
    for key in 0..4 {
        model.claim(0, key).unwrap();
        model.claim(1, key).unwrap();
    }
    for _ in 0..4 {
        model.deliver(0, true).unwrap();
        model.deliver(1, true).unwrap();
    }
    assert_eq!(model.races, 8, "each of the 4 races seen on both ends");
    model.check_agreement().unwrap();
}
