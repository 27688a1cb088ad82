//! Where the daemon listens, and where it keeps image files.

use std::path::{Path, PathBuf};

use crate::IncusError;

/// The sockets looked for, in order: Incus, LXD from Debian, LXD from the snap.
pub const SOCKET_CANDIDATES: [&str; 3] = [
    "/var/lib/incus/unix.socket",
    "/var/lib/lxd/unix.socket",
    "/var/snap/lxd/common/lxd/unix.socket",
];

/// `explicit` if given, else `INCUS_DIR`/`LXD_DIR`'s socket if set, else the first of
/// [`SOCKET_CANDIDATES`] that exists.
pub fn find_socket(explicit: Option<&Path>) -> Result<PathBuf, IncusError> {
    if let Some(p) = explicit {
        return Ok(p.to_owned());
    }
    let mut looked = Vec::new();
    for var in ["INCUS_DIR", "LXD_DIR"] {
        if let Some(dir) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let p = PathBuf::from(dir).join("unix.socket");
            if p.exists() {
                return Ok(p);
            }
            looked.push(p.display().to_string());
        }
    }
    for c in SOCKET_CANDIDATES {
        let p = PathBuf::from(c);
        if p.exists() {
            return Ok(p);
        }
        looked.push(c.to_owned());
    }
    Err(IncusError::NoSocket {
        looked: looked.join(", "),
    })
}

/// The image directory of the daemon behind `socket`: `images/` beside it (the daemon's
/// data directory holds both: /var/lib/incus, /var/lib/lxd, the snap's lxd/).
pub fn images_dir(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or(Path::new("/")).join("images")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_directory_is_beside_the_socket() {
        assert_eq!(
            images_dir(Path::new("/var/lib/lxd/unix.socket")),
            Path::new("/var/lib/lxd/images")
        );
        assert_eq!(
            images_dir(Path::new("/var/snap/lxd/common/lxd/unix.socket")),
            Path::new("/var/snap/lxd/common/lxd/images")
        );
    }

    #[test]
    fn an_explicit_socket_wins() {
        let p = find_socket(Some(Path::new("/nowhere/unix.socket"))).unwrap();
        assert_eq!(p, Path::new("/nowhere/unix.socket"));
    }
}
