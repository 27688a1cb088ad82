//! HTTP/1.1 to the daemon's unix socket, and the API's response envelope: a sync
//! response carries `metadata`; an async one names an operation, waited for here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::IncusError;

/// Longest wait for one HTTP exchange.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for a background operation (instance start, creation).
const OPERATION_TIMEOUT: Duration = Duration::from_secs(600);

/// A client of one Incus or LXD daemon.
#[derive(Debug, Clone)]
pub struct IncusClient {
    socket: PathBuf,
}

/// The API's response envelope.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_code: u16,
    #[serde(default)]
    metadata: Value,
    #[serde(default)]
    operation: String,
}

impl IncusClient {
    /// A client of the daemon listening on `socket` (nothing is connected yet).
    pub fn new(socket: impl Into<PathBuf>) -> IncusClient {
        IncusClient {
            socket: socket.into(),
        }
    }

    /// The daemon's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Connects a fresh stream to the socket.
    pub(crate) async fn connect(&self) -> Result<UnixStream, IncusError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|source| IncusError::Connect {
                path: self.socket.clone(),
                source,
            })
    }

    /// One HTTP exchange: returns the status and the body.
    async fn exchange(
        &self,
        method: &Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes), IncusError> {
        let http_err = |message: String| IncusError::Http {
            method: method.to_string(),
            path: path.to_owned(),
            message,
        };
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let bytes = match body {
            Some(v) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method.clone())
            .uri(path)
            // The host is unused on a unix socket, but HTTP/1.1 requires one.
            .header("Host", "localhost")
            .header("Content-Type", "application/json")
            .header("User-Agent", concat!("vmblk/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(bytes))
            .map_err(|e| http_err(e.to_string()))?;
        let res = tokio::time::timeout(CALL_TIMEOUT, async {
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| http_err(e.to_string()))?;
            let status = res.status().as_u16();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| http_err(e.to_string()))?
                .to_bytes();
            Ok::<_, IncusError>((status, body))
        })
        .await
        .map_err(|_| IncusError::Timeout {
            what: format!("{method} {path}"),
            secs: CALL_TIMEOUT.as_secs(),
        })?;
        driver.abort();
        res
    }

    /// A call whose answer is the envelope, checked for errors.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Envelope, IncusError> {
        let (status, bytes) = self.exchange(&method, path, body).await?;
        let env: Envelope = serde_json::from_slice(&bytes).map_err(|e| IncusError::Decode {
            method: method.to_string(),
            path: path.to_owned(),
            message: format!("{e}: {}", String::from_utf8_lossy(&bytes)),
        })?;
        if env.kind == "error" || status >= 400 {
            return Err(IncusError::Api {
                method: method.to_string(),
                path: path.to_owned(),
                status: if env.error_code != 0 {
                    env.error_code
                } else {
                    status
                },
                message: env.error,
            });
        }
        Ok(env)
    }

    /// GET `path`, its metadata decoded as `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, IncusError> {
        let env = self.call(Method::GET, path, None).await?;
        serde_json::from_value(env.metadata).map_err(|e| IncusError::Decode {
            method: "GET".into(),
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// A call that changes something: waits for its operation if it is asynchronous,
    /// and returns the metadata (of the operation, when there is one).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, IncusError> {
        let env = self.call(method, path, body).await?;
        if env.kind != "async" {
            return Ok(env.metadata);
        }
        self.wait_operation(&env.operation).await
    }

    /// Waits for the operation at `op` (`/1.0/operations/<id>`) to end.
    pub async fn wait_operation(&self, op: &str) -> Result<Value, IncusError> {
        let secs = OPERATION_TIMEOUT.as_secs();
        let path = format!("{op}/wait?timeout={secs}");
        let env = self.call(Method::GET, &path, None).await?;
        let status = env.metadata["status"].as_str().unwrap_or("");
        match status {
            "Success" => Ok(env.metadata),
            "Running" | "Pending" => Err(IncusError::Timeout {
                what: format!("operation {op}"),
                secs,
            }),
            _ => Err(IncusError::Operation {
                operation: op.to_owned(),
                message: env.metadata["err"]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .unwrap_or(status)
                    .to_owned(),
            }),
        }
    }
}
