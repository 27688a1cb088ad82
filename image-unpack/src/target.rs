//! The volume an image is unpacked onto: a block device or a regular file.
//!
//! [`Target::open`] probes what the kernel says about the volume (size, logical
//! and physical block size) and opens it for aligned direct I/O where it can.
//! Regular files count as 512-byte-sector volumes.

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
    file: File,
    /// A second, buffered descriptor for writes that O_DIRECT cannot take
    /// (unaligned head or tail of a range); `None` without O_DIRECT.
    buffered: Option<File>,
    info: TargetInfo,
    zero_methods: std::sync::Mutex<Vec<ZeroMethod>>,
}

impl Target {
    /// Opens `path` read-write, exclusively for block devices (so a mounted or
    /// otherwise claimed device is refused), with O_DIRECT where possible.
    pub fn open(path: &Path) -> Result<Target, TargetError> {
        Self::open_with(path, true)
    }

    /// Opens `path` read-only, for inspection; not exclusive, no O_DIRECT.
    pub fn open_read_only(path: &Path) -> Result<Target, TargetError> {
        Self::open_with(path, false)
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
            TargetKind::BlockDevice => (
                blockdev::size(&file).map_err(probe("size"))?,
                blockdev::logical_block_size(&file).map_err(probe("logical block size"))?,
                blockdev::physical_block_size(&file).map_err(probe("physical block size"))?,
            ),
            TargetKind::File => (meta.len(), 512, 512),
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
            file,
            buffered,
            info,
            zero_methods: Default::default(),
        })
    }

    /// What the kernel says about the target.
    pub fn info(&self) -> &TargetInfo {
        &self.info
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Alignment of offset, length and memory that lets a write bypass the
    /// page cache. Files use 4096, which satisfies O_DIRECT on any filesystem.
    pub fn alignment(&self) -> u64 {
        match self.info.kind {
            TargetKind::BlockDevice => u64::from(self.info.logical_block_size).max(512),
            TargetKind::File => 4096,
        }
    }

    /// Writes `buf` at `offset`: directly when offset, length and memory are
    /// aligned to [`Target::alignment`], through the page cache otherwise.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        let a = self.alignment();
        let aligned = offset % a == 0 && buf.len() as u64 % a == 0 && buf.as_ptr() as u64 % a == 0;
        let file = match (&self.buffered, aligned) {
            (Some(b), false) => b,
            _ => &self.file,
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
        let candidates: &[ZeroMethod] = match self.info.kind {
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
                ZeroMethod::BlkZeroout => blockdev::zero_out(&self.file, offset, len),
                ZeroMethod::PunchHole => sys::punch_hole(&self.file, offset, len),
                ZeroMethod::ZeroRange => sys::zero_range(&self.file, offset, len),
                ZeroMethod::Write => self.write_zeros(offset, len),
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
        for f in std::iter::once(&self.file).chain(self.buffered.as_ref()) {
            f.sync_data().map_err(|source| TargetError::Flush {
                path: self.info.path.clone(),
                source,
            })?;
        }
        if self.info.kind == TargetKind::BlockDevice {
            blockdev::flush_buffers(&self.file).map_err(|source| TargetError::Flush {
                path: self.info.path.clone(),
                source,
            })?;
        }
        Ok(())
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
