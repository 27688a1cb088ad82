//! `rbd` pools: each volume an RBD image `vol-<name>` in a RADOS pool (and namespace),
//! thin, grown with `rbd_resize`, removed with `rbd_remove`; cached images are
//! `img-<fingerprint>` with a protected snapshot every volume from that image is a clone
//! of. Volumes are addressed as QEMU does (`rbd:POOL/IMAGE:conf=...:id=...`), so the
//! unpack, repair and export code takes them as it takes a path.
//!
//! ```text
//!  prepare ─► connect (bounded); unreachable: the pool is unavailable (its reason shown
//!             by GetPool) and a thread retries until the cluster answers
//!  volume:  place (vol-NAME) ─► create ─► unpack onto rbd:... | clone img-FP@base ─► resize
//!  image:   image_place (img-FP) ─► create ─► unpack ─► image_commit (snapshot, protect)
//!  delete of an image with clones: renamed zombie-img-FP, removed with its last clone
//! ```
//!
//! What vmblkd knows of a volume lives with its image (metadata key `vmblk.volume`), so
//! every host configured with the pool lists the same volumes (`records`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rbd::{Cluster, ClusterOptions, Image, IoCtx, RbdError, RbdSpec};

use super::{Backing, Cloned, PoolBackend, SharedStorage, Space};
use crate::config::PoolKind;
use crate::error::{Error, Result};
use crate::identity::DeviceIdentity;
use crate::model::{RbdPoolConfig, VolumeId};

/// Prefix of volume images.
pub const VOLUME_PREFIX: &str = "vol-";
/// Prefix of cached images.
pub const IMAGE_PREFIX: &str = "img-";
/// Prefix a cached image with clones is renamed to when it is deleted.
pub const ZOMBIE_PREFIX: &str = "zombie-img-";
/// The snapshot of a cached image its volumes are cloned from.
pub const BASE_SNAPSHOT: &str = "vmblk-base";
/// Prefix of a volume snapshot's RBD snapshot name.
pub const SNAPSHOT_PREFIX: &str = "snap-";
/// Prefix of the temporary snapshot a volume is cloned from.
pub const CLONE_SNAPSHOT_PREFIX: &str = "vmblk-clone-";
/// Metadata key of a volume's record.
pub const RECORD_KEY: &str = "vmblk.volume";
/// Metadata key of a cached image's record.
pub const IMAGE_RECORD_KEY: &str = "vmblk.image";

/// How long connecting waits for the monitors.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a retry thread waits between attempts while the cluster does not answer.
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// The address `path` holds.
fn parse_address(path: &Path) -> Result<RbdSpec> {
    path.to_str()
        .and_then(|s| RbdSpec::parse(s).ok())
        .ok_or_else(|| Error::BadRequest(format!("{} is not an RBD address", path.display())))
}

