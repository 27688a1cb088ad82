//! The driver's own words: what it is asked and what it answers, independent of the gRPC
//! API (`service.rs` converts both ways; nothing else sees protobuf types).
//!
//! ```text
//!   VolumeId (pool/name) ── Volume { state, origin, backing, attachment: Attachment }
//!   ImageId (pool/fp)    ── CachedImage
//!   Pool { kind, origin, usage }
//!   Attachment { export parameters, backend: Backend (serving / removed / waiting /
//!                failed), QEMU arguments }
//!   Event { subject, what: EventKind } ── Watch
//! ```

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A pool's kind.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PoolKind {
    /// Sparse files in a directory.
    Dir {
        /// The directory (created if missing).
        path: PathBuf,
        /// Quota on the sum of volume and image sizes, bytes (0: none).
        #[serde(default)]
        capacity_bytes: u64,
    },
    /// Whole block devices, one per volume.
    Block {
        /// The devices, by stable path (/dev/disk/by-id/...).
        devices: Vec<PathBuf>,
    },
    /// Ceph RBD images, one per volume, shared by every host configured with the pool.
    Rbd(RbdPoolConfig),
}

/// Where an `rbd` pool's images are and how to reach the cluster.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RbdPoolConfig {
    /// The RADOS pool.
    pub pool: String,
    /// The RADOS namespace within it ("" for the default).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// ceph.conf; None: librados' default search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// The cephx client id; None: admin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The client's keyring; None: what ceph.conf names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring: Option<PathBuf>,
}

/// A volume's state on disk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolState {
    /// Being created: never valid after a restart.
    Creating,
    /// Complete.
    Ready,
    /// Being grown.
    Growing,
    /// Being deleted.
    Deleting,
}

/// What a volume was created from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Empty.
    Empty,
    /// Unpacked from an image file.
    Image {
        /// The image (or split image's rootfs).
        path: PathBuf,
        /// A split image's metadata tarball.
        metadata: Option<PathBuf>,
    },
    /// Cloned from a cached image.
    Fingerprint(String),
    /// Cloned from a volume of the same pool, or from one of its snapshots.
    Volume {
        /// The source volume.
        name: String,
        /// Its snapshot (none: the volume's own data).
        snapshot: Option<String>,
    },
}

/// A volume's identity: its pool and its name in that pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    /// The pool.
    pub pool: String,
    /// The name, unique in the pool.
    pub name: String,
}

impl VolumeId {
    /// `pool/name`.
    pub fn new(pool: impl Into<String>, name: impl Into<String>) -> VolumeId {
        VolumeId {
            pool: pool.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pool, self.name)
    }
}

/// A cached image's identity: the dir pool it is cached in and its fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageId {
    /// The pool.
    pub pool: String,
    /// The SHA-256 fingerprint (64 lower-case hex digits).
    pub fingerprint: String,
}

impl ImageId {
    /// `pool`, `fingerprint`.
    pub fn new(pool: impl Into<String>, fingerprint: impl Into<String>) -> ImageId {
        ImageId {
            pool: pool.into(),
            fingerprint: fingerprint.into(),
        }
    }
}

impl fmt::Display for ImageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "image {} in pool {}", self.fingerprint, self.pool)
    }
}

/// Where a pool was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolOrigin {
    /// The configuration file (cannot be deleted over the API).
    Config,
    /// CreatePool.
    Api,
}

/// A pool and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    /// Its name.
    pub name: String,
    /// Its storage.
    pub kind: PoolKind,
    /// Where it was defined.
    pub origin: PoolOrigin,
    /// Whether volumes from cached images are reflinked (dir pools on xfs or btrfs).
    pub reflink: bool,
    /// Bytes given to volumes and cached images (and imports under way).
    pub provisioned_bytes: u64,
    /// Dir: the quota (0: none); block: the sum of its devices.
    pub capacity_bytes: u64,
    /// Dir: free bytes of the file system; block: bytes of the devices no volume uses.
    pub available_bytes: u64,
    /// Volumes in it.
    pub volume_count: u32,
    /// Why its storage cannot be reached now (None: it can).
    pub unavailable: Option<String>,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The volume it is of.
    pub volume: VolumeId,
    /// Its name (unique in the pool).
    pub name: String,
    /// The volume's size when it was taken.
    pub size_bytes: u64,
    /// When, ms since the epoch.
    pub created_unix_ms: u64,
    /// Taken while the volume was attached (its export paused).
    pub taken_attached: bool,
}

/// What to create a volume with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewVolume {
    /// Where, and its name.
    pub id: VolumeId,
    /// Bytes (0 with an image: the image's size; block pools take the smallest free
    /// device at least this large).
    pub size_bytes: u64,
    /// What it holds.
    pub origin: Origin,
    /// Image sources: extend the last partition to the end of the volume.
    pub grow_last_partition: bool,
}

