//! What the adapter's test files share.

use std::time::Duration;

use steadfast_tokio::{ClientHandle, LostReason, SessionEvent};

/// Why `client`'s session was lost, within 20 s.
pub async fn session_lost(client: &ClientHandle) -> LostReason {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match client.next_event().await {
                Some(SessionEvent::SessionLost { reason, .. }) => return reason,
                Some(_) => {}
                None => panic!("the session ended without saying why"),
            }
        }
    })
    .await
    .expect("lost within 20 s")
}
