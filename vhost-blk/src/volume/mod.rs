//! The exported volume: where a request's bytes go.
//!
//! A volume is one of three kinds, chosen by its address ([`VolumeAddress`]):
//! - a block device or regular file (`file.rs`): O_DIRECT where it can, the 512-on-4K
//!   read-modify-write under range locks where the guest's sectors are smaller than the
//!   device's;
//! - an RBD image, `rbd:POOL/IMAGE...` (`rbd.rs`): librbd, byte-addressed, no bridge and
//!   no read-modify-write needed;
//! - `null:SIZE` (`null.rs`): reads zeros, drops writes; measures the export's own cost.
//!
//! Every kind answers the same calls (read, write, flush, discard, write-zeroes, size,
//! block size); the io_uring and librbd engines take aligned reads and writes of the
//! kinds they serve (engine.rs).

mod address;
mod file;
mod null;
mod rbd;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use std::sync::Arc;
use std::time::Duration;

use vm_memory::VolatileSlice;

pub use address::VolumeAddress;
use file::FileVolume;
use null::NullVolume;
use rbd::RbdVolume;

/// Guest sector size in bytes: virtio-blk addresses are always in 512-byte units.
pub const SECTOR_SIZE: u64 = 512;

/// Errors of opening and accessing the volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The volume could not be opened.
    #[error("cannot open volume {path}")]
    Open {
        /// Volume path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Size or block size of the volume could not be read.
    #[error("cannot probe volume {path}")]
    Probe {
        /// Volume path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The volume is neither a block device nor a regular file.
    #[error("volume {0} is neither a block device nor a regular file")]
    NotAVolume(PathBuf),
    /// The volume's block size is not a power of two between 512 and 64 KiB.
    #[error("volume {path} has unsupported block size {block_size}")]
    BlockSize {
        /// Volume path.
        path: PathBuf,
        /// The block size found.
        block_size: u64,
    },
    /// A system call on the volume failed.
    #[error("{op} at byte {offset} of the volume failed")]
    Io {
        /// Operation.
        op: &'static str,
        /// Byte offset.
        offset: u64,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The RBD image could not be reached, opened or probed.
    #[error("cannot open RBD volume {address}")]
    Rbd {
        /// The volume's address (`rbd:...`).
        address: String,
        /// Cause (names the call: connect, open pool, open image).
        #[source]
        source: ::rbd::RbdError,
    },
    /// The address is not a path, `rbd:` or `null:` address this export takes.
    #[error("bad volume address {address:?}: {reason}")]
    Address {
        /// The address given.
        address: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A read or write transferred nothing before the end of the request.
    #[error("{op} at byte {offset} of the volume stopped short")]
    Short {
        /// Operation.
        op: &'static str,
        /// Byte offset.
        offset: u64,
    },
}

impl VolumeError {
    /// The errno of a failed system call, if that is what this is.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            VolumeError::Open { source, .. }
            | VolumeError::Probe { source, .. }
            | VolumeError::Io { source, .. } => source.raw_os_error(),
            VolumeError::Rbd { source, .. } => source.errno(),
            _ => None,
        }
    }
}

/// How the volume is opened.
#[derive(Debug, Clone)]
pub(crate) struct VolumeParams {
    pub read_only: bool,
    /// Try O_DIRECT (falls back to buffered I/O where the filesystem refuses it).
    pub direct: bool,
    /// Treat the volume as having at least this block size (testing the bridge on files).
    pub min_block_size: u32,
    /// Most iovecs per system call.
    pub max_iovecs: usize,
    /// How long a network volume's operation may wait for its cluster before it fails
    /// (RBD: librados' OSD and monitor op timeouts); None: as long as it takes.
    pub op_timeout: Option<Duration>,
}

/// A volume-block-aligned byte range `[start, end)` whose write lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LockedRange {
    start: u64,
    end: u64,
}

/// Another write holds part of the range [`Volume::try_lock_write`] asked for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RangeBusy;

fn align_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| align_down(v, a))
}

/// An open volume.
#[derive(Debug)]
pub(crate) struct Volume {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    File(FileVolume),
    Rbd(RbdVolume),
    Null(NullVolume),
}

/// Runs `$body` with `$v` bound to the volume of whichever kind.
macro_rules! each_kind {
    ($self:expr, $v:ident => $body:expr) => {
        match &$self.kind {
            Kind::File($v) => $body,
            Kind::Rbd($v) => $body,
            Kind::Null($v) => $body,
        }
    };
}

impl Volume {
    /// Opens and probes the volume at `address`: a path, `rbd:...` or `null:SIZE`.
    /// Blocking (an RBD volume connects to its cluster): never called on a queue thread.
    pub(crate) fn open(address: &Path, params: &VolumeParams) -> Result<Volume, VolumeError> {
        let kind = match VolumeAddress::parse(address)? {
            VolumeAddress::Path(path) => Kind::File(FileVolume::open(&path, params)?),
            VolumeAddress::Rbd(spec) => Kind::Rbd(RbdVolume::open(&spec, params)?),
            VolumeAddress::Null { size } => Kind::Null(NullVolume::new(size)),
        };
        Ok(Volume { kind })
    }

    /// Usable size in bytes.
    pub(crate) fn size(&self) -> u64 {
        each_kind!(self, v => v.size())
    }

