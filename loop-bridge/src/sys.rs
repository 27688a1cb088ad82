//! Every ioctl and raw system call of this crate, declared once and wrapped in safe functions.
//!
//! Struct layouts follow `include/uapi/linux/loop.h`; their sizes are checked at compile time.
//! All return codes are mapped by [`check`]. Nothing outside this module uses `unsafe`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use libc::{c_int, c_ulong, Ioctl};

/// Length of `lo_file_name` and `lo_crypt_name` (including the terminating NUL).
pub const LO_NAME_SIZE: usize = 64;
/// Length of `lo_encrypt_key`.
const LO_KEY_SIZE: usize = 32;

/// The loop device rejects writes.
pub const LO_FLAGS_READ_ONLY: u32 = 1;
/// Detach automatically when the last opener closes the device.
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
/// The loop device does direct I/O on its backing file.
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

const LOOP_SET_FD: Ioctl = 0x4C00;
const LOOP_CLR_FD: Ioctl = 0x4C01;
const LOOP_SET_STATUS64: Ioctl = 0x4C04;
const LOOP_GET_STATUS64: Ioctl = 0x4C05;
const LOOP_SET_DIRECT_IO: Ioctl = 0x4C08;
const LOOP_SET_BLOCK_SIZE: Ioctl = 0x4C09;
const LOOP_CONFIGURE: Ioctl = 0x4C0A;
const LOOP_CTL_GET_FREE: Ioctl = 0x4C82;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);

impl LoopInfo64 {
    /// An all-zero `loop_info64`, the neutral value for every field.
    pub const fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

impl std::fmt::Debug for LoopInfo64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopInfo64")
            .field("lo_device", &self.lo_device)
            .field("lo_inode", &self.lo_inode)
            .field("lo_rdevice", &self.lo_rdevice)
            .field("lo_offset", &self.lo_offset)
            .field("lo_sizelimit", &self.lo_sizelimit)
            .field("lo_number", &self.lo_number)
            .field("lo_flags", &self.lo_flags)
            .field(
                "lo_file_name",
                &String::from_utf8_lossy(nul_terminated(&self.lo_file_name)),
            )
            .finish_non_exhaustive()
    }
}

/// `struct loop_config`, the argument of `LOOP_CONFIGURE` (Linux 5.8+).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopConfig {
    pub fn new(backing: BorrowedFd<'_>, block_size: u32, info: LoopInfo64) -> Self {
        LoopConfig {
            // A valid descriptor is never negative, so the conversion is lossless.
            fd: backing.as_raw_fd() as u32,
            block_size,
            info,
            reserved: [0; 8],
        }
    }
}

/// The bytes of `buf` before its first NUL (all of it if there is none).
pub fn nul_terminated(buf: &[u8]) -> &[u8] {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    &buf[..end]
}

/// Maps the return value of a libc call: negative means failure with `errno` set.
fn check(ret: c_int) -> io::Result<c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `LOOP_CTL_GET_FREE` on `/dev/loop-control`: the number of an unbound loop device, created
/// if needed. Two callers racing may both be handed the same number.
pub fn ctl_get_free(control: BorrowedFd<'_>) -> io::Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an integer; `control` is a
    // live descriptor borrowed for the duration of the call.
    let n = check(unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
    // `check` rejected negative values.
    Ok(n as u32)
}

/// `LOOP_CONFIGURE`: bind `config.fd` to the loop device and apply all settings atomically.
pub fn configure(dev: BorrowedFd<'_>, config: &LoopConfig) -> io::Result<()> {
    // SAFETY: the kernel reads exactly size_of::<LoopConfig>() bytes from the pointer, which
    // refers to a live, properly laid out `struct loop_config` (size asserted above) that
    // outlives the call; the kernel does not keep the pointer.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, config as *const LoopConfig) })?;
    Ok(())
}

/// `LOOP_SET_FD`: bind `backing` to the loop device (legacy setup, first step).
pub fn set_fd(dev: BorrowedFd<'_>, backing: BorrowedFd<'_>) -> io::Result<()> {
    let arg = backing.as_raw_fd() as c_ulong;
    // SAFETY: LOOP_SET_FD takes the backing descriptor by value as an unsigned long; no memory
    // is passed. Both descriptors are live borrows for the duration of the call.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_FD, arg) })?;
    Ok(())
}

/// `LOOP_CLR_FD`: detach. Since Linux 5.x this marks the device autoclear and the kernel
/// unbinds it when the last opener closes it.
pub fn clr_fd(dev: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: LOOP_CLR_FD takes no argument; `dev` is a live descriptor borrowed for the call.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD, 0 as c_ulong) })?;
    Ok(())
}

