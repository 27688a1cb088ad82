//! Volume addresses: a path, an RBD image in QEMU's `rbd:` syntax, or `null:SIZE`.

use std::path::{Path, PathBuf};

use super::VolumeError;

/// What an export serves, parsed from its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAddress {
    /// A block device or regular file.
    Path(PathBuf),
    /// `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=..][:id=..][:KEY=VALUE..]`.
    Rbd(::rbd::RbdSpec),
    /// `null:SIZE`: reads zeros, writes are dropped (SIZE in bytes, or with a K, M, G or
    /// T suffix, binary).
    Null {
        /// Size in bytes.
        size: u64,
    },
}

/// The prefix of a null volume's address.
pub const NULL_PREFIX: &str = "null:";

/// Parses a size like `1G`, `512M`, `4096` (binary suffixes K, M, G, T; `B` optional).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_suffix(['B', 'b']).unwrap_or(s);
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

impl VolumeAddress {
    /// Parses an address. Anything that starts with neither `rbd:` nor `null:` is a path
    /// (write `./rbd:x` for a file of that name).
    pub fn parse(address: &Path) -> Result<VolumeAddress, VolumeError> {
        let Some(s) = address.to_str() else {
            return Ok(VolumeAddress::Path(address.to_owned()));
        };
        let bad = |reason: String| VolumeError::Address {
            address: s.to_owned(),
            reason,
        };
        if ::rbd::RbdSpec::is_rbd(s) {
            let spec = ::rbd::RbdSpec::parse(s).map_err(|e| bad(e.to_string()))?;
            return Ok(VolumeAddress::Rbd(spec));
        }
        if let Some(size) = s.strip_prefix(NULL_PREFIX) {
            let size = parse_size(size)
                .ok_or_else(|| bad(format!("{size:?} is not a size (e.g. 1G, 512M, 4096)")))?;
            if size < super::SECTOR_SIZE {
                return Err(bad(format!("{size} bytes is less than one sector")));
            }
            return Ok(VolumeAddress::Null { size });
        }
        Ok(VolumeAddress::Path(address.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<VolumeAddress, String> {
        VolumeAddress::parse(Path::new(s)).map_err(|e| e.to_string())
    }

    #[test]
    fn paths_rbd_and_null() {
        assert_eq!(
            parse("/dev/nvme0n1").unwrap(),
            VolumeAddress::Path("/dev/nvme0n1".into())
        );
        assert_eq!(
            parse("./rbd:x").unwrap(),
            VolumeAddress::Path("./rbd:x".into())
        );
        match parse("rbd:vms/disk@s:id=vmblk").unwrap() {
            VolumeAddress::Rbd(s) => {
                assert_eq!((s.pool.as_str(), s.image.as_str()), ("vms", "disk"));
                assert_eq!(s.snapshot.as_deref(), Some("s"));
                assert_eq!(s.id.as_deref(), Some("vmblk"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse("null:1G").unwrap(),
            VolumeAddress::Null { size: 1 << 30 }
        );
        assert_eq!(
            parse("null:512M").unwrap(),
            VolumeAddress::Null { size: 512 << 20 }
        );
        assert_eq!(
            parse("null:4096").unwrap(),
            VolumeAddress::Null { size: 4096 }
        );
        assert!(parse("null:2KiB").is_err());
        assert_eq!(
            parse("null:2KB").unwrap(),
            VolumeAddress::Null { size: 2048 }
        );
    }

    #[test]
    fn bad_addresses_say_why() {
        for (addr, want) in [
            ("null:", "is not a size"),
            ("null:abc", "is not a size"),
            ("null:100", "less than one sector"),
            ("null:99999999999T", "is not a size"),
            ("rbd:pool", "names no image"),
            ("rbd:pool/img:conf", "KEY=VALUE"),
        ] {
            let e = parse(addr).unwrap_err();
            assert!(e.contains(want), "{addr}: {e}");
        }
    }
}
