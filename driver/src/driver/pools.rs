//! Pools: create (idempotent), get, list, delete; what a pool holds and has free.

use super::*;

impl Driver {
    pub(super) fn prepare_pool(&self, kind: &PoolKind, from_config: bool) -> Result<PoolEntry> {
        let mut reflink = false;
        if let PoolKind::Dir { path, .. } = kind {
            for sub in ["volumes", "images"] {
                let d = path.join(sub);
                fs::create_dir_all(&d).map_err(Error::io("creating", &d))?;
                remove_temp_files_under(&d, 1)?;
            }
            reflink = probe_reflink(path);
            tracing::info!(path = %path.display(), reflink, "dir pool ready");
        }
        Ok(PoolEntry {
            kind: kind.clone(),
            from_config,
            reflink,
        })
    }

    pub(super) fn pool(&self, name: &str) -> Result<PoolEntry> {
        self.lock()
            .pools
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("pool {name:?} does not exist")))
    }

    pub(super) fn pool_pb(&self, name: &str, e: &PoolEntry, inner: &Inner) -> pb::Pool {
        let vols: Vec<&VolumeRecord> = inner.volumes.values().filter(|v| v.pool == name).collect();
        let imgs = inner
            .images
            .values()
            .filter(|i| i.pool == name)
            .map(|i| i.size_bytes);
        let reserved = inner
            .reserved
            .iter()
            .filter(|((p, _), _)| p == name)
            .map(|(_, size)| size);
        let provisioned = vols.iter().map(|v| v.size_bytes).sum::<u64>()
            + imgs.sum::<u64>()
            + reserved.sum::<u64>();
        let mut p = pb::Pool {
            name: name.to_owned(),
            origin: if e.from_config {
                pb::PoolOrigin::Config
            } else {
                pb::PoolOrigin::Api
            } as i32,
            provisioned_bytes: provisioned,
            reflink: e.reflink,
            volume_count: vols.len() as u32,
            ..Default::default()
        };
        match &e.kind {
            PoolKind::Dir {
                path,
                capacity_bytes,
            } => {
                p.r#type = pb::PoolType::Dir as i32;
                p.path = path.display().to_string();
                p.capacity_bytes = *capacity_bytes;
                p.available_bytes = sys::available_bytes(path).unwrap_or(0);
            }
            PoolKind::Block { devices } => {
                p.r#type = pb::PoolType::Block as i32;
                p.devices = devices.iter().map(|d| d.display().to_string()).collect();
                let used: HashSet<u64> = inner
                    .volumes
                    .values()
                    .filter_map(|v| device_number(&v.path))
                    .collect();
                for d in devices {
                    let size = sys::size_and_sector(d).map(|s| s.0).unwrap_or(0);
                    p.capacity_bytes += size;
                    if device_number(d).is_some_and(|n| !used.contains(&n)) {
                        p.available_bytes += size;
                    }
                }
            }
        }
        p
    }

    /// CreatePool.
    pub fn create_pool(&self, r: pb::CreatePoolRequest) -> Result<pb::Pool> {
        check_name("pool", &r.name)?;
        let kind = match pb::PoolType::try_from(r.r#type) {
            Ok(pb::PoolType::Dir) => {
                if !r.devices.is_empty() {
                    return Err(Error::InvalidArgument("dir pools take no devices".into()));
                }
                let path = PathBuf::from(&r.path);
                if !path.is_absolute() || r.path.contains('\0') || r.path.contains("/../") {
                    return Err(Error::InvalidArgument(format!(
                        "pool path {:?} is not an absolute path",
                        r.path
                    )));
                }
                PoolKind::Dir {
                    path,
                    capacity_bytes: r.capacity_bytes,
                }
            }
            Ok(pb::PoolType::Block) => {
                if r.devices.is_empty() || !r.path.is_empty() || r.capacity_bytes != 0 {
                    return Err(Error::InvalidArgument(
                        "block pools take devices, and no path or capacity".into(),
                    ));
                }
                let mut devs = Vec::new();
                for d in &r.devices {
                    let p = PathBuf::from(d);
                    let is_blk = fs::metadata(&p).map(|m| m.file_type().is_block_device());
                    if !p.is_absolute() || !matches!(is_blk, Ok(true)) {
                        return Err(Error::InvalidArgument(format!(
                            "device {d:?} is not an absolute path to a block device"
                        )));
                    }
                    devs.push(p);
                }
                PoolKind::Block { devices: devs }
            }
            _ => {
                return Err(Error::InvalidArgument(
                    "pool type is required: dir or block".into(),
                ))
            }
        };
        let _g = self.begin(format!("p/{}", r.name), &format!("pool {}", r.name))?;
        {
            let inner = self.lock();
            if let Some(e) = inner.pools.get(&r.name) {
                if e.kind == kind {
                    return Ok(self.pool_pb(&r.name, e, &inner));
                }
                return Err(Error::AlreadyExists(format!(
                    "pool {:?} exists with another type or storage",
                    r.name
                )));
            }
            for (n, e) in &inner.pools {
                let clash = match (&e.kind, &kind) {
                    (PoolKind::Dir { path: a, .. }, PoolKind::Dir { path: b, .. }) => a == b,
                    (PoolKind::Block { devices: a }, PoolKind::Block { devices: b }) => {
                        a.iter().any(|d| b.contains(d))
                    }
                    _ => false,
                };
                if clash {
                    return Err(Error::InvalidArgument(format!(
                        "pool {n:?} already uses that storage"
                    )));
                }
            }
        }
        if let PoolKind::Dir { path, .. } = &kind {
            fs::create_dir_all(path).map_err(Error::io("creating", path))?;
        }
        let e = self.prepare_pool(&kind, false)?;
        self.store.put_pool(&PoolRecord {
            name: r.name.clone(),
            kind,
        })?;
        let mut inner = self.lock();
        inner.pools.insert(r.name.clone(), e.clone());
        tracing::info!(pool = %r.name, "pool created");
        Ok(self.pool_pb(&r.name, &e, &inner))
    }

    /// GetPool.
    pub fn get_pool(&self, name: &str) -> Result<pb::Pool> {
        check_name("pool", name)?;
        let inner = self.lock();
        let e = inner
            .pools
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("pool {name:?} does not exist")))?;
        Ok(self.pool_pb(name, e, &inner))
    }

    /// ListPools.
    pub fn list_pools(&self) -> Vec<pb::Pool> {
        let inner = self.lock();
        inner
            .pools
            .iter()
            .map(|(n, e)| self.pool_pb(n, e, &inner))
            .collect()
    }

    /// DeletePool: returns whether it existed.
    pub fn delete_pool(&self, name: &str) -> Result<bool> {
        check_name("pool", name)?;
        let _g = self.begin(format!("p/{name}"), &format!("pool {name}"))?;
        let mut inner = self.lock();
        let Some(e) = inner.pools.get(name) else {
            return Ok(false);
        };
        if e.from_config {
            return Err(Error::FailedPrecondition(format!(
                "pool {name:?} is defined in the configuration file"
            )));
        }
        let (vp, ip) = (format!("v/{name}/"), format!("i/{name}/"));
        if inner
            .busy
            .iter()
            .any(|k| k.starts_with(&vp) || k.starts_with(&ip))
        {
            return Err(Error::Aborted(format!(
                "operations on pool {name:?} are running"
            )));
        }
        if inner.volumes.keys().any(|(p, _)| p == name)
            || inner.images.keys().any(|(p, _)| p == name)
        {
            return Err(Error::FailedPrecondition(format!(
                "pool {name:?} still holds volumes or cached images"
            )));
        }
        self.store.remove_pool(name)?;
        inner.pools.remove(name);
        tracing::info!(pool = name, "pool deleted");
        Ok(true)
    }
}
