//! echo: a server and a client in one process, over loopback, on smol.
//!
//! ```text
//! cargo run -p steadfast-smol --example echo [-- N]
//! ```
//!
//! The client sends N requests (default 1000), each carrying its id; the server replies to every
//! message it receives with the same payload. One line sums up: requests sent, replies that came back
//! to the request they answer, duplicates (ids the server received twice, or replies that came back
//! twice, counted by the application itself) and the time taken. The exit status is non-zero if a
//! reply is missing or anything was duplicated.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bytes::Bytes;
use steadfast_smol::{ClientOptions, ServerEvent, ServerOptions, SessionEvent};

/// Requests in flight at once: enough to keep the link busy, well under the client's request limit.
const WINDOW: u64 = 256;
const STREAM: u64 = 0;

fn main() -> ExitCode {
    let n: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1000,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("usage: echo [N]: {e}");
            return ExitCode::FAILURE;
        }
    };
    smol::block_on(run(n))
}

async fn run(n: u64) -> ExitCode {
    let server = steadfast_smol::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .expect("bind a loopback port");

    // The server echoes every message, counting the ids it has already seen.
    let echoing = server.clone();
    let echo = smol::spawn(async move {
        let mut seen = BTreeSet::new();
        let mut duplicates = 0u64;
        while let Some(event) = echoing.next_event().await {
            if let ServerEvent::Session {
                session,
                event: SessionEvent::Received(m),
            } = event
            {
                if !seen.insert(m.payload.clone()) {
                    duplicates += 1;
                }
                if let Err(e) = echoing.reply(session, m.seq, m.payload) {
                    eprintln!("reply refused: {e}");
                }
            }
        }
        duplicates
    });

    let started = Instant::now();
    let client = steadfast_smol::connect(ClientOptions::new(vec![server.local_addr()]))
        .expect("start the client");
    let mut replies = BTreeSet::new();
    let mut duplicates = 0u64;
    let mut wrong = 0u64;
    for first in (0..n).step_by(WINDOW as usize) {
        let batch: Vec<_> = (first..n.min(first + WINDOW))
            .map(|id| {
                let client = client.clone();
                smol::spawn(async move {
                    let payload = Bytes::copy_from_slice(&id.to_be_bytes());
                    (
                        id,
                        client
                            .request(STREAM, payload, Duration::from_secs(30))
                            .await,
                    )
                })
            })
            .collect();
        for task in batch {
            match task.await {
                (id, Ok(reply)) if reply[..] == id.to_be_bytes() => {
                    if !replies.insert(id) {
                        duplicates += 1;
                    }
                }
                (id, Ok(_)) => {
                    eprintln!("request {id}: a reply that answers another request");
                    wrong += 1;
                }
                (id, Err(e)) => eprintln!("request {id}: {e}"),
            }
        }
    }
    let elapsed = started.elapsed();

    server.shutdown();
    duplicates += echo.await;
    println!(
        "echo (smol): sent {n}, replies {}, duplicates {duplicates}, elapsed {} ms",
        replies.len(),
        elapsed.as_millis()
    );
    if replies.len() as u64 == n && duplicates == 0 && wrong == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
