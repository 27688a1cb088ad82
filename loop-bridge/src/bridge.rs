//! [`Bridge`]: a labelled loop device over a volume, found again by [`list_bridges`] and
//! removed by [`cleanup_stale_bridges`] when its owner died.
//!
//! A bridge's `lo_file_name` is `vmblk-bridge:<pid>:<start>:<pidns>:<tag>`: the owning
//! process id, its start time (field 22 of `/proc/<pid>/stat`, so a reused pid is not
//! mistaken for the owner), the inode of its pid namespace (a pid from another namespace is
//! never judged), and a free-form tag naming the volume, truncated to fit the 63 bytes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::device::{
    bound_loop_devices, detach_if, truncate_utf8, AttachOptions, BackingId, LoopDevice, LoopStatus,
};
use crate::error::Error;
use crate::sys;

/// Prefix of every bridge label.
pub const BRIDGE_LABEL_PREFIX: &str = "vmblk-bridge:";
/// How long [`Bridge::open`] waits for another bridge setup on the same volume.
const VOLUME_LOCK_TIMEOUT: Duration = Duration::from_secs(5);

/// The process that created a bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Process id, in the pid namespace `pid_ns`.
    pub pid: u32,
    /// Start time of the process in clock ticks after boot.
    pub start_time: u64,
    /// Inode number of the owner's pid namespace.
    pub pid_ns: u64,
}

/// Whether the owner of a bridge still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OwnerState {
    /// The owning process runs.
    Running,
    /// The owning process is gone (or its pid now belongs to another process).
    Dead,
    /// Cannot tell (another pid namespace, `/proc` unreadable): treated as running.
    Unknown,
}

impl Owner {
    /// The calling process.
    pub fn current() -> io::Result<Owner> {
        let pid = std::process::id();
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let start_time = parse_start_time(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc/self/stat"))?;
        Ok(Owner {
            pid,
            start_time,
            pid_ns: current_pid_ns()?,
        })
    }

    /// Whether this owner still runs, as seen from the calling process.
    pub fn state(&self) -> OwnerState {
        match current_pid_ns() {
            Ok(ns) if ns == self.pid_ns => {}
            _ => return OwnerState::Unknown,
        }
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => match (parse_state(&stat), parse_start_time(&stat)) {
                // A zombie has exited and closed its descriptors.
                (Some('Z' | 'X'), _) => OwnerState::Dead,
                (_, Some(t)) if t == self.start_time => OwnerState::Running,
                (_, Some(_)) => OwnerState::Dead,
                (_, None) => OwnerState::Unknown,
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => OwnerState::Dead,
            Err(_) => OwnerState::Unknown,
        }
    }
}

fn current_pid_ns() -> io::Result<u64> {
    Ok(std::fs::metadata("/proc/self/ns/pid")?.ino())
}

/// Fields of `/proc/<pid>/stat` after the command name, which may itself hold spaces and
/// parentheses.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

fn parse_state(stat: &str) -> Option<char> {
    stat_fields(stat)?.first()?.chars().next()
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // Field 3 (state) is the first after the name; field 22 (starttime) is 19 after it.
    stat_fields(stat)?.get(19)?.parse().ok()
}

/// Builds a bridge label; the tag is truncated so the whole fits in `lo_file_name`.
pub fn encode_label(owner: &Owner, tag: &str) -> String {
    let head = format!(
        "{BRIDGE_LABEL_PREFIX}{}:{}:{}:",
        owner.pid, owner.start_time, owner.pid_ns
    );
    let room = (sys::LO_NAME_SIZE - 1).saturating_sub(head.len());
    let tag: String = tag.chars().filter(|c| !c.is_control()).collect();
    format!("{head}{}", truncate_utf8(&tag, room))
}

/// Parses a bridge label: `None` for anything that is not one.
pub fn parse_label(label: &str) -> Option<(Owner, String)> {
    let rest = label.strip_prefix(BRIDGE_LABEL_PREFIX)?;
    let mut parts = rest.splitn(4, ':');
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    let pid_ns = parts.next()?.parse().ok()?;
    let tag = parts.next()?.to_owned();
    Some((
        Owner {
            pid,
            start_time,
            pid_ns,
        },
        tag,
    ))
}

/// A bridge found on the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeInfo {
    /// The loop device and what it is bound to.
    pub device: LoopStatus,
    /// The process that created it.
    pub owner: Owner,
    /// The tag it was created with (possibly truncated).
    pub tag: String,
}

