//! scripts/setup.sh must never end with a tool missing: its check names each command or
//! file the demo and the tests use that cannot be found, and the package that brings it.
//! Shown by hiding one tool from PATH (a directory of links to everything else).

use std::path::{Path, PathBuf};
use std::process::Command;

fn setup_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup.sh")
}

/// A directory of symlinks to every program on the current PATH except `hidden`.
fn path_without(dir: &Path, hidden: &[&str]) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let link = dir.join(&name);
            if hidden.iter().any(|h| name == *h) || link.exists() {
                continue;
            }
            let _ = std::os::unix::fs::symlink(e.path(), &link);
        }
    }
    dir.display().to_string()
}

fn check(path: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg(setup_script())
        .arg("--check")
        .env("PATH", path)
        .output()
        .expect("running scripts/setup.sh --check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_setup_check_passes_with_every_tool_on_path() {
    let (ok, err) = check(&std::env::var("PATH").unwrap_or_default());
    assert!(ok, "setup.sh --check failed on this machine:\n{err}");
}

#[test]
fn the_setup_check_names_a_tool_hidden_from_path_and_its_package() {
    for (tool, package) in [
        ("qemu-img", "qemu-utils"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("sgdisk", "gdisk"),
        ("mcopy", "mtools"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = path_without(dir.path(), &[tool]);
        let (ok, err) = check(&path);
        assert!(!ok, "the check passed without {tool}");
        assert!(
            err.contains(&format!("missing: {tool} (package {package})")),
            "{tool}: {err}"
        );
        // Only the hidden tool is named.
        assert_eq!(err.matches("missing:").count(), 1, "{err}");
    }
}
