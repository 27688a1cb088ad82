//! [`LoopDevice`]: one attached loop device, detached on drop.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::sys;

const LOOP_CONTROL: &str = "/dev/loop-control";
const SYS_BLOCK: &str = "/sys/block";

/// How many loop numbers an attach tries before giving up when each one it was handed by
/// `LOOP_CTL_GET_FREE` is bound by a concurrent caller first.
const MAX_ATTACH_ATTEMPTS: u32 = 64;
/// How long a detach waits for the kernel to unbind the device (and retries `EBUSY`).
const DETACH_TIMEOUT: Duration = Duration::from_secs(2);

/// How to attach a loop device. `Default` is 512-byte sectors, read-write, buffered I/O,
/// the whole backing, autoclear on, label = backing path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachOptions {
    /// Logical sector size of the loop device: a power of two from 512 to 65536 (the kernel
    /// may refuse sizes above the page size).
    pub logical_block_size: u32,
    /// Open the backing read-only and make the loop device refuse writes.
    pub read_only: bool,
    /// Ask the kernel for direct I/O on the backing. `LOOP_CONFIGURE` silently leaves it off
    /// when it cannot be used (sector size smaller than the backing's, unaligned offset), so
    /// attach then fails with [`Error::Verify`] rather than hand back a buffered device.
    pub direct_io: bool,
    /// Byte offset into the backing where the loop device starts.
    pub offset: u64,
    /// Maximum size in bytes of the loop device; 0 means up to the end of the backing.
    pub size_limit: u64,
    /// Let the kernel detach the device when its last opener closes it. Because
    /// [`LoopDevice`] keeps the device open until it is dropped, this only matters when the
    /// process dies without unwinding (`SIGKILL`, abort): the device is then removed instead
    /// of left behind.
    pub autoclear: bool,
    /// Text stored in `lo_file_name` (at most 63 bytes are kept, no NUL). `None` stores the
    /// backing path, as `losetup` does.
    pub label: Option<String>,
}

impl Default for AttachOptions {
    fn default() -> Self {
        AttachOptions {
            logical_block_size: 512,
            read_only: false,
            direct_io: false,
            offset: 0,
            size_limit: 0,
            autoclear: true,
            label: None,
        }
    }
}

/// Which ioctl sequence binds the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Setup {
    /// `LOOP_CONFIGURE`, falling back to [`Setup::Legacy`] when the kernel lacks it.
    Configure,
    /// `LOOP_SET_FD`, `LOOP_SET_STATUS64`, `LOOP_SET_BLOCK_SIZE`, `LOOP_SET_DIRECT_IO`.
    Legacy,
}

/// What identifies the current binding of a loop device, so that a detach can tell "still
/// ours" from "unbound" and from "unbound and already reused by someone else".
#[derive(Clone, Debug)]
struct Binding {
    diskseq: Option<u64>,
    backing_file: Option<PathBuf>,
}

/// An attached loop device. Dropping it detaches it; [`LoopDevice::detach`] does the same and
/// reports errors.
///
/// The device node stays open for the lifetime of this value, so the binding cannot be torn
/// down and reused by someone else underneath it.
#[derive(Debug)]
pub struct LoopDevice {
    file: Option<File>,
    number: u32,
    path: PathBuf,
    backing: PathBuf,
    logical_block_size: u32,
    size: u64,
    binding: Binding,
}

impl LoopDevice {
    /// Attaches a free loop device over `backing` (a regular file or a block device).
    ///
    /// On success the device has exactly `opts.logical_block_size` (checked with
    /// `BLKSSZGET`), and the read-only and direct-I/O state that was asked for. On any error
    /// nothing stays attached.
    pub fn attach(backing: &Path, opts: &AttachOptions) -> Result<LoopDevice, Error> {
        attach_with(backing, opts, Setup::Configure)
    }

