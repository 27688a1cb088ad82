//! Image sources: what an image holds, detected by content, never by file name.
//!
//! ```text
//!   open(path) ──► detect() ──► Raw ─────────────┐
//!                     │                          │
//!                     ├──► Qcow2 ────────────────┼──► Box<dyn ImageSource>
//!                     │                          │        │ extents()   (guest order, Zero / Data)
//!                     └──► Tar (plain/gz/xz/zst)─┘        │ read_extent() (thread-safe, decompresses)
//!                           └─ Incus unified: rootfs.img inside, itself raw or qcow2
//! ```
//!
//! A source describes the guest-visible disk as a sequence of [`Extent`]s that
//! cover `[0, virtual_size)` in order without gaps. Extents marked
//! [`ExtentKind::Zero`] read as zeros and the writer never reads them; `Data`
//! extents are filled by [`ImageSource::read_extent`], which takes `&self` and
//! may be called from several threads at once, so compressed clusters can be
//! inflated in parallel.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Positional, thread-safe reads from a file or a window of one.
pub trait ReadAt: Send + Sync + fmt::Debug {
    /// Reads exactly `buf.len()` bytes at `offset`; `UnexpectedEof` past the end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Length in bytes.
    fn len(&self) -> u64;
    /// True when the length is zero.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A whole file.
#[derive(Debug)]
pub struct FileReader {
    file: File,
    len: u64,
}

impl FileReader {
    /// Wraps an open file; its length is taken once.
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self { file, len })
    }
}

impl ReadAt for FileReader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if end > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {} bytes at {offset} past end of file ({} bytes)", buf.len(), self.len),
            ));
        }
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn len(&self) -> u64 {
        self.len
    }
}

/// A window `[base, base + len)` of another reader (a tar member, for example).
#[derive(Debug, Clone)]
pub struct SliceReader {
    inner: Arc<dyn ReadAt>,
    base: u64,
    len: u64,
}

impl SliceReader {
    /// Creates a window; fails if it does not fit inside `inner`.
    pub fn new(inner: Arc<dyn ReadAt>, base: u64, len: u64) -> io::Result<Self> {
        match base.checked_add(len) {
            Some(end) if end <= inner.len() => Ok(Self { inner, base, len }),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("window {base}+{len} does not fit in {} bytes", inner.len()),
            )),
        }
    }
}

impl ReadAt for SliceReader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        if end > self.len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "read past end of window"));
        }
        self.inner.read_exact_at(buf, self.base + offset)
    }
    fn len(&self) -> u64 {
        self.len
    }
}

/// What kind of image a source is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// A raw disk image.
    Raw,
    /// qcow2, with its version, cluster size and compression type.
    Qcow2 {
        /// 2 or 3.
        version: u32,
        /// Bytes per cluster.
        cluster_size: u64,
        /// "zlib" or "zstd".
        compression: String,
        /// Extended L2 entries (subclusters).
        extended_l2: bool,
    },
    /// An Incus image: `rootfs.img` taken from a unified tarball, or the rootfs file of a
    /// split image; `inner` is the format of the disk itself.
    Incus {
        /// "unified" or "split".
        layout: String,
        /// Compression of the tarball holding the disk: "none", "gzip", "xz" or "zstd".
        compression: String,
        /// The disk inside.
        inner: Box<SourceFormat>,
    },
}

impl fmt::Display for SourceFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceFormat::Raw => write!(f, "raw"),
            SourceFormat::Qcow2 { version, cluster_size, compression, extended_l2 } => {
                write!(f, "qcow2 v{version} ({cluster_size}-byte clusters, {compression}")?;
                if *extended_l2 {
                    write!(f, ", extended L2")?;
                }
                write!(f, ")")
            }
            SourceFormat::Incus { layout, compression, inner } => {
                write!(f, "incus {layout} image ({compression} tarball) holding {inner}")
            }
        }
    }
}

/// How an extent's bytes are obtained. The payload is private to the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Reads as zeros; the source holds nothing for it.
    Zero,
    /// Stored data at `host_offset` in the source's file. `compressed_len` is
    /// `Some(n)` for a compressed qcow2 cluster of at most `n` bytes on disk.
    Data {
        /// Where the bytes (or compressed bytes) start in the source file.
        host_offset: u64,
        /// Size on disk of a compressed cluster; `None` when stored plain.
        compressed_len: Option<u64>,
    },
}

/// A run of the guest disk `[guest_offset, guest_offset + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the guest-visible disk.
    pub guest_offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// Where the bytes come from.
    pub kind: ExtentKind,
}

/// A guest disk image, opened and validated.
pub trait ImageSource: Send + Sync + fmt::Debug {
    /// The detected format.
    fn format(&self) -> SourceFormat;
    /// Size of the guest-visible disk in bytes.
    fn virtual_size(&self) -> u64;
    /// The extents covering `[0, virtual_size)` in guest order, without gaps.
    /// Adjacent extents of the same kind may or may not be merged. A `Data`
    /// extent is never longer than [`ImageSource::max_extent_len`].
    fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_>;
    /// Largest `len` of a `Data` extent (for buffer sizing); a cluster for qcow2.
    fn max_extent_len(&self) -> u64;
    /// Fills `buf` (exactly `extent.len` bytes) with the guest data of `extent`,
    /// decompressing if needed. Thread-safe.
    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<(), SourceError>;
}

/// Why an image could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Reading the image file failed.
    #[error("reading {what} at offset {offset}")]
    Read {
        /// What was being read.
        what: &'static str,
        /// Offset in the source file.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The image is malformed: the message says what and where.
    #[error("corrupt image: {0}")]
    Corrupt(String),
    /// The image is valid but uses something vmblk refuses (backing file, encryption, ...).
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// The image format was not recognised.
    #[error("unrecognised image format: {0}")]
    Unrecognised(String),
    /// A compressed cluster did not inflate.
    #[error("compressed cluster at guest offset {guest_offset} (file offset {host_offset}) is corrupt")]
    Decompress {
        /// Guest offset of the cluster.
        guest_offset: u64,
        /// File offset of the compressed data.
        host_offset: u64,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// Opening or extracting the image failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path involved.
        path: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}
