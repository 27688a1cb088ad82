//! The guest's initramfs: busybox-static with its applet links, `sgdisk`, `resizepart`
//! and e2fsprogs' `mke2fs`, `resize2fs`, `dumpe2fs` with the libraries they link, the kernel modules for virtio-pci, virtio-blk, ext4 and vfat
//! (resolved from the kernel's `modules.dep`), and `guest/init.sh` as `/init`. Written as a deterministic cpio (newc) archive, gzipped,
//! and cached under `target/vmblk-guest/initramfs/<content hash>.cpio.gz`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use crate::kernel::GuestKernel;
use crate::lock::FileLock;
use crate::util::{cache_dir, hex, run, write_atomic};

/// The guest's `/init`.
pub const INIT_SCRIPT: &str = include_str!("../guest/init.sh");

/// Path of the static busybox on the host.
pub const BUSYBOX: &str = "/bin/busybox";

/// Modules the guest needs, by name; their dependencies are added from `modules.dep`.
/// Built-in ones (in `modules.builtin`) are skipped.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    // Incus and LXD attach their own disks as virtio-scsi (the stock path's disk).
    "virtio_scsi",
    "sd_mod",
    "crc32c_generic",
    "ext4",
    "nls_cp437",
    "nls_iso8859-1",
    "nls_utf8",
    "nls_ascii",
    "vfat",
];

/// Dynamically linked programs the guest runs besides busybox, copied with the
/// libraries `ldd` names: what a guest uses to grow its own GPT, partition and
/// filesystem after an online grow (`gpt-grow`, `fs-grow` in guest/init.sh).
pub const GUEST_PROGRAMS: &[&str] = &[
    "/usr/sbin/sgdisk",
    "/usr/bin/resizepart",
    "/sbin/mke2fs",
    "/sbin/resize2fs",
    "/sbin/dumpe2fs",
];

/// The files of `programs` and of the libraries they link, by absolute path.
fn program_files(programs: &[&str]) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for p in programs {
        files.insert(
            p.to_string(),
            std::fs::read(p)
                .with_context(|| format!("reading {p} (packages gdisk, util-linux, e2fsprogs)"))?,
        );
        let out = run(Command::new("ldd").arg(p)).with_context(|| format!("ldd {p}"))?;
        // "libx.so.1 => /lib/x/libx.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        for lib in out
            .lines()
            .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        {
            let bytes = std::fs::read(lib).with_context(|| format!("reading {lib}"))?;
            files.insert(lib.to_owned(), bytes);
        }
    }
    Ok(files)
}

/// A built initramfs.
#[derive(Debug, Clone)]
pub struct Initramfs {
    /// The `.cpio.gz` file.
    pub path: PathBuf,
    /// Hash of its inputs (names the cache entry).
    pub hash: String,
    /// Module files in load order, relative to `lib/modules/<release>`.
    pub modules: Vec<String>,
}

