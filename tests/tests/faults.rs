//! Network faults on real loopback TCP, through the chaos proxy, on every runtime.
//!
//! Each scenario is one generic `async fn`, run once per runtime by `on_every_runtime!` (tests
//! `tokio::…`, `smol::…`, `async_std::…`). Numbered messages stream both ways while the proxy
//! breaks the path; afterwards the test's own ledgers must show every message delivered exactly
//! once and in order, and the session's events and counters must show that the fault was detected
//! the way the scenario says and recovered from by a resume — or, after a server restart, that the
//! session ended loudly with exactly the undelivered messages handed back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use steadfast_core::Mode;
use steadfast_core::session::LostReason;
use steadfast_tests::{
    Direction, Fault, IDLE_TIMEOUT, Pair, Rt, Setup, Target, any_port, lock, number, numbered,
    on_every_runtime, run, server_options, wait_for, watch_server, within,
};

/// One message each way every 5 ms: enough traffic that a fault always catches some in flight.
const PACE: Duration = Duration::from_millis(5);
/// Messages each way that show the session is flowing (before a fault, and again after it).
const FLOWING: usize = 40;
/// For one step (some messages through, senders stopping) on a loaded 2-core machine.
const STEP: Duration = Duration::from_secs(5);
/// From a fault to the resume: idle detection (1 s), a reconnect or two, the handshake.
const RECOVERY: Duration = Duration::from_secs(8);
/// For a whole scenario: a hang fails the test instead of stalling the suite.
const SCENARIO: Duration = Duration::from_secs(45);
/// Slack for timers on a loaded machine when checking that something was not too early.
const SLACK: Duration = Duration::from_millis(250);

/// Runs a scenario on `R`, failing it if it hangs.
fn in_time<R: Rt, F: std::future::Future<Output = ()>>(scenario: F) {
    run::<R, _>(SCENARIO, scenario);
}

on_every_runtime! {
    runner: in_time;
    a_blackhole_longer_than_the_idle_timeout_is_detected_and_the_session_resumes_with_nothing_lost_or_duplicated
        => blackhole_longer_than_the_idle_timeout();
    repeated_resets_during_traffic_each_lead_to_a_resume_with_nothing_lost_or_duplicated
        => resets_during_traffic();
    a_path_dead_from_client_to_server_is_declared_dead_by_the_server_and_the_session_resumes_intact
        => half_open(Direction::ClientToServer);
    a_path_dead_from_server_to_client_is_declared_dead_by_the_client_and_the_session_resumes_intact
        => half_open(Direction::ServerToClient);
    a_partition_shorter_than_the_retention_fails_every_reconnect_then_the_session_resumes_intact
        => partition_shorter_than_the_retention();
    a_restarted_server_ends_the_session_loudly_and_hands_back_exactly_the_undelivered_messages
        => server_restart();
}

/// Scenario 1: a silently dead path (both directions) that never comes back for this connection.
async fn blackhole_longer_than_the_idle_timeout<R: Rt>() {
    let pair = Pair::start::<R>(Setup::default()).await;
    let traffic = pair.traffic::<R>(PACE);
    pair.progress(FLOWING, STEP, "before the blackhole").await;

    let hit = pair.chaos.apply(Target::All, Fault::Blackhole);
    assert_eq!(hit, 1, "the blackhole catches the session's connection");
    let blackholed = Instant::now();
    // Only the idle timeout can tell: nothing closes, nothing errors.
    pair.resumed(1, RECOVERY).await;
    let outage = blackholed.elapsed();
    pair.progress(FLOWING, STEP, "after the resume").await;
    let sent = traffic.stop(STEP).await;
    pair.settle(sent, STEP).await;

    let counters = pair.client.counters();
    assert!(
        counters.idle_timeouts >= 1,
        "the client declared the path dead by its idle timeout: {counters:?}"
    );
    assert!(counters.resumes >= 1, "the client resumed: {counters:?}");
    assert!(
        outage + SLACK >= IDLE_TIMEOUT,
        "a live-looking path is not declared dead before the idle timeout (resumed after \
         {outage:?})"
    );
    assert!(lock(&pair.server_log).resumes() >= 1);
    assert_eq!(pair.chaos.stats().applied.blackhole, 1);
    pair.assert_session_intact();
    pair.finish(STEP).await;
}

