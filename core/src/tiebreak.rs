//! Tie-breaking: a deterministic arbiter agreed at the handshake.
//!
//! Two ends of a symmetric protocol sometimes act at once: both close, both resynchronise, both claim
//! the same thing (seeds/003's ACTION_1 race: each sends ACTION_1 and receives the other's instead of
//! the ACTION_2 it expected). Timestamps cannot order those events (clocks disagree) and Lamport clocks
//! cannot either (the events are concurrent). What works is a rule both ends evaluate on the same
//! inputs: each sends a random nonce in the handshake, and a fixed total order on `(nonce, role)` names
//! the *favourite*. Both ends hold both nonces, so both compute the same winner with no further message
//! and no retry loop that could race again.
//!
//! - [`Arbiter::favourite`]: one side for the whole connection (simultaneous close, resync).
//! - [`Arbiter::favourite_for`]: a side per key, so that when races on many keys happen, each side
//!   wins about half of them instead of the same side winning all of them.
//! - [`Claims`]: the application primitive built on it.
//!
//! The arbiter is for fairness, not security: an end that picks its nonce after seeing the other's can
//! make itself the favourite. Nothing here gives an advantage worth cheating for.

use alloc::collections::BTreeSet;
use core::fmt;

/// Which end of the connection: the one that dialled (client) or the one that accepted (server).
///
/// Exhaustive on purpose: a tie between two ends has exactly two sides, and code that matches on the
/// favourite should not need a third arm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The end that opened the connection.
    Client,
    /// The end that accepted it.
    Server,
}

impl Role {
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }
}

/// The outcome of racing with the peer, computed identically on both ends from the handshake nonces.
///
/// The connection-wide favourite is the end whose `(nonce, role)` is larger, nonces compared as
/// unsigned integers first and, **if the nonces are equal, the client wins** (the order puts
/// `Client` above `Server` for the tie; seeds/003's answer suggests the client as the default winner,
/// and any fixed choice works as long as both ends make it).
///
/// ```
/// use steadfast_core::tiebreak::{Arbiter, Role};
/// // The client drew 7, the server drew 9; each builds its arbiter from its own point of view.
/// let at_client = Arbiter::new(Role::Client, 7, 9);
/// let at_server = Arbiter::new(Role::Server, 9, 7);
/// assert_eq!(at_client.favourite(), Role::Server);
/// assert_eq!(at_server.favourite(), Role::Server);
/// assert!(!at_client.local_wins() && at_server.local_wins());
/// // Per key, the two ends agree too.
/// for key in 0..100 {
///     assert_eq!(at_client.favourite_for(key), at_server.favourite_for(key));
/// }
/// // Equal nonces: the client wins.
/// assert_eq!(Arbiter::new(Role::Server, 5, 5).favourite(), Role::Client);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arbiter {
    local: Role,
    local_nonce: u64,
    peer_nonce: u64,
}

impl Arbiter {
    /// The arbiter as seen from `local`, which sent `local_nonce` and received `peer_nonce` in the
    /// handshake. The peer builds its own with the roles and nonces swapped.
    pub fn new(local: Role, local_nonce: u64, peer_nonce: u64) -> Self {
        Arbiter {
            local,
            local_nonce,
            peer_nonce,
        }
    }

    /// Our role on this connection.
    pub fn local(&self) -> Role {
        self.local
    }

    /// The client's nonce, whichever side we are.
    pub fn client_nonce(&self) -> u64 {
        match self.local {
            Role::Client => self.local_nonce,
            Role::Server => self.peer_nonce,
        }
    }

    /// The server's nonce, whichever side we are.
    pub fn server_nonce(&self) -> u64 {
        match self.local {
            Role::Client => self.peer_nonce,
            Role::Server => self.local_nonce,
        }
    }

    /// The connection-wide favourite: the larger nonce, the client on equal nonces.
    pub fn favourite(&self) -> Role {
        if self.server_nonce() > self.client_nonce() {
            Role::Server
        } else {
            Role::Client
        }
    }

    /// Whether we are the connection-wide favourite.
    pub fn local_wins(&self) -> bool {
        self.favourite() == self.local
    }

    /// The favourite for races on `key`: the client if the top bit of
    /// `mix64(client_nonce ^ server_nonce ^ key)` is set, else the server, where [`mix64`] is
    /// SplitMix64's output function. Both nonces enter symmetrically, so both ends compute the same
    /// answer; the mixing spreads consecutive keys evenly between the two sides, equal nonces
    /// included. This formula is part of the protocol: changing it needs a new protocol version.
    pub fn favourite_for(&self, key: u64) -> Role {
        if mix64(self.client_nonce() ^ self.server_nonce() ^ key) >> 63 == 1 {
            Role::Client
        } else {
            Role::Server
        }
    }