    /// Reads the size again (the volume grew); returns it.
    pub(crate) fn refresh_size(&self) -> Result<u64, VolumeError> {
        each_kind!(self, v => v.refresh_size())
    }

    /// Granularity of I/O to the volume, in bytes.
    pub(crate) fn block_size(&self) -> u64 {
        match &self.kind {
            Kind::File(v) => v.block_size(),
            Kind::Rbd(_) | Kind::Null(_) => SECTOR_SIZE,
        }
    }

    pub(crate) fn physical_block_size(&self) -> u64 {
        match &self.kind {
            Kind::File(v) => v.physical_block_size(),
            Kind::Rbd(_) | Kind::Null(_) => SECTOR_SIZE,
        }
    }

    /// Minimum and optimal I/O sizes in bytes (0: no hint).
    pub(crate) fn io_sizes(&self) -> (u32, u32) {
        match &self.kind {
            Kind::File(v) => v.io_sizes(),
            Kind::Rbd(v) => v.io_sizes(),
            Kind::Null(_) => (0, 0),
        }
    }

    /// Whether the volume must refuse writes whatever the export asked (an RBD snapshot).
    pub(crate) fn is_read_only(&self) -> bool {
        match &self.kind {
            Kind::Rbd(v) => v.is_read_only(),
            Kind::File(_) | Kind::Null(_) => false,
        }
    }

    /// Whether reads and writes bypass the page cache (O_DIRECT files and devices).
    pub(crate) fn is_direct(&self) -> bool {
        match &self.kind {
            Kind::File(v) => v.is_direct(),
            Kind::Rbd(_) | Kind::Null(_) => false,
        }
    }

    /// The volume's file, for the io_uring engine (files and block devices only).
    pub(crate) fn file(&self) -> Option<&File> {
        match &self.kind {
            Kind::File(v) => Some(v.file()),
            Kind::Rbd(_) | Kind::Null(_) => None,
        }
    }

    /// The volume's RBD image, for the librbd engine.
    pub(crate) fn rbd_image(&self) -> Option<&Arc<::rbd::Image>> {
        match &self.kind {
            Kind::Rbd(v) => Some(v.image()),
            Kind::File(_) | Kind::Null(_) => None,
        }
    }

    /// A file on FUSE or a network filesystem, whose I/O may wait for a server: never
    /// issued inline by a queue thread.
    pub(crate) fn waits_for_a_server(&self) -> bool {
        match &self.kind {
            Kind::File(v) => v.waits_for_a_server(),
            Kind::Rbd(_) => true,
            Kind::Null(_) => false,
        }
    }

    /// Whether I/O is a memory copy best made by the queue thread itself (a file in
    /// tmpfs, the null volume).
    pub(crate) fn is_memory_backed(&self) -> bool {
        match &self.kind {
            Kind::File(v) => v.is_memory_backed(),
            Kind::Rbd(_) => false,
            Kind::Null(_) => true,
        }
    }

    /// Whether a read or write of `slices` at `offset` goes straight to the volume as one
    /// vectored call: aligned for O_DIRECT (files) and at most `max_iovecs` buffers.
    pub(crate) fn direct_ok(&self, offset: u64, slices: &[VolatileSlice<'_, ()>]) -> bool {
        match &self.kind {
            Kind::File(v) => v.direct_ok(offset, slices),
            Kind::Rbd(v) => v.direct_ok(slices),
            Kind::Null(_) => true,
        }
    }

    /// Takes the write lock of `[offset, offset + len)` without waiting, for a write that
    /// completes after this call returns: `Ok(None)` when the volume needs no locks,
    /// `Ok(Some(range))` when held (release with [`Volume::unlock_write`]), `Err` when
    /// another write holds part of it.
    pub(crate) fn try_lock_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<LockedRange>, RangeBusy> {
        match &self.kind {
            Kind::File(v) => v.try_lock_write(offset, len),
            Kind::Rbd(_) | Kind::Null(_) => Ok(None),
        }
    }

    /// Releases a range taken by [`Volume::try_lock_write`].
    pub(crate) fn unlock_write(&self, range: LockedRange) {
        if let Kind::File(v) = &self.kind {
            v.unlock_write(range);
        }
    }

    /// Reads into guest buffers from byte `offset` (a multiple of 512, in range).
    pub(crate) fn read(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        each_kind!(self, v => v.read(offset, slices))
    }

    /// Writes guest buffers at byte `offset` (a multiple of 512, in range).
    pub(crate) fn write(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        each_kind!(self, v => v.write(offset, slices))
    }

    /// Makes every completed write durable.
    pub(crate) fn flush(&self) -> Result<(), VolumeError> {
        each_kind!(self, v => v.flush())
    }

    /// Discards `[offset, offset + len)`: a hint; data the volume cannot drop is kept.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        each_kind!(self, v => v.discard(offset, len))
    }

    /// Zeroes `[offset, offset + len)`; `unmap` lets the volume deallocate the range.
    pub(crate) fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), VolumeError> {
        each_kind!(self, v => v.write_zeroes(offset, len, unmap))
    }
}

/// An I/O error of `op` at `offset`.
fn io_err(op: &'static str, offset: u64) -> impl FnOnce(io::Error) -> VolumeError {
    move |source| VolumeError::Io { op, offset, source }
}
