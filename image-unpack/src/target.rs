//! The volume an image is unpacked onto: a block device, a regular file, or an RBD
//! image (`rbd:POOL/IMAGE...`, through librbd).
//!
//! [`Target::open`] probes what the kernel says about the volume (size, logical
//! and physical block size) and opens it for aligned direct I/O where it can.
//! Regular files count as 512-byte-sector volumes, and so do RBD images: librbd is
//! byte-addressed, so partition work on them needs no bridge.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::sys;

/// Why a target could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The target does not exist.
    #[error("target {0} does not exist")]
    Missing(PathBuf),
    /// The target is in use (mounted, or held open exclusively).
    #[error("target {0} is busy (mounted or held open exclusively by another program)")]
    Busy(PathBuf),
    /// The target is neither a block device nor a regular file.
    #[error("target {0} is neither a block device nor a regular file")]
    NotAVolume(PathBuf),
    /// Opening the target failed.
    #[error("opening target {path}")]
    Open {
        /// The target path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Asking the kernel about the target failed.
    #[error("probing {what} of target {path}")]
    Probe {
        /// What was asked (size, logical block size, ...).
        what: &'static str,
        /// The target path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing to the target failed.
    #[error("writing {len} bytes at offset {offset} of target {path}")]
    Write {
        /// The target path.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Zeroing a range failed with every method available.
    #[error("zeroing {len} bytes at offset {offset} of target {path}")]
    Zero {
        /// The target path.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// Byte count.
        len: u64,
        /// The OS error of the last method tried.
        #[source]
        source: io::Error,
    },
    /// The RBD image could not be reached, opened, created or written.
    #[error("RBD target {path}")]
    Rbd {
        /// The target address.
        path: PathBuf,
        /// Cause (names the call: connect, open pool, open image, write, ...).
        #[source]
        source: rbd::RbdError,
    },
    /// The RBD image does not exist and no size to create it with was given.
    #[error("RBD image {0} does not exist (give a size to create it)")]
    RbdMissing(PathBuf),
    /// The RBD image exists with another size than the one asked to create.
    #[error("RBD image {path} exists with {size} bytes, not the {asked} asked to create")]
    RbdSizeMismatch {
        /// The target address.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The size asked for.
        asked: u64,
    },
    /// Flushing the target failed.
    #[error("flushing target {path}")]
    Flush {
        /// The target path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Whether a target is a block device or a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    /// A block device (NVMe namespace, partition, loop device, ...).
    BlockDevice,
    /// A regular file (sparse volume file of a `dir` pool).
    File,
    /// An RBD image, through librbd.
    Rbd,
}

/// How a range was made to read back as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZeroMethod {
    /// BLKZEROOUT on a block device (WRITE ZEROES/unmap where offered).
    BlkZeroout,
    /// fallocate(PUNCH_HOLE) on a file: the range is deallocated.
    PunchHole,
    /// fallocate(ZERO_RANGE) on a file.
    ZeroRange,
    /// Plain writes of zero buffers (no faster method worked).
    Write,
    /// librbd's write-zeroes (whole objects deallocated, the rest zeroed).
    RbdWriteZeroes,
    /// Nothing to do: the RBD image was created for this unpack, and reads as zeros
    /// wherever nothing was written.
    AlreadyZero,
}

/// What the kernel says about a target.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TargetInfo {
    /// Path as given.
    pub path: PathBuf,
    /// Block device or file.
    pub kind: TargetKind,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size (512 for files).
    pub logical_block_size: u32,
    /// Physical block size (512 for files).
    pub physical_block_size: u32,
    /// Whether writes bypass the page cache (O_DIRECT).
    pub direct_io: bool,
}

/// An open volume.
#[derive(Debug)]
pub struct Target {
    io: TargetIo,
    info: TargetInfo,
    zero_methods: std::sync::Mutex<Vec<ZeroMethod>>,
    /// Reads as zeros wherever nothing was written (just created): zeroing is a no-op.
    zeroed: bool,
}

#[derive(Debug)]
enum TargetIo {
    File {
        file: File,
        /// A second, buffered descriptor for writes that O_DIRECT cannot take
        /// (unaligned head or tail of a range); `None` without O_DIRECT.
        buffered: Option<File>,
    },
    Rbd {
        image: rbd::Image,
        /// Created for this unpack: reads as zeros wherever nothing was written.
        created: bool,
    },
}

/// How long opening an RBD target waits for the cluster's monitors.
const RBD_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Target {
    /// Opens `path` read-write, exclusively for block devices (so a mounted or
    /// otherwise claimed device is refused), with O_DIRECT where possible.
    pub fn open(path: &Path) -> Result<Target, TargetError> {
        Self::open_or_create(path, None)
    }

    /// Like [`Target::open`]; an RBD image that does not exist is created with
    /// `create_size` bytes if given (an existing one must have that size).
    pub fn open_or_create(path: &Path, create_size: Option<u64>) -> Result<Target, TargetError> {
        match rbd_spec(path)? {
            Some(spec) => Self::open_rbd(path, &spec, true, create_size),
            None => Self::open_with(path, true),
        }
    }

    /// Opens `path` read-only, for inspection; not exclusive, no O_DIRECT.
    pub fn open_read_only(path: &Path) -> Result<Target, TargetError> {
        match rbd_spec(path)? {
            Some(spec) => Self::open_rbd(path, &spec, false, None),
            None => Self::open_with(path, false),
        }
    }

    fn open_rbd(
        path: &Path,
        spec: &rbd::RbdSpec,
        write: bool,
        create_size: Option<u64>,
    ) -> Result<Target, TargetError> {
        let err = |source| TargetError::Rbd {
            path: path.to_owned(),
            source,
        };
        let mut opts = rbd::ClusterOptions::from_spec(spec);
        opts.connect_timeout = Some(RBD_CONNECT_TIMEOUT);
        let cluster = rbd::Cluster::connect(&opts).map_err(err)?;
        let pool = cluster.pool(&spec.pool, &spec.namespace).map_err(err)?;
        let snapshot = spec.snapshot.as_deref();
        let mut created = false;
        let image = match rbd::Image::open(&pool, &spec.image, snapshot, !write) {
            Err(e) if e.is_not_found() && write && snapshot.is_none() => {
                let Some(size) = create_size else {
                    return Err(TargetError::RbdMissing(path.to_owned()));
                };
                rbd::Image::create(&pool, &spec.image, size).map_err(err)?;
                created = true;
                tracing::info!(image = %spec.image_path(), size, "RBD image created");
                rbd::Image::open(&pool, &spec.image, None, false).map_err(err)?
            }
            r => r.map_err(err)?,
        };
        if write && image.is_read_only() {
            return Err(TargetError::Open {
                path: path.to_owned(),
                source: io::Error::from_raw_os_error(libc::EROFS),
            });
        }
        let size = image.size().map_err(err)?;
        if let Some(asked) = create_size.filter(|&a| a != size && !created) {
            return Err(TargetError::RbdSizeMismatch {
                path: path.to_owned(),
                size,
                asked,
            });
        }
        let info = TargetInfo {
            path: path.to_owned(),
            kind: TargetKind::Rbd,
            size,
            logical_block_size: 512,
            physical_block_size: 512,
            direct_io: false,
        };
        tracing::debug!(?info, created, "opened RBD target");
        Ok(Target {
            io: TargetIo::Rbd { image, created },
            info,
            zero_methods: Default::default(),
            zeroed: false,
        })
    }

    fn open_with(path: &Path, write: bool) -> Result<Target, TargetError> {
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                TargetError::Missing(path.to_owned())
            } else {
                TargetError::Open {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })?;
        let kind = if meta.file_type().is_block_device() {
            TargetKind::BlockDevice
        } else if meta.is_file() {
            TargetKind::File
        } else {
            return Err(TargetError::NotAVolume(path.to_owned()));
        };
        let open = |flags: libc::c_int| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(flags)
                .open(path)
        };
        let excl = if write && kind == TargetKind::BlockDevice {
            libc::O_EXCL
        } else {
            0
        };
        let map_open = |e: io::Error| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                TargetError::Busy(path.to_owned())
            } else {
                TargetError::Open {
                    path: path.to_owned(),
                    source: e,
                }
            }
        };
        let (file, direct_io) = if write {
            match open(excl | libc::O_DIRECT) {
                Ok(f) => (f, true),
                // tmpfs and some FUSE filesystems refuse O_DIRECT.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    (open(excl).map_err(map_open)?, false)
                }
                Err(e) => return Err(map_open(e)),
            }
        } else {
            (open(0).map_err(map_open)?, false)
        };
        let buffered = if direct_io {
            Some(open(0).map_err(map_open)?)
        } else {
            None
        };
        let probe = |what: &'static str| {
            move |source: io::Error| TargetError::Probe {
                what,
                path: path.to_owned(),
                source,
            }
        };
        let (size, lbs, pbs) = match kind {
            TargetKind::BlockDevice => {
                let g = blockdev::probe(&file).map_err(probe("size and sector sizes"))?;
                (g.size, g.logical_block_size, g.physical_block_size)
            }
            TargetKind::File | TargetKind::Rbd => (meta.len(), 512, 512),
        };
        let info = TargetInfo {
            path: path.to_owned(),
            kind,
            size,
            logical_block_size: lbs,
            physical_block_size: pbs.max(lbs),
            direct_io,
        };
        tracing::debug!(?info, "opened target");
        Ok(Target {
            io: TargetIo::File { file, buffered },
            info,
            zero_methods: Default::default(),
            zeroed: false,
        })
    }

    /// The caller created the target just now: it reads as zeros wherever nothing was
    /// written, so zero ranges are not written (never zeros into a thin image).
    pub fn assume_zeroed(&mut self) {
        self.zeroed = true;
    }

    /// What the kernel says about the target.
    pub fn info(&self) -> &TargetInfo {
        &self.info
    }

    /// The open file (block devices and regular files).
    pub fn file(&self) -> Option<&File> {
        match &self.io {
            TargetIo::File { file, .. } => Some(file),
            TargetIo::Rbd { .. } => None,
        }
    }

    /// The open RBD image (RBD targets).
    pub fn rbd_image(&self) -> Option<&rbd::Image> {
        match &self.io {
            TargetIo::Rbd { image, .. } => Some(image),
            TargetIo::File { .. } => None,
        }
    }

    /// Alignment of offset, length and memory that lets a write bypass the
    /// page cache. Files use 4096, which satisfies O_DIRECT on any filesystem.
    pub fn alignment(&self) -> u64 {
        match self.info.kind {
            TargetKind::BlockDevice => u64::from(self.info.logical_block_size).max(512),
            TargetKind::File => 4096,
            TargetKind::Rbd => 512,
        }
    }

    /// Writes `buf` at `offset`: directly when offset, length and memory are
    /// aligned to [`Target::alignment`], through the page cache otherwise.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        let (file, buffered) = match &self.io {
            TargetIo::File { file, buffered } => (file, buffered),
            TargetIo::Rbd { image, .. } => {
                return image
                    .write_at(buf, offset)
                    .map_err(|source| TargetError::Rbd {
                        path: self.info.path.clone(),
                        source,
                    })
            }
        };
        let a = self.alignment();
        let aligned = offset % a == 0 && buf.len() as u64 % a == 0 && buf.as_ptr() as u64 % a == 0;
        let file = match (buffered, aligned) {
            (Some(b), false) => b,
            _ => file,
        };
        file.write_all_at(buf, offset)
            .map_err(|source| TargetError::Write {
                path: self.info.path.clone(),
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    /// Makes `[offset, offset + len)` read back as zeros without writing it byte
    /// by byte where the volume allows; returns the method used. `offset` and
    /// `len` must be multiples of the logical block size.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<ZeroMethod, TargetError> {
        if len == 0 {
            return Ok(ZeroMethod::Write);
        }
        if self.zeroed {
            return Ok(ZeroMethod::AlreadyZero);
        }
        let file = match &self.io {
            TargetIo::File { file, .. } => file,
            // Never write zeros into a thin image that has nothing there yet.
            TargetIo::Rbd { created: true, .. } => return Ok(ZeroMethod::AlreadyZero),
            TargetIo::Rbd { image, .. } => {
                return image
                    .write_zeroes(offset, len)
                    .map(|()| ZeroMethod::RbdWriteZeroes)
                    .map_err(|source| TargetError::Rbd {
                        path: self.info.path.clone(),
                        source,
                    })
            }
        };
        let candidates: &[ZeroMethod] = match self.info.kind {
            TargetKind::Rbd => &[],
            TargetKind::BlockDevice => &[ZeroMethod::BlkZeroout, ZeroMethod::Write],
            TargetKind::File => &[
                ZeroMethod::PunchHole,
                ZeroMethod::ZeroRange,
                ZeroMethod::Write,
            ],
        };
        let mut last_err = None;
        for &m in candidates {
            if self.method_failed_before(m) {
                continue;
            }
            let r = match m {
                ZeroMethod::BlkZeroout => blockdev::zero_out(file, offset, len),
                ZeroMethod::PunchHole => sys::punch_hole(file, offset, len),
                ZeroMethod::ZeroRange => sys::zero_range(file, offset, len),
                ZeroMethod::Write => self.write_zeros(offset, len),
                ZeroMethod::RbdWriteZeroes | ZeroMethod::AlreadyZero => continue,
            };
            match r {
                Ok(()) => return Ok(m),
                Err(e) if m != ZeroMethod::Write && is_unsupported(&e) => {
                    tracing::debug!(method = ?m, error = %e, "zeroing method unavailable");
                    self.mark_failed(m);
                    last_err = Some(e);
                }
                Err(e) => {
                    return Err(TargetError::Zero {
                        path: self.info.path.clone(),
                        offset,
                        len,
                        source: e,
                    })
                }
            }
        }
        Err(TargetError::Zero {
            path: self.info.path.clone(),
            offset,
            len,
            source: last_err.unwrap_or_else(|| io::Error::other("no zeroing method")),
        })
    }

    fn method_failed_before(&self, m: ZeroMethod) -> bool {
        self.zero_methods
            .lock()
            .map(|v| v.contains(&m))
            .unwrap_or(false)
    }

    fn mark_failed(&self, m: ZeroMethod) {
        if let Ok(mut v) = self.zero_methods.lock() {
            v.push(m);
        }
    }

    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: usize = 1 << 20;
        let buf = sys::AlignedBuf::new(CHUNK, 4096)?;
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(CHUNK as u64) as usize;
            self.write_at(&buf[..n], offset).map_err(|e| match e {
                TargetError::Write { source, .. } => source,
                other => io::Error::other(other.to_string()),
            })?;
            offset += n as u64;
        }
        Ok(())
    }

    /// Flushes written data to stable storage.
    pub fn sync(&self) -> Result<(), TargetError> {
        let (file, buffered) = match &self.io {
            TargetIo::File { file, buffered } => (file, buffered),
            TargetIo::Rbd { image, .. } => {
                return image.flush().map_err(|source| TargetError::Rbd {
                    path: self.info.path.clone(),
                    source,
                })
            }
        };
        for f in std::iter::once(file).chain(buffered.as_ref()) {
            f.sync_data().map_err(|source| TargetError::Flush {
                path: self.info.path.clone(),
                source,
            })?;
        }
        if self.info.kind == TargetKind::BlockDevice {
            blockdev::flush_buffers(file).map_err(|source| TargetError::Flush {
                path: self.info.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

/// The RBD address `path` holds, if it is one (`rbd:...`).
pub fn rbd_spec(path: &Path) -> Result<Option<rbd::RbdSpec>, TargetError> {
    match path.to_str() {
        Some(s) if rbd::RbdSpec::is_rbd(s) => {
            rbd::RbdSpec::parse(s)
                .map(Some)
                .map_err(|e| TargetError::Rbd {
                    path: path.to_owned(),
                    source: e.into(),
                })
        }
        _ => Ok(None),
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_target_is_named() {
        let e = Target::open(Path::new("/nonexistent/vmblk-target")).unwrap_err();
        assert!(matches!(e, TargetError::Missing(_)), "{e}");
        assert!(e.to_string().contains("/nonexistent/vmblk-target"));
    }

    #[test]
    fn directory_is_not_a_volume() {
        let d = tempfile::tempdir().unwrap();
        let e = Target::open(d.path()).unwrap_err();
        assert!(matches!(e, TargetError::NotAVolume(_)), "{e}");
    }

    #[test]
    fn file_target_counts_as_512_and_zeroes_by_punching() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        use std::io::Write;
        f.write_all(&vec![0x5A; 1 << 20]).unwrap();
        let t = Target::open(f.path()).unwrap();
        assert_eq!(t.info().kind, TargetKind::File);
        assert_eq!(t.info().logical_block_size, 512);
        assert_eq!(t.info().size, 1 << 20);
        let m = t.zero_range(65536, 131072).unwrap();
        assert!(matches!(
            m,
            ZeroMethod::PunchHole | ZeroMethod::ZeroRange | ZeroMethod::Write
        ));
        let buf = std::fs::read(f.path()).unwrap();
        assert!(buf[..65536].iter().all(|&b| b == 0x5A));
        assert!(buf[65536..196608].iter().all(|&b| b == 0));
        assert!(buf[196608..].iter().all(|&b| b == 0x5A));
    }
}
