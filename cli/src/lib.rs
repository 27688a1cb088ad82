//! The `vmblk` command line: unpack, inspect, repair and export VM block volumes.
//!
//! Every subcommand prints a human summary, or with `--json` one JSON document
//! on standard output (errors too: `{"error": ..., "exit_code": ...}`).
//!
//! Exit codes:
//!
//! | code | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | failure (I/O error, bridge, unexpected) |
//! | 2 | usage error |
//! | 3 | the image is corrupt, unsupported or unrecognised |
//! | 4 | the target is missing, busy, not a volume or too small (nothing written) |
//! | 5 | the partition table is not understood: nothing written to it (`--force` overrides) |
//! | 6 | verification after repair found problems |

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use image_unpack::{CopyOptions, Progress, RepairCommandOptions, UnpackError, UnpackOptions};

mod export;
mod hook;
mod human;
mod incus;
mod volume;

/// Unpack, repair and export VM block volumes on hosts of any sector size.
#[derive(Debug, Parser)]
#[command(name = "vmblk", version, about)]
pub struct Cli {
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write an image (qcow2, raw, Incus tarball) onto a volume, then repair and
    /// verify its partition table for the volume's sector size.
    Unpack(UnpackArgs),
    /// Show an image's or a volume's format, sizes and partition table.
    Inspect(InspectArgs),
    /// Repair a volume's partition table in place (also after the volume grew).
    Repair(RepairArgs),
    /// Write a volume (or a snapshot) as a compressed qcow2 image that Incus and
    /// qemu-img read: zero clusters left out, clusters compressed in parallel.
    Pack(PackArgs),
    /// Serve a volume to QEMU over vhost-user-blk until interrupted.
    Export(export::ExportArgs),
    /// Manage volumes served by vmblkd.
    Volume(volume::VolumeArgs),
    /// Manage vmblkd's pools.
    Pool(volume::PoolArgs),
    /// Hooks called by Incus (image-import).
    Hook(hook::HookArgs),
    /// vmblkd's volumes in Incus and LXD virtual machines (attach, detach, launch).
    Incus(incus::IncusArgs),
}

/// `vmblk unpack`.
#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The image: qcow2, raw, an Incus unified tarball, or a split image's rootfs.
    pub image: PathBuf,
    /// The volume: a block device or regular file at least the image's size, or an RBD
    /// image (`rbd:POOL[/NAMESPACE]/IMAGE[:conf=PATH][:id=USER][:keyring=PATH]`).
    pub target: PathBuf,
    /// Create the RBD image with this size (e.g. 10G) if it does not exist.
    #[arg(long, value_parser = volume::parse_size)]
    pub size: Option<u64>,
    /// The metadata tarball of a split Incus image.
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// Where a compressed tarball's disk is extracted to.
    #[arg(long)]
    pub scratch_dir: Option<PathBuf>,
    /// Go on even when the image's partition table is not understood.
    #[arg(long)]
    pub force: bool,
    /// Extend the last partition to the end of the volume.
    #[arg(long)]
    pub grow_last_partition: bool,
    /// Also zero the volume beyond the image's end.
    #[arg(long)]
    pub zero_tail: bool,
    /// Worker threads for decompression and writes (0: twice the CPUs, at least 4).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmblk pack`.
