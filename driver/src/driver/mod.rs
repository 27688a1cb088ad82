//! The driver's core: pools, volumes, cached images and attachments, with their
//! durable records, per-object operation locks and events. It speaks in its own types
//! ([`crate::model`]); the gRPC service converts. Every method here is blocking.
//!
//! ```text
//!   request ──► validate (names, sizes, paths) ──► begin(OpKey) ── busy? ──► Busy
//!                                                       │
//!        record CREATING (fsync'd) ──► pool backend: place, create, fill, commit
//!                                                       │
//!                                   record READY (fsync'd) ──► Event ──► Watch
//! ```
//!
//! A crash anywhere before the READY record leaves a CREATING record (or none); at
//! startup [`Driver::open`] removes such volumes with their temporary files, so a volume
//! is either absent or complete.
//!
//! One file per topic: `pools.rs`, `volumes.rs`, `attach.rs` (exports and their
//! [`Live`] state), `hotplug.rs` (the driver's side of device removal and return),
//! `images.rs`, `recovery.rs` (startup), `progress.rs`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::config::{AttachmentConfig, Config, ExportDefaults, PoolKind, DEFAULT_POOL};
use crate::error::{Error, Result};
use crate::export::{ExportHandle, Exporter};
use crate::hotplug::Taints;
use crate::identity::Sysfs;
use crate::model::{Attachment, Backend, Event, EventKind, ImageId, PoolOrigin, Volume, VolumeId};
use crate::pool::PoolBackend;
use crate::state::{AttachRecord, ImageRecord, Store, VolState, VolumeRecord};

mod attach;
mod hotplug;
mod images;
mod pools;
mod progress;
mod publish;
mod recovery;
mod snapshots;
mod volumes;

use progress::EventProgress;

/// How a [`Driver`] is set up.
#[derive(Debug)]
pub struct DriverParams {
    /// The state directory.
    pub state_dir: PathBuf,
    /// Directory of the exports' vhost-user sockets.
    pub export_dir: PathBuf,
    /// The configuration (pools, export defaults).
    pub config: Config,
    /// What starts exports.
    pub exporter: Box<dyn Exporter>,
    /// Test hook: where an operation stops and waits to be killed.
    #[cfg(feature = "test-hooks")]
    pub pause: Option<crate::test_hooks::Pause>,
}

/// A pool: its storage and where it was defined.
#[derive(Debug, Clone)]
struct PoolEntry {
    backend: Arc<dyn PoolBackend>,
    origin: PoolOrigin,
}

/// What an operation holds while it runs; a second operation on the same object is
/// refused ([`Error::Busy`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum OpKey {
    Pool(String),
    Volume(VolumeId),
    Image(ImageId),
}

/// What runs for an attached volume: one state, not several flags. A failed export is
/// recorded (it must survive a restart) and has no entry here.
#[derive(Debug, Clone)]
enum Live {
    /// The export serves the volume.
    Serving {
        export: Arc<dyn ExportHandle>,
        id: u64,
    },
    /// The volume's device went away; the export answers every request with an error.
    Removed {
        export: Arc<dyn ExportHandle>,
        id: u64,
        reason: String,
        /// The device it was (what Watch was told).
        device: PathBuf,
    },
    /// The device was absent when the attachment was restored or made: the export
    /// starts when it appears.
    WaitingForDevice,
}

