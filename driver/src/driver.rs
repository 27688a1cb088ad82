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

    // ------------------------------------------------------------------ pools

    fn prepare_pool(&self, kind: &PoolKind, from_config: bool) -> Result<PoolEntry> {
        let mut reflink = false;
        if let PoolKind::Dir { path, .. } = kind {
            for sub in ["volumes", "images"] {
                let d = path.join(sub);
                fs::create_dir_all(&d).map_err(Error::io("creating", &d))?;
                remove_temp_files_under(&d, 1)?;
            }
            reflink = probe_reflink(path);
            tracing::info!(path = %path.display(), reflink, "dir pool ready");
        }
        Ok(PoolEntry {
            kind: kind.clone(),
            from_config,
            reflink,
        })
    }

    fn pool(&self, name: &str) -> Result<PoolEntry> {
        self.lock()
            .pools
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("pool {name:?} does not exist")))
    }

    fn pool_pb(&self, name: &str, e: &PoolEntry, inner: &Inner) -> pb::Pool {
        let vols: Vec<&VolumeRecord> = inner.volumes.values().filter(|v| v.pool == name).collect();
        let imgs = inner
            .images
            .values()
            .filter(|i| i.pool == name)
            .map(|i| i.size_bytes);
        let reserved = inner
            .reserved
            .iter()
            .filter(|((p, _), _)| p == name)
            .map(|(_, size)| size);
        let provisioned = vols.iter().map(|v| v.size_bytes).sum::<u64>()
            + imgs.sum::<u64>()
            + reserved.sum::<u64>();
        let mut p = pb::Pool {
            name: name.to_owned(),
            origin: if e.from_config {
                pb::PoolOrigin::Config
            } else {
                pb::PoolOrigin::Api
            } as i32,
            provisioned_bytes: provisioned,
            reflink: e.reflink,
            volume_count: vols.len() as u32,
            ..Default::default()
        };
        match &e.kind {
            PoolKind::Dir {
                path,
                capacity_bytes,
            } => {
                p.r#type = pb::PoolType::Dir as i32;
                p.path = path.display().to_string();
                p.capacity_bytes = *capacity_bytes;
                p.available_bytes = sys::available_bytes(path).unwrap_or(0);
            }
            PoolKind::Block { devices } => {
                p.r#type = pb::PoolType::Block as i32;
                p.devices = devices.iter().map(|d| d.display().to_string()).collect();
                let used: HashSet<u64> = inner
                    .volumes
                    .values()
                    .filter_map(|v| device_number(&v.path))
                    .collect();
                for d in devices {
                    let size = sys::size_and_sector(d).map(|s| s.0).unwrap_or(0);
                    p.capacity_bytes += size;
                    if device_number(d).is_some_and(|n| !used.contains(&n)) {
                        p.available_bytes += size;
                    }
                }
            }
        }
        p
    }

    /// CreatePool.
    pub fn create_pool(&self, r: pb::CreatePoolRequest) -> Result<pb::Pool> {
        check_name("pool", &r.name)?;
        let kind = match pb::PoolType::try_from(r.r#type) {
            Ok(pb::PoolType::Dir) => {
                if !r.devices.is_empty() {
                    return Err(Error::InvalidArgument("dir pools take no devices".into()));
                }
                let path = PathBuf::from(&r.path);
                if !path.is_absolute() || r.path.contains('\0') || r.path.contains("/../") {
                    return Err(Error::InvalidArgument(format!(
                        "pool path {:?} is not an absolute path",
                        r.path
                    )));
                }
                PoolKind::Dir {
                    path,
                    capacity_bytes: r.capacity_bytes,
                }
            }
            Ok(pb::PoolType::Block) => {
                if r.devices.is_empty() || !r.path.is_empty() || r.capacity_bytes != 0 {
                    return Err(Error::InvalidArgument(
                        "block pools take devices, and no path or capacity".into(),
                    ));
                }
                let mut devs = Vec::new();
                for d in &r.devices {
                    let p = PathBuf::from(d);
                    let is_blk = fs::metadata(&p).map(|m| m.file_type().is_block_device());
                    if !p.is_absolute() || !matches!(is_blk, Ok(true)) {
                        return Err(Error::InvalidArgument(format!(
                            "device {d:?} is not an absolute path to a block device"
                        )));
                    }
                    devs.push(p);
                }
                PoolKind::Block { devices: devs }
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "pool type is required: dir or block".into(),
                ))
            }
        };
        let _g = self.begin(format!("p/{}", r.name), &format!("pool {}", r.name))?;
        {
            let inner = self.lock();
            if let Some(e) = inner.pools.get(&r.name) {
                if e.kind == kind {
                    return Ok(self.pool_pb(&r.name, e, &inner));
                }
                return Err(Error::AlreadyExists(format!(
                    "pool {:?} exists with another type or storage",
                    r.name
                )));
            }
            for (n, e) in &inner.pools {
                let clash = match (&e.kind, &kind) {
                    (PoolKind::Dir { path: a, .. }, PoolKind::Dir { path: b, .. }) => a == b,
                    (PoolKind::Block { devices: a }, PoolKind::Block { devices: b }) => {
                        a.iter().any(|d| b.contains(d))
                    }
                    _ => false,
                };
                if clash {
                    return Err(Error::InvalidArgument(format!(
                        "pool {n:?} already uses that storage"
                    )));
                }
            }
        }
        if let PoolKind::Dir { path, .. } = &kind {
            fs::create_dir_all(path).map_err(Error::io("creating", path))?;
        }
        let e = self.prepare_pool(&kind, false)?;
        self.store.put_pool(&PoolRecord {
            name: r.name.clone(),
            kind,
        })?;
        let mut inner = self.lock();
        inner.pools.insert(r.name.clone(), e.clone());
        tracing::info!(pool = %r.name, "pool created");
        Ok(self.pool_pb(&r.name, &e, &inner))
    }

    /// GetPool.
    pub fn get_pool(&self, name: &str) -> Result<pb::Pool> {
        check_name("pool", name)?;
        let inner = self.lock();
        let e = inner
            .pools
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("pool {name:?} does not exist")))?;
        Ok(self.pool_pb(name, e, &inner))
    }

    /// ListPools.
    pub fn list_pools(&self) -> Vec<pb::Pool> {
        let inner = self.lock();
        inner
            .pools
            .iter()
            .map(|(n, e)| self.pool_pb(n, e, &inner))
            .collect()
    }

    /// DeletePool: returns whether it existed.
    pub fn delete_pool(&self, name: &str) -> Result<bool> {
        check_name("pool", name)?;
        let _g = self.begin(format!("p/{name}"), &format!("pool {name}"))?;
        let mut inner = self.lock();
        let Some(e) = inner.pools.get(name) else {
            return Ok(false);
        };
        if e.from_config {
            return Err(Error::FailedPrecondition(format!(
                "pool {name:?} is defined in the configuration file"
            )));
        }
        let (vp, ip) = (format!("v/{name}/"), format!("i/{name}/"));
        if inner
            .busy
            .iter()
            .any(|k| k.starts_with(&vp) || k.starts_with(&ip))
        {
            return Err(Error::Aborted(format!(
                "operations on pool {name:?} are running"
            )));
        }
        if inner.volumes.keys().any(|(p, _)| p == name)
            || inner.images.keys().any(|(p, _)| p == name)
        {
            return Err(Error::FailedPrecondition(format!(
                "pool {name:?} still holds volumes or cached images"
            )));
        }
        self.store.remove_pool(name)?;
        inner.pools.remove(name);
        tracing::info!(pool = name, "pool deleted");
        Ok(true)
    }

    // ------------------------------------------------------------------ volumes

    fn volume_pb(&self, r: &VolumeRecord) -> pb::Volume {
        let origin = match &r.origin {
            Origin::Empty => pb::volume_origin::Source::Empty(pb::Empty {}),
            Origin::Image { path, metadata } => pb::volume_origin::Source::Image(pb::ImageFile {
                path: path.display().to_string(),
                metadata_path: metadata
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default(),
            }),
            Origin::Fingerprint(f) => pb::volume_origin::Source::ImageFingerprint(f.clone()),
        };
        pb::Volume {
            pool: r.pool.clone(),
            name: r.name.clone(),
            uuid: r.uuid.clone(),
            size_bytes: r.size_bytes,
            state: state_pb(Some(r.state)) as i32,
            origin: Some(pb::VolumeOrigin {
                source: Some(origin),
            }),
            path: r.path.display().to_string(),
            backing_logical_block_size: sys::size_and_sector(&r.path).map(|s| s.1).unwrap_or(512),
            attachment: r.attachment.as_ref().map(|a| self.attachment_pb(r, a)),
            created_unix_ms: r.created_unix_ms,
            reflinked: r.reflinked,
        }
    }

    /// An attachment for the API, with where its backing device stands.
    fn attachment_pb(&self, rec: &VolumeRecord, a: &AttachRecord) -> pb::Attachment {
        let mut pb = attachment_pb(rec, a);
        let (state, reason) = self.backend_state(&rec.pool, &rec.name);
        pb.backend_state = state as i32;
        pb.backend_removed_reason = reason;
        pb
    }

    fn record(&self, pool: &str, name: &str) -> Option<VolumeRecord> {
        self.lock().volumes.get(&key(pool, name)).cloned()
    }

    fn put_record(&self, r: &VolumeRecord) -> Result<()> {
        self.store.put_volume(r)?;
        self.lock().volumes.insert(key(&r.pool, &r.name), r.clone());
        Ok(())
    }

    fn drop_record(&self, pool: &str, name: &str) -> Result<()> {
        self.store.remove_volume(pool, name)?;
        self.lock().volumes.remove(&key(pool, name));
        Ok(())
    }

    /// GetVolume.
    pub fn get_volume(&self, pool: &str, name: &str) -> Result<pb::Volume> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        self.pool(pool)?;
        let r = self
            .record(pool, name)
            .ok_or_else(|| Error::NotFound(format!("volume {pool}/{name} does not exist")))?;
        Ok(self.volume_pb(&r))
    }

    /// ListVolumes.
    pub fn list_volumes(&self, pool: &str) -> Result<Vec<pb::Volume>> {
        if !pool.is_empty() {
            check_name("pool", pool)?;
            self.pool(pool)?;
        }
        let recs: Vec<VolumeRecord> = self
            .lock()
            .volumes
            .values()
            .filter(|v| pool.is_empty() || v.pool == pool)
            .cloned()
            .collect();
        Ok(recs.iter().map(|r| self.volume_pb(r)).collect())
    }

    /// GetVolumeUsage.
    pub fn volume_usage(&self, pool: &str, name: &str) -> Result<pb::VolumeUsage> {
        let v = self.get_volume(pool, name)?;
        let p = self.pool(pool)?;
        let allocated = match p.kind {
            PoolKind::Dir { .. } => sys::allocated_bytes(Path::new(&v.path))
                .map_err(Error::io("inspecting", &v.path))?,
            PoolKind::Block { .. } => v.size_bytes,
        };
        Ok(pb::VolumeUsage {
            size_bytes: v.size_bytes,
            allocated_bytes: allocated,
        })
    }

    fn parse_origin(o: Option<pb::VolumeOrigin>) -> Result<Origin> {
        Ok(match o.and_then(|o| o.source) {
            None | Some(pb::volume_origin::Source::Empty(_)) => Origin::Empty,
            Some(pb::volume_origin::Source::Image(f)) => {
                check_image_path("image", &f.path)?;
                let metadata = if f.metadata_path.is_empty() {
                    None
                } else {
                    check_image_path("metadata tarball", &f.metadata_path)?;
                    Some(PathBuf::from(f.metadata_path))
                };
                Origin::Image {
                    path: PathBuf::from(f.path),
                    metadata,
                }
            }
            Some(pb::volume_origin::Source::ImageFingerprint(fp)) => {
                check_fingerprint(&fp)?;
                Origin::Fingerprint(fp)
            }
        })
    }

    fn quota_check(&self, pool: &str, e: &PoolEntry, extra: u64) -> Result<()> {
        if let PoolKind::Dir { capacity_bytes, .. } = e.kind {
            if capacity_bytes > 0 {
                let p = self.pool_pb(pool, e, &self.lock());
                if p.provisioned_bytes.saturating_add(extra) > capacity_bytes {
                    return Err(Error::ResourceExhausted(format!(
                        "pool {pool:?}: {extra} more bytes exceed its capacity of {capacity_bytes} \
                         ({} provisioned)",
                        p.provisioned_bytes
                    )));
                }
            }
        }
        Ok(())
    }

    /// Finds a cached image for a volume of `pool`: the pool's own, or (block pools)
    /// any dir pool's.
    fn find_image(&self, pool: &str, fp: &str) -> Result<ImageRecord> {
        let inner = self.lock();
        inner
            .images
            .get(&key(pool, fp))
            .or_else(|| inner.images.values().find(|i| i.fingerprint == fp))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no cached image with fingerprint {fp}")))
    }

    /// CreateVolume.
    pub fn create_volume(&self, r: pb::CreateVolumeRequest) -> Result<pb::Volume> {
        check_name("pool", &r.pool)?;
        check_name("volume", &r.name)?;
        let origin = Self::parse_origin(r.origin)?;
        if r.size_bytes != 0 || origin == Origin::Empty {
            check_size(r.size_bytes)?;
        }
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        let pe = self.pool(pool)?;
        if let Some(rec) = self.record(pool, name) {
            let same_size = r.size_bytes == rec.requested_bytes || r.size_bytes == rec.size_bytes;
            if rec.origin == origin && same_size && rec.state != VolState::Creating {
                return Ok(self.volume_pb(&rec));
            }
            return Err(Error::AlreadyExists(format!(
                "volume {pool}/{name} exists with another size or origin"
            )));
        }
        // The size: the request's, or the image's.
        let (min_size, image) = match &origin {
            Origin::Empty => (r.size_bytes, None),
            Origin::Image { path, .. } => {
                let rep = image_unpack::inspect(path).map_err(|source| Error::Unpack {
                    step: "inspecting",
                    path: path.clone(),
                    source: Box::new(source),
                })?;
                (rep.size, None)
            }
            Origin::Fingerprint(fp) => {
                let img = self.find_image(pool, fp)?;
                (img.size_bytes, Some(img))
            }
        };
        if r.size_bytes != 0 && r.size_bytes < min_size {
            return Err(Error::InvalidArgument(format!(
                "size {} is smaller than the image's {min_size} bytes",
                r.size_bytes
            )));
        }
        let mut size = if r.size_bytes != 0 {
            r.size_bytes
        } else {
            round_up(min_size)
        };
        let uuid = uuid::Uuid::new_v4().to_string();
        // Choosing a device (or checking the quota) and recording the choice is one step:
        // two creates of different names must not both take the last device or space.
        let alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let (path, temp_path) = match &pe.kind {
            PoolKind::Dir { path: dir, .. } => {
                self.quota_check(pool, &pe, size)?;
                let vdir = dir.join("volumes");
                (
                    vdir.join(format!("{name}.img")),
                    Some(vdir.join(format!("{TMP_PREFIX}{name}-{uuid}.img"))),
                )
            }
            PoolKind::Block { devices } => {
                let (dev, dev_size) = self.pick_device(pool, devices, size)?;
                size = dev_size;
                (dev, None)
            }
        };
        let mut rec = VolumeRecord {
            pool: pool.to_owned(),
            name: name.to_owned(),
            uuid,
            size_bytes: size,
            state: VolState::Creating,
            origin: origin.clone(),
            path,
            temp_path,
            attachment: None,
            created_unix_ms: now_ms(),
            reflinked: false,
            requested_bytes: r.size_bytes,
            identity: None,
        };
        if matches!(pe.kind, PoolKind::Block { .. }) {
            rec.identity = self.sysfs.identity_of_path(&rec.path);
            if rec.identity.is_none() {
                tracing::warn!(device = %rec.path.display(),
                    "device has no stable identity (wwid, serial, loop backing file): \
                     hot-remove and re-add cannot follow it");
            }
        }
        self.put_record(&rec)?;
        drop(alloc);
        self.emit_state(pool, name, None, Some(VolState::Creating));
        self.pause("record-written");
        let progress = EventProgress::new(self, pool, name, "create");
        let filled = self.fill_volume(&rec, image.as_ref(), r.grow_last_partition, &progress);
        let finished = filled.and_then(|reflinked| {
            rec.reflinked = reflinked;
            self.pause("unpacked");
            if let Some(tmp) = &rec.temp_path {
                let dir = rec.path.parent().unwrap_or(Path::new("/"));
                fs::rename(tmp, &rec.path).map_err(Error::io("renaming", tmp))?;
                sys::fsync_dir(dir).map_err(Error::io("syncing", dir))?;
            }
            self.pause("renamed");
            rec.temp_path = None;
            rec.state = VolState::Ready;
            self.put_record(&rec)
        });
        match finished {
            Ok(()) => {
                self.emit_state(pool, name, Some(VolState::Creating), Some(VolState::Ready));
                tracing::info!(
                    pool,
                    volume = name,
                    size,
                    reflinked = rec.reflinked,
                    "volume created"
                );
                Ok(self.volume_pb(&rec))
            }
            Err(e) => {
                tracing::warn!(pool, volume = name, error = %e.chain(), "create failed; removing");
                self.discard_data(&rec);
                if let Err(e2) = self.drop_record(pool, name) {
                    tracing::error!(error = %e2.chain(), "removing the failed volume's record");
                }
                self.emit_state(pool, name, Some(VolState::Creating), None);
                Err(e)
            }
        }
    }

    fn pick_device(&self, pool: &str, devices: &[PathBuf], size: u64) -> Result<(PathBuf, u64)> {
        // Devices are compared by device number: two stable names (by-id, by-path) of
        // one device are one device, whichever pool or volume names it.
        let used_paths: Vec<PathBuf> = self
            .lock()
            .volumes
            .values()
            .map(|v| v.path.clone())
            .collect();
        let used: HashSet<u64> = used_paths.iter().filter_map(|p| device_number(p)).collect();
        let mut best: Option<(PathBuf, u64)> = None;
        let free = devices
            .iter()
            .filter(|d| device_number(d).is_some_and(|n| !used.contains(&n)));
        for d in free {
            match sys::size_and_sector(d) {
                Ok((s, _)) if s >= size && best.as_ref().is_none_or(|b| s < b.1) => {
                    best = Some((d.clone(), s));
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(device = %d.display(), error = %e, "device unavailable"),
            }
        }
        best.ok_or_else(|| {
            Error::ResourceExhausted(format!("pool {pool:?} has no free device of {size} bytes"))
        })
    }

    /// Fills a CREATING volume's data; returns whether it was reflinked.
    fn fill_volume(
        &self,
        rec: &VolumeRecord,
        image: Option<&ImageRecord>,
        grow_last_partition: bool,
        progress: &EventProgress<'_>,
    ) -> Result<bool> {
        let target = rec.temp_path.as_ref().unwrap_or(&rec.path);
        let is_file = rec.temp_path.is_some();
        if is_file {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(target)
                .map_err(Error::io("creating", target))?;
            f.set_len(rec.size_bytes)
                .map_err(Error::io("sizing", target))?;
        }
        let opts = UnpackOptions {
            scratch_dir: Some(self.state_dir.join("scratch")),
            grow_last_partition,
            zero_tail: !is_file,
            ..UnpackOptions::default()
        };
        let unpack = |img: &Path, metadata: Option<PathBuf>| -> Result<()> {
            let _ = fs::create_dir_all(self.state_dir.join("scratch"));
            let o = UnpackOptions {
                metadata,
                ..opts.clone()
            };
            image_unpack::unpack(img, target, &o, progress)
                .map(|_| ())
                .map_err(|source| Error::Unpack {
                    step: "unpacking image onto",
                    path: target.clone(),
                    source: Box::new(source),
                })
        };
        let mut reflinked = false;
        match (&rec.origin, image) {
            (Origin::Empty, _) if !is_file => {
                progress.phase("zero", Some(rec.size_bytes));
                let t = image_unpack::Target::open(target)
                    .map_err(|e| Error::io("opening", target)(std::io::Error::other(e)))?;
                t.zero_range(0, rec.size_bytes)
                    .map_err(|e| Error::io("zeroing", target)(std::io::Error::other(e)))?;
            }
            (Origin::Empty, _) => {}
            (Origin::Image { path, metadata }, _) => unpack(path, metadata.clone())?,
            (Origin::Fingerprint(_), Some(img)) if is_file => {
                progress.phase("clone", Some(img.size_bytes));
                reflinked = clone_file(&img.path, target)?;
                progress.advance(img.size_bytes);
                if (rec.size_bytes > img.size_bytes || grow_last_partition) && has_gpt(target) {
                    let o = RepairCommandOptions {
                        grow_last_partition,
                        ..Default::default()
                    };
                    image_unpack::repair(target, &o, progress).map_err(|source| Error::Unpack {
                        step: "repairing",
                        path: target.clone(),
                        source: Box::new(source),
                    })?;
                }
            }
            (Origin::Fingerprint(_), Some(img)) => unpack(&img.path, None)?,
            (Origin::Fingerprint(fp), None) => {
                return Err(Error::NotFound(format!(
                    "no cached image with fingerprint {fp}"
                )))
            }
        }
        self.pause("filled");
        let f = File::options()
            .write(true)
            .open(target)
            .map_err(Error::io("opening", target))?;
        f.sync_all().map_err(Error::io("syncing", target))?;
        Ok(reflinked)
    }

    /// Removes a volume's data: the temporary and final files, or wipes the device.
    fn discard_data(&self, rec: &VolumeRecord) {
        if let Some(t) = &rec.temp_path {
            let _ = fs::remove_file(t);
        }
        let is_dev = fs::metadata(&rec.path).is_ok_and(|m| m.file_type().is_block_device());
        if is_dev {
            if let Err(e) = wipe_device(&rec.path) {
                tracing::error!(device = %rec.path.display(), error = %e, "wiping device");
            }
        } else if rec.state != VolState::Creating || rec.temp_path.is_none() {
            let _ = fs::remove_file(&rec.path);
        }
        if let Some(dir) = rec.path.parent() {
            let _ = sys::fsync_dir(dir);
        }
    }

    /// GrowVolume.
    pub fn grow_volume(&self, r: pb::GrowVolumeRequest) -> Result<pb::GrowVolumeResponse> {
        check_name("pool", &r.pool)?;
        check_name("volume", &r.name)?;
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        let pe = self.pool(pool)?;
        let mut rec = self
            .record(pool, name)
            .ok_or_else(|| Error::NotFound(format!("volume {pool}/{name} does not exist")))?;
        if r.size_bytes < rec.size_bytes {
            if rec.attachment.is_some() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {pool}/{name} is attached: it cannot shrink"
                )));
            }
            return Err(Error::InvalidArgument(format!(
                "size {} is smaller than the volume's {}: volumes do not shrink",
                r.size_bytes, rec.size_bytes
            )));
        }
        if r.size_bytes == rec.size_bytes {
            // Same size: repair the table if an earlier grow could not (it was attached).
            let (table_repaired, note) = if rec.attachment.is_some() {
                (false, "size unchanged".to_owned())
            } else {
                self.repair_table(&rec, r.grow_last_partition)?
            };
            return Ok(pb::GrowVolumeResponse {
                volume: Some(self.volume_pb(&rec)),
                table_repaired,
                note,
            });
        }
        check_size(r.size_bytes)?;
        if let PoolKind::Block { .. } = pe.kind {
            return Err(Error::ResourceExhausted(format!(
                "volume {pool}/{name} fills its device of {} bytes",
                rec.size_bytes
            )));
        }
        let old = rec.size_bytes;
        {
            // The GROWING record carries the new size, so concurrent quota checks count it.
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            self.quota_check(pool, &pe, r.size_bytes - rec.size_bytes)?;
            rec.state = VolState::Growing;
            rec.size_bytes = r.size_bytes;
            self.put_record(&rec)?;
        }
        self.emit_state(pool, name, Some(VolState::Ready), Some(VolState::Growing));
        let grown = (|| -> Result<(bool, String)> {
            let f = File::options()
                .write(true)
                .open(&rec.path)
                .map_err(Error::io("opening", &rec.path))?;
            f.set_len(r.size_bytes)
                .map_err(Error::io("extending", &rec.path))?;
            f.sync_all().map_err(Error::io("syncing", &rec.path))?;
            if rec.attachment.is_some() {
                return Ok((
                    false,
                    "attached: the guest owns the partition table; repair it in the guest \
                     or grow to this size again once detached"
                        .into(),
                ));
            }
            self.repair_table(&rec, r.grow_last_partition)
        })();
        // The file has its new size whether or not the repair succeeded.
        rec.size_bytes = fs::metadata(&rec.path).map(|m| m.len()).unwrap_or(old);
        rec.state = VolState::Ready;
        self.put_record(&rec)?;
        self.emit_state(pool, name, Some(VolState::Growing), Some(VolState::Ready));
        let (table_repaired, note) = grown?;
        tracing::info!(
            pool,
            volume = name,
            old,
            new = rec.size_bytes,
            table_repaired,
            "volume grown"
        );
        Ok(pb::GrowVolumeResponse {
            volume: Some(self.volume_pb(&rec)),
            table_repaired,
            note,
        })
    }

    /// Repairs a volume's GPT for its size (backup header to the end); returns whether
    /// anything was written, and why not.
    fn repair_table(
        &self,
        rec: &VolumeRecord,
        grow_last_partition: bool,
    ) -> Result<(bool, String)> {
        if !has_gpt(&rec.path) {
            return Ok((false, "no GPT on the volume: nothing to repair".into()));
        }
        let progress = EventProgress::new(self, &rec.pool, &rec.name, "grow");
        let o = RepairCommandOptions {
            grow_last_partition,
            ..Default::default()
        };
        let rep =
            image_unpack::repair(&rec.path, &o, &progress).map_err(|source| Error::Unpack {
                step: "repairing",
                path: rec.path.clone(),
                source: Box::new(source),
            })?;
        let repaired = rep
            .table
            .repair
            .as_ref()
            .is_some_and(|x| !x.actions.is_empty());
        let note = match &rep.table.skipped {
            Some(s) => s.clone(),
            None if !repaired => "the partition table needed nothing".into(),
            None => String::new(),
        };
        Ok((repaired, note))
    }

    /// DeleteVolume: returns whether it existed.
    pub fn delete_volume(&self, pool: &str, name: &str) -> Result<bool> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        self.pool(pool)?;
        let Some(mut rec) = self.record(pool, name) else {
            return Ok(false);
        };
        if rec.attachment.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "volume {pool}/{name} is attached: detach it first"
            )));
        }
        let old = rec.state;
        rec.state = VolState::Deleting;
        self.put_record(&rec)?;
        self.emit_state(pool, name, Some(old), Some(VolState::Deleting));
        self.discard_data(&rec);
        self.drop_record(pool, name)?;
        self.emit_state(pool, name, Some(VolState::Deleting), None);
        Ok(true)
    }

    // ------------------------------------------------------------------ attach

    /// AttachVolume.
    pub fn attach_volume(self: &Arc<Self>, r: pb::AttachVolumeRequest) -> Result<pb::Attachment> {
        self.attach(r, false)
    }

    /// Attaches; with `allow_missing`, a block volume whose device is absent is recorded
    /// attached anyway (its export starts when the device appears) instead of refused.
    fn attach(
        self: &Arc<Self>,
        r: pb::AttachVolumeRequest,
        allow_missing: bool,
    ) -> Result<pb::Attachment> {
        check_name("pool", &r.pool)?;
        check_name("volume", &r.name)?;
        let lbs = match r.logical_block_size {
            0 => 512,
            v @ (512 | 4096) => v,
            v => {
                return Err(Error::InvalidArgument(format!(
                    "logical block size {v} is not 512 or 4096"
                )))
            }
        };
        let num_queues = match r.num_queues {
            0 => self.export_defaults.num_queues,
            n @ 1..=64 => n as u16,
            n => {
                return Err(Error::InvalidArgument(format!(
                    "{n} queues is not within 1..=64"
                )))
            }
        };
        let queue_size = match r.queue_size {
            0 => self.export_defaults.queue_size,
            n if n.is_power_of_two() && n <= 32768 => n as u16,
            n => {
                return Err(Error::InvalidArgument(format!(
                    "queue size {n} is not a power of two up to 32768"
                )))
            }
        };
        let (pool, name) = (r.pool.as_str(), r.name.as_str());
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        self.pool(pool)?;
        let mut rec = self
            .record(pool, name)
            .ok_or_else(|| Error::NotFound(format!("volume {pool}/{name} does not exist")))?;
        if rec.state != VolState::Ready {
            return Err(Error::FailedPrecondition(format!(
                "volume {pool}/{name} is not ready"
            )));
        }
        if let Some(a) = rec.attachment.as_ref().filter(|a| a.failed.is_some()) {
            // The export stopped on its own: this attach replaces it.
            tracing::info!(
                pool,
                volume = name,
                reason = a.failed.as_deref().unwrap_or(""),
                "re-attaching a volume whose export had failed"
            );
            rec.attachment = None;
        }
        if let Some(a) = &rec.attachment {
            if a.logical_block_size == lbs
                && a.read_only == r.read_only
                && a.num_queues == num_queues
                && a.queue_size == queue_size
            {
                return Ok(self.attachment_pb(&rec, a));
            }
            return Err(Error::AlreadyExists(format!(
                "volume {pool}/{name} is attached with other parameters"
            )));
        }
        let mut missing = false;
        if self.is_block_pool(pool) {
            match self.locate_backing(&mut rec)? {
                Located::Here | Located::Unidentified => {}
                Located::Absent if allow_missing => missing = true,
                Located::Moved(from) => {
                    tracing::warn!(pool, volume = name, from = %from.display(), to = %rec.path.display(),
                        "backing device found under a new name");
                    self.put_record(&rec)?;
                }
                Located::Absent => {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {pool}/{name}: its backing device ({}) is not present",
                        rec.identity
                            .as_ref()
                            .map(|i| i.to_string())
                            .unwrap_or_default()
                    )))
                }
            }
        }
        let a = AttachRecord {
            socket: self.export_dir.join(format!("{}.sock", rec.uuid)),
            logical_block_size: lbs,
            read_only: r.read_only,
            num_queues,
            queue_size,
            attached_unix_ms: now_ms(),
            failed: None,
        };
        if missing {
            tracing::warn!(
                pool,
                volume = name,
                "backing device absent: attached, the export waits for it"
            );
        } else {
            self.start_export(&rec, &a)?;
        }
        rec.attachment = Some(a.clone());
        if let Err(e) = self.put_record(&rec) {
            self.stop_export(pool, name);
            return Err(e);
        }
        self.emit(
            pool,
            name,
            pb::event::Kind::Hotplug(pb::Hotplug {
                attached: true,
                socket_path: a.socket.display().to_string(),
            }),
        );
        tracing::info!(pool, volume = name, socket = %a.socket.display(), "volume attached");
        Ok(self.attachment_pb(&rec, &a))
    }

    fn start_export(self: &Arc<Self>, rec: &VolumeRecord, a: &AttachRecord) -> Result<()> {
        let params = ExportParams {
            volume: rec.path.clone(),
            socket: a.socket.clone(),
            logical_block_size: a.logical_block_size,
            read_only: a.read_only,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            serial: serial(&rec.uuid),
            direct_io: self.export_defaults.direct_io,
            io_timeout_ms: self.export_defaults.io_timeout_ms,
            // Validated with the configuration.
            socket_access: self.export_defaults.socket_access().unwrap_or_default(),
        };
        let id = {
            let mut inner = self.lock();
            inner.next_export_id += 1;
            inner.next_export_id
        };
        let weak = Arc::downgrade(self);
        let (pool, name) = (rec.pool.clone(), rec.name.clone());
        let on_exit = Box::new(move |err: Option<String>| {
            if let (Some(d), Some(message)) = (weak.upgrade(), err) {
                d.export_failed(&pool, &name, id, &message);
            }
        });
        let weak = Arc::downgrade(self);
        let (pool, name) = (rec.pool.clone(), rec.name.clone());
        let events: EventSink = Arc::new(move |e: &BackendEvent| {
            if let Some(d) = weak.upgrade() {
                d.backend_event(&pool, &name, e);
            }
        });
        let h = self
            .exporter
            .start(&params, on_exit, events)
            .map_err(|source| Error::Export {
                path: rec.path.clone(),
                source,
            })?;
        let mut inner = self.lock();
        inner.removed.remove(&key(&rec.pool, &rec.name));
        inner.export_ids.insert(key(&rec.pool, &rec.name), id);
        inner
            .exports
            .insert(key(&rec.pool, &rec.name), Arc::from(h));
        Ok(())
    }

    /// An export stopped on its own with an error (on its own thread, as it ends): the
    /// attachment is recorded failed with the reason, Watch is told, and the export is
    /// forgotten, so a new Attach starts another without a Detach.
    fn export_failed(&self, pool: &str, name: &str, id: u64, message: &str) {
        let k = key(pool, name);
        let deadline = Instant::now() + Duration::from_secs(60);
        // An operation on the volume (detach, attach) may hold it: it forgets this
        // export first (then this report is stale) or finishes soon.
        let _g = loop {
            if self.lock().export_ids.get(&k) != Some(&id) {
                return;
            }
            match self.begin(vkey(pool, name), &format!("volume {pool}/{name}")) {
                Ok(g) => break g,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    tracing::error!(pool, volume = name, error = %e.chain(),
                        "cannot record a failed export");
                    return;
                }
            }
        };
        {
            let mut inner = self.lock();
            if inner.export_ids.get(&k) != Some(&id) {
                return;
            }
            inner.export_ids.remove(&k);
            inner.exports.remove(&k);
            inner.removed.remove(&k);
        }
        tracing::error!(
            pool,
            volume = name,
            reason = message,
            "export stopped on its own"
        );
        if let Some(mut rec) = self.record(pool, name) {
            if let Some(a) = rec.attachment.as_mut() {
                a.failed = Some(message.to_owned());
                if let Err(e) = self.put_record(&rec) {
                    tracing::error!(pool, volume = name, error = %e.chain(),
                        "cannot record the failed export");
                }
            }
        }
        self.emit(
            pool,
            name,
            pb::event::Kind::ExportError(pb::ExportError {
                message: message.to_owned(),
            }),
        );
    }

    fn stop_export(&self, pool: &str, name: &str) {
        let h = {
            let mut inner = self.lock();
            inner.removed.remove(&key(pool, name));
            inner.export_ids.remove(&key(pool, name));
            inner.exports.remove(&key(pool, name))
        };
        if let Some(h) = h {
            h.stop();
        }
    }

    /// DetachVolume: returns whether it was attached.
    pub fn detach_volume(&self, pool: &str, name: &str) -> Result<bool> {
        check_name("pool", pool)?;
        check_name("volume", name)?;
        let _g = self.begin(vkey(pool, name), &format!("volume {pool}/{name}"))?;
        let Some(mut rec) = self.record(pool, name) else {
            return Ok(false);
        };
        let Some(a) = rec.attachment.take() else {
            return Ok(false);
        };
        self.stop_export(pool, name);
        let _ = fs::remove_file(&a.socket);
        self.put_record(&rec)?;
        self.emit(
            pool,
            name,
            pb::event::Kind::Hotplug(pb::Hotplug {
                attached: false,
                socket_path: a.socket.display().to_string(),
            }),
        );
        tracing::info!(pool, volume = name, "volume detached");
        Ok(true)
    }

    /// Stops every export (daemon shutdown); the records keep them attached so they are
    /// exported again at the next start.
    pub fn shutdown(&self) {
        let all: Vec<Arc<dyn ExportHandle>> = {
            let mut inner = self.lock();
            inner.export_ids.clear();
            inner.exports.drain().map(|(_, h)| h).collect()
        };
        for h in all {
            h.stop();
        }
    }

    /// Attaches (exports) every volume the configuration lists that is not attached yet.
    /// Called once at startup, after [`Driver::open`] and before the hotplug monitor
    /// starts. A block volume whose device is absent is attached "missing": its export
    /// starts when the device appears. A listed volume that cannot be attached is logged;
    /// the others still are.
    pub fn apply_configured_attachments(self: &Arc<Self>) {
        for c in self.config_attachments.clone() {
            let r = pb::AttachVolumeRequest {
                pool: c.pool.clone(),
                name: c.volume.clone(),
                logical_block_size: c.logical_block_size,
                read_only: c.read_only,
                num_queues: c.num_queues,
                queue_size: c.queue_size,
            };
            match self.attach(r, true) {
                Ok(a) => {
                    tracing::info!(pool = %c.pool, volume = %c.volume, socket = %a.socket_path,
                        "configured attachment exported")
                }
                Err(e) => {
                    tracing::error!(pool = %c.pool, volume = %c.volume, error = %e.chain(),
                        "configured attachment failed")
                }
            }
        }
    }

    // ------------------------------------------------------------------ hotplug

    fn is_block_pool(&self, pool: &str) -> bool {
        self.lock()
            .pools
            .get(pool)
            .is_some_and(|p| matches!(p.kind, PoolKind::Block { .. }))
    }

    /// Finds a block volume's device by its identity: records the identity if the record
    /// has none yet (records written before identities were), and follows the device to a
    /// new name when the old path is gone or holds another device.
    fn locate_backing(&self, rec: &mut VolumeRecord) -> Result<Located> {
        let here = self.sysfs.identity_of_path(&rec.path);
        let Some(want) = rec.identity.clone() else {
            if here.is_none() {
                return Ok(Located::Unidentified);
            }
            rec.identity = here;
            self.put_record(rec)?;
            return Ok(Located::Here);
        };
        if here.as_ref().is_some_and(|h| h.same_device(&want)) {
            return Ok(Located::Here);
        }
        let present = self
            .sysfs
            .block_devs()
            .map_err(Error::io("listing", "/sys/class/block"))?;
        let found = self.taints.filter(present).into_iter().find(|d| {
            d.size_bytes >= rec.size_bytes
                && d.identity.as_ref().is_some_and(|i| i.same_device(&want))
        });
        match found {
            Some(d) => {
                let from = std::mem::replace(&mut rec.path, d.devnode);
                Ok(Located::Moved(from))
            }
            None => Ok(Located::Absent),
        }
    }

    pub(crate) fn hotplug_taints(&self) -> &Taints {
        &self.taints
    }

    /// The attached volumes of block pools whose device has an identity, for
    /// [`crate::hotplug::reconcile`].
    pub(crate) fn hotplug_tracked(&self, sysfs: &Sysfs) -> Vec<Tracked> {
        let (recs, exports): (Vec<VolumeRecord>, HashMap<_, _>) = {
            let inner = self.lock();
            let recs = inner
                .volumes
                .values()
                .filter(|v| v.attachment.is_some() && v.identity.is_some())
                .filter(|v| {
                    inner
                        .pools
                        .get(&v.pool)
                        .is_some_and(|p| matches!(p.kind, PoolKind::Block { .. }))
                })
                .cloned()
                .collect();
            (recs, inner.exports.clone())
        };
        recs.into_iter()
            .filter_map(|r| {
                let state = match exports.get(&key(&r.pool, &r.name)) {
                    None => TrackedState::Missing,
                    Some(h) if h.state() == BackendState::Removed => TrackedState::Removed,
                    Some(_) => TrackedState::Active,
                };
                Some(Tracked {
                    current: sysfs.name_of_path(&r.path),
                    identity: r.identity?,
                    size_bytes: r.size_bytes,
                    state,
                    pool: r.pool,
                    volume: r.name,
                })
            })
            .collect()
    }

    /// Carries out one hotplug decision; false if the volume was busy (try again later).
    pub(crate) fn hotplug_apply(self: &Arc<Self>, d: &Decision, sysfs: &Sysfs) -> bool {
        let (pool, name) = match d {
            Decision::Remove { pool, volume, .. }
            | Decision::Resume { pool, volume, .. }
            | Decision::Start { pool, volume, .. } => (pool.as_str(), volume.as_str()),
        };
        let Ok(_g) = self.begin(vkey(pool, name), &format!("volume {pool}/{name}")) else {
            tracing::info!(
                pool,
                volume = name,
                "volume busy: hotplug decision deferred"
            );
            return false;
        };
        let Some(mut rec) = self.record(pool, name) else {
            return true;
        };
        if rec.attachment.is_none() {
            return true;
        }
        let h = self.lock().exports.get(&key(pool, name)).cloned();
        match (d, h) {
            (Decision::Remove { reason, .. }, Some(h)) => {
                tracing::warn!(pool, volume = name, device = %rec.path.display(), reason, "backing device removed");
                self.note_removed(pool, name, reason, &rec.path);
                h.remove(reason);
            }
            (Decision::Resume { device, .. }, Some(h)) => {
                // The record names the new device before the export serves it, so
                // whoever hears of the resume finds the record already up to date.
                let previous = std::mem::replace(&mut rec.path, device.clone());
                if let Err(e) = self.put_record(&rec) {
                    tracing::error!(pool, volume = name, error = %e.chain(), "recording the new device path");
                    return true;
                }
                if let Err(e) = h.resume(device) {
                    tracing::error!(pool, volume = name, device = %device.display(), error = format!("{e:#}"),
                        "resuming on the returned device failed");
                    rec.path = previous;
                    if let Err(e) = self.put_record(&rec) {
                        tracing::error!(pool, volume = name, error = %e.chain(), "restoring the device path");
                    }
                    // Not this device, for now: wait for it to change.
                    if let Some(n) = sysfs.name_of_path(device) {
                        let seq = sysfs.block_dev(&n).and_then(|b| b.diskseq);
                        self.taints.taint(&n, seq);
                    }
                    return true;
                }
                tracing::info!(pool, volume = name, device = %device.display(),
                    previous = %previous.display(), "backing device back: export resumed");
                self.note_resumed(pool, name, device);
            }
            (Decision::Start { device, .. }, None) => {
                let previous = std::mem::replace(&mut rec.path, device.clone());
                let a = rec.attachment.clone().unwrap_or_else(|| unreachable!());
                match self.start_export(&rec, &a) {
                    Ok(()) => {
                        if let Err(e) = self.put_record(&rec) {
                            tracing::error!(pool, volume = name, error = %e.chain(), "recording the new device path");
                        }
                        tracing::info!(pool, volume = name, device = %device.display(),
                            "backing device appeared: export started");
                        self.emit(
                            pool,
                            name,
                            pb::event::Kind::BackendResumed(pb::BackendResumed {
                                device: device.display().to_string(),
                                previous_device: previous.display().to_string(),
                            }),
                        );
                    }
                    Err(e) => tracing::error!(pool, volume = name, error = %e.chain(),
                        "starting the export on the appeared device failed"),
                }
            }
            // The export went away (detach) or appeared meanwhile: the next pass decides.
            _ => {}
        }
        true
    }

    /// Records (once) that a volume's backing is removed, and tells Watch.
    fn note_removed(&self, pool: &str, name: &str, reason: &str, device: &Path) -> bool {
        let first = self
            .lock()
            .removed
            .insert(key(pool, name), (reason.to_owned(), device.to_owned()))
            .is_none();
        if first {
            self.emit(
                pool,
                name,
                pb::event::Kind::BackendRemoved(pb::BackendRemoved {
                    reason: reason.to_owned(),
                    device: device.display().to_string(),
                }),
            );
        }
        first
    }

    /// Records (once) that a volume's backing is served again, and tells Watch.
    fn note_resumed(&self, pool: &str, name: &str, device: &Path) {
        let was = self.lock().removed.remove(&key(pool, name));
        if let Some((_, previous)) = was {
            self.emit(
                pool,
                name,
                pb::event::Kind::BackendResumed(pb::BackendResumed {
                    device: device.display().to_string(),
                    previous_device: previous.display().to_string(),
                }),
            );
        }
    }

    /// An export's own report (on the export's threads).
    fn backend_event(&self, pool: &str, name: &str, e: &BackendEvent) {
        match e {
            BackendEvent::Removed { reason } => {
                let Some(rec) = self.record(pool, name) else {
                    return;
                };
                if self.note_removed(pool, name, reason, &rec.path) {
                    // The export found out by itself (its I/O failed with ENODEV/ENXIO):
                    // the device at its path counts as gone until it gets a new medium.
                    tracing::warn!(pool, volume = name, device = %rec.path.display(), reason,
                        "export reports its volume removed");
                    if let Some(n) = self.sysfs.name_of_path(&rec.path) {
                        let seq = self.sysfs.block_dev(&n).and_then(|b| b.diskseq);
                        self.taints.taint(&n, seq);
                    }
                }
            }
            BackendEvent::Resumed { volume } => self.note_resumed(pool, name, volume),
            BackendEvent::TimedOut { requests } => {
                tracing::warn!(
                    pool,
                    volume = name,
                    requests,
                    "requests failed by the I/O timeout"
                );
                self.emit(
                    pool,
                    name,
                    pb::event::Kind::IoTimeout(pb::IoTimeout {
                        requests: *requests,
                    }),
                );
            }
            BackendEvent::Connected => tracing::info!(pool, volume = name, "frontend connected"),
            BackendEvent::Disconnected => {
                tracing::info!(pool, volume = name, "frontend disconnected")
            }
        }
    }

    /// An attachment's backend state for the API, with the removal reason.
    fn backend_state(&self, pool: &str, name: &str) -> (pb::BackendState, String) {
        if let Some(why) = self
            .record(pool, name)
            .and_then(|r| r.attachment)
            .and_then(|a| a.failed)
        {
            return (pb::BackendState::Failed, why);
        }
        let inner = self.lock();
        let k = key(pool, name);
        if !inner.exports.contains_key(&k) {
            return (pb::BackendState::Missing, String::new());
        }
        match (
            inner.removed.get(&k),
            inner.exports.get(&k).map(|h| h.state()),
        ) {
            (Some((r, _)), _) => (pb::BackendState::Removed, r.clone()),
            (None, Some(BackendState::Removed)) => (pb::BackendState::Removed, String::new()),
            (None, _) => (pb::BackendState::Active, String::new()),
        }
    }

    // ------------------------------------------------------------------ images

    fn image_pool(&self, pool: &str) -> Result<(String, PathBuf)> {
        let inner = self.lock();
        let name = if pool.is_empty() {
            match inner.pools.get(DEFAULT_POOL) {
                Some(e) if matches!(e.kind, PoolKind::Dir { .. }) => DEFAULT_POOL.to_owned(),
                _ => inner
                    .pools
                    .iter()
                    .find(|(_, e)| matches!(e.kind, PoolKind::Dir { .. }))
                    .map(|(n, _)| n.clone())
                    .ok_or_else(|| {
                        Error::FailedPrecondition("no dir pool to cache images in".into())
                    })?,
            }
        } else {
            check_name("pool", pool)?;
            pool.to_owned()
        };
        match inner.pools.get(&name).map(|e| &e.kind) {
            Some(PoolKind::Dir { path, .. }) => Ok((name, path.clone())),
            Some(_) => Err(Error::InvalidArgument(format!(
                "pool {name:?} is a block pool: images are cached in dir pools"
            ))),
            None => Err(Error::NotFound(format!("pool {name:?} does not exist"))),
        }
    }

    fn image_pb(r: &ImageRecord) -> pb::CachedImage {
        pb::CachedImage {
            pool: r.pool.clone(),
            fingerprint: r.fingerprint.clone(),
            size_bytes: r.size_bytes,
            path: r.path.display().to_string(),
            created_unix_ms: r.created_unix_ms,
        }
    }

    /// ImportImage.
    pub fn import_image(&self, r: pb::ImportImageRequest) -> Result<pb::ImportImageResponse> {
        check_fingerprint(&r.fingerprint)?;
        let f = r
            .image
            .ok_or_else(|| Error::InvalidArgument("image is required".into()))?;
        check_image_path("image", &f.path)?;
        let metadata = if f.metadata_path.is_empty() {
            None
        } else {
            check_image_path("metadata tarball", &f.metadata_path)?;
            Some(PathBuf::from(&f.metadata_path))
        };
        let (pool, dir) = self.image_pool(&r.pool)?;
        let fp = r.fingerprint.as_str();
        let _g = self.begin(ikey(&pool, fp), &format!("image {fp}"))?;
        if let Some(img) = self.lock().images.get(&key(&pool, fp)) {
            return Ok(pb::ImportImageResponse {
                image: Some(Self::image_pb(img)),
                unpacked: false,
            });
        }
        let pe = self.pool(&pool)?;
        let image = PathBuf::from(&f.path);
        let rep = image_unpack::inspect(&image).map_err(|source| Error::Unpack {
            step: "inspecting",
            path: image.clone(),
            source: Box::new(source),
        })?;
        let size = round_up(rep.size);
        // The quota check and the reservation are one step: two imports must not both
        // fit in the space of one.
        let _reservation = {
            let _alloc = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
            self.quota_check(&pool, &pe, size)?;
            let k = key(&pool, fp);
            self.lock().reserved.insert(k.clone(), size);
            Reservation {
                driver: self,
                key: k,
            }
        };
        let idir = dir.join("images");
        let final_path = idir.join(format!("{fp}.img"));
        let tmp = idir.join(format!("{TMP_PREFIX}{fp}-{}.img", uuid::Uuid::new_v4()));
        let progress = EventProgress::new(self, &pool, fp, "import");
        let run = || -> Result<()> {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(Error::io("creating", &tmp))?;
            f.set_len(size).map_err(Error::io("sizing", &tmp))?;
            drop(f);
            let _ = fs::create_dir_all(self.state_dir.join("scratch"));
            let o = UnpackOptions {
                metadata,
                scratch_dir: Some(self.state_dir.join("scratch")),
                ..UnpackOptions::default()
            };
            image_unpack::unpack(&image, &tmp, &o, &progress).map_err(|source| Error::Unpack {
                step: "unpacking image onto",
                path: tmp.clone(),
                source: Box::new(source),
            })?;
            File::options()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(Error::io("syncing", &tmp))?;
            fs::rename(&tmp, &final_path).map_err(Error::io("renaming", &tmp))?;
            sys::fsync_dir(&idir).map_err(Error::io("syncing", &idir))
        };
        if let Err(e) = run() {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let rec = ImageRecord {
            pool: pool.clone(),
            fingerprint: fp.to_owned(),
            size_bytes: size,
            path: final_path,
            created_unix_ms: now_ms(),
        };
        self.store.put_image(&rec)?;
        self.lock().images.insert(key(&pool, fp), rec.clone());
        tracing::info!(pool, fingerprint = fp, size, "image cached");
        Ok(pb::ImportImageResponse {
            image: Some(Self::image_pb(&rec)),
            unpacked: true,
        })
    }

    /// ListImages.
    pub fn list_images(&self, pool: &str) -> Result<Vec<pb::CachedImage>> {
        if !pool.is_empty() {
            check_name("pool", pool)?;
            self.pool(pool)?;
        }
        Ok(self
            .lock()
            .images
            .values()
            .filter(|i| pool.is_empty() || i.pool == pool)
            .map(Self::image_pb)
            .collect())
    }

    /// DeleteImage: returns whether it existed.
    pub fn delete_image(&self, pool: &str, fp: &str) -> Result<bool> {
        check_fingerprint(fp)?;
        let (pool, _) = self.image_pool(pool)?;
        let _g = self.begin(ikey(&pool, fp), &format!("image {fp}"))?;
        let Some(rec) = self.lock().images.get(&key(&pool, fp)).cloned() else {
            return Ok(false);
        };
        self.store.remove_image(&pool, fp)?;
        self.lock().images.remove(&key(&pool, fp));
        let _ = fs::remove_file(&rec.path);
        Ok(true)
    }

    // ------------------------------------------------------------------ recovery

    fn recover_volumes(self: &Arc<Self>) -> Result<()> {
        for mut rec in self.store.volumes()? {
            match rec.state {
                VolState::Creating | VolState::Deleting => {
                    tracing::warn!(pool = %rec.pool, volume = %rec.name, state = ?rec.state,
                        "removing a volume interrupted while {}",
                        if rec.state == VolState::Creating { "being created" } else { "being deleted" });
                    if rec.state == VolState::Creating && rec.temp_path.is_some() {
                        // The final name may exist if the crash came after the rename.
                        let _ = fs::remove_file(&rec.path);
                    }
                    self.discard_data(&rec);
                    self.store.remove_volume(&rec.pool, &rec.name)?;
                    continue;
                }
                VolState::Growing => {
                    rec.size_bytes = fs::metadata(&rec.path)
                        .map(|m| m.len())
                        .unwrap_or(rec.size_bytes);
                    rec.state = VolState::Ready;
                    tracing::warn!(pool = %rec.pool, volume = %rec.name, size = rec.size_bytes,
                        "grow was interrupted; run GrowVolume again to repair the partition table");
                    self.store.put_volume(&rec)?;
                }
                VolState::Ready => {}
            }
            self.lock()
                .volumes
                .insert(key(&rec.pool, &rec.name), rec.clone());
            if let Some(a) = rec.attachment.clone() {
                if let Some(why) = &a.failed {
                    tracing::warn!(pool = %rec.pool, volume = %rec.name, reason = %why,
                        "not re-exporting: the export had stopped on its own; attach again or detach");
                    continue;
                }
                if self.is_block_pool(&rec.pool) {
                    match self.locate_backing(&mut rec) {
                        Ok(Located::Here) | Ok(Located::Unidentified) => {}
                        Ok(Located::Moved(from)) => {
                            tracing::warn!(pool = %rec.pool, volume = %rec.name, from = %from.display(),
                                to = %rec.path.display(), "backing device found under a new name");
                            self.put_record(&rec)?;
                        }
                        Ok(Located::Absent) => {
                            // Keep the attachment: the export starts when the device
                            // appears (hotplug), on the same socket.
                            tracing::warn!(pool = %rec.pool, volume = %rec.name,
                                identity = %rec.identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                                "backing device absent: the export waits for it");
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(pool = %rec.pool, volume = %rec.name, error = %e.chain(),
                            "recording the backing device's identity")
                        }
                    }
                }
                if let Err(e) = self.start_export(&rec, &a) {
                    tracing::error!(pool = %rec.pool, volume = %rec.name, error = %e.chain(),
                        "re-exporting an attached volume failed; marking it detached");
                    rec.attachment = None;
                    self.put_record(&rec)?;
                } else {
                    tracing::info!(pool = %rec.pool, volume = %rec.name, "re-exported attached volume");
                }
            }
        }
        Ok(())
    }

    fn recover_images(&self) -> Result<()> {
        for rec in self.store.images()? {
            if !rec.path.is_file() {
                tracing::warn!(fingerprint = %rec.fingerprint, "cached image file missing; forgetting it");
                self.store.remove_image(&rec.pool, &rec.fingerprint)?;
                continue;
            }
            self.lock()
                .images
                .insert(key(&rec.pool, &rec.fingerprint), rec);
        }
        Ok(())
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

/// Turns unpack progress into Watch events (throttled), and hosts the mid-copy test pause.
struct EventProgress<'a> {
    driver: &'a Driver,
    pool: &'a str,
    name: &'a str,
    operation: &'static str,
    phase: Mutex<(String, u64, Instant)>,
}

impl<'a> EventProgress<'a> {
    fn new(driver: &'a Driver, pool: &'a str, name: &'a str, operation: &'static str) -> Self {
        EventProgress {
            driver,
            pool,
            name,
            operation,
            phase: Mutex::new((String::new(), 0, Instant::now())),
        }
    }

    fn send(&self, phase: &str, done: u64, total: u64) {
        self.driver.emit(
            self.pool,
            self.name,
            pb::event::Kind::Progress(pb::Progress {
                operation: self.operation.into(),
                phase: phase.into(),
                done_bytes: done,
                total_bytes: total,
            }),
        );
    }
}

impl Progress for EventProgress<'_> {
    fn phase(&self, name: &str, total: Option<u64>) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        *p = (name.to_owned(), total.unwrap_or(0), Instant::now());
        tracing::info!(
            pool = self.pool,
            name = self.name,
            op = self.operation,
            phase = name,
            total,
            "progress"
        );
        self.send(name, 0, total.unwrap_or(0));
        drop(p);
        if self.operation == "create" && name == "verify" {
            // Partition work and verification run through the loop bridge on devices
            // whose sector size differs from the image's.
            self.driver.pause("verify");
        }
    }

    fn advance(&self, done: u64) {
        let (phase, total) = {
            let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            let due = p.2.elapsed() >= Duration::from_millis(200) || (p.1 > 0 && done >= p.1);
            if !due {
                (None, p.1)
            } else {
                p.2 = Instant::now();
                (Some(p.0.clone()), p.1)
            }
        };
        if let Some(phase) = &phase {
            self.send(phase, done, total);
        }
        if self.operation == "create" && total > 0 && done.saturating_mul(2) >= total {
            let is_copy = self.phase.lock().map(|p| p.0 == "copy").unwrap_or(false);
            if is_copy {
                self.driver.pause("copy-midway");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The driver in-process with a fake exporter: the attach/detach paths, restart
    //! re-exports, export failures as events and as INTERNAL.

    use super::*;
    use crate::export::FakeExporter;

    fn open(dir: &Path, fake: &FakeExporter) -> Arc<Driver> {
        Driver::open(DriverParams {
            state_dir: dir.join("state"),
            export_dir: dir.join("exports"),
            config: Config::default(),
            exporter: Box::new(fake.clone()),
            pause_at: None,
            pause_marker: None,
        })
        .unwrap()
    }

    fn empty(name: &str) -> pb::CreateVolumeRequest {
        pb::CreateVolumeRequest {
            pool: DEFAULT_POOL.into(),
            name: name.into(),
            size_bytes: 1 << 20,
            origin: None,
            grow_last_partition: false,
        }
    }

    fn attach(name: &str) -> pb::AttachVolumeRequest {
        pb::AttachVolumeRequest {
            pool: DEFAULT_POOL.into(),
            name: name.into(),
            logical_block_size: 0,
            read_only: true,
            num_queues: 2,
            queue_size: 0,
        }
    }

    #[test]
    fn attach_starts_one_export_with_the_requested_parameters() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        let v = d.create_volume(empty("a")).unwrap();
        let a = d.attach_volume(attach("a")).unwrap();
        let running = fake.running.lock().unwrap().clone();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].volume, PathBuf::from(&v.path));
        assert_eq!(running[0].socket, PathBuf::from(&a.socket_path));
        assert_eq!(
            (running[0].logical_block_size, running[0].num_queues),
            (512, 2)
        );
        assert!(running[0].read_only);
        assert_eq!(running[0].serial.len(), 20);
        // Same parameters: no second export.
        d.attach_volume(attach("a")).unwrap();
        assert_eq!(fake.running.lock().unwrap().len(), 1);
        assert!(d.detach_volume(DEFAULT_POOL, "a").unwrap());
        assert!(fake.running.lock().unwrap().is_empty());
    }

    #[test]
    fn attached_volumes_are_exported_again_after_a_restart() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        d.attach_volume(attach("a")).unwrap();
        drop(d);
        let fake2 = FakeExporter::default();
        let d2 = open(t.path(), &fake2);
        assert_eq!(fake2.running.lock().unwrap().len(), 1);
        assert!(d2
            .get_volume(DEFAULT_POOL, "a")
            .unwrap()
            .attachment
            .is_some());
    }

    #[test]
    fn a_failed_re_export_marks_the_volume_detached() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        d.attach_volume(attach("a")).unwrap();
        drop(d);
        let broken = FakeExporter::default();
        *broken.fail_start.lock().unwrap() = Some("socket busy".into());
        let d2 = open(t.path(), &broken);
        assert!(d2
            .get_volume(DEFAULT_POOL, "a")
            .unwrap()
            .attachment
            .is_none());
    }

    #[test]
    fn export_start_failure_is_internal_and_leaves_the_volume_detached() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        *fake.fail_start.lock().unwrap() = Some("no vhost".into());
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        let e = d.attach_volume(attach("a")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        assert!(e.chain().contains("no vhost"), "{}", e.chain());
        assert!(d
            .get_volume(DEFAULT_POOL, "a")
            .unwrap()
            .attachment
            .is_none());
    }

    #[test]
    fn a_failing_export_is_reported_on_watch() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        let mut rx = d.subscribe();
        d.attach_volume(attach("a")).unwrap();
        fake.fail_running("guest memory mapping failed");
        let mut kinds = Vec::new();
        while let Ok(e) = rx.try_recv() {
            kinds.push(e.kind);
        }
        assert!(matches!(kinds.first(), Some(Some(pb::event::Kind::Hotplug(h))) if h.attached));
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, Some(pb::event::Kind::ExportError(e))
                if e.message.contains("guest memory"))),
            "{kinds:?}"
        );
    }

    #[test]
    fn a_busy_volume_refuses_other_operations_with_aborted() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        let _g = d.begin(vkey(DEFAULT_POOL, "a"), "a").unwrap();
        for e in [
            d.delete_volume(DEFAULT_POOL, "a").unwrap_err(),
            d.attach_volume(attach("a")).unwrap_err(),
            d.create_volume(empty("a")).unwrap_err(),
        ] {
            assert_eq!(e.code(), tonic::Code::Aborted);
        }
    }

    fn backend_kinds(rx: &mut broadcast::Receiver<pb::Event>) -> Vec<pb::event::Kind> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            match e.kind {
                Some(k @ pb::event::Kind::BackendRemoved(_))
                | Some(k @ pb::event::Kind::BackendResumed(_))
                | Some(k @ pb::event::Kind::IoTimeout(_)) => out.push(k),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn an_export_that_reports_its_volume_removed_is_shown_removed_once_then_resumed() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        let a = d.attach_volume(attach("a")).unwrap();
        assert_eq!(a.backend_state, pb::BackendState::Active as i32);
        let mut rx = d.subscribe();
        let x = fake.export(Path::new(&a.socket_path)).unwrap();
        x.fail_io("I/O failed: No such device");
        x.fail_io("I/O failed: No such device");
        let v = d.get_volume(DEFAULT_POOL, "a").unwrap();
        let att = v.attachment.unwrap();
        assert_eq!(att.backend_state, pb::BackendState::Removed as i32);
        assert!(att.backend_removed_reason.contains("No such device"));
        let k = backend_kinds(&mut rx);
        assert!(
            matches!(&k[..], [pb::event::Kind::BackendRemoved(r)] if r.device == v.path),
            "{k:?}"
        );
        // The export comes back by itself (e.g. resumed through the export's own API).
        *x.state.lock().unwrap() = (BackendState::Active, PathBuf::from(&v.path));
        (x.events)(&BackendEvent::Resumed {
            volume: PathBuf::from(&v.path),
        });
        (x.events)(&BackendEvent::TimedOut { requests: 3 });
        let k = backend_kinds(&mut rx);
        assert!(
            matches!(&k[..], [pb::event::Kind::BackendResumed(r), pb::event::Kind::IoTimeout(t)]
                if r.device == v.path && t.requests == 3),
            "{k:?}"
        );
        let att = d.get_volume(DEFAULT_POOL, "a").unwrap().attachment.unwrap();
        assert_eq!(att.backend_state, pb::BackendState::Active as i32);
    }

    #[test]
    fn hotplug_decisions_remove_and_resume_the_export_on_the_new_path() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        let v = d.create_volume(empty("a")).unwrap();
        let a = d.attach_volume(attach("a")).unwrap();
        let x = fake.export(Path::new(&a.socket_path)).unwrap();
        let mut rx = d.subscribe();
        let sysfs = Sysfs::new(t.path().join("no-sysfs"));
        let (pool, volume) = (DEFAULT_POOL.to_owned(), "a".to_owned());
        assert!(d.hotplug_apply(
            &Decision::Remove {
                pool: pool.clone(),
                volume: volume.clone(),
                reason: "the backing device was removed".into()
            },
            &sysfs
        ));
        assert_eq!(x.backend().0, BackendState::Removed);
        let moved = t.path().join("moved.img");
        assert!(d.hotplug_apply(
            &Decision::Resume {
                pool: pool.clone(),
                volume: volume.clone(),
                device: moved.clone()
            },
            &sysfs
        ));
        assert_eq!(x.backend(), (BackendState::Active, moved.clone()));
        let k = backend_kinds(&mut rx);
        assert!(
            matches!(&k[..], [pb::event::Kind::BackendRemoved(_), pb::event::Kind::BackendResumed(r)]
                if r.device == moved.display().to_string() && r.previous_device == v.path),
            "{k:?}"
        );
        // The record follows the device, across a restart too.
        assert_eq!(
            d.get_volume(DEFAULT_POOL, "a").unwrap().path,
            moved.display().to_string()
        );
        drop(d);
        let d2 = open(t.path(), &FakeExporter::default());
        assert_eq!(
            d2.get_volume(DEFAULT_POOL, "a").unwrap().path,
            moved.display().to_string()
        );
    }

    #[test]
    fn a_failed_resume_leaves_the_export_removed_and_a_busy_volume_defers() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        let v = d.create_volume(empty("a")).unwrap();
        let a = d.attach_volume(attach("a")).unwrap();
        let x = fake.export(Path::new(&a.socket_path)).unwrap();
        let sysfs = Sysfs::new(t.path().join("no-sysfs"));
        let remove = Decision::Remove {
            pool: DEFAULT_POOL.into(),
            volume: "a".into(),
            reason: "gone".into(),
        };
        {
            let _g = d.begin(vkey(DEFAULT_POOL, "a"), "a").unwrap();
            assert!(!d.hotplug_apply(&remove, &sysfs), "busy: deferred");
        }
        assert_eq!(x.backend().0, BackendState::Active);
        assert!(d.hotplug_apply(&remove, &sysfs));
        *fake.fail_resume.lock().unwrap() = Some("volume too small".into());
        let resume = Decision::Resume {
            pool: DEFAULT_POOL.into(),
            volume: "a".into(),
            device: t.path().join("other.img"),
        };
        assert!(d.hotplug_apply(&resume, &sysfs));
        assert_eq!(x.backend().0, BackendState::Removed);
        assert_eq!(d.get_volume(DEFAULT_POOL, "a").unwrap().path, v.path);
    }

    #[test]
    fn configured_attachments_are_exported_at_startup_and_missing_ones_are_skipped() {
        let t = tempfile::tempdir().unwrap();
        let fake = FakeExporter::default();
        let d = open(t.path(), &fake);
        d.create_volume(empty("a")).unwrap();
        drop(d);
        let mut config = Config::default();
        for v in ["ghost", "a"] {
            config.attachments.push(AttachmentConfig {
                pool: DEFAULT_POOL.into(),
                volume: v.into(),
                logical_block_size: 4096,
                read_only: false,
                num_queues: 0,
                queue_size: 0,
            });
        }
        let fake2 = FakeExporter::default();
        let d2 = Driver::open(DriverParams {
            state_dir: t.path().join("state"),
            export_dir: t.path().join("exports"),
            config,
            exporter: Box::new(fake2.clone()),
            pause_at: None,
            pause_marker: None,
        })
        .unwrap();
        d2.apply_configured_attachments();
        let running = fake2.running.lock().unwrap().clone();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].logical_block_size, 4096);
        assert_eq!(
            running[0].io_timeout_ms,
            crate::config::DEFAULT_IO_TIMEOUT_MS
        );
        // Again (a restart): the same attachment, not a second export.
        d2.apply_configured_attachments();
        assert_eq!(fake2.running.lock().unwrap().len(), 1);
    }
}
