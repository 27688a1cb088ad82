//! Raw disk images: the file is the disk. Holes found with `SEEK_DATA`/`SEEK_HOLE`
//! are reported as zero extents; everything else is data in bounded chunks.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use super::{Extent, ExtentKind, ImageSource, ReadAt, SourceError, SourceFormat, MAX_DATA_EXTENT};

/// A raw image.
#[derive(Debug)]
pub struct RawSource {
    reader: Arc<dyn ReadAt>,
    /// The file behind `reader` when it is a whole file, used to find holes.
    holes: Option<File>,
}

impl RawSource {
    /// A raw image read through `reader`; `file`, when given, must be the same
    /// whole file and is used only to find holes.
    pub fn new(reader: Arc<dyn ReadAt>, file: Option<File>) -> Self {
        Self {
            reader,
            holes: file,
        }
    }

    /// The next data region at or after `pos`: `Some((start, end))`, `None` if
    /// only holes remain. Without hole information the whole rest is data.
    fn next_data(&self, pos: u64, size: u64) -> (u64, u64) {
        let Some(file) = &self.holes else {
            return (pos, size);
        };
        let fd = file.as_raw_fd();
        let Ok(p) = i64::try_from(pos) else {
            return (pos, size);
        };
        let start = match lseek(fd, p, Whence::SeekData) {
            Ok(s) => s as u64,
            Err(Errno::ENXIO) => return (size, size),
            // SEEK_DATA unsupported here: treat everything as data.
            Err(_) => return (pos, size),
        };
        let end = match lseek(fd, start as i64, Whence::SeekHole) {
            Ok(e) => e as u64,
            Err(_) => size,
        };
        (start.min(size), end.clamp(start.min(size), size))
    }
}

impl ImageSource for RawSource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Raw
    }

    fn virtual_size(&self) -> u64 {
        self.reader.len()
    }

    fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        self.extents_from(0)
    }

    fn extents_from(
        &self,
        guest_offset: u64,
    ) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        Box::new(RawExtents {
            src: self,
            pos: guest_offset,
            data_end: 0,
            size: self.reader.len(),
        })
    }

    fn max_extent_len(&self) -> u64 {
        MAX_DATA_EXTENT
    }

    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<(), SourceError> {
        match extent.kind {
            ExtentKind::Zero => {
                buf.fill(0);
                Ok(())
            }
            ExtentKind::Data {
                host_offset,
                compressed_len: None,
            } => {
                if buf.len() as u64 != extent.len {
                    return Err(SourceError::Corrupt(format!(
                        "buffer of {} bytes for extent of {} at guest offset {}",
                        buf.len(),
                        extent.len,
                        extent.guest_offset
                    )));
                }
                self.reader
                    .read_exact_at(buf, host_offset)
                    .map_err(|e| SourceError::read("raw image data", host_offset, e))
            }
            ExtentKind::Data {
                compressed_len: Some(_),
                ..
            } => Err(SourceError::Corrupt(format!(
                "compressed extent at guest offset {} asked of a raw image",
                extent.guest_offset
            ))),
        }
    }
}

struct RawExtents<'a> {
    src: &'a RawSource,
    pos: u64,
    /// End of the data region `pos` is in (`pos == data_end`: look up the next one).
    data_end: u64,
    size: u64,
}

impl Iterator for RawExtents<'_> {
    type Item = Result<Extent, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.size {
            return None;
        }
        if self.pos >= self.data_end {
            let (start, end) = self.src.next_data(self.pos, self.size);
            if start > self.pos {
                let e = Extent {
                    guest_offset: self.pos,
                    len: start - self.pos,
                    kind: ExtentKind::Zero,
                };
                self.pos = start;
                self.data_end = end;
                return Some(Ok(e));
            }
            self.data_end = end.max(self.pos + 1).min(self.size);
        }
        let len = (self.data_end - self.pos).min(MAX_DATA_EXTENT);
        let e = Extent {
            guest_offset: self.pos,
            len,
            kind: ExtentKind::Data {
                host_offset: self.pos,
                compressed_len: None,
            },
        };
        self.pos += len;
        Some(Ok(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{FileReader, MemReader};
    use std::io::{Seek, SeekFrom, Write};

    fn collect(src: &dyn ImageSource) -> Vec<Extent> {
        src.extents().collect::<Result<Vec<_>, _>>().unwrap()
    }

    fn assemble(src: &dyn ImageSource) -> Vec<u8> {
        let mut out = vec![0u8; src.virtual_size() as usize];
        for e in collect(src) {
            let r = e.guest_offset as usize..(e.guest_offset + e.len) as usize;
            src.read_extent(&e, &mut out[r]).unwrap();
        }
        out
    }

    #[test]
    fn memory_image_is_chunked_data() {
        let bytes: Vec<u8> = (0..5 * MAX_DATA_EXTENT + 17)
            .map(|i| (i % 251) as u8)
            .collect();
        let src = RawSource::new(Arc::new(MemReader::new(bytes.clone())), None);
        let ex = collect(&src);
        assert_eq!(ex.len(), 6);
        assert!(ex.iter().all(|e| e.len <= MAX_DATA_EXTENT));
        assert_eq!(assemble(&src), bytes);
    }

    #[test]
    fn holes_become_zero_extents() {
        let mut f = tempfile::tempfile().unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(16 << 20)).unwrap();
        f.write_all(&[0xaa; 1 << 20]).unwrap();
        let reader = Arc::new(FileReader::new(f.try_clone().unwrap()).unwrap());
        let src = RawSource::new(reader, Some(f));
        let ex = collect(&src);
        let zero: u64 = ex
            .iter()
            .filter(|e| e.kind == ExtentKind::Zero)
            .map(|e| e.len)
            .sum();
        // tmpfs and ext4 report holes; a file system that does not is all data.
        assert!(zero == 0 || zero >= 60 << 20, "zero bytes {zero}");
        let mut pos = 0;
        for e in &ex {
            assert_eq!(e.guest_offset, pos);
            pos += e.len;
        }
        assert_eq!(pos, 64 << 20);
        let out = assemble(&src);
        assert!(out[16 << 20..17 << 20].iter().all(|&b| b == 0xaa));
        assert!(out[..16 << 20].iter().all(|&b| b == 0));
    }

    #[test]
    fn extents_from_starts_at_the_offset() {
        let src = RawSource::new(Arc::new(MemReader::new(vec![1u8; 3 << 20])), None);
        let ex = src
            .extents_from((1 << 20) + 5)
            .map(Result::unwrap)
            .collect::<Vec<_>>();
        assert_eq!(ex[0].guest_offset, (1 << 20) + 5);
        assert_eq!(ex.iter().map(|e| e.len).sum::<u64>(), (2 << 20) - 5);
    }

    #[test]
    fn empty_image_has_no_extents() {
        let src = RawSource::new(Arc::new(MemReader::new(Vec::new())), None);
        assert!(collect(&src).is_empty());
    }
}
