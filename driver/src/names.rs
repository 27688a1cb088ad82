//! Validation of names, fingerprints, sizes and paths from requests.

use std::path::Path;

use crate::error::{Error, Result};

/// Longest pool or volume name.
pub const MAX_NAME_LEN: usize = 63;
/// Sizes are multiples of this.
pub const SIZE_ALIGN: u64 = 4096;
/// Largest volume size accepted (1 PiB).
pub const MAX_SIZE: u64 = 1 << 50;

/// Checks a pool or volume name: 1..=63 characters of `[A-Za-z0-9_.-]`, not starting
/// with `.` or `-`, never containing `..` (so never `/`, NUL or a path component trick).
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    let bad = |why: String| {
        Err(Error::InvalidName {
            what,
            name: name.to_owned(),
            why,
        })
    };
    if name.is_empty() {
        return bad("is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return bad("is longer than 63 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return bad(format!("contains {c:?}; allowed are A-Z a-z 0-9 _ . -"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("starts with '.' or '-'".into());
    }
    if name.contains("..") {
        return bad("contains \"..\"".into());
    }
    Ok(())
}

/// Checks an Incus image fingerprint: 12..=64 lower-case hex digits.
pub fn check_fingerprint(fp: &str) -> Result<()> {
    if (12..=64).contains(&fp.len()) && fp.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(Error::InvalidName {
            what: "fingerprint",
            name: fp.to_owned(),
            why: "is not 12 to 64 lower-case hex digits".into(),
        })
    }
}

/// Checks a requested size: positive, a multiple of 4096, at most 1 PiB.
pub fn check_size(size: u64) -> Result<()> {
    if size == 0 || size % SIZE_ALIGN != 0 || size > MAX_SIZE {
        return Err(Error::BadRequest(format!(
            "size {size} is not a positive multiple of 4096 up to 1 PiB"
        )));
    }
    Ok(())
}

/// Checks that `path` is absolute and names an existing regular file.
pub fn check_image_path(what: &str, path: &Path) -> Result<()> {
    let s = path.to_string_lossy();
    if s.is_empty() || !path.is_absolute() || s.contains('\0') {
        return Err(Error::BadRequest(format!(
            "{what} {s:?} is not an absolute path"
        )));
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::BadRequest(format!(
            "{what} {s} is not a regular file"
        ))),
        Err(e) => Err(Error::BadRequest(format!("{what} {s}: {e}"))),
    }
}

/// Rounds `n` up to a multiple of 4096.
pub fn round_up(n: u64) -> u64 {
    n.div_ceil(SIZE_ALIGN) * SIZE_ALIGN
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for n in ["vm1", "a", "web-01.root", "A_b", &"x".repeat(63)] {
            check_name("volume", n).unwrap();
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for n in [
            "",
            "a/b",
            "..",
            "a..b",
            ".hidden",
            "-x",
            "a\0b",
            "é",
            "a b",
            &"x".repeat(64),
        ] {
            assert!(check_name("volume", n).is_err(), "{n:?} passed");
        }
    }

    #[test]
    fn sizes_must_be_aligned_and_positive() {
        check_size(4096).unwrap();
        check_size(1 << 30).unwrap();
        for s in [0, 512, 4097, MAX_SIZE + 4096] {
            assert!(check_size(s).is_err(), "{s} passed");
        }
    }

    #[test]
    fn fingerprints_are_lower_hex() {
        check_fingerprint(&"ab12".repeat(16)).unwrap();
        for f in ["", "abc", "ABCDEF012345", "../../etc/pass", &"a".repeat(65)] {
            assert!(check_fingerprint(f).is_err(), "{f:?} passed");
        }
    }

    #[test]
    fn image_paths_must_be_absolute_regular_files() {
        let f = tempfile::NamedTempFile::new().unwrap();
        check_image_path("image", f.path()).unwrap();
        assert!(check_image_path("image", Path::new("relative.img")).is_err());
        assert!(check_image_path("image", Path::new("/")).is_err());
        assert!(check_image_path("image", Path::new("/nonexistent/x.img")).is_err());
    }
}
