//! Block-device ioctls and file-space calls, declared once and wrapped safely.
//!
//! Everything here takes a `&File` (or raw fd owned by one), so the descriptor
//! is valid for the duration of each call.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

// From <linux/fs.h>. BLKSSZGET and BLKPBSZGET predate the _IO* encoding macros
// and are plain numbers; the others are encoded with their argument type.
nix::ioctl_read_bad!(blksszget, 0x1268, libc::c_int);
nix::ioctl_read_bad!(blkpbszget, 0x127b, libc::c_uint);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkzeroout, 0x127f, [u64; 2]);
nix::ioctl_none_bad!(blkflsbuf, 0x1261);

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Logical block size of a block device (BLKSSZGET).
pub fn logical_block_size(dev: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: `dev` is an open descriptor for the whole call and `v` is a valid,
    // writable c_int, which is what BLKSSZGET stores.
    unsafe { blksszget(dev.as_raw_fd(), &mut v) }.map_err(errno)?;
    u32::try_from(v).map_err(|_| io::Error::other(format!("BLKSSZGET returned {v}")))
}

/// Physical block size of a block device (BLKPBSZGET).
pub fn physical_block_size(dev: &File) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: `dev` is open for the call and `v` is a writable c_uint, the type
    // BLKPBSZGET stores.
    unsafe { blkpbszget(dev.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Size of a block device in bytes (BLKGETSIZE64).
pub fn device_size(dev: &File) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: `dev` is open for the call and `v` is a writable u64, the type
    // BLKGETSIZE64 stores.
    unsafe { blkgetsize64(dev.as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Zeroes `[offset, offset + len)` of a block device (BLKZEROOUT). The kernel
/// guarantees the range reads back as zeros; it uses WRITE ZEROES or unmap
/// where the device offers them and writes zero pages otherwise.
pub fn zero_out(dev: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: `dev` is open for the call; `range` is a readable [u64; 2]
    // (start, length), the argument BLKZEROOUT reads.
    unsafe { blkzeroout(dev.as_raw_fd(), &range) }.map_err(errno)?;
    Ok(())
}

/// Writes back and drops the block device's buffer cache (BLKFLSBUF), so a
/// later buffered reader sees what O_DIRECT writers and loop devices wrote.
pub fn flush_buffers(dev: &File) -> io::Result<()> {
    // SAFETY: `dev` is open for the call; BLKFLSBUF takes no argument.
    unsafe { blkflsbuf(dev.as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

/// Deallocates `[offset, offset + len)` of a regular file, keeping its size; the
/// range reads back as zeros.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes `[offset, offset + len)` of a regular file by allocating zeroed extents.
pub fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::other("length too large"))?;
    // SAFETY: plain syscall on an open descriptor with integer arguments; no
    // memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An aligned, zero-initialised heap buffer for O_DIRECT I/O.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it
// to another thread moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), align)
            .map_err(|e| io::Error::other(format!("buffer layout {len}/{align}: {e}")))?;
        // SAFETY: `layout` has a non-zero size (len.max(1)).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw)
            .ok_or_else(|| io::Error::other(format!("cannot allocate {len} bytes")))?;
        Ok(Self { ptr, len, layout })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at allocation) bytes
        // owned by self, alive as long as the borrow of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout`
        // and is freed once, here.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(8192, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn punch_hole_reads_back_zeros() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[0xAB; 65536], 0).unwrap();
        punch_hole(&f, 4096, 8192).unwrap();
        let mut buf = vec![0u8; 65536];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0xAB));
        assert!(buf[4096..12288].iter().all(|&x| x == 0));
        assert!(buf[12288..].iter().all(|&x| x == 0xAB));
        assert_eq!(f.metadata().unwrap().len(), 65536);
    }

    #[test]
    fn block_ioctls_refuse_regular_files() {
        let f = tempfile::tempfile().unwrap();
        assert!(logical_block_size(&f).is_err());
        assert!(device_size(&f).is_err());
    }
}
