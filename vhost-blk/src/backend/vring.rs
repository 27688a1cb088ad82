//! A queue thread's work: take chains from the avail ring (and those recorded in flight
//! before a reconnect), serve them through the queue's io_uring engine or its I/O threads,
//! and put the answers on the used ring in batches.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use super::workers::Pool;
use super::Session;
use crate::chain::RawChain;
use crate::engine::{Engine, Inner, Started};
use crate::memory::Mem;
use crate::queue::QueueState;
use crate::request::{process_chain, Completion, Taken};

/// Data bytes after which the io_uring path ends a batch: submits, completes, signals.
/// Sequential requests submitted together merge in the block layer; ending the batch
/// lets completions of large requests reach the guest while the next ones are copied
/// (bench/RESULTS.md, "Batch sizes and submission").
const FLUSH_BYTES: u64 = 512 * 1024;
/// Most completions added to the used ring before the guest is signalled.
const SIGNAL_BATCH: u32 = 8;
/// Most requests queued on a queue's io_uring before they are submitted, while more
/// chains are taken from the ring: the device starts on the first ones while the queue
/// thread parses the rest (bench/RESULTS.md, "Batch sizes and submission").
const SUBMIT_BATCH: u32 = 8;

impl Session {
    /// Runs a declined request on the queue's I/O threads (or here, without any).
    #[allow(clippy::too_many_arguments)]
    fn run_sync(
        &self,
        vring: &VringRwLock<Mem>,
        qs: &Arc<QueueState>,
        pool: Option<&Pool>,
        mem: &Arc<GuestMemoryMmap<()>>,
        chain: RawChain,
        taken: Taken,
        done: &mut Vec<Completion>,
    ) {
        match pool {
            Some(pool) => {
                let (dev, vring, mem, qs) =
                    (self.dev.clone(), vring.clone(), mem.clone(), qs.clone());
                pool.submit(Box::new(move || {
                    let mut d = vec![process_chain(&dev, &mem, chain, taken)];
                    if let Err(e) = qs.complete(&vring, &mut d) {
                        tracing::warn!(error = %e, "completing a request failed");
                    }
                }));
            }
            None => done.push(process_chain(&self.dev, mem, chain, taken)),
        }
    }

    /// The chains to serve next: first those recorded in flight before a reconnect, then
    /// the avail ring's (one at a time: the vring lock is not held while taking tickets),
    /// taken at `now` (the batch's time).
    fn next_chain(
        &self,
        vring: &VringRwLock<Mem>,
        qs: &QueueState,
        mem: &Arc<GuestMemoryMmap<()>>,
        resubmit: &mut Vec<u16>,
        now: Instant,
    ) -> Option<(RawChain, Taken)> {
        // Nothing is taken while the export is paused; a pause waits for a take under way.
        let _taking = self.dev.take_guard()?;
        if let Some(head) = resubmit.pop() {
            let (table, size) = {
                let v = vring.get_ref();
                (v.get_queue().desc_table(), v.get_queue().size())
            };
            let taken = qs.take(head, mem, now);
            return Some((RawChain::from_table(mem, table, size, head), taken));
        }
        let chain = vring
            .get_mut()
            .get_queue_mut()
            .pop_descriptor_chain(mem.clone())?;
        let taken = qs.take(chain.head_index(), mem, now);
        Some((RawChain::from_chain(chain), taken))
    }

