//! The exported device: the volume behind it (which can go away and come back), what the
//! guest is shown, and the control the daemon holds.
//!
//! ```text
//!            remove(reason) / I/O fails with ENODEV, ENXIO
//!  Active ──────────────────────────────────────────────► Removed
//!    ▲   new requests: IOERR at once; in flight: IOERR       │
//!    │   within one watchdog tick (100 ms)                   │
//!    └───────────────────────────────────────────────────────┘
//!            resume(path): same logical block size, at least the capacity shown
//! ```
//!
//! The vhost-user session is untouched by either transition: the guest keeps its device,
//! which errors while removed, and can reset or reboot meanwhile.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;
use crate::volume::{Volume, VolumeError, VolumeParams, SECTOR_SIZE};

/// Length of the serial GET_ID answers (VIRTIO_BLK_ID_BYTES).
pub(crate) const SERIAL_LEN: usize =
    virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// Whether the volume behind an export is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    /// Requests go to the volume.
    Active,
    /// The volume went away: every request is answered IOERR until it is resumed.
    Removed,
}

/// Something that happened to an export, for the daemon's event stream and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ExportEvent {
    /// The volume went away; requests fail with IOERR until it is resumed.
    Removed {
        /// Why (the caller's reason, or the I/O error that showed it).
        reason: String,
    },
    /// Requests are served again, by the volume at this path.
    Resumed {
        /// The volume now behind the export.
        volume: PathBuf,
    },
    /// Requests the volume did not finish within the I/O timeout were answered IOERR.
    TimedOut {
        /// How many, in this watchdog pass.
        requests: u64,
    },
    /// A vhost-user frontend connected.
    Connected,
    /// The vhost-user frontend went away.
    Disconnected,
}

/// What the device asks of the session serving the frontend now.
pub(crate) trait LiveSession: Send + Sync {
    /// Waits until no request is in flight, or `deadline`; whether none is.
    fn drain(&self, deadline: Instant) -> bool;
    /// Makes every queue look at its ring again (after a pause).
    fn wake(&self);
    /// Tells the frontend the configuration space changed (the capacity).
    fn config_changed(&self) -> std::io::Result<()>;
}

/// Why [`ExportControl::pause`] failed.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Another pause holds the export.
    #[error("the export is paused already")]
    AlreadyPaused,
    /// Requests still in flight after the timeout (a stalled volume): the export went on.
    #[error("requests still in flight after {0:?}: not paused")]
    InFlight(Duration),
}

/// Why [`ExportControl::grow`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// The volume's size could not be read.
    #[error("cannot read the volume's size")]
    Volume(#[source] VolumeError),
    /// The frontend could not be told (it did not set up the backend channel).
    #[error("cannot tell the frontend of the new capacity")]
    Notify(#[source] std::io::Error),
}

/// Keeps an export paused; it takes requests again when this is dropped.
#[derive(Debug)]
pub struct PauseGuard(Arc<Device>);

impl Drop for PauseGuard {
    fn drop(&mut self) {
        self.0.unpause();
    }
}

/// Receives an export's events; called on the thread where the event happened, so it must
/// not block.
pub type EventSink = Arc<dyn Fn(&ExportEvent) + Send + Sync>;

/// What every request needs from the export.
pub(crate) struct Device {
    volume: ArcSwap<Volume>,
    /// Bumped on every resume: engines re-register the volume's file when it changes.
    generation: AtomicU64,
    removed: AtomicBool,
    /// Where the current volume was opened from.
    path: Mutex<PathBuf>,
    params: VolumeParams,
    /// Capacity shown to the guest, in 512-byte sectors (grows with the volume).
    capacity: AtomicU64,
    /// The capacity's granularity in bytes: the guest's sector or the volume's block,
    /// whichever is larger.
    unit: AtomicU64,
    /// Set while the export is paused (a snapshot): no request is taken.
    paused: AtomicBool,
    /// Held (shared) by a queue thread while it takes a chain, and (exclusive) by a pause
    /// while it sets `paused`: after that, nothing is being taken.
    takers: RwLock<()>,
    /// The session serving the frontend now, if any.
    live: Mutex<Option<Weak<dyn LiveSession>>>,
    pub metrics: Arc<Metrics>,
    pub serial: [u8; SERIAL_LEN],
    /// Write cache enabled (writeback); when false every write is followed by a flush.
    pub wce: AtomicBool,
    sink: Mutex<Option<EventSink>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("volume", &self.volume.load())
            .field("removed", &self.removed)
            .field("capacity", &self.capacity())
            .finish_non_exhaustive()
    }
}