    /// Whether we are the favourite for races on `key`.
    pub fn local_wins_for(&self, key: u64) -> bool {
        self.favourite_for(key) == self.local
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014) as a pure function: the generator's output for state `x`,
/// i.e. `x + 0x9E37_79B9_7F4A_7C15` through its two xor-shift-multiply rounds. A bijection on `u64`
/// whose every output bit depends on every input bit; `mix64(0) == 0xE220_A839_7B1D_CDAF`.
pub const fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// How a claim on a key resolved, from this end's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimOutcome {
    /// Our claim stands (the peer granted it, or we won the race; in a race the peer's claim is
    /// refused, and the peer already knows: it computed [`ClaimOutcome::Lost`]).
    Won,
    /// Our claim is refused (the peer refused it, or we lost the race; in a race the peer's claim
    /// stands, and the peer already knows: it computed [`ClaimOutcome::Won`]).
    Lost,
    /// The peer claimed a key we had no claim on: grant it (answer the peer that it is granted).
    Granted,
}

/// Why [`Claims::claim`] refused a new claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClaimError {
    /// We already have an unresolved claim on this key; wait for it to resolve.
    AlreadyPending {
        /// The key.
        key: u64,
    },
    /// `max_pending` claims are unresolved already: the bound on this table.
    TooManyPending {
        /// The configured bound.
        max_pending: usize,
    },
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimError::AlreadyPending { key } => {
                write!(f, "a claim on key {key} is already pending")
            }
            ClaimError::TooManyPending { max_pending } => {
                write!(f, "{max_pending} claims already pending (the bound)")
            }
        }
    }
}

impl core::error::Error for ClaimError {}

/// Claims both ends may make at once on the same key (seeds/003's ACTION_1 race), resolved without an
/// extra message: exactly one claim wins, and both ends agree which.
///
/// # The message rules
///
/// The application carries two messages of its own over **one ordered channel per direction** (a
/// steadfast ordered stream): `Claim(key)` and `Answer(key, granted)`.
///
/// 1. To claim, call [`claim`](Self::claim) and send `Claim(key)`.
/// 2. On the peer's `Claim(key)`, call [`on_peer_claim`](Self::on_peer_claim):
///    - [`ClaimOutcome::Granted`] (we had no claim on `key`): send `Answer(key, true)` — or
///      `Answer(key, false)` to refuse for the application's own reasons.
///    - [`ClaimOutcome::Won`] / [`ClaimOutcome::Lost`] (both claimed: a race): **send nothing**. The
///      peer evaluates the same arbiter on the same key and reaches the opposite outcome, so the
///      refusal of the losing claim needs no message. Sending one anyway would be wrong: answers are
///      matched to claims by key, and a redundant answer could arrive after a *new* claim on the key
///      and be taken as its answer.
/// 3. On the peer's `Answer(key, granted)`, call [`on_peer_answer`](Self::on_peer_answer).
///
/// Why the ends always agree, given ordered delivery: if our `Claim(k)` reaches the peer while the
/// peer's own claim on `k` is pending, the peer sent its claim before seeing ours, and it cannot have
/// been resolved yet on our side either (an answer to it would follow our claim on our outgoing
/// channel); so the peer's claim reaches us while ours is pending too, both see a race, and the
/// arbiter's per-key favourite ([`Arbiter::favourite_for`]) decides it identically. Otherwise the peer
/// answers, and that answer is the only one ever sent for our claim. Every answer meets exactly the
/// claim it answers.
///
/// Unresolved local claims are bounded by `max_pending`; past it [`claim`](Self::claim) fails with
/// [`ClaimError::TooManyPending`].
///
/// Both ends of a race, played in sequence:
///
/// ```
/// use steadfast_core::tiebreak::{Arbiter, ClaimOutcome, Claims, Role};
/// let (client_nonce, server_nonce) = (0x1234, 0x9876);
/// let mut client = Claims::new(Arbiter::new(Role::Client, client_nonce, server_nonce), 16);
/// let mut server = Claims::new(Arbiter::new(Role::Server, server_nonce, client_nonce), 16);
///
/// // Both claim key 7 at once; each sends Claim(7) and then receives the other's.
/// client.claim(7).unwrap();
/// server.claim(7).unwrap();
/// let at_client = client.on_peer_claim(7);
/// let at_server = server.on_peer_claim(7);
///
/// // Exactly one won, both agree which, and nobody sends another message.
/// let winner = client.arbiter().favourite_for(7);
/// let (won, lost) = if winner == Role::Client { (at_client, at_server) } else { (at_server, at_client) };
/// assert_eq!((won, lost), (ClaimOutcome::Won, ClaimOutcome::Lost));
/// assert_eq!((client.pending(), server.pending()), (0, 0));
///
/// // Without a race, the peer grants and its answer resolves the claim.
/// client.claim(8).unwrap();
/// assert_eq!(server.on_peer_claim(8), ClaimOutcome::Granted); // server sends Answer(8, true)
/// assert_eq!(client.on_peer_answer(8, true), Some(ClaimOutcome::Won));
/// assert_eq!(client.on_peer_answer(8, true), None, "stale: nothing pending on 8");
/// ```
#[derive(Debug, Clone)]
pub struct Claims {
    arbiter: Arbiter,
    /// Keys we claimed whose claim is unresolved.
    pending: BTreeSet<u64>,
    max_pending: usize,
}