impl BridgeInfo {
    /// Whether its owner still runs.
    pub fn owner_state(&self) -> OwnerState {
        self.owner.state()
    }
}

/// A loop device with its own logical sector size over a volume (usually 512-byte sectors
/// over a 4K-sector drive), labelled so it can be recognised. At most one bridge exists per
/// volume. Dropping it detaches it; [`Bridge::close`] reports errors.
#[derive(Debug)]
pub struct Bridge {
    device: LoopDevice,
    volume: PathBuf,
}

impl Bridge {
    /// Opens a read-write bridge with `sector_size`-byte sectors over `volume` (a block
    /// device or a regular file). `tag` names the volume in the label.
    ///
    /// Fails with [`Error::AlreadyBridged`] if a bridge over the same volume exists, whoever
    /// owns it.
    pub fn open(volume: &Path, sector_size: u32, tag: &str) -> Result<Bridge, Error> {
        Bridge::open_with(
            volume,
            tag,
            &AttachOptions {
                logical_block_size: sector_size,
                ..AttachOptions::default()
            },
        )
    }

    /// Like [`Bridge::open`] with all attach options. `opts.label` must be `None`: the
    /// bridge writes its own.
    pub fn open_with(volume: &Path, tag: &str, opts: &AttachOptions) -> Result<Bridge, Error> {
        if opts.label.is_some() {
            return Err(Error::InvalidOptions {
                backing: volume.to_path_buf(),
                reason: "a bridge sets its own label".into(),
            });
        }
        let owner = Owner::current().map_err(|source| Error::Query {
            device: "/proc/self".into(),
            what: "owner process identity",
            source,
        })?;
        // Held from the duplicate check until the device is bound, so two processes opening a
        // bridge over the same volume at once cannot both pass the check.
        let lock = lock_volume(volume)?;
        let id = BackingId::of_metadata(&lock.metadata().map_err(|source| Error::LockVolume {
            volume: volume.to_path_buf(),
            source,
        })?);
        if let Some(existing) = list_bridges()?.into_iter().find(|b| b.device.backing == id) {
            return Err(Error::AlreadyBridged {
                volume: volume.to_path_buf(),
                existing: existing.device.path.clone(),
                owner: match existing.owner_state() {
                    OwnerState::Running => "running",
                    OwnerState::Dead => "dead: run cleanup_stale_bridges",
                    OwnerState::Unknown => "unknown",
                },
                label: existing.device.label,
            });
        }
        let opts = AttachOptions {
            label: Some(encode_label(&owner, tag)),
            ..opts.clone()
        };
        let device = LoopDevice::attach(volume, &opts)?;
        drop(lock);
        tracing::info!(
            device = %device.path().display(),
            volume = %volume.display(),
            sector_size = device.logical_block_size(),
            tag,
            "bridge opened"
        );
        Ok(Bridge {
            device,
            volume: volume.to_path_buf(),
        })
    }

    /// The loop device.
    pub fn device(&self) -> &LoopDevice {
        &self.device
    }

    /// `/dev/loopN`, where partition tools see the volume with the bridge's sector size.
    pub fn path(&self) -> &Path {
        self.device.path()
    }

    /// The volume under the bridge.
    pub fn volume(&self) -> &Path {
        &self.volume
    }

    /// Detaches the bridge, reporting errors (see [`LoopDevice::detach`]).
    pub fn close(self) -> Result<(), Error> {
        tracing::debug!(device = %self.path().display(), volume = %self.volume.display(), "closing bridge");
        self.device.detach()
    }
}

