//! Kernel interfaces: positional vectored I/O and block-device ioctls.
//!
//! Every `unsafe` call of this crate lives here, wrapped in a safe function.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

use vm_memory::VolatileSlice;

/// Most iovecs one `preadv`/`pwritev` accepts on Linux (`IOV_MAX`).
pub const IOV_MAX: usize = 1024;

/// Maps a libc return value to `io::Result`.
fn check(ret: libc::c_long) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        // A non-negative c_long always fits in usize on the 64-bit targets this runs on.
        usize::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
    }
}

fn to_iovecs(slices: &[VolatileSlice<'_, ()>]) -> Vec<libc::iovec> {
    slices
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.ptr_guard_mut().as_ptr().cast(),
            iov_len: s.len(),
        })
        .collect()
}

fn check_count(n: usize) -> io::Result<libc::c_int> {
    if n > IOV_MAX {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    libc::c_int::try_from(n).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn to_off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// `preadv(2)` into guest memory slices (at most [`IOV_MAX`]); returns bytes read.
pub fn preadv(file: &File, slices: &[VolatileSlice<'_, ()>], offset: u64) -> io::Result<usize> {
    let cnt = check_count(slices.len())?;
    let iov = to_iovecs(slices);
    let off = to_off(offset)?;
    // SAFETY: every iovec points into a VolatileSlice borrowed for the duration of this call,
    // i.e. into mapped memory of exactly `iov_len` bytes; `cnt` is the length of `iov`, and
    // the kernel only writes inside those ranges.
    let ret = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), cnt, off) };
    check(ret as libc::c_long)
}

/// `pwritev(2)` from guest memory slices (at most [`IOV_MAX`]); returns bytes written.
pub fn pwritev(file: &File, slices: &[VolatileSlice<'_, ()>], offset: u64) -> io::Result<usize> {
    let cnt = check_count(slices.len())?;
    let iov = to_iovecs(slices);
    let off = to_off(offset)?;
    // SAFETY: every iovec points into a VolatileSlice borrowed for the duration of this call,
    // i.e. into mapped memory of exactly `iov_len` bytes; `cnt` is the length of `iov`, and
    // the kernel only reads those ranges.
    let ret = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), cnt, off) };
    check(ret as libc::c_long)
}

nix::ioctl_read_bad!(blk_ssz_get, libc::BLKSSZGET, libc::c_int);
nix::ioctl_read_bad!(blk_pbsz_get, libc::BLKPBSZGET, libc::c_uint);
nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
// _IO(0x12, 119)
nix::ioctl_write_ptr_bad!(blk_discard, 0x1277, [u64; 2]);
// _IO(0x12, 127)
nix::ioctl_write_ptr_bad!(blk_zeroout, 0x127f, [u64; 2]);
nix::ioctl_read_bad!(blk_io_opt, 0x1279, libc::c_uint);
nix::ioctl_read_bad!(blk_io_min, 0x1278, libc::c_uint);

/// Logical sector size of a block device (`BLKSSZGET`).
pub fn logical_block_size(file: &File) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int into `v`, which lives for the call.
    unsafe { blk_ssz_get(file.as_fd().as_raw_fd(), &mut v) }.map_err(io::Error::from)?;
    u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Physical sector size of a block device (`BLKPBSZGET`).
pub fn physical_block_size(file: &File) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one c_uint into `v`, which lives for the call.
    unsafe { blk_pbsz_get(file.as_raw_fd(), &mut v) }.map_err(io::Error::from)?;
    Ok(v)
}

/// Minimum and optimal I/O sizes of a block device (`BLKIOMIN`, `BLKIOOPT`).
pub fn io_sizes(file: &File) -> io::Result<(u32, u32)> {
    let mut min: libc::c_uint = 0;
    let mut opt: libc::c_uint = 0;
    // SAFETY: BLKIOMIN writes one c_uint into `min`, which lives for the call.
    unsafe { blk_io_min(file.as_raw_fd(), &mut min) }.map_err(io::Error::from)?;
    // SAFETY: BLKIOOPT writes one c_uint into `opt`, which lives for the call.
    unsafe { blk_io_opt(file.as_raw_fd(), &mut opt) }.map_err(io::Error::from)?;
    Ok((min, opt))
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn device_size(file: &File) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `v`, which lives for the call.
    unsafe { blk_getsize64(file.as_raw_fd(), &mut v) }.map_err(io::Error::from)?;
    Ok(v)
}

/// Discards `[offset, offset + len)` of a block device (`BLKDISCARD`).
pub fn discard(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 from `range`, which lives for the call.
    unsafe { blk_discard(file.as_raw_fd(), &range) }.map_err(io::Error::from)?;
    Ok(())
}

/// Zeroes `[offset, offset + len)` of a block device (`BLKZEROOUT`).
pub fn zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    // SAFETY: BLKZEROOUT reads two u64 from `range`, which lives for the call.
    unsafe { blk_zeroout(file.as_raw_fd(), &range) }.map_err(io::Error::from)?;
    Ok(())
}

