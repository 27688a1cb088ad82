//! The vhost-user backend of one connection (session): features, config space, queues.
//!
//! A [`Session`] lives exactly as long as one frontend connection; it shares the
//! [`Device`] (volume, metrics, locks) with every other session of the export, and owns
//! its guest memory map and vring workers, which are joined before the next connection is
//! accepted.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, PoisonError, RwLock};
use std::time::Duration;

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

use crate::engine::{Engine, Started};
use crate::request::{process_chain, Completion, Device, MAX_DWZ_SEGS};
use crate::volume::SECTOR_SIZE;

/// Guest memory as the vhost-user handler maps it.
pub(crate) type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// VHOST_USER_F_PROTOCOL_FEATURES.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Byte offset of `wce` in `virtio_blk_config`.
const WCE_OFFSET: usize = 32;
/// Data bytes after which the io_uring path ends a batch: submits, completes, signals.
const FLUSH_BYTES: u64 = 128 * 1024;
/// Most completions added to the used ring before the guest is signalled.
const SIGNAL_BATCH: u32 = 8;
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
    let vol = &dev.volume;
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

/// The backend of one frontend connection.
#[derive(Debug)]
pub(crate) struct Session {
    dev: Arc<Device>,
    geometry: Geometry,
    mem: RwLock<Mem>,
    event_idx: AtomicBool,
    /// I/O threads, one pool per queue (empty: every request runs on its queue thread).
    pools: Vec<Pool>,
    /// Requests in flight, per queue.
    inflight: Vec<Arc<InFlight>>,
    /// io_uring engines, one per queue (empty: the synchronous path serves every request).
    engines: Vec<Engine>,
}

