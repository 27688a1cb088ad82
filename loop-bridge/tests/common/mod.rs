//! Shared helpers of the privileged tests.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

use loop_bridge::{bound_loop_devices, BackingId, LoopStatus};

pub use loop_bridge::testing::privileged_test_lock as lock;

/// A sparse file of `size` bytes in `dir`.
pub fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    File::create(&path).unwrap().set_len(size).unwrap();
    path
}

/// Bound loop devices whose backing is `path` (by identity, not name).
pub fn loops_over(path: &Path) -> Vec<LoopStatus> {
    let id = BackingId::of_path(path).unwrap();
    bound_loop_devices()
        .unwrap()
        .into_iter()
        .filter(|s| s.backing == id)
        .collect()
}

/// Bound loop devices with exactly this label.
pub fn loops_labelled(label: &str) -> Vec<LoopStatus> {
    bound_loop_devices()
        .unwrap()
        .into_iter()
        .filter(|s| s.label == label)
        .collect()
}

/// The status of loop device `number`, if it is bound.
pub fn status(number: u32) -> Option<LoopStatus> {
    bound_loop_devices()
        .unwrap()
        .into_iter()
        .find(|s| s.number == number)
}

/// A label unique to this process and call site.
pub fn unique_label(what: &str) -> String {
    format!("vmblk-test:{}:{what}", std::process::id())
}