/// Borrows a raw fd for one call (poll).
///
/// The caller must keep `fd` open for as long as the borrow is used; it is only used for
/// fds owned by the caller's own objects.
pub fn borrow_fd<'a>(fd: std::os::fd::RawFd) -> std::os::fd::BorrowedFd<'a> {
    // SAFETY: callers pass fds owned by objects (listener, eventfd) that they keep alive
    // across the short poll call that uses the borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// The filesystem type (`statfs.f_type`) of `file`.
fn fs_magic(file: &File) -> Option<u64> {
    // SAFETY: `statfs` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call and `st` is a valid, writable statfs buffer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some(st.f_type as u64)
}

/// Whether `file` lives in memory (tmpfs, ramfs): its reads and writes are page-cache
/// copies that never wait for a device.
pub fn is_memory_backed(file: &File) -> bool {
    const TMPFS_MAGIC: u64 = 0x0102_1994;
    const RAMFS_MAGIC: u64 = 0x8584_58f6;
    matches!(fs_magic(file), Some(TMPFS_MAGIC | RAMFS_MAGIC))
}

/// Whether `file` is on a filesystem whose I/O waits for a server (FUSE, NFS, SMB, Ceph,
/// 9p) and may block the thread that submits it to io_uring, which issues it inline:
/// seen with FUSE, whose direct reads wait in `io_uring_enter` for the daemon's answer.
/// Such I/O is sent to io_uring's workers (IOSQE_ASYNC) so the queue thread never waits.
pub fn waits_for_a_server(file: &File) -> bool {
    const FUSE_MAGIC: u64 = 0x6573_5546;
    const NFS_MAGIC: u64 = 0x6969;
    const SMB2_MAGIC: u64 = 0xfe53_4d42;
    const CIFS_MAGIC: u64 = 0xff53_4d42;
    const CEPH_MAGIC: u64 = 0x00c3_6400;
    const V9FS_MAGIC: u64 = 0x0102_1997;
    matches!(
        fs_magic(file),
        Some(FUSE_MAGIC | NFS_MAGIC | SMB2_MAGIC | CIFS_MAGIC | CEPH_MAGIC | V9FS_MAGIC)
    )
}

/// O_DIRECT alignment of a regular file (`statx` `STATX_DIOALIGN`): (memory, offset), or
/// None where the kernel or filesystem does not report it.
pub fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: `statx` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open for the call, the path is a NUL-terminated empty string used
    // with AT_EMPTY_PATH, and `stx` is a valid, writable statx buffer.
    let ret = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// An io_uring instance with the volume registered as fixed file 0.
///
/// Only reads and writes of guest memory are submitted; each submission's buffers must
/// stay valid until its completion has been reaped (see [`Uring::push_rw`]).
pub struct Uring {
    ring: io_uring::IoUring,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl Uring {
    /// A ring of `entries` submission slots (the completion queue is twice as large), with
    /// `file` registered. Fails with ENOSYS / EPERM where io_uring is unavailable.
    pub fn new(entries: u32, file: &File) -> io::Result<Uring> {
        let ring = io_uring::IoUring::new(entries.max(1))?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        Ok(Uring { ring })
    }

    /// Replaces the registered file (a resumed volume). Requests in flight keep the file
    /// they were submitted with.
    pub fn register(&mut self, file: &File) -> io::Result<()> {
        self.ring
            .submitter()
            .register_files_update(0, &[file.as_raw_fd()])
            .map(|_| ())
    }

    /// The ring's fd: readable while completions are waiting.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }

    /// Queues a vectored read (or write) of the registered file at `offset`, submitting
    /// what is queued first if the submission queue is full. `force_async`: never issued
    /// inline by the submitting thread, always by io_uring's workers.
    ///
    /// # Safety
    /// `iov` must point to `iovcnt` iovecs, and those iovecs and every byte of memory they
    /// describe must stay valid (mapped, not freed, not moved) until the completion
    /// carrying `user_data` has been reaped by [`Uring::reap`] or [`Uring::wait`]: the
    /// kernel may read the iovecs and access the memory at any time until then.
    pub unsafe fn push_rw(
        &mut self,
        write: bool,
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
        user_data: u64,
        force_async: bool,
    ) -> io::Result<()> {
        let fd = io_uring::types::Fixed(0);
        let sqe = if write {
            io_uring::opcode::Writev::new(fd, iov, iovcnt)
                .offset(offset)
                .build()
        } else {
            io_uring::opcode::Readv::new(fd, iov, iovcnt)
                .offset(offset)
                .build()
        }
        .user_data(user_data);
        let sqe = if force_async {
            sqe.flags(io_uring::squeue::Flags::ASYNC)
        } else {
            sqe
        };
        loop {
            // SAFETY: the entry refers to the registered file and to iovecs the caller keeps
            // valid, with the memory they describe, until its completion is reaped.
            if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    /// Submits every queued entry (one system call); returns how many were submitted.
    pub fn submit(&mut self) -> io::Result<usize> {
        loop {
            match self.ring.submit() {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is congested: completions must be reaped first; the
                // entries stay queued and go with the next submit.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(0),
                r => return r,
            }
        }
    }

    /// Submits what is queued and blocks until at least one completion is waiting.
    pub fn wait(&mut self) -> io::Result<()> {
        match self.ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Whether completions are waiting (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Appends `(user_data, result)` of every waiting completion to `out`.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}

/// An anonymous shared memory file of `size` bytes (zeroed), closed on exec.
pub fn memfd(name: &str, size: u64) -> io::Result<File> {
    let name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let fd = nix::sys::memfd::memfd_create(&name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .map_err(io::Error::from)?;
    let file = File::from(fd);
    file.set_len(size)?;
    Ok(file)
}
