//! Why a driver operation failed, in the driver's own terms. The gRPC code each maps to
//! is chosen in one place, `service::status_code`.

use std::io;
use std::path::PathBuf;

use image_unpack::UnpackError;

use crate::model::{ImageId, VolumeId};

/// Why a driver operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pool, volume or image name breaks the naming rules.
    #[error("{what} name {name:?} {why}")]
    InvalidName {
        /// "pool", "volume", "fingerprint".
        what: &'static str,
        /// The name given.
        name: String,
        /// The rule it breaks.
        why: String,
    },
    /// A size, path or option of the request cannot be taken.
    #[error("{0}")]
    BadRequest(String),
    /// No pool of that name.
    #[error("pool {0:?} does not exist")]
    PoolNotFound(String),
    /// No volume of that name in the pool.
    #[error("volume {0} does not exist")]
    VolumeNotFound(VolumeId),
    /// No cached image with that fingerprint.
    #[error("no cached image with fingerprint {0}")]
    ImageNotFound(String),
    /// The object exists, made with other arguments.
    #[error("{what} exists {how}")]
    AlreadyExists {
        /// The object: "volume p/n", "pool \"p\"".
        what: String,
        /// How it differs: "with another size or origin".
        how: String,
    },
    /// Another operation on the same object is running.
    #[error("another operation on {0} is running")]
    Busy(String),
    /// The volume is attached, and the operation needs it detached.
    #[error("volume {id} is attached: {what}")]
    Attached {
        /// The volume.
        id: VolumeId,
        /// What cannot be done.
        what: &'static str,
    },
    /// The volume is being created, grown or deleted.
    #[error("volume {0} is not ready")]
    NotReady(VolumeId),
    /// A block volume's device is not there.
    #[error("volume {id}: its backing device ({identity}) is not present")]
    DeviceAbsent {
        /// The volume.
        id: VolumeId,
        /// The identity looked for.
        identity: String,
    },
    /// The pool cannot be deleted or used so: defined in the configuration, not empty,
    /// a block pool where a dir pool is needed.
    #[error("{0}")]
    PoolUnsuitable(String),
    /// The pool's storage cannot be reached now (an RBD cluster that does not answer).
    #[error("pool {pool:?} is unavailable: {reason}")]
    PoolUnavailable {
        /// The pool.
        pool: String,
        /// Why.
        reason: String,
    },
    /// The volume is attached on another host (a shared pool).
    #[error("volume {id} is attached on host {host:?}: {what}")]
    AttachedElsewhere {
        /// The volume.
        id: VolumeId,
        /// The host that attached it.
        host: String,
        /// What cannot be done (and how to force it, where that exists).
        what: String,
    },
    /// A call to the Ceph cluster failed.
    #[error("{step}")]
    Cluster {
        /// What was being done, on what.
        step: String,
        /// The librados/librbd error.
        #[source]
        source: rbd::RbdError,
    },
    /// The pool type cannot do it, and why.
    #[error("{0}")]
    Unimplemented(String),
    /// No snapshot of that name in the pool.
    #[error("no snapshot {name:?} in pool {pool:?}")]
    SnapshotNotFound {
        /// The pool.
        pool: String,
        /// The snapshot's name.
        name: String,
    },
    /// No space, quota or free device left.
    #[error("{0}")]
    NoSpace(String),
    /// Unpacking, repairing or inspecting an image or volume failed.
    #[error("{step} {path}")]
    Unpack {
        /// The step: "unpacking image onto", "repairing", "inspecting".
        step: &'static str,
        /// The volume or image.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<UnpackError>,
    },
    /// Packing a volume into an image failed (PublishVolume); no image was left.
    #[error("publishing {path}")]
    Pack {
        /// The volume or snapshot.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<image_unpack::PackError>,
    },
    /// A file-system or device operation failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A worker task of the service died (a bug: it panicked).
    #[error("internal task failed: {0}")]
    Task(String),
    /// Starting or running an export failed.
    #[error("exporting {path}")]
    Export {
        /// The volume.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: anyhow::Error,
    },
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A closure mapping an `io::Error` of `step` on `path` to [`Error::Io`].
    pub fn io(step: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { step, path, source }
    }

    /// Another operation holds volume `id`.
    pub(crate) fn volume_busy(id: &VolumeId) -> Error {
        Error::Busy(format!("volume {id}"))
    }

    /// Another operation holds image `id`.
    pub(crate) fn image_busy(id: &ImageId) -> Error {
        Error::Busy(format!("image {}", id.fingerprint))
    }

    /// Whether some cause in the chain is `ENOSPC` or `EDQUOT`.
    pub fn is_no_space(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
                    return true;
                }
            }
            cur = e.source();
        }
        false
    }

    /// The message with every cause, "a: b: c".
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            s.push_str(": ");
            s.push_str(&e.to_string());
            cur = e.source();
        }
        s
    }
}
