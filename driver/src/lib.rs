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
//!                        │ hotplug: Monitor (hotplug.rs): kernel uevents, identity.rs
//!                        │          ──► remove / resume exports of block-pool volumes
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
mod hotplug;
mod identity;
mod incus_images;
pub mod model;
mod names;
pub mod pool;
mod server;
mod service;
mod state;
mod sys;
#[cfg(feature = "test-hooks")]
mod test_hooks;

pub mod client;
pub mod hook;

pub use config::{
    AttachmentConfig, Config, ConfigError, ExportDefaults, HotplugConfig, IncusConfig, PoolConfig,
    PoolKind, RbdPoolConfig, SocketAccess, DEFAULT_CONFIG_PATH, DEFAULT_IO_TIMEOUT_MS,
    DEFAULT_POOL, DEFAULT_SOCKET, DEFAULT_STATE_DIR,
};
pub use driver::{Driver, DriverParams};
pub use error::Error;
pub use export::{
    BackendEvent, BackendState, EventSink, ExportHandle, ExportParams, Exporter, OnExit,
    VhostExporter,
};
#[cfg(any(test, feature = "test-utils"))]
pub use export::{FakeExport, FakeExporter};
pub use hotplug::{
    reconcile, Decision, HotplugHost, Monitor, MonitorHandle, Tracked, TrackedState, Uevent,
};
pub use identity::{BlockDev, DeviceIdentity, Sysfs};
pub use server::{init_tracing, run, serve, Args, LogFormat, Settings};
pub use service::Service;
