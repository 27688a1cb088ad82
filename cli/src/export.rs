//! `vmblk export`: serve a volume over vhost-user-blk.

use std::path::PathBuf;

use clap::Args;

/// `vmblk export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume: a block device or a regular file.
    pub volume: PathBuf,
    /// The unix socket QEMU connects to.
    #[arg(long)]
    pub socket: PathBuf,
}

/// Runs the export until interrupted.
pub fn run(_a: ExportArgs) -> i32 {
    eprintln!("vmblk export: not available yet");
    1
}
