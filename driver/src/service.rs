//! The gRPC service: each call converts its request into the driver's terms
//! ([`crate::model`]), runs the blocking [`Driver`] method on tokio's blocking pool, and
//! converts the answer back. Protobuf types appear here and nowhere else in the driver,
//! and [`status_code`] is the one place a driver error gets its gRPC code.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use image_unpack::UnpackErrorKind;
use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt};
use tonic::{Code, Request, Response, Status};
use vmblk_proto::v1 as pb;
use vmblk_proto::v1::storage_driver_server::StorageDriver;

use crate::config::PoolKind;
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::model::{
    AttachOptions, Attachment, Backend, CachedImage, Event, EventKind, GrowVolume, ImageImport,
    NewVolume, Pool, PoolOrigin, Snapshot, Volume, VolumeId,
};
use crate::state::{Origin, VolState};

/// The gRPC code of a driver error: the one mapping.
pub fn status_code(e: &Error) -> Code {
    match e {
        Error::InvalidName { .. } | Error::BadRequest(_) => Code::InvalidArgument,
        Error::PoolNotFound(_)
        | Error::VolumeNotFound(_)
        | Error::ImageNotFound(_)
        | Error::SnapshotNotFound { .. } => Code::NotFound,
        Error::Unimplemented(_) => Code::Unimplemented,
        Error::AlreadyExists { .. } => Code::AlreadyExists,
        Error::Busy(_) => Code::Aborted,
        Error::PoolUnavailable { .. } => Code::Unavailable,
        Error::Cluster { source, .. } if source.is_not_found() => Code::NotFound,
        Error::Cluster { source, .. } if source.is_timeout() => Code::Unavailable,
        Error::Attached { .. }
        | Error::AttachedElsewhere { .. }
        | Error::NotReady(_)
        | Error::DeviceAbsent { .. }
        | Error::PoolUnsuitable(_) => Code::FailedPrecondition,
        Error::NoSpace(_) => Code::ResourceExhausted,
        _ if e.is_no_space() => Code::ResourceExhausted,
        // The image is corrupt or unsupported, or its table is not understood: the
        // request named something that cannot be used.
        Error::Unpack { source, .. }
            if matches!(
                source.kind(),
                UnpackErrorKind::BadImage | UnpackErrorKind::TableNotUnderstood
            ) =>
        {
            Code::InvalidArgument
        }
        Error::Pack { source, .. }
            if matches!(**source, image_unpack::PackError::OutputExists(_)) =>
        {
            Code::AlreadyExists
        }
        Error::Unpack { .. }
        | Error::Pack { .. }
        | Error::Io { .. }
        | Error::Export { .. }
        | Error::Task(_)
        | Error::Cluster { .. } => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let code = status_code(&e);
        if code == Code::Internal {
            tracing::error!(error = %e.chain(), "operation failed");
        }
        Status::new(code, e.chain())
    }
}

// ---------------------------------------------------------------- requests in

fn volume_id(pool: String, name: String) -> VolumeId {
    VolumeId { pool, name }
}

fn pool_kind(r: &pb::CreatePoolRequest) -> Result<PoolKind> {
    match pb::PoolType::try_from(r.r#type) {
        Ok(pb::PoolType::Dir) => {
            if !r.devices.is_empty() {
                return Err(Error::BadRequest("dir pools take no devices".into()));
            }
            Ok(PoolKind::Dir {
                path: PathBuf::from(&r.path),
                capacity_bytes: r.capacity_bytes,
            })
        }
        Ok(pb::PoolType::Rbd) => {
            let Some(c) = &r.rbd else {
                return Err(Error::BadRequest(
                    "rbd pools need rbd: { pool, ... }".into(),
                ));
            };
            if !r.devices.is_empty() || !r.path.is_empty() || r.capacity_bytes != 0 {
                return Err(Error::BadRequest(
                    "rbd pools take rbd settings, and no path, devices or capacity".into(),
                ));
            }
            let opt = |s: &str| (!s.is_empty()).then(|| s.to_owned());
            let c = crate::model::RbdPoolConfig {
                pool: c.pool.clone(),
                namespace: c.namespace.clone(),
                conf: opt(&c.conf).map(PathBuf::from),
                id: opt(&c.id),
                keyring: opt(&c.keyring).map(PathBuf::from),
            };
            crate::pool::check_rbd_config(&c).map_err(Error::BadRequest)?;
            Ok(PoolKind::Rbd(c))
        }
        Ok(pb::PoolType::Block) => {
            if r.devices.is_empty() || !r.path.is_empty() || r.capacity_bytes != 0 {
                return Err(Error::BadRequest(
                    "block pools take devices, and no path or capacity".into(),
                ));
            }
            Ok(PoolKind::Block {
                devices: r.devices.iter().map(PathBuf::from).collect(),
            })
        }
        _ => Err(Error::BadRequest(
            "pool type is required: dir, block or rbd".into(),
        )),
    }
}

