//! Bridges: labels, refusal of a second bridge, stale bridges of killed processes. Needs root.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use loop_bridge::{
    cleanup_stale_bridges_where, list_bridges, AttachOptions, Bridge, BridgeInfo, Error,
    LoopDevice, Owner, OwnerState,
};

const MIB: u64 = 1 << 20;
const CHILD_VOLUME: &str = "VMBLK_TEST_CHILD_VOLUME";
const CHILD_TAG: &str = "VMBLK_TEST_CHILD_TAG";
const CHILD_AUTOCLEAR: &str = "VMBLK_TEST_CHILD_AUTOCLEAR";

fn bridges_tagged(tag: &str) -> Vec<BridgeInfo> {
    list_bridges()
        .unwrap()
        .into_iter()
        .filter(|b| b.tag == tag)
        .collect()
}

fn unique_tag(what: &str) -> String {
    format!("t{}-{what}", std::process::id())
}

/// Not a test: the body of the child process that [`spawn_bridge_holder`] starts. It opens a
/// bridge, reports it and waits to be killed.
#[test]
#[ignore = "helper process for the stale-bridge tests, started by them"]
fn child_holds_a_bridge_until_killed() {
    let (Some(volume), Some(tag)) = (
        std::env::var_os(CHILD_VOLUME),
        std::env::var(CHILD_TAG).ok(),
    ) else {
        return;
    };
    let autoclear = std::env::var(CHILD_AUTOCLEAR).is_ok_and(|v| v == "1");
    let bridge = Bridge::open_with(
        Path::new(&volume),
        &tag,
        &AttachOptions {
            autoclear,
            ..AttachOptions::default()
        },
    )
    .unwrap();
    println!("READY {}", bridge.path().display());
    // Bounded, in case the parent dies without killing us.
    std::thread::sleep(Duration::from_secs(60));
}

/// Re-runs this test binary as a child holding a bridge over `volume`; returns it once the
/// bridge exists, with the bridge's device path.
fn spawn_bridge_holder(volume: &Path, tag: &str, autoclear: bool) -> (Child, PathBuf) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holds_a_bridge_until_killed",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VOLUME, volume)
        .env(CHILD_TAG, tag)
        .env(CHILD_AUTOCLEAR, if autoclear { "1" } else { "0" })
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        // libtest may print "test <name> ... " on the same line first.
        if let Some((_, path)) = line.split_once("READY ") {
            return (child, PathBuf::from(path.trim()));
        }
    }
    let status = child.wait().unwrap();
    panic!("child exited without opening a bridge: {status}");
}

fn kill(mut child: Child) {
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
}

/// Removes what a failed test may leave: stale bridges with this tag only.
struct CleanupTag(String);

impl Drop for CleanupTag {
    fn drop(&mut self) {
        let tag = self.0.clone();
        let _ = cleanup_stale_bridges_where(|b| b.tag == tag);
    }
}

#[test]
fn bridge_is_listed_with_owner_tag_and_backing() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let vol = common::sparse_file(dir.path(), "vol.img", 16 * MIB);
    let tag = unique_tag("listed");
    let bridge = Bridge::open(&vol, 512, &tag).unwrap();
    assert_eq!(bridge.device().logical_block_size(), 512);
    let found = bridges_tagged(&tag);
    assert_eq!(found.len(), 1, "{found:?}");
    let b = &found[0];
    assert_eq!(b.device.number, bridge.device().number());
    assert_eq!(b.owner, Owner::current().unwrap());
    assert_eq!(b.owner_state(), OwnerState::Running);
    assert!(
        b.device.label.starts_with("vmblk-bridge:"),
        "{}",
        b.device.label
    );
    // The kernel reports the real backing in sysfs, whatever lo_file_name says.
    assert_eq!(b.device.backing_file.as_deref(), Some(vol.as_path()));
    bridge.close().unwrap();
    assert!(bridges_tagged(&tag).is_empty());
}

