//! An export: one volume served on one vhost-user socket, across any number of connections.
//!
//! Lifecycle: `Export::new` opens the volume and binds the socket (Created); `serve` accepts
//! one frontend at a time (Serving); when a frontend disconnects its session, vring workers
//! and guest memory map are dropped and joined before the next one is accepted, so a
//! reconnecting QEMU never meets state of the previous session; `StopHandle::stop` ends the
//! current connection and returns from `serve` (Stopped).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::{Geometry, Session, Tuning, STOP_GRACE};
use crate::device::{Device, SERIAL_LEN};
use crate::device::{ExportControl, ExportEvent, ResumeError};
use crate::metrics::MetricsSnapshot;
use crate::volume::{Volume, VolumeError, VolumeParams, SECTOR_SIZE};

/// Errors of setting up and running an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A configuration value is out of range.
    #[error("invalid export configuration: {0}")]
    Config(String),
    /// The volume could not be opened or probed.
    #[error("cannot open the volume")]
    Volume(#[source] VolumeError),
    /// The volume is smaller than one guest block.
    #[error("volume {0} is smaller than one guest block")]
    Empty(PathBuf),
    /// The vhost-user socket could not be bound.
    #[error("cannot listen on vhost-user socket {path}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The stop eventfd could not be created.
    #[error("cannot create the stop event")]
    StopEvent(#[source] std::io::Error),
    /// Waiting for a connection failed.
    #[error("waiting for a vhost-user connection failed")]
    Poll(#[source] nix::Error),
    /// The I/O threads of a session could not be started.
    #[error("cannot start I/O threads")]
    Threads(#[source] std::io::Error),
    /// A per-connection vhost-user daemon could not be created.
    #[error("cannot set up a vhost-user session: {0}")]
    Session(String),
    /// The volume could not be resumed.
    #[error(transparent)]
    Resume(#[from] ResumeError),
    /// The socket's owner or mode could not be set.
    #[error("cannot set the owner or mode of vhost-user socket {path}")]
    SocketAccess {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: nix::Error,
    },
    /// The socket's path was removed or now names another file: no frontend can
    /// connect (or reconnect) any more.
    #[error("vhost-user socket {0} was removed or replaced")]
    SocketGone(PathBuf),
}

/// What to export and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Block device or regular file to serve.
    pub volume: PathBuf,
    /// vhost-user unix socket to listen on (replaced if it exists).
    pub socket: PathBuf,
    /// Logical block size shown to the guest: 512 or 4096.
    pub logical_block_size: u32,
    /// Refuse writes and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Number of virtqueues (1..=64), each served by its own thread.
    pub num_queues: u16,
    /// Largest virtqueue size a frontend may pick (power of two, 1..=32768); it picks
    /// any size up to this one. Also what seg_max is derived from (this minus 2, the
    /// header and status), so the guest is told the same whatever size is picked: a
    /// chain longer than the queue reaches the device through an indirect table.
    pub queue_size: u16,
    /// Serial returned by GET_ID (at most 20 bytes).
    pub serial: String,
    /// Open the volume with O_DIRECT where the filesystem allows it.
    pub direct_io: bool,
    /// Most iovecs passed to one preadv/pwritev; larger requests are split (1..=1024).
    pub max_iovecs_per_io: usize,
    /// Treat the volume as having at least this block size (0: the volume's own).
    pub min_device_block_size: u32,
    /// I/O threads per queue that run requests in parallel when the guest queues several:
    /// with io_uring, only the requests it does not take (read-modify-write, flush,
    /// discard, write-zeroes); without, all of them (0: each queue's thread runs them).
    pub io_threads_per_queue: usize,
    /// Serve aligned reads and writes of each queue through io_uring, where the kernel
    /// allows it (the I/O threads then serve the rest: read-modify-write, flush, discard).
    pub io_uring: bool,
    /// Requests the volume has not finished after this many milliseconds are answered
    /// IOERR (the guest's virtio-blk driver has no timeout of its own); 0: never.
    pub io_timeout_ms: u64,
    /// Longest busy-poll, in microseconds, of a queue thread waiting for the guest's next
    /// request or a completion (adaptive, only with at most one request in flight; waits
    /// longer than half of it are slept through); 0: never poll (less CPU, more latency at
    /// queue depth 1).
    pub poll_us: u32,
    /// Owner (uid) of the socket file; None: the process's. QEMU connects (and, after a
    /// restart of this process, reconnects) as its own user: Incus and LXD run it
    /// unprivileged.
    pub socket_owner: Option<u32>,
    /// Group (gid) of the socket file; None: the process's.
    pub socket_group: Option<u32>,
    /// Permission bits of the socket file; None: as created (the umask's).
    pub socket_mode: Option<u32>,
}

/// Default largest virtqueue size: what qemu-storage-daemon accepts, and what Windows
/// guests need for requests of 515 segments without indirect descriptors.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// Default I/O timeout: the Linux block layer's default request timeout.
pub const DEFAULT_IO_TIMEOUT_MS: u64 = 30_000;

/// Default I/O threads per queue.
pub const DEFAULT_IO_THREADS: usize = 32;

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            volume: PathBuf::new(),
            socket: PathBuf::new(),
            logical_block_size: 512,
            read_only: false,
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            serial: String::new(),
            direct_io: true,
            max_iovecs_per_io: crate::sys::IOV_MAX,
            min_device_block_size: 0,
            io_threads_per_queue: DEFAULT_IO_THREADS,
            io_uring: true,
            io_timeout_ms: DEFAULT_IO_TIMEOUT_MS,
            poll_us: crate::engine::DEFAULT_POLL_US,
            socket_owner: None,
            socket_group: None,
            socket_mode: None,
        }
    }
}

