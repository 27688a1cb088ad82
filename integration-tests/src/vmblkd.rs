//! The real `vmblkd` for guest tests, driven through the `vmblk` client commands
//! (`vmblk volume ... --json`), so the tests need no gRPC code of their own.
//!
//! ```text
//!  Vmblkd::start(config yaml) ── vmblkd --socket <dir>/vmblkd.sock --state-dir <dir>/state
//!       │                                 --config <dir>/vmblkd.yaml   (ManagedProcess)
//!  vd.vmblk(["volume", "attach", ...]) ── vmblk --socket .. --json volume attach ..
//!       └─ socket_path ──> GuestDisk::socket(..) ──> QEMU
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::process::ManagedProcess;
use crate::util::{tail, target_dir, vmblk_bin, wait_until};

/// The `vmblkd` binary: `$VMBLKD_BIN`, else `target/debug/vmblkd`.
pub fn vmblkd_bin() -> PathBuf {
    let p = std::env::var_os("VMBLKD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("debug/vmblkd"));
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p vmblkd; scripts/test.sh does)",
        p.display()
    );
    p
}

/// A running vmblkd in a temporary directory.
#[derive(Debug)]
pub struct Vmblkd {
    proc: ManagedProcess,
    socket: PathBuf,
    starts: u32,
    earlier_logs: String,
    dir: tempfile::TempDir,
}

impl Vmblkd {
    /// Writes `config` (YAML) and starts the daemon; waits for its gRPC socket.
    pub fn start(config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("vmblkd-")
            .tempdir()
            .context("creating vmblkd directory")?;
        std::fs::write(dir.path().join("vmblkd.yaml"), config)?;
        let socket = dir.path().join("vmblkd.sock");
        let proc = Self::spawn(dir.path(), &socket, "vmblkd")?;
        Ok(Self {
            proc,
            socket,
            starts: 1,
            earlier_logs: String::new(),
            dir,
        })
    }

    fn spawn(dir: &Path, socket: &Path, name: &str) -> Result<ManagedProcess> {
        let mut cmd = Command::new(vmblkd_bin());
        cmd.arg("--socket")
            .arg(socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--config")
            .arg(dir.join("vmblkd.yaml"))
            .env("RUST_LOG", "info");
        let mut proc = ManagedProcess::spawn(name, cmd, dir)?;
        let up = wait_until(Duration::from_secs(30), Duration::from_millis(20), || {
            if let Some(st) = proc.try_wait()? {
                bail!(
                    "vmblkd exited at startup ({st}):\n{}",
                    tail(&proc.stderr(), 40)
                );
            }
            Ok(std::os::unix::net::UnixStream::connect(socket)
                .is_ok()
                .then_some(()))
        })?;
        if up.is_none() {
            bail!("vmblkd did not start:\n{}", tail(&proc.stderr(), 40));
        }
        Ok(proc)
    }

    /// The daemon's directory (config, state, exports, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The gRPC socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill().map(|_| ())
    }

    /// Starts the daemon again with the same config and state (killing it first if it
    /// runs).
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill()?;
        self.earlier_logs.push_str(&self.proc.stderr());
        self.starts += 1;
        let name = format!("vmblkd-{}", self.starts);
        self.proc = Self::spawn(self.dir.path(), &self.socket, &name)?;
        Ok(())
    }

    /// Fails if the daemon has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.proc.try_wait()? {
            bail!("vmblkd exited ({st}):\n{}", tail(&self.logs(), 60));
        }
        Ok(())
    }

    /// The log of the running daemon process (since the last restart).
    pub fn current_logs(&self) -> String {
        self.proc.stderr()
    }

    /// The log of every daemon process so far.
    pub fn logs(&self) -> String {
        format!("{}{}", self.earlier_logs, self.proc.stderr())
    }

    /// Runs `vmblk --socket <socket> --json <args>` and returns its JSON output; fails
    /// when it exits non-zero.
    pub fn vmblk(&self, args: &[&str]) -> Result<Value> {
        let mut cmd = Command::new(vmblk_bin());
        // Global options go after the subcommand group (`vmblk volume --socket ..`).
        let (group, rest) = args.split_first().context("empty vmblk command")?;
        cmd.arg(group)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .args(rest);
        let out = cmd
            .stdin(std::process::Stdio::null())
            .output()
            .context("running vmblk")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!(
                "vmblk {} failed ({}): {stdout}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_str(&stdout)
            .with_context(|| format!("parsing the output of vmblk {}: {stdout}", args.join(" ")))
    }

    /// `backend_state` of the attachment of `pool/name` ("active", "removed", "missing").
    pub fn backend_state(&self, pool: &str, name: &str) -> Result<String> {
        let v = self.vmblk(&["volume", "get", name, "--pool", pool])?;
        Ok(v["attachment"]["backend_state"]
            .as_str()
            .unwrap_or("not-attached")
            .to_owned())
    }

    /// Waits (bounded) until every `(pool, name)` has `backend_state == want`; returns
    /// the time it took.
    pub fn wait_backend_state(
        &self,
        vols: &[(&str, &str)],
        want: &str,
        timeout: Duration,
    ) -> Result<Duration> {
        let t0 = std::time::Instant::now();
        let mut last = Vec::new();
        let ok = wait_until(timeout, Duration::from_millis(100), || {
            last = vols
                .iter()
                .map(|(p, n)| self.backend_state(p, n))
                .collect::<Result<Vec<_>>>()?;
            Ok(last.iter().all(|s| s == want).then_some(()))
        })?;
        if ok.is_none() {
            bail!(
                "volumes {vols:?} not {want} within {timeout:?}: {last:?}\n{}",
                tail(&self.logs(), 40)
            );
        }
        Ok(t0.elapsed())
    }
}

impl Drop for Vmblkd {
    fn drop(&mut self) {
        // SIGTERM: the daemon detaches its exports in order; then SIGKILL.
        let _ = self.proc.terminate(Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "---- vmblkd log (tail) ----\n{}\n----",
                tail(&self.logs(), 60)
            );
        }
    }
}
