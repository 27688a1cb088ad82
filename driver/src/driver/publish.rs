//! PublishVolume: a volume (detached) or one of its snapshots written as a compressed
//! qcow2 image on this host, what `incus publish` makes of a VM.

use image_unpack::{Compression, PackOptions};

use super::volumes::check_volume_id;
use super::*;
use crate::names::check_name;

impl Driver {
    /// Packs the volume (or its snapshot) into a new qcow2 image at `path`.
    pub fn publish_volume(
        &self,
        id: &VolumeId,
        snapshot: Option<&str>,
        path: &Path,
        compression: Compression,
    ) -> Result<image_unpack::PackReport> {
        check_volume_id(id)?;
        if let Some(s) = snapshot {
            check_name("snapshot", s)?;
        }
        if !path.is_absolute() || path.file_name().is_none() {
            return Err(Error::BadRequest(format!(
                "image path {:?} is not an absolute file path",
                path.display().to_string()
            )));
        }
        match path.parent().map(fs::metadata) {
            Some(Ok(m)) if m.is_dir() => {}
            _ => {
                return Err(Error::BadRequest(format!(
                    "image path {}: its directory does not exist",
                    path.display()
                )))
            }
        }
        let _g = self.begin_volume(id)?;
        self.pool(&id.pool)?;
        self.refresh_shared(&id.pool)?;
        // The same rules as a clone's source: a volume in use is published from a
        // snapshot of it.
        let (source, _) = self.clone_source(id, snapshot)?;
        let progress = EventProgress::new(self, &id.pool, &id.name, "publish");
        let opts = PackOptions {
            compression,
            threads: 0,
        };
        let rep = image_unpack::pack(&source, path, &opts, &progress).map_err(|e| Error::Pack {
            path: source.clone(),
            source: Box::new(e),
        })?;
        tracing::info!(pool = %id.pool, volume = %id.name, snapshot, image = %path.display(),
            bytes = rep.file_bytes, ms = rep.elapsed_ms, "volume published");
        Ok(rep)
    }
}
