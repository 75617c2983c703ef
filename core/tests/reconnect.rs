//! The reconnect policy's invariants under any policy, any server count and any sequence of reports:
//! attempts are never scheduled in the past or further out than the policy's maximum delay, server
//! indices stay in range, giving up is final, and the schedule is a pure function of the inputs.

use proptest::prelude::*;
use steadfast_core::reconnect::{Backoff, ConnectTo, GaveUp, Jitter, ReconnectPolicy, Reconnector};
use steadfast_core::time::{Duration, Instant};

/// One thing that happens to the client, at the current time.
#[derive(Debug, Clone)]
enum Op {
    /// The pending attempt failed.
    Fail(u64),
    /// The pending attempt succeeded.
    Connect,
    /// The connection broke.
    Disconnect(u64),
    /// Time passes by this many nanoseconds.
    Advance(u64),
    /// Time jumps to the scheduled attempt, as an adapter sleeping on the deadline would.
    ToDeadline,
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1u64..1_000).prop_map(Duration::from_nanos),
        (1u64..5_000).prop_map(Duration::from_millis),
        (1u64..u64::MAX).prop_map(Duration::from_nanos),
        Just(Duration::MAX),
    ]
}

fn backoff() -> impl Strategy<Value = Backoff> {
    prop_oneof![
        duration().prop_map(|delay| Backoff::Fixed { delay }),
        (
            duration(),
            prop_oneof![1u32..=4, Just(u32::MAX), 1u32..=u32::MAX],
            duration()
        )
            .prop_map(|(initial, factor, extra)| Backoff::Exponential {
                initial,
                factor,
                max: initial.saturating_add(extra),
            }),
    ]
}

fn policy() -> impl Strategy<Value = ReconnectPolicy> {
    (
        backoff(),
        prop_oneof![Just(Jitter::None), Just(Jitter::Full), Just(Jitter::Equal)],
        proptest::option::of(prop_oneof![
            (1u64..10_000).prop_map(Duration::from_millis),
            duration()
        ]),
        proptest::option::of(1u32..40),
        any::<bool>(),
        prop_oneof![
            Just(Duration::ZERO),
            (0u64..3_000).prop_map(Duration::from_millis)
        ],
    )
        .prop_map(
            |(backoff, jitter, max_total, max_attempts, immediate, stable)| {
                let mut p = ReconnectPolicy::default();
                p.backoff = backoff;
                p.jitter = jitter;
                p.max_total = max_total;
                p.max_attempts = max_attempts;
                p.first_attempt_immediate = immediate;
                p.stable_after = stable;
                p
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u64>().prop_map(Op::Fail),
        2 => Just(Op::Connect),
        2 => any::<u64>().prop_map(Op::Disconnect),
        2 => prop_oneof![0u64..5_000_000_000, any::<u64>()].prop_map(Op::Advance),
        3 => Just(Op::ToDeadline),
    ]
}

/// What one step left behind, for the determinism check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    now: Instant,
    next: Option<ConnectTo>,
    reported: Option<GaveUp>,
    failures: Vec<(u32, u64)>,
}