/// Errors of [`ExportControl::resume`].
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The new volume could not be opened or probed.
    #[error("cannot open the volume to resume on")]
    Volume(#[source] VolumeError),
    /// The new volume is smaller than what the guest was shown.
    #[error("volume {path} has {size} bytes, the guest was shown {shown}")]
    TooSmall {
        /// The volume.
        path: PathBuf,
        /// Its usable size.
        size: u64,
        /// Capacity the guest sees, in bytes.
        shown: u64,
    },
    /// The new volume's block size differs from the one the export started with.
    #[error("volume {path} has block size {found}, the export was started with {expected}")]
    BlockSize {
        /// The volume.
        path: PathBuf,
        /// Its block size.
        found: u64,
        /// The block size the export started with.
        expected: u64,
    },
}

impl Device {
    pub(crate) fn new(
        volume: Volume,
        path: PathBuf,
        params: VolumeParams,
        capacity: u64,
        serial: [u8; SERIAL_LEN],
    ) -> Device {
        Device {
            volume: ArcSwap::from_pointee(volume),
            generation: AtomicU64::new(0),
            removed: AtomicBool::new(false),
            path: Mutex::new(path),
            params,
            capacity: AtomicU64::new(capacity),
            unit: AtomicU64::new(SECTOR_SIZE),
            paused: AtomicBool::new(false),
            takers: RwLock::new(()),
            live: Mutex::new(None),
            metrics: Arc::new(Metrics::default()),
            serial,
            wce: AtomicBool::new(true),
            sink: Mutex::new(None),
        }
    }

    /// Capacity shown to the guest, in 512-byte sectors.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    /// Sets the capacity's granularity (at export creation).
    pub(crate) fn set_unit(&self, unit: u64) {
        self.unit.store(unit.max(SECTOR_SIZE), Ordering::Release);
    }

    /// The session serving the frontend from now on.
    pub(crate) fn set_live(&self, session: Weak<dyn LiveSession>) {
        *self.live.lock().unwrap_or_else(PoisonError::into_inner) = Some(session);
    }

    fn live(&self) -> Option<Arc<dyn LiveSession>> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// Whether a chain may be taken now: while the guard is held a pause waits. `None`
    /// while paused.
    pub(crate) fn take_guard(&self) -> Option<RwLockReadGuard<'_, ()>> {
        let g = self.takers.read().unwrap_or_else(PoisonError::into_inner);
        (!self.paused.load(Ordering::Acquire)).then_some(g)
    }

    /// Stops taking requests and waits up to `timeout` for those in flight. On timeout
    /// the export takes requests again and the pause fails.
    fn pause(&self, timeout: Duration) -> Result<(), PauseError> {
        let deadline = Instant::now() + timeout;
        {
            let _w = self.takers.write().unwrap_or_else(PoisonError::into_inner);
            if self.paused.swap(true, Ordering::AcqRel) {
                return Err(PauseError::AlreadyPaused);
            }
        }
        let drained = self.live().is_none_or(|s| s.drain(deadline));
        if !drained {
            self.unpause();
            return Err(PauseError::InFlight(timeout));
        }
        Ok(())
    }

    fn unpause(&self) {
        self.paused.store(false, Ordering::Release);
        if let Some(s) = self.live() {
            s.wake();
        }
    }

    /// Reads the volume's size again; a larger one becomes the capacity the guest is
    /// shown, and the frontend is told (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG). Returns
    /// the capacity in bytes.
    fn grow(&self) -> Result<u64, GrowError> {
        let size = self.volume().refresh_size().map_err(GrowError::Volume)?;
        let unit = self.unit.load(Ordering::Acquire);
        let sectors = (size - size % unit) / SECTOR_SIZE;
        let old = self.capacity.fetch_max(sectors, Ordering::AcqRel);
        if sectors <= old {
            return Ok(old * SECTOR_SIZE);
        }
        tracing::info!(
            old_sectors = old,
            new_sectors = sectors,
            "volume grew: capacity raised"
        );
        if let Some(s) = self.live() {
            s.config_changed().map_err(GrowError::Notify)?;
        }
        Ok(sectors * SECTOR_SIZE)
    }

    /// The volume requests go to now. Requests keep the `Arc` until they complete, so a
    /// volume swapped out by a resume stays open until its last request is done.
    pub(crate) fn volume(&self) -> Arc<Volume> {
        self.volume.load_full()
    }

    /// Changes on every resume.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub(crate) fn is_read_only(&self) -> bool {
        self.params.read_only
    }

    pub(crate) fn state(&self) -> VolumeState {
        if self.is_removed() {
            VolumeState::Removed
        } else {
            VolumeState::Active
        }
    }

    pub(crate) fn emit(&self, ev: &ExportEvent) {
        let sink = self
            .sink
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(sink) = sink {
            sink(ev);
        }
    }

    /// Marks the volume removed (idempotent): requests fail with IOERR from now on, and
    /// the sessions' watchdogs answer those in flight.
    pub(crate) fn remove(&self, reason: &str) {
        if !self.removed.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                volume = %self.path().display(),
                reason,
                "volume removed: requests fail with IOERR until it is resumed"
            );
            self.emit(&ExportEvent::Removed {
                reason: reason.to_owned(),
            });
        }
    }

    /// Whether a failed I/O on `vol` means the device itself is gone (then the export is
    /// removed). Failures of a volume already swapped out by a resume are not its
    /// replacement's.
    pub(crate) fn note_io_error(&self, vol: &Volume, e: &VolumeError) {
        if !std::ptr::eq(vol, &**self.volume.load()) {
            return;
        }
        if let Some(errno @ (libc::ENODEV | libc::ENXIO)) = e.raw_os_error() {
            let what = if errno == libc::ENODEV {
                "ENODEV"
            } else {
                "ENXIO"
            };
            self.remove(&format!("I/O failed with {what}: {e}"));
        }
    }

    /// Serves requests from the volume at `path` from now on.
    pub(crate) fn resume(&self, path: &Path) -> Result<(), ResumeError> {
        let vol = Volume::open(path, &self.params).map_err(ResumeError::Volume)?;
        let old = self.volume.load();
        if vol.block_size() != old.block_size() {
            return Err(ResumeError::BlockSize {
                path: path.to_owned(),
                found: vol.block_size(),
                expected: old.block_size(),
            });
        }
        let shown = self.capacity() * SECTOR_SIZE;
        if vol.size() < shown {
            return Err(ResumeError::TooSmall {
                path: path.to_owned(),
                size: vol.size(),
                shown,
            });
        }
        self.volume.store(Arc::new(vol));
        *self.path.lock().unwrap_or_else(PoisonError::into_inner) = path.to_owned();
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.removed.store(false, Ordering::Release);
        tracing::info!(volume = %path.display(), "volume resumed");
        self.emit(&ExportEvent::Resumed {
            volume: path.to_owned(),
        });
        Ok(())
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.path
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_sink(&self, sink: EventSink) {
        *self.sink.lock().unwrap_or_else(PoisonError::into_inner) = Some(sink);
    }
}

