//! Snapshots, clones and what an image takes up: the image cache of an `rbd` pool
//! (import once, snapshot, protect, clone per volume) and its usage figures.

use std::ffi::CStr;
use std::ptr;
use std::sync::Arc;

use crate::cluster::IoCtx;
use crate::error::{check, cstring, RbdError};
use crate::ffi;
use crate::image::Image;

/// The features `rbd create` gives a new image by default (Pacific): layering,
/// exclusive-lock, object-map, fast-diff, deep-flatten.
pub const DEFAULT_FEATURES: u64 = (ffi::RBD_FEATURE_LAYERING
    | ffi::RBD_FEATURE_EXCLUSIVE_LOCK
    | ffi::RBD_FEATURE_OBJECT_MAP
    | ffi::RBD_FEATURE_FAST_DIFF
    | ffi::RBD_FEATURE_DEEP_FLATTEN) as u64;

/// A snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub name: String,
    /// The image's size when it was taken.
    pub size: u64,
}

impl Image {
    fn snap_call(
        &self,
        op: &'static str,
        name: &str,
        call: unsafe extern "C" fn(ffi::rbd_image_t, *const libc::c_char) -> libc::c_int,
    ) -> Result<(), RbdError> {
        let c_name = cstring(name, || format!("snapshot name {name:?}"))?;
        // SAFETY: the image is open; the name is NUL-terminated for the call; `call` is
        // one of librbd's snapshot functions taking exactly these arguments.
        let r = unsafe { call(self.handle(), c_name.as_ptr()) };
        check(i64::from(r), op, || format!("{}@{name}", self.path()))?;
        Ok(())
    }

    /// Copies the parent's data into this clone and detaches it from its parent (after
    /// which the parent's snapshot may go). Blocking; takes as long as the data.
    pub fn flatten(&self) -> Result<(), RbdError> {
        // SAFETY: the image is open (read-write for the call to succeed).
        let r = unsafe { ffi::rbd_flatten(self.handle()) };
        check(i64::from(r), "flatten RBD image", || self.path().to_owned())?;
        Ok(())
    }

    /// Takes snapshot `name` of the image as it is now.
    pub fn snap_create(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("create snapshot", name, ffi::rbd_snap_create)
    }

    /// Protects snapshot `name` (required before cloning it).
    pub fn snap_protect(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("protect snapshot", name, ffi::rbd_snap_protect)
    }

    /// Unprotects snapshot `name` (EBUSY while clones of it exist).
    pub fn snap_unprotect(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("unprotect snapshot", name, ffi::rbd_snap_unprotect)
    }

    /// Rolls the image back to snapshot `name` (its data and size).
    pub fn snap_rollback(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("roll back to snapshot", name, ffi::rbd_snap_rollback)
    }

    /// Removes snapshot `name`.
    pub fn snap_remove(&self, name: &str) -> Result<(), RbdError> {
        self.snap_call("remove snapshot", name, ffi::rbd_snap_remove)
    }

