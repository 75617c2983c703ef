//! Writing from the application's thread while the driver has nothing to write.
//!
//! A send or reply normally hands its frames to the connection's driver task and wakes it; the
//! task writes them. At a steady message rate on a busy machine that hand-off is the cost that
//! matters: each wake-up is a task switch, and a scheduler tick that lands between the wake and
//! the write holds the message for milliseconds. So when the driver holds nothing unwritten, the
//! thread that made the frames writes them itself, with a write that never waits ([`TryWrite`]).
//! Whatever the socket does not take at once goes back to the driver, which writes it before
//! anything newer.
//!
//! The frames are taken under the session's lock ([`Direct::take`]), written once it is released
//! ([`Outgoing`]), and what the socket did not take is handed back under the lock again
//! ([`TakesBack`]). Writing under the lock cost a context switch in two of every five round trips
//! at 10,000 a second: on loopback a write runs the peer's receive path and wakes its thread,
//! which often took the writer's core while the writer still held the lock, and the driver then
//! slept on the lock until the writer ran again.
//!
//! Bytes stay in order because every write decision is made under the lock: the driver marks the
//! path closed in the same locked step in which it takes bytes to write, and reopens it only in a
//! locked step in which it holds none and no direct write is out. While one is out, the driver
//! takes nothing to write, and is woken when it comes back if it wanted to. A burst of sends
//! still leaves as a few large writes from the driver, not one small write per message: after a
//! direct write the path stays closed until the driver has run, and a driver that has just
//! written reopens it only after a second step with nothing to write. Without that second step, a
//! driver that has just written a batch would let the next send of a burst go out alone ahead of
//! the batch behind it: two writes where one does.

use alloc::sync::Arc;
use bytes::BytesMut;
use std::io;

use super::shared::Wakes;

/// A write to a connection that never waits, made from any thread while the connection's driver
/// task owns it: how a send made while the connection is idle goes out without a task hand-off.
///
/// Implemented by the adapters' streams (through [`FdWriter`] on Unix sockets); streams that
/// cannot be written from two places, such as TLS, do not offer one and keep every write on the
/// driver.
pub trait TryWrite: Send + Sync {
    /// Writes some of `buf` now; [`io::ErrorKind::WouldBlock`] if the socket takes nothing.
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

/// A [`TryWrite`] through any non-blocking socket it holds a share of (an `Arc` of the stream, or
/// a clone of a stream that is itself shared), so the socket cannot close under it.
#[cfg(unix)]
#[derive(Debug)]
pub struct FdWriter<T>(pub T);

#[cfg(unix)]
impl<T: std::os::fd::AsFd + Send + Sync> TryWrite for FdWriter<T> {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        socket2::SockRef::from(&self.0).send(buf)
    }
}

/// The most bytes written direct at once: the thread that sent a message is not held up writing
/// what a burst queued behind it. More is left to the driver.
const MAX_DIRECT: usize = 64 * 1024;

/// One connection's direct path: the writer, and whether writing through it now keeps the
/// stream's order. Lives in the state the lock guards.
#[derive(Default)]
pub(crate) struct Direct {
    writer: Option<Arc<dyn TryWrite>>,
    /// The driver holds nothing unwritten, held nothing at its step before, and has run since
    /// the last direct write, which is back.
    open: bool,
    /// The driver's last step held nothing unwritten.
    was_idle: bool,
    /// A direct write is being made outside the lock: the driver writes nothing until it is back.
    out: bool,
    /// The driver wanted to write while it was out: it is woken when the write comes back.
    deferred: bool,
    /// Which connection this is: a write that comes back after the path was cleared or set anew
    /// finds another epoch, and what it left unwritten goes with the old connection.
    epoch: u64,
}

impl Direct {
    /// A path through `writer`, closed until the driver first finds itself idle.
    pub(crate) fn new(writer: Option<Arc<dyn TryWrite>>) -> Self {
        Direct {
            writer,
            ..Direct::default()
        }
    }

    /// A new connection's path, through `writer`: a write still out on the old one is its own.
    pub(crate) fn set(&mut self, writer: Option<Arc<dyn TryWrite>>) {
        let epoch = self.epoch + 1;
        *self = Direct::new(writer);
        self.epoch = epoch;
    }

    /// The connection is gone or replaced: nothing may be written through the old one.
    pub(crate) fn clear(&mut self) {
        self.set(None);
    }

