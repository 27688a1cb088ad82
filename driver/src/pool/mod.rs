//! Pool storage behind one trait: where a volume's data lives, how it is made, grown,
//! cloned, removed and exported. `dir` pools keep volumes as files, `block` pools as
//! whole devices; a pool whose volumes are not paths (a librbd image) fits the same
//! trait: a volume is a [`Backing`] the backend interprets, and the export takes an
//! [`ExportSource`].
//!
//! ```text
//!   Driver ─► PoolBackend::place (where: a file, a free device)
//!               create ─► (fill: unpack onto target() / clone_image) ─► commit
//!             grow · discard · allocated · space · identity · export_source
//!
//!   DirPool   (dir.rs):   volumes/<name>.img, written as a temporary file then renamed;
//!                         reflink clones on xfs/btrfs; quota; sparse
//!   BlockPool (block.rs): the smallest free device that fits; wiped on delete;
//!                         followed by stable identity (hotplug)
//! ```
//!
//! One conformance suite (`conformance.rs`, `check_*`) runs against every backend.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::PoolKind;
use crate::error::Result;
use crate::identity::DeviceIdentity;
use crate::model::VolumeId;

mod block;
#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;
mod dir;
pub(crate) mod rbd;

pub(crate) use block::BlockPool;
pub(crate) use dir::DirPool;
pub use rbd::check_rbd_config;
pub(crate) use rbd::RbdPool;

/// Where a volume's data is: its final place, and where it is written first when that
/// differs (a new file is filled under a temporary name, then renamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    /// The final place (a file or a device).
    pub path: PathBuf,
    /// The temporary file a new volume is filled in, if any.
    pub temp_path: Option<PathBuf>,
    /// Bytes (a device's whole size).
    pub size_bytes: u64,
}

impl Backing {
    /// Where a new volume is written: the temporary file, else the final place.
    pub fn target(&self) -> &Path {
        self.temp_path.as_deref().unwrap_or(&self.path)
    }
}

/// What an export opens for a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportSource {
    /// A file or block device.
    Path(PathBuf),
}

/// How a cached image became a volume's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloned {
    /// Its blocks are shared (reflink).
    Reflinked,
    /// Copied (sparse).
    Copied,
    /// This pool does not clone: the image is unpacked onto the volume instead.
    Unpack,
}

/// A pool's size and room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Space {
    /// Dir: the quota (0: none); block: the sum of its devices.
    pub capacity_bytes: u64,
    /// Dir: free bytes of the file system; block: bytes of the devices no volume uses.
    pub available_bytes: u64,
}

/// One kind of pool storage.
pub trait PoolBackend: Send + Sync + fmt::Debug {
    /// The pool's configuration.
    fn kind(&self) -> &PoolKind;

    /// Makes the pool's storage ready (at startup and at creation): directories,
    /// leftovers of a crash removed, a cluster connected.
    fn prepare(&self) -> Result<()>;

    /// Why the pool's storage cannot be reached now (None: it can).
    fn unavailable(&self) -> Option<String> {
        None
    }

    /// Storage other hosts use too (an RBD pool): what the driver knows of a volume is
    /// kept with it there, not in this host's state directory.
    fn shared(&self) -> Option<&dyn SharedStorage> {
        None
    }

    /// Whether clones of cached images share their blocks.
    fn reflink(&self) -> bool {
        false
    }

    /// Whether cached images can be kept here.
    fn holds_images(&self) -> bool {
        false
    }

    /// Whether volumes here are devices that may go away and come back, followed by
    /// identity (hotplug).
    fn follows_devices(&self) -> bool {
        false
    }

    /// Whether this pool uses `other`'s storage (two pools on one directory or device).
    fn overlaps(&self, other: &PoolKind) -> bool;

    /// Chooses where a new volume of at least `size` bytes goes; `taken` are the
    /// places of the other volumes. The returned size is the volume's (a device's).
    fn place(&self, id: &VolumeId, uuid: &str, size: u64, taken: &[PathBuf]) -> Result<Backing>;

    /// Makes the placed volume's storage, empty, of its size.
    fn create(&self, b: &Backing) -> Result<()>;

    /// Whether a volume here must be zeroed past an unpacked image's end (a device may
    /// hold an older guest's data; a new file is all holes).
    fn needs_zeroing(&self) -> bool;

    /// Fills the created volume with the cached image at `image` if this pool clones.
    fn clone_image(&self, image: &Path, b: &Backing) -> Result<Cloned>;

    /// Fills the created volume with a copy of the volume or snapshot at `source`
    /// (`len` bytes, this pool's): shared blocks where the pool can, an independent
    /// copy in any case (the source may be deleted after).
    fn clone_volume(&self, source: &Path, _len: u64, b: &Backing) -> Result<Cloned> {
        self.clone_image(source, b)
    }

    /// Gives the detached volume at `path` the name of `to`; returns its new place and
    /// the new places of its snapshots (same order). Refuses a name taken here; a rename
    /// this storage has already done (a retry after a crash) succeeds.
    fn rename(
        &self,
        path: &Path,
        _to: &VolumeId,
        snapshots: &[PathBuf],
    ) -> Result<(PathBuf, Vec<PathBuf>)> {
        Ok((path.to_owned(), snapshots.to_vec()))
    }

