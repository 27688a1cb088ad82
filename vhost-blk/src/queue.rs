//! One virtqueue's requests in flight, and the one place they are answered.
//!
//! Every chain taken from the avail ring gets a ticket (head index + sequence number).
//! A request is answered exactly once, by whoever claims its ticket first:
//! - its own completion (io_uring reap, an I/O thread, the queue thread), or
//! - the export, without waiting for the volume: the watchdog when the request is older
//!   than the I/O timeout or the volume was removed, or [`QueueState::stop`] when the
//!   frontend stops the ring (GET_VRING_BASE) and the grace period is over.
//!
//! Claiming, writing the status byte and adding the used element happen under the queue's
//! lock, so a late completion of a request already answered writes nothing to the guest:
//! neither the status byte nor the used ring, which may belong to a new request by then.
//! (A late *read* still lands in the guest's data buffers: the kernel cannot be stopped
//! from finishing a transfer it started; the guest was told the read failed.)
//!
//! With an in-flight buffer (`inflight.rs`) every take and completion is recorded there.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::chain::RawChain;
use crate::device::Device;
use crate::inflight::Region;
use crate::memory::Mem;
use crate::request::{status_address, Completion, Taken};
use crate::wire::STATUS_IOERR;

/// A request taken from the avail ring and not answered yet.
#[derive(Debug)]
struct Ticket {
    seq: u64,
    start: Instant,
    /// The guest memory map the request was taken with (its status byte is written there).
    mem: Arc<GuestMemoryMmap<()>>,
}

#[derive(Debug, Default)]
struct Tickets {
    /// By head index.
    slots: Vec<Option<Ticket>>,
    live: usize,
    next_seq: u64,
    /// Counter of the in-flight buffer (order of takes).
    counter: u64,
    /// Heads recorded in flight by a previous backend, to run before new requests.
    resubmit: Vec<u16>,
}

/// Why the export answers requests itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expire {
    /// Requests started before this instant (the I/O timeout).
    Before(Instant),
    /// Every request (volume removed, queue stopped).
    All,
}

/// One queue of a session.
pub(crate) struct QueueState {
    index: u16,
    dev: Arc<Device>,
    /// The largest queue size the export accepts: heads are below it.
    max_size: u16,
    t: Mutex<Tickets>,
    drained: Condvar,
    /// The vring, once started (the watchdog answers requests through it).
    vring: Mutex<Option<VringRwLock<Mem>>>,
    /// The session's in-flight buffer, if the frontend set one.
    inflight: Arc<Inflight>,
}

/// The session's in-flight buffer, shared by its queues (read on every request, replaced
/// only by SET_INFLIGHT_FD).
pub(crate) type Inflight = arc_swap::ArcSwapOption<Region>;

impl std::fmt::Debug for QueueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueState")
            .field("index", &self.index)
            .field("live", &self.live())
            .finish_non_exhaustive()
    }
}

