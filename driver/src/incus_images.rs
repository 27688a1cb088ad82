//! Incus's image import, followed: Incus and LXD run no host program when they import
//! an image, but report it on their lifecycle event stream. With `incus.follow_images`
//! vmblkd caches each virtual-machine image the daemon reports (unpacked once, from the
//! daemon's own image files) and drops it when the daemon deletes it.
//!
//! ```text
//!  connect ─► /1.0/events (lifecycle) ─► list images: cache the VM ones not cached yet
//!     │            │ image-created (VM) ─► ImportImage(<images>/<fp>.rootfs, metadata <fp>)
//!     │            │ image-deleted      ─► DeleteImage(fp)
//!     └── stream ends or the daemon is down: retry, 1 s doubling to 30 s
//! ```

use std::sync::Arc;
use std::time::Duration;

use incus_api::{IncusClient, LifecycleEvent};

use crate::config::IncusConfig;
use crate::driver::Driver;
use crate::model::ImageImport;

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follows the daemon until the task is aborted.
pub(crate) fn start(driver: Arc<Driver>, cfg: IncusConfig) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        loop {
            match follow(&driver, &cfg).await {
                Ok(()) => {
                    tracing::warn!("the Incus/LXD event stream ended; reconnecting");
                    backoff = Duration::from_secs(1);
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), retry_secs = backoff.as_secs(),
                    "following Incus/LXD images"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    })
}

/// One connection: subscribe, catch up, then follow.
async fn follow(driver: &Arc<Driver>, cfg: &IncusConfig) -> anyhow::Result<()> {
    let socket = incus_api::find_socket(cfg.socket.as_deref())?;
    let dir = cfg
        .images_dir
        .clone()
        .unwrap_or_else(|| incus_api::images_dir(&socket));
    let client = IncusClient::new(socket.clone());
    // Subscribed first, so nothing imported meanwhile is missed.
    let mut events = client.lifecycle_events().await?;
    tracing::info!(socket = %socket.display(), images = %dir.display(), "following Incus/LXD images");
    for img in client.images().await? {
        if img.is_vm() {
            import(driver, cfg, &client, &dir, &img.fingerprint).await;
        }
    }
    while let Some(e) = events.next().await? {
        handle(driver, cfg, &client, &dir, &e).await;
    }
    Ok(())
}

async fn handle(
    driver: &Arc<Driver>,
    cfg: &IncusConfig,
    client: &IncusClient,
    dir: &std::path::Path,
    e: &LifecycleEvent,
) {
    let Some(fp) = e.image_fingerprint() else {
        return;
    };
    match e.action.as_str() {
        "image-created" => import(driver, cfg, client, dir, fp).await,
        "image-deleted" => {
            let (d, pool, fp) = (driver.clone(), cfg.pool.clone(), fp.to_owned());
            let r = tokio::task::spawn_blocking(move || d.delete_image(&pool, &fp)).await;
            match r {
                Ok(Ok(true)) => {
                    tracing::info!(fingerprint = %e.source, "image deleted by Incus/LXD: dropped from the cache")
                }
                Ok(Ok(false)) => {}
                Ok(Err(err)) => tracing::warn!(error = %err.chain(), source = %e.source,
                    "dropping a deleted image from the cache"),
                Err(err) => tracing::error!(error = %err, "image drop task failed"),
            }
        }
        _ => {}
    }
}

/// Caches image `fp` if it is a VM image whose files are in `dir` (idempotent).
async fn import(
    driver: &Arc<Driver>,
    cfg: &IncusConfig,
    client: &IncusClient,
    dir: &std::path::Path,
    fp: &str,
) {
    let img = match client.image(fp).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(fingerprint = fp, error = %e, "reading an image Incus/LXD reported");
            return;
        }
    };
    if !img.is_vm() {
        return;
    }
    let Some(files) = img.files(dir) else {
        tracing::warn!(fingerprint = fp, dir = %dir.display(),
            "an image Incus/LXD reported has no files there: not cached");
        return;
    };
    let req = ImageImport {
        pool: cfg.pool.clone(),
        fingerprint: img.fingerprint.clone(),
        image: files.image,
        metadata: files.metadata,
    };
    let d = driver.clone();
    match tokio::task::spawn_blocking(move || d.import_image(req)).await {
        Ok(Ok(r)) if r.unpacked => {
            tracing::info!(fingerprint = fp, "image imported by Incus/LXD: cached")
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(fingerprint = fp, error = %e.chain(),
            "caching an image Incus/LXD imported"),
        Err(e) => tracing::error!(error = %e, "image import task failed"),
    }
}