/// Scenario 2: RSTs on a live connection, several times in a row.
async fn resets_during_traffic<R: Rt>() {
    const RESETS: usize = 3;
    let pair = Pair::start::<R>(Setup::default()).await;
    // A little latency on every connection, so each reset destroys messages still in the proxy:
    // the resume must resend them, not just carry on with what was never sent.
    pair.chaos
        .apply(Target::AllAndNew, Fault::Delay(Duration::from_millis(30)));
    let traffic = pair.traffic::<R>(PACE);
    let mut hits = 0;
    for i in 0..RESETS {
        // Traffic flowing on a resumed connection: the reset hits a live, established one.
        pair.progress(FLOWING, STEP, &format!("before reset {i}"))
            .await;
        hits += pair.chaos.apply(Target::All, Fault::Reset);
        pair.resumed(i + 1, RECOVERY).await;
    }
    pair.progress(FLOWING, STEP, "after the last resume").await;
    let sent = traffic.stop(STEP).await;
    pair.settle(sent, STEP).await;

    assert_eq!(
        hits, RESETS,
        "each reset caught the session's one connection"
    );
    let counters = pair.client.counters();
    assert!(
        counters.resumes >= hits as u64,
        "a resume per reset that hit a live connection ({hits}): {counters:?}"
    );
    // A reset is news at once: nobody waits for an idle timeout.
    assert_eq!(counters.idle_timeouts, 0, "{counters:?}");
    // The delayed messages the resets destroyed were resent, both ways.
    assert!(counters.resent_on_resume > 0, "{counters:?}");
    let server_counters = pair
        .server
        .inspect_session(pair.session, |s| s.counters(pair.session))
        .expect("the server holds the session");
    assert!(server_counters.resent_on_resume > 0, "{server_counters:?}");
    let server = lock(&pair.server_log).clone();
    assert!(server.resumes() >= RESETS, "{server:?}");
    assert_eq!(server.idle_timeouts(), 0, "{server:?}");
    drop(server);
    pair.assert_session_intact();
    pair.finish(STEP).await;
}

/// Scenario 3: one direction goes silently dead; the side that stops hearing must notice.
async fn half_open<R: Rt>(direction: Direction) {
    let pair = Pair::start::<R>(Setup::default()).await;
    let traffic = pair.traffic::<R>(PACE);
    pair.progress(FLOWING, STEP, "before the half-open fault")
        .await;

    let hit = pair.chaos.apply(Target::All, Fault::HalfOpen { direction });
    assert_eq!(hit, 1, "the fault catches the session's connection");
    pair.resumed(1, RECOVERY).await;
    pair.progress(FLOWING, STEP, "after the resume").await;
    let sent = traffic.stop(STEP).await;
    pair.settle(sent, STEP).await;

    let client = lock(&pair.client_log).clone();
    let server = lock(&pair.server_log).clone();
    let counters = pair.client.counters();
    match direction {
        // The server hears nothing; the client still hears the server until the server hangs up.
        Direction::ClientToServer => {
            assert!(
                server.idle_timeouts() >= 1,
                "the server declared the connection dead: {server:?}"
            );
            assert_eq!(
                counters.idle_timeouts, 0,
                "the client kept hearing the server: {counters:?}"
            );
        }
        // The client hears nothing; the server still hears the client until the client hangs up.
        Direction::ServerToClient => {
            assert!(
                counters.idle_timeouts >= 1 && client.idle_timeouts() >= 1,
                "the client declared the connection dead: {counters:?}, {client:?}"
            );
            assert_eq!(
                server.idle_timeouts(),
                0,
                "the server kept hearing the client: {server:?}"
            );
        }
    }
    assert!(counters.resumes >= 1, "{counters:?}");
    assert!(server.resumes() >= 1, "{server:?}");
    pair.assert_session_intact();
    pair.finish(STEP).await;
}

/// Scenario 4: every connection, old and new, is dead for a while; then the network heals.
async fn partition_shorter_than_the_retention<R: Rt>() {
    let pair = Pair::start::<R>(Setup::default()).await;
    let traffic = pair.traffic::<R>(PACE);
    pair.progress(FLOWING, STEP, "before the partition").await;

    let accepted = pair.chaos.stats().accepted;
    let partitioned = Instant::now();
    let hit = pair.chaos.apply(Target::AllAndNew, Fault::Blackhole);
    assert_eq!(hit, 1, "the partition catches the session's connection");
    // Reconnect attempts into the partition: each connects to the proxy, hears nothing back and
    // is given up by the idle timeout. One more accepted than failed proves the failures.
    let failed = 2;
    wait_for(
        RECOVERY,
        format_args!("{failed} failed reconnect attempts during the partition"),
        || pair.chaos.stats().accepted > accepted + failed,
        || pair.state(),
    )
    .await;
    assert!(
        !pair.client.is_connected(),
        "no attempt got through the partition"
    );
    assert_eq!(
        lock(&pair.server_log).resumes(),
        0,
        "nothing resumed during the partition"
    );
    pair.chaos.heal(Target::AllAndNew);
    let healed = Instant::now();
    pair.resumed(1, RECOVERY).await;
    let partition = healed - partitioned;
    pair.progress(FLOWING, STEP, "after the resume").await;
    let sent = traffic.stop(STEP).await;
    pair.settle(sent, STEP).await;

    assert!(
        partition < steadfast_tests::RETENTION,
        "the partition ({partition:?}) was shorter than the retention"
    );
    let counters = pair.client.counters();
    // The original connection and the attempts in the partition died of silence.
    assert!(counters.idle_timeouts > failed, "{counters:?}");
    assert!(counters.resumes >= 1, "{counters:?}");
    let server = lock(&pair.server_log).clone();
    assert!(!server.disconnected.is_empty(), "{server:?}");
    pair.assert_session_intact();
    pair.finish(STEP).await;
}

