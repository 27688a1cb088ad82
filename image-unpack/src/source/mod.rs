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
//!
//! Entry points: [`open`] (a path; with [`OpenOptions::metadata`] for a split Incus
//! image), [`open_reader`] (any [`ReadAt`]), and [`probe`] (format and virtual size
//! without reading data, for `vmblk inspect`). Opening validates all metadata, so
//! a corrupt qcow2 map is refused before anything is written; only a corrupt
//! compressed cluster is found later, by `read_extent`, naming its guest offset.
//!
//! Memory stays bounded whatever the image size: the qcow2 walk holds the L1 table
//! (at most 32 MiB, and never more than the file) and one L2 table; each thread
//! inflating clusters keeps at most three clusters of scratch space.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod detect;
mod qcow2;
mod raw;
mod tar;

pub use detect::{detect, Detected, TarCompression};
pub use qcow2::{Compression, Qcow2Header, Qcow2Source};
pub use raw::RawSource;
pub use tar::{IncusMetadata, IncusSource};

/// Largest `Data` extent a source yields for stored (uncompressed) data: adjacent
/// contiguous clusters or raw chunks are merged up to this length so the writer
/// issues large I/Os, while its buffers stay bounded.
pub const MAX_DATA_EXTENT: u64 = 2 << 20;

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The metadata tarball of a split Incus image; the image path is then its rootfs file.
    pub metadata: Option<PathBuf>,
    /// Where a disk taken out of a compressed tarball is extracted to (an unlinked
    /// temporary file, removed when the source is dropped). Defaults to the
    /// system temporary directory.
    pub scratch_dir: Option<PathBuf>,
}

/// What [`probe`] finds without reading the image's data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbeInfo {
    /// The detected format.
    pub format: SourceFormat,
    /// Size of the guest-visible disk in bytes.
    pub virtual_size: u64,
}

/// Opens the image at `path`, detecting its format by content, and validates its
/// metadata (for qcow2: header, L1 and every L2 entry) before returning.
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn ImageSource>, SourceError> {
    let file = open_regular(path)?;
    let hole_file = file.try_clone().ok();
    let reader: Arc<dyn ReadAt> = Arc::new(
        FileReader::new(file).map_err(|e| SourceError::io("reading metadata of", path, e))?,
    );
    let inner = open_reader_with_file(reader, hole_file, opts)?;
    match &opts.metadata {
        Some(meta) => tar::open_split(inner, meta),
        None => Ok(inner),
    }
}

/// Opens an image held by any [`ReadAt`] (a file, a window of one, bytes in memory).
/// Split images are not handled here (see [`open`]).
pub fn open_reader(
    reader: Arc<dyn ReadAt>,
    opts: &OpenOptions,
) -> Result<Box<dyn ImageSource>, SourceError> {
    open_reader_with_file(reader, None, opts)
}

fn open_reader_with_file(
    reader: Arc<dyn ReadAt>,
    file: Option<File>,
    opts: &OpenOptions,
) -> Result<Box<dyn ImageSource>, SourceError> {
    match detect(reader.as_ref())? {
        Detected::Qcow2 => Ok(Box::new(Qcow2Source::open_with_holes(reader, file)?)),
        Detected::Raw => Ok(Box::new(RawSource::new(reader, file))),
        Detected::Tar(compression) => tar::open_unified(reader, compression, opts),
    }
}

/// Detects the format and virtual size of the image at `path` without reading its
/// data; a compressed tarball is streamed only up to the head of its `rootfs.img`.
pub fn probe(path: &Path, opts: &OpenOptions) -> Result<ProbeInfo, SourceError> {
    let file = open_regular(path)?;
    let reader: Arc<dyn ReadAt> = Arc::new(
        FileReader::new(file).map_err(|e| SourceError::io("reading metadata of", path, e))?,
    );
    let info = match detect(reader.as_ref())? {
        Detected::Qcow2 => {
            let header = Qcow2Header::read(reader.as_ref())?;
            ProbeInfo {
                format: header.format(),
                virtual_size: header.virtual_size,
            }
        }
        Detected::Raw => ProbeInfo {
            format: SourceFormat::Raw,
            virtual_size: reader.len(),
        },
        Detected::Tar(compression) => tar::probe_unified(reader, compression)?,
    };
    match &opts.metadata {
        Some(meta) => {
            let (compression, _) = tar::read_metadata_tarball(meta)?;
            Ok(ProbeInfo {
                format: SourceFormat::Incus {
                    layout: "split".into(),
                    compression: compression.name().into(),
                    inner: Box::new(info.format),
                },
                virtual_size: info.virtual_size,
            })
        }
        None => Ok(info),
    }
}