/// Runs `ops` from `start`, checking the invariants after every step; returns the transcript.
fn run(policy: &ReconnectPolicy, servers: usize, start: Instant, ops: &[Op]) -> Vec<Step> {
    let mut rc = Reconnector::new(policy.clone(), servers).expect("generated policies are valid");
    let mut now = start;
    rc.start(now);
    let mut transcript = Vec::with_capacity(ops.len());
    let mut given_up: Option<GaveUp> = None;
    for op in ops {
        let before = rc.next_attempt();
        let reported = match *op {
            Op::Fail(e) => rc.on_connect_failed(now, e),
            Op::Connect => {
                rc.on_connected(now);
                None
            }
            Op::Disconnect(e) => rc.on_disconnected(now, e),
            Op::Advance(d) => {
                now = now + Duration::from_nanos(d);
                None
            }
            Op::ToDeadline => {
                if let Some(d) = rc.deadline() {
                    now = now.max(d);
                }
                None
            }
        };
        let next = rc.next_attempt();

        // Giving up is reported once, kept, and final.
        match (&given_up, &reported) {
            (None, Some(g)) => given_up = Some(g.clone()),
            (Some(_), Some(_)) => panic!("gave up twice"),
            _ => {}
        }
        assert_eq!(rc.gave_up(), given_up.as_ref());
        if given_up.is_some() {
            assert_eq!(next, None, "an attempt was scheduled after giving up");
            assert_eq!(rc.deadline(), None);
        }

        assert_eq!(rc.deadline(), next.map(|c| c.at));
        if let Some(c) = next {
            assert!(c.server < servers, "server {} of {servers}", c.server);
            assert!(c.attempt >= 1);
            if let Some(m) = policy.max_attempts {
                assert!(
                    c.attempt <= m,
                    "attempt {} beyond max_attempts {m}",
                    c.attempt
                );
            }
            if next != before {
                // Newly scheduled at `now`: not in the past, not further than the maximum delay.
                assert!(c.at >= now, "scheduled at {:?} before now {now:?}", c.at);
                assert!(
                    c.at - now <= policy.max_delay(),
                    "waits {:?}, more than the maximum {:?}",
                    c.at - now,
                    policy.max_delay()
                );
            }
        }
        let failures: Vec<(u32, u64)> = (0..servers)
            .map(|s| (rc.failures(s), rc.total_failures(s)))
            .collect();
        for &(consecutive, total) in &failures {
            assert!(u64::from(consecutive) <= total);
        }
        transcript.push(Step {
            now,
            next,
            reported,
            failures,
        });
    }
    transcript
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn any_sequence_of_reports_keeps_the_schedule_sane_and_deterministic(
        policy in policy(),
        servers in 1usize..5,
        start in prop_oneof![Just(0u64), any::<u64>(), (u64::MAX - 1_000_000_000)..=u64::MAX],
        ops in proptest::collection::vec(op(), 0..80),
    ) {
        let start = Instant::from_nanos(start);
        let first = run(&policy, servers, start, &ops);
        let second = run(&policy, servers, start, &ops);
        prop_assert_eq!(first, second);
    }

    #[test]
    fn an_outage_where_every_attempt_fails_ends_only_by_the_policys_limits(
        policy in policy(),
        servers in 1usize..5,
        entropy in proptest::collection::vec(any::<u64>(), 1..60),
    ) {
        // Sleep to each deadline and fail there: the adapter's loop against a dead cluster.
        let mut rc = Reconnector::new(policy.clone(), servers).unwrap();
        rc.start(Instant::ZERO);
        let mut seen = vec![0u32; servers];
        for (i, &e) in entropy.iter().enumerate() {
            let c = rc.next_attempt().expect("still trying");
            seen[c.server] += 1;
            prop_assert_eq!(c.attempt as usize, i + 1);
            match rc.on_connect_failed(c.at, e) {
                None => {}
                Some(GaveUp::MaxAttempts { attempts }) => {
                    prop_assert_eq!(Some(attempts), policy.max_attempts);
                    prop_assert_eq!(attempts as usize, i + 1);
                    break;
                }
                Some(GaveUp::MaxTotal { tried_for, attempts }) => {
                    let limit = policy.max_total.expect("a time limit is set");
                    // No attempt is scheduled past the budget's end, and only a failure at or after
                    // it gives up: failing on each deadline, that is exactly at the end.
                    prop_assert_eq!(tried_for, limit);
                    prop_assert_eq!(attempts as usize, i + 1);
                    break;
                }
                Some(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }
        // With equal failure counts the choice is plain rotation: no server gets more than one
        // attempt ahead of another.
        let (lo, hi) = (seen.iter().min().unwrap(), seen.iter().max().unwrap());
        prop_assert!(hi - lo <= 1, "uneven rotation {:?}", seen);
    }
}
