//! The asynchronous engine of one virtqueue: io_uring for files and block devices,
//! librbd for RBD images (ring.rs chooses; rbd.rs is librbd's side).
//!
//! ```text
//!  kick -> pop every available chain -> begin(): validate
//!            aligned read / write (write cache on) -> slot + iovecs -> SQE   } a submit per
//!            anything else (misaligned RMW, flush, discard, ...) -> declined  } 8 SQEs
//!            (on a volume in memory, reads and writes run inline instead)
//!  ring eventfd readable (or right after the submit) -> reap CQEs -> finish_io()
//!            -> used ring, one guest notification per batch
//! ```
//!
//! Only the queue's own worker thread submits and reaps (io_uring's completion work is
//! deferred to it where the kernel allows: see `sys::Uring`; librbd's completions are
//! posted from librbd's threads to an eventfd the queue thread watches). Each in-flight request owns a
//! slot holding its iovecs and a reference to the guest memory map they point into; both
//! live until the completion is reaped. An engine dropped with requests in flight (the
//! session ended while the volume stalled) closes its ring and leaves the slots to a
//! thread that frees them once the kernel has released the ring. Writes to a volume with
//! range locks hold their device-aligned range from submit to completion, taken without
//! waiting (a busy range declines the request to the synchronous path, which may wait), so
//! the queue thread never blocks on a range lock.

mod poll;
mod rbd;
mod ring;

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use crate::chain::RawChain;
use crate::device::Device;
use crate::request::{begin, finish_io, Begun, Completion, Pending, Taken};
use crate::volume::{LockedRange, Volume, VolumeError};
pub(crate) use poll::Poll;
pub use poll::DEFAULT_POLL_US;
use ring::{Released, Ring};

/// Iovecs of one slot.
#[derive(Debug, Default)]
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the raw pointers in the iovecs are only handed to the kernel (never dereferenced
// by this crate); they point into guest memory that the owning slot keeps mapped through an
// `Arc` of the memory map, which is itself Send + Sync. Moving the list between threads
// (the engine is created on the accept thread and used on the queue thread) is sound.
unsafe impl Send for IoVecs {}

/// A read or write in flight.
#[derive(Debug)]
struct Io {
    pending: Pending,
    /// Keeps the guest memory the iovecs point into mapped until the completion is reaped.
    _mem: Arc<GuestMemoryMmap<()>>,
    /// First iovec not yet (fully) transferred.
    first: usize,
    /// Volume offset of the next byte to transfer.
    offset: u64,
    /// Bytes still to transfer.
    left: u64,
    /// Range-lock range held until completion.
    lock: Option<LockedRange>,
    /// The volume the transfer goes to: kept open (and its range locks reachable) until
    /// the completion is reaped, even if a resume swapped it out meanwhile.
    vol: Arc<Volume>,
}

#[derive(Debug, Default)]
struct Slot {
    io: Option<Io>,
    iov: IoVecs,
}

/// What [`Inner::start`] did with a chain.
#[derive(Debug)]
pub(crate) enum Started {
    /// Queued for submission (with its data length), or already completed into `done`.
    Taken(u64),
    /// For the synchronous path on an I/O thread (it may wait: read-modify-write under
    /// the range lock, flush, discard).
    Declined(RawChain),
    /// For the synchronous path on the queue thread, right away: on a volume in memory
    /// the copy costs less than a hand-off to another thread, and nothing waits. (io_uring
    /// hands reads and writes of tmpfs files to its io-wq worker threads, a hop to another
    /// thread and back for each one: bench/RESULTS.md, "io_uring on tmpfs".)
    /// Carries the bytes its buffers describe (header and status included), for batching.
    Inline(RawChain, u64),
}

/// The asynchronous engine of one queue.
#[derive(Debug)]
pub(crate) struct Engine {
    fd: RawFd,
    inner: Mutex<Inner>,
}

/// The engine's state; locked by the queue thread for a whole batch.
#[derive(Debug)]
pub(crate) struct Inner {
    dev: Arc<Device>,
    ring: Ring,
    /// The ring serves the thread holding the lock (see [`Engine::lock`]).
    usable: bool,
    /// A thread other than the ring's owner was refused (logged once).
    refused: bool,
    /// Generation of the device's volume registered with the ring.
    generation: u64,
    /// Never resized after creation: iovec lists of in-flight slots do not move.
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Completions reaped, reused between calls.
    cqes: Vec<(u64, i32)>,
    /// How long the queue thread polls before sleeping.
    pub(crate) poll: Poll,
}

impl Engine {
    /// An engine for a queue of `queue_size` descriptors, its completion work deferred to
    /// the queue thread if `defer` and the kernel allows it; fails where io_uring is
    /// unavailable (ENOSYS, EPERM) or cannot be set up.
    pub(crate) fn new(
        dev: Arc<Device>,
        queue_size: u16,
        max_poll: Duration,
        defer: bool,
    ) -> io::Result<Engine> {
        let n = usize::from(queue_size.max(1));
        let entries = u32::from(queue_size.max(1));
        let generation = dev.generation();
        let ring = Ring::for_volume(&dev.volume(), entries, defer)?;
        let fd = ring.notify_fd();
        tracing::debug!(entries, ring = ring.describe(), "engine set up");
        let slots = (0..n).map(|_| Slot::default()).collect();
        Ok(Engine {
            fd,
            inner: Mutex::new(Inner {
                dev,
                ring,
                usable: false,
                refused: false,
                generation,
                slots,
                free: (0..n).rev().collect(),
                cqes: Vec::with_capacity(n),
                poll: Poll::new(max_poll),
            }),
        })
    }

    /// The fd to watch: readable while completions wait to be reaped.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd
    }

    /// The engine, for the calling thread: the first thread to lock it owns a ring with
    /// deferred completion work (the queue thread; one thread serves each queue). Any other
    /// finds the engine unusable: its chains are declined to the synchronous path and it
    /// reaps nothing.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match g.ring.claim() {
            Ok(()) => g.usable = true,
            Err(e) => {
                g.usable = false;
                if !g.refused {
                    g.refused = true;
                    tracing::warn!(error = %e, "io_uring ring unusable on this thread; its requests take the synchronous path");
                }
            }
        }
        g
    }
}