fn origin(o: Option<pb::VolumeOrigin>) -> Origin {
    match o.and_then(|o| o.source) {
        None | Some(pb::volume_origin::Source::Empty(_)) => Origin::Empty,
        Some(pb::volume_origin::Source::Image(f)) => Origin::Image {
            path: PathBuf::from(f.path),
            metadata: (!f.metadata_path.is_empty()).then(|| PathBuf::from(f.metadata_path)),
        },
        Some(pb::volume_origin::Source::ImageFingerprint(fp)) => Origin::Fingerprint(fp),
        Some(pb::volume_origin::Source::Volume(v)) => Origin::Volume {
            name: v.name,
            snapshot: (!v.snapshot.is_empty()).then_some(v.snapshot),
        },
    }
}

// ---------------------------------------------------------------- answers out

fn state_pb(s: Option<VolState>) -> pb::VolumeState {
    match s {
        None => pb::VolumeState::Unspecified,
        Some(VolState::Creating) => pb::VolumeState::Creating,
        Some(VolState::Ready) => pb::VolumeState::Ready,
        Some(VolState::Growing) => pb::VolumeState::Growing,
        Some(VolState::Deleting) => pb::VolumeState::Deleting,
    }
}

fn pool_pb(p: Pool) -> pb::Pool {
    let mut out = pb::Pool {
        name: p.name,
        origin: match p.origin {
            PoolOrigin::Config => pb::PoolOrigin::Config,
            PoolOrigin::Api => pb::PoolOrigin::Api,
        } as i32,
        provisioned_bytes: p.provisioned_bytes,
        reflink: p.reflink,
        volume_count: p.volume_count,
        capacity_bytes: p.capacity_bytes,
        available_bytes: p.available_bytes,
        available: p.unavailable.is_none(),
        unavailable_reason: p.unavailable.unwrap_or_default(),
        ..Default::default()
    };
    match p.kind {
        PoolKind::Dir { path, .. } => {
            out.r#type = pb::PoolType::Dir as i32;
            out.path = path.display().to_string();
        }
        PoolKind::Block { devices } => {
            out.r#type = pb::PoolType::Block as i32;
            out.devices = devices.iter().map(|d| d.display().to_string()).collect();
        }
        PoolKind::Rbd(c) => {
            out.r#type = pb::PoolType::Rbd as i32;
            let show = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
            out.rbd = Some(pb::RbdPool {
                pool: c.pool,
                namespace: c.namespace,
                conf: show(&c.conf).unwrap_or_default(),
                id: c.id.unwrap_or_default(),
                keyring: show(&c.keyring).unwrap_or_default(),
            });
        }
    }
    out
}

fn snapshot_pb(s: Snapshot) -> pb::Snapshot {
    pb::Snapshot {
        pool: s.volume.pool,
        volume: s.volume.name,
        name: s.name,
        size_bytes: s.size_bytes,
        created_unix_ms: s.created_unix_ms,
        taken_attached: s.taken_attached,
    }
}

fn attachment_pb(a: Attachment) -> pb::Attachment {
    let (state, reason) = match &a.backend {
        Backend::Serving => (pb::BackendState::Active, String::new()),
        Backend::Removed { reason } => (pb::BackendState::Removed, reason.clone()),
        Backend::WaitingForDevice => (pb::BackendState::Missing, String::new()),
        Backend::Failed { reason } => (pb::BackendState::Failed, reason.clone()),
    };
    pb::Attachment {
        socket_path: a.socket.display().to_string(),
        logical_block_size: a.logical_block_size,
        read_only: a.read_only,
        num_queues: u32::from(a.num_queues),
        queue_size: u32::from(a.queue_size),
        serial: a.serial.clone(),
        qemu_args: a.qemu_args(),
        qemu_chardev: a.qemu_chardev,
        qemu_device: a.qemu_device,
        attached_unix_ms: a.attached_unix_ms,
        backend_state: state as i32,
        backend_removed_reason: reason,
    }
}

