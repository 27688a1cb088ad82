//! The librbd side of an engine: reads and writes go to `rbd_aio_readv`/`rbd_aio_writev`;
//! librbd completes them on its own threads, where [`RbdDone`] only records the result and
//! signals an eventfd the queue thread watches; the queue thread reaps them like io_uring
//! completions.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Where librbd posts results: the queue thread reaps them from here.
#[derive(Debug)]
pub(crate) struct RbdDone {
    state: Mutex<Posted>,
    /// Signalled when a result arrives with none waiting (the queue thread's wake-up).
    event: EventFd,
    /// Notified for every result (for [`RbdDone::wait_for`]).
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Posted {
    /// Results not reaped yet.
    results: Vec<(u64, i64)>,
    /// Results posted since creation.
    total: u64,
}

impl ::rbd::AioSink for RbdDone {
    fn complete(&self, tag: u64, result: i64) {
        let first = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            st.results.push((tag, result));
            st.total += 1;
            st.results.len() == 1
        };
        self.cv.notify_all();
        // Only the first result since the last reap signals: the queue thread takes every
        // waiting result when it reaps (it clears the eventfd before it drains).
        if first {
            if let Err(e) = self.event.write(1) {
                tracing::error!(error = %e, "cannot signal an RBD completion");
            }
        }
    }
}

impl RbdDone {
    /// Blocks until librbd has posted the results of `in_flight` requests not reaped yet
    /// (some may be posted already): used once the engine is gone and nobody reaps, to
    /// know librbd is done with their buffers.
    pub(crate) fn wait_for(&self, in_flight: usize) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let target = st.total - st.results.len() as u64 + in_flight as u64;
        while st.total < target {
            st = self.cv.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Posted> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// librbd as an engine's ring.
#[derive(Debug)]
pub(crate) struct RbdRing {
    image: Arc<::rbd::Image>,
    done: Arc<RbdDone>,
}

impl RbdRing {
    pub(crate) fn new(image: Arc<::rbd::Image>) -> io::Result<RbdRing> {
        Ok(RbdRing {
            image,
            done: Arc::new(RbdDone {
                state: Mutex::new(Posted::default()),
                event: EventFd::new(EFD_NONBLOCK)?,
                cv: Condvar::new(),
            }),
        })
    }

    pub(crate) fn notify_fd(&self) -> RawFd {
        self.done.event.as_raw_fd()
    }

    pub(crate) fn done(&self) -> &Arc<RbdDone> {
        &self.done
    }

    /// New requests go to `image` (the volume was resumed on another image).
    pub(crate) fn register(&mut self, image: Arc<::rbd::Image>) {
        self.image = image;
    }

    /// Starts a vectored read or write; librbd reports it to [`RbdDone`] with `user_data`.
    ///
    /// # Safety
    /// As [`super::ring::Ring::push_rw`]: the iovecs and the memory they describe stay
    /// valid until the completion is reaped or librbd is done with it.
    pub(crate) unsafe fn push_rw(
        &mut self,
        write: bool,
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
        user_data: u64,
    ) -> io::Result<()> {
        // SAFETY: the caller guarantees `iov` points to `iovcnt` valid iovecs, kept valid
        // (with the memory they describe) until the completion.
        let iov = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
        let sink: Arc<dyn ::rbd::AioSink> = self.done.clone();
        let done = ::rbd::Completion::new(sink, user_data);
        // SAFETY: as above: librbd may use the buffers until it completes `done`.
        let r = unsafe {
            if write {
                self.image.aio_writev(iov, offset, done)
            } else {
                self.image.aio_readv(iov, offset, done)
            }
        };
        r.map_err(|e| match e.errno() {
            Some(errno) => io::Error::from_raw_os_error(errno),
            None => io::Error::other(e.to_string()),
        })
    }

    pub(crate) fn has_completions(&self) -> bool {
        !self.done.lock().results.is_empty()
    }

    /// Blocks until a result waits.
    pub(crate) fn wait(&mut self) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        while !self.has_completions() {
            // SAFETY: the eventfd is owned by `self.done`, open across this poll, the only
            // use of the borrow (EventFd offers no `AsFd`).
            let fd = unsafe { BorrowedFd::borrow_raw(self.done.event.as_raw_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            self.clear();
        }
        Ok(())
    }

    fn clear(&self) {
        match self.done.event.read() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(error = %e, "reading the RBD completion event failed"),
        }
    }

    /// Moves every posted result to `out` (results are bytes for reads, 0 for writes, a
    /// negative errno for failures; clamped to i32 like io_uring's).
    pub(crate) fn reap(&mut self, out: &mut Vec<(u64, i32)>) -> io::Result<()> {
        // Cleared first: a result posted after the drain below signals again.
        self.clear();
        let mut st = self.done.lock();
        out.extend(st.results.drain(..).map(|(tag, r)| {
            (
                tag,
                i32::try_from(r).unwrap_or(if r < 0 { -libc::EIO } else { i32::MAX }),
            )
        }));
        Ok(())
    }
}