    /// Serves every available chain of `vring` through the queue's io_uring engine:
    /// aligned reads and writes are submitted together, the rest go to the I/O threads
    /// (or run here once the engine is idle); completions are batched.
    fn process_vring_uring(
        &self,
        vring: &VringRwLock<Mem>,
        queue: usize,
        engine: &Engine,
    ) -> io::Result<()> {
        let pool = self.pools.get(queue);
        let qs = self.queue(queue)?;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut inner = engine.lock();
        inner.poll.woke();
        let mut done = Vec::new();
        let mut declined = Vec::new();
        let mut inline = Vec::new();
        // Oldest last: popped from the end.
        let mut resubmit: Vec<u16> = qs.take_resubmit().into_iter().rev().collect();
        // Once quiesced (export stopping) nothing more is taken: requests the guest still
        // makes available stay there, so leave rather than wake up for them again.
        while !self.quiesced.load(Ordering::Relaxed) {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // The current memory map, taken again after every poll: requests the guest
            // made after a memory table update must not meet the previous map.
            let mem = self.memory();
            // Chains taken in this pass: polling pays for a guest that waits for each
            // answer before its next request (one chain per pass); one that keeps many in
            // flight kicks again soon anyway, and spinning for it only burns the CPU
            // whoever serves or completes its requests needs.
            let mut chains = 0usize;
            // Batches end after FLUSH_BYTES of data, so completions of large requests
            // reach the guest while the next ones are copied.
            loop {
                let mut bytes = 0u64;
                let mut queued = 0;
                let now = Instant::now();
                while bytes < FLUSH_BYTES && !self.quiesced.load(Ordering::Relaxed) {
                    let Some((chain, taken)) = self.next_chain(vring, qs, &mem, &mut resubmit, now)
                    else {
                        break;
                    };
                    chains += 1;
                    match inner.start(&mem, chain, taken, &mut done) {
                        Started::Taken(len) => {
                            bytes += len;
                            queued += 1;
                            if queued == SUBMIT_BATCH {
                                submit(&mut inner);
                                queued = 0;
                            }
                        }
                        Started::Declined(chain) => declined.push((chain, taken)),
                        Started::Inline(chain, len) => {
                            bytes += len;
                            inline.push((chain, taken));
                        }
                    }
                }
                submit(&mut inner);
                for (chain, taken) in inline.drain(..) {
                    done.push(process_chain(&self.dev, &mem, chain, taken));
                }
                for (chain, taken) in declined.drain(..) {
                    if pool.is_none() {
                        // A synchronous write may wait for a range lock held by this
                        // engine's own writes: let them complete first.
                        inner.wait_all(&mut done)?;
                    }
                    self.run_sync(vring, qs, pool, &mem, chain, taken, &mut done);
                }
                inner.reap(&mut done);
                qs.complete(vring, &mut done)?;
                if bytes < FLUSH_BYTES {
                    break;
                }
            }
            if event_idx && chains <= 1 && self.poll(vring, qs, &mem, &mut inner)? {
                continue;
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        inner.poll.sleeping();
        Ok(())
    }

    /// With at most one request in flight, busy-polls the avail ring (guest notifications
    /// off) and the engine's completions for the queue's poll window; true when new
    /// requests are available.
    fn poll(
        &self,
        vring: &VringRwLock<Mem>,
        qs: &QueueState,
        mem: &GuestMemoryMmap<()>,
        inner: &mut Inner,
    ) -> io::Result<bool> {
        let window = inner.poll.window();
        // With several requests in flight, completions come through the ring's eventfd:
        // polling meanwhile would take the CPU from whoever completes them (a loop
        // device's worker, say). A single one (queue depth 1) is polled for, with the avail
        // ring.
        if window.is_zero() || inner.busy() > 1 || self.quiesced.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let start = Instant::now();
        let deadline = start + window;
        let mut done = Vec::new();
        loop {
            if inner.has_completions() {
                inner.reap(&mut done);
                qs.complete(vring, &mut done)?;
            }
            let avail = {
                let v = vring.get_ref();
                let q = v.get_queue();
                q.ready()
                    && q.avail_idx(mem, Ordering::Acquire)
                        .is_ok_and(|i| i.0 != q.next_avail())
            };
            if avail {
                inner.poll.caught(start.elapsed());
                return Ok(true);
            }
            if Instant::now() >= deadline {
                inner.poll.missed();
                return Ok(false);
            }
            std::hint::spin_loop();
        }
    }

    /// The queue's io_uring has completions: reap them into the used ring.
    pub(super) fn reap_vring(&self, vring: &VringRwLock<Mem>, queue: usize) -> io::Result<()> {
        let Some(engine) = self.engines.get(queue) else {
            return Ok(());
        };
        let qs = self.queue(queue)?;
        let mut done = Vec::new();
        let mut inner = engine.lock();
        inner.poll.woke();
        inner.notified();
        inner.reap(&mut done);
        qs.complete(vring, &mut done)?;
        // The guest usually answers a completion with a new request: poll for it too.
        let mut more = false;
        if self.event_idx.load(Ordering::Relaxed) && !inner.poll.window().is_zero() {
            let mem = self.memory();
            vring.disable_notification().map_err(io::Error::other)?;
            more = self.poll(vring, qs, &mem, &mut inner)?
                || vring.enable_notification().map_err(io::Error::other)?;
        }
        if more {
            drop(inner);
            return self.process_vring_uring(vring, queue, engine);
        }
        inner.poll.sleeping();
        Ok(())
    }

    /// Serves every available chain of `vring` without io_uring: on the queue's I/O
    /// threads, or on this thread when there are none.
    pub(super) fn process_vring(&self, vring: &VringRwLock<Mem>, queue: usize) -> io::Result<()> {
        if let Some(engine) = self.engines.get(queue) {
            return self.process_vring_uring(vring, queue, engine);
        }
        let pool = self.pools.get(queue);
        let qs = self.queue(queue)?;
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut resubmit: Vec<u16> = qs.take_resubmit().into_iter().rev().collect();
        while !self.quiesced.load(Ordering::Relaxed) {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mem = self.memory();
            let mut batch = Vec::new();
            let now = Instant::now();
            while !self.quiesced.load(Ordering::Relaxed) {
                match self.next_chain(vring, qs, &mem, &mut resubmit, now) {
                    Some(c) => batch.push(c),
                    None => break,
                }
            }
            // Without I/O threads the last request runs here (a lone request, queue depth
            // 1, pays no thread hop); with them, every request goes there, so the queue
            // thread never waits on the volume (a stalled one would hold up ring stops).
            let last = if pool.is_none() { batch.pop() } else { None };
            let mut done = Vec::new();
            for (chain, taken) in batch {
                self.run_sync(vring, qs, pool, &mem, chain, taken, &mut done);
                if done.len() >= SIGNAL_BATCH as usize {
                    qs.complete(vring, &mut done)?;
                }
            }
            if let Some((chain, taken)) = last {
                done.push(process_chain(&self.dev, &mem, chain, taken));
            }
            qs.complete(vring, &mut done)?;
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }
}

/// Submits the engine's queued requests. A failure (the kernel short of memory, say) is
/// logged and the requests stay queued for the next submit: returning it would drop the
/// batch's other requests, taken from the ring and not answered yet.
fn submit(inner: &mut Inner) {
    if let Err(e) = inner.submit() {
        tracing::warn!(error = %e, "io_uring submit failed; retried with the next batch");
    }
}