/// Builds (or reuses) the initramfs for `kernel`.
pub fn build_initramfs(kernel: &GuestKernel) -> Result<Initramfs> {
    let modules = resolve_modules(&kernel.modules, GUEST_MODULES)?;
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
    let applets = busybox_applets()?;

    let mut archive = Cpio::default();
    let mut dirs = BTreeSet::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "mnt",
        "lib",
        "lib/modules",
    ] {
        archive.dir(d);
        dirs.insert(d.to_owned());
    }
    archive.char_dev("dev/console", 5, 1);
    archive.char_dev("dev/null", 1, 3);
    archive.file("bin/busybox", 0o755, &busybox);
    // The programs shipped whole replace busybox's applets of the same name (busybox's
    // mke2fs makes no ext4), wherever PATH would find the applet first.
    let shipped: BTreeSet<&str> = GUEST_PROGRAMS
        .iter()
        .filter_map(|p| Path::new(p).file_name().and_then(|n| n.to_str()))
        .collect();
    for a in &applets {
        let name = Path::new(a).file_name().and_then(|n| n.to_str());
        if a != "bin/busybox" && !name.is_some_and(|n| shipped.contains(n)) {
            archive.symlink(a, "/bin/busybox");
        }
    }
    for (path, bytes) in program_files(GUEST_PROGRAMS)? {
        let rel = path.trim_start_matches('/');
        let mut parent = Path::new(rel).parent();
        let mut chain = Vec::new();
        while let Some(d) = parent.filter(|d| !d.as_os_str().is_empty()) {
            chain.push(d.to_string_lossy().into_owned());
            parent = d.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) {
                archive.dir(&d);
            }
        }
        archive.file(rel, 0o755, &bytes);
    }
    let mut list = String::new();
    for m in &modules {
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("module path {m}"))?;
        let bytes =
            std::fs::read(kernel.modules.join(m)).with_context(|| format!("reading module {m}"))?;
        archive.file(&format!("lib/modules/{name}"), 0o644, &bytes);
        list.push_str(name);
        list.push('\n');
    }
    archive.file("etc/vmblk-modules", 0o644, list.as_bytes());
    archive.file("init", 0o755, INIT_SCRIPT.as_bytes());
    let cpio = archive.finish();
    let hash = hex(&Sha256::digest(&cpio));

    let dir = cache_dir()?.join("initramfs");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.cpio.gz", &hash[..16]));
    let _lock = FileLock::exclusive(&dir.join(".lock"))?;
    if !path.exists() {
        let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&cpio)?;
        write_atomic(&path, &gz.finish()?)?;
        tracing::info!(path = %path.display(), "initramfs built");
    }
    Ok(Initramfs {
        path,
        hash,
        modules,
    })
}

/// `busybox --list-full`: applet paths like `sbin/poweroff`.
fn busybox_applets() -> Result<Vec<String>> {
    let out = run(Command::new(BUSYBOX).arg("--list-full"))?;
    Ok(out
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Resolves `wanted` module names to module files in a valid load order (dependencies
/// first), from `modules.dep`; names found in `modules.builtin` are left out.
pub fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<String>> {
    let dep_text =
        std::fs::read_to_string(modules_dir.join("modules.dep")).context("reading modules.dep")?;
    let builtin_text =
        std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let builtin: BTreeSet<String> = builtin_text.lines().map(module_name).collect();
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let d = rest.split_whitespace().map(str::to_owned).collect();
        deps.insert(module_name(file), (file.to_owned(), d));
    }

    fn visit(
        file: &str,
        deps: &BTreeMap<String, (String, Vec<String>)>,
        seen: &mut BTreeSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(file.to_owned()) {
            return;
        }
        if let Some((_, ds)) = deps.get(&module_name(file)) {
            for d in ds.iter().rev() {
                visit(d, deps, seen, order);
            }
        }
        order.push(file.to_owned());
    }

    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for w in wanted {
        let name = w.replace('-', "_");
        if let Some((file, _)) = deps.get(&name) {
            visit(&file.clone(), &deps, &mut seen, &mut order);
        } else if !builtin.contains(&name) {
            bail!("module {w} is neither in modules.dep nor built in");
        }
    }
    Ok(order)
}

/// A minimal writer of cpio "newc" archives with fixed metadata (mtime 0, root owner),
/// so equal inputs give equal bytes.
#[derive(Debug, Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data, (0, 0));
    }

    fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, 0o120777, target.as_bytes(), (0, 0));
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_normalise_dashes_and_suffixes() {
        assert_eq!(
            module_name("kernel/fs/nls/nls_iso8859-1.ko"),
            "nls_iso8859_1"
        );
        assert_eq!(
            module_name("kernel/crypto/crc32c_generic.ko.xz"),
            "crc32c_generic"
        );
    }

    #[test]
    fn resolve_orders_dependencies_first_and_skips_builtins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.dep"),
            "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n\
             kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/nls/nls_base.ko\n",
        )
        .unwrap();
        let order = resolve_modules(dir.path(), &["ext4", "nls_base"]).unwrap();
        assert_eq!(order.last().unwrap(), "kernel/fs/ext4/ext4.ko");
        assert_eq!(order.len(), 4);
        assert!(resolve_modules(dir.path(), &["missing"]).is_err());
    }

    #[test]
    fn cpio_is_newc_and_padded() {
        let mut c = Cpio::default();
        c.file("a", 0o644, b"xyz");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
