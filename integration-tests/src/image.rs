//! The bootable test image: a GPT disk built for 512-byte sectors with
//!
//! ```text
//!  LBA 0      1-33        2048            83968              215040        231424     end
//!  | PMBR | GPT+entries | ESP (FAT, 40 MiB) | root (ext4, 64 MiB) | scratch (8 MiB) | .. | backup GPT |
//!                          systemd-boot        /vmblk/manifest       raw I/O area
//!                          kernel, initramfs   /vmblk/files/*
//! ```
//!
//! The ESP holds systemd-boot as `/EFI/BOOT/BOOTX64.EFI`, a loader entry naming the
//! partitions by fixed PARTUUIDs, the guest kernel and the initramfs. Built without
//! mounting anything (sgdisk, mkfs.vfat + mtools, mkfs.ext4 -d), cached by the hash of
//! its inputs under `target/vmblk-guest/images/`, as raw and as qcow2.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::initramfs::{build_initramfs, Initramfs};
use crate::kernel::{guest_kernel, GuestKernel};
use crate::lock::FileLock;
use crate::util::{cache_dir, hex, run, sha256_file, sha256_hex};

/// systemd-boot's EFI binary on the host.
pub const SYSTEMD_BOOT_EFI: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// Bump when the layout or contents change in a way the input hash does not see.
const BUILDER_VERSION: u32 = 1;

/// Sector size the image is built for.
pub const IMAGE_SECTOR_SIZE: u64 = 512;
/// Total size of the raw image.
pub const IMAGE_BYTES: u64 = 128 << 20;
/// Disk GUID of the image's GPT.
pub const DISK_GUID: &str = "6d626c6b-0000-4e53-8000-000000000000";

/// One partition of the test image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionSpec {
    /// 1-based partition number.
    pub number: u32,
    /// GPT unique partition GUID (the PARTUUID), lower case.
    pub partuuid: &'static str,
    /// sgdisk type code.
    pub type_code: &'static str,
    /// GPT partition name.
    pub name: &'static str,
    /// First 512-byte LBA.
    pub start_lba: u64,
    /// Size in bytes.
    pub size_bytes: u64,
}

impl PartitionSpec {
    /// Byte offset of the partition in the image.
    pub fn offset(&self) -> u64 {
        self.start_lba * IMAGE_SECTOR_SIZE
    }

    /// Last LBA (inclusive).
    pub fn end_lba(&self) -> u64 {
        self.start_lba + self.size_bytes / IMAGE_SECTOR_SIZE - 1
    }
}

/// The EFI system partition.
pub const ESP: PartitionSpec = PartitionSpec {
    number: 1,
    partuuid: "6d626c6b-0001-4e53-8000-000000000001",
    type_code: "ef00",
    name: "vmblk-esp",
    start_lba: 2048,
    size_bytes: 40 << 20,
};

/// The ext4 root partition.
pub const ROOT: PartitionSpec = PartitionSpec {
    number: 2,
    partuuid: "6d626c6b-0002-4e53-8000-000000000002",
    type_code: "8300",
    name: "vmblk-root",
    start_lba: 2048 + (40 << 11),
    size_bytes: 64 << 20,
};

/// A raw partition the guest writes patterns to.
pub const SCRATCH: PartitionSpec = PartitionSpec {
    number: 3,
    partuuid: "6d626c6b-0003-4e53-8000-000000000003",
    type_code: "8300",
    name: "vmblk-scratch",
    start_lba: 2048 + (104 << 11),
    size_bytes: 8 << 20,
};

/// All partitions, in order.
pub const PARTITIONS: [PartitionSpec; 3] = [ESP, ROOT, SCRATCH];

/// What the guest does after its checks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BootMode {
    /// Run the checks once and power off.
    #[default]
    PowerOff,
    /// Run the checks, reboot, run them again, power off.
    RebootOnce,
}

/// A file added to the root file system (and to its manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Path relative to the root of the file system, e.g. `vmblk/checks.d/io.sh`.
    pub path: String,
    /// Contents.
    pub contents: Vec<u8>,
    /// Permission bits.
    pub mode: u32,
}

impl GuestFile {
    /// A script run by the guest's `/init` after the built-in checks; exit code 0 passes.
    /// It sees `DISK`, `ROOTDEV`, `SCRATCHDEV`, `ROOT` and `BOOT` in its environment.
    pub fn check_script(name: &str, script: &str) -> Self {
        Self {
            path: format!("vmblk/checks.d/{name}.sh"),
            contents: script.as_bytes().to_vec(),
            mode: 0o755,
        }
    }
}

