//! The pipelines behind `vmblk unpack`, `vmblk repair` and `vmblk inspect`.
//!
//! Unpack, in order; nothing is written before step 4:
//! 1. open the image and validate it (format by content);
//! 2. open the target, probe its size and block sizes, refuse one too small;
//! 3. read the image's own partition table through its guest view and decide
//!    the sector size it was built for; refuse a damaged one (unless forced);
//! 4. copy the data (never through a bridge: a 512-byte loop device over a 4K
//!    device is always buffered by the kernel);
//! 5. partition work — on the target itself when its logical block size is
//!    the table's, else through a loop bridge with the table's sector size;
//! 6. verify at that sector size, probe filesystems, remove the bridge.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::copy::{copy, CopyError, CopyOptions, CopyStats};
use crate::guest::GuestReader;
use crate::partition::{
    self, DetectedLayout, Detection, RepairOptions, RepairReport, TableKind, TableReport,
};
use crate::source::{self, SourceError, SourceFormat};
use crate::target::{Target, TargetError, TargetInfo};
use crate::verify::{self, VerifyReport};

/// Reports the progress of long work.
pub trait Progress: Sync {
    /// A new phase begins ("copy", "repair", "verify"); `total` bytes if known.
    fn phase(&self, _name: &str, _total: Option<u64>) {}
    /// Bytes done so far in the current phase.
    fn advance(&self, _done: u64) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoProgress;
impl Progress for NoProgress {}

/// Options of [`unpack`].
#[derive(Debug, Clone, Default)]
pub struct UnpackOptions {
    /// The metadata tarball of a split Incus image (the image path is then its rootfs).
    pub metadata: Option<PathBuf>,
    /// Where a compressed tarball's disk is extracted to (default: the system temp dir).
    pub scratch_dir: Option<PathBuf>,
    /// Unpack and repair even when the image's partition table is not understood.
    pub force: bool,
    /// Extend the last partition to the end of the volume.
    pub grow_last_partition: bool,
    /// Also zero the volume beyond the image's end (it may hold an older guest's data).
    pub zero_tail: bool,
    /// An RBD target that does not exist is created with this many bytes.
    pub create_size: Option<u64>,
    /// The target was just created and reads as zeros everywhere (a new sparse file, a
    /// new thin RBD image): zero ranges are not written at all.
    pub target_is_new: bool,
    /// Copy tuning.
    pub copy: CopyOptions,
}

/// Options of [`repair`].
#[derive(Debug, Clone, Default)]
pub struct RepairCommandOptions {
    /// Report what would be done, write nothing.
    pub dry_run: bool,
    /// Repair even when the table is not fully understood.
    pub force: bool,
    /// Extend the last partition to the end of the volume.
    pub grow_last_partition: bool,
}

/// The loop bridge used for partition work.
#[derive(Debug, Clone, Serialize)]
pub struct BridgeUsed {
    /// The loop device, e.g. /dev/loop3.
    pub device: PathBuf,
    /// Its logical sector size.
    pub sector_size: u32,
}

/// What was done to the partition table, and how it checked out.
#[derive(Debug, Clone, Serialize)]
pub struct TableWork {
    /// The sector size the table was built for, if a table was found.
    pub table_sector_size: Option<u32>,
    /// What the detection found.
    pub detection: Detection,
    /// The bridge, when the target's sector size differed.
    pub bridge: Option<BridgeUsed>,
    /// Repair actions (absent for MBR-only and table-less volumes).
    pub repair: Option<RepairReport>,
    /// Verification after repair.
    pub verify: Option<VerifyReport>,
    /// Why no repair ran, when none did.
    pub skipped: Option<String>,
}

/// The report of [`unpack`] (`vmblk unpack --json`).
#[derive(Debug, Clone, Serialize)]
pub struct UnpackReport {
    /// The image path.
    pub image: PathBuf,
    /// Its format.
    pub source_format: SourceFormat,
    /// Size of the guest disk.
    pub virtual_size: u64,
    /// The target as probed.
    pub target: TargetInfo,
    /// The copy's figures.
    pub copy: CopyStats,
    /// Bytes beyond the image zeroed (with `zero_tail`).
    pub tail_zeroed: u64,
    /// Partition work.
    pub table: TableWork,
    /// Wall time, milliseconds.
    pub elapsed_ms: u64,
    /// Guest bytes per second over the copy phase.
    pub throughput_bytes_per_sec: u64,
}

/// The report of [`repair`] (`vmblk repair --json`).
#[derive(Debug, Clone, Serialize)]
pub struct RepairCommandReport {
    /// The target as probed.
    pub target: TargetInfo,
    /// Whether this was a dry run.
    pub dry_run: bool,
    /// Partition work.
    pub table: TableWork,
    /// Wall time, milliseconds.
    pub elapsed_ms: u64,
}

/// The report of [`inspect`] (`vmblk inspect --json`).
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// The path.
    pub path: PathBuf,
    /// "image" for an image file, "volume" for a block device.
    pub kind: &'static str,
    /// The image format (images only).
    pub source_format: Option<SourceFormat>,
    /// Guest disk size (images) or device size.
    pub size: u64,
    /// Block sizes (volumes only).
    pub target: Option<TargetInfo>,
    /// Which sector size the table was built for.
    pub detection: Detection,
    /// The table read at that sector size.
    pub table: Option<TableReport>,
}