impl Live {
    fn export(&self) -> Option<(&Arc<dyn ExportHandle>, u64)> {
        match self {
            Live::Serving { export, id } | Live::Removed { export, id, .. } => Some((export, *id)),
            Live::WaitingForDevice => None,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    pools: BTreeMap<String, PoolEntry>,
    volumes: BTreeMap<VolumeId, VolumeRecord>,
    images: BTreeMap<ImageId, ImageRecord>,
    busy: HashSet<OpKey>,
    /// Attached volumes: what runs for each.
    live: HashMap<VolumeId, Live>,
    /// Space held for images being imported: counted as provisioned from the quota
    /// check until the image is recorded.
    reserved: HashMap<ImageId, u64>,
    /// The id the next export gets (a failure report names the export it is about).
    next_export_id: u64,
}

/// The storage driver.
#[derive(Debug)]
pub struct Driver {
    /// Itself, for the callbacks its exports call.
    me: Weak<Driver>,
    state_dir: PathBuf,
    export_dir: PathBuf,
    export_defaults: ExportDefaults,
    store: Store,
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    exporter: Box<dyn Exporter>,
    #[cfg(feature = "test-hooks")]
    pause: Option<crate::test_hooks::Pause>,
    /// Serializes space and device allocation between creates of different volumes.
    alloc: Mutex<()>,
    /// Where block devices' identities are read.
    sysfs: Sysfs,
    /// Devices that count as gone (hotplug).
    taints: Taints,
    /// The attachments the configuration lists.
    config_attachments: Vec<AttachmentConfig>,
    /// This host's name in shared pools (who attached a volume).
    node: String,
}

/// Space held in a pool's quota for an import under way; released on drop.
struct Reservation<'a> {
    driver: &'a Driver,
    image: ImageId,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.driver.lock().reserved.remove(&self.image);
    }
}

/// Removes its key from the busy set on drop.
struct OpGuard<'a> {
    driver: &'a Driver,
    key: OpKey,
}