#[derive(Debug, Args)]
pub struct PackArgs {
    /// The volume: a file, a block device, or an RBD image or snapshot
    /// (`rbd:POOL/IMAGE[@SNAP]...`).
    pub volume: PathBuf,
    /// The qcow2 image to write (must not exist).
    pub image: PathBuf,
    /// Cluster compression: zlib (any qemu-img) or zstd (QEMU 5.1 and later).
    #[arg(long, default_value = "zlib", value_parser = ["zlib", "zstd"])]
    pub compress: String,
    /// Compressing threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmblk inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// An image file, a block device, or an RBD image (`rbd:POOL/IMAGE[@SNAP]...`).
    pub path: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmblk repair`.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// The volume: a block device, a file, or an RBD image (`rbd:POOL/IMAGE...`).
    pub target: PathBuf,
    /// Say what would be done, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Repair even when the table is not fully understood.
    #[arg(long)]
    pub force: bool,
    /// Extend the last partition to the end of the volume.
    #[arg(long)]
    pub grow_last_partition: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Sets up logging as the arguments ask.
pub fn init_tracing(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Unpack(a) => unpack(a),
        Command::Inspect(a) => inspect(a),
        Command::Repair(a) => repair(a),
        Command::Pack(a) => pack(a),
        Command::Export(a) => export::run(a),
        Command::Volume(a) => volume::run_volume(a),
        Command::Pool(a) => volume::run_pool(a),
        Command::Hook(a) => hook::run(a),
        Command::Incus(a) => incus::run(a),
    }
}

/// A progress bar on a terminal, nothing otherwise.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.enable_steady_tick(Duration::from_millis(200));
            b
        });
        Self { bar }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str, total: Option<u64>) {
        if let Some(b) = &self.bar {
            b.set_message(name.to_string());
            match total {
                Some(t) => {
                    b.set_length(t);
                    b.set_position(0);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{msg:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                }
                None => b.set_style(
                    indicatif::ProgressStyle::with_template("{spinner} {msg}")
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                ),
            }
        }
    }
    fn advance(&self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }
}

fn fail(json: bool, e: &UnpackError) -> i32 {
    let code = e.exit_code();
    if json {
        let mut v = serde_json::json!({ "error": human::error_chain(e), "exit_code": code });
        if let UnpackError::VerifyFailed { report, .. } = e {
            v["table"] = serde_json::to_value(report).unwrap_or_default();
        }
        println!("{v}");
    } else {
        let hint = if e.kind() == image_unpack::UnpackErrorKind::TableNotUnderstood {
            " (--force overrides)"
        } else {
            ""
        };
        eprintln!("vmblk: {}{hint}", human::error_chain(e));
    }
    code
}

fn print_json<T: serde::Serialize>(v: &T) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("vmblk: cannot serialise report: {e}"),
    }
}

fn unpack(a: UnpackArgs) -> i32 {
    let opts = UnpackOptions {
        metadata: a.metadata,
        scratch_dir: a.scratch_dir,
        force: a.force,
        grow_last_partition: a.grow_last_partition,
        zero_tail: a.zero_tail,
        create_size: a.size,
        target_is_new: false,
        copy: CopyOptions {
            threads: a.threads,
            ..CopyOptions::default()
        },
    };
    let bar = Bar::new(!a.json);
    let r = image_unpack::unpack(&a.image, &a.target, &opts, &bar);
    bar.finish();
    match r {
        Ok(rep) => {
            if a.json {
                print_json(&rep);
            } else {
                human::unpack(&rep);
            }
            0
        }
        Err(e) => fail(a.json, &e),
    }
}

fn pack(a: PackArgs) -> i32 {
    let opts = image_unpack::PackOptions {
        compression: image_unpack::Compression::parse(&a.compress)
            .unwrap_or(image_unpack::Compression::Zlib),
        threads: a.threads,
    };
    let bar = Bar::new(!a.json);
    let r = image_unpack::pack(&a.volume, &a.image, &opts, &bar);
    bar.finish();
    match r {
        Ok(rep) => {
            if a.json {
                print_json(&rep);
            } else {
                human::pack(&rep);
            }
            0
        }
        Err(e) => {
            // A source that cannot be used is a bad target (4), like unpack's.
            let code = match &e {
                image_unpack::PackError::Source(_) => 4,
                _ => 1,
            };
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({ "error": human::error_chain(&e), "exit_code": code })
                );
            } else {
                eprintln!("vmblk: {}", human::error_chain(&e));
            }
            code
        }
    }
}

fn inspect(a: InspectArgs) -> i32 {
    match image_unpack::inspect(&a.path) {
        Ok(rep) => {
            if a.json {
                print_json(&rep);
            } else {
                human::inspect(&rep);
            }
            0
        }
        Err(e) => fail(a.json, &e),
    }
}

fn repair(a: RepairArgs) -> i32 {
    let opts = RepairCommandOptions {
        dry_run: a.dry_run,
        force: a.force,
        grow_last_partition: a.grow_last_partition,
    };
    let bar = Bar::new(!a.json);
    let r = image_unpack::repair(&a.target, &opts, &bar);
    bar.finish();
    match r {
        Ok(rep) => {
            if a.json {
                print_json(&rep);
            } else {
                human::repair(&rep);
            }
            0
        }
        Err(e) => fail(a.json, &e),
    }
}
