//! vmblkd: the gRPC storage driver for VM block volumes on Incus/LXD hosts.
//!
//! ```text
//!  vmblk CLI / Incus / grpcurl ──gRPC over unix socket──► Service (service.rs)
//!                                                            │ spawn_blocking
//!                                                            ▼
//!   Config (YAML) ──► Driver (driver.rs): pools, volumes, cached images, attachments
//!                        │ records: Store (state.rs, fsync'd atomic JSON files)
//!                        │ fill:    image_unpack::unpack / repair, FICLONE (sys.rs)
//!                        │ export:  Exporter (export.rs) ──► vhost_blk::Export
//!                        └ events:  broadcast ──► Watch stream
//! ```
//!
//! Entry points: [`run`] (the daemon, what `main.rs` calls), [`client::connect`] and
//! [`client::BlockingClient`] (clients), [`hook::image_import`] (the Incus image-import
//! hook), and [`Driver`] for in-process use.

mod config;
mod driver;
mod error;
mod export;
mod names;
mod server;
mod service;
mod state;
mod sys;

pub mod client;
pub mod hook;

pub use config::{
    Config, ConfigError, ExportDefaults, PoolConfig, PoolKind, DEFAULT_CONFIG_PATH, DEFAULT_POOL,
    DEFAULT_SOCKET, DEFAULT_STATE_DIR,
};
pub use driver::{Driver, DriverParams};
pub use error::Error;
#[cfg(any(test, feature = "test-utils"))]
pub use export::FakeExporter;
pub use export::{ExportHandle, ExportParams, Exporter, OnExit, VhostExporter};
pub use server::{init_tracing, run, serve, Args, LogFormat, Settings};
pub use service::Service;