impl Drop for OpGuard<'_> {
    fn drop(&mut self) {
        self.driver.lock().busy.remove(&self.key);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    /// Opens the state, recovers from a crash (removes half-created volumes and
    /// temporary files, finishes deletes, re-exports attached volumes).
    pub fn open(p: DriverParams) -> Result<Arc<Driver>> {
        fs::create_dir_all(&p.state_dir).map_err(Error::io("creating", &p.state_dir))?;
        fs::create_dir_all(&p.export_dir).map_err(Error::io("creating", &p.export_dir))?;
        let store = Store::open(&p.state_dir)?;
        let n = store.remove_temp_files()?;
        if n > 0 {
            tracing::warn!(count = n, "removed half-written records");
        }
        let (events, _) = broadcast::channel(1024);
        let d = Arc::new_cyclic(|me| Driver {
            me: me.clone(),
            state_dir: p.state_dir.clone(),
            export_dir: p.export_dir,
            export_defaults: p.config.exports.clone(),
            store,
            inner: Mutex::new(Inner::default()),
            events,
            exporter: p.exporter,
            #[cfg(feature = "test-hooks")]
            pause: p.pause,
            alloc: Mutex::new(()),
            sysfs: Sysfs::default(),
            taints: Taints::default(),
            config_attachments: p.config.attachments.clone(),
            node: p.config.node_name(),
        });
        let mut pools = p.config.pools.clone();
        if pools.is_empty() {
            pools.push(crate::config::PoolConfig {
                name: DEFAULT_POOL.into(),
                kind: PoolKind::Dir {
                    path: p.state_dir.join("pools").join(DEFAULT_POOL),
                    capacity_bytes: 0,
                },
            });
        }
        for pc in pools {
            let e = Self::prepare_pool(&pc.kind, PoolOrigin::Config)?;
            d.lock().pools.insert(pc.name, e);
        }
        for pr in d.store.pools()? {
            if d.lock().pools.contains_key(&pr.name) {
                tracing::warn!(pool = %pr.name, "API pool shadowed by a configured pool of that name");
                continue;
            }
            match Self::prepare_pool(&pr.kind, PoolOrigin::Api) {
                Ok(e) => {
                    d.lock().pools.insert(pr.name, e);
                }
                Err(e) => tracing::error!(pool = %pr.name, error = %e.chain(), "pool unavailable"),
            }
        }
        d.recover_volumes()?;
        d.recover_images()?;
        d.recover_shared();
        Ok(d)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn emit(&self, pool: &str, name: &str, what: EventKind) {
        let _ = self.events.send(Event {
            unix_ms: now_ms(),
            pool: pool.to_owned(),
            name: name.to_owned(),
            what,
        });
    }

    fn emit_state(&self, id: &VolumeId, old: Option<VolState>, new: Option<VolState>) {
        tracing::info!(pool = %id.pool, volume = %id.name, old = ?old, new = ?new, "volume state");
        self.emit(&id.pool, &id.name, EventKind::StateChanged { old, new });
    }

    /// Test hook (feature `test-hooks`): the first time `step` is the configured pause
    /// step, this operation stops here until the daemon is killed.
    fn pause(&self, _step: &str) {
        #[cfg(feature = "test-hooks")]
        if let Some(p) = &self.pause {
            p.at(_step);
        }
    }

    fn begin(&self, key: OpKey) -> Result<OpGuard<'_>> {
        if !self.lock().busy.insert(key.clone()) {
            return Err(match &key {
                OpKey::Pool(n) => Error::Busy(format!("pool {n}")),
                OpKey::Volume(id) => Error::volume_busy(id),
                OpKey::Image(id) => Error::image_busy(id),
            });
        }
        Ok(OpGuard { driver: self, key })
    }

    fn begin_volume(&self, id: &VolumeId) -> Result<OpGuard<'_>> {
        self.begin(OpKey::Volume(id.clone()))
    }

    fn record(&self, id: &VolumeId) -> Option<VolumeRecord> {
        self.lock().volumes.get(id).cloned()
    }

    /// Records a volume: in its pool when the pool is shared and the volume complete
    /// (every host reads it there), else in this host's state directory (a volume being
    /// created, grown or deleted is this host's business until it is done).
    fn put_record(&self, r: &VolumeRecord) -> Result<()> {
        let shared = self
            .pool(&r.pool)
            .ok()
            .filter(|e| e.backend.shared().is_some());
        match shared {
            Some(e) if r.state == VolState::Ready => {
                let json = serde_json::to_string(r)
                    .map_err(|e| Error::BadRequest(format!("volume record: {e}")))?;
                if let Some(s) = e.backend.shared() {
                    s.put_volume_record(&r.path, &json)?;
                }
                self.store.remove_volume(&r.pool, &r.name)?;
            }
            _ => self.store.put_volume(r)?,
        }
        self.lock().volumes.insert(r.id(), r.clone());
        Ok(())
    }

    fn drop_record(&self, id: &VolumeId) -> Result<()> {
        self.store.remove_volume(&id.pool, &id.name)?;
        self.lock().volumes.remove(id);
        Ok(())
    }

    /// Reads the records a shared pool keeps (volumes and cached images made or changed
    /// by other hosts) into the driver's view; a volume this host is creating, growing or
    /// deleting keeps its local record. Nothing to do for local pools.
    fn refresh_shared(&self, pool: &str) -> Result<()> {
        let Ok(e) = self.pool(pool) else {
            return Ok(());
        };
        let Some(shared) = e.backend.shared() else {
            return Ok(());
        };
        let mut volumes = Vec::new();
        for json in shared.volume_records()? {
            match serde_json::from_str::<VolumeRecord>(&json) {
                Ok(r) if r.pool == pool => volumes.push(r),
                Ok(r) => tracing::warn!(pool, other = %r.pool, volume = %r.name,
                    "a record of another pool's volume in this pool: ignored"),
                Err(err) => tracing::warn!(pool, error = %err, "unreadable volume record: ignored"),
            }
        }
        let mut images = Vec::new();
        for json in shared.image_records()? {
            match serde_json::from_str::<ImageRecord>(&json) {
                Ok(r) if r.pool == pool => images.push(r),
                Ok(_) => {}
                Err(err) => tracing::warn!(pool, error = %err, "unreadable image record: ignored"),
            }
        }
        let mut inner = self.lock();
        // A volume this host is creating, growing or deleting has its record here; every
        // complete one is as the pool says (this host writes its changes there first).
        let busy = |inner: &Inner, id: &VolumeId| {
            inner
                .volumes
                .get(id)
                .is_some_and(|r| r.state != VolState::Ready)
        };
        let seen: HashSet<VolumeId> = volumes.iter().map(VolumeRecord::id).collect();
        let gone: Vec<VolumeId> = inner
            .volumes
            .keys()
            .filter(|id| id.pool == pool && !seen.contains(*id))
            .filter(|id| !busy(&inner, id))
            .cloned()
            .collect();
        for id in gone {
            inner.volumes.remove(&id);
        }
        for r in volumes {
            let id = r.id();
            if !busy(&inner, &id) {
                inner.volumes.insert(id, r);
            }
        }
        inner.images.retain(|id, _| id.pool != pool);
        for r in images {
            inner.images.insert(r.id(), r);
        }
        Ok(())
    }

    /// A volume as the API shows it.
    fn view(&self, r: &VolumeRecord) -> Volume {
        Volume {
            id: r.id(),
            uuid: r.uuid.clone(),
            size_bytes: r.size_bytes,
            state: r.state,
            origin: r.origin.clone(),
            path: r.path.clone(),
            backing_logical_block_size: crate::sys::size_and_sector(&r.path)
                .map(|s| s.1)
                .unwrap_or(512),
            attachment: r.attachment.as_ref().map(|a| self.attachment_view(r, a)),
            created_unix_ms: r.created_unix_ms,
            reflinked: r.reflinked,
        }
    }

    /// An attachment as the API shows it, with where its export stands.
    fn attachment_view(&self, rec: &VolumeRecord, a: &AttachRecord) -> Attachment {
        let chardev_id = format!("vmblk-{}", rec.uuid.get(..8).unwrap_or(&rec.uuid));
        let socket = a.socket.display().to_string();
        // reconnect=1: QEMU reconnects within a second when vmblkd restarts (and may
        // start before the socket exists). disable-legacy=on: OVMF would otherwise drive
        // the device as legacy virtio. A boot index is the caller's to add.
        let qemu_chardev = format!("socket,id={chardev_id},path={socket},reconnect=1");
        let qemu_device = format!(
            "vhost-user-blk-pci,chardev={chardev_id},id={chardev_id}-disk,num-queues={},queue-size={},disable-legacy=on",
            a.num_queues, a.queue_size
        );
        Attachment {
            socket: a.socket.clone(),
            logical_block_size: a.logical_block_size,
            read_only: a.read_only,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: serial(&rec.uuid),
            attached_unix_ms: a.attached_unix_ms,
            backend: self.backend(&rec.id(), a),
            qemu_chardev,
            qemu_device,
        }
    }

    /// Where an attachment's export stands: recorded failed, else what runs for it.
    fn backend(&self, id: &VolumeId, a: &AttachRecord) -> Backend {
        if let Some(reason) = &a.failed {
            return Backend::Failed {
                reason: reason.clone(),
            };
        }
        match self.lock().live.get(id) {
            Some(Live::Serving { export, .. }) => {
                // The export may have found out by itself a moment before telling us.
                if export.state() == crate::export::BackendState::Removed {
                    Backend::Removed {
                        reason: String::new(),
                    }
                } else {
                    Backend::Serving
                }
            }
            Some(Live::Removed { reason, .. }) => Backend::Removed {
                reason: reason.clone(),
            },
            Some(Live::WaitingForDevice) | None => Backend::WaitingForDevice,
        }
    }

    /// The pool `name`.
    fn pool(&self, name: &str) -> Result<PoolEntry> {
        self.lock()
            .pools
            .get(name)
            .cloned()
            .ok_or_else(|| Error::PoolNotFound(name.to_owned()))
    }
}

/// Where a volume's data is, for its pool backend.
fn backing(rec: &VolumeRecord) -> crate::pool::Backing {
    crate::pool::Backing {
        path: rec.path.clone(),
        temp_path: rec.temp_path.clone(),
        size_bytes: rec.size_bytes,
    }
}

/// The serial number the guest reads: the UUID's first 20 hex digits.
fn serial(uuid: &str) -> String {
    uuid.chars().filter(|c| *c != '-').take(20).collect()
}

/// Whether the volume at `path` holds a GPT (of either sector size).
fn has_gpt(path: &Path) -> bool {
    use image_unpack::partition::DetectedLayout;
    image_unpack::inspect(path).is_ok_and(|r| {
        matches!(
            r.detection.layout,
            DetectedLayout::Gpt { .. } | DetectedLayout::Both { .. }
        )
    })
}

#[cfg(test)]
mod tests;
