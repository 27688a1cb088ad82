//! Kernel interfaces: positional vectored I/O, file space calls and io_uring.
//! (Block-device ioctls are the `blockdev` crate's.)
//!
//! Every `unsafe` call of this crate lives here, wrapped in a safe function.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

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
/// stay valid until its completion has been reaped (see [`Uring::push_rw`]), or until
/// [`wait_released`] says the kernel is done with the ring.
///
/// Where the kernel has it (Linux 6.1+), completion work is deferred
/// (`IORING_SETUP_DEFER_TASKRUN`): a completing request does not interrupt the submitting
/// thread with task work (an inter-processor interrupt, an `EINTR` out of its
/// `epoll_wait`, a pass through the ring fd's poll queue); it is queued, an eventfd is
/// signalled, and the thread posts the completions when it reaps. Such a ring belongs to
/// one thread (`IORING_SETUP_SINGLE_ISSUER`): the first that calls [`Uring::claim`]
/// submits, reaps and waits, and nobody else can.
pub struct Uring {
    ring: io_uring::IoUring,
    /// Deferred completion work; `None`: a plain ring, whose fd is readable while
    /// completions wait.
    deferred: Option<Deferred>,
    /// Read end of a pipe whose write end only the ring's file table holds: the kernel
    /// frees the table after the last request submitted to the ring has ended, so the
    /// pipe hangs up then, whoever the ring belonged to.
    marker: OwnedFd,
}

struct Deferred {
    /// Signalled when completion work is queued (and when completions are posted).
    efd: EventFd,
    /// The thread that enabled the ring: the only one that may use it.
    owner: Option<std::thread::ThreadId>,
    /// The eventfd may hold a signal nobody needs: completions were posted (each posting
    /// signals it) or it woke the owner, since it was last cleared.
    stale: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("fd", &self.ring.as_raw_fd())
            .field("deferred", &self.deferred.is_some())
            .finish()
    }
}