    /// Like [`LoopDevice::attach`] but with the setup used on kernels without
    /// `LOOP_CONFIGURE` (before 5.8), so that path can be tested on any kernel.
    #[cfg(feature = "test-utils")]
    #[doc(hidden)]
    pub fn attach_legacy(backing: &Path, opts: &AttachOptions) -> Result<LoopDevice, Error> {
        attach_with(backing, opts, Setup::Legacy)
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `N` in `/dev/loopN`.
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The backing path as given to [`LoopDevice::attach`].
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Logical sector size, as verified with `BLKSSZGET`.
    pub fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    /// Size of the loop device in bytes (`BLKGETSIZE64` right after attach).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Detaches the device, waiting (up to about 2 s) until the kernel has unbound it.
    ///
    /// If another process holds the device open the kernel only marks it for removal on last
    /// close; after the wait this returns [`Error::Detach`] with `EBUSY`
    /// ([`Error::is_busy`]), and the device goes away once that process closes it.
    pub fn detach(mut self) -> Result<(), Error> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), Error> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let result = detach_file(file, self.number, &self.binding);
        match &result {
            Ok(()) => tracing::info!(
                device = %self.path.display(),
                backing = %self.backing.display(),
                "loop device detached"
            ),
            Err(e) => tracing::warn!(
                device = %self.path.display(),
                backing = %self.backing.display(),
                error = %e,
                "loop device detach failed"
            ),
        }
        result
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        // Errors are logged by detach_inner; Drop cannot report them.
        let _ = self.detach_inner();
    }
}

/// `BLKSSZGET`: the logical sector size of an open block device.
pub fn logical_block_size(dev: &File) -> io::Result<u32> {
    blockdev::logical_block_size(dev)
}

pub(crate) fn device_path(number: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{number}"))
}

fn sysfs_dir(number: u32) -> PathBuf {
    PathBuf::from(format!("{SYS_BLOCK}/loop{number}"))
}

fn validate(backing: &Path, opts: &AttachOptions) -> Result<(), Error> {
    let invalid = |reason: String| Error::InvalidOptions {
        backing: backing.to_path_buf(),
        reason,
    };
    let bs = opts.logical_block_size;
    if !bs.is_power_of_two() || !(512..=65536).contains(&bs) {
        return Err(invalid(format!(
            "logical block size {bs} is not a power of two from 512 to 65536"
        )));
    }
    if opts.size_limit % u64::from(bs) != 0 {
        return Err(invalid(format!(
            "size limit {} is not a multiple of the {bs}-byte sector size",
            opts.size_limit
        )));
    }
    if let Some(label) = &opts.label {
        if label.contains('\0') {
            return Err(invalid("label contains a NUL byte".into()));
        }
    }
    Ok(())
}

