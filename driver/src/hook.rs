//! The image-import hook behind `vmblk hook image-import`: asks vmblkd to unpack an
//! Incus image once into a cached image volume named by its fingerprint. Later volumes
//! created from that fingerprint are clones of it (reflinks where the pool allows).
//! Repeat calls are no-ops (`unpacked: false`).

use std::path::{Path, PathBuf};

use vmblk_proto::v1 as pb;

use crate::client::Client;

/// What to import.
#[derive(Debug, Clone, Default)]
pub struct ImageImport {
    /// The Incus image fingerprint (lower-case hex).
    pub fingerprint: String,
    /// A unified tarball, or the rootfs file of a split image.
    pub image: PathBuf,
    /// The metadata tarball of a split image.
    pub metadata: Option<PathBuf>,
    /// Pool to cache it in ("" : the default pool).
    pub pool: String,
}

fn absolute(p: &Path) -> std::io::Result<String> {
    Ok(std::path::absolute(p)?.display().to_string())
}

impl ImageImport {
    /// The request for vmblkd (paths made absolute: the daemon refuses relative ones).
    pub fn request(&self) -> std::io::Result<pb::ImportImageRequest> {
        Ok(pb::ImportImageRequest {
            pool: self.pool.clone(),
            fingerprint: self.fingerprint.clone(),
            image: Some(pb::ImageFile {
                path: absolute(&self.image)?,
                metadata_path: match &self.metadata {
                    Some(m) => absolute(m)?,
                    None => String::new(),
                },
            }),
        })
    }
}

/// Imports the image through `client`.
pub async fn image_import(
    client: &mut Client,
    what: &ImageImport,
) -> Result<pb::ImportImageResponse, tonic::Status> {
    let req = what
        .request()
        .map_err(|e| tonic::Status::invalid_argument(format!("image path: {e}")))?;
    Ok(client.import_image(req).await?.into_inner())
}