/// `LOOP_SET_STATUS64`: offset, size limit, settable flags and file name.
pub fn set_status64(dev: BorrowedFd<'_>, info: &LoopInfo64) -> io::Result<()> {
    // SAFETY: the kernel copies size_of::<LoopInfo64>() bytes (size asserted above) from a
    // reference that is valid for the whole call and not retained afterwards.
    check(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_STATUS64,
            info as *const LoopInfo64,
        )
    })?;
    Ok(())
}

/// `LOOP_GET_STATUS64`: fails with `ENXIO` when the device is not bound.
pub fn get_status64(dev: BorrowedFd<'_>) -> io::Result<LoopInfo64> {
    let mut info = LoopInfo64::zeroed();
    // SAFETY: the kernel writes exactly size_of::<LoopInfo64>() bytes into `info`, a local of
    // that exact layout that is exclusively borrowed for the duration of the call.
    check(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_GET_STATUS64,
            &mut info as *mut LoopInfo64,
        )
    })?;
    Ok(info)
}

/// `LOOP_SET_BLOCK_SIZE` (Linux 4.14+): the logical block size of the loop device.
pub fn set_block_size(dev: BorrowedFd<'_>, block_size: u32) -> io::Result<()> {
    // SAFETY: LOOP_SET_BLOCK_SIZE takes the size by value as an unsigned long (passed at full
    // width so no upper bits are undefined); no memory is passed.
    check(unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            LOOP_SET_BLOCK_SIZE,
            c_ulong::from(block_size),
        )
    })?;
    Ok(())
}

/// `LOOP_SET_DIRECT_IO` (Linux 4.10+).
pub fn set_direct_io(dev: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: LOOP_SET_DIRECT_IO takes a boolean by value as an unsigned long; no memory is
    // passed.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_SET_DIRECT_IO, c_ulong::from(on)) })?;
    Ok(())
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` if another open file description holds the lock.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    // SAFETY: flock only takes a descriptor and flags; `fd` is a live borrow for the call.
    match check(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Blocking `flock(LOCK_EX)`, retried on `EINTR`.
#[cfg(feature = "test-utils")]
pub fn lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<()> {
    loop {
        // SAFETY: flock only takes a descriptor and flags; `fd` is a live borrow for the call.
        match check(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other.map(|_| ()),
        }
    }
}

/// Splits a `dev_t` as returned by `stat()` into (major, minor).
pub fn split_dev(dev: u64) -> (u32, u32) {
    (libc::major(dev), libc::minor(dev))
}

/// Splits a device number as the kernel encodes it in `loop_info64` (`huge_encode_dev`, the
/// "new" 32-bit encoding: 12 bits of major, 20 bits of minor) into (major, minor).
pub fn split_kernel_dev(dev: u64) -> (u32, u32) {
    let dev = dev as u32;
    let major = (dev & 0xfff00) >> 8;
    let minor = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_struct_sizes_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(std::mem::offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(std::mem::offset_of!(LoopConfig, info), 8);
    }

    #[test]
    fn kernel_dev_encoding_decodes_like_userspace_stat() {
        for (major, minor) in [(7u32, 0u32), (8, 17), (259, 3), (7, 300), (253, 70000)] {
            // huge_encode_dev: (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
            let k = u64::from((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
            assert_eq!(split_kernel_dev(k), (major, minor));
            assert_eq!(split_dev(libc::makedev(major, minor)), (major, minor));
        }
    }

    #[test]
    fn nul_terminated_stops_at_first_nul() {
        assert_eq!(nul_terminated(b"abc\0def\0"), b"abc");
        assert_eq!(nul_terminated(b"abc"), b"abc");
        assert_eq!(nul_terminated(b"\0"), b"");
    }
}