/// What to put in a test image. `Default` is the standard image.
#[derive(Debug, Clone, Default)]
pub struct ImageSpec {
    /// Power off after the checks, or reboot once first.
    pub boot_mode: BootMode,
    /// Extra files on the root fs (also listed in the manifest).
    pub extra_files: Vec<GuestFile>,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
}

/// A built image.
#[derive(Debug, Clone)]
pub struct TestImage {
    /// The raw image (512-byte sectors).
    pub raw: PathBuf,
    /// The same image as qcow2.
    pub qcow2: PathBuf,
    /// Size of the raw image in bytes.
    pub size_bytes: u64,
    /// The kernel command line in the loader entry.
    pub cmdline: String,
    /// Input hash naming the cache entry.
    pub hash: String,
    /// Files on the root fs with their SHA-256 (the manifest).
    pub manifest: Vec<(String, String)>,
    /// The guest kernel in it.
    pub kernel: GuestKernel,
}

impl ImageSpec {
    /// Builds the image, or returns the cached one with the same inputs.
    pub fn build(&self) -> Result<TestImage> {
        let kernel = guest_kernel()?;
        let initramfs = build_initramfs(&kernel)?;
        let cmdline = self.cmdline();
        let files = self.root_files();
        let manifest: Vec<(String, String)> = files
            .iter()
            .map(|f| (f.path.clone(), sha256_hex(&f.contents)))
            .collect();

        let mut h = Sha256::new();
        h.update(format!(
            "v{BUILDER_VERSION}\n{}\n{cmdline}\n",
            kernel.package
        ));
        h.update(&initramfs.hash);
        h.update(sha256_file(Path::new(SYSTEMD_BOOT_EFI))?);
        h.update(format!("{:?}{:?}", self.boot_mode, PARTITIONS));
        for (p, s) in &manifest {
            h.update(format!("{p}\0{s}\n"));
        }
        for f in &files {
            h.update(format!("{}:{:o}\n", f.path, f.mode));
        }
        let hash = hex(&h.finalize());

        let images = cache_dir()?.join("images");
        std::fs::create_dir_all(&images)?;
        let dir = images.join(&hash[..16]);
        let image = TestImage {
            raw: dir.join("disk.raw"),
            qcow2: dir.join("disk.qcow2"),
            size_bytes: IMAGE_BYTES,
            cmdline,
            hash: hash.clone(),
            manifest,
            kernel: kernel.clone(),
        };
        let _lock = FileLock::exclusive(&images.join(".lock"))?;
        if !dir.join(".complete").exists() {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            self.assemble(&image, &kernel, &initramfs, &files, &dir)
                .with_context(|| format!("building test image in {}", dir.display()))?;
            std::fs::write(dir.join(".complete"), &hash)?;
            tracing::info!(dir = %dir.display(), "test image built");
        }
        Ok(image)
    }

    fn cmdline(&self) -> String {
        let mut c = format!(
            "console=ttyS0,115200 loglevel=4 panic=-1 vmblk.root=PARTUUID={} vmblk.esp=PARTUUID={} vmblk.scratch=PARTUUID={}",
            ROOT.partuuid, ESP.partuuid, SCRATCH.partuuid
        );
        if !self.extra_cmdline.is_empty() {
            c.push(' ');
            c.push_str(&self.extra_cmdline);
        }
        c
    }

