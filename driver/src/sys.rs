//! The kernel interfaces the driver uses directly: reflink (`FICLONE`), directory fsync, file-system space, and the
//! kernel uevent netlink socket.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

nix::ioctl_write_int!(ioctl_ficlone, 0x94, 9);

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Makes `dst` share `src`'s extents (a reflink clone). Fails with `EOPNOTSUPP`,
/// `EXDEV` or `EINVAL` where the file system cannot; see [`is_reflink_unsupported`].
pub fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument and reads no
    // memory of ours; both descriptors are open for the duration of the call.
    unsafe { ioctl_ficlone(dst.as_raw_fd(), src.as_raw_fd() as libc::c_ulong) }
        .map(|_| ())
        .map_err(errno)
}

/// Whether a [`ficlone`] error means "this file system (or this pair) cannot reflink".
pub fn is_reflink_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

/// Size and logical sector size of a block device or regular file (files: 512).
pub fn size_and_sector(path: &Path) -> io::Result<(u64, u32)> {
    let f = File::open(path)?;
    let m = f.metadata()?;
    if m.file_type().is_block_device() {
        Ok((blockdev::size(&f)?, blockdev::logical_block_size(&f)?))
    } else {
        Ok((m.len(), 512))
    }
}

/// fsyncs a directory, making renames and unlinks in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn available_bytes(path: &Path) -> io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(errno)?;
    #[allow(clippy::unnecessary_cast)]
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Bytes allocated to a file (its blocks).
pub fn allocated_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

/// The offset of the first data at or after `off`, or None past the last data.
pub fn next_data(f: &File, off: u64) -> io::Result<Option<u64>> {
    let off = i64::try_from(off).map_err(io::Error::other)?;
    match nix::unistd::lseek(f.as_raw_fd(), off, nix::unistd::Whence::SeekData) {
        Ok(o) => Ok(Some(o as u64)),
        Err(nix::Error::ENXIO) => Ok(None),
        Err(e) => Err(errno(e)),
    }
}

/// The offset of the first hole at or after `off` (the end of the file at the latest).
pub fn next_hole(f: &File, off: u64) -> io::Result<u64> {
    let off = i64::try_from(off).map_err(io::Error::other)?;
    nix::unistd::lseek(f.as_raw_fd(), off, nix::unistd::Whence::SeekHole)
        .map(|o| o as u64)
        .map_err(errno)
}

/// Copies `len` bytes at `off` from `src` to the same offset of `dst`: in the kernel
/// (copy_file_range) where it can, through a buffer where the two files are on file
/// systems it will not copy between (EXDEV, EOPNOTSUPP, EINVAL).
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut a = i64::try_from(off + done).map_err(io::Error::other)?;
        let mut b = a;
        let chunk = usize::try_from((len - done).min(1 << 30)).map_err(io::Error::other)?;
        let n = match nix::fcntl::copy_file_range(src, Some(&mut a), dst, Some(&mut b), chunk) {
            Ok(n) => n,
            Err(
                nix::errno::Errno::EXDEV
                | nix::errno::Errno::EOPNOTSUPP
                | nix::errno::Errno::EINVAL,
            ) => {
                return copy_buffered(src, dst, off + done, len - done);
            }
            Err(e) => return Err(errno(e)),
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "source ended early",
            ));
        }
        done += n as u64;
    }
    Ok(())
}

/// Copies `len` bytes at `off` from `src` to `dst` through a buffer.
fn copy_buffered(src: &File, dst: &File, off: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0u64;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        src.read_exact_at(&mut buf[..n], off + done)?;
        dst.write_all_at(&buf[..n], off + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The kernel's uevent netlink socket (NETLINK_KOBJECT_UEVENT, multicast group 1: the
/// kernel's own messages; no udevd is needed), through libudev's monitor, filtered to the
/// `block` subsystem. Events queue in the socket from [`UeventSocket::open`] on, whether
/// or not anyone reads them yet.
pub struct UeventSocket {
    sock: udev::MonitorSocket,
}

impl std::fmt::Debug for UeventSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UeventSocket")
            .field("fd", &self.sock.as_raw_fd())
            .finish()
    }
}

/// Receive buffer asked for the uevent socket, so a burst (many disks appearing at once
/// while the state is being restored) does not overflow it.
pub const UEVENT_RCVBUF: usize = 8 << 20;

/// One batch of received uevents.
#[derive(Debug, Default)]
pub struct UeventBatch {
    /// Each event's properties (ACTION, DEVPATH, SUBSYSTEM, DEVNAME, MAJOR, ...).
    pub events: Vec<Vec<(String, String)>>,
    /// The socket overflowed (ENOBUFS): events were lost, so state must be rescanned.
    pub overflowed: bool,
}

impl UeventSocket {
    /// Opens and binds the socket (kernel source, `block` subsystem).
    pub fn open() -> io::Result<UeventSocket> {
        let sock = udev::MonitorBuilder::new_kernel()?
            .match_subsystem("block")?
            .listen()?;
        // SO_RCVBUFFORCE needs CAP_NET_ADMIN; without it the default buffer stays.
        let force = nix::sys::socket::setsockopt(
            &sock,
            nix::sys::socket::sockopt::RcvBufForce,
            &UEVENT_RCVBUF,
        );
        if let Err(e) = force {
            tracing::debug!(error = %e, "uevent socket keeps the default receive buffer");
        }
        Ok(UeventSocket { sock })
    }

    /// Waits up to `timeout` for events; true if some are ready.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::Error::EINTR) => Ok(false),
            Err(e) => Err(errno(e)),
        }
    }

    /// Reads every queued event without blocking.
    pub fn drain(&self) -> UeventBatch {
        let mut b = UeventBatch::default();
        let mut it = self.sock.iter();
        let mut overflows = 0;
        loop {
            match it.next() {
                Some(ev) => b.events.push(
                    ev.properties()
                        .map(|p| {
                            (
                                p.name().to_string_lossy().into_owned(),
                                p.value().to_string_lossy().into_owned(),
                            )
                        })
                        .collect(),
                ),
                None => {
                    // libudev returns NULL with errno set: EAGAIN when the queue is empty,
                    // ENOBUFS when the kernel dropped messages for want of buffer.
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) && overflows < 16 {
                        b.overflowed = true;
                        overflows += 1;
                        continue;
                    }
                    break;
                }
            }
        }
        b
    }
}
