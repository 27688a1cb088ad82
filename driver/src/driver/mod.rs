//! The driver's core: pools, volumes, cached images and attachments, with their
//! durable records, per-object operation locks and events. The gRPC service
//! (`service.rs`) is a thin layer over [`Driver`]; every method here is blocking.
//!
//! ```text
//!   request ──► validate (names, sizes, paths) ──► begin(op key) ── busy? ──► ABORTED
//!                                                       │
//!        record CREATING (fsync'd) ──► fill temp file / device (unpack, clone, zero)
//!                                                       │
//!        fsync data ──► rename temp → final ──► fsync dir ──► record READY (fsync'd)
//! ```
//!
//! A crash anywhere before the READY record leaves a CREATING record (or none); at
//! startup [`Driver::open`] removes such volumes with their temporary files, so a volume
//! is either absent or complete.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image_unpack::{Progress, RepairCommandOptions, UnpackOptions};
use tokio::sync::broadcast;
use vmblk_proto::v1 as pb;

use crate::config::{AttachmentConfig, Config, ExportDefaults, PoolKind, DEFAULT_POOL};
use crate::error::{Error, Result};
use crate::export::{BackendEvent, BackendState, EventSink, ExportHandle, ExportParams, Exporter};
use crate::hotplug::{Decision, Taints, Tracked, TrackedState};
use crate::identity::Sysfs;
use crate::names::{check_fingerprint, check_image_path, check_name, check_size, round_up};
use crate::state::{
    remove_temp_files_under, AttachRecord, ImageRecord, Origin, PoolRecord, Store, VolState,
    VolumeRecord, TMP_PREFIX,
};
use crate::sys;

mod attach;
mod hotplug;
mod images;
mod pools;
mod progress;
mod recovery;
mod volumes;

use progress::EventProgress;

/// Bytes wiped at the head and tail of a block device when a volume on it is removed.
const WIPE_BYTES: u64 = 1 << 20;

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
    /// Test hook: the step at which to stop and wait to be killed (`VMBLKD_TEST_PAUSE_AT`).
    pub pause_at: Option<String>,
    /// Test hook: a file created when the pause step is reached.
    pub pause_marker: Option<PathBuf>,
}

#[derive(Debug, Clone)]
struct PoolEntry {
    kind: PoolKind,
    from_config: bool,
    reflink: bool,
}

#[derive(Debug, Default)]
struct Inner {
    pools: BTreeMap<String, PoolEntry>,
    volumes: BTreeMap<(String, String), VolumeRecord>,
    images: BTreeMap<(String, String), ImageRecord>,
    busy: HashSet<String>,
    exports: HashMap<(String, String), Arc<dyn ExportHandle>>,
    /// Space held for images being imported, by (pool, fingerprint): counted as
    /// provisioned from the quota check until the image is recorded.
    reserved: HashMap<(String, String), u64>,
    /// The id of each running export (a failure report names the export it is about).
    export_ids: HashMap<(String, String), u64>,
    /// The next export id.
    next_export_id: u64,
    /// Attached volumes whose backing device is removed: why, and the device it was
    /// (what Watch was told).
    removed: HashMap<(String, String), (String, PathBuf)>,
}

/// The storage driver.
#[derive(Debug)]
pub struct Driver {
    state_dir: PathBuf,
    export_dir: PathBuf,
    export_defaults: ExportDefaults,
    store: Store,
    inner: Mutex<Inner>,
    events: broadcast::Sender<pb::Event>,
    exporter: Box<dyn Exporter>,
    pause_at: Option<String>,
    pause_marker: Option<PathBuf>,
    paused: AtomicBool,
    /// Serializes space and device allocation between creates of different volumes.
    alloc: Mutex<()>,
    /// Where block devices' identities are read.
    sysfs: Sysfs,
    /// Devices that count as gone (hotplug).
    taints: Taints,
    /// The attachments the configuration lists.
    config_attachments: Vec<AttachmentConfig>,
}

