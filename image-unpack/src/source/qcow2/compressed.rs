//! Compressed clusters: one cluster inflated (zlib, raw deflate) or decoded (zstd)
//! into the caller's buffer, with per-thread decoder state so several threads can
//! decompress at once.

use std::cell::RefCell;
use std::io;

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

use super::header::Compression;
use super::Qcow2Source;
use crate::source::{Extent, SourceError};

impl Qcow2Source {
    pub(super) fn read_compressed(
        &self,
        extent: &Extent,
        host_offset: u64,
        clen: u64,
        buf: &mut [u8],
    ) -> Result<(), SourceError> {
        let cs = self.header.cluster_size() as usize;
        let file_len = self.reader.len();
        // The descriptor's sector count may reach up to 511 bytes past the end of
        // the file (QEMU does not pad the last compressed cluster).
        // A descriptor never covers more than two clusters; bound what a caller passes.
        let avail = file_len
            .saturating_sub(host_offset)
            .min(clen)
            .min(2 * cs as u64) as usize;
        let compression = self.header.compression;
        let fail = |source: io::Error| SourceError::Decompress {
            guest_offset: extent.guest_offset,
            host_offset,
            source,
        };
        SCRATCH.with(|cell| {
            let mut scratch = cell.borrow_mut();
            let Scratch {
                input,
                cluster,
                zlib,
                fast,
                zstd,
            } = &mut *scratch;
            input.resize(avail, 0);
            self.reader
                .read_exact_at(input, host_offset)
                .map_err(|e| SourceError::read("qcow2 compressed cluster", host_offset, e))?;
            let direct = buf.len() == cs;
            let out: &mut [u8] = if direct {
                buf
            } else {
                cluster.resize(cs, 0);
                cluster
            };
            match compression {
                // libdeflate inflates a whole cluster in one call, about twice as fast
                // as a streaming inflater; anything it does not finish exactly (a
                // stream longer than the cluster, corrupt data) goes through the
                // streaming path, which has QEMU's semantics and precise errors.
                Compression::Zlib => match fast.deflate_decompress(input, out) {
                    Ok(n) if n == out.len() => {}
                    _ => inflate_raw(zlib, input, out).map_err(fail)?,
                },
                Compression::Zstd => {
                    if zstd.is_none() {
                        *zstd = Some(zstd::stream::raw::Decoder::new().map_err(fail)?);
                    }
                    let dec = zstd
                        .as_mut()
                        .ok_or_else(|| fail(io::Error::other("no decoder")))?;
                    unzstd(dec, input, out).map_err(fail)?
                }
            }
            if !direct {
                buf.copy_from_slice(&cluster[..buf.len()]);
            }
            Ok(())
        })
    }
}

/// Per-thread decompression state, reused across clusters.
struct Scratch {
    input: Vec<u8>,
    cluster: Vec<u8>,
    zlib: Decompress,
    fast: libdeflater::Decompressor,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch {
        input: Vec::new(),
        cluster: Vec::new(),
        zlib: Decompress::new(false),
        fast: libdeflater::Decompressor::new(),
        zstd: None,
    });
}

/// Inflates raw deflate `input` into exactly `out.len()` bytes. Like QEMU, input
/// left over after the output is full is ignored (the descriptor's size is only
/// sector-precise).
fn inflate_raw(d: &mut Decompress, input: &[u8], out: &mut [u8]) -> io::Result<()> {
    d.reset(false);
    let status = d
        .decompress(input, out, FlushDecompress::Finish)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    let produced = d.total_out();
    if produced == out.len() as u64 {
        return Ok(());
    }
    let why = match status {
        Status::StreamEnd => "deflate stream ended early",
        _ => "compressed data truncated",
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{why}: {produced} of {} bytes", out.len()),
    ))
}

/// Decodes a zstd frame (possibly followed by padding) into exactly `out.len()` bytes.
fn unzstd(
    dec: &mut zstd::stream::raw::Decoder<'static>,
    input: &[u8],
    out: &mut [u8],
) -> io::Result<()> {
    dec.reinit()?;
    let want = out.len();
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    while outb.pos() < want {
        let (ip, op) = (inb.pos(), outb.pos());
        let hint = dec.run(&mut inb, &mut outb)?;
        if outb.pos() < want && (hint == 0 || (inb.pos() == ip && outb.pos() == op)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("zstd frame ended after {} of {want} bytes", outb.pos()),
            ));
        }
    }
    Ok(())
}
