//! Helpers for tests that attach real loop devices (feature `test-utils`).
//!
//! Loop devices are global to the host, so every such test, in every test binary of the
//! workspace, holds [`PrivilegedTestLock`] while it runs.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;

/// File locked (with `flock`) by every privileged test in the workspace.
pub const LOCK_PATH: &str = "/tmp/vmblk-loop-tests.lock";

/// Held for the duration of one privileged test.
#[derive(Debug)]
pub struct PrivilegedTestLock {
    _file: File,
}

/// Fails the calling test unless it runs as root, then waits for the workspace-wide lock.
///
/// # Panics
/// If not running as root (tests must not skip silently) or the lock file cannot be used.
pub fn privileged_test_lock() -> PrivilegedTestLock {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test attaches real loop devices and must run as root (CI does)"
    );
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(LOCK_PATH)
        .unwrap_or_else(|e| panic!("cannot open {LOCK_PATH}: {e}"));
    crate::sys::lock_exclusive(file.as_fd())
        .unwrap_or_else(|e| panic!("cannot lock {LOCK_PATH}: {e}"));
    PrivilegedTestLock { _file: file }
}

/// A loop device over a temporary file, for a test: detached (by its handle) and the file
/// removed when dropped, the workspace-wide lock held meanwhile.
#[derive(Debug)]
pub struct TempLoop {
    device: crate::LoopDevice,
    _backing: tempfile::NamedTempFile,
    _lock: PrivilegedTestLock,
}

impl TempLoop {
    /// Attaches a loop device with `logical_block_size`-byte sectors over a new sparse file
    /// of `size` bytes.
    ///
    /// # Panics
    /// As [`privileged_test_lock`], or if the file or the device cannot be set up.
    pub fn new(size: u64, logical_block_size: u32) -> TempLoop {
        let lock = privileged_test_lock();
        let backing = tempfile::NamedTempFile::new().expect("create a temporary file");
        backing
            .as_file()
            .set_len(size)
            .expect("size the temporary file");
        let opts = crate::AttachOptions {
            logical_block_size,
            ..Default::default()
        };
        let device = crate::LoopDevice::attach(backing.path(), &opts).unwrap_or_else(|e| {
            panic!("attach a {logical_block_size}-byte-sector loop device: {e}")
        });
        TempLoop {
            device,
            _backing: backing,
            _lock: lock,
        }
    }

    /// The loop device node (`/dev/loopN`).
    pub fn path(&self) -> &std::path::Path {
        self.device.path()
    }
}