impl Uring {
    /// A ring of `entries` submission slots (the completion queue is twice as large), with
    /// `file` registered; with deferred completion work if `defer` and the kernel has it.
    /// Fails with ENOSYS / EPERM where io_uring is unavailable.
    pub fn new(entries: u32, file: &File, defer: bool) -> io::Result<Uring> {
        let entries = entries.max(1);
        let mut ring = None;
        if defer {
            // Disabled until the thread that will use it enables it (`claim`).
            match io_uring::IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled()
                .build(entries)
            {
                Ok(r) => ring = Some(r),
                // Older kernels reject flags they do not know.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        let deferred = ring.is_some();
        let ring = match ring {
            Some(r) => r,
            None => io_uring::IoUring::new(entries)?,
        };
        let (marker, held) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        ring.submitter()
            .register_files(&[file.as_raw_fd(), held.as_raw_fd()])?;
        drop(held);
        let deferred = if deferred {
            let efd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
            ring.submitter().register_eventfd(efd.as_raw_fd())?;
            Some(Deferred {
                efd,
                owner: None,
                stale: false,
            })
        } else {
            None
        };
        Ok(Uring {
            ring,
            deferred,
            marker,
        })
    }

    /// Makes the calling thread the ring's user: the first call enables a deferred ring
    /// for this thread; later calls from another thread fail (EEXIST, as the kernel would
    /// answer that thread). A plain ring serves any thread.
    pub fn claim(&mut self) -> io::Result<()> {
        let Some(d) = self.deferred.as_mut() else {
            return Ok(());
        };
        let me = std::thread::current().id();
        match d.owner {
            Some(t) if t == me => return Ok(()),
            Some(_) => return Err(io::Error::from_raw_os_error(libc::EEXIST)),
            None => {}
        }
        self.ring.submitter().register_enable_rings()?;
        // A kernel that bound the ring to the thread that created it would refuse every
        // submit from this one (EEXIST): find out now, while nothing is in flight.
        self.run_work()?;
        if let Some(d) = self.deferred.as_mut() {
            d.owner = Some(me);
        }
        Ok(())
    }

    /// The notify fd woke the caller: the next [`Uring::reap`] clears it.
    pub fn notified(&mut self) {
        self.mark_stale();
    }

    fn mark_stale(&mut self) {
        if let Some(d) = self.deferred.as_mut() {
            d.stale = true;
        }
    }

    /// Whether completion work is deferred to the owning thread.
    pub fn is_deferred(&self) -> bool {
        self.deferred.is_some()
    }

    /// Replaces the registered file (a resumed volume). Requests in flight keep the file
    /// they were submitted with.
    pub fn register(&mut self, file: &File) -> io::Result<()> {
        // Registration may run completion work too.
        self.mark_stale();
        self.ring
            .submitter()
            .register_files_update(0, &[file.as_raw_fd()])
            .map(|_| ())
    }

    /// The fd to watch for completions: readable while some wait to be reaped.
    pub fn notify_fd(&self) -> std::os::fd::RawFd {
        match &self.deferred {
            Some(d) => d.efd.as_raw_fd(),
            None => self.ring.as_raw_fd(),
        }
    }

    /// A second handle on the release marker, for [`wait_released`].
    pub fn marker(&self) -> io::Result<OwnedFd> {
        self.marker.try_clone()
    }

    /// Queues a vectored read (or write) of the registered file at `offset`, submitting
    /// what is queued first if the submission queue is full. `force_async`: never issued
    /// inline by the submitting thread, always by io_uring's workers.
    ///
    /// # Safety
    /// `iov` must point to `iovcnt` iovecs, and those iovecs and every byte of memory they
    /// describe must stay valid (mapped, not freed, not moved) until the completion
    /// carrying `user_data` has been reaped by [`Uring::reap`] or [`Uring::wait`], or
    /// [`wait_released`] has returned for the ring: the kernel may read the iovecs and
    /// access the memory at any time until then.
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

    /// Submits every queued entry (one system call, none if nothing is queued and no
    /// completion work waits); returns how many were submitted.
    pub fn submit(&mut self) -> io::Result<usize> {
        let work = self.work_queued();
        if self.ring.submission().is_empty() && !work {
            return Ok(0);
        }
        if work {
            // The submit carries GETEVENTS: completions get posted.
            self.mark_stale();
        }
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
        self.mark_stale();
        match self.ring.submit_and_wait(1) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Completion work queued for the owner to run (deferred rings).
    fn work_queued(&mut self) -> bool {
        self.deferred.is_some() && self.ring.submission().taskrun()
    }

    /// Whether completions are waiting (no system call).
    pub fn has_completions(&mut self) -> bool {
        !self.ring.completion().is_empty() || self.work_queued()
    }

    /// Appends `(user_data, result)` of every waiting completion to `out`; `in_flight`
    /// counts the requests submitted and not reaped yet.
    ///
    /// A deferred ring first runs its queued completion work. The kernel posts a bounded
    /// number of completions per call (20 on Linux 6.18) and leaves the rest queued with
    /// the flag set but the eventfd not signalled again, so calls repeat while they post
    /// any and requests remain in flight: one reap takes everything queued. The eventfd,
    /// signalled again by completions posted (or the wake-up it caused), is then cleared,
    /// and the flag looked at once more: work queued after the last run set it before
    /// signalling.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>, mut in_flight: usize) -> io::Result<()> {
        if self.deferred.is_none() {
            self.collect(out);
            return Ok(());
        }
        let mut again = false;
        let mut cleared = false;
        loop {
            let run = again || self.work_queued();
            if run {
                self.run_work()?;
            }
            let n = self.collect(out);
            in_flight = in_flight.saturating_sub(n);
            again = run && n > 0 && in_flight > 0;
            if again {
                continue;
            }
            if cleared {
                return Ok(());
            }
            if let Some(d) = self.deferred.as_mut().filter(|d| d.stale) {
                d.stale = false;
                match d.efd.read() {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            cleared = true;
            if !self.work_queued() {
                return Ok(());
            }
        }
    }

    /// Runs the queued completion work of a deferred ring (posts its completions).
    fn run_work(&mut self) -> io::Result<()> {
        self.mark_stale();
        loop {
            // SAFETY: no submission, no argument: asks the kernel to post completions into
            // the completion queue this ring maps.
            let r = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    0,
                    0,
                    io_uring::EnterFlags::GETEVENTS.bits(),
                    None,
                )
            };
            match r {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                r => return r.map(|_| ()),
            }
        }
    }

    fn collect(&mut self, out: &mut Vec<(u64, i32)>) -> usize {
        let before = out.len();
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        out.len() - before
    }
}

/// Blocks until the ring `marker` came from (see [`Uring::marker`]) has been closed and
/// the kernel has ended every request submitted to it; logs while it waits.
pub fn wait_released(marker: &OwnedFd) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let started = std::time::Instant::now();
    loop {
        let mut fds = [PollFd::new(marker.as_fd(), PollFlags::empty())];
        match poll(&mut fds, PollTimeout::from(30_000u16)) {
            Err(nix::errno::Errno::EINTR) | Ok(0) => {}
            Err(e) => return Err(e.into()),
            Ok(_) => {
                let ev = fds[0].revents().unwrap_or(PollFlags::empty());
                if ev.contains(PollFlags::POLLNVAL) {
                    return Err(io::Error::from_raw_os_error(libc::EBADF));
                }
                return Ok(());
            }
        }
        tracing::warn!(
            waited_s = started.elapsed().as_secs(),
            "requests of a closed io_uring are still in the kernel"
        );
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    fn readable(fd: std::os::fd::RawFd) -> bool {
        readable_within(fd, Duration::ZERO)
    }

    /// Whether `fd` (open for the call) becomes readable within `t`.
    fn readable_within(fd: std::os::fd::RawFd, t: Duration) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        // SAFETY: callers pass the fd of a ring they hold, open across this call.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        let t = PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX);
        poll(&mut fds, t).unwrap() > 0
    }

    /// A file of `len` bytes.
    fn data_file(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        f
    }

    #[test]
    fn a_deferred_ring_reaps_every_queued_completion_in_one_reap_and_goes_quiet() {
        // Reads of an empty pipe wait in the kernel; one write completes all of them at
        // once, so all 64 completions are queued for the owner before it reaps. The kernel
        // posts at most 20 per run and leaves the rest flagged but without signalling the
        // eventfd again: a reap must run until nothing is left, and leave the eventfd
        // clear (no wake-up for completions already taken).
        const N: usize = 64;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // Declared before the ring, so dropped after it even when an assertion fails.
        let mut bufs = vec![[0u8; 8]; N];
        let iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut ring = Uring::new(128, &File::from(r), true).unwrap();
        assert!(ring.is_deferred(), "the suite runs on Linux 6.1 or later");
        ring.claim().unwrap();
        for (i, v) in iov.iter().enumerate() {
            // SAFETY: `v` points into `bufs`, alive until the completions are reaped below,
            // or until the ring (declared after it) is dropped on a failed assertion.
            unsafe { ring.push_rw(false, v, 1, 0, i as u64, false) }.unwrap();
        }
        ring.submit().unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out, N).unwrap();
        assert!(out.is_empty(), "{out:?}");
        assert!(!readable(ring.notify_fd()));
        File::from(w).write_all(&[9u8; 8 * N]).unwrap();
        // The wake-up may reach the ring's eventfd a little after the write returns on a
        // loaded machine: wait for it, bounded. (The reads themselves run when the owner
        // reaps: their completion work is deferred to it.)
        assert!(
            readable_within(ring.notify_fd(), Duration::from_secs(5)),
            "completions not signalled"
        );
        ring.notified();
        ring.reap(&mut out, N).unwrap();
        assert_eq!(out.len(), N, "completions left behind: {out:?}");
        assert!(out.iter().all(|&(_, r)| r == 8), "{out:?}");
        assert!(bufs.iter().all(|b| *b == [9u8; 8]));
        assert!(!ring.has_completions());
        assert!(!readable(ring.notify_fd()), "a wake-up for nothing");
    }