impl Inner {
    /// Requests in flight.
    pub(crate) fn busy(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes one chain: invalid chains are completed into `done`, aligned reads and writes
    /// are queued (sent with [`Inner::submit`]); anything else is handed back for the
    /// synchronous path.
    pub(crate) fn start(
        &mut self,
        mem: &Arc<GuestMemoryMmap<()>>,
        chain: RawChain,
        taken: Taken,
        done: &mut Vec<Completion>,
    ) -> Started {
        let dev = self.dev.clone();
        let vol = dev.volume();
        if vol.is_memory_backed() {
            // The queue thread copies it itself; `process_chain` validates it there, once.
            let len = chain
                .segs
                .as_ref()
                .map_or(0, |s| s.iter().map(|g| g.len).sum());
            return Started::Inline(chain, len);
        }
        let copy = RawChain {
            head: chain.head,
            segs: None,
        };
        let keep = chain.segs.clone();
        let mut has_slot = self.usable && !self.free.is_empty();
        if has_slot && dev.generation() != self.generation {
            // The volume was resumed on another file: requests in flight keep the old
            // one through their slot; new ones go to the new one.
            match self.ring.register(&vol) {
                Ok(()) => self.generation = dev.generation(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot register the resumed volume with the engine");
                    has_slot = false;
                }
            }
        }
        let begun = begin(&dev, mem, chain, taken, |write, offset, slices| {
            if !has_slot || !vol.direct_ok(offset, slices) {
                return None;
            }
            if write {
                let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
                // Declined while another write holds part of the range.
                vol.try_lock_write(offset, len).ok()
            } else {
                Some(None)
            }
        });
        let copy = RawChain { segs: keep, ..copy };
        let (pending, slices, lock) = match begun {
            Begun::Done(c) => {
                done.push(c);
                return Started::Taken(0);
            }
            Begun::Declined => return Started::Declined(copy),
            Begun::Io(p, s, l) => (p, s, l),
        };
        if pending.len == 0 {
            if let Some(r) = lock {
                vol.unlock_write(r);
            }
            done.push(finish_io(&dev, pending, Ok(())));
            return Started::Taken(0);
        }
        let Some(idx) = self.free.pop() else {
            // `has_slot` was checked above; unreachable, but never lose a request.
            if let Some(r) = lock {
                vol.unlock_write(r);
            }
            done.push(finish_io(
                &dev,
                pending,
                Err(VolumeError::Short {
                    op: "io_uring slot",
                    offset: 0,
                }),
            ));
            return Started::Taken(0);
        };
        let slot = &mut self.slots[idx];
        slot.iov.0.clear();
        slot.iov.0.extend(slices.iter().map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        }));
        drop(slices);
        let len = pending.len;
        slot.io = Some(Io {
            offset: pending.offset,
            left: pending.len,
            pending,
            _mem: mem.clone(),
            first: 0,
            lock,
            vol,
        });
        if let Err(e) = self.push(idx) {
            self.complete(idx, Err(e), done);
        }
        Started::Taken(len)
    }

    /// Queues the remaining transfer of slot `idx`.
    fn push(&mut self, idx: usize) -> Result<(), VolumeError> {
        let slot = &self.slots[idx];
        let Some(io) = slot.io.as_ref() else {
            return Ok(());
        };
        let op = self.ring.op(io.pending.write);
        let err = |source| VolumeError::Io {
            op,
            offset: io.offset,
            source,
        };
        let iov = slot.iov.0.get(io.first..).unwrap_or(&[]);
        let cnt = u32::try_from(iov.len())
            .map_err(|_| err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: the iovecs live in `self.slots[idx].iov`, whose heap buffer is neither
        // modified, reallocated nor freed until the completion with user_data `idx` is
        // reaped: only `reap` (after that completion) and `start` (on a free slot) touch
        // it, `slots` is never resized, and an engine dropped with requests in flight
        // hands its slots over, untouched, to a thread that frees them only once the
        // kernel has released the ring (`InFlight`). The memory they describe is guest
        // memory kept mapped by `io.mem`, an Arc of the memory map held in the same slot
        // for the same time; `direct_ok` checked the buffers lie inside it (they came from
        // validated `VolatileSlice`s).
        unsafe {
            self.ring.push_rw(
                io.pending.write,
                iov.as_ptr(),
                cnt,
                io.offset,
                idx as u64,
                io.vol.waits_for_a_server(),
            )
        }
        .map_err(err)
    }

    /// Finishes slot `idx`: releases its lock, completes the request, frees the slot.
    fn complete(&mut self, idx: usize, r: Result<(), VolumeError>, done: &mut Vec<Completion>) {
        let Some(io) = self.slots.get_mut(idx).and_then(|s| s.io.take()) else {
            return;
        };
        if let Some(range) = io.lock {
            io.vol.unlock_write(range);
        }
        if let Err(e) = &r {
            self.dev.note_io_error(&io.vol, e);
        }
        done.push(finish_io(&self.dev, io.pending, r));
        self.free.push(idx);
    }

    /// Whether completions wait to be reaped (no system call).
    pub(crate) fn has_completions(&mut self) -> bool {
        self.usable && self.busy() > 0 && self.ring.has_completions()
    }

    /// Submits every queued request (one system call, if any).
    pub(crate) fn submit(&mut self) -> io::Result<()> {
        if !self.usable {
            return Ok(());
        }
        self.ring.submit()
    }

    /// The engine's fd woke the queue thread (it is cleared by the next reap).
    pub(crate) fn notified(&mut self) {
        self.ring.notified();
    }

    /// Reaps waiting completions into `done`; short transfers are resubmitted for the rest.
    pub(crate) fn reap(&mut self, done: &mut Vec<Completion>) {
        if !self.usable {
            return;
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        if let Err(e) = self.ring.reap(&mut cqes, self.busy()) {
            // What was posted is taken below; the rest comes with the next wake-up.
            tracing::warn!(error = %e, "running io_uring completion work failed");
        }
        let mut resubmit = false;
        for &(ud, res) in &cqes {
            let idx = usize::try_from(ud).unwrap_or(usize::MAX);
            let Some(slot) = self.slots.get_mut(idx) else {
                continue;
            };
            let Some(io) = slot.io.as_mut() else {
                continue;
            };
            let op = self.ring.op(io.pending.write);
            let outcome = if res >= 0 && self.ring.completes_whole() {
                // librbd reads return the bytes read (fewer past the image's end: a
                // shrunk image), writes 0.
                if !io.pending.write && (res.unsigned_abs() as u64) < io.left {
                    Some(Err(VolumeError::Short {
                        op,
                        offset: io.offset,
                    }))
                } else {
                    Some(Ok(()))
                }
            } else if res == -libc::EAGAIN || res == -libc::EINTR {
                None
            } else if res < 0 {
                Some(Err(VolumeError::Io {
                    op,
                    offset: io.offset,
                    source: io::Error::from_raw_os_error(-res),
                }))
            } else if res == 0 {
                Some(Err(VolumeError::Short {
                    op,
                    offset: io.offset,
                }))
            } else {
                let n = res.unsigned_abs() as u64;
                if n >= io.left {
                    Some(Ok(()))
                } else {
                    // Short transfer: skip what was done and go on with the rest.
                    io.left -= n;
                    io.offset += n;
                    let mut n = n as usize;
                    while n > 0 {
                        let Some(v) = slot.iov.0.get_mut(io.first) else {
                            break;
                        };
                        if n >= v.iov_len {
                            n -= v.iov_len;
                            io.first += 1;
                        } else {
                            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                            v.iov_len -= n;
                            n = 0;
                        }
                    }
                    None
                }
            };
            match outcome {
                Some(r) => self.complete(idx, r, done),
                None => match self.push(idx) {
                    Ok(()) => resubmit = true,
                    Err(e) => self.complete(idx, Err(e), done),
                },
            }
        }
        self.cqes = cqes;
        if resubmit {
            if let Err(e) = self.submit() {
                tracing::warn!(error = %e, "io_uring resubmission failed");
            }
        }
    }

    /// Waits until every request in flight has completed, into `done`.
    pub(crate) fn wait_all(&mut self, done: &mut Vec<Completion>) -> io::Result<()> {
        if !self.usable && self.busy() > 0 {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        while self.busy() > 0 {
            self.ring.wait()?;
            self.reap(done);
        }
        Ok(())
    }
}

impl Drop for Inner {
    // Runs where the session ends, after the queue threads have exited.
    fn drop(&mut self) {
        if self.busy() == 0 {
            return;
        }
        // The kernel may still access the guest memory and iovecs of requests in flight
        // (a stalled volume), and only the ring's owner, gone now, could reap them. The
        // ring closes when this returns; a thread keeps the slots (and their memory
        // references and range locks) until the kernel has released it.
        let slots: Vec<Slot> = std::mem::take(&mut self.slots)
            .into_iter()
            .filter(|s| s.io.is_some())
            .collect();
        let requests = slots.len();
        let released = match self.ring.released(requests) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, requests, "cannot follow the requests of a closed session; leaking their buffers");
                std::mem::forget(slots);
                return;
            }
        };
        tracing::warn!(
            requests,
            "session ended with requests still in the kernel or librbd; their guest memory is kept until they end"
        );
        let held = InFlight {
            released: Some(released),
            slots,
        };
        let spawned = std::thread::Builder::new()
            .name("vhost-blk-reaper".into())
            .spawn(move || held.release());
        match spawned {
            Ok(h) => REAPERS
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(h),
            Err(e) => {
                // The closure, dropped unrun, leaked the slots (waiting here would wait for a
                // ring that closes only after this returns).
                tracing::error!(error = %e, requests, "cannot start a thread for requests in flight; leaking their buffers");
            }
        }
    }
}