    /// A rename is recorded: the storage's old name (if the pool keeps one until then)
    /// goes. Best effort, logged.
    fn rename_done(&self, _old: &Path, _new: &Path) {}

    /// Makes the filled volume durable and visible at its final place.
    fn commit(&self, b: &Backing) -> Result<()>;

    /// Whether volumes here can grow.
    fn grows(&self) -> bool {
        true
    }

    /// Grows the volume at `path` to `size` bytes; returns its new size (a pool whose
    /// volumes do not grow says why, as [`crate::error::Error::NoSpace`]).
    fn grow(&self, path: &Path, size: u64) -> Result<u64>;

    /// Removes a volume's data (its temporary file too); best effort, logged.
    fn discard(&self, b: &Backing);

    /// Removes a complete volume's data, saying why if it could not (DeleteVolume).
    fn remove(&self, b: &Backing) -> Result<()> {
        self.discard(b);
        Ok(())
    }

    /// Bytes the volume at `path` uses (`size`: its provisioned size).
    fn allocated(&self, path: &Path, size: u64) -> Result<u64>;

    /// The pool's size and room, `taken` the places of its volumes.
    fn space(&self, taken: &[PathBuf]) -> Space;

    /// The stable identity of the storage at `path` (devices), for hotplug.
    fn identity(&self, path: &Path) -> Option<DeviceIdentity>;

    /// What an export of the volume at `path` opens.
    fn export_source(&self, path: &Path) -> ExportSource {
        ExportSource::Path(path.to_owned())
    }

    /// Takes snapshot `name` of the volume at `volume` (UUID `uuid`); returns where its
    /// data is. The volume is quiet meanwhile (detached, or its export paused).
    fn snapshot(&self, volume: &Path, _uuid: &str, name: &str) -> Result<PathBuf> {
        Err(crate::error::Error::Unimplemented(format!(
            "this pool type keeps no snapshots (volume {}, snapshot {name}): a block pool \
             holds one volume per device; use a dir or rbd pool",
            volume.display()
        )))
    }

    /// Removes the snapshot at `snapshot` of the volume at `volume`; best effort, logged.
    fn delete_snapshot(&self, _volume: &Path, _snapshot: &Path) {}

    /// Puts the volume at `volume` back as the snapshot at `snapshot` has it (its size
    /// too). The volume is detached.
    fn restore_snapshot(&self, volume: &Path, snapshot: &Path) -> Result<()> {
        Err(crate::error::Error::Unimplemented(format!(
            "this pool type keeps no snapshots (volume {}, snapshot {})",
            volume.display(),
            snapshot.display()
        )))
    }

    /// Where the cached image `fingerprint` of `size` bytes goes (see
    /// [`PoolBackend::holds_images`]); made with [`PoolBackend::create`].
    fn image_place(&self, fingerprint: &str, _size: u64) -> Result<Backing> {
        Err(crate::error::Error::PoolUnsuitable(format!(
            "this pool does not cache images (image {fingerprint})"
        )))
    }

    /// Whether a complete cached image is at `b` (one imported by another host).
    fn image_exists(&self, _b: &Backing) -> Result<bool> {
        Ok(false)
    }

    /// Makes the unpacked image at `b` a cached image volumes can be made from.
    fn image_commit(&self, b: &Backing) -> Result<()> {
        self.commit(b)
    }

    /// Removes a cached image (one with clones only once its last clone is gone).
    fn image_discard(&self, b: &Backing) {
        self.discard(b)
    }
}

/// Storage several hosts use (rbd pools): the records of complete volumes and cached
/// images are kept with them, so every host lists the same ones, and a writer that
/// another host must take over from is fenced.
pub trait SharedStorage: Send + Sync + fmt::Debug {
    /// The volume records kept in the pool (JSON).
    fn volume_records(&self) -> Result<Vec<String>>;
    /// Stores the record of the volume at `path` (JSON).
    fn put_volume_record(&self, path: &Path, record: &str) -> Result<()>;
    /// The cached image records kept in the pool (JSON).
    fn image_records(&self) -> Result<Vec<String>>;
    /// Stores the record of the cached image at `path` (JSON).
    fn put_image_record(&self, path: &Path, record: &str) -> Result<()>;
    /// The clients holding the exclusive lock of the volume at `path`.
    fn lock_holders(&self, path: &Path) -> Result<Vec<String>>;
    /// Removes every holder of the volume's lock and fences it (its later writes are
    /// refused by the storage); returns the holders.
    fn fence(&self, path: &Path) -> Result<Vec<String>>;
}

/// The backend of a pool of `kind`.
pub fn backend(kind: &PoolKind) -> Box<dyn PoolBackend> {
    match kind {
        PoolKind::Dir { .. } => Box::new(DirPool::new(kind.clone())),
        PoolKind::Block { .. } => Box::new(BlockPool::new(kind.clone())),
        PoolKind::Rbd(_) => Box::new(RbdPool::new(kind.clone())),
    }
}

/// The device number of a block device (None for anything else).
pub(crate) fn device_number(path: &Path) -> Option<u64> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(path)
        .ok()
        .filter(|m| m.file_type().is_block_device())
        .map(|m| m.rdev())
}