#[test]
fn second_bridge_over_the_same_volume_is_refused_naming_the_first() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let file = common::sparse_file(dir.path(), "nvme.img", 16 * MIB);
    let nvme = LoopDevice::attach(
        &file,
        &AttachOptions {
            logical_block_size: 4096,
            ..AttachOptions::default()
        },
    )
    .unwrap();
    let tag = unique_tag("dup");
    let first = Bridge::open(nvme.path(), 512, &tag).unwrap();
    // Through another path to the same block device, and with another sector size.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(nvme.path(), &alias).unwrap();
    let err = Bridge::open(&alias, 1024, "other").unwrap_err();
    match &err {
        Error::AlreadyBridged { existing, .. } => assert_eq!(existing, first.path()),
        other => panic!("expected AlreadyBridged, got {other:?}"),
    }
    assert!(err.is_busy());
    assert!(
        err.to_string().contains(first.path().to_str().unwrap()),
        "{err}"
    );
    assert!(bridges_tagged("other").is_empty());
    // Bridges over other volumes are still allowed, and so is one after the first closes.
    first.close().unwrap();
    let again = Bridge::open(nvme.path(), 512, &tag).unwrap();
    again.close().unwrap();
    nvme.detach().unwrap();
}

#[test]
fn bridge_refuses_a_caller_label() {
    let dir = tempfile::tempdir().unwrap();
    let vol = common::sparse_file(dir.path(), "vol.img", MIB);
    let err = Bridge::open_with(
        &vol,
        "x",
        &AttachOptions {
            label: Some("mine".into()),
            ..AttachOptions::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidOptions { .. }), "{err:?}");
}

#[test]
fn stale_bridge_of_a_killed_process_is_cleaned_and_a_live_one_is_kept() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let dead_vol = common::sparse_file(dir.path(), "dead.img", 16 * MIB);
    let live_vol = common::sparse_file(dir.path(), "live.img", 16 * MIB);
    let plain_vol = common::sparse_file(dir.path(), "plain.img", 16 * MIB);
    let tag = unique_tag("stale");
    let _cleanup = CleanupTag(tag.clone());

    let (child, child_dev) = spawn_bridge_holder(&dead_vol, &tag, false);
    kill(child);
    let live = Bridge::open(&live_vol, 512, &tag).unwrap();
    // A loop device that only looks like a bridge to a careless parser.
    let plain = LoopDevice::attach(
        &plain_vol,
        &AttachOptions {
            label: Some(format!("vmblk-bridge:{tag}")),
            ..AttachOptions::default()
        },
    )
    .unwrap();

    let before = bridges_tagged(&tag);
    assert_eq!(before.len(), 2, "{before:?}");
    let stale: Vec<_> = before
        .iter()
        .filter(|b| b.owner_state() == OwnerState::Dead)
        .collect();
    assert_eq!(stale.len(), 1);
    assert_eq!(stale[0].device.path, child_dev);
    assert_eq!(
        stale[0].device.backing_file.as_deref(),
        Some(dead_vol.as_path())
    );

    // The dead owner's bridge also blocks a new bridge over its volume until cleaned.
    let err = Bridge::open(&dead_vol, 512, "again").unwrap_err();
    assert!(err.to_string().contains("dead"), "{err}");

    let cleaned = cleanup_stale_bridges_where(|b| b.tag == tag).unwrap();
    assert_eq!(cleaned.len(), 1, "{cleaned:?}");
    assert_eq!(cleaned[0].device.path, child_dev);
    assert!(common::loops_over(&dead_vol).is_empty());

    let after = bridges_tagged(&tag);
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].device.number, live.device().number());
    assert_eq!(
        common::loops_over(&plain_vol).len(),
        1,
        "non-bridge untouched"
    );

    let reopened = Bridge::open(&dead_vol, 512, &tag).unwrap();
    reopened.close().unwrap();
    live.close().unwrap();
    plain.detach().unwrap();
}

#[test]
fn autoclear_bridge_of_a_killed_process_goes_away_by_itself() {
    let _lock = common::lock();
    let dir = tempfile::tempdir().unwrap();
    let vol = common::sparse_file(dir.path(), "auto.img", 16 * MIB);
    let tag = unique_tag("autoclear");
    let _cleanup = CleanupTag(tag.clone());
    let (child, _dev) = spawn_bridge_holder(&vol, &tag, true);
    assert_eq!(bridges_tagged(&tag).len(), 1);
    kill(child);
    // The kernel unbinds it when the killed process's descriptor is closed at exit.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !common::loops_over(&vol).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "autoclear bridge still bound"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(bridges_tagged(&tag).is_empty());
}
