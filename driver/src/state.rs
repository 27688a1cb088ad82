//! Durable state: one small JSON record per pool, volume and cached image, each
//! replaced atomically (write a temporary file, fsync it, rename it over the record,
//! fsync the directory). See docs/state.md for why files and not a database.
//!
//! ```text
//!  <state_dir>/db/pools/<pool>.json              pools created over the API
//!  <state_dir>/db/volumes/<pool>/<name>.json     volumes (state, size, origin, attachment)
//!  <state_dir>/db/images/<pool>/<fingerprint>.json  cached images
//!  <state_dir>/db/**/.tmp-*                      half-written records (removed at startup)
//! ```

pub use crate::model::{Origin, VolState};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::config::PoolKind;
use crate::error::{Error, Result};
use crate::sys;

/// Prefix of every temporary file the daemon creates (records, volume data, images).
pub const TMP_PREFIX: &str = ".tmp-";

/// A pool created over the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolRecord {
    /// Name.
    pub name: String,
    /// Kind and storage.
    pub kind: PoolKind,
}

/// How an attached volume is exported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachRecord {
    /// vhost-user socket.
    pub socket: PathBuf,
    /// Guest sector size.
    pub logical_block_size: u32,
    /// Read-only export.
    pub read_only: bool,
    /// Virtqueues.
    pub num_queues: u16,
    /// Virtqueue size.
    pub queue_size: u16,
    /// When, ms since the epoch.
    pub attached_unix_ms: u64,
    /// The host that attached it (its `node` name; "" in records of local pools made
    /// before shared pools existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// Set when the export stopped on its own (its serving thread failed, its socket
    /// was removed): why. Such an attachment is not exported again at startup; a new
    /// Attach replaces it, Detach removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// A volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    /// Pool.
    pub pool: String,
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: String,
    /// Provisioned size.
    pub size_bytes: u64,
    /// State.
    pub state: VolState,
    /// Origin.
    pub origin: Origin,
    /// Where the data is once ready (file or device).
    pub path: PathBuf,
    /// While creating in a dir pool: the temporary data file.
    pub temp_path: Option<PathBuf>,
    /// Set while attached.
    pub attachment: Option<AttachRecord>,
    /// Created, ms since the epoch.
    pub created_unix_ms: u64,
    /// Cloned by reflink.
    #[serde(default)]
    pub reflinked: bool,
    /// The size requested at creation (0: the image's), for idempotent repeats.
    #[serde(default)]
    pub requested_bytes: u64,
    /// Block pools: the stable identity of the device (recorded at creation, or at the
    /// first attach or start for records written before identities were), so the device
    /// is recognised when it comes back under another name, and another device at the
    /// same path is not taken for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<crate::identity::DeviceIdentity>,
    /// Its snapshots, oldest first (they follow the volume: a rename, a delete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    /// The name it had, while a rename is under way: a crash between writing this record
    /// and removing the old one leaves both, and startup drops the old one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renamed_from: Option<String>,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Its name (unique in the pool).
    pub name: String,
    /// Where its data is: a file (dir pools) or an `rbd:...@SNAP` address.
    pub path: PathBuf,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// When, ms since the epoch.
    pub created_unix_ms: u64,
    /// Taken while the volume was attached (its export paused).
    #[serde(default)]
    pub taken_attached: bool,
}

/// A cached image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    /// Pool.
    pub pool: String,
    /// Fingerprint.
    pub fingerprint: String,
    /// Size of the cached volume.
    pub size_bytes: u64,
    /// Its file.
    pub path: PathBuf,
    /// Imported, ms since the epoch.
    pub created_unix_ms: u64,
}

impl VolumeRecord {
    /// The volume's identity.
    pub fn id(&self) -> crate::model::VolumeId {
        crate::model::VolumeId::new(&self.pool, &self.name)
    }
}

impl ImageRecord {
    /// The image's identity.
    pub fn id(&self) -> crate::model::ImageId {
        crate::model::ImageId::new(&self.pool, &self.fingerprint)
    }

    /// As the API shows it.
    pub fn view(&self) -> crate::model::CachedImage {
        crate::model::CachedImage {
            id: self.id(),
            size_bytes: self.size_bytes,
            path: self.path.clone(),
            created_unix_ms: self.created_unix_ms,
        }
    }
}

