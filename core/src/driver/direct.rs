//! Writing from the application's thread while the driver has nothing to write.
//!
//! A send or reply normally hands its frames to the connection's driver task and wakes it; the
//! task writes them. At a steady message rate on a busy machine that hand-off is the cost that
//! matters: each wake-up is a task switch, and a scheduler tick that lands between the wake and
//! the write holds the message for milliseconds. So when the driver holds nothing unwritten, the
//! thread that made the frames writes them itself, still under the session's lock, with a write
//! that never waits ([`TryWrite`]). Whatever the socket does not take at once goes back to the
//! driver, which writes it before anything newer.
//!
//! Bytes stay in order because every write decision is made under the lock: the driver marks the
//! path closed in the same locked step in which it takes bytes to write, and reopens it only in a
//! locked step in which it holds none. A burst of sends still leaves as a few large writes from
//! the driver, not one small write per message: after a direct write the path stays closed until
//! the driver has run, and a driver that has just written reopens it only after a second step
//! with nothing to write. Without that second step, a driver that has just written a batch would
//! let the next send of a burst go out alone ahead of the batch behind it: two writes where one
//! does.

use alloc::sync::Arc;
use std::io;

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

/// The most bytes written direct at once: the copy into the socket is made under the session's
/// lock, which the connection's driver and (on a server) every other connection wait for. More is
/// left to the driver, which copies outside the lock.
const MAX_DIRECT: usize = 64 * 1024;

/// One connection's direct path: the writer, and whether writing through it now keeps the
/// stream's order. Lives in the state the lock guards.
#[derive(Default)]
pub(crate) struct Direct {
    writer: Option<Arc<dyn TryWrite>>,
    /// The driver holds nothing unwritten, held nothing at its step before, and has run since
    /// the last direct write.
    open: bool,
    /// The driver's last step held nothing unwritten.
    was_idle: bool,
}

impl Direct {
    /// A path through `writer`, closed until the driver first finds itself idle.
    pub(crate) fn new(writer: Option<Arc<dyn TryWrite>>) -> Self {
        Direct {
            writer,
            ..Direct::default()
        }
    }

    /// The connection is gone or replaced: nothing may be written through the old one.
    pub(crate) fn clear(&mut self) {
        *self = Direct::default();
    }

    /// The driver, under the lock, says whether it holds bytes not yet written.
    pub(crate) fn driver_holds(&mut self, unwritten: bool) {
        self.open = !unwritten && self.was_idle && self.writer.is_some();
        self.was_idle = !unwritten;
    }

    /// Whether a write now may go direct.
    pub(crate) fn is_open(&self) -> bool {
        self.open
    }