    /// The image's snapshots.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>, RbdError> {
        let mut max: libc::c_int = 16;
        loop {
            // SAFETY: rbd_snap_info_t is integers and a pointer: all-zero is valid.
            let mut snaps: Vec<ffi::rbd_snap_info_t> =
                (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            // SAFETY: the image is open; `snaps` has room for `max` entries, which librbd
            // fills (names it allocates, freed by rbd_snap_list_end).
            let r = unsafe { ffi::rbd_snap_list(self.handle(), snaps.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            let n = check(i64::from(r), "list the snapshots of RBD image", || {
                self.path().to_owned()
            })? as usize;
            let list = snaps[..n.min(snaps.len())]
                .iter()
                .map(|s| Snapshot {
                    // SAFETY: librbd set each listed name to a NUL-terminated string.
                    name: unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned(),
                    size: s.size,
                })
                .collect();
            // SAFETY: `snaps` was filled by rbd_snap_list; freed once.
            unsafe { ffi::rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(list);
        }
    }

    /// The clones of this image's snapshot (open it at that snapshot): their names,
    /// those in the trash included.
    pub fn children(&self) -> Result<Vec<String>, RbdError> {
        let mut max: usize = 16;
        loop {
            // SAFETY: rbd_linked_image_spec_t is integers, pointers and a bool: all-zero
            // is valid.
            let mut specs: Vec<ffi::rbd_linked_image_spec_t> =
                (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            // SAFETY: the image is open; `specs` has room for `max` entries, filled with
            // strings librbd allocates (freed by rbd_linked_image_spec_list_cleanup).
            let r = unsafe { ffi::rbd_list_children3(self.handle(), specs.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(i64::from(r), "list the clones of RBD image", || {
                self.path().to_owned()
            })?;
            let n = max.min(specs.len());
            let names = specs[..n]
                .iter()
                .filter(|s| !s.image_name.is_null())
                .map(|s| {
                    // SAFETY: librbd set the image names to NUL-terminated strings.
                    unsafe { CStr::from_ptr(s.image_name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: the first `n` entries came from rbd_list_children3; freed once.
            unsafe { ffi::rbd_linked_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// Bytes of the image's own objects that hold data (its parent's left out): whole
    /// objects, as `rbd du` counts with fast-diff.
    pub fn allocated_bytes(&self) -> Result<u64, RbdError> {
        unsafe extern "C" fn add(
            _offset: u64,
            len: usize,
            exists: libc::c_int,
            arg: *mut libc::c_void,
        ) -> libc::c_int {
            if exists != 0 {
                // SAFETY: `arg` is the `&mut u64` passed to rbd_diff_iterate2 below, alive
                // for the whole (synchronous) iteration.
                let total = unsafe { &mut *arg.cast::<u64>() };
                *total += len as u64;
            }
            0
        }
        let size = self.size()?;
        let mut total: u64 = 0;
        // SAFETY: the image is open; `add` matches the callback signature; `total` lives
        // across the call, which runs the callback before it returns.
        let r = unsafe {
            ffi::rbd_diff_iterate2(
                self.handle(),
                ptr::null(),
                0,
                size,
                0,
                1,
                Some(add),
                (&mut total as *mut u64).cast(),
            )
        };
        check(i64::from(r), "measure RBD image", || self.path().to_owned())?;
        Ok(total)
    }
}

impl IoCtx {
    /// Clones `parent@snapshot` (protected) of pool `parent_pool` into a new image
    /// `child` of this pool.
    pub fn clone_image(
        &self,
        parent_pool: &IoCtx,
        parent: &str,
        snapshot: &str,
        child: &str,
    ) -> Result<(), RbdError> {
        let p = cstring(parent, || format!("image name {parent:?}"))?;
        let s = cstring(snapshot, || format!("snapshot name {snapshot:?}"))?;
        let c = cstring(child, || format!("image name {child:?}"))?;
        let mut order: libc::c_int = 0;
        // SAFETY: both contexts are open; the names are NUL-terminated for the call;
        // `order` is a valid in/out pointer (0: the parent's object size).
        let r = unsafe {
            ffi::rbd_clone(
                parent_pool.handle,
                p.as_ptr(),
                s.as_ptr(),
                self.handle,
                c.as_ptr(),
                DEFAULT_FEATURES,
                &mut order,
            )
        };
        check(i64::from(r), "clone RBD image", || {
            format!("{parent}@{snapshot} to {child} in {}", self.describe())
        })?;
        Ok(())
    }

    /// The names of the pool's images (in this namespace).
    pub fn list_images(&self) -> Result<Vec<String>, RbdError> {
        let mut max: usize = 64;
        loop {
            // SAFETY: rbd_image_spec_t is two pointers: all-zero is valid.
            let mut specs: Vec<ffi::rbd_image_spec_t> =
                (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            // SAFETY: the context is open; `specs` has room for `max` entries, filled
            // with strings librbd allocates (freed by rbd_image_spec_list_cleanup).
            let r = unsafe { ffi::rbd_list2(self.handle, specs.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(i64::from(r), "list the images of", || {
                self.describe().to_owned()
            })?;
            let n = max.min(specs.len());
            let names = specs[..n]
                .iter()
                .filter(|s| !s.name.is_null())
                .map(|s| {
                    // SAFETY: librbd set the names to NUL-terminated strings.
                    unsafe { CStr::from_ptr(s.name) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            // SAFETY: the first `n` entries came from rbd_list2; freed once.
            unsafe { ffi::rbd_image_spec_list_cleanup(specs.as_mut_ptr(), n) };
            return Ok(names);
        }
    }

    /// Renames image `from` to `to` (its clones keep their parent: they name it by id).
    pub fn rename_image(&self, from: &str, to: &str) -> Result<(), RbdError> {
        let f = cstring(from, || format!("image name {from:?}"))?;
        let t = cstring(to, || format!("image name {to:?}"))?;
        // SAFETY: the context is open; both names are NUL-terminated for the call.
        let r = unsafe { ffi::rbd_rename(self.handle, f.as_ptr(), t.as_ptr()) };
        check(i64::from(r), "rename RBD image", || {
            format!("{from} to {to} in {}", self.describe())
        })?;
        Ok(())
    }

    /// Moves image `name` to the pool's trash: gone from listings, its data (and its
    /// clones' parent) kept until the trash is purged.
    pub fn trash_move(&self, name: &str) -> Result<(), RbdError> {
        let c = cstring(name, || format!("image name {name:?}"))?;
        // SAFETY: the context is open; the name is NUL-terminated for the call.
        let r = unsafe { ffi::rbd_trash_move(self.handle, c.as_ptr(), 0) };
        check(i64::from(r), "move to the trash RBD image", || {
            format!("{name} in {}", self.describe())
        })?;
        Ok(())
    }

    /// Bytes the pool stores (its objects' data, before replication).
    pub fn used_bytes(&self) -> Result<u64, RbdError> {
        // SAFETY: rados_pool_stat_t is integers: all-zero is valid.
        let mut st: ffi::rados_pool_stat_t = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open; `st` is a writable struct of the type expected.
        let r = unsafe { ffi::rados_ioctx_pool_stat(self.handle, &mut st) };
        check(i64::from(r), "read the usage of", || {
            self.describe().to_owned()
        })?;
        Ok(st.num_bytes)
    }
}

/// Opens image `name` of `pool` at `snapshot` (read-only).
pub fn open_snapshot(pool: &Arc<IoCtx>, name: &str, snapshot: &str) -> Result<Image, RbdError> {
    Image::open(pool, name, Some(snapshot), true)
}