/// What kind of failure an [`UnpackError`] is: what a caller decides by (an exit code, a
/// gRPC code, whether forcing would help), so nobody matches on variants or messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnpackErrorKind {
    /// The image is corrupt, unsupported or unrecognised.
    BadImage,
    /// The target is missing, busy, not a volume or too small; nothing was written.
    BadTarget,
    /// The partition table is not understood; nothing was written to it (forcing
    /// the repair would proceed).
    TableNotUnderstood,
    /// Verification after the repair found problems.
    VerifyFailed,
    /// Anything else: I/O, the copy, the bridge.
    Failed,
}

/// Why a pipeline failed. [`UnpackError::kind`] says what kind of failure it is.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The image could not be opened or read.
    #[error("image {path}")]
    Image {
        /// The image path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: SourceError,
    },
    /// The target could not be used.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The target is smaller than the image.
    #[error("target {path} holds {size} bytes, the image needs {needed}: nothing was written")]
    TooSmall {
        /// The target path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The image's virtual size.
        needed: u64,
    },
    /// Copying failed part way; the target holds a partial image.
    #[error("copying the image onto {path} failed; the target holds a partial image")]
    Copy {
        /// The target path.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: CopyError,
    },
    /// The partition table is not understood; nothing was written to it.
    #[error("partition table on {path} not repaired: {reason}")]
    TableRefused {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading or repairing the partition table failed.
    #[error("partition table on {path}")]
    Table {
        /// The device the work ran on.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: partition::Error,
    },
    /// The loop bridge could not be set up or removed.
    #[error("loop bridge over {path}")]
    Bridge {
        /// The volume.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: loop_bridge::Error,
    },
    /// Verification after repair found problems.
    #[error("verification of {path} failed: {problems}")]
    VerifyFailed {
        /// The volume.
        path: PathBuf,
        /// The problems, joined.
        problems: String,
        /// The full report.
        report: Box<TableWork>,
    },
    /// Verification could not run.
    #[error("verifying {path}")]
    Verify {
        /// The device.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: verify::VerifyError,
    },
    /// Opening a device for partition work failed.
    #[error("opening {path}")]
    Open {
        /// The device.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl UnpackError {
    /// What kind of failure this is.
    pub fn kind(&self) -> UnpackErrorKind {
        match self {
            UnpackError::Image { .. } => UnpackErrorKind::BadImage,
            UnpackError::Target(_) | UnpackError::TooSmall { .. } => UnpackErrorKind::BadTarget,
            UnpackError::TableRefused { .. } => UnpackErrorKind::TableNotUnderstood,
            UnpackError::VerifyFailed { .. } => UnpackErrorKind::VerifyFailed,
            _ => UnpackErrorKind::Failed,
        }
    }

    /// `vmblk`'s exit code for this error: 3 bad image, 4 target unusable,
    /// 5 partition table refused (nothing written to it), 6 verification
    /// failed, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self.kind() {
            UnpackErrorKind::BadImage => 3,
            UnpackErrorKind::BadTarget => 4,
            UnpackErrorKind::TableNotUnderstood => 5,
            UnpackErrorKind::VerifyFailed => 6,
            UnpackErrorKind::Failed => 1,
        }
    }
}

fn open_image(
    image: &Path,
    opts: &UnpackOptions,
) -> Result<Box<dyn source::ImageSource>, UnpackError> {
    let o = source::OpenOptions {
        metadata: opts.metadata.clone(),
        scratch_dir: opts.scratch_dir.clone(),
    };
    source::open(image, &o).map_err(|source| UnpackError::Image {
        path: image.to_owned(),
        source,
    })
}