/// Threads holding the requests of closed sessions until the kernel or librbd is done
/// with them.
static REAPERS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits up to `timeout` for the requests closed sessions left in flight (a process
/// about to exit: an RBD image is closed, and its lock released, only once librbd is
/// done with them). Returns how many threads still hold some.
pub fn settle_requests_in_flight(timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut reapers = std::mem::take(&mut *REAPERS.lock().unwrap_or_else(PoisonError::into_inner));
    while !reapers.is_empty() && Instant::now() < deadline {
        reapers.retain(|h| !h.is_finished());
        std::thread::sleep(Duration::from_millis(10));
    }
    let left = reapers.len();
    for h in reapers.drain(..).filter(|h| h.is_finished()) {
        let _ = h.join();
    }
    left
}

/// The slots of a closed ring's requests: freed by [`InFlight::release`] once the kernel
/// has released the ring, leaked if dropped without it.
struct InFlight {
    /// Taken by [`InFlight::release`].
    released: Option<Released>,
    slots: Vec<Slot>,
}

impl InFlight {
    /// Waits for the kernel to release the ring, then frees the slots and their range
    /// locks.
    fn release(mut self) {
        let started = Instant::now();
        let Some(released) = self.released.take() else {
            return;
        };
        if let Err(e) = released.wait() {
            tracing::error!(error = %e, requests = self.slots.len(), "cannot wait for the requests of a closed session; leaking their buffers");
            return;
        }
        let slots = std::mem::take(&mut self.slots);
        for io in slots.iter().filter_map(|s| s.io.as_ref()) {
            if let Some(range) = io.lock {
                io.vol.unlock_write(range);
            }
        }
        tracing::warn!(
            requests = slots.len(),
            waited_ms = started.elapsed().as_millis() as u64,
            "requests of a closed session ended"
        );
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Not released: the kernel may still use the buffers.
        std::mem::forget(std::mem::take(&mut self.slots));
    }
}
