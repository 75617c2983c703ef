//! The field report's client (seeds/000, DESIGN.md §3 "The CPU-saturated client"): every core busy
//! with the application's own work, replies sent from a plain thread, and the driver must still
//! acknowledge and heartbeat so that no connection is declared dead.
//!
//! In a file of its own so that cargo runs it apart from the timing-sensitive fault scenarios; the
//! three runtimes' runs take a lock so they do not saturate the machine for each other either.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use steadfast_core::{Mode, Seq};
use steadfast_tests::{
    DATA, Hook, Pair, Rt, Setup, assert_exactly_once_in_order, lock, number, numbered,
    on_every_runtime, run, wait_for, within,
};

/// Events the server sends.
const EVENTS: u64 = 600;
/// One event every 5 ms: the run lasts several idle timeouts, so a starved driver would show.
const PACE: Duration = Duration::from_millis(5);
/// For everything to arrive on a machine whose cores are all busy.
const ARRIVAL: Duration = Duration::from_secs(25);
const STEP: Duration = Duration::from_secs(5);

/// One saturated run at a time, whatever the test harness's thread count.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

on_every_runtime! {
    runner: saturated;
    with_every_core_saturated_every_reply_from_a_plain_thread_reaches_the_server_and_no_connection_is_declared_dead
        => replies_from_a_plain_thread();
}

/// Runs a scenario with every core busy, one run at a time.
fn saturated<R: Rt, F: std::future::Future<Output = ()>>(scenario: F) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    // Busy before the session starts (the scenario's future does nothing until run), until the
    // test ends, even by a panic.
    let _burners = Burners::start();
    run::<R, _>(Duration::from_secs(45), scenario);
}

async fn replies_from_a_plain_thread<R: Rt>() {
    // The application hands each event to a plain worker thread, which replies.
    let (jobs, queue) = mpsc::channel::<(Seq, u64)>();
    let hook: Hook = Box::new(move |m| {
        if m.stream == DATA
            && let Some(n) = number(&m.payload)
        {
            let _ = jobs.send((m.seq, n));
        }
    });
    let pair = Pair::start::<R>(Setup {
        client_hook: Some(hook),
        ..Setup::default()
    })
    .await;
    let client = pair.client.clone();
    let worker = std::thread::spawn(move || {
        let mut refused = Vec::new();
        for (seq, n) in queue {
            if let Err(e) = client.reply(seq, numbered(n)) {
                refused.push(format!("reply to event {n}: {e:?}"));
            }
        }
        refused
    });

    // Event number → its sequence number in the session, for matching replies.
    let mut events = BTreeMap::new();
    for n in 0..EVENTS {
        let sent = within(
            STEP,
            format_args!("room to send event {n}"),
            pair.server
                .send(pair.session, DATA, Mode::Ordered, numbered(n)),
        )
        .await
        .unwrap_or_else(|e| panic!("event {n} refused: {e:?}"));
        events.insert(
            n,
            sent.seq()
                .expect("an ordered message has a sequence number"),
        );
        async_io::Timer::after(PACE).await;
    }
    wait_for(
        ARRIVAL,
        format_args!("a reply to each of the {EVENTS} events"),
        || lock(&pair.server_log).replies.len() as u64 >= EVENTS,
        || pair.state(),
    )
    .await;

    let client_log = lock(&pair.client_log).clone();
    let server_log = lock(&pair.server_log).clone();
    assert_exactly_once_in_order("events to the client", &client_log.received, EVENTS);
    // Each reply answers its own event, once.
    let mut answered: BTreeMap<Seq, u64> = BTreeMap::new();
    for &(to, n) in &server_log.replies {
        assert_eq!(events.get(&n), Some(&to), "reply {n} answers event {n}");
        assert!(answered.insert(to, n).is_none(), "event {n} answered twice");
    }
    assert_eq!(answered.len() as u64, EVENTS);
    // Never declared dead, on either side: the drivers kept talking however busy the cores were.
    let counters = pair.client.counters();
    assert_eq!(counters.idle_timeouts, 0, "{counters:?}");
    assert_eq!(counters.disconnects, 0, "{counters:?}");
    assert!(
        server_log.disconnected.is_empty(),
        "the server saw a disconnect: {server_log:?}"
    );
    pair.assert_session_intact();

    pair.finish(STEP).await;
    // The hook went with the client's watcher, so the worker's queue is closed.
    let refused = worker.join().expect("the reply worker");
    assert!(refused.is_empty(), "{refused:?}");
}

/// One spinning thread per core, stopped on drop.
struct Burners {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<u64>>,
}

impl Burners {
    fn start() -> Burners {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..cores)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64;
                    while !stop.load(Ordering::Relaxed) {
                        for _ in 0..10_000 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                        }
                        x = std::hint::black_box(x);
                    }
                    x
                })
            })
            .collect();
        Burners { stop, threads }
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
