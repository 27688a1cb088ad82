//! The stable identity of a block device, read from sysfs: what makes "the same disk"
//! recognisable after it went away and came back, possibly under another name.
//!
//! ```text
//!  /sys/class/block/<name>/
//!    loop/backing_file, loop/offset  ──► Loop { backing file, its st_dev/st_ino, offset }
//!    partition, start (+ parent)     ──► Partition { parent's identity, number, start }
//!    dm/uuid                         ──► DmUuid
//!    wwid, device/wwid               ──► Wwid   (NVMe namespace, SCSI VPD 0x83)
//!    eui, nguid, uuid                ──► Nvme   (namespace ids, when no wwid)
//!    serial, device/serial (+model, nsid) ──► Serial
//! ```
//!
//! The device *name* (`loop3`, `nvme0n1`) is never part of an identity: a different disk
//! can get the old name, and the old disk can come back under a new one.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where sysfs is mounted.
pub const SYSFS: &str = "/sys";

/// What identifies a block device across removal and re-add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceIdentity {
    /// A world-wide id: NVMe namespace `wwid`, SCSI `device/wwid` (from VPD page 0x83).
    Wwid {
        /// The id, as sysfs prints it (e.g. "eui.0025388b91b4e3a1", "naa.5000c500a1b2c3d4").
        wwid: String,
    },
    /// NVMe namespace ids, for controllers whose namespaces have no `wwid` attribute.
    Nvme {
        /// IEEE extended unique identifier ("" if none).
        eui: String,
        /// Namespace globally unique identifier ("" if none).
        nguid: String,
        /// Namespace UUID ("" if none).
        uuid: String,
    },
    /// A device-mapper device's UUID.
    DmUuid {
        /// `dm/uuid`.
        uuid: String,
    },
    /// A serial number (virtio-blk, or the controller's serial with the namespace id).
    Serial {
        /// The serial.
        serial: String,
        /// The model ("" if unknown).
        model: String,
        /// NVMe namespace id (0: none).
        nsid: u32,
    },
    /// A loop device: what it maps.
    Loop {
        /// The backing file's path, as the kernel shows it (for people; not compared).
        backing_file: PathBuf,
        /// The backing file's device (st_dev).
        backing_dev: u64,
        /// The backing file's inode (st_ino).
        backing_ino: u64,
        /// Offset into the backing file, bytes.
        offset: u64,
    },
    /// A partition of an identified disk.
    Partition {
        /// The whole disk's identity.
        parent: Box<DeviceIdentity>,
        /// The partition number.
        number: u32,
        /// Its first sector (512-byte units), so a re-partitioned disk is not taken for
        /// the old layout.
        start: u64,
    },
}

impl DeviceIdentity {
    /// Whether two identities name the same device. Everything is compared except a loop
    /// device's backing path, which may have been renamed (its inode has not).
    pub fn same_device(&self, other: &DeviceIdentity) -> bool {
        match (self, other) {
            (
                DeviceIdentity::Loop {
                    backing_dev: d1,
                    backing_ino: i1,
                    offset: o1,
                    ..
                },
                DeviceIdentity::Loop {
                    backing_dev: d2,
                    backing_ino: i2,
                    offset: o2,
                    ..
                },
            ) => (d1, i1, o1) == (d2, i2, o2),
            (
                DeviceIdentity::Partition {
                    parent: p1,
                    number: n1,
                    start: s1,
                },
                DeviceIdentity::Partition {
                    parent: p2,
                    number: n2,
                    start: s2,
                },
            ) => n1 == n2 && s1 == s2 && p1.same_device(p2),
            (a, b) => a == b,
        }
    }
}

impl std::fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceIdentity::Wwid { wwid } => write!(f, "wwid {wwid}"),
            DeviceIdentity::Nvme { eui, nguid, uuid } => {
                write!(f, "nvme eui={eui} nguid={nguid} uuid={uuid}")
            }
            DeviceIdentity::DmUuid { uuid } => write!(f, "dm uuid {uuid}"),
            DeviceIdentity::Serial {
                serial,
                model,
                nsid,
            } => {
                write!(f, "serial {serial}")?;
                if !model.is_empty() {
                    write!(f, " model {model}")?;
                }
                if *nsid != 0 {
                    write!(f, " nsid {nsid}")?;
                }
                Ok(())
            }
            DeviceIdentity::Loop {
                backing_file,
                backing_dev,
                backing_ino,
                offset,
            } => write!(
                f,
                "loop over {} (dev {backing_dev:#x} ino {backing_ino}) offset {offset}",
                backing_file.display()
            ),
            DeviceIdentity::Partition {
                parent,
                number,
                start,
            } => write!(f, "partition {number} at sector {start} of {parent}"),
        }
    }
}

