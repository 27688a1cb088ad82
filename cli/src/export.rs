//! `vmblk export`: serve a volume over vhost-user-blk until SIGINT or SIGTERM.

use std::path::PathBuf;

use clap::Args;
use nix::sys::signal::{SigSet, Signal};
use vhost_blk::{ExportConfig, StopHandle};

/// `vmblk export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The volume: a block device or regular file, an RBD image in QEMU's syntax
    /// (`rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER][:keyring=PATH]`; a
    /// snapshot is served read-only), or `null:SIZE` (reads zeros, drops writes).
    pub volume: PathBuf,
    /// The unix socket QEMU connects to (replaced if it exists).
    #[arg(long)]
    pub socket: PathBuf,
    /// Logical block size the guest sees: the sector size the image was built for.
    #[arg(long, default_value_t = 512)]
    pub logical_block_size: u32,
    /// Refuse writes (the guest sees a read-only disk).
    #[arg(long)]
    pub read_only: bool,
    /// Number of virtqueues, each served by its own thread.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Largest virtqueue size a frontend may pick (it picks any size up to this).
    #[arg(long, default_value_t = vhost_blk::DEFAULT_QUEUE_SIZE)]
    pub queue_size: u16,
    /// Serial number the guest reads (at most 20 bytes).
    #[arg(long, default_value = "")]
    pub serial: String,
    /// Answer requests the volume has not finished after this many milliseconds with an
    /// I/O error (the guest's driver has no timeout of its own); 0: never.
    #[arg(long, default_value_t = vhost_blk::DEFAULT_IO_TIMEOUT_MS)]
    pub io_timeout_ms: u64,
    /// Longest busy-poll (µs) of a queue thread waiting for the next request or a
    /// completion at queue depth 1 (waits longer than half of it are slept through);
    /// 0: never poll (less CPU, more latency).
    #[arg(long, default_value_t = vhost_blk::DEFAULT_POLL_US)]
    pub poll_us: u32,
    /// Owner of the socket file, so an unprivileged QEMU can connect and reconnect:
    /// a user, "user:group", or "auto" (the user Incus or LXD runs QEMU as: `incus` if
    /// that user exists, else `nobody`). Default: this process's user.
    #[arg(long, default_value = "")]
    pub socket_owner: String,
    /// Mode of the socket file, octal (e.g. 0600). Default: the umask's.
    #[arg(long, default_value = "")]
    pub socket_mode: String,
    /// Print events as JSON lines on standard error and the final counters as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One line on standard error per export event (removed, resumed, timed out, frontend).
fn print_event(json: bool, ev: &vhost_blk::ExportEvent) {
    use vhost_blk::ExportEvent as E;
    if json {
        if let Ok(s) = serde_json::to_string(ev) {
            eprintln!("{s}");
        }
        return;
    }
    match ev {
        E::Removed { reason } => {
            eprintln!("vmblk export: volume removed ({reason}): requests fail until it is back")
        }
        E::Resumed { volume } => eprintln!("vmblk export: volume back at {}", volume.display()),
        E::TimedOut { requests } => {
            eprintln!("vmblk export: {requests} requests timed out (answered with an I/O error)")
        }
        E::Connected => eprintln!("vmblk export: frontend connected"),
        E::Disconnected => eprintln!("vmblk export: frontend disconnected"),
    }
}

/// Runs the export until interrupted; prints its counters on exit.
pub fn run(a: ExportArgs) -> i32 {
    // Block the stop signals in every thread (the export's threads inherit the
    // mask) and take them synchronously on one thread of our own.
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if let Err(e) = set.thread_block() {
        eprintln!("vmblk export: cannot block signals: {e}");
        return 1;
    }
    let stop = match StopHandle::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vmblk export: {}", crate::human::error_chain(&e));
            return 1;
        }
    };
    let s = stop.clone();
    std::thread::spawn(move || {
        if let Ok(sig) = set.wait() {
            tracing::info!(signal = ?sig, "stopping the export");
        }
        s.stop();
    });
    let access = vmblkd::ExportDefaults {
        socket_owner: a.socket_owner.clone(),
        socket_mode: a.socket_mode.clone(),
        ..vmblkd::ExportDefaults::default()
    }
    .socket_access();
    let access = match access {
        Ok(x) => x,
        Err(e) => {
            eprintln!(
                "vmblk export: {}",
                e.replace("exports.socket_", "--socket-")
            );
            return 2;
        }
    };
    let cfg = ExportConfig {
        socket_owner: access.uid,
        socket_group: access.gid,
        socket_mode: access.mode,
        volume: a.volume,
        socket: a.socket,
        logical_block_size: a.logical_block_size,
        read_only: a.read_only,
        num_queues: a.num_queues,
        queue_size: a.queue_size,
        serial: a.serial,
        io_timeout_ms: a.io_timeout_ms,
        poll_us: a.poll_us,
        ..ExportConfig::default()
    };
    tracing::info!(volume = %cfg.volume.display(), socket = %cfg.socket.display(), "exporting");
    let json = a.json;
    let served = vhost_blk::Export::with_stop_handle(cfg, stop).and_then(|export| {
        export
            .control()
            .set_event_sink(std::sync::Arc::new(move |ev| print_event(json, ev)));
        export.serve()?;
        let metrics = export.metrics();
        drop(export);
        // Requests the last session left in flight: the volume (an RBD image and its
        // exclusive lock) is released once they end.
        let left = vhost_blk::settle_requests_in_flight(std::time::Duration::from_secs(10));
        if left > 0 {
            eprintln!("vmblk export: exiting with requests still in flight on the volume");
        }
        Ok(metrics)
    });
    match served {
        Ok(m) => {
            let text = if a.json {
                serde_json::to_string_pretty(&m)
            } else {
                serde_json::to_string(&m)
            };
            match (text, a.json) {
                (Ok(s), true) => println!("{s}"),
                (Ok(s), false) => eprintln!("vmblk export: final counters: {s}"),
                (Err(e), _) => eprintln!("vmblk export: {e}"),
            }
            0
        }
        Err(e) => {
            eprintln!("vmblk export: {}", crate::human::error_chain(&e));
            1
        }
    }
}
