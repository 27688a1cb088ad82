//! Random-access reads of an image's guest view, for looking at its partition
//! table before anything is written.
//!
//! Each read walks the extent list from the extent holding its offset, so it is
//! cheap for the few kilobytes a partition table occupies at either end of the
//! disk; bulk data is [`crate::copy`]'s job.

use std::io::{self, Read, Seek, SeekFrom};

use crate::source::{Extent, ExtentKind, ImageSource};

/// `Read + Seek` over the guest-visible disk of an image.
#[derive(Debug)]
pub struct GuestReader<'a> {
    source: &'a dyn ImageSource,
    pos: u64,
}

impl<'a> GuestReader<'a> {
    /// A reader positioned at guest offset 0.
    pub fn new(source: &'a dyn ImageSource) -> Self {
        Self { source, pos: 0 }
    }

    /// Fills `buf` from guest offset `offset`; bytes past the disk end read as
    /// an error.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.source.virtual_size())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past disk end"))?;
        let mut scratch = Vec::new();
        for ext in self.source.extents_from(offset) {
            let ext = ext.map_err(io::Error::other)?;
            let (es, ee) = (ext.guest_offset, ext.guest_offset + ext.len);
            if ee <= offset {
                continue;
            }
            if es >= end {
                break;
            }
            let (from, to) = (es.max(offset), ee.min(end));
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match ext.kind {
                ExtentKind::Zero => dst.fill(0),
                ExtentKind::Data {
                    host_offset,
                    compressed_len: None,
                } => {
                    let sub = Extent {
                        guest_offset: from,
                        len: to - from,
                        kind: ExtentKind::Data {
                            host_offset: host_offset + (from - es),
                            compressed_len: None,
                        },
                    };
                    self.source
                        .read_extent(&sub, dst)
                        .map_err(io::Error::other)?;
                }
                ExtentKind::Data { .. } => {
                    scratch.resize(ext.len as usize, 0);
                    self.source
                        .read_extent(&ext, &mut scratch)
                        .map_err(io::Error::other)?;
                    dst.copy_from_slice(&scratch[(from - es) as usize..(to - es) as usize]);
                }
            }
        }
        Ok(())
    }
}

impl Read for GuestReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.source.virtual_size().saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for GuestReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let size = self.source.virtual_size() as i128;
        let new = match to {
            SeekFrom::Start(o) => o as i128,
            SeekFrom::End(d) => size + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 || new > u64::MAX as i128 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek out of range",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}