fn volume_pb(v: Volume) -> pb::Volume {
    let source = match v.origin {
        Origin::Empty => pb::volume_origin::Source::Empty(pb::Empty {}),
        Origin::Image { path, metadata } => pb::volume_origin::Source::Image(pb::ImageFile {
            path: path.display().to_string(),
            metadata_path: metadata
                .map(|m| m.display().to_string())
                .unwrap_or_default(),
        }),
        Origin::Fingerprint(f) => pb::volume_origin::Source::ImageFingerprint(f),
        Origin::Volume { name, snapshot } => pb::volume_origin::Source::Volume(pb::VolumeSource {
            name,
            snapshot: snapshot.unwrap_or_default(),
        }),
    };
    pb::Volume {
        pool: v.id.pool,
        name: v.id.name,
        uuid: v.uuid,
        size_bytes: v.size_bytes,
        state: state_pb(Some(v.state)) as i32,
        origin: Some(pb::VolumeOrigin {
            source: Some(source),
        }),
        path: v.path.display().to_string(),
        backing_logical_block_size: v.backing_logical_block_size,
        attachment: v.attachment.map(attachment_pb),
        created_unix_ms: v.created_unix_ms,
        reflinked: v.reflinked,
    }
}

fn image_pb(i: CachedImage) -> pb::CachedImage {
    pb::CachedImage {
        pool: i.id.pool,
        fingerprint: i.id.fingerprint,
        size_bytes: i.size_bytes,
        path: i.path.display().to_string(),
        created_unix_ms: i.created_unix_ms,
    }
}

/// An event as Watch sends it.
pub fn event_pb(e: Event) -> pb::Event {
    use pb::event::Kind;
    let kind = match e.what {
        EventKind::StateChanged { old, new } => Kind::StateChanged(pb::VolumeStateChanged {
            old_state: state_pb(old) as i32,
            new_state: state_pb(new) as i32,
        }),
        EventKind::Hotplug { attached, socket } => Kind::Hotplug(pb::Hotplug {
            attached,
            socket_path: socket.display().to_string(),
        }),
        EventKind::Progress {
            operation,
            phase,
            done,
            total,
        } => Kind::Progress(pb::Progress {
            operation: operation.into(),
            phase,
            done_bytes: done,
            total_bytes: total,
        }),
        EventKind::ExportError { message } => Kind::ExportError(pb::ExportError { message }),
        EventKind::BackendRemoved { reason, device } => Kind::BackendRemoved(pb::BackendRemoved {
            reason,
            device: device.display().to_string(),
        }),
        EventKind::BackendResumed {
            device,
            previous_device,
        } => Kind::BackendResumed(pb::BackendResumed {
            device: device.display().to_string(),
            previous_device: previous_device.display().to_string(),
        }),
        EventKind::IoTimeout { requests } => Kind::IoTimeout(pb::IoTimeout { requests }),
    };
    pb::Event {
        unix_ms: e.unix_ms,
        pool: e.pool,
        name: e.name,
        kind: Some(kind),
    }
}

// ---------------------------------------------------------------- the service

/// The `vmblk.v1.StorageDriver` service over a [`Driver`].
#[derive(Debug, Clone)]
pub struct Service {
    driver: Arc<Driver>,
}

impl Service {
    /// A service over `driver`.
    pub fn new(driver: Arc<Driver>) -> Service {
        Service { driver }
    }

    async fn run<T, F>(&self, f: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Arc<Driver>) -> Result<T> + Send + 'static,
    {
        let d = self.driver.clone();
        let r = tokio::task::spawn_blocking(move || f(&d))
            .await
            .map_err(|e| Error::Task(e.to_string()));
        Ok(Response::new(r.and_then(|r| r)?))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl StorageDriver for Service {
    async fn create_pool(
        &self,
        r: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            let kind = pool_kind(&r)?;
            d.create_pool(&r.name, kind).map(pool_pb)
        })
        .await
    }