/// Takes an exclusive `flock` on the volume, waiting up to [`VOLUME_LOCK_TIMEOUT`]. On a
/// block device this lock also keeps udev from probing it meanwhile.
fn lock_volume(volume: &Path) -> Result<File, Error> {
    let err = |source| Error::LockVolume {
        volume: volume.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(volume)
        .map_err(|source| Error::OpenBacking {
            backing: volume.to_path_buf(),
            mode: "read-only",
            source,
        })?;
    let start = Instant::now();
    while !sys::try_lock_exclusive(file.as_fd()).map_err(err)? {
        if start.elapsed() >= VOLUME_LOCK_TIMEOUT {
            return Err(err(io::Error::from_raw_os_error(libc::EWOULDBLOCK)));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(file)
}

/// Every vmblk bridge on the system, whoever created it.
pub fn list_bridges() -> Result<Vec<BridgeInfo>, Error> {
    Ok(bound_loop_devices()?
        .into_iter()
        .filter_map(|device| {
            let (owner, tag) = parse_label(&device.label)?;
            Some(BridgeInfo { device, owner, tag })
        })
        .collect())
}

/// Detaches every bridge whose owner is dead and returns them.
///
/// Bridges of running processes, bridges whose owner cannot be judged, and loop devices
/// that are not bridges are never touched. Each device is re-read through the descriptor
/// used to detach it, so one rebound in between is left alone. All stale bridges are tried;
/// the first error is returned.
pub fn cleanup_stale_bridges() -> Result<Vec<BridgeInfo>, Error> {
    cleanup_stale_bridges_where(|_| true)
}

/// Like [`cleanup_stale_bridges`], limited to the stale bridges `select` accepts (for
/// example those over one volume, or with one tag).
pub fn cleanup_stale_bridges_where(
    mut select: impl FnMut(&BridgeInfo) -> bool,
) -> Result<Vec<BridgeInfo>, Error> {
    let mut cleaned = Vec::new();
    let mut first_error = None;
    for bridge in list_bridges()? {
        if bridge.owner_state() != OwnerState::Dead || !select(&bridge) {
            continue;
        }
        let same = |now: &LoopStatus| {
            now.label == bridge.device.label && now.backing == bridge.device.backing
        };
        match detach_if(bridge.device.number, same) {
            Ok(true) => {
                tracing::info!(
                    device = %bridge.device.path.display(),
                    label = %bridge.device.label,
                    owner_pid = bridge.owner.pid,
                    "stale bridge detached"
                );
                cleaned.push(bridge);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(device = %bridge.device.path.display(), error = %e, "cannot detach stale bridge");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(cleaned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> Owner {
        Owner {
            pid: 4194303,
            start_time: 9_999_999_999,
            pid_ns: 4026531836,
        }
    }

    #[test]
    fn label_round_trips() {
        let label = encode_label(&owner(), "vol:pool/vm1");
        assert_eq!(
            label,
            "vmblk-bridge:4194303:9999999999:4026531836:vol:pool/vm1"
        );
        assert_eq!(parse_label(&label), Some((owner(), "vol:pool/vm1".into())));
    }

    #[test]
    fn long_tag_is_truncated_to_fit_lo_file_name() {
        let label = encode_label(&owner(), &"ü".repeat(50));
        assert!(label.len() < sys::LO_NAME_SIZE);
        let (o, tag) = parse_label(&label).unwrap();
        assert_eq!(o, owner());
        assert!(tag.chars().all(|c| c == 'ü'));
        assert!(!tag.is_empty());
    }

    #[test]
    fn control_characters_are_dropped_from_tags() {
        let label = encode_label(&owner(), "a\nb\0c");
        assert!(label.ends_with(":abc"));
    }

    #[test]
    fn other_names_are_not_bridges() {
        for name in [
            "",
            "/var/lib/incus/disks/vm1.img",
            "vmblk-bridge:",
            "vmblk-bridge:12:34",
            "vmblk-bridge:x:1:2:tag",
            "vmblk-bridge:1:2:3",
            "xvmblk-bridge:1:2:3:tag",
        ] {
            assert_eq!(parse_label(name), None, "{name}");
        }
        assert!(parse_label("vmblk-bridge:1:2:3:").is_some());
    }

    #[test]
    fn proc_stat_parsing_survives_odd_command_names() {
        let stat = "1234 (a) b (c) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    5550123 1000 100 18446744073709551615";
        assert_eq!(parse_state(stat), Some('S'));
        assert_eq!(parse_start_time(stat), Some(5550123));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn current_process_is_running_and_a_foreign_namespace_is_unknown() {
        let me = Owner::current().unwrap();
        assert_eq!(me.state(), OwnerState::Running);
        let restarted = Owner {
            start_time: me.start_time + 1,
            ..me
        };
        assert_eq!(restarted.state(), OwnerState::Dead);
        let foreign = Owner {
            pid_ns: me.pid_ns + 1,
            ..me
        };
        assert_eq!(foreign.state(), OwnerState::Unknown);
    }
}