/// Opens `path` read-only and checks that it is a regular file.
fn open_regular(path: &Path) -> Result<File, SourceError> {
    let file = File::open(path).map_err(|e| SourceError::io("opening", path, e))?;
    let meta = file
        .metadata()
        .map_err(|e| SourceError::io("reading metadata of", path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "a directory"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_char_device() {
            "a character device"
        } else {
            "not a regular file"
        };
        return Err(SourceError::Unsupported(format!(
            "{} is {kind}; images must be regular files",
            path.display()
        )));
    }
    Ok(file)
}

/// Bytes in memory (tests, fuzzing, small images).
#[derive(Clone)]
pub struct MemReader(pub Arc<[u8]>);

impl MemReader {
    /// Wraps a copy of `bytes`.
    pub fn new(bytes: impl Into<Arc<[u8]>>) -> Self {
        Self(bytes.into())
    }
}

impl fmt::Debug for MemReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemReader({} bytes)", self.0.len())
    }
}

impl ReadAt for MemReader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(buf.len()));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.0.len() => {
                buf.copy_from_slice(&self.0[s..e]);
                Ok(())
            }
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of buffer",
            )),
        }
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
}

/// A sequential `Read + Seek` view of a [`ReadAt`], for stream parsers.
#[derive(Debug)]
pub(crate) struct ReadAtCursor<'a> {
    inner: &'a dyn ReadAt,
    pos: u64,
}

impl<'a> ReadAtCursor<'a> {
    pub(crate) fn new(inner: &'a dyn ReadAt) -> Self {
        Self { inner, pos: 0 }
    }
}

impl io::Read for ReadAtCursor<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.inner.len().saturating_sub(self.pos);
        let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(0);
        }
        self.inner.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl io::Seek for ReadAtCursor<'_> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let new = match pos {
            io::SeekFrom::Start(p) => Some(p),
            io::SeekFrom::End(d) => self.inner.len().checked_add_signed(d),
            io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek out of range",
            )),
        }
    }
}

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
                format!(
                    "read of {} bytes at {offset} past end of file ({} bytes)",
                    buf.len(),
                    self.len
                ),
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
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of window",
            ));
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
            SourceFormat::Qcow2 {
                version,
                cluster_size,
                compression,
                extended_l2,
            } => {
                write!(
                    f,
                    "qcow2 v{version} ({cluster_size}-byte clusters, {compression}"
                )?;
                if *extended_l2 {
                    write!(f, ", extended L2")?;
                }
                write!(f, ")")
            }
            SourceFormat::Incus {
                layout,
                compression,
                inner,
            } => {
                write!(
                    f,
                    "incus {layout} image ({compression} tarball) holding {inner}"
                )
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
    /// Like [`ImageSource::extents`], but starting with the extent that contains
    /// `guest_offset` (it may begin before it); empty at or past the end. Sources
    /// start their walk there instead of at offset 0, so reading a few sectors
    /// anywhere in the disk stays cheap.
    fn extents_from(
        &self,
        guest_offset: u64,
    ) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        Box::new(skip_before(self.extents(), guest_offset))
    }
    /// Largest `len` of a `Data` extent (for buffer sizing); a cluster for qcow2.
    fn max_extent_len(&self) -> u64;
    /// Fills `buf` (exactly `extent.len` bytes) with the guest data of `extent`,
    /// decompressing if needed. Thread-safe.
    ///
    /// A plain `Data` extent (`compressed_len == None`) may be split by the caller:
    /// the piece `[guest_offset + d, guest_offset + d + n)` is read with
    /// `host_offset + d` and length `n`. Compressed extents are read whole.
    ///
    /// `extent` must be one yielded by [`ImageSource::extents`]; a plain `Data`
    /// extent (`compressed_len: None`) may also be cut into pieces (advance
    /// `guest_offset` and `host_offset` together), a compressed one may not.
    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<(), SourceError>;
    /// The Incus metadata found next to the disk, for Incus images.
    fn incus_metadata(&self) -> Option<&IncusMetadata> {
        None
    }
}

/// Drops the extents that end at or before `guest_offset` (errors are kept).
pub(crate) fn skip_before<'a>(
    it: impl Iterator<Item = Result<Extent, SourceError>> + Send + 'a,
    guest_offset: u64,
) -> impl Iterator<Item = Result<Extent, SourceError>> + Send + 'a {
    it.skip_while(move |e| matches!(e, Ok(e) if e.guest_offset + e.len <= guest_offset))
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
    #[error(
        "compressed cluster at guest offset {guest_offset} (file offset {host_offset}) is corrupt"
    )]
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

impl SourceError {
    pub(crate) fn io(what: &'static str, path: &Path, source: io::Error) -> Self {
        SourceError::Io {
            what,
            path: path.display().to_string(),
            source,
        }
    }

    pub(crate) fn read(what: &'static str, offset: u64, source: io::Error) -> Self {
        SourceError::Read {
            what,
            offset,
            source,
        }
    }

    /// True when the image itself is at fault (malformed, refused or unreadable as an
    /// image), as opposed to an I/O failure of the host.
    pub fn is_bad_image(&self) -> bool {
        matches!(
            self,
            SourceError::Corrupt(_)
                | SourceError::Unsupported(_)
                | SourceError::Unrecognised(_)
                | SourceError::Decompress { .. }
        )
    }
}