/// Copies `text` into a `lo_file_name` buffer, truncated to 63 bytes at a character boundary.
pub(crate) fn encode_name(text: &str) -> [u8; sys::LO_NAME_SIZE] {
    let mut buf = [0u8; sys::LO_NAME_SIZE];
    let t = truncate_utf8(text, sys::LO_NAME_SIZE - 1);
    buf[..t.len()].copy_from_slice(t.as_bytes());
    buf
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn attach_with(backing: &Path, opts: &AttachOptions, setup: Setup) -> Result<LoopDevice, Error> {
    validate(backing, opts)?;
    let mode = if opts.read_only {
        "read-only"
    } else {
        "read-write"
    };
    let backing_file = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .custom_flags(libc::O_CLOEXEC)
        .open(backing)
        .map_err(|source| Error::OpenBacking {
            backing: backing.to_path_buf(),
            mode,
            source,
        })?;
    let meta = backing_file
        .metadata()
        .map_err(|source| Error::OpenBacking {
            backing: backing.to_path_buf(),
            mode,
            source,
        })?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(Error::InvalidOptions {
            backing: backing.to_path_buf(),
            reason: "backing is neither a regular file nor a block device".into(),
        });
    }
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(LOOP_CONTROL)
        .map_err(|source| Error::OpenControl {
            path: LOOP_CONTROL.into(),
            source,
        })?;

    let mut info = sys::LoopInfo64::zeroed();
    info.lo_offset = opts.offset;
    info.lo_sizelimit = opts.size_limit;
    info.lo_file_name = match &opts.label {
        Some(label) => encode_name(label),
        None => encode_name(&backing.to_string_lossy()),
    };
    if opts.autoclear {
        info.lo_flags |= sys::LO_FLAGS_AUTOCLEAR;
    }

    let mut setup = setup;
    let mut last_busy = None;
    for attempt in 1..=MAX_ATTACH_ATTEMPTS {
        let number =
            sys::ctl_get_free(control.as_fd()).map_err(|source| Error::GetFree { source })?;
        let path = device_path(number);
        let dev = match OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(f) => f,
            // The number was handed out, then the device was removed (LOOP_CTL_REMOVE) by
            // someone else before we opened it: take another one.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => {
                last_busy = Some(e);
                backoff(attempt);
                continue;
            }
            Err(source) => {
                return Err(Error::OpenDevice {
                    device: path,
                    source,
                })
            }
        };
        match bind(&dev, &backing_file, &path, backing, opts, &info, &mut setup) {
            Ok(()) => {}
            Err(BindError::Busy(e)) => {
                tracing::debug!(device = %path.display(), attempt, "loop device taken concurrently, retrying");
                last_busy = Some(e);
                backoff(attempt);
                continue;
            }
            Err(BindError::Failed(e)) => return Err(e),
        }
        // From here on the device is bound: the guard detaches it on every error path.
        let mut guard = LoopDevice {
            file: Some(dev),
            number,
            path,
            backing: backing.to_path_buf(),
            logical_block_size: 0,
            size: 0,
            binding: Binding {
                diskseq: None,
                backing_file: None,
            },
        };
        if setup == Setup::Legacy {
            if let Err(e) = finish_legacy(&guard, opts, &info) {
                return Err(rollback(guard, e));
            }
        }
        if let Err(e) = verify(&mut guard, opts) {
            return Err(rollback(guard, e));
        }
        tracing::info!(
            device = %guard.path.display(),
            backing = %backing.display(),
            sector_size = guard.logical_block_size,
            size = guard.size,
            read_only = opts.read_only,
            direct_io = opts.direct_io,
            setup = ?setup,
            "loop device attached"
        );
        return Ok(guard);
    }
    Err(Error::Exhausted {
        backing: backing.to_path_buf(),
        attempts: MAX_ATTACH_ATTEMPTS,
        source: last_busy.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
    })
}

/// Detaches a partly set up device, keeping the error that caused the rollback.
fn rollback(mut guard: LoopDevice, cause: Error) -> Error {
    tracing::debug!(device = %guard.path.display(), error = %cause, "attach failed, detaching");
    // A detach failure is logged by detach_inner; the first error is the one reported.
    let _ = guard.detach_inner();
    cause
}

enum BindError {
    /// The number was bound by someone else first: try another.
    Busy(io::Error),
    Failed(Error),
}

/// The first, atomic step: after it succeeds the device is bound to the backing.
fn bind(
    dev: &File,
    backing_file: &File,
    path: &Path,
    backing: &Path,
    opts: &AttachOptions,
    info: &sys::LoopInfo64,
    setup: &mut Setup,
) -> Result<(), BindError> {
    if *setup == Setup::Configure {
        let mut cfg_info = *info;
        if opts.read_only {
            cfg_info.lo_flags |= sys::LO_FLAGS_READ_ONLY;
        }
        if opts.direct_io {
            cfg_info.lo_flags |= sys::LO_FLAGS_DIRECT_IO;
        }
        let cfg = sys::LoopConfig::new(backing_file.as_fd(), opts.logical_block_size, cfg_info);
        match sys::configure(dev.as_fd(), &cfg) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(BindError::Busy(e)),
            // Kernels before 5.8 do not know LOOP_CONFIGURE. A new kernel also answers EINVAL
            // to bad settings; the legacy steps then report which one it refuses.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {
                tracing::debug!(device = %path.display(), error = %e, "LOOP_CONFIGURE refused, using LOOP_SET_FD");
                *setup = Setup::Legacy;
            }
            Err(source) => {
                return Err(BindError::Failed(Error::Configure {
                    device: path.to_path_buf(),
                    backing: backing.to_path_buf(),
                    block_size: opts.logical_block_size,
                    source,
                }))
            }
        }
    }
    match sys::set_fd(dev.as_fd(), backing_file.as_fd()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(BindError::Busy(e)),
        Err(source) => Err(BindError::Failed(Error::SetFd {
            device: path.to_path_buf(),
            backing: backing.to_path_buf(),
            source,
        })),
    }
}