/// A view of sysfs (the real one at /sys, or a tree built by a test).
#[derive(Debug, Clone)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::new(SYSFS)
    }
}

/// One block device as sysfs shows it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name ("loop3", "nvme0n1p2").
    pub name: String,
    /// Its node: `/dev/<name>`.
    pub devnode: PathBuf,
    /// Device number (as st_rdev).
    pub devnum: u64,
    /// Size in bytes (0: no medium, e.g. a loop device with nothing attached).
    pub size_bytes: u64,
    /// The kernel's disk sequence number (changes with each new medium), if shown.
    pub diskseq: Option<u64>,
    /// Its stable identity, if it has one.
    pub identity: Option<DeviceIdentity>,
}

fn read_trim(p: &Path) -> Option<String> {
    let s = fs::read_to_string(p).ok()?;
    let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    (!s.is_empty()).then(|| s.to_owned())
}

/// An id that is all zeros (or dashes and zeros) means "not set" in NVMe.
fn nonzero_id(s: Option<String>) -> Option<String> {
    s.filter(|v| v.chars().any(|c| c.is_ascii_hexdigit() && c != '0'))
}

impl Sysfs {
    /// sysfs mounted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    fn class(&self, name: &str) -> PathBuf {
        self.root.join("class/block").join(name)
    }

    /// The kernel name of the block device with number `devnum`.
    pub fn name_of_devnum(&self, devnum: u64) -> Option<String> {
        let (ma, mi) = (libc::major(devnum), libc::minor(devnum));
        let link = self.root.join(format!("dev/block/{ma}:{mi}"));
        let target = fs::read_link(&link).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// The kernel name of the block device `path` (a node or a symlink to one) is.
    pub fn name_of_path(&self, path: &Path) -> Option<String> {
        let m = fs::metadata(path).ok()?;
        if !m.file_type().is_block_device() {
            return None;
        }
        self.name_of_devnum(m.rdev())
    }

    /// The identity of the block device named `name`, if it has one.
    pub fn identity(&self, name: &str) -> Option<DeviceIdentity> {
        let d = self.class(name);
        if let Some(back) = read_trim(&d.join("loop/backing_file")) {
            let offset = read_trim(&d.join("loop/offset"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            // A deleted backing file has no identity left to match.
            let m = fs::metadata(&back).ok()?;
            return Some(DeviceIdentity::Loop {
                backing_file: PathBuf::from(back),
                backing_dev: m.dev(),
                backing_ino: m.ino(),
                offset,
            });
        }
        if let Some(number) = read_trim(&d.join("partition")).and_then(|s| s.parse().ok()) {
            // /sys/class/block/sda1 -> ../../devices/.../sda/sda1: the parent is the disk.
            let real = fs::canonicalize(&d).ok()?;
            let parent = real.parent()?.file_name()?.to_string_lossy().into_owned();
            let start = read_trim(&d.join("start"))
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Some(DeviceIdentity::Partition {
                parent: Box::new(self.identity(&parent)?),
                number,
                start,
            });
        }
        if let Some(uuid) = read_trim(&d.join("dm/uuid")) {
            return Some(DeviceIdentity::DmUuid { uuid });
        }
        if let Some(wwid) = read_trim(&d.join("wwid")).or_else(|| read_trim(&d.join("device/wwid")))
        {
            return Some(DeviceIdentity::Wwid { wwid });
        }
        let (eui, nguid, uuid) = (
            nonzero_id(read_trim(&d.join("eui"))),
            nonzero_id(read_trim(&d.join("nguid"))),
            nonzero_id(read_trim(&d.join("uuid"))),
        );
        if eui.is_some() || nguid.is_some() || uuid.is_some() {
            return Some(DeviceIdentity::Nvme {
                eui: eui.unwrap_or_default(),
                nguid: nguid.unwrap_or_default(),
                uuid: uuid.unwrap_or_default(),
            });
        }
        let serial = read_trim(&d.join("serial")).or_else(|| read_trim(&d.join("device/serial")));
        if let Some(serial) = serial {
            return Some(DeviceIdentity::Serial {
                serial,
                model: read_trim(&d.join("device/model")).unwrap_or_default(),
                nsid: read_trim(&d.join("nsid"))
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            });
        }
        None
    }

    /// The block device named `name` as it is now (None if it does not exist).
    pub fn block_dev(&self, name: &str) -> Option<BlockDev> {
        let d = self.class(name);
        let dev = read_trim(&d.join("dev"))?;
        let (ma, mi) = dev.split_once(':')?;
        let devnum = libc::makedev(ma.parse().ok()?, mi.parse().ok()?);
        let sectors: u64 = read_trim(&d.join("size"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Some(BlockDev {
            name: name.to_owned(),
            devnode: PathBuf::from("/dev").join(name),
            devnum,
            size_bytes: sectors.saturating_mul(512),
            diskseq: read_trim(&d.join("diskseq")).and_then(|s| s.parse().ok()),
            identity: if sectors == 0 {
                None
            } else {
                self.identity(name)
            },
        })
    }

    /// Every block device now present.
    pub fn block_devs(&self) -> io::Result<Vec<BlockDev>> {
        let mut out = Vec::new();
        for e in fs::read_dir(self.root.join("class/block"))? {
            let e = e?;
            if let Some(b) = self.block_dev(&e.file_name().to_string_lossy()) {
                out.push(b);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The identity of the block device at `path` (a node or a symlink to one).
    pub fn identity_of_path(&self, path: &Path) -> Option<DeviceIdentity> {
        self.identity(&self.name_of_path(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: /sys/class/block/<name>/... files.
    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Tree {
            Tree(tempfile::tempdir().unwrap())
        }
        fn sys(&self) -> Sysfs {
            Sysfs::new(self.0.path())
        }
        fn put(&self, name: &str, file: &str, text: &str) {
            let p = self.0.path().join("class/block").join(name).join(file);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        fn disk(&self, name: &str, dev: &str, sectors: u64) {
            self.put(name, "dev", &format!("{dev}\n"));
            self.put(name, "size", &format!("{sectors}\n"));
        }
    }

    #[test]
    fn loop_identity_is_the_backing_inode_and_offset_not_the_name() {
        let t = Tree::new();
        let back = t.0.path().join("backing.img");
        fs::write(&back, b"x").unwrap();
        let m = fs::metadata(&back).unwrap();
        for (name, dev) in [("loop3", "7:3"), ("loop7", "7:7")] {
            t.disk(name, dev, 8192);
            t.put(name, "loop/backing_file", &format!("{}\n", back.display()));
            t.put(name, "loop/offset", "0\n");
        }
        let a = t.sys().identity("loop3").unwrap();
        assert_eq!(
            a,
            DeviceIdentity::Loop {
                backing_file: back.clone(),
                backing_dev: m.dev(),
                backing_ino: m.ino(),
                offset: 0,
            }
        );
        // The same file behind another loop device: the same device.
        assert!(a.same_device(&t.sys().identity("loop7").unwrap()));
        // Another offset: another device.
        t.put("loop7", "loop/offset", "1048576\n");
        assert!(!a.same_device(&t.sys().identity("loop7").unwrap()));
        // Another file at the same name: another device.
        let other = t.0.path().join("other.img");
        fs::write(&other, b"y").unwrap();
        t.put(
            "loop3",
            "loop/backing_file",
            &format!("{}\n", other.display()),
        );
        assert!(!a.same_device(&t.sys().identity("loop3").unwrap()));
        // A renamed backing file is still the same device.
        let renamed = t.0.path().join("renamed.img");
        fs::rename(&back, &renamed).unwrap();
        t.put("loop7", "loop/offset", "0\n");
        t.put(
            "loop7",
            "loop/backing_file",
            &format!("{}\n", renamed.display()),
        );
        assert!(a.same_device(&t.sys().identity("loop7").unwrap()));
    }

    #[test]
    fn a_loop_device_without_medium_has_no_identity() {
        let t = Tree::new();
        t.disk("loop1", "7:1", 0);
        let b = t.sys().block_dev("loop1").unwrap();
        assert_eq!((b.size_bytes, b.identity), (0, None));
        assert_eq!(b.devnum, libc::makedev(7, 1));
        assert_eq!(b.devnode, PathBuf::from("/dev/loop1"));
    }

    #[test]
    fn nvme_uses_wwid_then_namespace_ids_then_serial() {
        let t = Tree::new();
        t.disk("nvme0n1", "259:0", 1 << 21);
        t.put("nvme0n1", "serial", "");
        t.put("nvme0n1", "device/serial", "S64ANS0T123456  \n");
        t.put("nvme0n1", "device/model", "Samsung SSD 980 1TB\n");
        t.put("nvme0n1", "nsid", "1\n");
        assert_eq!(
            t.sys().identity("nvme0n1").unwrap(),
            DeviceIdentity::Serial {
                serial: "S64ANS0T123456".into(),
                model: "Samsung SSD 980 1TB".into(),
                nsid: 1
            }
        );
        t.put("nvme0n1", "eui", "00 00 00 00 00 00 00 00\n");
        t.put("nvme0n1", "nguid", "0025388b-91b4-e3a1-0000-000000000000\n");
        assert_eq!(
            t.sys().identity("nvme0n1").unwrap(),
            DeviceIdentity::Nvme {
                eui: String::new(),
                nguid: "0025388b-91b4-e3a1-0000-000000000000".into(),
                uuid: String::new()
            }
        );
        t.put("nvme0n1", "wwid", "eui.0025388b91b4e3a1\n");
        assert_eq!(
            t.sys().identity("nvme0n1").unwrap(),
            DeviceIdentity::Wwid {
                wwid: "eui.0025388b91b4e3a1".into()
            }
        );
    }

    #[test]
    fn scsi_wwid_and_no_identity() {
        let t = Tree::new();
        t.disk("sda", "8:0", 1000);
        assert_eq!(t.sys().identity("sda"), None);
        t.put("sda", "device/wwid", "naa.5000c500a1b2c3d4\n");
        assert_eq!(
            t.sys().identity("sda").unwrap(),
            DeviceIdentity::Wwid {
                wwid: "naa.5000c500a1b2c3d4".into()
            }
        );
        assert!(t.sys().block_dev("sdb").is_none());
    }

    #[test]
    fn a_partition_is_its_disk_number_and_start() {
        let t = Tree::new();
        // sysfs nests partitions under their disk; class/block links to both.
        let devs = t.0.path().join("devices/virtual/block/vdb");
        fs::create_dir_all(devs.join("vdb1")).unwrap();
        fs::write(devs.join("serial"), "DISK-1\n").unwrap();
        fs::write(devs.join("vdb1/partition"), "1\n").unwrap();
        fs::write(devs.join("vdb1/start"), "2048\n").unwrap();
        let class = t.0.path().join("class/block");
        fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(&devs, class.join("vdb")).unwrap();
        std::os::unix::fs::symlink(devs.join("vdb1"), class.join("vdb1")).unwrap();
        let id = t.sys().identity("vdb1").unwrap();
        let disk = DeviceIdentity::Serial {
            serial: "DISK-1".into(),
            model: String::new(),
            nsid: 0,
        };
        assert_eq!(
            id,
            DeviceIdentity::Partition {
                parent: Box::new(disk.clone()),
                number: 1,
                start: 2048
            }
        );
        assert!(!id.same_device(&disk));
        fs::write(devs.join("vdb1/start"), "4096\n").unwrap();
        assert!(!id.same_device(&t.sys().identity("vdb1").unwrap()));
    }

    #[test]
    fn identity_round_trips_through_json() {
        let id = DeviceIdentity::Loop {
            backing_file: "/srv/disk.img".into(),
            backing_dev: 2049,
            backing_ino: 12,
            offset: 0,
        };
        let j = serde_json::to_string(&id).unwrap();
        assert!(j.contains("\"kind\":\"loop\""), "{j}");
        assert_eq!(serde_json::from_str::<DeviceIdentity>(&j).unwrap(), id);
    }
}
