//! One conformance suite for every pool backend: each `check_*` takes a prepared,
//! empty backend and panics with what it found wrong. Unit tests run them on a `dir`
//! pool in a temporary directory; `driver/tests/pool_backends.rs` runs them on `block`
//! pools of real loop devices (512 and 4096-byte sectors), and on `dir` too.
//!
//! Where backends legitimately differ (a device cannot grow; a file pool clones), the
//! suite asks the backend what it claims (`holds_images`, `follows_devices`) and checks
//! that it does exactly that.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Backing, Cloned, PoolBackend};
use crate::error::Error;
use crate::model::VolumeId;

const MIB: u64 = 1 << 20;

fn id(name: &str) -> VolumeId {
    VolumeId::new("conformance", name)
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Places and creates a volume of `size`, fails the check if it cannot.
fn made(b: &dyn PoolBackend, name: &str, size: u64, taken: &[PathBuf]) -> Backing {
    let v = b
        .place(
            &id(name),
            "00000000-0000-4000-8000-000000000000",
            size,
            taken,
        )
        .unwrap_or_else(|e| panic!("placing {name} ({size} bytes): {}", e.chain()));
    assert!(v.size_bytes >= size, "placed {} < {size}", v.size_bytes);
    b.create(&v).unwrap();
    v
}

/// A volume is made, written through its target, committed, read back at its final
/// place at its full size, and discarded: afterwards nothing of it is readable there.
pub fn check_volume_lifecycle(b: &dyn PoolBackend) {
    let v = made(b, "life", 4 * MIB, &[]);
    write_at(v.target(), 0, b"conformance head");
    write_at(v.target(), v.size_bytes - 512, b"conformance tail");
    b.commit(&v).unwrap();
    let done = Backing {
        temp_path: None,
        ..v.clone()
    };
    assert!(
        v.temp_path.as_ref().is_none_or(|t| !t.exists()),
        "temporary file left"
    );
    assert_eq!(read_at(&done.path, 0, 16), b"conformance head");
    assert_eq!(
        read_at(&done.path, v.size_bytes - 512, 16),
        b"conformance tail"
    );
    let len = std::fs::metadata(&done.path).map(|m| m.len()).unwrap_or(0);
    if !b.follows_devices() {
        assert_eq!(len, v.size_bytes, "a file volume has its size");
    }
    assert!(b.allocated(&done.path, v.size_bytes).unwrap() > 0);
    b.discard(&done);
    if done.path.exists() {
        assert_eq!(
            read_at(&done.path, 0, 16),
            vec![0u8; 16],
            "a discarded device keeps its data"
        );
    }
}

/// A discarded half-made volume leaves nothing: its temporary file is removed and its
/// final place untouched.
pub fn check_discard_before_commit(b: &dyn PoolBackend) {
    let v = made(b, "half", MIB, &[]);
    write_at(v.target(), 0, b"half");
    b.discard(&v);
    if let Some(t) = &v.temp_path {
        assert!(!t.exists(), "temporary file left by discard");
        assert!(!v.path.exists(), "a final file appeared");
    }
}

/// Two volumes never share storage: with the first one's place taken, the second goes
/// elsewhere or the pool says, by name, that it has no room.
pub fn check_places_do_not_collide(b: &dyn PoolBackend) {
    let a = made(b, "a", MIB, &[]);
    let second = b.place(
        &id("b"),
        "11111111-0000-4000-8000-000000000000",
        MIB,
        std::slice::from_ref(&a.path),
    );
    match second {
        Ok(other) => assert_ne!(other.path, a.path, "two volumes placed on one storage"),
        Err(Error::NoSpace(m)) => assert!(m.contains("conformance"), "{m}"),
        Err(e) => panic!("placing a second volume: {}", e.chain()),
    }
    b.discard(&a);
}

/// Asking for more than any storage of the pool holds is `NoSpace`, not a partial
/// volume (pools of files take any size up to the quota the driver checks).
pub fn check_too_large_is_no_space(b: &dyn PoolBackend) {
    if !b.follows_devices() {
        return;
    }
    let r = b.place(
        &id("huge"),
        "22222222-0000-4000-8000-000000000000",
        1 << 50,
        &[],
    );
    assert!(matches!(r, Err(Error::NoSpace(_))), "{r:?}");
}

/// Cloning a cached image gives the image's bytes (reflinked or copied) where the
/// pool keeps images; elsewhere the pool says the image is to be unpacked instead.
pub fn check_clone_image(b: &dyn PoolBackend, scratch: &Path) {
    let image = scratch.join("conformance-image.raw");
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    let v = made(b, "clone", 2 * MIB, &[]);
    match b.clone_image(&image, &v).unwrap() {
        Cloned::Reflinked | Cloned::Copied => {
            assert!(b.holds_images(), "cloned into a pool that keeps no images");
            assert_eq!(read_at(v.target(), 0, data.len()), data);
        }
        Cloned::Unpack => assert!(!b.holds_images(), "a pool of images that does not clone"),
    }
    b.discard(&v);
    let _ = std::fs::remove_file(&image);
}

/// A volume grows where the pool can grow it (its new size readable); a device cannot,
/// and says so (`NoSpace`, naming the device) without changing anything.
pub fn check_grow(b: &dyn PoolBackend) {
    let v = made(b, "grow", MIB, &[]);
    b.commit(&v).unwrap();
    let done = Backing {
        temp_path: None,
        ..v.clone()
    };
    match b.grow(&done.path, v.size_bytes + 3 * MIB) {
        Ok(n) => {
            assert!(!b.follows_devices());
            assert_eq!(n, v.size_bytes + 3 * MIB);
            assert_eq!(std::fs::metadata(&done.path).unwrap().len(), n);
        }
        Err(Error::NoSpace(m)) => {
            assert!(b.follows_devices(), "a file pool refused to grow: {m}");
            assert!(m.contains(&done.path.display().to_string()), "{m}");
        }
        Err(e) => panic!("growing: {}", e.chain()),
    }
    b.discard(&done);
}

/// Space: a pool of devices has as much room as its free devices, less once one is
/// taken; a pool of files reports its file system's free bytes and its quota.
pub fn check_space(b: &dyn PoolBackend) {
    let before = b.space(&[]);
    assert!(before.available_bytes > 0, "{before:?}");
    if b.follows_devices() {
        assert_eq!(before.available_bytes, before.capacity_bytes, "{before:?}");
        let v = made(b, "space", MIB, &[]);
        let after = b.space(std::slice::from_ref(&v.path));
        assert_eq!(
            after.available_bytes + v.size_bytes,
            before.available_bytes,
            "{after:?}"
        );
        b.discard(&v);
    }
}

/// Identity: a pool that follows devices knows each device's stable identity (a loop
/// device: its backing inode); a pool of files has none.
pub fn check_identity(b: &dyn PoolBackend) {
    let v = made(b, "ident", MIB, &[]);
    let ident = b.identity(&v.path);
    assert_eq!(ident.is_some(), b.follows_devices(), "{ident:?}");
    b.discard(&v);
}

/// Every check, in turn.
pub fn check_all(b: &dyn PoolBackend, scratch: &Path) {
    check_volume_lifecycle(b);
    check_discard_before_commit(b);
    check_places_do_not_collide(b);
    check_too_large_is_no_space(b);
    check_clone_image(b, scratch);
    check_grow(b);
    check_space(b);
    check_identity(b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolKind;

    #[test]
    fn a_dir_pool_passes_the_conformance_suite() {
        let d = tempfile::tempdir().unwrap();
        let kind = PoolKind::Dir {
            path: d.path().join("pool"),
            capacity_bytes: 0,
        };
        std::fs::create_dir_all(d.path().join("pool")).unwrap();
        let b = super::super::backend(&kind);
        b.prepare().unwrap();
        check_all(b.as_ref(), d.path());
    }
}
