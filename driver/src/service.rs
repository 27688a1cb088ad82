//! The gRPC service: each call runs the blocking [`Driver`] method on tokio's blocking
//! pool; errors become statuses through `From<Error> for Status` (error.rs) only.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{wrappers::BroadcastStream, Stream, StreamExt};
use tonic::{Request, Response, Status};
use vmblk_proto::v1 as pb;
use vmblk_proto::v1::storage_driver_server::StorageDriver;

use crate::driver::Driver;
use crate::error::{Error, Result};

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
        self.run(move |d| d.create_pool(r)).await
    }

    async fn get_pool(&self, r: Request<pb::GetPoolRequest>) -> Result<Response<pb::Pool>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.get_pool(&r.name)).await
    }

    async fn list_pools(
        &self,
        _r: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        self.run(|d| {
            Ok(pb::ListPoolsResponse {
                pools: d.list_pools(),
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
        self.run(move |d| d.create_volume(r)).await
    }

    async fn get_volume(
        &self,
        r: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.get_volume(&r.pool, &r.name)).await
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.list_volumes(&r.pool)
                .map(|volumes| pb::ListVolumesResponse { volumes })
        })
        .await
    }

    async fn grow_volume(
        &self,
        r: Request<pb::GrowVolumeRequest>,
    ) -> Result<Response<pb::GrowVolumeResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.grow_volume(r)).await
    }

    async fn delete_volume(
        &self,
        r: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.delete_volume(&r.pool, &r.name)
                .map(|existed| pb::DeleteVolumeResponse { existed })
        })
        .await
    }

    async fn get_volume_usage(
        &self,
        r: Request<pb::GetVolumeUsageRequest>,
    ) -> Result<Response<pb::VolumeUsage>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.volume_usage(&r.pool, &r.name)).await
    }

    async fn attach_volume(
        &self,
        r: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.attach_volume(r)).await
    }

    async fn detach_volume(
        &self,
        r: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.detach_volume(&r.pool, &r.name)
                .map(|was_attached| pb::DetachVolumeResponse { was_attached })
        })
        .await
    }

    async fn import_image(
        &self,
        r: Request<pb::ImportImageRequest>,
    ) -> Result<Response<pb::ImportImageResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| d.import_image(r)).await
    }

    async fn list_images(
        &self,
        r: Request<pb::ListImagesRequest>,
    ) -> Result<Response<pb::ListImagesResponse>, Status> {
        let r = r.into_inner();
        self.run(move |d| {
            d.list_images(&r.pool)
                .map(|images| pb::ListImagesResponse { images })
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

    type WatchStream = EventStream;

    async fn watch(&self, r: Request<pb::WatchRequest>) -> Result<Response<EventStream>, Status> {
        let r = r.into_inner();
        let rx = self.driver.subscribe();
        let s = BroadcastStream::new(rx).filter_map(move |e| match e {
            Ok(e)
                if (r.pool.is_empty() || e.pool == r.pool)
                    && (r.name.is_empty() || e.name == r.name) =>
            {
                Some(Ok(e))
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
