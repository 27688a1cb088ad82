//! `vmblk hook image-import`: hands an Incus image to vmblkd to unpack once into a
//! cached image volume; later volumes created from the fingerprint clone it.
// Calls return tonic::Status, the gRPC error type, by value as tonic does.
#![allow(clippy::result_large_err)]

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::volume::{print_json, with_client, Conn};

/// `vmblk hook`.
#[derive(Debug, Args)]
pub struct HookArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: Conn,
    /// Which hook.
    #[command(subcommand)]
    pub cmd: HookCommand,
}

/// Hooks.
#[derive(Debug, Subcommand)]
pub enum HookCommand {
    /// Cache an Incus image in vmblkd (no-op when already cached).
    ImageImport {
        /// The image: a unified tarball, or the rootfs file of a split image.
        image: PathBuf,
        /// The image's fingerprint (lower-case hex).
        #[arg(long)]
        fingerprint: String,
        /// The metadata tarball of a split image.
        #[arg(long)]
        metadata: Option<PathBuf>,
        /// Pool to cache it in (default: the default dir pool).
        #[arg(long, default_value = "")]
        pool: String,
    },
}

/// Runs `vmblk hook ...`.
pub fn run(a: HookArgs) -> i32 {
    match a.cmd {
        HookCommand::ImageImport {
            image,
            fingerprint,
            metadata,
            pool,
        } => {
            let what = vmblkd::hook::ImageImport {
                fingerprint,
                image,
                metadata,
                pool,
            };
            with_client(
                &a.conn,
                |b, mut c| b.block_on(vmblkd::hook::image_import(&mut c, &what)),
                |r, j| {
                    let img = r.image.clone().unwrap_or_default();
                    if j {
                        print_json(&json!({
                            "fingerprint": img.fingerprint,
                            "pool": img.pool,
                            "path": img.path,
                            "size_bytes": img.size_bytes,
                            "unpacked": r.unpacked,
                        }));
                    } else if r.unpacked {
                        println!(
                            "image {} cached in pool {} ({})",
                            img.fingerprint, img.pool, img.path
                        );
                    } else {
                        println!("image {} was already cached", img.fingerprint);
                    }
                },
            )
        }
    }
}
