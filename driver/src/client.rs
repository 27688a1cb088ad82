//! Connecting to vmblkd over its unix socket.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! let mut c = vmblkd::client::connect("/run/vmblk/vmblkd.sock").await?;
//! let pools = c.list_pools(vmblk_proto::v1::ListPoolsRequest {}).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};
use vmblk_proto::v1::storage_driver_client::StorageDriverClient;

/// The default socket of vmblkd.
pub use crate::config::DEFAULT_SOCKET;

/// A connected client.
pub type Client = StorageDriverClient<Channel>;

/// Connects to vmblkd's gRPC unix socket.
pub async fn connect(socket: impl AsRef<Path>) -> Result<Client, tonic::transport::Error> {
    connect_with_timeout(socket, None).await
}

/// Connects with a bound on every call (until its response starts).
pub async fn connect_with_timeout(
    socket: impl AsRef<Path>,
    timeout: Option<std::time::Duration>,
) -> Result<Client, tonic::transport::Error> {
    let socket: PathBuf = socket.as_ref().to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    let mut endpoint = Endpoint::from_static("http://vmblkd.local");
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let s = tokio::net::UnixStream::connect(socket).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await?;
    Ok(StorageDriverClient::new(channel))
}

/// A client for synchronous code: owns a small runtime.
#[derive(Debug)]
pub struct BlockingClient {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl BlockingClient {
    /// Connects to `socket`.
    pub fn connect(socket: impl AsRef<Path>) -> anyhow::Result<BlockingClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let path = socket.as_ref().to_owned();
        let client = rt
            .block_on(connect(&path))
            .map_err(|e| anyhow::anyhow!("connecting to vmblkd at {}: {e}", path.display()))?;
        Ok(BlockingClient { rt, client })
    }

    /// A handle to make calls with (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs a call to completion.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}
