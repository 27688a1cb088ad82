//! Exports: anything that serves a vhost-user-blk socket for the guest.
//!
//! ```text
//!   volume (loop device, file) ──> Export ──unix socket──> QEMU vhost-user-blk-pci
//!                                  ├─ QsdExport      qemu-storage-daemon
//!                                  └─ CommandExport  any command that creates the socket
//!                                                    (e.g. `vmblk export VOLUME --socket ..`)
//! ```
//!
//! Every export owns its process (killed and reaped on drop) and its socket directory
//! (removed on drop). When a test panics, the export's stderr is printed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process::ManagedProcess;
use crate::util::{tail, wait_until};

/// How long an export may take to create its socket.
pub const EXPORT_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// A running vhost-user-blk server.
pub trait Export: std::fmt::Debug {
    /// Short name for logs.
    fn name(&self) -> &str;
    /// The vhost-user socket QEMU connects to.
    fn socket(&self) -> &Path;
    /// Number of virtqueues it serves (QEMU's `num-queues` must not exceed it).
    fn num_queues(&self) -> u16;
    /// Its stderr so far.
    fn logs(&self) -> String;
    /// Fails if the server process has exited.
    fn check_alive(&mut self) -> Result<()>;
}

/// Waits for `socket` to appear while `proc` runs.
fn wait_for_socket(proc: &mut ManagedProcess, socket: &Path) -> Result<()> {
    let ready = wait_until(EXPORT_READY_TIMEOUT, Duration::from_millis(50), || {
        if socket.exists() {
            return Ok(Some(()));
        }
        if let Some(st) = proc.try_wait()? {
            bail!(
                "{} exited ({st}) before creating {}:\n{}",
                proc.name(),
                socket.display(),
                tail(&proc.stderr(), 40)
            );
        }
        Ok(None)
    })?;
    if ready.is_none() {
        bail!(
            "{} did not create {} within {EXPORT_READY_TIMEOUT:?}:\n{}",
            proc.name(),
            socket.display(),
            tail(&proc.stderr(), 40)
        );
    }
    Ok(())
}

fn print_on_panic(name: &str, logs: &str) {
    if std::thread::panicking() {
        eprintln!(
            "---- export {name}: stderr (tail) ----\n{}\n----",
            tail(logs, 40)
        );
    }
}

/// Which QEMU block driver opens the volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QsdDriver {
    /// `driver=host_device`: a block device.
    HostDevice,
    /// `driver=file`: a regular file.
    File,
}

/// Parameters of a [`QsdExport`].
#[derive(Debug, Clone)]
pub struct QsdParams {
    /// The volume: a block device or a file.
    pub volume: PathBuf,
    /// Block driver.
    pub driver: QsdDriver,
    /// `cache.direct` (O_DIRECT on the volume).
    pub cache_direct: bool,
    /// Logical block size presented to the guest.
    pub logical_block_size: u32,
    /// Virtqueues.
    pub num_queues: u16,
    /// Writable export.
    pub writable: bool,
}

impl QsdParams {
    /// A writable host_device export of `volume` with O_DIRECT, 512-byte blocks, 1 queue.
    pub fn host_device(volume: &Path) -> Self {
        Self {
            volume: volume.to_owned(),
            driver: QsdDriver::HostDevice,
            cache_direct: true,
            logical_block_size: 512,
            num_queues: 1,
            writable: true,
        }
    }
}

/// `qemu-storage-daemon` exporting one volume over vhost-user-blk.
#[derive(Debug)]
pub struct QsdExport {
    params: QsdParams,
    socket: PathBuf,
    proc: ManagedProcess,
    _dir: tempfile::TempDir,
}

impl QsdExport {
    /// Starts the daemon and waits for its socket.
    pub fn start(params: QsdParams) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmblk-qsd-")
            .tempdir()
            .context("creating export directory")?;
        let socket = dir.path().join("vhost.sock");
        let driver = match params.driver {
            QsdDriver::HostDevice => "host_device",
            QsdDriver::File => "file",
        };
        let onoff = |b: bool| if b { "on" } else { "off" };
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver={driver},node-name=disk0,filename={},cache.direct={},aio=threads",
                params.volume.display(),
                onoff(params.cache_direct)
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable={},logical-block-size={},num-queues={}",
                socket.display(),
                onoff(params.writable),
                params.logical_block_size,
                params.num_queues
            ));
        let mut proc = ManagedProcess::spawn("qemu-storage-daemon", cmd, dir.path())?;
        wait_for_socket(&mut proc, &socket)?;
        Ok(Self {
            params,
            socket,
            proc,
            _dir: dir,
        })
    }

    /// The parameters it was started with.
    pub fn params(&self) -> &QsdParams {
        &self.params
    }
}