impl Claims {
    /// An empty claim table deciding races with `arbiter`, holding at most `max_pending` unresolved
    /// local claims.
    pub fn new(arbiter: Arbiter, max_pending: usize) -> Self {
        Claims {
            arbiter,
            pending: BTreeSet::new(),
            max_pending,
        }
    }

    /// The arbiter deciding races.
    pub fn arbiter(&self) -> &Arbiter {
        &self.arbiter
    }

    /// We claim `key`; the application then sends `Claim(key)` to the peer. Refused while a claim on
    /// `key` is unresolved, or when `max_pending` claims are.
    pub fn claim(&mut self, key: u64) -> Result<(), ClaimError> {
        if self.pending.contains(&key) {
            return Err(ClaimError::AlreadyPending { key });
        }
        if self.pending.len() >= self.max_pending {
            return Err(ClaimError::TooManyPending {
                max_pending: self.max_pending,
            });
        }
        self.pending.insert(key);
        Ok(())
    }

    /// The peer's `Claim(key)` arrived. With a claim of ours pending on `key` it is a race, decided by
    /// the arbiter's favourite for `key`: [`ClaimOutcome::Won`] (ours stands, the peer's is refused)
    /// or [`ClaimOutcome::Lost`] (ours is refused, the peer's stands); either way ours is resolved and
    /// no answer is sent. Otherwise [`ClaimOutcome::Granted`]: answer the peer.
    pub fn on_peer_claim(&mut self, key: u64) -> ClaimOutcome {
        if !self.pending.remove(&key) {
            return ClaimOutcome::Granted;
        }
        if self.arbiter.local_wins_for(key) {
            ClaimOutcome::Won
        } else {
            ClaimOutcome::Lost
        }
    }

    /// The peer's `Answer(key, granted)` to our claim arrived: [`ClaimOutcome::Won`] if granted,
    /// [`ClaimOutcome::Lost`] if refused, resolving the claim; `None` if no claim of ours on `key` is
    /// pending (a stale or duplicate answer, which the message rules never produce).
    pub fn on_peer_answer(&mut self, key: u64, granted: bool) -> Option<ClaimOutcome> {
        if !self.pending.remove(&key) {
            return None;
        }
        Some(if granted {
            ClaimOutcome::Won
        } else {
            ClaimOutcome::Lost
        })
    }

    /// Whether a claim of ours on `key` is unresolved.
    pub fn is_pending(&self, key: u64) -> bool {
        self.pending.contains(&key)
    }

