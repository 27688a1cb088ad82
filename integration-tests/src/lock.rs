//! Advisory file locks (`flock`) that serialize work across test binaries.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// Lock file shared by every test in the workspace that creates loop devices or starts
/// guests. Loop devices are host-global, so those tests run one at a time.
pub const LOOP_TESTS_LOCK: &str = "/tmp/vmblk-loop-tests.lock";

/// An exclusive `flock` held until drop.
#[derive(Debug)]
pub struct FileLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl FileLock {
    /// Blocks until the exclusive lock on `path` (created if missing) is held.
    pub fn exclusive(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("flock {}", path.display()))?;
        Ok(Self {
            _lock: lock,
            path: path.to_owned(),
        })
    }

    /// The locked file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes [`LOOP_TESTS_LOCK`]; hold the guard for the whole test.
pub fn loop_tests_lock() -> Result<FileLock> {
    FileLock::exclusive(Path::new(LOOP_TESTS_LOCK))
}
