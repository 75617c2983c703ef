//! A durable client killed with SIGKILL, again and again, mid-traffic, and restarted on the same
//! store directory: the application's own ledger shows every event delivered exactly once, and every
//! message whose send returned `Ok` reached the server exactly once.
//!
//! The client is this test binary run again as a child process (`durable_client_child`, which does
//! nothing unless `STEADFAST_CHILD_DIR` is set), so the kill is of a real process.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_core::store::file::{FileStore, SyncPolicy};
use steadfast_tests::{client_options, number, numbered, server_options};
use steadfast_tokio::{Mode, ServerEvent, SessionEvent};

const CHILD_DIR: &str = "STEADFAST_CHILD_DIR";
const CHILD_SERVER: &str = "STEADFAST_CHILD_SERVER";
const KILLS: usize = 8;

/// Appends one line to the ledger with a single write: a killed process loses nothing written, and
/// a line cut short has no newline and never counts.
fn record(ledger: &mut std::fs::File, line: &str) {
    ledger
        .write_all(format!("{line}\n").as_bytes())
        .expect("ledger write");
}

fn read_ledger(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("ledger")).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// The child: a durable client that records each event it handles (then says it is done with it),
/// and sends numbered messages of its own, recording each one the library accepted.
#[test]
#[ignore = "run by killed_clients_lose_nothing_and_duplicate_nothing as a child process"]
fn durable_client_child() {
    let (Ok(dir), Ok(server)) = (std::env::var(CHILD_DIR), std::env::var(CHILD_SERVER)) else {
        return;
    };
    let dir = PathBuf::from(dir);
    // The parent holds our stdin: when it goes (even by a panic), so do we.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let mut ledger = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("ledger"))
            .unwrap();
        let seen: BTreeSet<u64> = read_ledger(&dir)
            .iter()
            .filter_map(|l| l.strip_prefix("got ")?.parse().ok())
            .collect();
        let mut seen = seen;
        let store = FileStore::open(dir.join("session"), SyncPolicy::None).unwrap();
        let mut options = client_options(vec![server.parse().unwrap()]);
        options.manual_consume = true;
        let client = steadfast_tokio::connect_with_store(options, Box::new(store)).unwrap();
        let pid = std::process::id();
        let mut k = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(3));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // The stop file holds how many events the server sent. Acknowledged means
                    // stored, not yet handled: close only once every one of them is handled.
                    if let Ok(stop) = std::fs::read_to_string(dir.join("stop")) {
                        let sent: u64 = stop.trim().parse().expect("stop holds a count");
                        if (0..sent).all(|n| seen.contains(&n)) {
                            client.close(0, Bytes::new());
                            client.closed().await;
                            return;
                        }
                        continue;
                    }
                    let payload = Bytes::from(format!("{pid} {k}"));
                    if client.try_send(1, Mode::Ordered, payload).is_ok() {
                        record(&mut ledger, &format!("sent {pid} {k}"));
                        k += 1;
                    }
                }
                event = client.next_event() => match event {
                    Some(SessionEvent::Received(m) | SessionEvent::Redelivered(m)) => {
                        let n = number(&m.payload).expect("numbered");
                        // The ledger tells a redelivered event already handled from a new one.
                        if seen.insert(n) {
                            record(&mut ledger, &format!("got {n}"));
                        }
                        client.consumed(m.seq);
                    }
                    Some(SessionEvent::SessionLost { reason, .. }) => panic!("session lost: {reason:?}"),
                    Some(SessionEvent::DurabilityLost { error }) => panic!("durability lost: {error}"),
                    Some(_) => {}
                    None => return,
                },
            }
        }
    });
}

/// A child process, killed if the test fails before it is done with it.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(dir: &Path, server: std::net::SocketAddr) -> Kid {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "durable_client_child",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_SERVER, server.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("child starts");
    Kid(child)
}