impl ExportConfig {
    /// Checks every value is in range (what [`Export::new`] checks first).
    pub fn validate(&self) -> Result<(), ExportError> {
        let bad = |m: String| Err(ExportError::Config(m));
        if !matches!(self.logical_block_size, 512 | 4096) {
            return bad(format!(
                "logical block size {} is not 512 or 4096",
                self.logical_block_size
            ));
        }
        if !(1..=64).contains(&self.num_queues) {
            return bad(format!("{} queues is not within 1..=64", self.num_queues));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > 32768 {
            return bad(format!(
                "queue size {} is not a power of two up to 32768",
                self.queue_size
            ));
        }
        if self.serial.len() > SERIAL_LEN {
            return bad(format!("serial {:?} is longer than 20 bytes", self.serial));
        }
        if !(1..=crate::sys::IOV_MAX).contains(&self.max_iovecs_per_io) {
            return bad(format!(
                "max iovecs per I/O {} is not within 1..=1024",
                self.max_iovecs_per_io
            ));
        }
        if self.min_device_block_size != 0
            && (!self.min_device_block_size.is_power_of_two()
                || !(512..=65536).contains(&self.min_device_block_size))
        {
            return bad(format!(
                "device block size {} is not a power of two in 512..=65536",
                self.min_device_block_size
            ));
        }
        if self.poll_us > 1000 {
            return bad(format!(
                "busy-poll of {} µs is more than 1000",
                self.poll_us
            ));
        }
        if self.socket_mode.is_some_and(|m| m > 0o777) {
            return bad(format!(
                "socket mode {:o} is not within 0..=0777",
                self.socket_mode.unwrap_or_default()
            ));
        }
        if self.io_threads_per_queue > 256 {
            return bad(format!(
                "{} I/O threads per queue is more than 256",
                self.io_threads_per_queue
            ));
        }
        Ok(())
    }
}

/// The connection being served: how to end it, and its session (quiesced first).
struct Conn {
    shutdown: ShutdownHandle,
    session: Arc<Session>,
}

struct StopInner {
    stopped: AtomicBool,
    event: EventFd,
    conn: Mutex<Option<Conn>>,
}

impl std::fmt::Debug for StopInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopInner")
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// Stops a serving export from any thread (signal handler thread, test, daemon).
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<StopInner>);

impl StopHandle {
    /// A new, not yet triggered handle.
    pub fn new() -> Result<StopHandle, ExportError> {
        Ok(StopHandle(Arc::new(StopInner {
            stopped: AtomicBool::new(false),
            event: EventFd::new(EFD_NONBLOCK).map_err(ExportError::StopEvent)?,
            conn: Mutex::new(None),
        })))
    }

    /// Ends the current connection, if any, and makes `serve` return. In order: no new
    /// request is taken, those in flight get a bounded wait ([`STOP_GRACE`] in all), the
    /// rest are answered IOERR (a guest that still has the device sees errors, not a
    /// hang), then the connection is closed; `serve` removes the socket.
    pub fn stop(&self) {
        self.0.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.0.event.write(1) {
            tracing::warn!(error = %e, "cannot signal the stop event");
        }
        let conn = self.0.conn.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = conn.as_ref() {
            c.session.quiesce(STOP_GRACE);
            c.shutdown.shutdown();
        }
    }

    /// Whether `stop` was called.
    pub fn is_stopped(&self) -> bool {
        self.0.stopped.load(Ordering::SeqCst)
    }

    fn set_conn(&self, c: Option<Conn>) {
        let mut slot = self.0.conn.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = c;
        // A stop that raced with the accept still ends this connection.
        if self.is_stopped() {
            if let Some(c) = slot.as_ref() {
                c.session.quiesce(STOP_GRACE);
                c.shutdown.shutdown();
            }
        }
    }
}