/// Decides whether the image's table can be worked on; returns the sector size.
fn table_plan(detection: &Detection, force: bool, path: &Path) -> Result<Option<u32>, UnpackError> {
    match detection.layout {
        DetectedLayout::Gpt { sector_size } => Ok(Some(sector_size)),
        DetectedLayout::Both { likely } if detection.suspected_sgdisk_accident || force => {
            Ok(Some(likely))
        }
        DetectedLayout::Both { .. } => Err(UnpackError::TableRefused {
            path: path.to_owned(),
            reason: "GPTs for both 512- and 4096-byte sectors are present".into(),
        }),
        DetectedLayout::Mbr | DetectedLayout::None => Ok(None),
    }
}

/// Unpacks `image` onto `target_path`, repairs and verifies its partition table.
pub fn unpack(
    image: &Path,
    target_path: &Path,
    opts: &UnpackOptions,
    progress: &dyn Progress,
) -> Result<UnpackReport, UnpackError> {
    let t0 = Instant::now();
    let src = open_image(image, opts)?;
    let vsize = src.virtual_size();
    let source_format = src.format();
    if let Some(size) = opts.create_size.filter(|&s| s < vsize) {
        return Err(UnpackError::TooSmall {
            path: target_path.to_owned(),
            size,
            needed: vsize,
        });
    }
    let mut target = Target::open_or_create(target_path, opts.create_size)?;
    if opts.target_is_new {
        target.assume_zeroed();
    }
    let info = target.info().clone();
    if info.size < vsize {
        return Err(UnpackError::TooSmall {
            path: target_path.to_owned(),
            size: info.size,
            needed: vsize,
        });
    }
    // Look at the image's own table before writing anything.
    let image_detection = partition::detect_table_sector_size(&mut GuestReader::new(&*src), vsize)
        .map_err(|source| UnpackError::Table {
            path: image.to_owned(),
            source,
        })?;
    let table_ss = table_plan(&image_detection, opts.force, image)?;
    if let Some(ss) = table_ss {
        let report =
            partition::inspect(&mut GuestReader::new(&*src), ss, vsize).map_err(|source| {
                UnpackError::Table {
                    path: image.to_owned(),
                    source,
                }
            })?;
        if report.kind == TableKind::Damaged && !opts.force {
            return Err(UnpackError::TableRefused {
                path: image.to_owned(),
                reason: format!(
                    "the image's own GPT is damaged: {}",
                    report
                        .problems
                        .iter()
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            });
        }
    }
    tracing::info!(image = %image.display(), format = %src.format(), virtual_size = vsize,
        target = %target_path.display(), lbs = info.logical_block_size, "unpacking");

    progress.phase("copy", Some(vsize));
    let tc = Instant::now();
    let stats = copy(&*src, &target, &opts.copy, &|d| progress.advance(d)).map_err(|source| {
        UnpackError::Copy {
            path: target_path.to_owned(),
            source,
        }
    })?;
    let copy_secs = tc.elapsed().as_secs_f64();
    let mut tail_zeroed = 0;
    if opts.zero_tail {
        let a = target.alignment();
        let from = vsize.div_ceil(a) * a;
        if from < info.size {
            progress.phase("zero tail", Some(info.size - from));
            target.zero_range(from, info.size - from)?;
            tail_zeroed = info.size - from;
        }
    }
    target.sync()?;
    drop(src);

    let repair_opts = RepairOptions {
        dry_run: false,
        force: opts.force,
        grow_last_partition: opts.grow_last_partition,
        image_size: Some(vsize),
    };
    let table = table_work(&target, table_ss, image_detection, &repair_opts, progress)?;
    Ok(UnpackReport {
        image: image.to_owned(),
        source_format,
        virtual_size: vsize,
        target: info,
        copy: stats,
        tail_zeroed,
        table,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        throughput_bytes_per_sec: if copy_secs > 0.0 {
            (vsize as f64 / copy_secs) as u64
        } else {
            0
        },
    })
}

/// Repairs and verifies the partition table of a volume in place (also what
/// runs after a volume grows).
pub fn repair(
    target_path: &Path,
    opts: &RepairCommandOptions,
    progress: &dyn Progress,
) -> Result<RepairCommandReport, UnpackError> {
    let t0 = Instant::now();
    let target = if opts.dry_run {
        Target::open_read_only(target_path)?
    } else {
        Target::open(target_path)?
    };
    let info = target.info().clone();
    let detection = match target.rbd_image() {
        Some(image) => {
            let mut cursor = image.cursor().map_err(|e| UnpackError::Open {
                path: target_path.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
            partition::detect_table_sector_size(&mut cursor, info.size)
        }
        None => {
            let mut f = open_rw(target_path, false)?;
            partition::detect_table_sector_size(&mut f, info.size)
        }
    }
    .map_err(|source| UnpackError::Table {
        path: target_path.to_owned(),
        source,
    })?;
    let ss = table_plan(&detection, opts.force, target_path)?;
    if ss.is_none() && !matches!(detection.layout, DetectedLayout::Mbr) && !opts.force {
        return Err(UnpackError::TableRefused {
            path: target_path.to_owned(),
            reason: "no partition table found".into(),
        });
    }
    let repair_opts = RepairOptions {
        dry_run: opts.dry_run,
        force: opts.force,
        grow_last_partition: opts.grow_last_partition,
        image_size: None,
    };
    let table = table_work(&target, ss, detection, &repair_opts, progress)?;
    Ok(RepairCommandReport {
        target: info,
        dry_run: opts.dry_run,
        table,
        elapsed_ms: t0.elapsed().as_millis() as u64,
    })
}

fn open_rw(path: &Path, write: bool) -> Result<File, UnpackError> {
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|source| UnpackError::Open {
            path: path.to_owned(),
            source,
        })
}

/// Partition work on a written volume: directly, or through a bridge.
fn table_work(
    target: &Target,
    table_ss: Option<u32>,
    detection: Detection,
    opts: &RepairOptions,
    progress: &dyn Progress,
) -> Result<TableWork, UnpackError> {
    let path = &target.info().path;
    let Some(ss) = table_ss else {
        let skipped = match detection.layout {
            DetectedLayout::Mbr => "MBR-only table: left as it is",
            _ => "no partition table: nothing to repair",
        };
        tracing::info!(volume = %path.display(), "{skipped}");
        return Ok(TableWork {
            table_sector_size: None,
            detection,
            bridge: None,
            repair: None,
            verify: None,
            skipped: Some(skipped.into()),
        });
    };
    if let Some(image) = target.rbd_image() {
        return rbd_table_work(image, path, ss, detection, opts, progress);
    }
    let bridge = if ss != target.info().logical_block_size {
        let tag = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let b =
            loop_bridge::Bridge::open(path, ss, &tag).map_err(|source| UnpackError::Bridge {
                path: path.clone(),
                source,
            })?;
        tracing::info!(volume = %path.display(), bridge = %b.path().display(), sector_size = ss,
            "partition work through a loop bridge");
        Some(b)
    } else {
        None
    };
    let work_path = bridge
        .as_ref()
        .map(|b| b.path().to_owned())
        .unwrap_or_else(|| path.clone());
    let result = (|| {
        let mut dev = open_rw(&work_path, !opts.dry_run)?;
        let size = device_or_file_size(&dev, &work_path)?;
        progress.phase("repair", None);
        let repair =
            partition::repair(&mut dev, ss, size, opts).map_err(|source| UnpackError::Table {
                path: work_path.clone(),
                source,
            })?;
        if !opts.dry_run {
            dev.sync_all().map_err(|source| UnpackError::Open {
                path: work_path.clone(),
                source,
            })?;
        }
        drop(dev);
        progress.phase("verify", None);
        let verify = verify::verify(&work_path, ss).map_err(|source| UnpackError::Verify {
            path: work_path.clone(),
            source,
        })?;
        Ok::<_, UnpackError>((repair, verify))
    })();
    let bridge_used = bridge.as_ref().map(|b| BridgeUsed {
        device: b.path().to_owned(),
        sector_size: ss,
    });
    if let Some(b) = bridge {
        b.close().map_err(|source| UnpackError::Bridge {
            path: path.clone(),
            source,
        })?;
    }
    let (repair, verify) = result?;
    checked_work(path, ss, detection, bridge_used, repair, verify, opts)
}

/// The report of a repair and its verification; a failed verification (not in a dry
/// run) is an error carrying the report.
fn checked_work(
    path: &Path,
    ss: u32,
    detection: Detection,
    bridge: Option<BridgeUsed>,
    repair: partition::RepairReport,
    verify: VerifyReport,
    opts: &RepairOptions,
) -> Result<TableWork, UnpackError> {
    let work = TableWork {
        table_sector_size: Some(ss),
        detection,
        bridge,
        repair: Some(repair),
        verify: Some(verify.clone()),
        skipped: None,
    };
    if !verify.ok && !opts.dry_run {
        return Err(UnpackError::VerifyFailed {
            path: path.to_owned(),
            problems: verify.problems.join("; "),
            report: Box::new(work),
        });
    }
    Ok(work)
}

/// Partition work on an RBD image: librbd is byte-addressed, so the table is read and
/// written at the image's own sector size directly, no bridge.
fn rbd_table_work(
    image: &rbd::Image,
    path: &Path,
    ss: u32,
    detection: Detection,
    opts: &RepairOptions,
    progress: &dyn Progress,
) -> Result<TableWork, UnpackError> {
    let io_err = |e: rbd::RbdError| UnpackError::Open {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    };
    let mut dev = image.cursor().map_err(io_err)?;
    let size = image.size().map_err(io_err)?;
    progress.phase("repair", None);
    let repair =
        partition::repair(&mut dev, ss, size, opts).map_err(|source| UnpackError::Table {
            path: path.to_owned(),
            source,
        })?;
    if !opts.dry_run {
        image.flush().map_err(io_err)?;
    }
    progress.phase("verify", None);
    let verify = verify::verify_rbd(image, ss).map_err(|source| UnpackError::Verify {
        path: path.to_owned(),
        source,
    })?;
    checked_work(path, ss, detection, None, repair, verify, opts)
}

fn device_or_file_size(f: &File, path: &Path) -> Result<u64, UnpackError> {
    let meta = f.metadata().map_err(|source| UnpackError::Open {
        path: path.to_owned(),
        source,
    })?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    blockdev::size(f).map_err(|source| UnpackError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Looks at an image file or a volume: format, sizes, and its partition table
/// at the sector size it was built for.
pub fn inspect(path: &Path) -> Result<InspectReport, UnpackError> {
    if crate::target::rbd_spec(path)?.is_some() {
        return inspect_rbd(path);
    }
    let meta = std::fs::metadata(path).map_err(|source| UnpackError::Open {
        path: path.to_owned(),
        source,
    })?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        let target = Target::open_read_only(path)?;
        let info = target.info().clone();
        let mut f = open_rw(path, false)?;
        let detection =
            partition::detect_table_sector_size(&mut f, info.size).map_err(|source| {
                UnpackError::Table {
                    path: path.to_owned(),
                    source,
                }
            })?;
        let table = match detection.sector_size() {
            Some(ss) => Some(partition::inspect(&mut f, ss, info.size).map_err(|source| {
                UnpackError::Table {
                    path: path.to_owned(),
                    source,
                }
            })?),
            None => None,
        };
        return Ok(InspectReport {
            path: path.to_owned(),
            kind: "volume",
            source_format: None,
            size: info.size,
            target: Some(info),
            detection,
            table,
        });
    }
    let src = open_image(path, &UnpackOptions::default())?;
    let vsize = src.virtual_size();
    let detection = partition::detect_table_sector_size(&mut GuestReader::new(&*src), vsize)
        .map_err(|source| UnpackError::Table {
            path: path.to_owned(),
            source,
        })?;
    let table = match detection.sector_size() {
        Some(ss) => Some(
            partition::inspect(&mut GuestReader::new(&*src), ss, vsize).map_err(|source| {
                UnpackError::Table {
                    path: path.to_owned(),
                    source,
                }
            })?,
        ),
        None => None,
    };
    Ok(InspectReport {
        path: path.to_owned(),
        kind: "image",
        source_format: Some(src.format()),
        size: vsize,
        target: None,
        detection,
        table,
    })
}

/// [`inspect`] of an RBD image (read-only; at its snapshot if the address names one).
fn inspect_rbd(path: &Path) -> Result<InspectReport, UnpackError> {
    let target = Target::open_read_only(path)?;
    let info = target.info().clone();
    let image = target.rbd_image().ok_or_else(|| UnpackError::Open {
        path: path.to_owned(),
        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
    })?;
    let table_err = |source| UnpackError::Table {
        path: path.to_owned(),
        source,
    };
    let mut cursor = image.cursor().map_err(|e| UnpackError::Open {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let detection =
        partition::detect_table_sector_size(&mut cursor, info.size).map_err(table_err)?;
    let table = match detection.sector_size() {
        Some(ss) => Some(partition::inspect(&mut cursor, ss, info.size).map_err(table_err)?),
        None => None,
    };
    Ok(InspectReport {
        path: path.to_owned(),
        kind: "volume",
        source_format: None,
        size: info.size,
        target: Some(info),
        detection,
        table,
    })
}