/// Checks an `rbd` pool's settings (before anything is connected).
pub fn check_rbd_config(c: &RbdPoolConfig) -> std::result::Result<(), String> {
    let name_ok =
        |s: &str| !s.is_empty() && !s.contains(['/', '@', ':', '\\', '\0']) && !s.starts_with('.');
    if !name_ok(&c.pool) {
        return Err(format!(
            "RADOS pool name {:?} is empty or holds / @ : \\",
            c.pool
        ));
    }
    if !c.namespace.is_empty() && !name_ok(&c.namespace) {
        return Err(format!("RADOS namespace {:?} holds / @ : \\", c.namespace));
    }
    for (what, p) in [("conf", &c.conf), ("keyring", &c.keyring)] {
        if let Some(p) = p {
            if !p.is_absolute() {
                return Err(format!("{what} path {} is not absolute", p.display()));
            }
        }
    }
    if let Some(id) = &c.id {
        if id.is_empty() || id.contains([':', '\0', ' ']) {
            return Err(format!("client id {id:?} is empty or holds : or spaces"));
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Conn {
    ioctx: Option<Arc<IoCtx>>,
    /// The last connection error (while not connected).
    error: Option<String>,
    /// A thread retries the connection.
    retrying: bool,
}

/// A pool of RBD images.
#[derive(Debug)]
pub(crate) struct RbdPool {
    kind: PoolKind,
    config: RbdPoolConfig,
    conn: Arc<Mutex<Conn>>,
}

fn cluster_err(step: String) -> impl FnOnce(RbdError) -> Error {
    move |source| Error::Cluster { step, source }
}

impl RbdPool {
    pub(crate) fn new(kind: PoolKind) -> RbdPool {
        let config = match &kind {
            PoolKind::Rbd(c) => c.clone(),
            _ => RbdPoolConfig::default(),
        };
        RbdPool {
            kind,
            config,
            conn: Default::default(),
        }
    }

    fn options(config: &RbdPoolConfig) -> ClusterOptions {
        let mut options = Vec::new();
        if let Some(k) = &config.keyring {
            options.push(("keyring".to_owned(), k.display().to_string()));
        }
        ClusterOptions {
            conf: config.conf.clone(),
            id: config.id.clone(),
            options,
            connect_timeout: Some(CONNECT_TIMEOUT),
            op_timeout: None,
        }
    }

    fn connect(config: &RbdPoolConfig) -> std::result::Result<Arc<IoCtx>, RbdError> {
        let cluster = Cluster::connect(&Self::options(config))?;
        let ioctx = cluster.pool(&config.pool, &config.namespace)?;
        // The pool must be there and readable: listing it is a round trip to an OSD.
        ioctx.list_images()?;
        Ok(ioctx)
    }

    /// The pool context, connecting if needed; an unreachable cluster is
    /// [`Error::PoolUnavailable`] with librados' reason.
    fn ioctx(&self) -> Result<Arc<IoCtx>> {
        {
            let c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(io) = &c.ioctx {
                return Ok(io.clone());
            }
            if c.retrying {
                return Err(self.unavailable_error(c.error.clone()));
            }
        }
        self.try_connect();
        let c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        match &c.ioctx {
            Some(io) => Ok(io.clone()),
            None => Err(self.unavailable_error(c.error.clone())),
        }
    }

    fn unavailable_error(&self, reason: Option<String>) -> Error {
        Error::PoolUnavailable {
            pool: self.config.pool.clone(),
            reason: reason.unwrap_or_else(|| "not connected yet".into()),
        }
    }

    /// One connection attempt; on failure, a thread retries until the cluster answers.
    fn try_connect(&self) {
        match Self::connect(&self.config) {
            Ok(io) => {
                let mut c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
                c.ioctx = Some(io);
                c.error = None;
            }
            Err(e) => {
                tracing::warn!(pool = %self.config.pool, error = %e, "RBD pool unavailable; retrying in the background");
                let mut c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
                c.error = Some(e.to_string());
                if !c.retrying {
                    c.retrying = true;
                    let (conn, config) = (self.conn.clone(), self.config.clone());
                    let spawned = std::thread::Builder::new()
                        .name("vmblkd-rbd-connect".into())
                        .spawn(move || retry(&conn, &config));
                    if spawned.is_err() {
                        c.retrying = false;
                    }
                }
            }
        }
    }

    /// The address of image `name` of this pool, in QEMU's `rbd:` form.
    pub(crate) fn address(&self, name: &str) -> PathBuf {
        let c = &self.config;
        let spec = RbdSpec {
            pool: c.pool.clone(),
            namespace: c.namespace.clone(),
            image: name.to_owned(),
            snapshot: None,
            conf: c.conf.as_ref().map(|p| p.display().to_string()),
            id: c.id.clone(),
            options: c
                .keyring
                .iter()
                .map(|k| ("keyring".to_owned(), k.display().to_string()))
                .collect(),
        };
        PathBuf::from(spec.to_string())
    }

    /// The image name an address of this pool names.
    fn image_name(path: &Path) -> Result<String> {
        parse_address(path).map(|s| s.image)
    }

    fn open(&self, name: &str, read_only: bool) -> Result<Image> {
        let io = self.ioctx()?;
        Image::open(&io, name, None, read_only)
            .map_err(cluster_err(format!("opening RBD image {name}")))
    }

    /// Removes image `name`, its own snapshots first (unprotected); absent is fine.
    fn remove_image(&self, io: &Arc<IoCtx>, name: &str) -> std::result::Result<(), RbdError> {
        match Image::open(io, name, None, false) {
            Ok(img) => {
                for s in img.snapshots()? {
                    let _ = img.snap_unprotect(&s.name);
                    img.snap_remove(&s.name)?;
                }
            }
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        }
        match Image::remove(io, name) {
            Err(e) if e.is_not_found() => Ok(()),
            r => r,
        }
    }

    /// Removes deleted cached images (`zombie-img-*`) whose last clone is gone.
    fn reap_zombies(&self, io: &Arc<IoCtx>) {
        let Ok(names) = io.list_images() else {
            return;
        };
        for z in names.iter().filter(|n| n.starts_with(ZOMBIE_PREFIX)) {
            let children = Image::open(io, z, Some(BASE_SNAPSHOT), true).and_then(|i| i.children());
            match children {
                Ok(c) if c.is_empty() => match self.remove_image(io, z) {
                    Ok(()) => {
                        tracing::info!(image = %z, "deleted cached image removed with its last clone")
                    }
                    Err(e) => {
                        tracing::warn!(image = %z, error = %e, "removing a deleted cached image")
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(image = %z, error = %e, "listing the clones of a deleted cached image")
                }
            }
        }
    }

    /// The records kept with the pool's images under `key` (volumes: [`RECORD_KEY`]).
    fn records(&self, prefix: &str, key: &str) -> Result<Vec<(String, String)>> {
        let io = self.ioctx()?;
        let names = io.list_images().map_err(cluster_err(format!(
            "listing the images of pool {}",
            self.config.pool
        )))?;
        let mut out = Vec::new();
        for n in names.into_iter().filter(|n| n.starts_with(prefix)) {
            let value = Image::open(&io, &n, None, true).and_then(|i| i.metadata_get(key));
            match value {
                Ok(Some(v)) => out.push((n, v)),
                Ok(None) => {}
                // Removed since it was listed.
                Err(e) if e.is_not_found() => {}
                Err(e) => {
                    return Err(Error::Cluster {
                        step: format!("reading the record of RBD image {n}"),
                        source: e,
                    })
                }
            }
        }
        Ok(out)
    }

    /// Stores `value` under `key` with the image at `path`.
    fn put_record(&self, path: &Path, key: &str, value: &str) -> Result<()> {
        let name = Self::image_name(path)?;
        self.open(&name, false)?
            .metadata_set(key, value)
            .map_err(cluster_err(format!(
                "writing the record of RBD image {name}"
            )))
    }
}

impl SharedStorage for RbdPool {
    fn volume_records(&self) -> Result<Vec<String>> {
        Ok(self
            .records(VOLUME_PREFIX, RECORD_KEY)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn put_volume_record(&self, path: &Path, record: &str) -> Result<()> {
        self.put_record(path, RECORD_KEY, record)
    }

    fn image_records(&self) -> Result<Vec<String>> {
        Ok(self
            .records(IMAGE_PREFIX, IMAGE_RECORD_KEY)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn put_image_record(&self, path: &Path, record: &str) -> Result<()> {
        self.put_record(path, IMAGE_RECORD_KEY, record)
    }

    /// Removes every lock holder of the image at `path`, fencing it (blocklisted in the
    /// cluster: its later writes are refused). Returns the holders fenced.
    fn fence(&self, path: &Path) -> Result<Vec<String>> {
        let name = Self::image_name(path)?;
        let img = self.open(&name, false)?;
        let owners = img.lock_owners().map_err(cluster_err(format!(
            "listing the lock holders of RBD image {name}"
        )))?;
        for o in &owners {
            img.break_lock(o).map_err(cluster_err(format!(
                "fencing {o}, holder of RBD image {name}"
            )))?;
            tracing::warn!(image = %name, holder = %o, "lock holder fenced (blocklisted)");
        }
        Ok(owners)
    }

    /// The clients holding the exclusive lock of the image at `path`.
    fn lock_holders(&self, path: &Path) -> Result<Vec<String>> {
        let name = Self::image_name(path)?;
        // librbd answers lock questions only on an image opened for writing (opening
        // takes no lock; only a write would).
        self.open(&name, false)?
            .lock_owners()
            .map_err(cluster_err(format!(
                "listing the lock holders of RBD image {name}"
            )))
    }
}

/// Retries connecting every [`RETRY_EVERY`] until the cluster answers.
fn retry(conn: &Mutex<Conn>, config: &RbdPoolConfig) {
    loop {
        std::thread::sleep(RETRY_EVERY);
        match RbdPool::connect(config) {
            Ok(io) => {
                let mut c = conn.lock().unwrap_or_else(PoisonError::into_inner);
                c.ioctx = Some(io);
                c.error = None;
                c.retrying = false;
                tracing::info!(pool = %config.pool, "RBD pool available");
                return;
            }
            Err(e) => {
                conn.lock().unwrap_or_else(PoisonError::into_inner).error = Some(e.to_string());
            }
        }
    }
}

impl PoolBackend for RbdPool {
    fn kind(&self) -> &PoolKind {
        &self.kind
    }

    /// Connects once; a cluster that does not answer leaves the pool unavailable (not an
    /// error: vmblkd serves its other pools) and a thread retrying.
    fn prepare(&self) -> Result<()> {
        self.try_connect();
        if let Ok(io) = self.ioctx() {
            self.reap_zombies(&io);
            tracing::info!(pool = %self.config.pool, namespace = %self.config.namespace, "rbd pool ready");
        }
        Ok(())
    }

    fn unavailable(&self) -> Option<String> {
        let c = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        match &c.ioctx {
            Some(_) => None,
            None => Some(
                c.error
                    .clone()
                    .unwrap_or_else(|| "not connected yet".into()),
            ),
        }
    }

    fn shared(&self) -> Option<&dyn super::SharedStorage> {
        Some(self)
    }

    fn reflink(&self) -> bool {
        true
    }

    fn holds_images(&self) -> bool {
        true
    }

    fn overlaps(&self, other: &PoolKind) -> bool {
        matches!(other, PoolKind::Rbd(c)
            if c.pool == self.config.pool && c.namespace == self.config.namespace)
    }

    fn place(&self, id: &VolumeId, _uuid: &str, size: u64, _taken: &[PathBuf]) -> Result<Backing> {
        self.ioctx()?;
        Ok(Backing {
            path: self.address(&format!("{VOLUME_PREFIX}{}", id.name)),
            temp_path: None,
            size_bytes: size,
        })
    }

    fn create(&self, b: &Backing) -> Result<()> {
        let name = Self::image_name(&b.path)?;
        let io = self.ioctx()?;
        match Image::create(&io, &name, b.size_bytes) {
            Err(e) if e.errno() == Some(libc::EEXIST) => Err(Error::AlreadyExists {
                what: format!("RBD image {name}"),
                how: "in the cluster (another host made it)".into(),
            }),
            r => r.map_err(cluster_err(format!("creating RBD image {name}"))),
        }
    }

    fn needs_zeroing(&self) -> bool {
        false
    }

    /// Replaces the created (empty) image with a clone of the cached image's base
    /// snapshot, grown to the volume's size.
    fn clone_image(&self, image: &Path, b: &Backing) -> Result<Cloned> {
        // A cached image of a dir pool (a file) is unpacked onto the volume instead.
        let Ok(parent) = Self::image_name(image) else {
            return Ok(Cloned::Unpack);
        };
        let child = Self::image_name(&b.path)?;
        let io = self.ioctx()?;
        Image::remove(&io, &child).map_err(cluster_err(format!("replacing RBD image {child}")))?;
        io.clone_image(&io, &parent, BASE_SNAPSHOT, &child)
            .map_err(cluster_err(format!(
                "cloning {parent}@{BASE_SNAPSHOT} to {child}"
            )))?;
        let img = Image::open(&io, &child, None, false)
            .map_err(cluster_err(format!("opening RBD image {child}")))?;
        let size = img
            .size()
            .map_err(cluster_err(format!("sizing RBD image {child}")))?;
        if size < b.size_bytes {
            img.resize(b.size_bytes)
                .map_err(cluster_err(format!("growing RBD image {child}")))?;
        }
        Ok(Cloned::Reflinked)
    }

    /// A clone of the source's snapshot (of a temporary one for a volume), flattened:
    /// the copy shares nothing with its source after, so either may be deleted.
    fn clone_volume(&self, source: &Path, _len: u64, b: &Backing) -> Result<Cloned> {
        let spec = parse_address(source)?;
        let child = Self::image_name(&b.path)?;
        let io = self.ioctx()?;
        let parent = self.open(&spec.image, false)?;
        let (snap, temporary) = match &spec.snapshot {
            Some(s) => (s.clone(), false),
            None => {
                let s = format!("{CLONE_SNAPSHOT_PREFIX}{child}");
                // A failed clone's leftover goes first.
                let _ = parent.snap_unprotect(&s);
                let _ = parent.snap_remove(&s);
                parent.snap_create(&s).map_err(cluster_err(format!(
                    "snapshotting RBD image {}",
                    spec.image
                )))?;
                (s, true)
            }
        };
        let what = format!("{}@{snap} to {child}", spec.image);
        let run = || -> std::result::Result<(), RbdError> {
            match parent.snap_protect(&snap) {
                // Already protected (another clone of it under way).
                Err(e) if e.errno() == Some(libc::EBUSY) => {}
                r => r?,
            }
            Image::remove(&io, &child)?;
            io.clone_image(&io, &spec.image, &snap, &child)?;
            let img = Image::open(&io, &child, None, false)?;
            img.flatten()?;
            if img.size()? < b.size_bytes {
                img.resize(b.size_bytes)?;
            }
            Ok(())
        };
        let r = run();
        if r.is_err() {
            // The half-made clone goes first: while it exists the snapshot stays
            // protected (and a temporary one cannot be removed).
            if let Err(e) = Image::remove(&io, &child) {
                tracing::warn!(image = %child, error = %e, "removing a failed clone");
            }
        }
        // EBUSY while another clone of it is under way: that one unprotects it.
        let _ = parent.snap_unprotect(&snap);
        if temporary {
            if let Err(e) = parent.snap_remove(&snap) {
                tracing::warn!(image = %spec.image, snapshot = %snap, error = %e,
                    "removing a clone's temporary snapshot");
            }
        }
        r.map_err(cluster_err(format!("cloning {what}")))?;
        Ok(Cloned::Copied)
    }

    /// `rbd rename`: the image, its snapshots and its record (metadata) go together.
    fn rename(
        &self,
        path: &Path,
        to: &VolumeId,
        snapshots: &[PathBuf],
    ) -> Result<(PathBuf, Vec<PathBuf>)> {
        let from = Self::image_name(path)?;
        let name = format!("{VOLUME_PREFIX}{}", to.name);
        let io = self.ioctx()?;
        let renamed = io.rename_image(&from, &name);
        // Renamed already (a retry after a crash before the record was written).
        let done_before = matches!(&renamed, Err(e) if e.is_not_found())
            && Image::open(&io, &name, None, true).is_ok();
        renamed
            .or_else(|e| if done_before { Ok(()) } else { Err(e) })
            .map_err(|e| {
                if e.errno() == Some(libc::EEXIST) {
                    Error::AlreadyExists {
                        what: format!("RBD image {name}"),
                        how: "in the cluster".into(),
                    }
                } else {
                    cluster_err(format!("renaming RBD image {from} to {name}"))(e)
                }
            })?;
        let new_path = self.address(&name);
        let new_spec = parse_address(&new_path)?;
        let snaps = snapshots
            .iter()
            .map(|s| {
                let snap = parse_address(s)?.snapshot;
                Ok(PathBuf::from(
                    new_spec.at_snapshot(snap.as_deref()).to_string(),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((new_path, snaps))
    }

    fn commit(&self, _b: &Backing) -> Result<()> {
        Ok(())
    }

    fn grow(&self, path: &Path, size: u64) -> Result<u64> {
        let name = Self::image_name(path)?;
        let img = self.open(&name, false)?;
        img.resize(size)
            .map_err(cluster_err(format!("growing RBD image {name}")))?;
        img.size()
            .map_err(cluster_err(format!("sizing RBD image {name}")))
    }

    fn discard(&self, b: &Backing) {
        let Ok(name) = Self::image_name(&b.path) else {
            return;
        };
        let Ok(io) = self.ioctx() else {
            tracing::warn!(image = %name, "cannot remove the RBD image: the pool is unavailable");
            return;
        };
        if let Err(e) = self.remove_image(&io, &name) {
            tracing::warn!(image = %name, error = %e, "removing RBD image");
        }
        self.reap_zombies(&io);
    }

    /// The image removed, or why not (EBUSY: another client has it open).
    fn remove(&self, b: &Backing) -> Result<()> {
        let name = Self::image_name(&b.path)?;
        let io = self.ioctx()?;
        match self.remove_image(&io, &name) {
            Ok(()) => {
                self.reap_zombies(&io);
                Ok(())
            }
            Err(e) if e.errno() == Some(libc::EBUSY) => Err(Error::Busy(format!(
                "RBD image {name}: another client has it open"
            ))),
            Err(e) => Err(cluster_err(format!("removing RBD image {name}"))(e)),
        }
    }

    fn allocated(&self, path: &Path, _size: u64) -> Result<u64> {
        let name = Self::image_name(path)?;
        self.open(&name, true)?
            .allocated_bytes()
            .map_err(cluster_err(format!("measuring RBD image {name}")))
    }

    fn space(&self, _taken: &[PathBuf]) -> Space {
        let io = self
            .conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .ioctx
            .clone();
        let Some(io) = io else {
            return Space::default();
        };
        let (capacity_bytes, available_bytes) = io.cluster().capacity().unwrap_or((0, 0));
        Space {
            capacity_bytes,
            available_bytes,
        }
    }

    fn identity(&self, _path: &Path) -> Option<DeviceIdentity> {
        None
    }

    /// An RBD snapshot `snap-NAME` of the volume's image.
    fn snapshot(&self, volume: &Path, _uuid: &str, name: &str) -> Result<PathBuf> {
        let image = Self::image_name(volume)?;
        let snap = format!("{SNAPSHOT_PREFIX}{name}");
        let img = self.open(&image, false)?;
        img.flush()
            .and_then(|()| img.snap_create(&snap))
            .map_err(cluster_err(format!("snapshotting RBD image {image}")))?;
        let spec = parse_address(volume)?;
        Ok(PathBuf::from(spec.at_snapshot(Some(&snap)).to_string()))
    }

    fn delete_snapshot(&self, volume: &Path, snapshot: &Path) {
        let (Ok(image), Some(snap)) = (
            Self::image_name(volume),
            parse_address(snapshot).ok().and_then(|s| s.snapshot),
        ) else {
            return;
        };
        match self.open(&image, false) {
            Ok(img) => {
                // Protected only while a clone of it is made; a crash may leave it so.
                let _ = img.snap_unprotect(&snap);
                if let Err(e) = img.snap_remove(&snap) {
                    if !e.is_not_found() {
                        tracing::warn!(image = %image, snapshot = %snap, error = %e, "removing a snapshot");
                    }
                }
            }
            Err(e) => tracing::warn!(image = %image, error = %e.chain(), "removing a snapshot"),
        }
    }

    /// `rbd snap rollback`: the image's data and size as the snapshot has them.
    fn restore_snapshot(&self, volume: &Path, snapshot: &Path) -> Result<()> {
        let image = Self::image_name(volume)?;
        let snap = parse_address(snapshot)?.snapshot.ok_or_else(|| {
            Error::BadRequest(format!("{} names no snapshot", snapshot.display()))
        })?;
        self.open(&image, false)?
            .snap_rollback(&snap)
            .map_err(cluster_err(format!(
                "rolling RBD image {image} back to {snap}"
            )))
    }

    fn image_place(&self, fingerprint: &str, size: u64) -> Result<Backing> {
        let io = self.ioctx()?;
        // A cached image deleted while it had clones, imported again: it comes back.
        let zombie = format!("{ZOMBIE_PREFIX}{fingerprint}");
        let name = format!("{IMAGE_PREFIX}{fingerprint}");
        if io.list_images().unwrap_or_default().contains(&zombie) {
            io.rename_image(&zombie, &name)
                .map_err(cluster_err(format!(
                    "restoring deleted cached image {zombie}"
                )))?;
            tracing::info!(image = %name, "deleted cached image with clones imported again: reused");
        }
        Ok(Backing {
            path: self.address(&name),
            temp_path: None,
            size_bytes: size,
        })
    }

    fn image_exists(&self, b: &Backing) -> Result<bool> {
        let name = Self::image_name(&b.path)?;
        let io = self.ioctx()?;
        match Image::open(&io, &name, Some(BASE_SNAPSHOT), true) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(cluster_err(format!("opening RBD image {name}"))(e)),
        }
    }

    /// Snapshots and protects the unpacked image: volumes are clones of that snapshot.
    fn image_commit(&self, b: &Backing) -> Result<()> {
        let name = Self::image_name(&b.path)?;
        let img = self.open(&name, false)?;
        img.flush()
            .and_then(|()| img.snap_create(BASE_SNAPSHOT))
            .and_then(|()| img.snap_protect(BASE_SNAPSHOT))
            .map_err(cluster_err(format!("snapshotting RBD image {name}")))
    }

    /// Removes a cached image; one that still has clones is renamed out of the way and
    /// removed with its last clone (the clones keep working).
    fn image_discard(&self, b: &Backing) {
        let Ok(name) = Self::image_name(&b.path) else {
            return;
        };
        let Ok(io) = self.ioctx() else {
            tracing::warn!(image = %name, "cannot remove the cached image: the pool is unavailable");
            return;
        };
        let children =
            Image::open(&io, &name, Some(BASE_SNAPSHOT), true).and_then(|i| i.children());
        match children {
            Ok(c) if !c.is_empty() => {
                let fp = name.trim_start_matches(IMAGE_PREFIX);
                let zombie = format!("{ZOMBIE_PREFIX}{fp}");
                match io.rename_image(&name, &zombie) {
                    Ok(()) => tracing::info!(image = %name, clones = c.len(),
                        "cached image has clones: kept hidden until the last one goes"),
                    Err(e) => {
                        tracing::warn!(image = %name, error = %e, "hiding a cached image with clones")
                    }
                }
            }
            _ => {
                if let Err(e) = self.remove_image(&io, &name) {
                    tracing::warn!(image = %name, error = %e, "removing cached image");
                }
            }
        }
    }
}
