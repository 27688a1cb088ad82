//! What an engine submits to and reaps from: the kernel's io_uring for files and block
//! devices, librbd's asynchronous calls for RBD images, or nothing at all for a volume in
//! memory (the null volume, whose I/O the queue thread runs inline).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rbd::{RbdDone, RbdRing};
use crate::sys::{wait_released, Uring};
use crate::volume::Volume;

/// The submission side of one engine.
#[derive(Debug)]
pub(crate) enum Ring {
    Uring(Box<Uring>),
    Rbd(RbdRing),
    /// No asynchronous I/O: every read and write runs inline (memory-backed volumes).
    Idle(EventFd),
}

/// What an engine dropped with requests in flight waits for before their buffers may go.
pub(crate) enum Released {
    /// The io_uring's release marker (see [`Uring::marker`]).
    Uring(OwnedFd),
    /// librbd's completions of this many requests.
    Rbd(std::sync::Arc<RbdDone>, usize),
}

impl Released {
    /// Blocks until the kernel or librbd is done with every request in flight.
    pub(crate) fn wait(self) -> io::Result<()> {
        match self {
            Released::Uring(marker) => wait_released(&marker),
            Released::Rbd(done, n) => {
                done.wait_for(n);
                Ok(())
            }
        }
    }
}

impl Ring {
    /// The ring for `volume`: io_uring with `entries` slots on its file (deferred
    /// completion work if `defer` and the kernel allows it), librbd on its image.
    pub(crate) fn for_volume(volume: &Volume, entries: u32, defer: bool) -> io::Result<Ring> {
        if volume.is_memory_backed() {
            return Ok(Ring::Idle(EventFd::new(EFD_NONBLOCK)?));
        }
        if let Some(image) = volume.rbd_image() {
            return Ok(Ring::Rbd(RbdRing::new(image.clone())?));
        }
        match volume.file() {
            Some(file) => Ok(Ring::Uring(Box::new(Uring::new(entries, file, defer)?))),
            None => Err(io::Error::from(io::ErrorKind::Unsupported)),
        }
    }

    /// The fd to watch: readable while completions wait to be reaped.
    pub(crate) fn notify_fd(&self) -> RawFd {
        match self {
            Ring::Uring(r) => r.notify_fd(),
            Ring::Rbd(r) => r.notify_fd(),
            Ring::Idle(e) => e.as_raw_fd(),
        }
    }

    /// "io_uring (deferred)", "librbd", ..., for logs.
    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Ring::Uring(r) if r.is_deferred() => "io_uring, completion work deferred",
            Ring::Uring(_) => "io_uring",
            Ring::Rbd(_) => "librbd",
            Ring::Idle(_) => "inline (volume in memory)",
        }
    }

    /// The name of a read or write through this ring, for errors.
    pub(crate) fn op(&self, write: bool) -> &'static str {
        match (self, write) {
            (Ring::Rbd(_), true) => "rbd_aio_writev",
            (Ring::Rbd(_), false) => "rbd_aio_readv",
            (_, true) => "io_uring writev",
            (_, false) => "io_uring readv",
        }
    }

    /// Takes the ring for the calling thread (io_uring: only its first user may use it).
    pub(crate) fn claim(&mut self) -> io::Result<()> {
        match self {
            Ring::Uring(r) => r.claim(),
            Ring::Rbd(_) | Ring::Idle(_) => Ok(()),
        }
    }

    /// Sends new requests to `volume` (resumed on another device or image) from now on.
    pub(crate) fn register(&mut self, volume: &Volume) -> io::Result<()> {
        let unsupported = || io::Error::from(io::ErrorKind::Unsupported);
        match self {
            Ring::Uring(r) => r.register(volume.file().ok_or_else(unsupported)?),
            Ring::Rbd(r) => {
                r.register(volume.rbd_image().ok_or_else(unsupported)?.clone());
                Ok(())
            }
            Ring::Idle(_) => Ok(()),
        }
    }

    /// Whether a successful completion always means the whole transfer (librbd: reads
    /// return the length, writes 0); io_uring may complete short.
    pub(crate) fn completes_whole(&self) -> bool {
        matches!(self, Ring::Rbd(_))
    }

    /// Starts a vectored read (or write) at `offset`, completed later with `user_data`.
    ///
    /// # Safety
    /// `iov` must point to `iovcnt` iovecs, and those iovecs and every byte of memory they
    /// describe must stay valid (mapped, not freed, not moved) until the completion with
    /// `user_data` has been reaped, or [`Released::wait`] has returned for this ring.
    pub(crate) unsafe fn push_rw(
        &mut self,
        write: bool,
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
        user_data: u64,
        force_async: bool,
    ) -> io::Result<()> {
        match self {
            // SAFETY: the caller's contract is this function's.
            Ring::Uring(r) => unsafe {
                r.push_rw(write, iov, iovcnt, offset, user_data, force_async)
            },
            // SAFETY: as above.
            Ring::Rbd(r) => unsafe { r.push_rw(write, iov, iovcnt, offset, user_data) },
            Ring::Idle(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
        }
    }

    /// Sends what is queued (io_uring: one system call); librbd sent it already.
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        match self {
            Ring::Uring(r) => r.submit().map(|_| ()),
            Ring::Rbd(_) | Ring::Idle(_) => Ok(()),
        }
    }

    /// Blocks until at least one completion waits.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        match self {
            Ring::Uring(r) => r.wait(),
            Ring::Rbd(r) => r.wait(),
            Ring::Idle(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
        }
    }

    /// Whether completions wait (no system call).
    pub(crate) fn has_completions(&mut self) -> bool {
        match self {
            Ring::Uring(r) => r.has_completions(),
            Ring::Rbd(r) => r.has_completions(),
            Ring::Idle(_) => false,
        }
    }

    /// The notify fd woke the queue thread.
    pub(crate) fn notified(&mut self) {
        if let Ring::Uring(r) = self {
            r.notified();
        }
    }

    /// Appends `(user_data, result)` of every waiting completion to `out`.
    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>, in_flight: usize) -> io::Result<()> {
        match self {
            Ring::Uring(r) => r.reap(out, in_flight),
            Ring::Rbd(r) => r.reap(out),
            Ring::Idle(_) => Ok(()),
        }
    }

    /// What to wait for before the buffers of `in_flight` requests may be freed.
    pub(crate) fn released(&self, in_flight: usize) -> io::Result<Released> {
        match self {
            Ring::Uring(r) => Ok(Released::Uring(r.marker()?)),
            Ring::Rbd(r) => Ok(Released::Rbd(r.done().clone(), in_flight)),
            Ring::Idle(_) => Err(io::Error::from(io::ErrorKind::Unsupported)),
        }
    }
}
