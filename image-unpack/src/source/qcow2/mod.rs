//! qcow2 images, versions 2 and 3, read-only and without backing files.
//!
//! ```text
//!  header.rs    header (big-endian, zerocopy) ──► validate
//!                   │
//!  metadata.rs  L1 table, each distinct L2 table once, every descriptor checked
//!               against the file and the metadata's own clusters (at open)
//!                   │
//!  walk.rs      per L1 entry, lazily: one L2 table (standard or extended entries,
//!               decoded by entry.rs) ──► extents in guest order
//!                   │
//!          Zero | Data{plain, merged while host-contiguous} | Data{compressed: one cluster}
//!                                                                   │
//!  compressed.rs                                      inflate / zstd-decode (read_extent)
//! ```
//!
//! Opening reads every L2 table of the active L1 table once and checks each entry
//! (alignment, offsets inside the file, clear of the header, L1, L2 and refcount
//! tables), in time linear in the metadata, so a corrupt or hostile map is refused
//! before anything is written; [`ImageSource::extents`] walks the tables again lazily,
//! holding one L2 table at a time.

use std::fs::File;
use std::sync::Arc;

mod compressed;
mod entry;
mod header;
mod metadata;
mod walk;

pub use header::{Compression, Qcow2Header};

use super::{
    skip_before, Extent, ExtentKind, ImageSource, ReadAt, SourceError, SourceFormat,
    MAX_DATA_EXTENT,
};

fn corrupt(msg: impl Into<String>) -> SourceError {
    SourceError::Corrupt(msg.into())
}

/// A qcow2 image opened for reading.
#[derive(Debug)]
pub struct Qcow2Source {
    reader: Arc<dyn ReadAt>,
    header: Qcow2Header,
    /// The active L1 table's used entries (L2 table offsets, 0: unallocated), the
    /// whole map validated.
    l1: Vec<u64>,
    /// The file behind `reader`, when it is a whole file: data clusters that lie in
    /// its holes (preallocated metadata) are reported as zero.
    holes: Option<File>,
}

impl Qcow2Source {
    /// Opens a qcow2 image: validates the header, the L1 table, each L2 table and
    /// every entry.
    pub fn open(reader: Arc<dyn ReadAt>) -> Result<Self, SourceError> {
        Self::open_with_holes(reader, None)
    }

    /// Like [`Qcow2Source::open`]; `file`, when given, must be the same whole file as
    /// `reader` and is used only to find holes (`SEEK_DATA`/`SEEK_HOLE`), so that
    /// allocated clusters nothing was written to read as zero extents.
    pub fn open_with_holes(
        reader: Arc<dyn ReadAt>,
        file: Option<File>,
    ) -> Result<Self, SourceError> {
        let header = Qcow2Header::read(reader.as_ref())?;
        let l1 = metadata::validate(reader.as_ref(), &header)?;
        Ok(Qcow2Source {
            reader,
            header,
            l1,
            holes: file,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }
}

impl ImageSource for Qcow2Source {
    fn format(&self) -> SourceFormat {
        self.header.format()
    }

    fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        Box::new(self.walk_from(0))
    }

    fn extents_from(
        &self,
        guest_offset: u64,
    ) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        Box::new(skip_before(self.walk_from(guest_offset), guest_offset))
    }

    fn max_extent_len(&self) -> u64 {
        MAX_DATA_EXTENT.max(self.header.cluster_size())
    }

    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<(), SourceError> {
        if buf.len() as u64 != extent.len {
            return Err(corrupt(format!(
                "buffer of {} bytes for extent of {} at guest offset {}",
                buf.len(),
                extent.len,
                extent.guest_offset
            )));
        }
        match extent.kind {
            ExtentKind::Zero => {
                buf.fill(0);
                Ok(())
            }
            ExtentKind::Data {
                host_offset,
                compressed_len: None,
            } => self
                .reader
                .read_exact_at(buf, host_offset)
                .map_err(|e| SourceError::read("qcow2 data cluster", host_offset, e)),
            ExtentKind::Data {
                host_offset,
                compressed_len: Some(clen),
            } => {
                if extent.len > self.header.cluster_size() {
                    return Err(corrupt(format!(
                        "compressed extent of {} bytes at guest offset {} is larger than a cluster",
                        extent.len, extent.guest_offset
                    )));
                }
                self.read_compressed(extent, host_offset, clen, buf)
            }
        }
    }
}

#[cfg(test)]
mod tests;
