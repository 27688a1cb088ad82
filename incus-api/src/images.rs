//! Images: a fingerprint or alias resolved through the API, and the image's files in the
//! daemon's image directory (`<fingerprint>`, and `<fingerprint>.rootfs` for a split
//! image, as every VM image is).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{IncusClient, IncusError};

/// An image as the API describes it (the fields vmblk uses).
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    /// Its SHA-256 fingerprint (64 hex digits).
    pub fingerprint: String,
    /// "virtual-machine" or "container".
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Its properties (os, release, requirements.*, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Bytes of its files.
    #[serde(default)]
    pub size: u64,
}

/// The files of an image, as vmblk's ImportImage takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFiles {
    /// The disk (split image: `<fp>.rootfs`) or the unified tarball (`<fp>`).
    pub image: PathBuf,
    /// The metadata tarball of a split image (`<fp>`).
    pub metadata: Option<PathBuf>,
}

impl Image {
    /// Whether it is a virtual-machine image.
    pub fn is_vm(&self) -> bool {
        self.kind == "virtual-machine"
    }

    /// Its files under the daemon's image directory `dir`, if they are there.
    pub fn files(&self, dir: &Path) -> Option<ImageFiles> {
        files_in(dir, &self.fingerprint)
    }
}

/// The files of image `fingerprint` in `dir`, if they are there.
pub(crate) fn files_in(dir: &Path, fingerprint: &str) -> Option<ImageFiles> {
    let main = dir.join(fingerprint);
    let rootfs = dir.join(format!("{fingerprint}.rootfs"));
    match (main.is_file(), rootfs.is_file()) {
        (true, true) => Some(ImageFiles {
            image: rootfs,
            metadata: Some(main),
        }),
        (true, false) => Some(ImageFiles {
            image: main,
            metadata: None,
        }),
        _ => None,
    }
}

/// Whether `s` looks like a fingerprint (or a unique prefix of one).
fn is_fingerprint(s: &str) -> bool {
    s.len() >= 12 && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Deserialize)]
struct Alias {
    target: String,
}

impl IncusClient {
    /// Every image of the daemon's default project.
    pub async fn images(&self) -> Result<Vec<Image>, IncusError> {
        self.get("/1.0/images?recursion=1").await
    }

    /// The image named by a fingerprint (or a prefix of at least 12 digits) or an alias.
    pub async fn image(&self, name: &str) -> Result<Image, IncusError> {
        if is_fingerprint(name) {
            match self.get(&format!("/1.0/images/{name}")).await {
                Ok(img) => return Ok(img),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e),
            }
        }
        let alias: Alias = self.get(&format!("/1.0/images/aliases/{name}")).await?;
        self.get(&format!("/1.0/images/{}", alias.target)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_image_has_a_rootfs_and_a_metadata_tarball() {
        let d = tempfile::tempdir().unwrap();
        let fp = "ab".repeat(32);
        std::fs::write(d.path().join(&fp), b"meta").unwrap();
        assert_eq!(
            files_in(d.path(), &fp),
            Some(ImageFiles {
                image: d.path().join(&fp),
                metadata: None
            })
        );
        std::fs::write(d.path().join(format!("{fp}.rootfs")), b"disk").unwrap();
        assert_eq!(
            files_in(d.path(), &fp),
            Some(ImageFiles {
                image: d.path().join(format!("{fp}.rootfs")),
                metadata: Some(d.path().join(&fp)),
            })
        );
        assert_eq!(files_in(d.path(), "cd"), None);
    }

    #[test]
    fn fingerprints_and_aliases_are_told_apart() {
        assert!(is_fingerprint(&"0a".repeat(32)));
        assert!(is_fingerprint("b6707dc33392"));
        assert!(!is_fingerprint("debian-12"));
        assert!(!is_fingerprint("abc"));
    }
}