/// Controls a running export from another thread: the daemon's hotplug monitor removes
/// and resumes its volume, and listens to its events.
#[derive(Clone)]
pub struct ExportControl(pub(crate) Arc<Device>);

impl std::fmt::Debug for ExportControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportControl")
            .field("volume", &self.0.path())
            .field("state", &self.0.state())
            .finish()
    }
}

impl ExportControl {
    /// Whether the volume is there.
    pub fn state(&self) -> VolumeState {
        self.0.state()
    }

    /// The volume went away: requests in flight are answered IOERR within a watchdog tick,
    /// new ones at once; the vhost-user session stays up. Idempotent.
    pub fn remove(&self, reason: &str) {
        self.0.remove(reason);
    }

    /// Serves requests from the volume at `volume` (the same device, back, possibly under
    /// another name). It must have the block size the export started with and at least
    /// the capacity the guest was shown. Also valid while active (a path change).
    pub fn resume(&self, volume: &Path) -> Result<(), ResumeError> {
        self.0.resume(volume)
    }

    /// Pauses the export for a crash-consistent snapshot: no new request is taken (the
    /// guest's stay in its rings), and every request in flight has completed when this
    /// returns (within `timeout`, else the export goes on and this fails). The guest sees
    /// a delay, no error. Requests resume when the guard is dropped.
    pub fn pause(&self, timeout: Duration) -> Result<PauseGuard, PauseError> {
        self.0.pause(timeout)?;
        Ok(PauseGuard(self.0.clone()))
    }

    /// The volume grew: its new size becomes the capacity the guest sees, and a
    /// connected frontend is told (QEMU re-reads the configuration and the guest's
    /// driver resizes the disk). Returns the capacity in bytes.
    pub fn grow(&self) -> Result<u64, GrowError> {
        self.0.grow()
    }

    /// Sends the export's events to `sink` (replacing an earlier one).
    pub fn set_event_sink(&self, sink: EventSink) {
        self.0.set_sink(sink);
    }

    /// The path of the volume requests go to (or went to, while removed).
    pub fn volume_path(&self) -> PathBuf {
        self.0.path()
    }
}
