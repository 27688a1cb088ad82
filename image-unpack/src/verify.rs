//! Verify a volume after repair: re-read the table at the image's sector
//! size (both headers valid, CRCs, backup at the true end, identical entry
//! arrays), then probe every partition with libblkid for its filesystem.
//!
//! Probing uses `blkid_probe_set_device(fd, offset, size)` (the `blkid`
//! crate's `Prober::set_device`), so a partition is probed in place on the
//! device or image file: no loop device and no kernel partition scan is
//! needed, and it works on a 4K device holding a 512-byte layout.
//!
//! An RBD image has no file descriptor (the kernel here has no rbd module, and
//! libblkid takes only an fd): [`verify_rbd`] copies each partition's first
//! [`RBD_PROBE_HEAD`] and last [`RBD_PROBE_TAIL`] bytes into a sparse in-memory file
//! of the partition's size and probes that. Filesystem signatures sit in those
//! ranges (ext4, xfs, btrfs, vfat and its root directory on an ESP, swap, LVM, md).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::partition::{self, PartitionReport, Problem, TableKind, TableReport};

/// Errors of [`verify`]. A table that fails verification is not an error:
/// it is a [`VerifyReport`] with `ok == false`.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Opening the device or image failed.
    #[error("opening {path} read-only")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Its size could not be read.
    #[error("finding the size of the device")]
    Size(#[source] std::io::Error),
    /// Reading the table failed.
    #[error("reading the partition table at {sector_size}-byte sectors")]
    Table {
        sector_size: u32,
        #[source]
        source: partition::Error,
    },
}

/// What libblkid found in one partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionProbe {
    /// 1-based partition index.
    pub index: u32,
    /// Partition name from the GPT (PARTLABEL).
    pub part_label: String,
    /// Partition GUID from the GPT (PARTUUID), lower case like blkid prints it.
    pub partuuid: String,
    /// Byte offset of the partition.
    pub offset: u64,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Filesystem TYPE, if libblkid recognised one.
    pub fs_type: Option<String>,
    /// Filesystem UUID.
    pub uuid: Option<String>,
    /// Filesystem LABEL.
    pub label: Option<String>,
    /// Why probing failed, if it did.
    pub probe_error: Option<String>,
}

/// The result of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Everything checked out.
    pub ok: bool,
    /// Sector size the table was read at.
    pub sector_size: u32,
    /// Device size in bytes.
    pub device_size: u64,
    /// Both GPT headers valid with matching entry CRCs.
    pub headers_valid: bool,
    /// The backup header is at the last LBA.
    pub backup_at_end: bool,
    /// Primary and backup entry arrays are byte-identical.
    pub entries_identical: bool,
    /// The table as read.
    pub table: TableReport,
    /// Filesystems found.
    pub partitions: Vec<PartitionProbe>,
    /// Human-readable problems; empty when `ok`.
    pub problems: Vec<String>,
}

/// Verifies the device or image at `path`; see the module doc.
pub fn verify(path: impl AsRef<Path>, sector_size: u32) -> Result<VerifyReport, VerifyError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| VerifyError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    verify_file(&file, sector_size)
}

/// Verifies an already open device or image (read access is enough).
pub fn verify_file(file: &File, sector_size: u32) -> Result<VerifyReport, VerifyError> {
    let mut dev = file;
    verify_with(&mut dev, sector_size, &|offset, size| {
        probe_at(file, offset, size)
    })
}

/// How much of each partition's start [`verify_rbd`] gives libblkid.
pub const RBD_PROBE_HEAD: u64 = 8 << 20;
/// How much of each partition's end [`verify_rbd`] gives libblkid.
pub const RBD_PROBE_TAIL: u64 = 1 << 20;

/// Verifies an RBD image (see the module doc for how partitions are probed).
pub fn verify_rbd(image: &rbd::Image, sector_size: u32) -> Result<VerifyReport, VerifyError> {
    let mut dev = image
        .cursor()
        .map_err(|e| VerifyError::Size(std::io::Error::other(e.to_string())))?;
    verify_with(&mut dev, sector_size, &|offset, size| {
        probe_copy(image, offset, size)
    })
}

/// A partition's head and tail copied into a sparse in-memory file, then probed.
fn probe_copy(
    image: &rbd::Image,
    offset: u64,
    size: u64,
) -> Result<Option<HashMap<String, String>>, String> {
    let copy = crate::sys::memfd("vmblk-probe", size).map_err(|e| format!("memfd: {e}"))?;
    let head = size.min(RBD_PROBE_HEAD);
    let tail_from = size.saturating_sub(RBD_PROBE_TAIL).max(head);
    let mut buf = vec![0u8; 1 << 20];
    for (from, to) in [(0, head), (tail_from, size)] {
        let mut at = from;
        while at < to {
            let n = ((to - at) as usize).min(buf.len());
            let got = image
                .read_at(&mut buf[..n], offset + at)
                .map_err(|e| format!("read at {}: {e}", offset + at))?;
            if got == 0 {
                break;
            }
            std::os::unix::fs::FileExt::write_all_at(&copy, &buf[..got], at)
                .map_err(|e| format!("copy: {e}"))?;
            at += got as u64;
        }
    }
    probe_at(&copy, 0, size)
}