    /// Writes as much of `data` as the socket takes now and closes the path until the driver has
    /// run (if `data` is empty or larger than `MAX_DIRECT`, does nothing); returns how many bytes
    /// went. The rest, if any, is the driver's to write first. A
    /// failed write is not reported here: the driver's own write of the rest meets the failure
    /// and ends the connection as it always does.
    pub(crate) fn write(&mut self, data: &[u8]) -> usize {
        let fits = !data.is_empty() && data.len() <= MAX_DIRECT;
        let Some(writer) = self.writer.as_ref().filter(|_| self.open && fits) else {
            return 0;
        };
        self.open = false;
        let mut sent = 0;
        while sent < data.len() {
            match writer.try_write(&data[sent..]) {
                Ok(0) => break,
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        sent
    }
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

    #[test]
    fn a_path_opens_only_once_the_driver_says_it_holds_nothing_twice_running() {
        let (mut direct, socket) = path(100, false);
        assert_eq!(direct.write(b"abc"), 0, "closed until the driver has run");
        direct.driver_holds(true);
        assert_eq!(direct.write(b"abc"), 0);
        direct.driver_holds(false);
        assert_eq!(
            direct.write(b"abc"),
            0,
            "just after a write: a burst may be on"
        );
        direct.driver_holds(false);
        assert_eq!(direct.write(b"abc"), 3);
        assert_eq!(*socket.taken.lock().unwrap(), b"abc");
    }

    #[test]
    fn a_direct_write_closes_the_path_until_the_driver_runs_again() {
        let (mut direct, _) = open_path(100, false);
        assert_eq!(direct.write(b"a"), 1);
        assert!(!direct.is_open());
        assert_eq!(direct.write(b"b"), 0, "a burst goes to the driver");
        direct.driver_holds(false);
        assert_eq!(direct.write(b"b"), 1, "a direct write is not the driver's");
    }

    #[test]
    fn what_a_full_socket_does_not_take_is_left_for_the_driver() {
        let (mut direct, socket) = open_path(4, false);
        assert_eq!(direct.write(b"abcdef"), 4);
        assert_eq!(*socket.taken.lock().unwrap(), b"abcd");
    }

    #[test]
    fn a_large_write_is_left_for_the_driver_and_the_path_stays_open() {
        let (mut direct, socket) = open_path(1 << 20, false);
        assert_eq!(direct.write(&alloc::vec![7; MAX_DIRECT + 1]), 0);
        assert!(direct.is_open());
        assert_eq!(direct.write(&alloc::vec![7; MAX_DIRECT]), MAX_DIRECT);
        assert_eq!(socket.taken.lock().unwrap().len(), MAX_DIRECT);
    }

    #[test]
    fn a_failed_write_leaves_everything_for_the_driver() {
        let (mut direct, _) = open_path(100, true);
        assert_eq!(direct.write(b"abc"), 0);
    }

    #[test]
    fn a_cleared_path_never_opens_again() {
        let (mut direct, socket) = open_path(100, false);
        direct.clear();
        direct.driver_holds(false);
        direct.driver_holds(false);
        assert_eq!(direct.write(b"abc"), 0);
        assert!(socket.taken.lock().unwrap().is_empty());
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
        made: Vec<u8>,
        pending: Vec<u8>,
        direct: Direct,
    }

    /// An application thread's send: queues a frame, and takes every queued frame to write direct
    /// if it may (as a handle's `poll_transmit` does), leaving what the socket did not take for
    /// the driver.
    fn send(shared: &Shared<Conn>) {
        shared.with(|c, _| {
            c.make();
            if c.direct.is_open() {
                let frames = core::mem::take(&mut c.made);
                let sent = c.direct.write(&frames);
                c.pending.extend_from_slice(&frames[sent..]);
            }
        });
    }

    impl Conn {
        /// The core queues the next frame.
        fn make(&mut self) {
            self.made.push(self.next);
            self.next += 1;
        }
    }

    /// One turn of the driver: under the lock, the core may queue a frame of its own (an ack for
    /// what the driver read); the driver takes what a direct write left, then what is queued,
    /// after anything of its own still unwritten; then writes outside the lock.
    fn driver_turn(shared: &Shared<Conn>, socket: &Socket, out: &mut Vec<u8>, ack: bool) {
        shared.with(|c, _| {
            if ack {
                c.make();
            }
            out.append(&mut c.pending);
            out.append(&mut c.made);
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
                made: Vec::new(),
                pending: Vec::new(),
                direct: Direct::new(Some(socket.clone())),
            });
            shared.with(|c, _| {
                c.direct.driver_holds(false);
                c.direct.driver_holds(false);
            });
            // Two sending threads, and a driver that queues an ack of its own.
            let apps: Vec<_> = [2, 1]
                .into_iter()
                .map(|sends| {
                    let s = shared.clone();
                    thread::spawn(move || {
                        for _ in 0..sends {
                            send(&s);
                        }
                    })
                })
                .collect();
            let mut out = Vec::new();
            driver_turn(&shared, &socket, &mut out, true);
            driver_turn(&shared, &socket, &mut out, false);
            for app in apps {
                app.join().unwrap();
            }
            // Drain what is left, as the woken driver would.
            for _ in 0..10 {
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
