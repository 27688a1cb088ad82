//! Format detection by content: qcow2 magic, tar (plain or compressed), else raw.

use std::io::{self, Read};

use super::{ReadAt, ReadAtCursor, SourceError};

/// qcow2 magic: `QFI\xfb`.
pub(crate) const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
const XZ_MAGIC: [u8; 6] = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// Offset of the `ustar` magic in a tar header block.
const USTAR_OFFSET: usize = 257;

/// Compression of a tarball.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarCompression {
    /// Plain tar.
    None,
    /// gzip (one or several members).
    Gzip,
    /// xz.
    Xz,
    /// zstd.
    Zstd,
}

impl TarCompression {
    /// The name used in reports: "none", "gzip", "xz" or "zstd".
    pub fn name(self) -> &'static str {
        match self {
            TarCompression::None => "none",
            TarCompression::Gzip => "gzip",
            TarCompression::Xz => "xz",
            TarCompression::Zstd => "zstd",
        }
    }

    /// Detects the compression from the first bytes of a stream.
    pub fn from_magic(head: &[u8]) -> TarCompression {
        if head.starts_with(&GZIP_MAGIC) {
            TarCompression::Gzip
        } else if head.starts_with(&XZ_MAGIC) {
            TarCompression::Xz
        } else if head.starts_with(&ZSTD_MAGIC) {
            TarCompression::Zstd
        } else {
            TarCompression::None
        }
    }

    /// Wraps `r` in the matching decoder.
    pub(crate) fn decoder<'a, R: Read + 'a>(self, r: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            TarCompression::None => Box::new(r),
            TarCompression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(r)),
            TarCompression::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
            TarCompression::Zstd => Box::new(zstd::stream::read::Decoder::new(r)?),
        })
    }
}

/// What [`detect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    /// A qcow2 image.
    Qcow2,
    /// A tarball (an Incus unified image, if it holds `rootfs.img`).
    Tar(TarCompression),
    /// Anything else.
    Raw,
}

/// True when a 512-byte block looks like a tar header (`ustar` magic at 257).
pub(crate) fn is_tar_header(block: &[u8]) -> bool {
    block.len() >= USTAR_OFFSET + 5 && &block[USTAR_OFFSET..USTAR_OFFSET + 5] == b"ustar"
}

/// Detects the format of an image by its content.
///
/// A compressed stream (gzip, xz, zstd) that does not hold a tar archive is
/// refused rather than taken as a raw disk: writing compressed bytes onto a
/// volume is never what was meant.
pub fn detect(reader: &dyn ReadAt) -> Result<Detected, SourceError> {
    let mut head = [0u8; 512];
    let n = usize::try_from(reader.len())
        .unwrap_or(usize::MAX)
        .min(head.len());
    reader
        .read_exact_at(&mut head[..n], 0)
        .map_err(|e| SourceError::read("image head", 0, e))?;
    let head = &head[..n];
    if head.starts_with(&QCOW2_MAGIC) {
        return Ok(Detected::Qcow2);
    }
    match TarCompression::from_magic(head) {
        TarCompression::None => {
            if is_tar_header(head) {
                Ok(Detected::Tar(TarCompression::None))
            } else {
                Ok(Detected::Raw)
            }
        }
        c => {
            let mut block = [0u8; 512];
            let got = c
                .decoder(ReadAtCursor::new(reader))
                .and_then(|d| read_up_to(d, &mut block))
                .map_err(|e| {
                    SourceError::Unsupported(format!(
                        "{} stream that does not decompress ({e}); only tarballs may be compressed",
                        c.name()
                    ))
                })?;
            if is_tar_header(&block[..got]) {
                Ok(Detected::Tar(c))
            } else {
                Err(SourceError::Unsupported(format!(
                    "{}-compressed file that is not a tar archive; decompress it first",
                    c.name()
                )))
            }
        }
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
pub(crate) fn read_up_to(mut r: impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::MemReader;
    use std::io::Write;

    fn tar_bytes() -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "metadata.yaml", &b"a: b"[..3])
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn detects_qcow2_by_magic() {
        let mut v = b"QFI\xfb".to_vec();
        v.resize(1024, 0);
        assert_eq!(detect(&MemReader::new(v)).unwrap(), Detected::Qcow2);
    }

    #[test]
    fn detects_plain_and_gzip_tar() {
        let t = tar_bytes();
        assert_eq!(
            detect(&MemReader::new(t.clone())).unwrap(),
            Detected::Tar(TarCompression::None)
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(
            detect(&MemReader::new(gz)).unwrap(),
            Detected::Tar(TarCompression::Gzip)
        );
    }

    #[test]
    fn compressed_non_tar_is_refused() {
        let z = zstd::encode_all(&[7u8; 4096][..], 1).unwrap();
        assert!(matches!(
            detect(&MemReader::new(z)),
            Err(SourceError::Unsupported(_))
        ));
    }

    #[test]
    fn anything_else_is_raw() {
        assert_eq!(
            detect(&MemReader::new(vec![0u8; 100])).unwrap(),
            Detected::Raw
        );
        assert_eq!(detect(&MemReader::new(Vec::new())).unwrap(), Detected::Raw);
    }
}