/// Space held in a pool's quota for an import under way; released on drop.
struct Reservation<'a> {
    driver: &'a Driver,
    key: (String, String),
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.driver.lock().reserved.remove(&self.key);
    }
}

/// Removes its key from the busy set on drop.
struct OpGuard<'a> {
    driver: &'a Driver,
    key: String,
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

fn vkey(pool: &str, name: &str) -> String {
    format!("v/{pool}/{name}")
}

fn ikey(pool: &str, fp: &str) -> String {
    format!("i/{pool}/{fp}")
}

fn key(pool: &str, name: &str) -> (String, String) {
    (pool.to_owned(), name.to_owned())
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
        let d = Arc::new(Driver {
            state_dir: p.state_dir.clone(),
            export_dir: p.export_dir,
            export_defaults: p.config.exports.clone(),
            store,
            inner: Mutex::new(Inner::default()),
            events,
            exporter: p.exporter,
            pause_at: p.pause_at,
            pause_marker: p.pause_marker,
            paused: AtomicBool::new(false),
            alloc: Mutex::new(()),
            sysfs: Sysfs::default(),
            taints: Taints::default(),
            config_attachments: p.config.attachments.clone(),
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
            let e = d.prepare_pool(&pc.kind, true)?;
            d.lock().pools.insert(pc.name, e);
        }
        for pr in d.store.pools()? {
            if d.lock().pools.contains_key(&pr.name) {
                tracing::warn!(pool = %pr.name, "API pool shadowed by a configured pool of that name");
                continue;
            }
            match d.prepare_pool(&pr.kind, false) {
                Ok(e) => {
                    d.lock().pools.insert(pr.name, e);
                }
                Err(e) => tracing::error!(pool = %pr.name, error = %e.chain(), "pool unavailable"),
            }
        }
        d.recover_volumes()?;
        d.recover_images()?;
        Ok(d)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.events.subscribe()
    }

    fn emit(&self, pool: &str, name: &str, kind: pb::event::Kind) {
        let _ = self.events.send(pb::Event {
            unix_ms: now_ms(),
            pool: pool.to_owned(),
            name: name.to_owned(),
            kind: Some(kind),
        });
    }

    fn emit_state(&self, pool: &str, name: &str, old: Option<VolState>, new: Option<VolState>) {
        tracing::info!(pool, volume = name, old = ?old, new = ?new, "volume state");
        self.emit(
            pool,
            name,
            pb::event::Kind::StateChanged(pb::VolumeStateChanged {
                old_state: state_pb(old) as i32,
                new_state: state_pb(new) as i32,
            }),
        );
    }

    /// Test hook: the first time `step` is the configured pause step, stop here (this
    /// operation only) until the daemon is killed.
    fn pause(&self, step: &str) {
        if self.pause_at.as_deref() != Some(step) || self.paused.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!(step, "test pause: waiting to be killed");
        if let Some(m) = &self.pause_marker {
            let _ = fs::write(m, step);
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }

    fn begin(&self, key: String, what: &str) -> Result<OpGuard<'_>> {
        if !self.lock().busy.insert(key.clone()) {
            return Err(Error::Aborted(format!(
                "another operation on {what} is running"
            )));
        }
        Ok(OpGuard { driver: self, key })
    }
}

/// Where [`Driver::locate_backing`] found a block volume's device.
#[derive(Debug)]
enum Located {
    /// At its recorded path.
    Here,
    /// Elsewhere: the record's path was changed from this one.
    Moved(PathBuf),
    /// Nowhere.
    Absent,
    /// The device has no stable identity: taken as it is.
    Unidentified,
}

fn state_pb(s: Option<VolState>) -> pb::VolumeState {
    match s {
        None => pb::VolumeState::Unspecified,
        Some(VolState::Creating) => pb::VolumeState::Creating,
        Some(VolState::Ready) => pb::VolumeState::Ready,
        Some(VolState::Growing) => pb::VolumeState::Growing,
        Some(VolState::Deleting) => pb::VolumeState::Deleting,
    }
}