    /// Known files plus the test's extra files.
    fn root_files(&self) -> Vec<GuestFile> {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..(1 << 20))
            .map(|_| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                (rng >> 24) as u8
            })
            .collect();
        let odd: Vec<u8> = (0..12345u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut files = vec![
            GuestFile {
                path: "vmblk/files/hello.txt".into(),
                contents: b"vmblk test image: 512-byte sectors\n".to_vec(),
                mode: 0o644,
            },
            GuestFile {
                path: "vmblk/files/random-1m.bin".into(),
                contents: random,
                mode: 0o644,
            },
            GuestFile {
                path: "vmblk/files/odd-12345.bin".into(),
                contents: odd,
                mode: 0o644,
            },
        ];
        files.extend(self.extra_files.iter().cloned());
        files
    }

    fn assemble(
        &self,
        image: &TestImage,
        kernel: &GuestKernel,
        initramfs: &Initramfs,
        files: &[GuestFile],
        dir: &Path,
    ) -> Result<()> {
        let work = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(dir)
            .context("creating build directory")?;
        let raw = std::fs::File::create(&image.raw)?;
        raw.set_len(IMAGE_BYTES)?;
        drop(raw);

        let mut sg = Command::new("sgdisk");
        sg.arg("-o").arg(format!("--disk-guid={DISK_GUID}"));
        for p in PARTITIONS {
            sg.arg(format!(
                "--new={}:{}:{}",
                p.number,
                p.start_lba,
                p.end_lba()
            ))
            .arg(format!("--typecode={}:{}", p.number, p.type_code))
            .arg(format!("--change-name={}:{}", p.number, p.name))
            .arg(format!("--partition-guid={}:{}", p.number, p.partuuid));
        }
        run(sg.arg(&image.raw)).context("partitioning")?;

        // ESP.
        let esp = work.path().join("esp.img");
        run(Command::new("mkfs.vfat")
            .args(["-F", "32", "-n", "VMBLK-ESP", "-i", "6d626c6b", "-C"])
            .arg(&esp)
            .arg((ESP.size_bytes / 1024).to_string()))?;
        let loader = work.path().join("loader.conf");
        std::fs::write(&loader, "timeout 0\ndefault vmblk.conf\neditor no\n")?;
        let entry = work.path().join("vmblk.conf");
        std::fs::write(
            &entry,
            format!(
                "title vmblk test guest\nlinux /vmblk/vmlinuz\ninitrd /vmblk/initrd.img\noptions {}\n",
                image.cmdline
            ),
        )?;
        let mtools = |args: &[&str]| -> Result<()> {
            run(Command::new(args[0])
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&esp)
                .args(&args[1..]))
            .map(|_| ())
        };
        mtools(&[
            "mmd",
            "::/EFI",
            "::/EFI/BOOT",
            "::/loader",
            "::/loader/entries",
            "::/vmblk",
        ])?;
        let copies: [(&Path, &str); 5] = [
            (Path::new(SYSTEMD_BOOT_EFI), "::/EFI/BOOT/BOOTX64.EFI"),
            (&loader, "::/loader/loader.conf"),
            (&entry, "::/loader/entries/vmblk.conf"),
            (&kernel.vmlinuz, "::/vmblk/vmlinuz"),
            (&initramfs.path, "::/vmblk/initrd.img"),
        ];
        for (src, dst) in copies {
            let src = src.to_str().context("non-UTF-8 path")?;
            mtools(&["mcopy", src, dst])?;
        }

        // Root fs.
        let stage = work.path().join("root");
        let mut manifest = String::new();
        for f in files {
            let p = stage.join(&f.path);
            std::fs::create_dir_all(p.parent().context("file without parent")?)?;
            std::fs::write(&p, &f.contents)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(f.mode))?;
            manifest.push_str(&format!("{} {}\n", sha256_hex(&f.contents), f.path));
        }
        std::fs::create_dir_all(stage.join("vmblk/checks.d"))?;
        std::fs::write(stage.join("vmblk/manifest"), manifest)?;
        let mode = match self.boot_mode {
            BootMode::PowerOff => "poweroff",
            BootMode::RebootOnce => "reboot-once",
        };
        std::fs::write(stage.join("vmblk/mode"), mode)?;
        let rootfs = work.path().join("root.img");
        std::fs::File::create(&rootfs)?.set_len(ROOT.size_bytes)?;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "vmblk-root", "-E", "root_owner=0:0", "-d"])
            .arg(&stage)
            .arg(&rootfs))?;

        copy_into(&esp, &image.raw, ESP.offset())?;
        copy_into(&rootfs, &image.raw, ROOT.offset())?;
        run(Command::new("sgdisk").arg("--verify").arg(&image.raw)).context("verifying GPT")?;
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&image.raw)
            .arg(&image.qcow2))?;
        Ok(())
    }
}

impl TestImage {
    /// The standard image (power off after one round of checks).
    pub fn standard() -> Result<Self> {
        ImageSpec::default().build()
    }
}

/// Writes the whole of `src` into `dst` at byte `offset`.
pub fn copy_into(src: &Path, dst: &Path, offset: u64) -> Result<()> {
    let mut s = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
    let mut d = std::fs::OpenOptions::new()
        .write(true)
        .open(dst)
        .with_context(|| format!("opening {}", dst.display()))?;
    d.seek(SeekFrom::Start(offset))?;
    std::io::copy(&mut s, &mut d)
        .with_context(|| format!("copying {} into {}", src.display(), dst.display()))?;
    d.flush()?;
    d.sync_all()?;
    Ok(())
}
