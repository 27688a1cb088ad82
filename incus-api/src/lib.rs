//! Incus and LXD through what they support: their REST API on a unix socket.
//!
//! Incus has no storage-driver plugin API and never runs host programs at image import;
//! vmblk meets it through what it does offer: instances whose `raw.qemu` carries the
//! vhost-user disk of a vmblk export, images read through the API and from the daemon's
//! image directory, and the lifecycle event stream. LXD 5.0's API is Incus's for
//! everything used here.
//!
//! ```text
//!  find_socket() ─► IncusClient (HTTP/1.1 over the unix socket, one connection a call)
//!                      │ sync and async responses (operations waited for)
//!                      ├─ instances.rs: get, create (empty VM), config PATCH, start/stop
//!                      ├─ images.rs:    resolve fingerprint or alias, image files on disk
//!                      └─ events.rs:    /1.0/events websocket ─► LifecycleEvent stream
//!  raw_qemu.rs: merge / remove a vmblk disk's -chardev/-device in raw.qemu (pure)
//! ```

mod client;
mod error;
mod events;
mod images;
mod instances;
pub mod raw_qemu;
mod socket;

pub use client::IncusClient;
pub use error::IncusError;
pub use events::{LifecycleEvent, LifecycleEvents};
pub use images::{Image, ImageFiles};
pub use instances::{Instance, NewVm};
pub use socket::{find_socket, images_dir, SOCKET_CANDIDATES};