fn serial(uuid: &str) -> String {
    uuid.chars().filter(|c| *c != '-').take(20).collect()
}

fn attachment_pb(rec: &VolumeRecord, a: &AttachRecord) -> pb::Attachment {
    let id = format!("vmblk-{}", rec.uuid.get(..8).unwrap_or(&rec.uuid));
    let socket = a.socket.display().to_string();
    // reconnect=1: QEMU reconnects within a second when vmblkd restarts (and may start
    // before the socket exists). disable-legacy=on: OVMF would otherwise drive the
    // device as legacy virtio. A boot index is the caller's to add (",bootindex=N").
    let qemu_chardev = format!("socket,id={id},path={socket},reconnect=1");
    let qemu_device = format!(
        "vhost-user-blk-pci,chardev={id},id={id}-disk,num-queues={},queue-size={},disable-legacy=on",
        a.num_queues, a.queue_size
    );
    pb::Attachment {
        socket_path: socket,
        logical_block_size: a.logical_block_size,
        read_only: a.read_only,
        num_queues: u32::from(a.num_queues),
        queue_size: u32::from(a.queue_size),
        serial: serial(&rec.uuid),
        qemu_args: vec![
            "-chardev".into(),
            qemu_chardev.clone(),
            "-device".into(),
            qemu_device.clone(),
        ],
        qemu_chardev,
        qemu_device,
        attached_unix_ms: a.attached_unix_ms,
        ..Default::default()
    }
}

/// The device number of a block device (None for anything else).
fn device_number(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .map(|m| m.rdev())
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

/// Clones `src` into the new file `dst` by reflink, or copies it (skipping zero
/// blocks, so the copy stays sparse). Returns whether it was a reflink.
fn clone_file(src: &Path, dst: &Path) -> Result<bool> {
    let s = File::open(src).map_err(Error::io("opening", src))?;
    let d = OpenOptions::new()
        .write(true)
        .open(dst)
        .map_err(Error::io("opening", dst))?;
    match sys::ficlone(&d, &s) {
        Ok(()) => return Ok(true),
        Err(e) if sys::is_reflink_unsupported(&e) => {
            tracing::info!(src = %src.display(), error = %e, "no reflink here; copying");
        }
        Err(e) => return Err(Error::io("cloning into", dst)(e)),
    }
    sparse_copy(&s, &d).map_err(Error::io("copying into", dst))?;
    Ok(false)
}

fn sparse_copy(s: &File, d: &File) -> std::io::Result<()> {
    // Only the data extents are copied (SEEK_DATA/SEEK_HOLE), in the kernel
    // (copy_file_range); holes stay holes.
    let len = s.metadata()?.len();
    d.set_len(len)?;
    let mut off = 0u64;
    while off < len {
        let Some(start) = sys::next_data(s, off)? else {
            break;
        };
        let end = sys::next_hole(s, start)?.min(len);
        sys::copy_range(s, d, start, end - start)?;
        off = end;
    }
    Ok(())
}

/// Zeroes the first and last MiB of a device (partition tables, signatures).
fn wipe_device(dev: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new().write(true).open(dev)?;
    let size = sys::block_device_size(&f)?;
    let n = WIPE_BYTES.min(size);
    let zeros = vec![0u8; n as usize];
    f.write_all_at(&zeros, 0)?;
    f.write_all_at(&zeros, size - n)?;
    f.sync_all()
}

/// Whether files under `dir` can be reflinked.
fn probe_reflink(dir: &Path) -> bool {
    let a = dir.join(format!("{TMP_PREFIX}reflink-probe-a"));
    let b = dir.join(format!("{TMP_PREFIX}reflink-probe-b"));
    let r = (|| -> std::io::Result<()> {
        fs::write(&a, vec![1u8; 4096])?;
        let s = File::open(&a)?;
        let d = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&b)?;
        sys::ficlone(&d, &s)
    })();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    r.is_ok()
}

#[cfg(test)]
mod tests;
