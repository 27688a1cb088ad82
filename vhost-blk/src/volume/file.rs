//! Volumes that are block devices or regular files.
//!
//! ```text
//!  guest request (512-byte sectors, any buffers)
//!        |
//!        +-- offset and length aligned to the device block, buffers to what O_DIRECT
//!        |   takes (often 512 bytes on a 4096-sector device)? ------------> preadv/pwritev
//!        |                                      (O_DIRECT, split at `max_iovecs` iovecs)
//!        +-- otherwise --> bounce buffer, in chunks: read the partial head/tail blocks,
//!                          merge the guest bytes, write whole blocks (read-modify-write)
//! ```
//!
//! When the device block is larger than a guest sector, every write takes an exclusive
//! [`RangeLock`] on the device blocks it touches, so two guests writes to different
//! 512-byte sectors of one 4 KiB block both survive, whichever queue they come from.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use vm_memory::VolatileSlice;

use super::{
    align_down, align_up, io_err, LockedRange, RangeBusy, VolumeError, VolumeParams, SECTOR_SIZE,
};
use crate::rangelock::RangeLock;
use crate::sys;

/// Largest bounce buffer used for one read-modify-write step.
const BOUNCE_CHUNK: u64 = 256 * 1024;

/// A block device or regular file.
#[derive(Debug)]
pub(crate) struct FileVolume {
    file: File,
    is_block_device: bool,
    /// A file in memory (tmpfs): writes are copies best made by the queue thread itself.
    memory_backed: bool,
    /// A file on FUSE or a network filesystem: its I/O may wait for a server.
    waits_for_a_server: bool,
    /// Usable size in bytes: a multiple of `block_size` and of the guest sector (read
    /// again when the volume grows).
    size: std::sync::atomic::AtomicU64,
    /// Offset and length granularity of I/O to the volume.
    block_size: u64,
    /// Alignment of memory buffer addresses the volume needs (1 for buffered I/O).
    mem_align: u64,
    /// Granularity of each buffer's length (1 for buffered I/O).
    seg_align: u64,
    physical_block_size: u64,
    io_min: u32,
    io_opt: u32,
    direct: bool,
    max_iovecs: usize,
    locks: Option<RangeLock>,
}

/// Where the bytes of a write come from.
enum Source<'a, 'b> {
    Guest(&'a mut SliceCursor<'b>),
    Zeroes,
}

/// A position in a list of guest memory slices.
pub(crate) struct SliceCursor<'a> {
    slices: &'a [VolatileSlice<'a, ()>],
    idx: usize,
    off: usize,
}

impl<'a> SliceCursor<'a> {
    pub(crate) fn new(slices: &'a [VolatileSlice<'a, ()>]) -> Self {
        SliceCursor {
            slices,
            idx: 0,
            off: 0,
        }
    }

    /// Walks the next `len` guest bytes, calling `f(slice, done)` for each piece with
    /// the bytes already walked; returns false if the guest buffers end first.
    fn advance(&mut self, len: usize, mut f: impl FnMut(VolatileSlice<'a, ()>, usize)) -> bool {
        let mut done = 0;
        while done < len {
            let Some(s) = self.slices.get(self.idx) else {
                return false;
            };
            let avail = s.len() - self.off;
            if avail == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = avail.min(len - done);
            let Ok(sub) = s.subslice(self.off, n) else {
                return false;
            };
            f(sub, done);
            done += n;
            self.off += n;
        }
        true
    }

    /// Copies guest bytes into `buf`, advancing; returns false if the guest buffers end first.
    fn read_into(&mut self, buf: &mut [u8]) -> bool {
        self.advance(buf.len(), |sub, at| {
            sub.copy_to(&mut buf[at..at + sub.len()]);
        })
    }

    /// Copies `buf` into guest buffers, advancing; returns false if the guest buffers end first.
    fn write_from(&mut self, buf: &[u8]) -> bool {
        self.advance(buf.len(), |sub, at| {
            sub.copy_from(&buf[at..at + sub.len()]);
        })
    }
}