impl QueueState {
    pub(crate) fn new(
        index: u16,
        dev: Arc<Device>,
        queue_size: u16,
        inflight: Arc<Inflight>,
    ) -> QueueState {
        QueueState {
            index,
            dev,
            max_size: queue_size,
            // Grown on demand to the heads the frontend uses (below the queue size it
            // picked), so a session's memory follows the size picked, not the largest.
            t: Mutex::new(Tickets::default()),
            drained: Condvar::new(),
            vring: Mutex::new(None),
            inflight,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tickets> {
        self.t.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn region(&self) -> arc_swap::Guard<Option<Arc<Region>>> {
        self.inflight.load()
    }

    /// Requests taken and not answered.
    pub(crate) fn live(&self) -> usize {
        self.lock().live
    }

    /// Takes the request at `head` at time `at`: returns its ticket.
    pub(crate) fn take(&self, head: u16, mem: &Arc<GuestMemoryMmap<()>>, at: Instant) -> Taken {
        let mut t = self.lock();
        t.next_seq += 1;
        t.counter += 1;
        let (seq, counter) = (t.next_seq, t.counter);
        let ticket = Ticket {
            seq,
            start: at,
            mem: mem.clone(),
        };
        let want = usize::from(head) + 1;
        if t.slots.len() < want && head < self.max_size {
            t.slots.resize_with(want.next_power_of_two(), || None);
        }
        match t.slots.get_mut(usize::from(head)) {
            Some(slot) => {
                // A head the guest made available again while still in flight (a broken
                // driver): the newer request owns it, the older is never answered.
                if slot.replace(ticket).is_none() {
                    t.live += 1;
                }
            }
            // Not reached: heads are below the queue size, which is at most the largest
            // size the export accepts (SET_VRING_NUM above it is refused).
            None => return Taken { seq: 0, at },
        }
        drop(t);
        if let Some(q) = self.region().as_ref().and_then(|r| r.queue(self.index)) {
            q.taken(head, counter);
        }
        Taken { seq, at }
    }

    /// Answers completed requests whose ticket is still theirs: status byte, used element,
    /// in-flight record; signals the guest once if it asked. Others were answered already.
    pub(crate) fn complete(
        &self,
        vring: &VringRwLock<Mem>,
        done: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let mut first_err = None;
        let signal = {
            let mut t = self.lock();
            let region = self.region();
            let rq = region.as_ref().and_then(|r| r.queue(self.index));
            let mut v = vring.get_mut();
            let mut added = false;
            for c in done.drain(..) {
                let Some(ticket) = claim(&mut t, c.head, c.seq) else {
                    continue;
                };
                let mut len = c.used_len;
                if let Some((addr, status)) = c.status {
                    if ticket.mem.write_obj(status, addr).is_err() {
                        len = 0;
                    }
                }
                if let Some(q) = &rq {
                    q.completing(c.head);
                }
                match v.add_used(c.head, len) {
                    Ok(()) => added = true,
                    Err(e) => {
                        first_err.get_or_insert(io::Error::other(e));
                    }
                }
                if let Some(q) = &rq {
                    q.completed(c.head, v.get_queue().next_used());
                }
            }
            if t.live == 0 {
                self.drained.notify_all();
            }
            added && v.needs_notification().unwrap_or(true)
        };
        if signal {
            vring.signal_used_queue()?;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Answers IOERR, without waiting for the volume, every request `expire` selects;
    /// returns how many. Their own completions, whenever they come, write nothing.
    pub(crate) fn fail(&self, expire: Expire) -> usize {
        let Some(vring) = self.vring() else {
            return 0;
        };
        let n = {
            let mut t = self.lock();
            let region = self.region();
            let rq = region.as_ref().and_then(|r| r.queue(self.index));
            let mut v = vring.get_mut();
            let (table, size) = {
                let q = v.get_queue();
                (q.desc_table(), q.size())
            };
            let mut n = 0;
            for head in 0..t.slots.len() {
                let due = match (&t.slots[head], expire) {
                    (Some(_), Expire::All) => true,
                    (Some(tk), Expire::Before(at)) => tk.start < at,
                    (None, _) => false,
                };
                if !due {
                    continue;
                }
                let Some(ticket) = t.slots[head].take() else {
                    continue;
                };
                t.live -= 1;
                n += 1;
                let head = head as u16;
                let chain = RawChain::from_table(&ticket.mem, table, size, head);
                let len = match status_address(&ticket.mem, chain) {
                    Some(addr) if write_status(&ticket.mem, addr) => 1,
                    _ => 0,
                };
                self.dev.metrics.record_timed_out(ticket.start.elapsed());
                if let Some(q) = &rq {
                    q.completing(head);
                }
                if let Err(e) = v.add_used(head, len) {
                    tracing::warn!(queue = self.index, error = %e, "cannot answer a request");
                }
                if let Some(q) = &rq {
                    q.completed(head, v.get_queue().next_used());
                }
            }
            if t.live == 0 {
                self.drained.notify_all();
            }
            n
        };
        if n > 0 {
            tracing::warn!(
                queue = self.index,
                requests = n,
                "answered requests IOERR without the volume"
            );
            if vring.needs_notification().unwrap_or(true) {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::warn!(queue = self.index, error = %e, "cannot signal the guest");
                }
            }
        }
        n
    }

    fn vring(&self) -> Option<VringRwLock<Mem>> {
        self.vring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The frontend started the vring: remember it, and with an in-flight buffer, resume
    /// the avail ring after the requests recorded in flight and queue those for
    /// resubmission. Returns whether there is anything to resubmit.
    pub(crate) fn started(&self, vring: &VringRwLock<Mem>, mem: &GuestMemoryMmap<()>) -> bool {
        *self.vring.lock().unwrap_or_else(PoisonError::into_inner) = Some(vring.clone());
        let used = {
            let v = vring.get_ref();
            match v.get_queue().used_idx(mem, Ordering::Acquire) {
                Ok(i) => i.0,
                Err(e) => {
                    tracing::warn!(queue = self.index, error = %e, "cannot read the used index");
                    return false;
                }
            }
        };
        let (heads, counter) = {
            let region = self.region();
            match region.as_ref().and_then(|r| r.queue(self.index)) {
                Some(rq) => rq.recover(used),
                None => return false,
            }
        };
        let n = heads.len();
        let next_avail = used.wrapping_add(n as u16);
        vring.set_queue_next_avail(next_avail);
        let mut t = self.lock();
        t.counter = t.counter.max(counter);
        if n > 0 {
            tracing::info!(
                queue = self.index,
                requests = n,
                next_avail,
                "resubmitting requests in flight before the reconnect"
            );
        }
        t.resubmit = heads;
        n > 0
    }

    /// Heads recorded in flight by a previous backend, to be run now (taken once).
    pub(crate) fn take_resubmit(&self) -> Vec<u16> {
        std::mem::take(&mut self.lock().resubmit)
    }

    /// Waits up to `timeout` until no request is in flight; false if some still are.
    pub(crate) fn wait_drained(&self, timeout: Duration) -> bool {
        let t = self.lock();
        let (t, _) = self
            .drained
            .wait_timeout_while(t, timeout, |t| t.live > 0)
            .unwrap_or_else(PoisonError::into_inner);
        t.live == 0
    }

    /// GET_VRING_BASE: nothing new is taken (the ring is not ready). Waits up to `grace`
    /// for the requests in flight; then, with an in-flight buffer, leaves the rest recorded
    /// there (a later start resubmits them; a guest reset discards them) and forgets them;
    /// without one, answers them IOERR. Either way no completion reaches the ring after
    /// this returns.
    pub(crate) fn stop(&self, grace: Duration) {
        let t = self.lock();
        let (mut t, _) = self
            .drained
            .wait_timeout_while(t, grace, |t| t.live > 0)
            .unwrap_or_else(PoisonError::into_inner);
        t.resubmit.clear();
        if t.live == 0 {
            return;
        }
        let keep = self.region().is_some();
        if keep {
            let n = t.live;
            for s in t.slots.iter_mut() {
                *s = None;
            }
            t.live = 0;
            tracing::warn!(
                queue = self.index,
                requests = n,
                "ring stopped with requests in flight: left in the in-flight buffer"
            );
            return;
        }
        drop(t);
        let n = self.fail(Expire::All);
        tracing::warn!(
            queue = self.index,
            requests = n,
            "ring stopped: requests in flight answered IOERR"
        );
    }
}

fn claim(t: &mut Tickets, head: u16, seq: u64) -> Option<Ticket> {
    let slot = t.slots.get_mut(usize::from(head))?;
    if slot.as_ref()?.seq != seq {
        return None;
    }
    let ticket = slot.take();
    t.live -= 1;
    ticket
}

fn write_status(mem: &GuestMemoryMmap<()>, addr: GuestAddress) -> bool {
    mem.write_obj(STATUS_IOERR, addr).is_ok()
}