    /// The driver, under the lock, says whether it holds bytes not yet written.
    pub(crate) fn driver_holds(&mut self, unwritten: bool) {
        self.open = !unwritten && self.was_idle && self.writer.is_some() && !self.out;
        self.was_idle = !unwritten;
    }

    /// The driver, under the lock, before it takes bytes to write: whether it may. Not while a
    /// direct write is out, since what that write leaves goes first; the driver is then woken
    /// when it comes back.
    pub(crate) fn driver_may_write(&mut self) -> bool {
        self.deferred |= self.out;
        !self.out
    }

    /// Whether a write now may go direct.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// Takes all of `data` to be written direct once the lock is released, by `Wakes`, and
    /// closes the path until the write is back and the driver has run. Takes nothing if the path
    /// is closed, or `data` is empty or larger than `MAX_DIRECT`. `key` names the connection
    /// to the state the write comes back to.
    pub(crate) fn take(&mut self, key: u64, data: &mut BytesMut) -> Option<Outgoing> {
        let fits = !data.is_empty() && data.len() <= MAX_DIRECT;
        let writer = self.writer.as_ref().filter(|_| self.open && fits)?.clone();
        self.open = false;
        self.out = true;
        Some(Outgoing {
            key,
            epoch: self.epoch,
            writer,
            data: data.split(),
        })
    }

    /// Under the lock, a direct write came back: what it left goes in front of `queue`, the
    /// driver's bytes. Returns whether the driver must be woken: it has bytes to write, or it
    /// wanted to write while the write was out. A write from an older connection changes nothing.
    pub(crate) fn take_back(&mut self, back: Returned, queue: &mut BytesMut) -> bool {
        if back.epoch != self.epoch || !self.out {
            return false;
        }
        self.out = false;
        if !back.rest.is_empty() {
            let mut rest = back.rest;
            rest.extend_from_slice(queue);
            *queue = rest;
        }
        core::mem::take(&mut self.deferred) || !queue.is_empty()
    }
}

/// A direct write taken from under the lock, made once it is released.
pub(crate) struct Outgoing {
    key: u64,
    epoch: u64,
    writer: Arc<dyn TryWrite>,
    data: BytesMut,
}