/// The legacy steps after `LOOP_SET_FD`. Read-only comes from the open modes of the backing
/// and the device, which `LOOP_SET_FD` inherits.
fn finish_legacy(
    dev: &LoopDevice,
    opts: &AttachOptions,
    info: &sys::LoopInfo64,
) -> Result<(), Error> {
    let Some(file) = &dev.file else {
        return Ok(());
    };
    sys::set_status64(file.as_fd(), info).map_err(|source| Error::SetStatus {
        device: dev.path.clone(),
        source,
    })?;
    sys::set_block_size(file.as_fd(), opts.logical_block_size).map_err(|source| {
        Error::SetBlockSize {
            device: dev.path.clone(),
            block_size: opts.logical_block_size,
            source,
        }
    })?;
    if opts.direct_io {
        sys::set_direct_io(file.as_fd(), true).map_err(|source| Error::SetDirectIo {
            device: dev.path.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Reads back what the kernel did and compares it with what was asked.
fn verify(dev: &mut LoopDevice, opts: &AttachOptions) -> Result<(), Error> {
    let Some(file) = &dev.file else {
        return Ok(());
    };
    let query = |what: &'static str, source: io::Error| Error::Query {
        device: dev.path.clone(),
        what,
        source,
    };
    let mismatch = |reason: String| Error::Verify {
        device: dev.path.clone(),
        backing: dev.backing.clone(),
        reason,
    };
    let lbs = blockdev::logical_block_size(file).map_err(|e| query("BLKSSZGET", e))?;
    if lbs != opts.logical_block_size {
        return Err(mismatch(format!(
            "BLKSSZGET reports {lbs}-byte sectors, {} requested",
            opts.logical_block_size
        )));
    }
    let info = sys::get_status64(file.as_fd()).map_err(|e| query("LOOP_GET_STATUS64", e))?;
    let ro = info.lo_flags & sys::LO_FLAGS_READ_ONLY != 0;
    if ro != opts.read_only {
        return Err(mismatch(format!(
            "read-only is {ro}, {} requested",
            opts.read_only
        )));
    }
    if opts.direct_io && info.lo_flags & sys::LO_FLAGS_DIRECT_IO == 0 {
        return Err(mismatch(
            "the kernel did not enable direct I/O (sector size or offset not aligned to the backing?)".into(),
        ));
    }
    if info.lo_offset != opts.offset {
        return Err(mismatch(format!(
            "offset is {}, {} requested",
            info.lo_offset, opts.offset
        )));
    }
    dev.size = blockdev::size(file).map_err(|e| query("BLKGETSIZE64", e))?;
    dev.logical_block_size = lbs;
    dev.binding = read_binding(dev.number);
    Ok(())
}

fn read_binding(number: u32) -> Binding {
    let dir = sysfs_dir(number);
    Binding {
        diskseq: std::fs::read_to_string(dir.join("diskseq"))
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        backing_file: read_backing_file(number),
    }
}

pub(crate) fn read_backing_file(number: u32) -> Option<PathBuf> {
    let s = std::fs::read_to_string(sysfs_dir(number).join("loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n')))
}

/// True while loop device `number` is still bound with the binding we recorded.
fn still_bound(number: u32, ours: &Binding) -> bool {
    if !sysfs_dir(number).join("loop").exists() {
        return false;
    }
    let now = read_binding(number);
    match (ours.diskseq, now.diskseq) {
        // The kernel bumps diskseq on every attach and detach: a different value means our
        // binding is gone (and the number may already be someone else's).
        (Some(a), Some(b)) => a == b,
        _ => now.backing_file == ours.backing_file,
    }
}

fn backoff(attempt: u32) {
    // Spread concurrent callers (threads of one process too) apart a little; the exact
    // value does not matter.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = u64::from(nanos ^ attempt) % 5;
    thread::sleep(Duration::from_millis(u64::from(attempt.min(10)) + jitter));
}

/// `LOOP_CLR_FD` on an open device we own (retrying `EBUSY`), close it, and wait until the
/// kernel has unbound it.
fn detach_file(file: File, number: u32, binding: &Binding) -> Result<(), Error> {
    let device = device_path(number);
    let start = Instant::now();
    let mut delay = Duration::from_millis(5);
    loop {
        match sys::clr_fd(file.as_fd()) {
            Ok(()) => break,
            // Already unbound (autoclear raced us): nothing left to do.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < DETACH_TIMEOUT => {
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(200));
            }
            Err(source) => return Err(Error::Detach { device, source }),
        }
    }
    // Our descriptor is an opener too: the kernel tears the binding down on last close.
    drop(file);
    let mut delay = Duration::from_millis(1);
    while still_bound(number, binding) {
        if start.elapsed() >= DETACH_TIMEOUT {
            return Err(Error::Detach {
                device,
                source: io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
    Ok(())
}

/// Identity of a backing volume: the device number of a block device, or the (device,
/// inode) pair of a regular file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BackingId {
    /// A block device, by (major, minor).
    Block {
        /// Major device number.
        major: u32,
        /// Minor device number.
        minor: u32,
    },
    /// A regular file, by the (major, minor) of its filesystem and its inode number.
    File {
        /// Major number of the filesystem's device.
        major: u32,
        /// Minor number of the filesystem's device.
        minor: u32,
        /// Inode number.
        inode: u64,
    },
}

impl BackingId {
    /// Identity of an open file or block device.
    pub fn of_metadata(meta: &std::fs::Metadata) -> BackingId {
        if meta.file_type().is_block_device() {
            let (major, minor) = sys::split_dev(meta.rdev());
            BackingId::Block { major, minor }
        } else {
            let (major, minor) = sys::split_dev(meta.dev());
            BackingId::File {
                major,
                minor,
                inode: meta.ino(),
            }
        }
    }

    /// Identity of the path `path` (following symlinks).
    pub fn of_path(path: &Path) -> io::Result<BackingId> {
        Ok(BackingId::of_metadata(&std::fs::metadata(path)?))
    }

    fn of_status(info: &sys::LoopInfo64) -> BackingId {
        if info.lo_rdevice != 0 {
            let (major, minor) = sys::split_kernel_dev(info.lo_rdevice);
            BackingId::Block { major, minor }
        } else {
            let (major, minor) = sys::split_kernel_dev(info.lo_device);
            BackingId::File {
                major,
                minor,
                inode: info.lo_inode,
            }
        }
    }
}

/// The state of one bound loop device, as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopStatus {
    /// `N` in `/dev/loopN`.
    pub number: u32,
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// What it is bound to.
    pub backing: BackingId,
    /// The backing path from `/sys/block/loopN/loop/backing_file` (the kernel's own view,
    /// whatever `lo_file_name` says), if readable.
    pub backing_file: Option<PathBuf>,
    /// `lo_file_name`: free text set by whoever attached the device.
    pub label: String,
    /// Byte offset into the backing.
    pub offset: u64,
    /// Size limit in bytes, 0 for none.
    pub size_limit: u64,
    /// Logical sector size (`BLKSSZGET`).
    pub logical_block_size: u32,
    /// The device refuses writes.
    pub read_only: bool,
    /// The kernel detaches it on last close.
    pub autoclear: bool,
    /// Direct I/O to the backing is on.
    pub direct_io: bool,
}

/// Every loop device that is bound right now, in number order.
///
/// Each one is briefly opened read-only to read its status. Devices that are unbound
/// between the scan and the open are skipped.
pub fn bound_loop_devices() -> Result<Vec<LoopStatus>, Error> {
    let entries = std::fs::read_dir(SYS_BLOCK).map_err(|source| Error::List {
        path: SYS_BLOCK.into(),
        source,
    })?;
    let mut numbers: Vec<u32> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("loop"))
                .and_then(|n| n.parse().ok())
        })
        .filter(|&n| sysfs_dir(n).join("loop").exists())
        .collect();
    numbers.sort_unstable();
    let mut out = Vec::with_capacity(numbers.len());
    for number in numbers {
        if let Some(status) = loop_status(number)? {
            out.push(status);
        }
    }
    Ok(out)
}

/// Opens `/dev/loopN` read-only for inspection; `None` if it does not exist or is going away.
pub(crate) fn open_for_status(number: u32) -> Result<Option<File>, Error> {
    let path = device_path(number);
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENXIO)) => Ok(None),
        Err(source) => Err(Error::OpenDevice {
            device: path,
            source,
        }),
    }
}