/// A volume exported on a vhost-user socket.
pub struct Export {
    cfg: ExportConfig,
    dev: Arc<Device>,
    geometry: Geometry,
    listener: Mutex<Listener>,
    /// Device and inode of the socket file as bound: the path still names it while
    /// frontends can connect.
    socket_id: Option<(u64, u64)>,
    stop: StopHandle,
}

/// How often an idle export checks that its socket is still there.
const SOCKET_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// Makes `listener` forget its path, so dropping it does not remove a file another
/// process may have put there since.
fn forget_path(listener: &mut Listener) {
    use std::os::fd::FromRawFd;
    let fd = listener.as_raw_fd();
    // SAFETY: `fd` is the open listening socket `listener` owns; ownership moves to the
    // new `Listener` (built without a path), and the old one is forgotten below, so the
    // fd is closed exactly once, by the new one.
    let bare = unsafe { Listener::from_raw_fd(fd) };
    let old = std::mem::replace(listener, bare);
    // Leaks the old path's allocation only.
    std::mem::forget(old);
}

/// Gives the freshly bound socket the configured owner, group and mode.
fn set_socket_access(cfg: &ExportConfig) -> Result<(), nix::Error> {
    use nix::unistd::{chown, Gid, Uid};
    if cfg.socket_owner.is_some() || cfg.socket_group.is_some() {
        chown(
            &cfg.socket,
            cfg.socket_owner.map(Uid::from_raw),
            cfg.socket_group.map(Gid::from_raw),
        )?;
    }
    if let Some(mode) = cfg.socket_mode {
        nix::sys::stat::fchmodat(
            None,
            &cfg.socket,
            nix::sys::stat::Mode::from_bits_truncate(mode),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )?;
    }
    Ok(())
}

/// Device and inode of the file at `path`.
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("cfg", &self.cfg)
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

impl Export {
    /// Opens the volume and binds the socket; connections are accepted by [`Export::serve`].
    pub fn new(cfg: ExportConfig) -> Result<Export, ExportError> {
        Export::with_stop_handle(cfg, StopHandle::new()?)
    }

    /// Like [`Export::new`], stopped through an existing handle.
    pub fn with_stop_handle(cfg: ExportConfig, stop: StopHandle) -> Result<Export, ExportError> {
        cfg.validate()?;
        let mut params = VolumeParams {
            read_only: cfg.read_only,
            direct: cfg.direct_io,
            min_block_size: cfg.min_device_block_size,
            max_iovecs: cfg.max_iovecs_per_io,
            op_timeout: (cfg.io_timeout_ms > 0).then(|| Duration::from_millis(cfg.io_timeout_ms)),
        };
        let volume = Volume::open(&cfg.volume, &params).map_err(ExportError::Volume)?;
        if volume.is_read_only() && !params.read_only {
            tracing::info!(volume = %cfg.volume.display(), "an RBD snapshot is exported read-only");
            params.read_only = true;
        }
        let unit = u64::from(cfg.logical_block_size).max(volume.block_size());
        let capacity = (volume.size() - volume.size() % unit) / SECTOR_SIZE;
        if capacity == 0 {
            return Err(ExportError::Empty(cfg.volume.clone()));
        }
        let mut serial = [0u8; SERIAL_LEN];
        serial[..cfg.serial.len()].copy_from_slice(cfg.serial.as_bytes());
        tracing::info!(
            volume = %cfg.volume.display(),
            socket = %cfg.socket.display(),
            capacity_sectors = capacity,
            device_block_size = volume.block_size(),
            guest_block_size = cfg.logical_block_size,
            direct_io = volume.is_direct(),
            read_only = params.read_only,
            "export created"
        );
        let dev = Arc::new(Device::new(
            volume,
            cfg.volume.clone(),
            params,
            capacity,
            serial,
        ));
        dev.set_unit(unit);
        let listener = Listener::new(&cfg.socket, true).map_err(|source| ExportError::Listen {
            path: cfg.socket.clone(),
            source,
        })?;
        set_socket_access(&cfg).map_err(|source| ExportError::SocketAccess {
            path: cfg.socket.clone(),
            source,
        })?;
        let socket_id = file_id(&cfg.socket);
        Ok(Export {
            socket_id,
            geometry: Geometry {
                logical_block_size: cfg.logical_block_size,
                num_queues: cfg.num_queues,
                queue_size: cfg.queue_size,
            },
            cfg,
            dev,
            listener: Mutex::new(listener),
            stop,
        })
    }