    #[test]
    fn a_deferred_ring_serves_only_the_thread_that_claimed_it() {
        let f = data_file(4096);
        let mut ring = Uring::new(8, f.as_file(), true).unwrap();
        ring.claim().unwrap();
        ring.claim().unwrap();
        let err = std::thread::scope(|s| s.spawn(|| ring.claim()).join().unwrap()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        // A plain ring serves anyone.
        let mut plain = Uring::new(8, f.as_file(), false).unwrap();
        assert!(!plain.is_deferred());
        std::thread::scope(|s| s.spawn(|| plain.claim()).join().unwrap()).unwrap();
        plain.claim().unwrap();
    }

    #[test]
    fn the_release_marker_hangs_up_only_once_the_ring_and_its_requests_are_gone() {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        for defer in [true, false] {
            // A read of an empty pipe stays in flight until the ring is closed.
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            let file = File::from(r);
            let mut ring = Uring::new(8, &file, defer).unwrap();
            ring.claim().unwrap();
            let mut buf = vec![0u8; 512];
            let iov = [libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            }];
            // SAFETY: `buf` outlives the ring: the test waits for the marker below.
            unsafe { ring.push_rw(false, iov.as_ptr(), 1, 0, 7, false) }.unwrap();
            ring.submit().unwrap();
            let marker = ring.marker().unwrap();
            let hung_up = |ms: u16| {
                let mut fds = [PollFd::new(marker.as_fd(), PollFlags::empty())];
                poll(&mut fds, PollTimeout::from(ms)).unwrap() > 0
            };
            assert!(
                !hung_up(100),
                "released while the ring is open (defer {defer})"
            );
            drop(ring);
            assert!(hung_up(5000), "not released after close (defer {defer})");
            wait_released(&marker).unwrap();
            drop((w, buf));
        }
    }
}