    async fn get_pool(&self, r: Request<pb::GetPoolRequest>) -> Result<Response<pb::Pool>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.get_pool(&r.name).map(pool_pb)).await
    }

    async fn list_pools(
        &self,
        _r: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        self.run(|d| {
            Ok(pb::ListPoolsResponse {
                pools: d.list_pools().into_iter().map(pool_pb).collect(),
            })
        })
        .await
    }

    async fn delete_pool(
        &self,
        r: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.delete_pool(&r.name)
                .map(|existed| pb::DeletePoolResponse { existed })
        })
        .await
    }

    async fn create_volume(
        &self,
        r: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let req = NewVolume {
            id: volume_id(r.pool, r.name),
            size_bytes: r.size_bytes,
            origin: origin(r.origin),
            grow_last_partition: r.grow_last_partition,
        };
        self.run(move |d| d.create_volume(req).map(volume_pb)).await
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let id = volume_id(r.pool, r.name);
        self.run(move |d| d.get_volume(&id).map(volume_pb)).await
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.list_volumes(&r.pool).map(|v| pb::ListVolumesResponse {
                volumes: v.into_iter().map(volume_pb).collect(),
            })
        })
        .await
    }

    async fn grow_volume(
        &self,
        r: Request<pb::GrowVolumeRequest>,
    ) -> Result<Response<pb::GrowVolumeResponse>, Status> {
        let r = r.into_inner();
        let req = GrowVolume {
            id: volume_id(r.pool, r.name),
            size_bytes: r.size_bytes,
            grow_last_partition: r.grow_last_partition,
        };
        self.run(move |d| {
            d.grow_volume(req).map(|g| pb::GrowVolumeResponse {
                volume: Some(volume_pb(g.volume)),
                table_repaired: g.table_repaired,
                note: g.note,
            })
        })
        .await
    }

    async fn rename_volume(
        &self,
        r: Request<pb::RenameVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        let id = volume_id(r.pool, r.name);
        self.run(move |d| d.rename_volume(&id, &r.new_name).map(volume_pb))
            .await
    }

    async fn publish_volume(
        &self,
        r: Request<pb::PublishVolumeRequest>,
    ) -> Result<Response<pb::PublishVolumeResponse>, Status> {
        let r = r.into_inner();
        let compression = match pb::ImageCompression::try_from(r.compression) {
            Ok(pb::ImageCompression::Zlib) => image_unpack::Compression::Zlib,
            Ok(pb::ImageCompression::Zstd) => image_unpack::Compression::Zstd,
            Err(_) => {
                return Err(Error::BadRequest(format!(
                    "unknown image compression {}",
                    r.compression
                ))
                .into())
            }
        };
        let id = volume_id(r.pool, r.name);
        let snapshot = (!r.snapshot.is_empty()).then_some(r.snapshot);
        let path = PathBuf::from(r.path);
        self.run(move |d| {
            d.publish_volume(&id, snapshot.as_deref(), &path, compression)
                .map(|rep| pb::PublishVolumeResponse {
                    path: rep.output.display().to_string(),
                    virtual_size: rep.virtual_size,
                    file_bytes: rep.file_bytes,
                    compressed_clusters: rep.compressed_clusters,
                    raw_clusters: rep.raw_clusters,
                    zero_clusters: rep.zero_clusters,
                })
        })
        .await
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = volume_id(r.pool, r.name);
        self.run(move |d| {
            d.delete_volume(&id)
                .map(|existed| pb::DeleteVolumeResponse { existed })
        })
        .await
    }

    async fn get_volume_usage(
        &self,
        r: Request<pb::GetVolumeUsageRequest>,
    ) -> Result<Response<pb::VolumeUsage>, Status> {
        let r = r.into_inner();
        let id = volume_id(r.pool, r.name);
        self.run(move |d| {
            d.volume_usage(&id).map(|u| pb::VolumeUsage {
                size_bytes: u.size_bytes,
                allocated_bytes: u.allocated_bytes,
            })
        })
        .await
    }

    async fn attach_volume(
        &self,
        r: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = r.into_inner();
        let o = AttachOptions {
            logical_block_size: r.logical_block_size,
            read_only: r.read_only,
            num_queues: r.num_queues,
            queue_size: r.queue_size,
            force: r.force,
        };
        let id = volume_id(r.pool, r.name);
        self.run(move |d| d.attach_volume(&id, o).map(attachment_pb))
            .await
    }

    async fn detach_volume(
        &self,
        r: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        let r = r.into_inner();
        let id = volume_id(r.pool, r.name);
        self.run(move |d| {
            d.detach_volume(&id)
                .map(|was_attached| pb::DetachVolumeResponse { was_attached })
        })
        .await
    }

    async fn import_image(
        &self,
        r: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            let f = r
                .image
                .ok_or_else(|| Error::BadRequest("image is required".into()))?;
            let req = ImageImport {
                pool: r.pool,
                fingerprint: r.fingerprint,
                image: PathBuf::from(f.path),
                metadata: (!f.metadata_path.is_empty()).then(|| PathBuf::from(f.metadata_path)),
            };
            d.import_image(req).map(|i| pb::ImportImageResponse {
                image: Some(image_pb(i.image)),
                unpacked: i.unpacked,
            })
        })
        .await
    }

    async fn list_images(
        &self,
        r: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.list_images(&r.pool).map(|i| pb::ListImagesResponse {
                images: i.into_iter().map(image_pb).collect(),
            })
        })
        .await
    }

    async fn delete_image(
        &self,
        r: Request<pb::DeleteImageRequest>,
    ) -> Result<Response<pb::DeleteImageResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.delete_image(&r.pool, &r.fingerprint)
                .map(|existed| pb::DeleteImageResponse { existed })
        })
        .await
    }

    async fn create_snapshot(
        &self,
        r: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let r = r.into_inner();
        let id = volume_id(r.pool, r.volume);
        self.run(move |d| d.create_snapshot(&id, &r.name).map(snapshot_pb))
            .await
    }

    async fn list_snapshots(
        &self,
        r: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.list_snapshots(&r.pool, &r.volume)
                .map(|l| pb::ListSnapshotsResponse {
                    snapshots: l.into_iter().map(snapshot_pb).collect(),
                })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        r: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.delete_snapshot(&r.pool, &r.name)
                .map(|existed| pb::DeleteSnapshotResponse { existed })
        })
        .await
    }

    async fn restore_snapshot(
        &self,
        r: Request<pb::RestoreSnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.restore_snapshot(&r.pool, &r.name).map(volume_pb))
            .await
    }

    type WatchStream = EventStream;

    async fn watch(&self, r: Request<pb::WatchRequest>) -> Result<Response<EventStream>, Status> {
        let r = r.into_inner();
        let rx = self.driver.subscribe();
        let s = BroadcastStream::new(rx).filter_map(move |e| match e {
            Ok(e)
                if (r.pool.is_empty() || e.pool == r.pool)
                    && (r.name.is_empty() || e.name == r.name) =>
            {
                Some(Ok(event_pb(e)))
            }
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "a Watch client fell behind; events dropped");
                None
            }
        });
        Ok(Response::new(Box::pin(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn enospc_anywhere_in_the_chain_is_resource_exhausted() {
        let e = Error::Io {
            step: "writing",
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert_eq!(status_code(&e), Code::ResourceExhausted);
    }

    #[test]
    fn other_io_errors_are_internal() {
        let e = Error::Io {
            step: "writing",
            path: "/x".into(),
            source: io::Error::from_raw_os_error(libc::EIO),
        };
        assert_eq!(status_code(&e), Code::Internal);
        assert_eq!(Status::from(e).code(), Code::Internal);
    }

    #[test]
    fn domain_errors_map_to_their_codes() {
        let id = VolumeId::new("p", "v");
        let cases = [
            (Error::volume_busy(&id), Code::Aborted),
            (Error::VolumeNotFound(id.clone()), Code::NotFound),
            (Error::PoolNotFound("p".into()), Code::NotFound),
            (
                Error::Attached {
                    id: id.clone(),
                    what: "x",
                },
                Code::FailedPrecondition,
            ),
            (Error::NotReady(id), Code::FailedPrecondition),
            (Error::NoSpace("x".into()), Code::ResourceExhausted),
            (Error::BadRequest("x".into()), Code::InvalidArgument),
            (
                Error::AlreadyExists {
                    what: "x".into(),
                    how: "y".into(),
                },
                Code::AlreadyExists,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(status_code(&e), code, "{e}");
        }
    }
}