impl Outgoing {
    /// Writes as much as the socket takes now. A failed write is not reported here: the driver's
    /// own write of the rest meets the failure and ends the connection as it always does.
    pub(crate) fn write(mut self) -> Returned {
        while !self.data.is_empty() {
            match self.writer.try_write(&self.data) {
                Ok(0) => break,
                Ok(n) => bytes::Buf::advance(&mut self.data, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        Returned {
            key: self.key,
            epoch: self.epoch,
            rest: self.data,
        }
    }
}

/// A direct write that was made: which connection, and what the socket did not take.
pub(crate) struct Returned {
    pub(crate) key: u64,
    epoch: u64,
    rest: BytesMut,
}

/// State that lends direct writes out of its lock takes them back here, under the lock again.
pub(crate) trait TakesBack {
    /// Puts what `back` left in front of its connection's queue, and wakes its driver if it must.
    fn take_back(&mut self, back: Returned, wakes: &mut Wakes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A socket that takes at most `room` bytes, then would block; or fails.
    struct Socket {
        taken: Mutex<alloc::vec::Vec<u8>>,
        room: usize,
        fail: bool,
    }

    impl TryWrite for Socket {
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            if self.fail {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            let mut taken = self.taken.lock().unwrap();
            let n = buf.len().min(self.room - taken.len());
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    fn path(room: usize, fail: bool) -> (Direct, Arc<Socket>) {
        let socket = Arc::new(Socket {
            taken: Mutex::new(alloc::vec::Vec::new()),
            room,
            fail,
        });
        (Direct::new(Some(socket.clone())), socket)
    }

    /// A path the driver has found idle twice, as after it went to sleep.
    fn open_path(room: usize, fail: bool) -> (Direct, Arc<Socket>) {
        let (mut direct, socket) = path(room, fail);
        direct.driver_holds(false);
        direct.driver_holds(false);
        (direct, socket)
    }

    /// Takes `data` direct if the path lets it, writes it, and hands it back into `queue`:
    /// what the sending thread and the lock do around a direct write. `None` if not taken;
    /// else whether the driver is to be woken.
    fn send(direct: &mut Direct, data: &[u8], queue: &mut BytesMut) -> Option<bool> {
        let write = direct.take(0, &mut BytesMut::from(data))?;
        Some(direct.take_back(write.write(), queue))
    }

    #[test]
    fn a_path_opens_only_once_the_driver_says_it_holds_nothing_twice_running() {
        let (mut direct, socket) = path(100, false);
        let mut queue = BytesMut::new();
        assert_eq!(
            send(&mut direct, b"abc", &mut queue),
            None,
            "closed until the driver has run"
        );
        direct.driver_holds(true);
        assert_eq!(send(&mut direct, b"abc", &mut queue), None);
        direct.driver_holds(false);
        assert_eq!(
            send(&mut direct, b"abc", &mut queue),
            None,
            "just after a write: a burst may be on"
        );
        direct.driver_holds(false);
        assert_eq!(send(&mut direct, b"abc", &mut queue), Some(false));
        assert_eq!(*socket.taken.lock().unwrap(), b"abc");
    }

    #[test]
    fn a_direct_write_closes_the_path_until_the_driver_runs_again() {
        let (mut direct, _) = open_path(100, false);
        let mut queue = BytesMut::new();
        assert_eq!(send(&mut direct, b"a", &mut queue), Some(false));
        assert!(!direct.is_open());
        assert_eq!(
            send(&mut direct, b"b", &mut queue),
            None,
            "a burst goes to the driver"
        );
        direct.driver_holds(false);
        assert_eq!(
            send(&mut direct, b"b", &mut queue),
            Some(false),
            "a direct write is not the driver's"
        );
    }

    #[test]
    fn the_driver_writes_nothing_while_a_direct_write_is_out_and_is_woken_when_it_is_back() {
        let (mut direct, _) = open_path(100, false);
        let write = direct.take(0, &mut BytesMut::from(&b"abc"[..])).unwrap();
        assert!(!direct.driver_may_write());
        direct.driver_holds(false);
        assert!(!direct.is_open(), "not while the write is out");
        assert!(
            direct.take_back(write.write(), &mut BytesMut::new()),
            "the driver wanted to write"
        );
        assert!(direct.driver_may_write());
        direct.driver_holds(false);
        assert!(direct.is_open());
    }

    #[test]
    fn what_a_full_socket_does_not_take_goes_back_ahead_of_the_drivers_bytes() {
        let (mut direct, socket) = open_path(4, false);
        let mut queue = BytesMut::from(&b"later"[..]);
        assert_eq!(send(&mut direct, b"abcdef", &mut queue), Some(true));
        assert_eq!(*socket.taken.lock().unwrap(), b"abcd");
        assert_eq!(&queue[..], b"eflater");
    }

    #[test]
    fn a_large_write_is_left_for_the_driver_and_the_path_stays_open() {
        let (mut direct, socket) = open_path(1 << 20, false);
        let mut large = BytesMut::from(&alloc::vec![7; MAX_DIRECT + 1][..]);
        assert!(direct.take(0, &mut large).is_none());
        assert_eq!(large.len(), MAX_DIRECT + 1, "left where it was");
        assert!(direct.is_open());
        let mut queue = BytesMut::new();
        assert_eq!(
            send(&mut direct, &alloc::vec![7; MAX_DIRECT], &mut queue),
            Some(false)
        );
        assert_eq!(socket.taken.lock().unwrap().len(), MAX_DIRECT);
    }

    #[test]
    fn a_failed_write_leaves_everything_for_the_driver() {
        let (mut direct, _) = open_path(100, true);
        let mut queue = BytesMut::new();
        assert_eq!(send(&mut direct, b"abc", &mut queue), Some(true));
        assert_eq!(&queue[..], b"abc");
    }

    #[test]
    fn a_cleared_path_never_opens_again() {
        let (mut direct, socket) = open_path(100, false);
        direct.clear();
        direct.driver_holds(false);
        direct.driver_holds(false);
        assert_eq!(send(&mut direct, b"abc", &mut BytesMut::new()), None);
        assert!(socket.taken.lock().unwrap().is_empty());
    }

    #[test]
    fn a_write_that_comes_back_to_a_new_connection_leaves_it_alone() {
        let (mut direct, _) = open_path(1, false);
        let write = direct.take(0, &mut BytesMut::from(&b"abc"[..])).unwrap();
        let (_, socket) = path(100, false);
        direct.set(Some(socket));
        let mut queue = BytesMut::new();
        assert!(!direct.take_back(write.write(), &mut queue));
        assert!(queue.is_empty(), "the old connection's bytes went with it");
        assert!(direct.driver_may_write());
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    //! `RUSTFLAGS="--cfg loom" cargo test -p steadfast-core --features driver --release --lib loom`
    use super::*;
    use crate::driver::shared::Shared;
    use crate::driver::sync::Mutex;
    use alloc::vec::Vec;
    use loom::thread;

    /// A socket that takes nothing on its first call, then one byte per call and nothing every other
    /// call: partial writes throughout.
    struct Socket {
        wire: Mutex<Vec<u8>>,
        calls: loom::sync::atomic::AtomicUsize,
    }

    impl TryWrite for Socket {
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            use loom::sync::atomic::Ordering::SeqCst;
            if self.calls.fetch_add(1, SeqCst) % 2 == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.wire.lock().unwrap().push(buf[0]);
            Ok(1)
        }
    }

    /// A connection's state as the drivers keep it: frames queued in the core (numbered in order
    /// of sending), what a direct write left for the driver, and the direct path.
    struct Conn {
        next: u8,
        made: BytesMut,
        pending: BytesMut,
        direct: Direct,
    }

    impl Conn {
        /// The core queues the next frame.
        fn make(&mut self) {
            self.made.extend_from_slice(&[self.next]);
            self.next += 1;
        }
    }

    impl TakesBack for Conn {
        fn take_back(&mut self, back: Returned, _: &mut Wakes) {
            self.direct.take_back(back, &mut self.pending);
        }
    }

    /// An application thread's send: queues a frame, and takes every queued frame to write direct
    /// if it may (as a handle's `poll_transmit` does). `Shared::with` writes it once the lock is
    /// released and hands what the socket did not take back to the driver.
    fn send(shared: &Shared<Conn>) {
        shared.with(|c, wakes| {
            c.make();
            if let Some(write) = c.direct.take(0, &mut c.made) {
                wakes.write(write);
            }
        });
    }

    /// One turn of the driver: under the lock, the core may queue a frame of its own (an ack for
    /// what the driver read); then, unless a direct write is out, the driver takes what a direct
    /// write left, then what is queued, after anything of its own still unwritten; then it
    /// writes outside the lock.
    fn driver_turn(shared: &Shared<Conn>, socket: &Socket, out: &mut Vec<u8>, ack: bool) {
        shared.with(|c, _| {
            if ack {
                // Queued for the driver at once, as a server's flush queues it for the
                // connection's task: behind anything a direct write out now leaves.
                c.make();
                let ack = c.made.split();
                c.pending.extend_from_slice(&ack);
            }
            if c.direct.driver_may_write() {
                out.extend_from_slice(&c.pending.split());
                out.extend_from_slice(&c.made.split());
            }
            c.direct.driver_holds(!out.is_empty());
        });
        while !out.is_empty() {
            match socket.try_write(out) {
                Ok(n) => drop(out.drain(..n)),
                Err(_) => break,
            }
        }
    }

    #[test]
    fn loom_direct_writes_and_the_drivers_writes_keep_the_stream_in_order() {
        loom::model(|| {
            let socket = Arc::new(Socket {
                wire: Mutex::new(Vec::new()),
                calls: loom::sync::atomic::AtomicUsize::new(0),
            });
            let shared = Shared::new(Conn {
                next: 0,
                made: BytesMut::new(),
                pending: BytesMut::new(),
                direct: Direct::new(Some(socket.clone())),
            });
            shared.with(|c, _| {
                c.direct.driver_holds(false);
                c.direct.driver_holds(false);
            });
            let apps: Vec<_> = (0..2)
                .map(|_| {
                    let s = shared.clone();
                    thread::spawn(move || send(&s))
                })
                .collect();
            let mut out = Vec::new();
            driver_turn(&shared, &socket, &mut out, true);
            driver_turn(&shared, &socket, &mut out, false);
            for app in apps {
                app.join().unwrap();
            }
            // Drain what is left, as the woken driver would.
            for _ in 0..8 {
                driver_turn(&shared, &socket, &mut out, false);
            }
            let made = shared.with(|c, _| c.next);
            assert_eq!(
                *socket.wire.lock().unwrap(),
                (0..made).collect::<Vec<u8>>(),
                "every frame once, in order"
            );
        });
    }
}
