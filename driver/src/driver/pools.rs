//! Pools: create (idempotent), get, list, delete; what a pool holds and has free.

use super::*;
use crate::model::Pool;
use crate::names::check_name;
use crate::state::PoolRecord;

impl Driver {
    /// A pool entry of `kind`, its storage made ready.
    pub(super) fn prepare_pool(kind: &PoolKind, origin: PoolOrigin) -> Result<PoolEntry> {
        let backend: Arc<dyn PoolBackend> = Arc::from(crate::pool::backend(kind));
        backend.prepare()?;
        Ok(PoolEntry { backend, origin })
    }

    /// The places of every volume (devices are shared by no two volumes, of any pool).
    pub(super) fn taken(inner: &Inner) -> Vec<PathBuf> {
        inner.volumes.values().map(|v| v.path.clone()).collect()
    }

    /// Bytes given in pool `name` to volumes, cached images and imports under way.
    pub(super) fn provisioned(inner: &Inner, name: &str) -> u64 {
        let vols = inner
            .volumes
            .values()
            .filter(|v| v.pool == name)
            .map(|v| v.size_bytes);
        let imgs = inner
            .images
            .values()
            .filter(|i| i.pool == name)
            .map(|i| i.size_bytes);
        let reserved = inner
            .reserved
            .iter()
            .filter(|(i, _)| i.pool == name)
            .map(|(_, size)| *size);
        vols.sum::<u64>() + imgs.sum::<u64>() + reserved.sum::<u64>()
    }

    fn pool_view(name: &str, e: &PoolEntry, inner: &Inner) -> Pool {
        let space = e.backend.space(&Self::taken(inner));
        Pool {
            name: name.to_owned(),
            kind: e.backend.kind().clone(),
            origin: e.origin,
            reflink: e.backend.reflink(),
            provisioned_bytes: Self::provisioned(inner, name),
            capacity_bytes: space.capacity_bytes,
            available_bytes: space.available_bytes,
            volume_count: inner.volumes.keys().filter(|v| v.pool == name).count() as u32,
            unavailable: e.backend.unavailable(),
        }
    }

    /// Checks that `extra` more bytes fit pool `name`'s quota (dir pools with one).
    pub(super) fn quota_check(&self, name: &str, e: &PoolEntry, extra: u64) -> Result<()> {
        if let PoolKind::Dir { capacity_bytes, .. } = e.backend.kind() {
            if *capacity_bytes > 0 {
                let provisioned = Self::provisioned(&self.lock(), name);
                if provisioned.saturating_add(extra) > *capacity_bytes {
                    return Err(Error::NoSpace(format!(
                        "pool {name:?}: {extra} more bytes exceed its capacity of {capacity_bytes} \
                         ({provisioned} provisioned)"
                    )));
                }
            }
        }
        Ok(())
    }

    /// CreatePool: idempotent for the same storage.
    pub fn create_pool(&self, name: &str, kind: PoolKind) -> Result<Pool> {
        check_name("pool", name)?;
        match &kind {
            PoolKind::Dir { path, .. } => {
                let s = path.to_string_lossy();
                if !path.is_absolute() || s.contains('\0') || s.contains("/../") {
                    return Err(Error::BadRequest(format!(
                        "pool path {s:?} is not an absolute path"
                    )));
                }
            }
            PoolKind::Rbd(c) => {
                crate::pool::check_rbd_config(c).map_err(Error::BadRequest)?;
            }
            PoolKind::Block { devices } => {
                if devices.is_empty() {
                    return Err(Error::BadRequest("a block pool needs devices".into()));
                }
                for d in devices {
                    use std::os::unix::fs::FileTypeExt;
                    let is_blk = fs::metadata(d).map(|m| m.file_type().is_block_device());
                    if !d.is_absolute() || !matches!(is_blk, Ok(true)) {
                        return Err(Error::BadRequest(format!(
                            "device {:?} is not an absolute path to a block device",
                            d.display().to_string()
                        )));
                    }
                }
            }
        }
        let _g = self.begin(OpKey::Pool(name.to_owned()))?;
        {
            let inner = self.lock();
            if let Some(e) = inner.pools.get(name) {
                if *e.backend.kind() == kind {
                    return Ok(Self::pool_view(name, e, &inner));
                }
                return Err(Error::AlreadyExists {
                    what: format!("pool {name:?}"),
                    how: "with another type or storage".into(),
                });
            }
            if let Some((n, _)) = inner.pools.iter().find(|(_, e)| e.backend.overlaps(&kind)) {
                return Err(Error::BadRequest(format!(
                    "pool {n:?} already uses that storage"
                )));
            }
        }
        if let PoolKind::Dir { path, .. } = &kind {
            fs::create_dir_all(path).map_err(Error::io("creating", path))?;
        }
        let e = Self::prepare_pool(&kind, PoolOrigin::Api)?;
        self.store.put_pool(&PoolRecord {
            name: name.to_owned(),
            kind,
        })?;
        let mut inner = self.lock();
        inner.pools.insert(name.to_owned(), e.clone());
        tracing::info!(pool = name, "pool created");
        Ok(Self::pool_view(name, &e, &inner))
    }

    /// GetPool.
    pub fn get_pool(&self, name: &str) -> Result<Pool> {
        check_name("pool", name)?;
        let inner = self.lock();
        let e = inner
            .pools
            .get(name)
            .ok_or_else(|| Error::PoolNotFound(name.to_owned()))?;
        Ok(Self::pool_view(name, e, &inner))
    }

    /// ListPools.
    pub fn list_pools(&self) -> Vec<Pool> {
        let inner = self.lock();
        inner
            .pools
            .iter()
            .map(|(n, e)| Self::pool_view(n, e, &inner))
            .collect()
    }

    /// DeletePool: returns whether it existed.
    pub fn delete_pool(&self, name: &str) -> Result<bool> {
        check_name("pool", name)?;
        let _g = self.begin(OpKey::Pool(name.to_owned()))?;
        let mut inner = self.lock();
        let Some(e) = inner.pools.get(name) else {
            return Ok(false);
        };
        if e.origin == PoolOrigin::Config {
            return Err(Error::PoolUnsuitable(format!(
                "pool {name:?} is defined in the configuration file"
            )));
        }
        let in_pool = |k: &OpKey| match k {
            OpKey::Volume(v) => v.pool == name,
            OpKey::Image(i) => i.pool == name,
            OpKey::Pool(_) => false,
        };
        if inner.busy.iter().any(in_pool) {
            return Err(Error::Busy(format!("a volume or image of pool {name:?}")));
        }
        if inner.volumes.keys().any(|v| v.pool == name)
            || inner.images.keys().any(|i| i.pool == name)
        {
            return Err(Error::PoolUnsuitable(format!(
                "pool {name:?} still holds volumes or cached images"
            )));
        }
        self.store.remove_pool(name)?;
        inner.pools.remove(name);
        tracing::info!(pool = name, "pool deleted");
        Ok(true)
    }
}
