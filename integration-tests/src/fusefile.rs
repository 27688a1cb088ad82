//! A file whose I/O the test controls: one regular file on a FUSE file system served by
//! threads of the test process, backed by a sparse file on the host.
//!
//! ```text
//!   FuseFile::new(size)        <tmp>/mnt/disk.img  (FUSE, direct I/O: no page cache)
//!        │                        │ read / write / fsync ── gate(Mode) ──> <tmp>/backing.img
//!        │                        │ lookup / getattr / open / flush / release: always served
//!   LoopDevice::attach(path, 4096)   → "a 4096-sector device whose I/O fails or hangs on command"
//!
//!   Mode::Ok          I/O goes to the backing file
//!   Mode::Fail(errno) every read/write/fsync returns errno at once (EIO, ENODEV, ...)
//!   Mode::Hang        every read/write/fsync blocks until the mode changes or the file
//!                     system goes away (requests already blocked then follow the new mode)
//!   Mode::HangRange   only reads/writes touching a byte range block
//! ```
//!
//! Data requests are answered on threads of their own, so a hung request never stops the
//! session thread: `getattr`, `open` and friends keep working in every mode.
//!
//! A loop device over the file passes the file's errno through the block layer's status
//! codes: `EIO` stays `EIO`, and `ENODEV` becomes `BLK_STS_OFFLINE`, which its users see
//! as `ENODEV` again on kernels that have that status (the 6.18 host kernel does; older
//! ones turn it into `EIO`).
//!
//! On drop: every blocked request is released with `EIO`, the file system is unmounted
//! (lazily when something still holds the file, e.g. a loop device, and then its FUSE
//! connection is aborted so that nothing waits on it), and the session thread is joined.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, SessionACL, WriteFlags,
};

/// Name of the one file in the file system.
pub const FUSE_FILE_NAME: &str = "disk.img";

const FILE_INO: u64 = 2;
const TTL: Duration = Duration::from_secs(1);

/// What the file's data requests do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Served from the backing file.
    Ok,
    /// Answered at once with this errno (e.g. `libc::EIO`, `libc::ENODEV`).
    Fail(i32),
    /// Blocked until the mode changes or the file system is torn down.
    Hang,
    /// Requests that touch bytes `start..end` of the file block like [`Mode::Hang`];
    /// the others are served (so requests complete out of order).
    HangRange {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
}

/// Counters of the data requests seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FuseStats {
    /// Read requests received.
    pub reads: u64,
    /// Write requests received.
    pub writes: u64,
    /// fsync requests received.
    pub fsyncs: u64,
    /// Requests answered with an error (mode `Fail`, teardown, or a host I/O error).
    pub failed: u64,
    /// Requests blocked right now (mode `Hang`).
    pub blocked: u64,
    /// Requests that were blocked at some point.
    pub ever_blocked: u64,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    closing: bool,
    stats: FuseStats,
}

#[derive(Debug)]
struct Control {
    state: Mutex<State>,
    changed: Condvar,
}

/// A clonable handle that switches the mode of a [`FuseFile`] and reads its counters;
/// usable from any thread.
#[derive(Debug, Clone)]
pub struct FuseControl(Arc<Control>);

