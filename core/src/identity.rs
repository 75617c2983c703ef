//! Who a session is: its id, its secret resume token and its attach epoch.

use core::fmt;

use subtle::ConstantTimeEq;

/// A session's public name, chosen by the server from its entropy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The secret that proves a resuming client owns a session: 128 bits from the server's entropy.
///
/// Compared in constant time, and never printed, so neither a timing side channel nor a log line
/// gives it away.
///
/// ```
/// use steadfast_core::identity::Token;
/// let t = Token::from_bytes([7; 16]);
/// assert!(t.matches(&Token::from_bytes([7; 16])));
/// assert!(!t.matches(&Token::from_bytes([8; 16])));
/// assert_eq!(format!("{t:?}"), "Token(..)");
/// ```
#[derive(Clone, Copy)]
pub struct Token([u8; 16]);

impl Token {
    /// The token with these bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Token(bytes)
    }

    /// Its bytes (for the wire and the client's store).
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Whether `other` is the same token, in time independent of where they differ.
    pub fn matches(&self, other: &Token) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other)
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What a client presents to resume: the session, its token, the attach epoch it now claims (one
/// above any it used before), and how much of the server's traffic it has received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The session.
    pub session: SessionId,
    /// Its secret.
    pub token: Token,
    /// The attach epoch claimed: the newest attach wins, an older one is refused as stale.
    pub epoch: u64,
    /// Every server message below this sequence number has been received.
    pub received: crate::Seq,
}