/// Verifies the table read from `dev`, probing partitions with `probe(offset, size)`.
fn verify_with<D: Read + Seek>(
    dev: &mut D,
    sector_size: u32,
    probe: &dyn Fn(u64, u64) -> Result<Option<HashMap<String, String>>, String>,
) -> Result<VerifyReport, VerifyError> {
    let device_size = dev.seek(SeekFrom::End(0)).map_err(VerifyError::Size)?;
    let table =
        partition::inspect(dev, sector_size, device_size).map_err(|source| VerifyError::Table {
            sector_size,
            source,
        })?;
    let mut problems: Vec<String> = table.problems.iter().map(Problem::to_string).collect();

    let is_gpt = matches!(table.kind, TableKind::Gpt | TableKind::Hybrid);
    let valid =
        |h: Option<&partition::HeaderReport>| h.is_some_and(|h| h.valid && h.entries_crc_ok);
    let headers_valid = is_gpt && valid(Some(&table.primary)) && valid(table.backup.as_ref());
    let entries_identical = headers_valid
        && !table
            .problems
            .iter()
            .any(|p| matches!(p, Problem::HeadersDisagree { .. }));
    match table.kind {
        TableKind::Gpt | TableKind::Hybrid => {
            if !headers_valid {
                problems.push("primary and backup GPT headers are not both valid".into());
            }
            if !table.backup_at_end {
                problems.push(format!(
                    "backup GPT header is not at the last LBA {}",
                    table.last_lba
                ));
            }
        }
        TableKind::Damaged => problems.push("partition table damaged".into()),
        TableKind::Mbr | TableKind::None => {}
    }

    let partitions = table
        .partitions
        .iter()
        .map(|p| probe_partition(probe, p, sector_size))
        .collect::<Vec<_>>();
    for p in &partitions {
        if let Some(e) = &p.probe_error {
            problems.push(format!("partition {}: libblkid probe failed: {e}", p.index));
        }
    }
    Ok(VerifyReport {
        ok: problems.is_empty(),
        sector_size,
        device_size,
        headers_valid,
        backup_at_end: table.backup_at_end,
        entries_identical,
        table,
        partitions,
        problems,
    })
}

fn probe_partition(
    probe: &dyn Fn(u64, u64) -> Result<Option<HashMap<String, String>>, String>,
    p: &PartitionReport,
    sector_size: u32,
) -> PartitionProbe {
    let offset = p.first_lba.saturating_mul(u64::from(sector_size));
    let mut out = PartitionProbe {
        index: p.index,
        part_label: p.name.clone(),
        partuuid: p.partition_guid.to_lowercase(),
        offset,
        size_bytes: p.size_bytes,
        fs_type: None,
        uuid: None,
        label: None,
        probe_error: None,
    };
    match probe(offset, p.size_bytes) {
        Ok(Some(v)) => {
            out.fs_type = v.get("TYPE").cloned();
            out.uuid = v.get("UUID").cloned();
            out.label = v.get("LABEL").cloned();
        }
        Ok(None) => {}
        Err(e) => out.probe_error = Some(e),
    }
    out
}

/// Probes `size` bytes at `offset` of `file` for a filesystem superblock.
/// `Ok(None)`: nothing recognised.
fn probe_at(
    file: &File,
    offset: u64,
    size: u64,
) -> Result<Option<HashMap<String, String>>, String> {
    let off = i64::try_from(offset).map_err(|_| "offset out of range".to_string())?;
    let len = i64::try_from(size).map_err(|_| "size out of range".to_string())?;
    let mut pr = blkid::prober::Prober::new().map_err(|e| format!("new probe: {e}"))?;
    // The probe only borrows the descriptor (libblkid closes only the fds it
    // opened itself); `file` outlives `pr`.
    pr.set_device(file.as_raw_fd(), off, Some(len))
        .map_err(|e| format!("set device at offset {offset}: {e}"))?;
    pr.enable_superblocks(true)
        .map_err(|e| format!("enable superblocks: {e}"))?;
    match pr.do_safe_probe().map_err(|e| format!("probe: {e}"))? {
        blkid::prober::ProbeState::Success => Ok(Some(
            pr.get_values_map().map_err(|e| format!("values: {e}"))?,
        )),
        blkid::prober::ProbeState::Ambivalent => {
            Err("more than one filesystem signature (ambivalent)".into())
        }
        _ => Ok(None),
    }
}
