//! Block-device ioctls from `<linux/fs.h>`, declared once for every vmblk crate: the
//! size, logical and physical sector sizes and I/O hints of a device, and the range
//! operations (discard, zero-out, buffer flush).
//!
//! Every function takes a borrowed descriptor, so it is open for the whole call; on a
//! regular file or a character device the kernel answers `ENOTTY`.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

// BLKSSZGET, BLKPBSZGET, BLKIOMIN, BLKIOOPT, BLKDISCARD, BLKZEROOUT and BLKFLSBUF
// predate the _IO* encoding and are plain numbers; BLKGETSIZE64 is _IOR(0x12, 114, size_t).
nix::ioctl_read_bad!(blksszget, libc::BLKSSZGET, libc::c_int);
nix::ioctl_read_bad!(blkpbszget, libc::BLKPBSZGET, libc::c_uint);
nix::ioctl_read_bad!(blkiomin, 0x1278, libc::c_uint);
nix::ioctl_read_bad!(blkioopt, 0x1279, libc::c_uint);
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
nix::ioctl_write_ptr_bad!(blkdiscard, 0x1277, [u64; 2]);
nix::ioctl_write_ptr_bad!(blkzeroout, 0x127f, [u64; 2]);
nix::ioctl_none_bad!(blkflsbuf, 0x1261);

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// What a block device says of itself, read in one call ([`probe`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Capacity in bytes.
    pub size: u64,
    /// Logical sector size in bytes: the unit of addressing.
    pub logical_block_size: u32,
    /// Physical sector size in bytes (at least the logical one).
    pub physical_block_size: u32,
}

/// Capacity, logical and physical sector sizes of a block device. A device that does
/// not report its physical sector size is taken to write logical sectors atomically.
pub fn probe(dev: impl AsFd) -> io::Result<Geometry> {
    let fd = dev.as_fd();
    let logical_block_size = logical_block_size(fd)?;
    Ok(Geometry {
        size: size(fd)?,
        logical_block_size,
        physical_block_size: physical_block_size(fd)
            .unwrap_or(logical_block_size)
            .max(logical_block_size),
    })
}

/// Logical sector size in bytes (`BLKSSZGET`): the unit of addressing.
pub fn logical_block_size(dev: impl AsFd) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int into `v`, a live local; the fd is borrowed for
    // the call.
    unsafe { blksszget(dev.as_fd().as_raw_fd(), &mut v) }.map_err(errno)?;
    u32::try_from(v).map_err(|_| io::Error::other(format!("BLKSSZGET returned {v}")))
}

/// Physical sector size in bytes (`BLKPBSZGET`): the unit the device writes atomically.
pub fn physical_block_size(dev: impl AsFd) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one c_uint into `v`, a live local; the fd is borrowed for
    // the call.
    unsafe { blkpbszget(dev.as_fd().as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Minimum and optimal I/O sizes in bytes (`BLKIOMIN`, `BLKIOOPT`; 0: no hint).
pub fn io_sizes(dev: impl AsFd) -> io::Result<(u32, u32)> {
    let fd = dev.as_fd().as_raw_fd();
    let (mut min, mut opt): (libc::c_uint, libc::c_uint) = (0, 0);
    // SAFETY: BLKIOMIN writes one c_uint into `min`, a live local; the fd is borrowed.
    unsafe { blkiomin(fd, &mut min) }.map_err(errno)?;
    // SAFETY: BLKIOOPT writes one c_uint into `opt`, a live local; the fd is borrowed.
    unsafe { blkioopt(fd, &mut opt) }.map_err(errno)?;
    Ok((min, opt))
}

/// Size in bytes (`BLKGETSIZE64`).
pub fn size(dev: impl AsFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 (size_t on every 64-bit target) into `v`, a live
    // local; the fd is borrowed for the call.
    unsafe { blkgetsize64(dev.as_fd().as_raw_fd(), &mut v) }.map_err(errno)?;
    Ok(v)
}

/// Discards `[offset, offset + len)` (`BLKDISCARD`): the range may read back as anything.
pub fn discard(dev: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 (start, length) from `range`, a live local; the fd
    // is borrowed for the call.
    unsafe { blkdiscard(dev.as_fd().as_raw_fd(), &range) }.map_err(errno)?;
    Ok(())
}

/// Zeroes `[offset, offset + len)` (`BLKZEROOUT`). The range reads back as zeros; the
/// kernel uses WRITE ZEROES or unmap where the device offers them and writes zero pages
/// otherwise.
pub fn zero_out(dev: impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from `range`, a live local; the fd
    // is borrowed for the call.
    unsafe { blkzeroout(dev.as_fd().as_raw_fd(), &range) }.map_err(errno)?;
    Ok(())
}

/// Writes back and drops the device's buffer cache (`BLKFLSBUF`), so a later buffered
/// reader sees what O_DIRECT writers and loop devices wrote.
pub fn flush_buffers(dev: impl AsFd) -> io::Result<()> {
    // SAFETY: BLKFLSBUF takes no argument; the fd is borrowed for the call.
    unsafe { blkflsbuf(dev.as_fd().as_raw_fd()) }.map_err(errno)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_match_linux_fs_h() {
        assert_eq!(
            nix::request_code_read!(0x12, 114, std::mem::size_of::<libc::size_t>()),
            0x8008_1272
        );
        assert_eq!(libc::BLKSSZGET, 0x1268);
        assert_eq!(libc::BLKPBSZGET, 0x127b);
    }

    #[test]
    fn a_regular_file_is_not_a_block_device() {
        let f = tempfile::tempfile().unwrap();
        let e = logical_block_size(&f).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTTY));
        assert_eq!(size(&f).unwrap_err().raw_os_error(), Some(libc::ENOTTY));
    }
}