/// A volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// Its identity.
    pub id: VolumeId,
    /// Assigned at creation; also the export's serial number.
    pub uuid: String,
    /// Provisioned bytes.
    pub size_bytes: u64,
    /// Lifecycle state.
    pub state: VolState,
    /// What it was created from.
    pub origin: Origin,
    /// The file (dir pool) or device (block pool) holding its data.
    pub path: PathBuf,
    /// Logical sector size of that storage.
    pub backing_logical_block_size: u32,
    /// Set while attached.
    pub attachment: Option<Attachment>,
    /// Creation time, ms since the epoch.
    pub created_unix_ms: u64,
    /// Whether its data was cloned by reflink.
    pub reflinked: bool,
}

/// How to export a volume; zeros take the daemon's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// Guest sector size: 512 or 4096 (0: 512).
    pub logical_block_size: u32,
    /// Read-only.
    pub read_only: bool,
    /// Virtqueues, 1..=64 (0: the default).
    pub num_queues: u32,
    /// Largest queue size, a power of two up to 32768 (0: the default).
    pub queue_size: u32,
    /// Shared pools: take the volume over from the host that has it attached (or any
    /// other writer), fencing that host's client first.
    pub force: bool,
}

/// Where an attached volume's export stands: one state, not several flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The export serves the volume.
    Serving,
    /// The volume's device went away: every request is answered with an I/O error
    /// until it comes back; the vhost-user session stays.
    Removed {
        /// Why (the uevent, or the I/O error).
        reason: String,
    },
    /// The device was absent when the attachment was restored: the export starts when
    /// it appears.
    WaitingForDevice,
    /// The export stopped on its own; nothing serves the socket until a new attach.
    Failed {
        /// Why.
        reason: String,
    },
}

/// An attachment: a vhost-user-blk export of a volume, and how QEMU uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The vhost-user socket.
    pub socket: PathBuf,
    /// Guest sector size.
    pub logical_block_size: u32,
    /// Read-only.
    pub read_only: bool,
    /// Virtqueues.
    pub num_queues: u16,
    /// Queue size QEMU is told (and the largest the export accepts).
    pub queue_size: u16,
    /// The serial the guest reads.
    pub serial: String,
    /// When, ms since the epoch.
    pub attached_unix_ms: u64,
    /// Where the export stands.
    pub backend: Backend,
    /// QEMU's `-chardev` value.
    pub qemu_chardev: String,
    /// QEMU's `-device` value.
    pub qemu_device: String,
}

impl Attachment {
    /// `-chardev <chardev> -device <device>`.
    pub fn qemu_args(&self) -> Vec<String> {
        vec![
            "-chardev".into(),
            self.qemu_chardev.clone(),
            "-device".into(),
            self.qemu_device.clone(),
        ]
    }
}

/// What to grow a volume to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrowVolume {
    /// The volume.
    pub id: VolumeId,
    /// Its new size.
    pub size_bytes: u64,
    /// Extend the last partition too.
    pub grow_last_partition: bool,
}

/// What a grow did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    /// The volume as it is now.
    pub volume: Volume,
    /// Whether the partition table was repaired.
    pub table_repaired: bool,
    /// Why not, or what was done.
    pub note: String,
}

/// A volume's space use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Provisioned bytes.
    pub size_bytes: u64,
    /// Bytes actually allocated.
    pub allocated_bytes: u64,
}

/// An image to cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageImport {
    /// The dir pool ("": the default one).
    pub pool: String,
    /// Its fingerprint.
    pub fingerprint: String,
    /// The unified tarball, or the rootfs of a split image.
    pub image: PathBuf,
    /// A split image's metadata tarball.
    pub metadata: Option<PathBuf>,
}

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedImage {
    /// Its identity.
    pub id: ImageId,
    /// Its unpacked size.
    pub size_bytes: u64,
    /// The unpacked file.
    pub path: PathBuf,
    /// When, ms since the epoch.
    pub created_unix_ms: u64,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The cached image.
    pub image: CachedImage,
    /// Whether this call unpacked it (false: it was cached already).
    pub unpacked: bool,
}

/// Something that happened to a volume or image, for Watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When, ms since the epoch.
    pub unix_ms: u64,
    /// The pool.
    pub pool: String,
    /// The volume's name or the image's fingerprint.
    pub name: String,
    /// What happened.
    pub what: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The volume's lifecycle state changed (None: it does not exist).
    StateChanged {
        /// Before.
        old: Option<VolState>,
        /// After.
        new: Option<VolState>,
    },
    /// Attached (true) or detached.
    Hotplug {
        /// Attached?
        attached: bool,
        /// The export's socket.
        socket: PathBuf,
    },
    /// A long operation advanced.
    Progress {
        /// "create", "import", "grow".
        operation: &'static str,
        /// "copy", "repair", ...
        phase: String,
        /// Done so far.
        done: u64,
        /// Of (0: unknown).
        total: u64,
    },
    /// The export stopped on its own.
    ExportError {
        /// Why.
        message: String,
    },
    /// The volume's device went away.
    BackendRemoved {
        /// Why.
        reason: String,
        /// The device it was.
        device: PathBuf,
    },
    /// The volume's device is back (perhaps under another name).
    BackendResumed {
        /// Where it is now.
        device: PathBuf,
        /// Where it was.
        previous_device: PathBuf,
    },
    /// Requests the volume did not finish in time were answered with an I/O error.
    IoTimeout {
        /// How many.
        requests: u64,
    },
}