/// How long the client may take to learn its session is gone once the new server is reachable.
const LOST_LIMIT: Duration = Duration::from_secs(5);

/// Scenario 5: the server restarts on a new port, forgetting every session.
async fn server_restart<R: Rt>() {
    let pair = Pair::start::<R>(Setup::default()).await;
    let traffic = pair.traffic::<R>(PACE);
    pair.progress(FLOWING, STEP, "before the restart").await;
    let delivered = traffic.stop(STEP).await;
    pair.settle(delivered, STEP).await;
    // Everything so far is acknowledged: it must not be handed back.
    wait_for(
        STEP,
        "the client's messages to be acknowledged",
        || {
            pair.client
                .inspect(|c| c.channel().sender().queued_messages())
                == 0
        },
        || pair.state(),
    )
    .await;

    // Messages sent into a dead path, then while disconnected: none can reach the old server.
    let mut next = delivered.up;
    let hit = pair.chaos.apply(Target::All, Fault::Blackhole);
    assert_eq!(hit, 1);
    next = send_numbered(&pair, next, 20).await;
    pair.server.shutdown();
    wait_for(
        RECOVERY,
        "the client to notice the dead connection",
        || !lock(&pair.client_log).disconnected.is_empty(),
        || pair.state(),
    )
    .await;
    next = send_numbered(&pair, next, 20).await;

    let new_server = R::listen(any_port(), server_options())
        .await
        .expect("the new server binds a loopback port");
    let (new_log, new_watch) = watch_server::<R>(&new_server);
    pair.chaos.set_upstream(new_server.local_addr());
    let restarted = Instant::now();
    wait_for(
        LOST_LIMIT,
        "SessionLost once the new server answers",
        || lock(&pair.client_log).lost.is_some(),
        || pair.state(),
    )
    .await;
    let took = restarted.elapsed();

    let client = lock(&pair.client_log).clone();
    let (reason, handed_back) = client.lost.clone().expect("waited for it above");
    assert_eq!(reason, LostReason::Expired, "{client:?}");
    assert!(
        handed_back
            .iter()
            .all(|m| m.stream == steadfast_tests::DATA),
        "{handed_back:?}"
    );
    let handed: Vec<u64> = handed_back
        .iter()
        .map(|m| number(&m.payload).expect("a numbered message"))
        .collect();
    let old = lock(&pair.server_log).clone();
    let on_old: BTreeSet<u64> = old.received.iter().copied().collect();
    let back: BTreeSet<u64> = handed.iter().copied().collect();
    let both: Vec<u64> = on_old.intersection(&back).copied().collect();
    let neither: Vec<u64> = (0..next)
        .filter(|n| !on_old.contains(n) && !back.contains(n))
        .collect();
    assert!(both.is_empty(), "delivered and handed back: {both:?}");
    assert!(
        neither.is_empty(),
        "neither delivered nor handed back: {neither:?}"
    );
    // Exactly: the acknowledged prefix on the old server, the rest handed back in order.
    steadfast_tests::assert_exactly_once_in_order(
        "client to the old server",
        &old.received,
        delivered.up,
    );
    assert!(
        handed.iter().copied().eq(delivered.up..next),
        "handed back in order: {handed:?}"
    );
    assert!(took < LOST_LIMIT, "SessionLost {took:?} after the restart");

    // The end is loud and final.
    assert!(
        pair.client
            .try_send(steadfast_tests::DATA, Mode::Ordered, numbered(next))
            .is_err(),
        "a lost session refuses sends"
    );
    assert!(!within(STEP, "connected() to give up", pair.client.connected()).await);
    let new = lock(&new_log).clone();
    assert!(
        new.sessions.is_empty() && new.connected.is_empty(),
        "the new server knows no session: {new:?}"
    );
    assert!(
        client.connected.iter().filter(|r| **r).count() == 0,
        "never resumed: {client:?}"
    );
    new_server.shutdown();
    within(STEP, "the new server's events to end", new_watch).await;
    drop(pair);
}

/// Sends `count` numbered messages from the client starting at `from`; returns the next number.
async fn send_numbered(pair: &Pair, from: u64, count: u64) -> u64 {
    for n in from..from + count {
        within(
            STEP,
            format_args!("room to send message {n}"),
            pair.client
                .send(steadfast_tests::DATA, Mode::Ordered, numbered(n)),
        )
        .await
        .unwrap_or_else(|e| panic!("message {n} refused: {e:?}"));
    }
    from + count
}
