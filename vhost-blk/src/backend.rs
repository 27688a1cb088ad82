//! The vhost-user backend of one connection (session): features, config space, queues.
//!
//! A [`Session`] lives exactly as long as one frontend connection; it shares the
//! [`Device`] (volume, metrics, locks) with every other session of the export, and owns
//! its guest memory map and vring workers, which are joined before the next connection is
//! accepted.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::chain::RawChain;
use crate::engine::{Engine, Started};
use crate::inflight::Region;
use crate::queue::{Expire, QueueState};
use crate::request::{process_chain, Completion, Device, Taken, MAX_DWZ_SEGS};
use crate::volume::SECTOR_SIZE;

/// Guest memory as the vhost-user handler maps it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// VHOST_USER_F_PROTOCOL_FEATURES.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Byte offset of `wce` in `virtio_blk_config`.
const WCE_OFFSET: usize = 32;
/// Data bytes after which the io_uring path ends a batch: submits, completes, signals.
/// Measured with 128 KiB sequential I/O at queue depth 8 (bench/vhost.sh workloads):
/// 512 KiB against 128 KiB took 25-30% less CPU per request on a 4096-sector loop device
/// (sequential requests submitted together merge in the block layer) and 5-10% less on
/// tmpfs (fewer guest notifications); 4 MiB was no better than 512 KiB.
const FLUSH_BYTES: u64 = 512 * 1024;
/// Most completions added to the used ring before the guest is signalled.
const SIGNAL_BATCH: u32 = 8;
/// Most requests queued on a queue's io_uring before they are submitted, while more
/// chains are taken from the ring: the device starts on the first ones while the queue
/// thread parses the rest. Measured with 4 KiB random reads at queue depth 32 on a
/// 4096-sector loop device (bench/vhost.sh setup; IOPS, range over the runs): one submit
/// per batch 171-213k (8 runs); every 2 requests 195-237k (3); 4: 200-272k (5); 8:
/// 235-280k (9); 16: 209-241k (3); every request 180-193k (2). qemu-storage-daemon
/// (aio=native) in the same runs: 194-248k.
const SUBMIT_BATCH: u32 = 8;
/// Size of `virtio_blk_config` up to and including the write-zeroes fields.
pub(crate) const CONFIG_LEN: usize = 60;

/// Virtio feature bits offered for an export.
pub(crate) fn features(read_only: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BLK_F_SEG_MAX)
        | (1 << VIRTIO_BLK_F_BLK_SIZE)
        | (1 << VIRTIO_BLK_F_TOPOLOGY)
        | (1 << VIRTIO_BLK_F_FLUSH)
        | (1 << VIRTIO_BLK_F_DISCARD)
        | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        | (1 << VIRTIO_BLK_F_MQ)
        | (1 << VIRTIO_BLK_F_CONFIG_WCE)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_RING_F_INDIRECT_DESC)
        | (1 << VHOST_USER_F_PROTOCOL_FEATURES);
    if read_only {
        f |= 1 << VIRTIO_BLK_F_RO;
    }
    f
}

/// vhost-user protocol features offered.
pub(crate) fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// Geometry the guest is shown.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Guest logical block size in bytes.
    pub logical_block_size: u32,
    pub num_queues: u16,
    pub queue_size: u16,
}

/// Builds `virtio_blk_config` (little endian) for `dev` as shown to the guest.
pub(crate) fn config_space(dev: &Device, g: &Geometry) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let lbs = u64::from(g.logical_block_size);
    let vol = dev.volume();
    let phys = vol.physical_block_size().max(vol.block_size()).max(lbs);
    let exp = (phys / lbs).trailing_zeros();
    let (io_min, io_opt) = vol.io_sizes();
    let min_io = (u64::from(io_min).max(vol.block_size()) / lbs).clamp(1, u64::from(u16::MAX));
    let opt_io = u64::from(io_opt) / lbs;
    let max_sectors: u32 = (u32::MAX / 2) & !((vol.block_size() / SECTOR_SIZE) as u32 - 1);
    c[0..8].copy_from_slice(&g.capacity.to_le_bytes());
    // size_max (8..12) unused: SIZE_MAX is not offered.
    let seg_max = u32::from(g.queue_size.saturating_sub(2).max(1));
    c[12..16].copy_from_slice(&seg_max.to_le_bytes());
    c[20..24].copy_from_slice(&g.logical_block_size.to_le_bytes());
    c[24] = u8::try_from(exp).unwrap_or(0);
    c[25] = 0;
    c[26..28].copy_from_slice(&(min_io as u16).to_le_bytes());
    c[28..32].copy_from_slice(&u32::try_from(opt_io).unwrap_or(0).to_le_bytes());
    c[WCE_OFFSET] = u8::from(dev.wce.load(Ordering::Relaxed));
    c[34..36].copy_from_slice(&g.num_queues.to_le_bytes());
    c[36..40].copy_from_slice(&max_sectors.to_le_bytes());
    c[40..44].copy_from_slice(&MAX_DWZ_SEGS.to_le_bytes());
    c[44..48].copy_from_slice(&((vol.block_size() / SECTOR_SIZE) as u32).to_le_bytes());
    c[48..52].copy_from_slice(&max_sectors.to_le_bytes());
    c[52..56].copy_from_slice(&MAX_DWZ_SEGS.to_le_bytes());
    c[56] = 1;
    c
}

