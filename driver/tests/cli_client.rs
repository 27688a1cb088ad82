//! The `vmblk` client commands against a real vmblkd: pools, volumes and the
//! image-import hook, as a person or an Incus hook script would run them.

mod common;

use std::process::Command;

use common::{images, vmblk_bin, Daemon, DaemonOpts};

/// Runs `vmblk ARGS --socket SOCK --json`; returns (exit code, JSON, all output).
fn vmblk(d: &Daemon, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(vmblk_bin())
        .args(args)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--json")
        .output()
        .expect("running vmblk");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, text)
}

#[test]
fn client_commands_drive_pools_volumes_and_the_import_hook() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), DaemonOpts::default());
    let img = images();

    let (code, pools, out) = vmblk(&d, &["pool", "list"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("default"),
        "embedded default pool missing: {pools}"
    );

    let unified = img.unified.to_str().unwrap();
    let fp = "0123456789abcdef0123456789abcdef";
    let (code, first, out) = vmblk(&d, &["hook", "image-import", unified, "--fingerprint", fp]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(first["unpacked"], true, "{out}");
    let (code, again, out) = vmblk(&d, &["hook", "image-import", unified, "--fingerprint", fp]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        again["unpacked"], false,
        "a repeat import unpacked again: {out}"
    );

    let (code, _, out) = vmblk(
        &d,
        &[
            "volume",
            "create",
            "vm1",
            "--fingerprint",
            fp,
            "--size",
            "256M",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let (code, _, out) = vmblk(&d, &["volume", "list"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("vm1"), "vm1 not listed: {out}");

    let (code, _, out) = vmblk(&d, &["volume", "create", "../escape", "--size", "1M"]);
    assert_ne!(code, 0, "a bad name was accepted: {out}");
    assert!(
        out.contains("escape"),
        "the error does not name the bad name: {out}"
    );

    let (code, _, out) = vmblk(&d, &["volume", "delete", "vm1"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, out) = vmblk(&d, &["volume", "delete", "vm1"]);
    assert_eq!(code, 0, "deleting a missing volume must succeed: {out}");
    let (_, _, out) = vmblk(&d, &["volume", "list"]);
    assert!(!out.contains("\"vm1\""), "vm1 still listed: {out}");
}
