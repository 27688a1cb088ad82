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
use std::sync::{Arc, Mutex, PoisonError};

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
    /// Capacity shown to the guest, in 512-byte sectors.
    pub capacity: u64,
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
            .field("capacity", &self.capacity)
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
            capacity,
            metrics: Arc::new(Metrics::default()),
            serial,
            wce: AtomicBool::new(true),
            sink: Mutex::new(None),
        }
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
        let shown = self.capacity * SECTOR_SIZE;
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

    /// Sends the export's events to `sink` (replacing an earlier one).
    pub fn set_event_sink(&self, sink: EventSink) {
        self.0.set_sink(sink);
    }

    /// The path of the volume requests go to (or went to, while removed).
    pub fn volume_path(&self) -> PathBuf {
        self.0.path()
    }
}
