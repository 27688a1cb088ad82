//! One conformance suite for every pool backend: each `check_*` takes a prepared,
//! empty backend and panics with what it found wrong. Unit tests run them on a `dir`
//! pool in a temporary directory; `driver/tests/pool_backends.rs` runs them on `block`
//! pools of real loop devices (512 and 4096-byte sectors), on `dir` pools on ext4 and
//! xfs, and on an `rbd` pool of a real one-node Ceph cluster. Volumes are read and
//! written where they are: files and devices by path, RBD images through librbd.
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

/// The RBD image a volume address names, opened.
fn rbd_image(path: &Path, write: bool) -> Option<rbd::Image> {
    let spec = rbd::RbdSpec::parse(path.to_str()?).ok()?;
    let opts = rbd::ClusterOptions::from_spec(&spec);
    Some(rbd::open(&spec, &opts, !write).unwrap_or_else(|e| panic!("opening {spec}: {e}")))
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    if let Some(img) = rbd_image(path, true) {
        img.write_at(data, off).unwrap();
        img.flush().unwrap();
        return;
    }
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
}

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    if let Some(img) = rbd_image(path, false) {
        assert_eq!(img.read_at(&mut b, off).unwrap(), len);
        return b;
    }
    let f = std::fs::File::open(path).unwrap();
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Whether storage is there at `path` (a file, a device, an RBD image).
fn exists(path: &Path) -> bool {
    match path.to_str().and_then(|s| rbd::RbdSpec::parse(s).ok()) {
        Some(spec) => {
            let opts = rbd::ClusterOptions::from_spec(&spec);
            match rbd::open(&spec, &opts, true) {
                Ok(_) => true,
                Err(e) if e.is_not_found() => false,
                Err(e) => panic!("opening {spec}: {e}"),
            }
        }
        None => path.exists(),
    }
}

/// The size of the storage at `path`.
fn len(path: &Path) -> u64 {
    match rbd_image(path, false) {
        Some(img) => img.size().unwrap(),
        None => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    }
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
    if !b.follows_devices() {
        assert_eq!(
            len(&done.path),
            v.size_bytes,
            "a file or image volume has its size"
        );
    }
    assert!(b.allocated(&done.path, v.size_bytes).unwrap() > 0);
    b.discard(&done);
    if exists(&done.path) {
        assert!(b.follows_devices(), "a discarded volume is still there");
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
    if !b.follows_devices() {
        assert!(
            !exists(&v.path),
            "a discarded half-made volume is still there"
        );
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

/// A pool that keeps images makes a cached image of its own kind (placed, created,
/// written, committed) and clones it into a larger volume, which then holds the image's
/// bytes (reflinked or copied) and its own size; deleting the image leaves the clone
/// readable. A pool that keeps none says an image is to be unpacked instead.
pub fn check_clone_image(b: &dyn PoolBackend, scratch: &Path) {
    let data: Vec<u8> = (0..2 * MIB).map(|i| (i % 251) as u8).collect();
    if !b.holds_images() {
        let image = scratch.join("conformance-image.raw");
        std::fs::write(&image, &data).unwrap();
        let v = made(b, "clone", 2 * MIB, &[]);
        assert_eq!(b.clone_image(&image, &v).unwrap(), Cloned::Unpack);
        b.discard(&v);
        let _ = std::fs::remove_file(&image);
        return;
    }
    let img = b.image_place("c0ffee", 2 * MIB).unwrap();
    b.create(&img).unwrap();
    write_at(img.target(), 0, &data);
    b.image_commit(&img).unwrap();
    let img = Backing {
        temp_path: None,
        ..img
    };
    assert!(
        b.image_exists(&img).unwrap(),
        "a committed image is not found"
    );
    let v = made(b, "clone", 4 * MIB, &[]);
    let how = b.clone_image(&img.path, &v).unwrap();
    assert!(matches!(how, Cloned::Reflinked | Cloned::Copied), "{how:?}");
    assert_eq!(read_at(v.target(), 0, data.len()), data);
    b.commit(&v).unwrap();
    let done = Backing {
        temp_path: None,
        ..v.clone()
    };
    assert_eq!(len(&done.path), 4 * MIB, "the clone has the volume's size");
    b.image_discard(&img);
    assert_eq!(
        read_at(&done.path, 0, 4096),
        &data[..4096],
        "the clone outlives its image"
    );
    b.discard(&done);
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
            assert_eq!(len(&done.path), n);
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
/// taken; a pool of files reports its file system's free bytes and its quota; a shared
/// pool its cluster's.
pub fn check_space(b: &dyn PoolBackend) {
    let before = b.space(&[]);
    // A shared pool reports what its cluster's statistics say (Ceph: from ceph-mgr, which
    // a test cluster may lack: then zero, "not known").
    assert!(
        before.available_bytes > 0 || b.shared().is_some(),
        "{before:?}"
    );
    if b.shared().is_some() {
        assert!(
            before.available_bytes <= before.capacity_bytes,
            "{before:?}"
        );
    }
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
