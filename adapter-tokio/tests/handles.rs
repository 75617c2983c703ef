//! The application's handles beyond async tasks: plain threads that block on backpressure, and the
//! handles as streams of events.

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use steadfast_tokio::{ClientOptions, Mode, ServerEvent, ServerOptions, SessionEvent};

const MESSAGES: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_thread_pushes_a_thousand_messages_through_a_queue_of_eight_by_blocking() {
    let mut server = steadfast_tokio::listen("127.0.0.1:0".parse().unwrap(), ServerOptions::new())
        .await
        .unwrap();
    let mut options = ClientOptions::new(vec![server.local_addr()]);
    options.config.channel.max_queued_messages = 8;
    let client = steadfast_tokio::connect(options).unwrap();

    let sender = client.clone();
    let thread = std::thread::spawn(move || {
        let mut refused = 0;
        for n in 0..MESSAGES {
            let payload = Bytes::copy_from_slice(&n.to_be_bytes());
            // A try first shows the queue really is full at times; the blocking send then waits.
            if let Err(e) = sender.try_send(0, Mode::Ordered, payload.clone()) {
                refused += 1;
                drop(e);
                sender.send_blocking(0, Mode::Ordered, payload).unwrap();
            }
        }
        refused
    });

    let mut next = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while next < MESSAGES {
        let event = tokio::time::timeout_at(
            deadline,
            std::future::poll_fn(|cx| Pin::new(&mut server).poll_next(cx)),
        )
        .await
        .expect("all messages within 20 s")
        .expect("the server runs");
        if let ServerEvent::Session {
            event: SessionEvent::Received(m),
            ..
        } = event
        {
            assert_eq!(
                m.payload.as_ref(),
                next.to_be_bytes(),
                "in order, exactly once"
            );
            next += 1;
        }
    }
    let refused = thread.join().unwrap();
    assert!(
        refused > 0,
        "a queue of 8 never filled: backpressure went untested"
    );
}
