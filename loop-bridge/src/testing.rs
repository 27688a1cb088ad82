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