#[test]
fn killed_clients_lose_nothing_and_duplicate_nothing() {
    let dir = std::env::temp_dir().join(format!("steadfast-killed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (events_sent, received) = rt.block_on(async {
        let server = steadfast_tokio::listen(steadfast_tests::any_port(), server_options())
            .await
            .unwrap();
        let addr = server.local_addr();
        let mut child = spawn_child(&dir, addr);
        let mut session = None;
        let mut sent = 0u64;
        let mut received: Vec<String> = Vec::new();
        let mut kills = 0;
        let mut next_kill = Instant::now() + Duration::from_millis(400);
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(Instant::now() < deadline, "the run took over 60 s");
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(s) = session
                        && kills < KILLS
                        && server.try_send(s, 0, Mode::Ordered, numbered(sent)).is_ok()
                    {
                        sent += 1;
                    }
                    if kills < KILLS && Instant::now() >= next_kill {
                        // SIGKILL: nothing in the process gets to run, nothing is flushed.
                        child.0.kill().unwrap();
                        child.0.wait().unwrap();
                        kills += 1;
                        child = spawn_child(&dir, addr);
                        next_kill = Instant::now() + Duration::from_millis(300 + 97 * kills as u64 % 400);
                    }
                    // After the last kill, wait for the server to see everything acknowledged.
                    if kills == KILLS
                        && let Some(s) = session
                        && server.inspect_session(s, |sv| sv.channel(s).is_some_and(|c| c.sender().base() == sent))
                        && !dir.join("stop").exists()
                    {
                        // Renamed into place, so the child never reads it half written.
                        std::fs::write(dir.join("stop.tmp"), sent.to_string()).unwrap();
                        std::fs::rename(dir.join("stop.tmp"), dir.join("stop")).unwrap();
                    }
                }
                event = server.next_event() => {
                    let ServerEvent::Session { session: s, event } = event.expect("server runs") else {
                        continue;
                    };
                    match event {
                        SessionEvent::Connected { resumed, .. } => {
                            if let Some(first) = session {
                                assert_eq!(s, first, "a restarted client resumed its session (resumed={resumed})");
                            }
                            session = Some(s);
                        }
                        SessionEvent::Received(m) => {
                            received.push(String::from_utf8(m.payload.to_vec()).unwrap());
                        }
                        SessionEvent::Closed { .. } => break,
                        SessionEvent::SessionLost { reason, .. } => panic!("session lost: {reason:?}"),
                        _ => {}
                    }
                }
            }
        }
        let status = child.0.wait().unwrap();
        assert!(status.success(), "the last child exits cleanly");
        (sent, received)
    });

    let ledger = read_ledger(&dir);
    // Events: each handled exactly once across every process, none missing.
    let mut got: BTreeMap<u64, u32> = BTreeMap::new();
    for n in ledger
        .iter()
        .filter_map(|l| l.strip_prefix("got ")?.parse().ok())
    {
        *got.entry(n).or_default() += 1;
    }
    let twice: Vec<_> = got.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "handled twice: {twice:?}");
    let missing: Vec<_> = (0..events_sent).filter(|n| !got.contains_key(n)).collect();
    assert!(missing.is_empty(), "never handled: {missing:?}");
    assert!(events_sent > 100, "traffic flowed: {events_sent} events");

    // Messages: every send the library accepted reached the server exactly once.
    let accepted: BTreeSet<&str> = ledger
        .iter()
        .filter_map(|l| l.strip_prefix("sent "))
        .collect();
    let mut arrived: BTreeMap<&str, u32> = BTreeMap::new();
    for m in &received {
        *arrived.entry(m.as_str()).or_default() += 1;
    }
    let dup: Vec<_> = arrived.iter().filter(|(_, c)| **c > 1).collect();
    assert!(dup.is_empty(), "arrived twice: {dup:?}");
    let lost: Vec<_> = accepted
        .iter()
        .filter(|m| !arrived.contains_key(*m))
        .collect();
    assert!(lost.is_empty(), "accepted but never arrived: {lost:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
