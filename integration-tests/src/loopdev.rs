//! RAII loop devices made with `losetup`, detached by handle on drop.
//!
//! Stand-in until the `loop-bridge` crate lands: only devices created here are ever
//! detached, never with `losetup -D`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::run;

/// A loop device this process attached.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    backing: PathBuf,
    sector_size: u32,
    attached: bool,
}

impl LoopDevice {
    /// `losetup -f --show --sector-size N BACKING`, then checks the logical block size.
    /// `backing` may be a regular file or another block device (a stacked bridge).
    pub fn attach(backing: &Path, sector_size: u32) -> Result<Self> {
        let out = run(Command::new("losetup")
            .args(["-f", "--show", "--sector-size"])
            .arg(sector_size.to_string())
            .arg(backing))
        .with_context(|| {
            format!(
                "attaching {} with {sector_size}-byte sectors",
                backing.display()
            )
        })?;
        let dev = Self {
            path: PathBuf::from(out.trim()),
            backing: backing.to_owned(),
            sector_size,
            attached: true,
        };
        let got = dev.logical_block_size()?;
        if got != sector_size {
            bail!(
                "{} has {got}-byte logical blocks, wanted {sector_size}",
                dev.path.display()
            );
        }
        tracing::info!(dev = %dev.path.display(), backing = %backing.display(), sector_size, "loop attached");
        Ok(dev)
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What it was attached over.
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// The sector size asked for at attach.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// `blockdev --getss`: the logical block size the kernel reports.
    pub fn logical_block_size(&self) -> Result<u32> {
        let out = run(Command::new("blockdev").arg("--getss").arg(&self.path))?;
        out.trim()
            .parse()
            .with_context(|| format!("parsing blockdev --getss output {out:?}"))
    }

    /// `blockdev --getsize64`.
    pub fn size_bytes(&self) -> Result<u64> {
        let out = run(Command::new("blockdev").arg("--getsize64").arg(&self.path))?;
        out.trim()
            .parse()
            .with_context(|| format!("parsing blockdev --getsize64 output {out:?}"))
    }

    /// Detaches now, reporting failure.
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        self.attached = false;
        run(Command::new("losetup").arg("-d").arg(&self.path))
            .with_context(|| format!("detaching {}", self.path.display()))?;
        tracing::info!(dev = %self.path.display(), "loop detached");
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.detach_inner() {
            tracing::warn!("teardown: {e:#}");
        }
    }
}