/// Status of an open loop device; `None` if it is not bound.
pub(crate) fn status_of(file: &File, number: u32) -> Result<Option<LoopStatus>, Error> {
    let path = device_path(number);
    let info = match sys::get_status64(file.as_fd()) {
        Ok(info) => info,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(source) => {
            return Err(Error::Query {
                device: path,
                what: "LOOP_GET_STATUS64",
                source,
            })
        }
    };
    let logical_block_size = blockdev::logical_block_size(file).map_err(|source| Error::Query {
        device: path.clone(),
        what: "BLKSSZGET",
        source,
    })?;
    Ok(Some(LoopStatus {
        number,
        backing: BackingId::of_status(&info),
        backing_file: read_backing_file(number),
        label: String::from_utf8_lossy(sys::nul_terminated(&info.lo_file_name)).into_owned(),
        offset: info.lo_offset,
        size_limit: info.lo_sizelimit,
        logical_block_size,
        read_only: info.lo_flags & sys::LO_FLAGS_READ_ONLY != 0,
        autoclear: info.lo_flags & sys::LO_FLAGS_AUTOCLEAR != 0,
        direct_io: info.lo_flags & sys::LO_FLAGS_DIRECT_IO != 0,
        path,
    }))
}

fn loop_status(number: u32) -> Result<Option<LoopStatus>, Error> {
    match open_for_status(number)? {
        Some(file) => status_of(&file, number),
        None => Ok(None),
    }
}