/// Alignment of O_DIRECT buffers of a volume with `block_size` blocks: (address, length
/// of each buffer). What the kernel reports for addresses (`STATX_DIOALIGN`; a 4096-sector
/// device usually takes 512-byte aligned memory), at least 512; the same for lengths if a
/// read of the first block into two such buffers works (kernels that want every buffer a
/// whole block long refuse it with EINVAL), else (or without `probe`) whole blocks.
fn dio_buffer_alignment(file: &File, block_size: u64, size: u64, probe: bool) -> (u64, u64) {
    let mem = sys::dio_alignment(file)
        .map(|(m, _)| u64::from(m))
        .filter(|m| m.is_power_of_two())
        .map_or(block_size, |m| m.clamp(SECTOR_SIZE, block_size));
    if mem == block_size || size < block_size || !probe {
        return (mem, block_size);
    }
    // Two buffers, mem-aligned but not block-aligned, with lengths mem and block - mem.
    let (bs, m) = (block_size as usize, mem as usize);
    let mut buf = AlignedBuf::new(2 * bs, bs);
    let (a, b) = buf.as_mut().split_at_mut(bs);
    let slices = [
        VolatileSlice::from(&mut a[m..2 * m]),
        VolatileSlice::from(&mut b[m..]),
    ];
    match sys::preadv(file, &slices, 0) {
        Ok(n) if n == bs => (mem, mem),
        Ok(_) => (mem, block_size),
        Err(e) => {
            if e.raw_os_error() != Some(libc::EINVAL) {
                tracing::debug!(error = %e, "O_DIRECT buffer probe failed");
            }
            (mem, block_size)
        }
    }
}