/// The record store under `<state_dir>/db`.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating) the store.
    pub fn open(state_dir: &Path) -> Result<Store> {
        let root = state_dir.join("db");
        for d in ["pools", "volumes", "images"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(Error::io("creating", &p))?;
        }
        Ok(Store { root })
    }

    fn pool_path(&self, name: &str) -> PathBuf {
        self.root.join("pools").join(format!("{name}.json"))
    }
    fn volume_path(&self, pool: &str, name: &str) -> PathBuf {
        self.root
            .join("volumes")
            .join(pool)
            .join(format!("{name}.json"))
    }
    fn image_path(&self, pool: &str, fp: &str) -> PathBuf {
        self.root
            .join("images")
            .join(pool)
            .join(format!("{fp}.json"))
    }

    /// Stores an API pool.
    pub fn put_pool(&self, r: &PoolRecord) -> Result<()> {
        write_atomic(&self.pool_path(&r.name), r)
    }
    /// Removes an API pool.
    pub fn remove_pool(&self, name: &str) -> Result<()> {
        remove_durable(&self.pool_path(name))
    }
    /// Every API pool.
    pub fn pools(&self) -> Result<Vec<PoolRecord>> {
        read_dir_records(&self.root.join("pools"))
    }

    /// Stores a volume.
    pub fn put_volume(&self, r: &VolumeRecord) -> Result<()> {
        write_atomic(&self.volume_path(&r.pool, &r.name), r)
    }
    /// Removes a volume.
    pub fn remove_volume(&self, pool: &str, name: &str) -> Result<()> {
        remove_durable(&self.volume_path(pool, name))
    }
    /// Every volume.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>> {
        read_nested(&self.root.join("volumes"))
    }

    /// Stores a cached image.
    pub fn put_image(&self, r: &ImageRecord) -> Result<()> {
        write_atomic(&self.image_path(&r.pool, &r.fingerprint), r)
    }
    /// Removes a cached image.
    pub fn remove_image(&self, pool: &str, fp: &str) -> Result<()> {
        remove_durable(&self.image_path(pool, fp))
    }
    /// Every cached image.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        read_nested(&self.root.join("images"))
    }

    /// Removes half-written records (`.tmp-*`) left by a crash; returns how many.
    pub fn remove_temp_files(&self) -> Result<usize> {
        let mut n = 0;
        for d in ["pools", "volumes", "images"] {
            n += remove_temp_files_under(&self.root.join(d), 2)?;
        }
        Ok(n)
    }
}

/// Writes `value` as JSON to `path` atomically and durably.
pub fn write_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(Error::io("creating", dir))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("record");
    let tmp = dir.join(format!("{TMP_PREFIX}{name}.{}", std::process::id()));
    let body = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::io("serialising", path)(std::io::Error::other(e)))?;
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        sys::fsync_dir(dir)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io("writing record", path)(e)
    })
}

/// Removes `path` (missing is fine) and fsyncs its directory.
pub fn remove_durable(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("removing", path)(e)),
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    sys::fsync_dir(dir).map_err(Error::io("syncing", dir))
}

fn read_record<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let f = File::open(path).map_err(Error::io("opening record", path))?;
    serde_json::from_reader(std::io::BufReader::new(f))
        .map_err(|e| Error::io("parsing record", path)(std::io::Error::other(e)))
}

fn read_dir_records<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("listing", dir)(e)),
    };
    let mut paths: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(TMP_PREFIX) || !name.ends_with(".json") {
            continue;
        }
        out.push(read_record(&p)?);
    }
    Ok(out)
}

fn read_nested<T: DeserializeOwned>(dir: &Path) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let rd = fs::read_dir(dir).map_err(Error::io("listing", dir))?;
    let mut subs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    subs.sort();
    for s in subs {
        out.extend(read_dir_records(&s)?);
    }
    Ok(out)
}

/// Removes `.tmp-*` files in `dir` and, `depth` > 1, its subdirectories.
pub fn remove_temp_files_under(dir: &Path, depth: u32) -> Result<usize> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io("listing", dir)(e)),
    };
    let mut n = 0;
    for e in rd.flatten() {
        let p = e.path();
        let is_tmp = e
            .file_name()
            .to_str()
            .is_some_and(|s| s.starts_with(TMP_PREFIX));
        let ft = e.file_type().map_err(Error::io("inspecting", &p))?;
        if ft.is_dir() && depth > 1 {
            n += remove_temp_files_under(&p, depth - 1)?;
        } else if is_tmp && ft.is_file() {
            tracing::info!(path = %p.display(), "removing leftover temporary file");
            fs::remove_file(&p).map_err(Error::io("removing", &p))?;
            n += 1;
        }
    }
    if n > 0 {
        sys::fsync_dir(dir).map_err(Error::io("syncing", dir))?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str) -> VolumeRecord {
        VolumeRecord {
            pool: "p".into(),
            name: name.into(),
            uuid: "u".into(),
            size_bytes: 4096,
            state: VolState::Ready,
            origin: Origin::Fingerprint("abcdef012345".into()),
            path: "/x".into(),
            temp_path: None,
            attachment: None,
            created_unix_ms: 1,
            reflinked: false,
            requested_bytes: 4096,
            identity: None,
            snapshots: Vec::new(),
            renamed_from: None,
        }
    }

    #[test]
    fn records_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.put_volume(&vol("b")).unwrap();
        s.put_volume(&vol("a")).unwrap();
        let v = s.volumes().unwrap();
        assert_eq!(
            v.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        s.remove_volume("p", "a").unwrap();
        s.remove_volume("p", "a").unwrap();
        assert_eq!(s.volumes().unwrap(), vec![vol("b")]);
    }

    #[test]
    fn half_written_records_are_ignored_and_removed() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        s.put_volume(&vol("a")).unwrap();
        let tmp = d.path().join("db/volumes/p/.tmp-b.json.1");
        fs::write(&tmp, b"{\"pool\":").unwrap();
        assert_eq!(s.volumes().unwrap().len(), 1);
        assert_eq!(s.remove_temp_files().unwrap(), 1);
        assert!(!tmp.exists());
    }
}
