//! The guest kernel: Debian's `linux-image-amd64`, downloaded with `apt-get download`
//! and unpacked with `dpkg-deb -x` into `target/vmblk-guest/kernel/<package>/`.
//! The host's own kernel is never booted.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::lock::FileLock;
use crate::util::{cache_dir, run};

/// Metapackage whose dependency names the kernel package to use.
pub const KERNEL_METAPACKAGE: &str = "linux-image-amd64";

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// Package name, e.g. `linux-image-6.1.0-56-amd64`.
    pub package: String,
    /// Kernel release, e.g. `6.1.0-56-amd64`.
    pub release: String,
    /// The `vmlinuz` image.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` with a `modules.dep` made by `depmod`.
    pub modules: PathBuf,
}

/// Returns the cached guest kernel, downloading and unpacking it on first use.
/// Safe to call from parallel test binaries (file lock).
pub fn guest_kernel() -> Result<GuestKernel> {
    let root = cache_dir()?.join("kernel");
    std::fs::create_dir_all(&root)?;
    let _lock = FileLock::exclusive(&root.join(".lock"))?;
    let package = match resolve_package() {
        Ok(p) => p,
        Err(e) => match newest_cached(&root)? {
            Some(p) => {
                tracing::warn!("cannot resolve {KERNEL_METAPACKAGE} ({e:#}); using cached {p}");
                p
            }
            None => return Err(e),
        },
    };
    let dir = root.join(&package);
    if !dir.join(".complete").exists() {
        fetch(&root, &package, &dir)?;
    }
    load(&package, &dir)
}

fn load(package: &str, dir: &Path) -> Result<GuestKernel> {
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("unexpected kernel package name {package}"))?
        .to_owned();
    let vmlinuz = dir.join("boot").join(format!("vmlinuz-{release}"));
    let modules = dir.join("lib/modules").join(&release);
    if !vmlinuz.is_file() || !modules.join("modules.dep").is_file() {
        bail!("kernel cache {} is incomplete", dir.display());
    }
    Ok(GuestKernel {
        package: package.to_owned(),
        release,
        vmlinuz,
        modules,
    })
}

/// `apt-cache depends linux-image-amd64` → `linux-image-6.1.0-NN-amd64`.
fn resolve_package() -> Result<String> {
    let find = || -> Result<Option<String>> {
        let out = run(Command::new("apt-cache")
            .args(["depends", KERNEL_METAPACKAGE])
            .env("LC_ALL", "C"))?;
        Ok(out.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends:")?.trim();
            (dep.starts_with("linux-image-") && dep.ends_with("-amd64")).then(|| dep.to_owned())
        }))
    };
    if let Ok(Some(p)) = find() {
        return Ok(p);
    }
    // A fresh machine may have no package lists yet.
    run(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (to resolve the guest kernel)")?;
    find()?.with_context(|| format!("apt-cache depends {KERNEL_METAPACKAGE}: no kernel package"))
}

fn newest_cached(root: &Path) -> Result<Option<String>> {
    let mut found: Vec<String> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(".complete").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    found.sort();
    Ok(found.pop())
}

fn fetch(root: &Path, package: &str, dir: &Path) -> Result<()> {
    tracing::info!(package, "downloading guest kernel");
    let dl = root.join(format!("{package}.download"));
    let _ = std::fs::remove_dir_all(&dl);
    std::fs::create_dir_all(&dl)?;
    run(Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&dl))
    .with_context(|| format!("apt-get download {package}"))?;
    let deb = std::fs::read_dir(&dl)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dl.display()))?;
    let tmp = root.join(format!("{package}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    let release = package.trim_start_matches("linux-image-");
    // The .deb ships no modules.dep: depmod makes it on install.
    run(Command::new("depmod").arg("-b").arg(&tmp).arg(release))
        .context("depmod on the unpacked kernel")?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir)?;
    std::fs::write(
        dir.join(".complete"),
        deb.file_name().unwrap_or_default().as_encoded_bytes(),
    )?;
    let _ = std::fs::remove_dir_all(&dl);
    Ok(())
}