/// A heap buffer whose usable part starts at an `align`-byte boundary (for O_DIRECT).
struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let addr = raw.as_ptr() as usize;
        let start = (align - addr % align) % align;
        AlignedBuf { raw, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

impl FileVolume {
    /// Opens and probes `path`.
    pub(crate) fn open(path: &Path, params: &VolumeParams) -> Result<FileVolume, VolumeError> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!params.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let probe = |source| VolumeError::Probe {
            path: path.to_owned(),
            source,
        };
        let (file, direct) = if params.direct {
            match open(true) {
                Ok(f) => (Ok(f), true),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(path = %path.display(), "O_DIRECT refused, using buffered I/O");
                    (open(false), false)
                }
                Err(e) => (Err(e), true),
            }
        } else {
            (open(false), false)
        };
        let file = file.map_err(|source| VolumeError::Open {
            path: path.to_owned(),
            source,
        })?;
        // A file in memory (tmpfs) takes O_DIRECT but gains nothing from it: I/O is a page
        // cache copy either way. Buffered, it takes any 512-byte aligned request directly
        // instead of read-modify-writing 4 KiB blocks.
        let (file, direct) = if direct
            && !file
                .metadata()
                .map_err(probe)?
                .file_type()
                .is_block_device()
            && sys::is_memory_backed(&file)
        {
            let f = open(false).map_err(|source| VolumeError::Open {
                path: path.to_owned(),
                source,
            })?;
            (f, false)
        } else {
            (file, direct)
        };
        let meta = file.metadata().map_err(probe)?;
        let ft = meta.file_type();
        let (is_block_device, raw_size, lbs, pbs, io_min, io_opt) = if ft.is_block_device() {
            let g = blockdev::probe(&file).map_err(probe)?;
            let (min, opt) = blockdev::io_sizes(&file).unwrap_or((0, 0));
            let (lbs, pbs) = (g.logical_block_size, g.physical_block_size);
            (true, g.size, u64::from(lbs), u64::from(pbs), min, opt)
        } else if ft.is_file() {
            // O_DIRECT on files: the alignment the filesystem reports, else 4096 (safe on
            // every common filesystem). Buffered files take any 512-byte aligned request.
            let blk = match (direct, sys::dio_alignment(&file)) {
                (false, _) => SECTOR_SIZE,
                (true, Some((_, off))) => u64::from(off),
                (true, None) => 4096,
            };
            (false, meta.len(), blk, blk, 0, 0)
        } else {
            return Err(VolumeError::NotAVolume(path.to_owned()));
        };
        let block_size = lbs.max(u64::from(params.min_block_size)).max(SECTOR_SIZE);
        if !block_size.is_power_of_two() || block_size > 65536 {
            return Err(VolumeError::BlockSize {
                path: path.to_owned(),
                block_size,
            });
        }
        let memory_backed = !is_block_device && sys::is_memory_backed(&file);
        let waits_for_a_server = !is_block_device && sys::waits_for_a_server(&file);
        let (mem_align, seg_align) = if direct {
            // No probe read where a read may wait for a server (a hung FUSE daemon would
            // hold up the open).
            let probe = !waits_for_a_server;
            dio_buffer_alignment(&file, block_size, raw_size, probe)
        } else {
            (1, 1)
        };
        Ok(FileVolume {
            file,
            is_block_device,
            memory_backed,
            waits_for_a_server,
            size: align_down(raw_size, block_size).into(),
            block_size,
            mem_align,
            seg_align,
            physical_block_size: pbs.max(block_size),
            io_min,
            io_opt,
            direct,
            max_iovecs: params.max_iovecs.clamp(1, sys::IOV_MAX),
            locks: (block_size > SECTOR_SIZE).then(RangeLock::default),
        })
    }

    /// Usable size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Reads the size again (the file or device grew); returns it.
    pub(crate) fn refresh_size(&self) -> Result<u64, VolumeError> {
        let err = |source| VolumeError::Io {
            op: "reading the size",
            offset: 0,
            source,
        };
        let raw = if self.is_block_device {
            blockdev::size(&self.file).map_err(err)?
        } else {
            self.file.metadata().map_err(err)?.len()
        };
        let size = align_down(raw, self.block_size);
        self.size.store(size, std::sync::atomic::Ordering::Release);
        Ok(size)
    }

    /// Granularity of I/O to the volume, in bytes.
    pub(crate) fn block_size(&self) -> u64 {
        self.block_size
    }

    pub(crate) fn physical_block_size(&self) -> u64 {
        self.physical_block_size
    }

    pub(crate) fn io_sizes(&self) -> (u32, u32) {
        (self.io_min, self.io_opt)
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct
    }

    /// The volume's file (for the io_uring engine).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Whether the volume is a file in memory (tmpfs, ramfs).
    /// A file on FUSE or a network filesystem, whose I/O may wait for a server: never
    /// issued inline by a queue thread.
    pub(crate) fn waits_for_a_server(&self) -> bool {
        self.waits_for_a_server
    }

    pub(crate) fn is_memory_backed(&self) -> bool {
        self.memory_backed
    }

    /// Whether a read or write of `slices` at `offset` goes straight to the volume as one
    /// vectored system call: aligned for O_DIRECT and at most `max_iovecs` buffers.
    pub(crate) fn direct_ok(&self, offset: u64, slices: &[VolatileSlice<'_, ()>]) -> bool {
        slices.len() <= self.max_iovecs && self.aligned(offset, slices)
    }

    /// Takes the write lock of `[offset, offset + len)` without waiting, for a write that
    /// completes after this call returns: `Ok(None)` when the volume needs no locks,
    /// `Ok(Some(range))` when held (release with [`FileVolume::unlock_write`]), `Err` when
    /// another write holds part of it.
    pub(crate) fn try_lock_write(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<Option<LockedRange>, RangeBusy> {
        let Some(locks) = self.locks.as_ref() else {
            return Ok(None);
        };
        let range = LockedRange {
            start: align_down(offset, self.block_size),
            end: align_up(offset.saturating_add(len), self.block_size).unwrap_or(u64::MAX),
        };
        if locks.try_lock(range.start, range.end) {
            Ok(Some(range))
        } else {
            Err(RangeBusy)
        }
    }

    /// Releases a range taken by [`FileVolume::try_lock_write`].
    pub(crate) fn unlock_write(&self, range: LockedRange) {
        if let Some(locks) = self.locks.as_ref() {
            locks.unlock(range.start, range.end);
        }
    }

    fn aligned(&self, offset: u64, slices: &[VolatileSlice<'_, ()>]) -> bool {
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        offset % self.block_size == 0
            && total % self.block_size == 0
            && slices.iter().all(|s| {
                let p = s.ptr_guard().as_ptr() as u64;
                p % self.mem_align == 0 && s.len() as u64 % self.seg_align == 0
            })
    }

    /// Reads into guest buffers from byte `offset` (a multiple of 512, in range).
    pub(crate) fn read(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        if self.aligned(offset, slices) {
            self.vectored(false, offset, slices)
        } else {
            self.bounce_read(offset, slices)
        }
    }

    /// Writes guest buffers at byte `offset` (a multiple of 512, in range).
    pub(crate) fn write(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        if self.aligned(offset, slices) {
            let _g = self.lock(offset, offset.saturating_add(len));
            self.vectored(true, offset, slices)
        } else {
            let mut cur = SliceCursor::new(slices);
            self.rmw_write(offset, len, Source::Guest(&mut cur))
        }
    }

    fn lock(&self, start: u64, end: u64) -> Option<crate::rangelock::RangeGuard<'_>> {
        let a = self.block_size;
        self.locks
            .as_ref()
            .map(|l| l.lock(align_down(start, a), align_up(end, a).unwrap_or(u64::MAX)))
    }

    /// preadv/pwritev in batches of at most `max_iovecs`, resuming after short transfers.
    fn vectored(
        &self,
        write: bool,
        mut offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        let op = if write { "pwritev" } else { "preadv" };
        for batch in slices.chunks(self.max_iovecs) {
            let mut cur: Vec<VolatileSlice<'_, ()>> = batch.to_vec();
            let mut first = 0;
            while first < cur.len() {
                let n = if write {
                    sys::pwritev(&self.file, &cur[first..], offset)
                } else {
                    sys::preadv(&self.file, &cur[first..], offset)
                };
                let mut n = match n {
                    Ok(0) => return Err(VolumeError::Short { op, offset }),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(io_err(op, offset)(e)),
                };
                offset += n as u64;
                while n > 0 && first < cur.len() {
                    let l = cur[first].len();
                    if n >= l {
                        n -= l;
                        first += 1;
                    } else {
                        cur[first] = cur[first]
                            .offset(n)
                            .map_err(|_| VolumeError::Short { op, offset })?;
                        n = 0;
                    }
                }
            }
        }
        Ok(())
    }

    fn pread_full(&self, buf: &mut [u8], offset: u64) -> Result<(), VolumeError> {
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                VolumeError::Short {
                    op: "pread",
                    offset,
                }
            } else {
                io_err("pread", offset)(e)
            }
        })
    }

    fn pwrite_full(&self, buf: &[u8], offset: u64) -> Result<(), VolumeError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(io_err("pwrite", offset))
    }

    /// Iterates `[offset, offset + len)` in chunks: (aligned start, aligned end, start, end).
    fn chunks(&self, offset: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64, u64)> {
        let a = self.block_size;
        let chunk = BOUNCE_CHUNK.max(a);
        let end = offset.saturating_add(len);
        let mut pos = offset;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let al_start = align_down(pos, a);
            let al_end = align_up(end, a)?.min(al_start + chunk);
            let seg_end = end.min(al_end);
            let item = (al_start, al_end, pos, seg_end);
            pos = seg_end;
            Some(item)
        })
    }

    /// Bounce buffer size for `[offset, offset + len)`: its aligned span, at most one chunk.
    fn bounce_len(&self, offset: u64, len: u64) -> usize {
        let a = self.block_size;
        let chunk = BOUNCE_CHUNK.max(a);
        let span = align_up(offset.saturating_add(len), a)
            .unwrap_or(u64::MAX)
            .saturating_sub(align_down(offset, a));
        usize::try_from(span.min(chunk)).unwrap_or(usize::MAX)
    }

    fn bounce_read(
        &self,
        offset: u64,
        slices: &[VolatileSlice<'_, ()>],
    ) -> Result<(), VolumeError> {
        let len: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let mut cur = SliceCursor::new(slices);
        let mut buf = AlignedBuf::new(self.bounce_len(offset, len), 4096);
        for (al_start, al_end, start, end) in self.chunks(offset, len) {
            let b = &mut buf.as_mut()[..(al_end - al_start) as usize];
            self.pread_full(b, al_start)?;
            let from = (start - al_start) as usize;
            let to = (end - al_start) as usize;
            if !cur.write_from(&b[from..to]) {
                return Err(VolumeError::Short {
                    op: "copy to guest",
                    offset: start,
                });
            }
        }
        Ok(())
    }

    /// Writes `len` bytes at `offset` through a bounce buffer, merging partial device blocks.
    fn rmw_write(&self, offset: u64, len: u64, mut src: Source<'_, '_>) -> Result<(), VolumeError> {
        let a = self.block_size;
        let mut buf = AlignedBuf::new(self.bounce_len(offset, len), 4096);
        for (al_start, al_end, start, end) in self.chunks(offset, len) {
            let _g = self.lock(al_start, al_end);
            let b = &mut buf.as_mut()[..(al_end - al_start) as usize];
            let a_us = a as usize;
            let blen = b.len();
            let head_read = start > al_start;
            if head_read {
                self.pread_full(&mut b[..a_us], al_start)?;
            }
            if end < al_end && !(head_read && blen == a_us) {
                let last = blen - a_us;
                self.pread_full(&mut b[last..], al_end - a)?;
            }
            let from = (start - al_start) as usize;
            let to = (end - al_start) as usize;
            match &mut src {
                Source::Guest(cur) => {
                    if !cur.read_into(&mut b[from..to]) {
                        return Err(VolumeError::Short {
                            op: "copy from guest",
                            offset: start,
                        });
                    }
                }
                Source::Zeroes => b[from..to].fill(0),
            }
            self.pwrite_full(b, al_start)?;
        }
        Ok(())
    }

    /// Flushes volatile caches of the volume.
    pub(crate) fn flush(&self) -> Result<(), VolumeError> {
        self.file.sync_data().map_err(io_err("fdatasync", 0))
    }

    /// Discards `[offset, offset + len)`: a hint; the partial device blocks at the ends are kept.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> Result<(), VolumeError> {
        let a = self.block_size;
        let (Some(start), end) = (
            align_up(offset, a),
            align_down(offset.saturating_add(len), a),
        ) else {
            return Ok(());
        };
        if start >= end {
            return Ok(());
        }
        let _g = self.lock(start, end);
        let res = if self.is_block_device {
            blockdev::discard(&self.file, start, end - start)
        } else {
            self.punch_hole(start, end - start)
        };
        match res {
            Ok(()) => Ok(()),
            // Discard is advisory: a volume that cannot do it keeps the data.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => Ok(()),
            Err(e) => Err(io_err("discard", start)(e)),
        }
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(io::Error::from)
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let l = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        fallocate(
            self.file.as_raw_fd(),
            FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(io::Error::from)
    }

    /// Zeroes `[offset, offset + len)`; `unmap` lets the volume deallocate the range.
    pub(crate) fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), VolumeError> {
        let a = self.block_size;
        let end = offset.saturating_add(len);
        let in_start = align_up(offset, a).unwrap_or(end).min(end);
        let in_end = align_down(end, a).max(in_start);
        // Partial device blocks at either end are merged through the bounce buffer.
        if offset < in_start {
            self.rmw_write(offset, in_start - offset, Source::Zeroes)?;
        }
        if in_end < end {
            self.rmw_write(in_end, end - in_end, Source::Zeroes)?;
        }
        if in_start >= in_end {
            return Ok(());
        }
        let res = {
            let _g = self.lock(in_start, in_end);
            if self.is_block_device {
                blockdev::zero_out(&self.file, in_start, in_end - in_start)
            } else if unmap {
                self.punch_hole(in_start, in_end - in_start)
            } else {
                self.zero_range(in_start, in_end - in_start)
            }
        };
        match res {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL)
                ) =>
            {
                self.rmw_write(in_start, in_end - in_start, Source::Zeroes)
            }
            Err(e) => Err(io_err("write zeroes", in_start)(e)),
        }
    }
}