/// How long stopping a ring (GET_VRING_BASE) waits for its requests before leaving them
/// in the in-flight buffer or answering them IOERR: QEMU waits for the answer with its
/// main lock held, so this is kept short.
pub(crate) const STOP_GRACE: Duration = Duration::from_millis(250);
/// How often the watchdog looks for requests to answer without the volume.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);

/// The backend of one frontend connection.
#[derive(Debug)]
pub(crate) struct Session {
    dev: Arc<Device>,
    geometry: Geometry,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    /// I/O threads, one pool per queue (empty: every request runs on its queue thread).
    pools: Vec<Pool>,
    /// Requests in flight and their answers, per queue.
    queues: Arc<Vec<Arc<QueueState>>>,
    /// io_uring engines, one per queue (empty: the synchronous path serves every request).
    engines: Vec<Engine>,
    /// Per queue: wakes the queue thread to resubmit requests recorded in flight.
    resubmit: Vec<EventFd>,
    /// The in-flight buffer the frontend set, if any.
    inflight: Arc<crate::queue::Inflight>,
    /// Set when the export stops: no new request is taken.
    quiesced: AtomicBool,
    watchdog: Option<Watchdog>,
}

/// How a session serves its queues.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// I/O threads per queue (0: requests run on the queue thread).
    pub io_threads: usize,
    /// Aligned reads and writes through io_uring where the kernel allows it.
    pub io_uring: bool,
    /// Requests older than this are answered IOERR.
    pub io_timeout: Option<Duration>,
    /// Longest busy-poll window of a queue thread (zero: never poll).
    pub max_poll: Duration,
}