impl FuseControl {
    fn new() -> Self {
        Self(Arc::new(Control {
            state: Mutex::new(State {
                mode: Mode::Ok,
                closing: false,
                stats: FuseStats::default(),
            }),
            changed: Condvar::new(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Switches the mode; requests blocked in `Hang` wake up and follow the new mode.
    pub fn set_mode(&self, mode: Mode) {
        let mut st = self.lock();
        tracing::info!(from = ?st.mode, to = ?mode, "fusefile: mode");
        st.mode = mode;
        self.0.changed.notify_all();
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.lock().mode
    }

    /// The counters so far.
    pub fn stats(&self) -> FuseStats {
        self.lock().stats
    }

    /// Waits at most `timeout` until at least `n` requests are blocked; returns the count
    /// then.
    pub fn wait_blocked(&self, n: u64, timeout: Duration) -> u64 {
        let end = Instant::now() + timeout;
        let mut st = self.lock();
        while st.stats.blocked < n {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .0
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.stats.blocked
    }

    /// A guard that, when dropped, switches the mode to `Fail(EIO)`, releasing every
    /// blocked request. Declare it after the guest and the export of a test, so that on
    /// any exit (also a panic) hung I/O is released before they are torn down: a process
    /// with I/O stuck in the kernel cannot be reaped.
    pub fn release_on_drop(&self) -> ReleaseOnDrop {
        ReleaseOnDrop(self.clone())
    }

    /// Teardown: everything blocked or to come fails with EIO.
    fn close(&self) {
        let mut st = self.lock();
        st.closing = true;
        self.0.changed.notify_all();
    }

    /// Admission of one data request: `Ok` to serve it, or the errno to answer with.
    fn gate(&self, kind: Kind, offset: u64, len: u64) -> std::result::Result<(), Errno> {
        let mut st = self.lock();
        match kind {
            Kind::Read => st.stats.reads += 1,
            Kind::Write => st.stats.writes += 1,
            Kind::Fsync => st.stats.fsyncs += 1,
        }
        let mut counted = false;
        loop {
            if st.closing {
                break Err(Errno::EIO);
            }
            let hang = match st.mode {
                Mode::Ok => false,
                Mode::Fail(e) => break Err(Errno::from_i32(e)),
                Mode::Hang => true,
                Mode::HangRange { start, end } => {
                    !matches!(kind, Kind::Fsync) && offset < end && offset + len > start
                }
            };
            match hang {
                false => break Ok(()),
                true => {
                    if !counted {
                        counted = true;
                        st.stats.ever_blocked += 1;
                    }
                    st.stats.blocked += 1;
                    self.0.changed.notify_all();
                    st = self.0.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.stats.blocked -= 1;
                }
            }
        }
        .inspect_err(|_| st.stats.failed += 1)
    }

    fn note_failure(&self) {
        self.lock().stats.failed += 1;
    }
}

/// See [`FuseControl::release_on_drop`].
#[derive(Debug)]
pub struct ReleaseOnDrop(FuseControl);

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.set_mode(Mode::Fail(libc::EIO));
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Read,
    Write,
    Fsync,
}

/// The file system: a root directory with one file.
#[derive(Debug)]
struct OneFileFs {
    backing: Arc<File>,
    control: FuseControl,
    uid: u32,
    gid: u32,
}

impl OneFileFs {
    fn attr(&self, ino: u64) -> std::result::Result<FileAttr, Errno> {
        let now = SystemTime::now();
        let (kind, perm, size, blocks, nlink) = match ino {
            1 => (FileType::Directory, 0o755, 0, 0, 2),
            FILE_INO => {
                let m = self.backing.metadata().map_err(|_| Errno::EIO)?;
                (FileType::RegularFile, 0o644, m.len(), m.blocks(), 1)
            }
            _ => return Err(Errno::ENOENT),
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Filesystem for OneFileFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if u64::from(parent) == 1 && name == FUSE_FILE_NAME {
            match self.attr(FILE_INO) {
                Ok(a) => reply.entry(&TTL, &a, Generation(0)),
                Err(e) => reply.error(e),
            }
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.into()) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) != FILE_INO {
            reply.error(Errno::EISDIR);
            return;
        }
        // Direct I/O: no page cache, so every read and write reaches the gate. Parallel
        // direct writes: without it the kernel holds the inode lock across each write, so
        // one hung write would stop every other write to the file.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (file, control) = (Arc::clone(&self.backing), self.control.clone());
        std::thread::spawn(move || {
            if let Err(e) = control.gate(Kind::Read, offset, u64::from(size)) {
                return reply.error(e);
            }
            let mut buf = vec![0u8; size as usize];
            let mut done = 0;
            while done < buf.len() {
                match file.read_at(&mut buf[done..], offset + done as u64) {
                    Ok(0) => break,
                    Ok(n) => done += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        control.note_failure();
                        return reply.error(errno_of(&e));
                    }
                }
            }
            reply.data(&buf[..done]);
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (file, control) = (Arc::clone(&self.backing), self.control.clone());
        let data = data.to_vec();
        std::thread::spawn(move || {
            if let Err(e) = control.gate(Kind::Write, offset, data.len() as u64) {
                return reply.error(e);
            }
            match file.write_all_at(&data, offset) {
                Ok(()) => reply.written(data.len() as u32),
                Err(e) => {
                    control.note_failure();
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let (file, control) = (Arc::clone(&self.backing), self.control.clone());
        std::thread::spawn(move || {
            if let Err(e) = control.gate(Kind::Fsync, 0, 0) {
                return reply.error(e);
            }
            match file.sync_data() {
                Ok(()) => reply.ok(),
                Err(e) => {
                    control.note_failure();
                    reply.error(errno_of(&e));
                }
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if u64::from(ino) == 1 {
            reply.opened(FileHandle(0), FopenFlags::empty());
        } else {
            reply.error(Errno::ENOTDIR);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if u64::from(ino) != 1 {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FUSE_FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// A mounted one-file FUSE file system; see the module documentation.
#[derive(Debug)]
pub struct FuseFile {
    control: FuseControl,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    file: PathBuf,
    backing: PathBuf,
    /// `st_dev` of the mounted file system: names its FUSE connection in fusectl.
    conn: u64,
    // Removed last, after the unmount.
    _dir: tempfile::TempDir,
}

impl FuseFile {
    /// Mounts a file system with one zeroed (sparse) file of `size_bytes`, in mode
    /// [`Mode::Ok`].
    pub fn new(size_bytes: u64) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmblk-fuse-")
            .tempdir()
            .context("creating FUSE directory")?;
        let backing = dir.path().join("backing.img");
        let mountpoint = dir.path().join("mnt");
        std::fs::create_dir(&mountpoint)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&backing)
            .with_context(|| format!("creating {}", backing.display()))?;
        f.set_len(size_bytes)?;
        let control = FuseControl::new();
        let fs = OneFileFs {
            backing: Arc::new(f),
            control: control.clone(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("vmblk-fusefile".into()),
            MountOption::Subtype("vmblk".into()),
            MountOption::RW,
            MountOption::NoExec,
            MountOption::NoSuid,
            MountOption::NoDev,
        ];
        // Loop devices and exports run as other processes (and kernel threads).
        config.acl = SessionACL::All;
        let session = fuser::spawn_mount(fs, &mountpoint, &config)
            .with_context(|| format!("mounting FUSE at {}", mountpoint.display()))?;
        let root_dev = std::fs::metadata(dir.path())?.dev();
        let mut me = Self {
            control,
            session: Some(session),
            file: mountpoint.join(FUSE_FILE_NAME),
            mountpoint,
            backing,
            conn: 0,
            _dir: dir,
        };
        // The mount is in place once the mount point is on another device.
        let dev =
            crate::util::wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                let d = std::fs::metadata(&me.mountpoint)?.dev();
                Ok((d != root_dev).then_some(d))
            })?;
        match dev {
            Some(d) => me.conn = d,
            None => bail!("FUSE mount at {} did not appear", me.mountpoint.display()),
        }
        let len = std::fs::metadata(&me.file)
            .with_context(|| format!("stat {}", me.file.display()))?
            .len();
        if len != size_bytes {
            bail!("{} has {len} bytes, wanted {size_bytes}", me.file.display());
        }
        tracing::info!(file = %me.file.display(), size_bytes, "fusefile mounted");
        Ok(me)
    }

    /// The file on the FUSE file system (give this to `losetup` or an export).
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The host file behind it (for checking what reached the "disk").
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The mount point.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// A handle to switch modes from anywhere.
    pub fn control(&self) -> FuseControl {
        self.control.clone()
    }

    /// Switches the mode (see [`FuseControl::set_mode`]).
    pub fn set_mode(&self, mode: Mode) {
        self.control.set_mode(mode);
    }

    /// The counters so far.
    pub fn stats(&self) -> FuseStats {
        self.control.stats()
    }

    /// Whether the mount point is still in the mount table.
    pub fn is_mounted(&self) -> bool {
        is_in_mount_table(&self.mountpoint)
    }

    /// Releases blocked requests, unmounts and joins the session thread, reporting
    /// problems (drop does the same and only logs them).
    pub fn unmount(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        self.control.close();
        let mut lazy = false;
        if let Err(e) = nix::mount::umount(&self.mountpoint) {
            // Busy: a loop device or an export still holds the file. Detach it from the
            // namespace now, and abort the connection so that nothing can wait on it.
            tracing::warn!(mnt = %self.mountpoint.display(), "fusefile: umount: {e}; lazy unmount + abort");
            nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
                .with_context(|| format!("lazy unmount of {}", self.mountpoint.display()))?;
            lazy = true;
            abort_connection(self.conn)?;
        }
        // The session thread ends when the kernel closes the connection.
        let finished =
            crate::util::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                Ok(session.guard.is_finished().then_some(()))
            })?;
        if finished.is_none() {
            // Still served (nothing should hold it after an abort); leave the thread.
            std::mem::forget(session);
            bail!(
                "FUSE session of {} did not end (lazy={lazy})",
                self.mountpoint.display()
            );
        }
        match session.join() {
            Ok(()) => {}
            Err(e) => tracing::warn!("fusefile: session ended with {e}"),
        }
        if is_in_mount_table(&self.mountpoint) {
            bail!("{} is still mounted", self.mountpoint.display());
        }
        Ok(())
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("fusefile teardown: {e:#}");
            eprintln!("fusefile teardown: {e:#}");
        }
    }
}

fn is_in_mount_table(mountpoint: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = mountpoint.display().to_string();
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Writes to `/sys/fs/fuse/connections/<conn>/abort` (mounting fusectl if needed): every
/// pending and future request of the connection fails with ENOTCONN.
fn abort_connection(conn: u64) -> Result<()> {
    let abort = Path::new(FUSECTL).join(conn.to_string()).join("abort");
    if !abort.exists() {
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    if !abort.exists() {
        // Already gone: the connection ended with the unmount.
        return Ok(());
    }
    std::fs::write(&abort, "1").with_context(|| format!("writing {}", abort.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    fn open_rw(p: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap()
    }

    #[test]
    fn modes_are_observed_through_a_plain_file() {
        let fuse = FuseFile::new(1 << 20).unwrap();
        let f = open_rw(fuse.path());
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);

        // Ok: writes reach the backing file, reads come back.
        f.write_all_at(b"vmblk-fuse", 4096).unwrap();
        let mut b = [0u8; 10];
        f.read_exact_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"vmblk-fuse");
        let host = std::fs::read(fuse.backing()).unwrap();
        assert_eq!(&host[4096..4106], b"vmblk-fuse");

        // Fail(errno): reads and writes fail at once with that errno; stat/open still work.
        for errno in [libc::EIO, libc::ENODEV] {
            fuse.set_mode(Mode::Fail(errno));
            let t = Instant::now();
            let e = f.read_at(&mut b, 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(errno), "{e}");
            let e = f.write_at(b"x", 0).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(errno), "{e}");
            assert!(t.elapsed() < Duration::from_secs(1));
            assert_eq!(std::fs::metadata(fuse.path()).unwrap().len(), 1 << 20);
            drop(open_rw(fuse.path()));
        }

        // Hang: a read blocks; metadata and open keep working; Ok releases it with data.
        fuse.set_mode(Mode::Hang);
        let path = fuse.path().to_owned();
        let reader = std::thread::spawn(move || {
            let f = File::open(path).unwrap();
            let mut b = [0u8; 10];
            f.read_exact_at(&mut b, 4096).map(|_| b)
        });
        assert_eq!(fuse.control().wait_blocked(1, Duration::from_secs(5)), 1);
        std::thread::sleep(Duration::from_millis(200));
        assert!(!reader.is_finished(), "read did not hang");
        let t = Instant::now();
        assert_eq!(std::fs::metadata(fuse.path()).unwrap().len(), 1 << 20);
        drop(open_rw(fuse.path()));
        assert!(std::fs::read_dir(fuse.mountpoint()).unwrap().count() == 1);
        assert!(t.elapsed() < Duration::from_secs(1), "getattr/open stalled");
        fuse.set_mode(Mode::Ok);
        let got = reader.join().unwrap().unwrap();
        assert_eq!(&got, b"vmblk-fuse");

        // Hang, then Fail: the blocked request follows the new mode.
        fuse.set_mode(Mode::Hang);
        let path = fuse.path().to_owned();
        let writer = std::thread::spawn(move || open_rw(&path).write_at(b"y", 0));
        assert_eq!(fuse.control().wait_blocked(1, Duration::from_secs(5)), 1);
        fuse.set_mode(Mode::Fail(libc::ENXIO));
        let e = writer.join().unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENXIO));

        // HangRange: a write into the range blocks, one outside it is served meanwhile.
        fuse.set_mode(Mode::HangRange {
            start: 0,
            end: 4096,
        });
        let path = fuse.path().to_owned();
        let held = std::thread::spawn(move || open_rw(&path).write_at(b"z", 100));
        assert_eq!(fuse.control().wait_blocked(1, Duration::from_secs(5)), 1);
        // Bounded: if this write were stuck behind the held one, the test process could
        // not even exit (its own thread waiting on its own file system).
        let path = fuse.path().to_owned();
        let outside = std::thread::spawn(move || open_rw(&path).write_all_at(b"outside", 8192));
        let t = Instant::now();
        while !outside.is_finished() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !outside.is_finished() {
            fuse.set_mode(Mode::Ok);
            panic!("a write outside the hung range waited for the hung one");
        }
        outside.join().unwrap().unwrap();
        assert!(!held.is_finished());
        fuse.set_mode(Mode::Ok);
        assert_eq!(held.join().unwrap().unwrap(), 1);

        let s = fuse.stats();
        assert!(s.reads >= 4 && s.writes >= 4 && s.failed >= 5, "{s:?}");
        assert_eq!(s.blocked, 0);
        assert_eq!(s.ever_blocked, 3);
        drop(f);
        let mnt = fuse.mountpoint().to_owned();
        fuse.unmount().unwrap();
        assert!(!is_in_mount_table(&mnt));
    }

    #[test]
    fn drop_releases_blocked_requests_and_unmounts_even_when_the_file_is_held() {
        let fuse = FuseFile::new(1 << 20).unwrap();
        let mnt = fuse.mountpoint().to_owned();
        // The file stays open (as a loop device would hold it) across the drop.
        let held = open_rw(fuse.path());
        fuse.set_mode(Mode::Hang);
        let path = fuse.path().to_owned();
        let reader = std::thread::spawn(move || {
            let mut b = [0u8; 512];
            File::open(path).unwrap().read_at(&mut b, 0)
        });
        assert_eq!(fuse.control().wait_blocked(1, Duration::from_secs(5)), 1);
        let t = Instant::now();
        drop(fuse);
        assert!(reader.join().unwrap().is_err());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(!is_in_mount_table(&mnt), "mount left behind");
        // The held file now fails instead of hanging.
        let mut b = [0u8; 512];
        assert!(held.read_at(&mut b, 0).is_err());
    }

    #[test]
    fn a_4096_sector_loop_device_over_the_file_fails_and_hangs_on_command() {
        let _lock = crate::loop_tests_lock().unwrap();
        let fuse = FuseFile::new(8 << 20).unwrap();
        let ctl = fuse.control();
        let dev = crate::LoopDevice::attach(fuse.path(), 4096).unwrap();
        let open_direct = || {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(dev.path())
                .unwrap()
        };
        // 4 KiB-aligned buffer for O_DIRECT.
        let mut buf = vec![0u8; 8192];
        let off = buf.as_ptr().align_offset(4096);
        let block = &mut buf[off..off + 4096];
        block.fill(0xa5);
        let d = open_direct();
        d.write_all_at(block, 8192).unwrap();
        block.fill(0);
        d.read_exact_at(block, 8192).unwrap();
        assert!(block.iter().all(|&b| b == 0xa5));
        let host = std::fs::read(fuse.backing()).unwrap();
        assert!(host[8192..12288].iter().all(|&b| b == 0xa5));

        // Fail: the loop device reports the error promptly; EIO stays EIO, ENODEV is
        // ENODEV where the block layer has BLK_STS_OFFLINE.
        for (errno, allowed) in [
            (libc::EIO, &[libc::EIO][..]),
            (libc::ENODEV, &[libc::ENODEV, libc::EIO][..]),
        ] {
            ctl.set_mode(Mode::Fail(errno));
            let t = Instant::now();
            let e = d.read_exact_at(block, 0).unwrap_err();
            assert!(allowed.contains(&e.raw_os_error().unwrap_or(0)), "{e}");
            eprintln!("loop read with the file failing {errno}: {e}");
            let e = d.write_all_at(block, 0).unwrap_err();
            assert!(allowed.contains(&e.raw_os_error().unwrap_or(0)), "{e}");
            assert!(t.elapsed() < Duration::from_secs(2));
        }

        // Hang: a direct read of the loop device blocks until released.
        ctl.set_mode(Mode::Hang);
        let p = dev.path().to_owned();
        let reader = std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(p)
                .unwrap();
            let mut buf = vec![0u8; 8192];
            let off = buf.as_ptr().align_offset(4096);
            f.read_exact_at(&mut buf[off..off + 4096], 8192)
                .map(|_| buf[off])
        });
        assert!(ctl.wait_blocked(1, Duration::from_secs(5)) >= 1);
        std::thread::sleep(Duration::from_millis(300));
        assert!(!reader.is_finished());
        ctl.set_mode(Mode::Ok);
        assert_eq!(reader.join().unwrap().unwrap(), 0xa5);
        drop(d);
        dev.detach().unwrap();
        fuse.unmount().unwrap();
    }
}