impl Export for QsdExport {
    fn name(&self) -> &str {
        "qemu-storage-daemon"
    }
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn num_queues(&self) -> u16 {
        self.params.num_queues
    }
    fn logs(&self) -> String {
        self.proc.stderr()
    }
    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_wait()? {
            bail!(
                "qemu-storage-daemon exited ({st}):\n{}",
                tail(&self.logs(), 40)
            );
        }
        Ok(())
    }
}

impl Drop for QsdExport {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        print_on_panic("qemu-storage-daemon", &self.proc.stderr());
    }
}

/// Parameters of a [`CommandExport`].
#[derive(Debug, Clone)]
pub struct CommandExportParams {
    /// Short name for logs.
    pub name: String,
    /// Program to run.
    pub program: PathBuf,
    /// Its arguments; every `{socket}` is replaced by the socket path.
    pub args: Vec<String>,
    /// Virtqueues it serves.
    pub num_queues: u16,
}

impl CommandExportParams {
    /// `vmblk export VOLUME --socket {socket} --logical-block-size N`. The binary is
    /// `$VMBLK_BIN` or `target/debug/vmblk`.
    pub fn vmblk(volume: &Path, logical_block_size: u32) -> Self {
        let program = crate::util::vmblk_bin();
        Self {
            name: "vmblk-export".into(),
            program,
            args: vec![
                "export".into(),
                volume.display().to_string(),
                "--socket".into(),
                "{socket}".into(),
                "--logical-block-size".into(),
                logical_block_size.to_string(),
            ],
            num_queues: 1,
        }
    }
}

/// Any command that serves vhost-user-blk on a socket path it is given.
#[derive(Debug)]
pub struct CommandExport {
    params: CommandExportParams,
    socket: PathBuf,
    proc: ManagedProcess,
    /// Stderr of the processes before the last [`CommandExport::restart`].
    earlier_logs: String,
    starts: u32,
    _dir: tempfile::TempDir,
}

impl CommandExport {
    /// Runs the command and waits for the socket.
    pub fn start(params: CommandExportParams) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmblk-export-")
            .tempdir()
            .context("creating export directory")?;
        let socket = dir.path().join("vhost.sock");
        let proc = Self::spawn(&params, &socket, dir.path(), &params.name)?;
        Ok(Self {
            params,
            socket,
            proc,
            earlier_logs: String::new(),
            starts: 1,
            _dir: dir,
        })
    }

    fn spawn(
        params: &CommandExportParams,
        socket: &Path,
        dir: &Path,
        log_name: &str,
    ) -> Result<ManagedProcess> {
        let sock = socket.display().to_string();
        let mut cmd = Command::new(&params.program);
        cmd.args(params.args.iter().map(|a| a.replace("{socket}", &sock)));
        let mut proc = ManagedProcess::spawn(log_name, cmd, dir)?;
        wait_for_socket(&mut proc, socket)?;
        Ok(proc)
    }

    /// The server's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL now (a crash); the socket file stays behind, as it would.
    pub fn kill(&mut self) -> Result<std::process::ExitStatus> {
        self.proc.kill()
    }

    /// Starts the command again on the same socket path (after [`CommandExport::kill`],
    /// or killing it first), and waits for the new socket.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill()?;
        self.earlier_logs.push_str(&self.proc.stderr());
        // The stale socket of the dead server: gone before the new one appears, so that
        // waiting for the socket waits for the new server.
        let _ = std::fs::remove_file(&self.socket);
        self.starts += 1;
        let name = format!("{}-{}", self.params.name, self.starts);
        self.proc = Self::spawn(&self.params, &self.socket, self._dir.path(), &name)?;
        Ok(())
    }

    /// Stderr of every process this export ran, in order.
    pub fn all_logs(&self) -> String {
        format!("{}{}", self.earlier_logs, self.proc.stderr())
    }
}

impl Export for CommandExport {
    fn name(&self) -> &str {
        &self.params.name
    }
    fn socket(&self) -> &Path {
        &self.socket
    }
    fn num_queues(&self) -> u16 {
        self.params.num_queues
    }
    fn logs(&self) -> String {
        self.proc.stderr()
    }
    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_wait()? {
            bail!(
                "{} exited ({st}):\n{}",
                self.params.name,
                tail(&self.logs(), 40)
            );
        }
        Ok(())
    }
}

impl Drop for CommandExport {
    fn drop(&mut self) {
        let _ = self.proc.terminate(Duration::from_secs(2));
        print_on_panic(&self.params.name, &self.proc.stderr());
    }
}