    /// A handle that stops [`Export::serve`] from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Capacity shown to the guest, in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.dev.capacity()
    }

    /// Removes and resumes the volume, and delivers the export's events.
    pub fn control(&self) -> ExportControl {
        ExportControl(self.dev.clone())
    }

    /// The export's counters so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.dev.metrics.snapshot()
    }

    /// The configuration this export runs with.
    pub fn config(&self) -> &ExportConfig {
        &self.cfg
    }

    /// Serves frontends one after the other until stopped. A frontend that disconnects
    /// (guest shutdown, QEMU restart or reconnect) is followed by the next one.
    pub fn serve(&self) -> Result<(), ExportError> {
        let mut listener = self.listener.lock().unwrap_or_else(PoisonError::into_inner);
        while !self.stop.is_stopped() {
            let lfd = listener.as_raw_fd();
            let efd = self.stop.0.event.as_raw_fd();
            let readable = {
                // SAFETY: the listener (its guard held) and the stop event (owned by
                // `self.stop`) stay open across this poll, the only use of the borrows;
                // neither type offers `AsFd`.
                let (lb, eb) =
                    unsafe { (BorrowedFd::borrow_raw(lfd), BorrowedFd::borrow_raw(efd)) };
                let mut fds = [
                    PollFd::new(lb, PollFlags::POLLIN),
                    PollFd::new(eb, PollFlags::POLLIN),
                ];
                let tick = PollTimeout::try_from(SOCKET_CHECK).unwrap_or(PollTimeout::MAX);
                match poll(&mut fds, tick) {
                    Ok(_) => fds[0]
                        .revents()
                        .is_some_and(|r| r.contains(PollFlags::POLLIN)),
                    Err(nix::Error::EINTR) => false,
                    Err(e) => return Err(ExportError::Poll(e)),
                }
            };
            if self.stop.is_stopped() {
                break;
            }
            if readable {
                self.serve_one(&mut listener)?;
            }
            if self.socket_id.is_some() && file_id(&self.cfg.socket) != self.socket_id {
                tracing::error!(socket = %self.cfg.socket.display(),
                    "the export's socket was removed or replaced: stopping");
                forget_path(&mut listener);
                return Err(ExportError::SocketGone(self.cfg.socket.clone()));
            }
        }
        tracing::info!(socket = %self.cfg.socket.display(), "export stopped");
        Ok(())
    }

    /// Accepts one frontend and serves it until it disconnects or the export is stopped.
    fn serve_one(&self, listener: &mut Listener) -> Result<(), ExportError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let timeout = (self.cfg.io_timeout_ms > 0)
            .then(|| std::time::Duration::from_millis(self.cfg.io_timeout_ms));
        let session = Session::new(
            self.dev.clone(),
            self.geometry,
            mem.clone(),
            Tuning {
                io_threads: self.cfg.io_threads_per_queue,
                io_uring: self.cfg.io_uring,
                io_timeout: timeout,
                max_poll: std::time::Duration::from_micros(u64::from(self.cfg.poll_us)),
            },
        )
        .map_err(ExportError::Threads)?;
        let session = Arc::new(session);
        let live: Arc<dyn crate::device::LiveSession> = session.clone();
        self.dev.set_live(Arc::downgrade(&live));
        let fds = session.extra_fds();
        let mut daemon = VhostUserDaemon::new("vhost-blk".to_string(), session.clone(), mem)
            .map_err(|e| ExportError::Session(e.to_string()))?;
        // Each queue's io_uring fd and resubmission event are watched by that queue's
        // worker thread; event ids above num_queues are the backend's own.
        let handlers = daemon.get_epoll_handlers();
        for (q, fd, id) in fds {
            let h = handlers
                .get(q)
                .ok_or_else(|| ExportError::Session(format!("no worker thread for queue {q}")))?;
            h.register_listener(fd, EventSet::IN, id)
                .map_err(|e| ExportError::Session(format!("cannot watch an event fd: {e}")))?;
        }
        if let Err(e) = daemon.start(listener) {
            tracing::warn!(error = %e, "accepting a vhost-user connection failed");
            // Do not spin if accepting keeps failing (for example out of file descriptors).
            std::thread::sleep(std::time::Duration::from_millis(100));
            return Ok(());
        }
        tracing::info!("vhost-user frontend connected");
        self.dev.emit(&ExportEvent::Connected);
        if let Some(shutdown) = daemon.shutdown_handle() {
            self.stop.set_conn(Some(Conn {
                shutdown,
                session: session.clone(),
            }));
        }
        drop(session);
        let res = daemon.wait();
        self.stop.set_conn(None);
        self.dev.emit(&ExportEvent::Disconnected);
        match res {
            Ok(()) => tracing::info!("vhost-user frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "vhost-user connection ended with an error"),
        }
        // Dropping the daemon stops and joins this session's vring workers.
        drop(daemon);
        Ok(())
    }
}

/// Runs an export of `cfg` until `stop` is triggered; returns its final counters.
pub fn run(cfg: ExportConfig, stop: StopHandle) -> Result<MetricsSnapshot, ExportError> {
    let export = Export::with_stop_handle(cfg, stop)?;
    export.serve()?;
    Ok(export.metrics())
}
