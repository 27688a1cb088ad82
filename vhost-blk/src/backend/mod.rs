//! The vhost-user backend of one connection (session): features, config space, queues.
//!
//! A [`Session`] lives exactly as long as one frontend connection; it shares the
//! [`Device`] (volume, metrics, locks) with every other session of the export, and owns
//! its guest memory map and vring workers, which are joined before the next connection is
//! accepted.
//!
//! - `features`: the virtio and vhost-user feature bits offered;
//! - `config_space`: the `virtio_blk_config` the guest reads;
//! - `vring`: a queue thread's loop (io_uring batches, I/O threads, polling);
//! - `workers`: the I/O threads of a queue;
//! - `watchdog`: answers requests the volume does not finish in time.

mod config_space;
mod features;
mod vring;
mod watchdog;
mod workers;

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub(crate) use config_space::{config_space, Geometry};
pub(crate) use features::{features, protocol_features};

use crate::device::Device;
use crate::engine::Engine;
use crate::inflight::Region;
use crate::memory::Mem;
use crate::queue::{Expire, Inflight, QueueState};
use watchdog::Watchdog;
use workers::Pool;

/// How long stopping a ring (GET_VRING_BASE) waits for its requests before leaving them
/// in the in-flight buffer or answering them IOERR: QEMU waits for the answer with its
/// main lock held, so this is kept short.
pub(crate) const STOP_GRACE: Duration = Duration::from_millis(250);

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
    inflight: Arc<Inflight>,
    /// Set when the export stops: no new request is taken.
    quiesced: AtomicBool,
    /// The channel to the frontend (VHOST_USER_PROTOCOL_F_BACKEND_REQ), once it set one:
    /// configuration changes are announced there.
    backend_req: BackendChannel,
    watchdog: Option<Watchdog>,
}

/// The frontend's channel for the backend's own messages (a configuration change).
#[derive(Default)]
struct BackendChannel(std::sync::Mutex<Option<vhost::vhost_user::Backend>>);

impl std::fmt::Debug for BackendChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|g| g.is_some()).unwrap_or(false);
        f.debug_struct("BackendChannel").field("set", &set).finish()
    }
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
        let inflight = Arc::new(Inflight::empty());
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
            backend_req: BackendChannel::default(),
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
}

impl crate::device::LiveSession for Session {
    fn drain(&self, deadline: Instant) -> bool {
        self.queues
            .iter()
            .all(|q| q.wait_drained(deadline.saturating_duration_since(Instant::now())))
    }

    fn wake(&self) {
        for ev in &self.resubmit {
            if let Err(e) = ev.write(1) {
                tracing::warn!(error = %e, "waking a queue after a pause");
            }
        }
    }

    fn config_changed(&self) -> io::Result<()> {
        use vhost::vhost_user::VhostUserFrontendReqHandler;
        let backend = self
            .backend_req
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTCONN))?;
        backend.handle_config_change().map(|_| ())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(w) = self.watchdog.take() {
            w.stop();
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
        config_space::read(&config_space(&self.dev, &self.geometry), offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache mode is writable.
        if let Some(wce) = config_space::written_writeback(offset, buf) {
            self.dev.wce.store(wce, Ordering::Relaxed);
        }
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: vhost::vhost_user::Backend) {
        *self
            .backend_req
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(backend);
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