impl Session {
    pub(crate) fn new(
        dev: Arc<Device>,
        geometry: Geometry,
        mem: Mem,
        tuning: Tuning,
    ) -> io::Result<Session> {
        let Tuning {
            io_threads,
            io_uring,
            io_timeout,
            max_poll,
        } = tuning;
        let mut engines = Vec::new();
        if io_uring {
            for _ in 0..geometry.num_queues {
                match Engine::new(
                    dev.clone(),
                    geometry.queue_size,
                    max_poll,
                    // Completion work deferred to the queue thread (Linux 6.1+).
                    true,
                ) {
                    Ok(e) => engines.push(e),
                    Err(e) => {
                        tracing::info!(error = %e, "io_uring unavailable, using I/O threads");
                        engines.clear();
                        break;
                    }
                }
            }
        }
        let pools = if io_threads == 0 {
            Vec::new()
        } else {
            (0..usize::from(geometry.num_queues))
                .map(|q| Pool::new(io_threads, q))
                .collect::<io::Result<_>>()?
        };
        let inflight = Arc::new(crate::queue::Inflight::empty());
        let queues: Arc<Vec<_>> = Arc::new(
            (0..geometry.num_queues)
                .map(|q| {
                    Arc::new(QueueState::new(
                        q,
                        dev.clone(),
                        geometry.queue_size,
                        inflight.clone(),
                    ))
                })
                .collect(),
        );
        let resubmit = (0..geometry.num_queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        let watchdog = Watchdog::start(dev.clone(), queues.clone(), io_timeout)?;
        Ok(Session {
            dev,
            geometry,
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
            pools,
            queues,
            engines,
            resubmit,
            inflight,
            quiesced: AtomicBool::new(false),
            watchdog: Some(watchdog),
        })
    }

    /// The guest memory map as of now.
    fn memory(&self) -> Arc<GuestMemoryMmap<()>> {
        self.mem
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .memory()
            .into_inner()
    }

    /// Fds the queue threads watch besides the kicks: `(queue, fd, event id offset)`; the
    /// io_uring completion fds (offset 1: ids num_queues + 1 + queue) and the resubmission
    /// events (offset 2: ids 2 * num_queues + 1 + queue).
    pub(crate) fn extra_fds(&self) -> Vec<(usize, std::os::fd::RawFd, u64)> {
        use std::os::fd::AsRawFd;
        let nq = u64::from(self.geometry.num_queues);
        let mut v: Vec<_> = self
            .engines
            .iter()
            .enumerate()
            .map(|(q, e)| (q, e.fd(), nq + 1 + q as u64))
            .collect();
        v.extend(
            self.resubmit
                .iter()
                .enumerate()
                .map(|(q, e)| (q, e.as_raw_fd(), 2 * nq + 1 + q as u64)),
        );
        v
    }

    /// Export stopping: takes no new request, waits up to `grace` for those in flight, and
    /// answers the rest IOERR (so a guest that still has the device sees errors).
    pub(crate) fn quiesce(&self, grace: Duration) {
        self.quiesced.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        for q in self.queues.iter() {
            q.wait_drained(deadline.saturating_duration_since(Instant::now()));
            q.fail(Expire::All);
        }
    }

    fn queue(&self, q: usize) -> io::Result<&Arc<QueueState>> {
        self.queues
            .get(q)
            .ok_or_else(|| io::Error::other(format!("no queue {q}")))
    }

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
            if event_idx && self.poll(vring, qs, &mem, &mut inner)? {
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
        inner: &mut crate::engine::Inner,
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
    fn reap_vring(&self, vring: &VringRwLock<Mem>, queue: usize) -> io::Result<()> {
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
    fn process_vring(&self, vring: &VringRwLock<Mem>, queue: usize) -> io::Result<()> {
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
fn submit(inner: &mut crate::engine::Inner) {
    if let Err(e) = inner.submit() {
        tracing::warn!(error = %e, "io_uring submit failed; retried with the next batch");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.stop();
        }
    }
}

/// Answers requests the volume does not finish in time, and all of them once it is
/// removed: one thread per session, waking every [`WATCHDOG_TICK`].
#[derive(Debug)]
struct Watchdog {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(
        dev: Arc<Device>,
        queues: Arc<Vec<Arc<QueueState>>>,
        timeout: Option<Duration>,
    ) -> io::Result<Watchdog> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vhost-blk-watchdog".into())
            .spawn(move || {
                let (lock, cv) = &*s;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    let (g, _) = cv
                        .wait_timeout(stopped, WATCHDOG_TICK)
                        .unwrap_or_else(PoisonError::into_inner);
                    stopped = g;
                    if *stopped {
                        break;
                    }
                    let expire = if dev.is_removed() {
                        Some(Expire::All)
                    } else {
                        timeout
                            .and_then(|t| Instant::now().checked_sub(t))
                            .map(Expire::Before)
                    };
                    let Some(expire) = expire else {
                        continue;
                    };
                    let n: usize = queues.iter().map(|q| q.fail(expire)).sum();
                    if n > 0 && expire != Expire::All {
                        dev.emit(&crate::device::ExportEvent::TimedOut { requests: n as u64 });
                    }
                }
            })?;
        Ok(Watchdog {
            stop,
            thread: Some(thread),
        })
    }

    fn stop(mut self) {
        *self.stop.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// How long dropping a pool waits for its threads; threads stuck in the volume (a stalled
/// device) are left to finish on their own.
const POOL_JOIN_WAIT: Duration = Duration::from_millis(200);

/// I/O threads of one queue. Dropping the pool lets every queued request finish; threads
/// still busy after [`POOL_JOIN_WAIT`] are detached (their requests were answered by the
/// watchdog or the ring stop; they only hold references to the device and guest memory).
struct Pool {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    running: Arc<(Mutex<usize>, Condvar)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Pool {
    fn new(threads: usize, queue: usize) -> io::Result<Pool> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let running = Arc::new((Mutex::new(0usize), Condvar::new()));
        let mut handles = Vec::new();
        for i in 0..threads {
            let rx = rx.clone();
            let running = running.clone();
            *running.0.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            let h = std::thread::Builder::new()
                .name(format!("vhost-blk-q{queue}-io{i}"))
                .spawn(move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                    let (n, cv) = &*running;
                    *n.lock().unwrap_or_else(PoisonError::into_inner) -= 1;
                    cv.notify_all();
                });
            match h {
                Ok(h) => handles.push(h),
                Err(e) => {
                    drop(tx);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            tx: Some(tx),
            threads: handles,
            running,
        })
    }

    fn submit(&self, job: Job) {
        let job = match self.tx.as_ref().map(|tx| tx.send(job)) {
            Some(Ok(())) => return,
            Some(Err(mpsc::SendError(job))) => job,
            None => return,
        };
        // Every I/O thread is gone: run it here rather than lose the request.
        job();
    }
}

static DETACHED_IO_THREADS: AtomicUsize = AtomicUsize::new(0);

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        let (n, cv) = &*self.running;
        let left = {
            let g = n.lock().unwrap_or_else(PoisonError::into_inner);
            let (g, _) = cv
                .wait_timeout_while(g, POOL_JOIN_WAIT, |n| *n > 0)
                .unwrap_or_else(PoisonError::into_inner);
            *g
        };
        if left > 0 {
            let total = DETACHED_IO_THREADS.fetch_add(left, Ordering::Relaxed) + left;
            tracing::warn!(
                threads = left,
                total,
                "I/O threads still waiting for the volume are left to finish on their own"
            );
            self.threads.clear();
            return;
        }
        for h in self.threads.drain(..) {
            let _ = h.join();
        }
    }
}

impl VhostUserBackend for Session {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        usize::from(self.geometry.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.geometry.queue_size)
    }

    fn features(&self) -> u64 {
        features(self.dev.is_read_only())
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = config_space(&self.dev, &self.geometry);
        // The vhost-user protocol caps config messages at 256 bytes; never trust `size`
        // for an allocation beyond that.
        let mut out = vec![0u8; (size as usize).min(256)];
        let start = (offset as usize).min(CONFIG_LEN);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_LEN);
        out[..end - start].copy_from_slice(&cfg[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache mode is writable.
        if let Some(i) = WCE_OFFSET.checked_sub(offset as usize) {
            if let Some(&v) = buf.get(i) {
                self.dev.wce.store(v != 0, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(PoisonError::into_inner) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.geometry.num_queues.min(64))
            .map(|i| 1u64 << i)
            .collect()
    }

    /// GET_VRING_BASE (guest reset, QEMU stop or shutdown): the ring is already marked not
    /// ready, so nothing new is taken. Requests in flight get [`STOP_GRACE`] to finish;
    /// QEMU holds its main lock meanwhile, so a stalled volume must not hold this up.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(q) = self.queues.get(queue_index as usize) {
            q.stop(STOP_GRACE);
        }
        Ok(())
    }

    fn get_inflight_fd(&self, num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
        Region::create(num_queues, queue_size)
    }

    fn set_inflight_fd(
        &self,
        file: File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<()> {
        let region = Region::map(file, mmap_size, mmap_offset, num_queues, queue_size)?;
        tracing::debug!(
            queues = region.num_queues(),
            queue_size,
            "in-flight buffer set"
        );
        self.inflight.store(Some(Arc::new(region)));
        Ok(())
    }

    fn vring_started(&self, queue_index: u16, vring: &Self::Vring) -> io::Result<()> {
        let q = usize::from(queue_index);
        let Some(qs) = self.queues.get(q) else {
            return Ok(());
        };
        if qs.started(vring, &self.memory()) {
            if let Some(ev) = self.resubmit.get(q) {
                ev.write(1)?;
            }
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Ok(());
        }
        let nq = usize::from(self.geometry.num_queues);
        let ev = usize::from(device_event);
        // One thread per queue: the thread index is the queue index, and `vrings` holds
        // this thread's vrings only, so its queue is the first.
        let r = if ev > 2 * nq {
            // Requests recorded in flight to resubmit.
            if let Some(e) = self.resubmit.get(thread_id) {
                let _ = e.read();
            }
            match vrings.first() {
                Some(vring) => self.process_vring(vring, thread_id),
                None => Ok(()),
            }
        } else if ev > nq {
            // An io_uring fd: completions to reap.
            match vrings.first() {
                Some(vring) => self.reap_vring(vring, thread_id),
                None => Ok(()),
            }
        } else {
            match vrings.get(ev) {
                Some(vring) => self.process_vring(vring, thread_id),
                None => Ok(()),
            }
        };
        // An error here would end the worker thread; the queue is broken (bad ring
        // addresses), so log it and wait for the frontend to reset or reconnect.
        if let Err(e) = r {
            tracing::warn!(queue = thread_id, error = %e, "virtqueue processing stopped");
        }
        Ok(())
    }
}
