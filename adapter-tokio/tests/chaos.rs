//! The chaos proxy against real loopback sockets: each fault does to the peers what its
//! documentation says, and nothing more.
//!
//! Waits are bounded by timeouts: `PATIENCE` for what must happen (generous, so a loaded CI machine
//! does not fail a correct proxy), `SILENCE` for what must not (long enough that a proxy that lets
//! bytes through would have done so on loopback).

use std::future::Future;
use std::io;
use std::mem::discriminant;
use std::net::SocketAddr;
use std::time::Duration;

use steadfast_tokio::chaos::{ChaosProxy, Direction, Fault, Schedule, Step, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};

const PATIENCE: Duration = Duration::from_secs(5);
const SILENCE: Duration = Duration::from_millis(200);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match timeout(PATIENCE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// Polls a condition that has no event to wait on, failing after `PATIENCE`.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A proxy in front of an echo server, and a client whose connection the proxy has accepted.
async fn echo_client() -> (ChaosProxy, TcpStream) {
    let proxy = ChaosProxy::start(echo_server().await).await.unwrap();
    let client = connect(&proxy, 1).await;
    (proxy, client)
}

/// Connects to the proxy and waits until it has accepted its `nth` connection, so faults aimed at
/// open connections reach this one.
async fn connect(proxy: &ChaosProxy, nth: u64) -> TcpStream {
    let client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    within("the proxy to accept", proxy.wait_for_accepted(nth)).await;
    client
}

/// A proxy, a client connected through it and the server's end of that connection, so a test can
/// write and read each direction separately.
async fn pair() -> (ChaosProxy, TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = ChaosProxy::start(listener.local_addr().unwrap())
        .await
        .unwrap();
    let client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (server, _) = within("the upstream connection", listener.accept())
        .await
        .unwrap();
    (proxy, client, server)
}

async fn round_trip(client: &mut TcpStream, message: &[u8]) -> Vec<u8> {
    client.write_all(message).await.unwrap();
    receive(client, message.len()).await
}

async fn receive(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    within("bytes to arrive", stream.read_exact(&mut buf))
        .await
        .unwrap();
    buf
}

/// The stream stays open and quiet: a read neither returns bytes nor end-of-file nor an error.
async fn assert_silent(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    if let Ok(read) = timeout(SILENCE, stream.read(&mut buf)).await {
        panic!("{what} should be open and silent, but a read gave {read:?}");
    }
}

async fn assert_reset(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    let read = within(what, stream.read(&mut buf)).await;
    assert!(
        matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
        "{what} should see an RST, but a read gave {read:?}"
    );
}

/// Connects and expects the proxy to reset the connection at once; the RST can beat the connect's
/// own completion, so either may report it.
async fn assert_turned_away(proxy: &ChaosProxy, what: &str) {
    match TcpStream::connect(proxy.local_addr()).await {
        Ok(mut stream) => assert_reset(&mut stream, what).await,
        Err(error) => assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{what}"),
    }
}

async fn assert_end_of_file(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    let read = within(what, stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0)),
        "{what} should see end-of-file, but a read gave {read:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_pass_both_ways_through_a_healthy_proxy_and_are_counted() {
    let (proxy, mut client) = echo_client().await;

    assert_eq!(round_trip(&mut client, b"hello").await, b"hello");

    let stats = proxy.stats();
    assert_eq!(
        (stats.accepted, stats.bytes_up, stats.bytes_down),
        (1, 5, 5)
    );
    let conns = proxy.connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].client, client.local_addr().unwrap());
    assert_eq!((conns[0].bytes_up, conns[0].bytes_down), (5, 5));
    assert_eq!(conns[0].faults, []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_keeps_the_client_connected_but_silent_and_what_lost_bytes_stays_dead_after_heal()
 {
    let (proxy, mut client) = echo_client().await;
    assert_eq!(round_trip(&mut client, b"ping").await, b"ping");

    assert_eq!(proxy.apply(Target::All, Fault::Blackhole), 1);
    client.write_all(b"lost").await.unwrap();
    assert_silent(&mut client, "the blackholed client").await;
    assert_eq!(proxy.connections()[0].faults, [Fault::Blackhole]);
    eventually("the blackhole to swallow 4 bytes", || {
        proxy.stats().bytes_dropped == 4
    })
    .await;

    assert_eq!(proxy.heal(Target::All), 1);
    assert_eq!(proxy.connections()[0].faults, []);
    // TCP cannot skip the hole where "lost" was: this connection never carries a byte again.
    client.write_all(b"more").await.unwrap();
    assert_silent(&mut client, "a healed connection that lost bytes").await;
    eventually("the dead connection to drop 4 more bytes", || {
        proxy.stats().bytes_dropped == 8
    })
    .await;
    let mut fresh = connect(&proxy, 2).await;
    assert_eq!(round_trip(&mut fresh, b"back").await, b"back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_that_caught_nothing_heals_its_connection_fully() {
    let (proxy, mut client) = echo_client().await;

    proxy.apply(Target::All, Fault::Blackhole);
    assert_silent(&mut client, "the blackholed client").await;
    proxy.heal(Target::All);
    assert_eq!(round_trip(&mut client, b"back").await, b"back");
    assert_eq!(proxy.stats().bytes_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_sent_into_a_blackhole_stay_lost_even_when_a_delay_still_held_them_at_the_heal() {
    let (proxy, mut client) = echo_client().await;

    proxy.apply(Target::All, Fault::Delay(Duration::from_secs(3600)));
    proxy.apply(Target::All, Fault::Blackhole);
    client.write_all(b"lost").await.unwrap();
    // Dropped as they arrive, not when the hour-long delay would have released them.
    eventually("the blackhole to swallow 4 bytes", || {
        proxy.stats().bytes_dropped == 4
    })
    .await;

    proxy.heal(Target::All);
    client.write_all(b"more").await.unwrap();
    assert_silent(&mut client, "a healed connection that lost bytes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackhole_holds_back_a_closing_peers_end_of_file_until_it_heals() {
    let (proxy, mut client, mut server) = pair().await;

    proxy.apply(Target::All, Fault::Blackhole);
    server.shutdown().await.unwrap();
    assert_silent(&mut client, "the client behind a blackhole").await;

    proxy.heal(Target::All);
    assert_end_of_file(&mut client, "the client after the heal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_holds_bytes_both_ways_and_delivers_them_in_order_after_heal() {
    let (proxy, mut client, mut server) = pair().await;

    proxy.apply(Target::All, Fault::Freeze);
    client.write_all(b"one").await.unwrap();
    client.write_all(b"two").await.unwrap();
    server.write_all(b"three").await.unwrap();
    assert_silent(&mut server, "the frozen server").await;
    assert_silent(&mut client, "the frozen client").await;

    proxy.heal(Target::All);
    assert_eq!(receive(&mut server, 6).await, b"onetwo");
    assert_eq!(receive(&mut client, 5).await, b"three");
    assert_eq!(proxy.stats().bytes_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_gives_both_peers_an_rst_promptly_and_forgets_the_connection() {
    let (proxy, mut client, mut server) = pair().await;
    let id = proxy.connections()[0].id;

    assert_eq!(proxy.apply(Target::Conn(id), Fault::Reset), 1);

    assert_reset(&mut client, "the client").await;
    assert_reset(&mut server, "the server").await;
    assert!(proxy.connections().is_empty());
    assert_eq!(proxy.stats().applied.reset, 1);
    assert_eq!(proxy.apply(Target::Conn(id), Fault::Blackhole), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_adds_at_least_the_delay_each_way_and_keeps_the_order() {
    let (proxy, mut client) = echo_client().await;
    let delay = Duration::from_millis(150);

    proxy.apply(Target::All, Fault::Delay(delay));
    let start = Instant::now();
    for part in [b"a", b"b", b"c"] {
        client.write_all(part).await.unwrap();
    }
    assert_eq!(receive(&mut client, 3).await, b"abc");

    let elapsed = start.elapsed();
    assert!(elapsed >= 2 * delay, "a round trip took only {elapsed:?}");
    assert_eq!(proxy.connections()[0].faults, [Fault::Delay(delay)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_paces_a_direction_to_its_rate() {
    let (proxy, mut client, mut server) = pair().await;
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();

    proxy.apply(
        Target::All,
        Fault::Throttle {
            bytes_per_sec: 20_000,
        },
    );
    let start = Instant::now();
    client.write_all(&data).await.unwrap();
    assert_eq!(receive(&mut server, data.len()).await, data);

    // Half a second at 20 kB/s, less the first slice, which goes at once.
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(400),
        "10 kB at 20 kB/s took only {elapsed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_silences_one_direction_and_leaves_the_other_working() {
    for direction in [Direction::ClientToServer, Direction::ServerToClient] {
        let (proxy, mut client, mut server) = pair().await;
        proxy.apply(Target::All, Fault::HalfOpen { direction });

        client.write_all(b"up").await.unwrap();
        server.write_all(b"down").await.unwrap();

        match direction {
            Direction::ClientToServer => {
                assert_silent(&mut server, "the server, cut off from the client").await;
                assert_eq!(receive(&mut client, 4).await, b"down");
            }
            Direction::ServerToClient => {
                assert_silent(&mut client, "the client, cut off from the server").await;
                assert_eq!(receive(&mut server, 2).await, b"up");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_gives_one_peer_end_of_file_and_leaves_the_other_direction_working() {
    let (proxy, mut client, mut server) = pair().await;

    proxy.apply(
        Target::All,
        Fault::HalfClose {
            direction: Direction::ServerToClient,
        },
    );
    assert_end_of_file(&mut client, "the client").await;

    client.write_all(b"still here").await.unwrap();
    assert_eq!(receive(&mut server, 10).await, b"still here");

    // The end-of-file has been sent; healing cannot take it back.
    proxy.heal(Target::All);
    assert_eq!(
        proxy.connections()[0].faults,
        [Fault::HalfClose {
            direction: Direction::ServerToClient
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_new_connections_resets_them_until_lifted() {
    let proxy = ChaosProxy::start(echo_server().await).await.unwrap();

    proxy.refuse_new(true);
    assert_turned_away(&proxy, "a refused client").await;
    assert_eq!((proxy.stats().refused, proxy.stats().accepted), (1, 0));

    proxy.refuse_new(false);
    let mut client = connect(&proxy, 1).await;
    assert_eq!(round_trip(&mut client, b"up again").await, b"up again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_silences_connections_made_during_it_until_healed_for_new_ones_too() {
    let (proxy, mut before) = echo_client().await;

    assert_eq!(proxy.apply(Target::AllAndNew, Fault::Blackhole), 1);
    let mut during = connect(&proxy, 2).await;
    during.write_all(b"x").await.unwrap();
    assert_silent(&mut during, "a client that connected during the partition").await;
    assert_eq!(proxy.connections()[1].faults, [Fault::Blackhole]);

    // Healing the open connections leaves the partition waiting for the next arrival.
    assert_eq!(proxy.heal(Target::All), 2);
    assert_eq!(round_trip(&mut before, b"b").await, b"b");
    let mut after = connect(&proxy, 3).await;
    after.write_all(b"x").await.unwrap();
    assert_silent(&mut after, "a client that connected after a partial heal").await;
    // Both "x"s are gone before the heal, so the round trips below cannot meet them.
    eventually("both x to be dropped", || proxy.stats().bytes_dropped == 2).await;

    assert_eq!(proxy.heal(Target::AllAndNew), 3);
    // The connections that lost their "x" stay dead; a new one gets through.
    after.write_all(b"a").await.unwrap();
    assert_silent(&mut after, "a connection that lost bytes in the partition").await;
    let mut later = connect(&proxy, 4).await;
    assert_eq!(round_trip(&mut later, b"l").await, b"l");
    assert_eq!(proxy.stats().applied.blackhole, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_target_reaches_only_that_connection() {
    let (proxy, mut first) = echo_client().await;
    let mut second = connect(&proxy, 2).await;
    let first_id = proxy.connections()[0].id;

    assert_eq!(proxy.apply(Target::Conn(first_id), Fault::Blackhole), 1);
    assert_eq!(round_trip(&mut second, b"2").await, b"2");
    first.write_all(b"1").await.unwrap();
    assert_silent(&mut first, "the blackholed connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_follow_the_upstream_to_its_new_address() {
    let old = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let new = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = ChaosProxy::start(old.local_addr().unwrap()).await.unwrap();
    let _first = connect(&proxy, 1).await;
    within("the old server to accept", old.accept())
        .await
        .unwrap();

    proxy.set_upstream(new.local_addr().unwrap());
    let _second = connect(&proxy, 2).await;

    within("the new server to accept", new.accept())
        .await
        .unwrap();
    assert!(timeout(SILENCE, old.accept()).await.is_err());
    let upstreams: Vec<_> = proxy.connections().iter().map(|c| c.upstream).collect();
    assert_eq!(
        upstreams,
        [old.local_addr().unwrap(), new.local_addr().unwrap()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_reset_when_the_upstream_is_unreachable() {
    let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = gone.local_addr().unwrap();
    drop(gone);
    let proxy = ChaosProxy::start(addr).await.unwrap();

    assert_turned_away(&proxy, "a client with no server behind the proxy").await;
    assert_eq!(proxy.stats().accepted, 1);
    assert!(proxy.connections().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_its_connections_gracefully() {
    let (proxy, mut client, mut server) = pair().await;

    drop(proxy);

    assert_end_of_file(&mut client, "the client").await;
    assert_end_of_file(&mut server, "the server").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_accumulate_and_a_second_of_a_kind_replaces_the_first() {
    let (proxy, _client, _server) = pair().await;
    let ms = Duration::from_millis;

    proxy.apply(Target::All, Fault::Delay(ms(10)));
    proxy.apply(
        Target::All,
        Fault::Throttle {
            bytes_per_sec: 1000,
        },
    );
    proxy.apply(Target::All, Fault::Delay(ms(20)));
    assert_eq!(
        proxy.connections()[0].faults,
        [
            Fault::Delay(ms(20)),
            Fault::Throttle {
                bytes_per_sec: 1000
            }
        ]
    );

    proxy.heal(Target::All);
    assert_eq!(proxy.connections()[0].faults, []);
    let stats = proxy.stats();
    assert_eq!(
        (stats.applied.delay, stats.applied.throttle, stats.heals),
        (2, 1, 1)
    );
}

fn mixed() -> Schedule {
    let ms = Duration::from_millis;
    Schedule::new([
        Fault::Blackhole,
        Fault::Freeze,
        Fault::Delay(ms(1)),
        Fault::Throttle {
            bytes_per_sec: 1_000_000,
        },
        Fault::HalfOpen {
            direction: Direction::ClientToServer,
        },
    ])
    .every(ms(2))
    .lasting(ms(1)..=ms(3))
}

#[test]
fn a_seed_always_plans_the_same_faults_and_another_seed_does_not() {
    let schedule = mixed();

    assert_eq!(schedule.plan(42, 50), schedule.plan(42, 50));
    assert_eq!(schedule.clone().plan(42, 50), mixed().plan(42, 50));
    assert_ne!(schedule.plan(42, 50), schedule.plan(43, 50));
    assert_eq!(schedule.plan(42, 10), schedule.plan(42, 50)[..10]);
}

#[test]
fn a_seeds_plan_does_not_change_between_versions() {
    let plan: Vec<(u128, Fault, u128)> = mixed()
        .plan(7, 4)
        .into_iter()
        .map(|step: Step| (step.after.as_micros(), step.fault, step.lasts.as_micros()))
        .collect();

    // Recorded from this implementation: a failure means seeds people have written down no longer
    // reproduce their runs.
    let ms = Duration::from_millis;
    assert_eq!(
        plan,
        [
            (2, Fault::Freeze, 2803),
            (3340, Fault::Delay(ms(1)), 2183),
            (358, Fault::Freeze, 2232),
            (2270, Fault::Blackhole, 2543),
        ]
    );
}

#[test]
fn a_plan_draws_every_listed_fault_and_only_those_with_durations_in_range() {
    let schedule = mixed();
    let listed = [
        Fault::Blackhole,
        Fault::Freeze,
        Fault::Delay(Duration::from_millis(1)),
        Fault::Throttle {
            bytes_per_sec: 1_000_000,
        },
        Fault::HalfOpen {
            direction: Direction::ClientToServer,
        },
    ];

    let steps: Vec<Step> = (0..20).flat_map(|seed| schedule.plan(seed, 50)).collect();

    for step in &steps {
        assert!(listed.contains(&step.fault), "{step:?}");
        assert!(step.after <= Duration::from_millis(4), "{step:?}");
        let lasts = Duration::from_millis(1)..=Duration::from_millis(3);
        assert!(lasts.contains(&step.lasts), "{step:?}");
    }
    for fault in listed {
        assert!(
            steps.iter().any(|s| s.fault == fault),
            "{fault:?} never drawn"
        );
    }
    assert_eq!(schedule.clone().limit(3).plan(1, 50).len(), 3);
    assert!(Schedule::new([]).plan(1, 50).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_a_schedule_applies_its_plan_and_leaves_the_connection_healed() {
    let (proxy, mut client, mut server) = pair().await;
    let steps = 12;
    let schedule = mixed().limit(steps);

    let run = proxy.run_schedule(9, schedule.clone());
    within("the schedule to finish", run).await.unwrap();

    let plan = schedule.plan(9, steps);
    let applied = proxy.stats().applied;
    for step in &plan {
        let planned = plan
            .iter()
            .filter(|s| discriminant(&s.fault) == discriminant(&step.fault))
            .count();
        assert_eq!(applied.of(&step.fault), planned as u64, "{:?}", step.fault);
    }
    assert_eq!(proxy.stats().heals, steps as u64);
    assert_eq!(proxy.connections()[0].faults, []);
    client.write_all(b"after").await.unwrap();
    assert_eq!(receive(&mut server, 5).await, b"after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborting_a_schedule_heals_the_fault_it_had_in_force() {
    let (proxy, mut client, mut server) = pair().await;
    let hour = Duration::from_secs(3600);
    let schedule = Schedule::new([Fault::Blackhole])
        .every(Duration::ZERO)
        .lasting(hour..=hour);

    let run = proxy.run_schedule(1, schedule);
    eventually("the blackhole", || proxy.stats().applied.blackhole == 1).await;
    run.abort();
    assert!(within("the schedule to stop", run).await.is_err());

    assert_eq!(proxy.connections()[0].faults, []);
    client.write_all(b"free").await.unwrap();
    assert_eq!(receive(&mut server, 4).await, b"free");
}

#[test]
fn a_proxy_handle_can_be_shared_across_threads_and_tasks() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<ChaosProxy>();
    shareable::<Schedule>();
}