impl Session {
    pub(crate) fn new(
        dev: Arc<Device>,
        geometry: Geometry,
        mem: Mem,
        io_threads: usize,
        io_uring: bool,
    ) -> io::Result<Session> {
        let mut engines = Vec::new();
        if io_uring {
            for _ in 0..geometry.num_queues {
                match Engine::new(dev.clone(), geometry.queue_size) {
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
        Ok(Session {
            dev,
            geometry,
            mem: RwLock::new(mem),
            event_idx: AtomicBool::new(false),
            pools,
            inflight: (0..geometry.num_queues)
                .map(|_| Arc::new(InFlight::default()))
                .collect(),
            engines,
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

    /// The io_uring fds to watch, by queue (empty without io_uring).
    pub(crate) fn engine_fds(&self) -> Vec<(usize, std::os::fd::RawFd)> {
        self.engines.iter().map(Engine::fd).enumerate().collect()
    }

    /// Adds completions to the used ring and notifies the guest once, if it asked.
    fn complete_batch(
        &self,
        vring: &VringRwLock<Mem>,
        queue: usize,
        done: &mut Vec<Completion>,
    ) -> io::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let n = done.len();
        let mut first_err: Option<io::Error> = None;
        let signal = {
            let mut v = vring.get_mut();
            for c in done.drain(..) {
                if let Err(e) = v.add_used(c.head, c.used_len) {
                    first_err.get_or_insert(io::Error::other(e));
                }
            }
            v.needs_notification().unwrap_or(true)
        };
        if let Some(f) = self.inflight.get(queue) {
            f.done_n(n);
        }
        if signal {
            vring.signal_used_queue()?;
        }
        first_err.map_or(Ok(()), Err)
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
        let inflight = self.inflight.get(queue);
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        let mut inner = engine.lock();
        inner.poll.woke();
        let mut done = Vec::new();
        let mut declined = Vec::new();
        let mut inline = Vec::new();
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            // The current memory map, taken again after every poll: requests the guest
            // made after a memory table update must not meet the previous map.
            let mem = self.memory();
            // Batches end after FLUSH_BYTES of data, so completions of large requests
            // reach the guest while the next ones are copied.
            loop {
                let mut taken = 0usize;
                let mut bytes = 0u64;
                {
                    let mut v = vring.get_mut();
                    let q = v.get_queue_mut();
                    while bytes < FLUSH_BYTES {
                        let Some(chain) = q.pop_descriptor_chain(mem.clone()) else {
                            break;
                        };
                        taken += 1;
                        match inner.start(&mem, chain, &mut done) {
                            Started::Taken(len) => bytes += len,
                            Started::Declined(chain) => declined.push(chain),
                            Started::Inline(chain, len) => {
                                bytes += len;
                                inline.push(chain);
                            }
                        }
                    }
                }
                if let Some(f) = inflight {
                    f.add(taken);
                }
                inner.submit()?;
                for chain in inline.drain(..) {
                    done.push(process_chain(&self.dev, &mem, chain));
                }
                for chain in declined.drain(..) {
                    match pool {
                        Some(pool) => {
                            let (dev, vring, mem) = (self.dev.clone(), vring.clone(), mem.clone());
                            let inflight = inflight.cloned();
                            pool.submit(Box::new(move || {
                                let done = process_chain(&dev, &mem, chain);
                                let r = complete(&vring, done.head, done.used_len, true);
                                if let Some(f) = inflight {
                                    f.done();
                                }
                                if let Err(e) = r {
                                    tracing::warn!(error = %e, "completing a request failed");
                                }
                            }));
                        }
                        None => {
                            // A synchronous write may wait for a range lock held by this
                            // engine's own writes: let them complete first.
                            inner.wait_all(&mut done)?;
                            done.push(process_chain(&self.dev, &mem, chain));
                        }
                    }
                }
                inner.reap(&mut done);
                self.complete_batch(vring, queue, &mut done)?;
                if bytes < FLUSH_BYTES {
                    break;
                }
            }
            if event_idx && self.poll(vring, queue, &mem, &mut inner)? {
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
        queue: usize,
        mem: &GuestMemoryMmap<()>,
        inner: &mut crate::engine::Inner,
    ) -> io::Result<bool> {
        let window = inner.poll.window();
        // With several requests in flight, completions come through the ring fd: polling
        // meanwhile would take the CPU from whoever completes them (a loop device's
        // worker, say). A single one (queue depth 1) is polled for, with the avail ring.
        if window.is_zero() || inner.busy() > 1 {
            return Ok(false);
        }
        let deadline = std::time::Instant::now() + window;
        let mut done = Vec::new();
        loop {
            if inner.has_completions() {
                inner.reap(&mut done);
                self.complete_batch(vring, queue, &mut done)?;
            }
            let avail = {
                let v = vring.get_ref();
                let q = v.get_queue();
                q.ready()
                    && q.avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                        .is_ok_and(|i| i.0 != q.next_avail())
            };
            if avail {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
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
        let mut done = Vec::new();
        let mut inner = engine.lock();
        inner.poll.woke();
        inner.reap(&mut done);
        self.complete_batch(vring, queue, &mut done)?;
        // The guest usually answers a completion with a new request: poll for it too.
        let mut more = false;
        if self.event_idx.load(Ordering::Relaxed) && !inner.poll.window().is_zero() {
            let mem = self.memory();
            vring.disable_notification().map_err(io::Error::other)?;
            more = self.poll(vring, queue, &mem, &mut inner)?
                || vring.enable_notification().map_err(io::Error::other)?;
        }
        if more {
            drop(inner);
            return self.process_vring_uring(vring, queue, engine);
        }
        inner.poll.sleeping();
        Ok(())
    }

    /// Serves every available chain of `vring`. All but the last chain of a batch go to
    /// the queue's I/O threads (if any); the last runs on this thread, so a lone request
    /// (queue depth 1) never pays a thread handoff.
    fn process_vring(&self, vring: &VringRwLock<Mem>, queue: usize) -> io::Result<()> {
        if let Some(engine) = self.engines.get(queue) {
            return self.process_vring_uring(vring, queue, engine);
        }
        let pool = self.pools.get(queue);
        let event_idx = self.event_idx.load(Ordering::Relaxed);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            let mem = self.memory();
            let mut batch = Vec::new();
            while let Some(chain) = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone())
            {
                batch.push(chain);
            }
            let inflight = self.inflight.get(queue);
            if let Some(f) = inflight {
                f.add(batch.len());
            }
            let last = batch.pop();
            let mut unsignalled = 0u32;
            // A failed completion (broken used ring) must not strand the rest of the batch
            // in the in-flight count: finish the batch, report the first error.
            let mut first_err: Option<io::Error> = None;
            for chain in batch {
                match pool {
                    Some(pool) => {
                        let (dev, vring, mem) = (self.dev.clone(), vring.clone(), mem.clone());
                        let inflight = inflight.cloned();
                        pool.submit(Box::new(move || {
                            let done = process_chain(&dev, &mem, chain);
                            let r = complete(&vring, done.head, done.used_len, true);
                            if let Some(f) = inflight {
                                f.done();
                            }
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "completing a request failed");
                            }
                        }));
                    }
                    None => {
                        let done = process_chain(&self.dev, &mem, chain);
                        unsignalled += 1;
                        let signal = unsignalled >= SIGNAL_BATCH;
                        let r = complete(vring, done.head, done.used_len, signal);
                        if let Some(f) = inflight {
                            f.done();
                        }
                        if let Err(e) = r {
                            first_err.get_or_insert(e);
                        }
                        if signal {
                            unsignalled = 0;
                        }
                    }
                }
            }
            if let Some(chain) = last {
                let done = process_chain(&self.dev, &mem, chain);
                let r = complete(vring, done.head, done.used_len, true);
                if let Some(f) = inflight {
                    f.done();
                }
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }
}

/// Adds the used element and, if `signal`, notifies the guest when it asked for it.
fn complete(vring: &VringRwLock<Mem>, head: u16, len: u32, signal: bool) -> io::Result<()> {
    vring.add_used(head, len).map_err(io::Error::other)?;
    if signal && vring.needs_notification().unwrap_or(true) {
        vring.signal_used_queue()?;
    }
    Ok(())
}

/// Requests of one queue taken from the avail ring and not yet in the used ring.
#[derive(Debug, Default)]
struct InFlight {
    count: Mutex<usize>,
    drained: Condvar,
}

/// How long stopping a queue waits for its requests to complete.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

impl InFlight {
    fn add(&self, n: usize) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += n;
    }

    fn done(&self) {
        self.done_n(1);
    }

    fn done_n(&self, n: usize) {
        let mut c = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.drained.notify_all();
        }
    }

    /// Waits until no request is in flight; false if `timeout` passed first.
    fn wait_drained(&self, timeout: Duration) -> bool {
        let c = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        let (c, _) = self
            .drained
            .wait_timeout_while(c, timeout, |c| *c > 0)
            .unwrap_or_else(PoisonError::into_inner);
        *c == 0
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// I/O threads of one queue. Dropping the pool finishes every queued request and joins
/// the threads, so no request of a session outlives it.
struct Pool {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
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
        let mut handles = Vec::new();
        for i in 0..threads {
            let rx = rx.clone();
            let h = std::thread::Builder::new()
                .name(format!("vhost-blk-q{queue}-io{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
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

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
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
        features(self.dev.volume.is_read_only())
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

    /// GET_VRING_BASE (guest reset, QEMU stop): the ring is already marked not ready, so
    /// nothing new is taken; wait until every request taken has its used element, so none
    /// lands in guest memory after the frontend considers the ring stopped.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(f) = self.inflight.get(queue_index as usize) {
            if !f.wait_drained(DRAIN_TIMEOUT) {
                tracing::warn!(queue = queue_index, "requests still in flight after 30 s");
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
        if usize::from(device_event) > usize::from(self.geometry.num_queues) {
            // An io_uring fd (registered as num_queues + 1 + queue): completions to reap.
            // One thread per queue: the thread index is the queue index, and `vrings`
            // holds this thread's vrings only, so its queue is the first.
            if let Some(vring) = vrings.first() {
                if let Err(e) = self.reap_vring(vring, thread_id) {
                    tracing::warn!(queue = thread_id, error = %e, "completing requests failed");
                }
            }
            return Ok(());
        }
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        // An error here would end the worker thread; the queue is broken (bad ring
        // addresses), so log it and wait for the frontend to reset or reconnect.
        // One thread per queue: the thread index is the queue index.
        if let Err(e) = self.process_vring(vring, thread_id) {
            tracing::warn!(queue = device_event, error = %e, "virtqueue processing stopped");
        }
        Ok(())
    }
}