    /// How many claims of ours are unresolved.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(client_nonce: u64, server_nonce: u64) -> (Arbiter, Arbiter) {
        (
            Arbiter::new(Role::Client, client_nonce, server_nonce),
            Arbiter::new(Role::Server, server_nonce, client_nonce),
        )
    }

    #[test]
    fn the_larger_nonce_is_the_favourite_on_both_ends() {
        for (c, s, fav) in [
            (1, 2, Role::Server),
            (2, 1, Role::Client),
            (u64::MAX, 0, Role::Client),
            (0, u64::MAX, Role::Server),
        ] {
            let (at_c, at_s) = pair(c, s);
            assert_eq!(at_c.favourite(), fav);
            assert_eq!(at_s.favourite(), fav);
            assert_ne!(at_c.local_wins(), at_s.local_wins());
        }
    }

    #[test]
    fn equal_nonces_make_the_client_the_favourite() {
        for n in [0, 1, 42, u64::MAX] {
            let (at_c, at_s) = pair(n, n);
            assert_eq!(at_c.favourite(), Role::Client);
            assert_eq!(at_s.favourite(), Role::Client);
            assert!(at_c.local_wins() && !at_s.local_wins());
        }
    }

    #[test]
    fn the_mixing_function_is_splitmix64_pinned_by_its_reference_outputs() {
        // The first two outputs of the reference SplitMix64 generator seeded with 0.
        assert_eq!(mix64(0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(mix64(0x9E37_79B9_7F4A_7C15), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn the_per_key_favourite_is_pinned_by_the_formula() {
        let (at_c, _) = pair(0x1234, 0x9876);
        for key in 0..64 {
            let expected = if mix64(0x1234 ^ 0x9876 ^ key) >> 63 == 1 {
                Role::Client
            } else {
                Role::Server
            };
            assert_eq!(at_c.favourite_for(key), expected);
        }
    }

    #[test]
    fn per_key_races_are_shared_fairly_between_the_two_ends() {
        for (c, s) in [(0, 0), (1, 2), (u64::MAX, 7)] {
            let (at_c, _) = pair(c, s);
            let client_wins = (0..10_000)
                .filter(|&k| at_c.favourite_for(k) == Role::Client)
                .count();
            assert!(
                (4_700..=5_300).contains(&client_wins),
                "nonces {c}, {s}: client wins {client_wins} of 10000 keys"
            );
        }
    }

    #[test]
    fn a_simultaneous_claim_is_won_on_exactly_one_end() {
        let (at_c, at_s) = pair(3, 3);
        let mut c = Claims::new(at_c, 4);
        let mut s = Claims::new(at_s, 4);
        for key in 0..32 {
            c.claim(key).unwrap();
            s.claim(key).unwrap();
            let (oc, os) = (c.on_peer_claim(key), s.on_peer_claim(key));
            assert!(
                matches!(
                    (oc, os),
                    (ClaimOutcome::Won, ClaimOutcome::Lost)
                        | (ClaimOutcome::Lost, ClaimOutcome::Won)
                ),
                "key {key}: {oc:?} / {os:?}"
            );
            assert_eq!(oc == ClaimOutcome::Won, at_c.local_wins_for(key));
        }
        assert_eq!((c.pending(), s.pending()), (0, 0));
    }

    #[test]
    fn a_claim_the_peer_did_not_race_is_granted_and_resolved_by_the_answer() {
        let (at_c, at_s) = pair(1, 2);
        let mut c = Claims::new(at_c, 4);
        let mut s = Claims::new(at_s, 4);
        c.claim(5).unwrap();
        assert!(c.is_pending(5));
        assert_eq!(s.on_peer_claim(5), ClaimOutcome::Granted);
        assert_eq!(c.on_peer_answer(5, true), Some(ClaimOutcome::Won));
        c.claim(5).unwrap();
        assert_eq!(c.on_peer_answer(5, false), Some(ClaimOutcome::Lost));
        assert!(!c.is_pending(5));
    }

    #[test]
    fn a_stale_answer_is_ignored() {
        let (at_c, _) = pair(1, 2);
        let mut c = Claims::new(at_c, 4);
        assert_eq!(c.on_peer_answer(9, true), None);
        c.claim(9).unwrap();
        assert_eq!(c.on_peer_answer(10, true), None, "another key");
        assert!(c.is_pending(9));
    }

    #[test]
    fn claims_past_the_bound_or_twice_on_one_key_are_refused() {
        let (at_c, _) = pair(1, 2);
        let mut c = Claims::new(at_c, 2);
        c.claim(1).unwrap();
        assert_eq!(c.claim(1), Err(ClaimError::AlreadyPending { key: 1 }));
        c.claim(2).unwrap();
        assert_eq!(
            c.claim(3),
            Err(ClaimError::TooManyPending { max_pending: 2 })
        );
        assert_eq!(c.on_peer_answer(1, true), Some(ClaimOutcome::Won));
        c.claim(3).unwrap();
        assert_eq!(c.pending(), 2);
    }

    #[test]
    fn the_roles_are_each_others_peer() {
        assert_eq!(Role::Client.peer(), Role::Server);
        assert_eq!(Role::Server.peer(), Role::Client);
    }
}