/// Detaches a loop device we do not hold, after `check` approved its current status (read
/// through the same open descriptor, so it cannot change underneath). Returns `Ok(false)` if
/// the device was unbound already or `check` refused.
pub(crate) fn detach_if(
    number: u32,
    check: impl FnOnce(&LoopStatus) -> bool,
) -> Result<bool, Error> {
    let Some(file) = open_for_status(number)? else {
        return Ok(false);
    };
    let Some(status) = status_of(&file, number)? else {
        return Ok(false);
    };
    if !check(&status) {
        return Ok(false);
    }
    let binding = read_binding(number);
    detach_file(file, number, &binding)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_options_are_512_read_write_autoclear() {
        let o = AttachOptions::default();
        assert_eq!(o.logical_block_size, 512);
        assert!(!o.read_only && !o.direct_io && o.autoclear);
        assert_eq!((o.offset, o.size_limit), (0, 0));
    }

    #[test]
    fn validate_rejects_sizes_that_are_not_powers_of_two() {
        let p = Path::new("/x");
        for bs in [0, 256, 1000, 3000, 131072] {
            let o = AttachOptions {
                logical_block_size: bs,
                ..Default::default()
            };
            assert!(
                matches!(validate(p, &o), Err(Error::InvalidOptions { .. })),
                "{bs}"
            );
        }
        for bs in [512, 1024, 2048, 4096] {
            let o = AttachOptions {
                logical_block_size: bs,
                ..Default::default()
            };
            assert!(validate(p, &o).is_ok(), "{bs}");
        }
    }

    #[test]
    fn validate_rejects_unaligned_limit_and_nul_label() {
        let p = Path::new("/x");
        let bad = [
            AttachOptions {
                logical_block_size: 4096,
                size_limit: 512,
                ..Default::default()
            },
            AttachOptions {
                label: Some("a\0b".into()),
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(validate(p, &o).is_err(), "{o:?}");
        }
    }

    #[test]
    fn names_are_truncated_to_63_bytes_on_a_char_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let buf = encode_name(&long);
        let s = std::str::from_utf8(sys::nul_terminated(&buf)).unwrap();
        assert_eq!(s.len(), 62);
        assert_eq!(buf[63], 0);
        assert_eq!(encode_name("abc")[..4], *b"abc\0");
    }
}
