//! A real LXD daemon (Debian 12's LXD 5.0.2, whose REST API and VM options are Incus's
//! for everything vmblk uses), started by the test in a directory of its own and
//! stopped, with every VM it ran, when the test ends.
//!
//! This machine kind has no systemd as PID 1, no vhost_vsock, no AppArmor, no KVM and no
//! CAP_SYS_RESOURCE. The adaptations that lets LXD run VMs here live in this harness
//! only, each labelled where it is made:
//! - HOST: `modprobe vhost_vsock` must succeed (LXD only checks that): a `modprobe`
//!   wrapper first on LXD's PATH answers success for that module.
//! - HOST: LXD starts QEMU through `lxd forklimits limit=memlock:unlimited:unlimited`,
//!   which this machine refuses; `LXD_EXEC_PATH` points at a wrapper that drops that
//!   one limit.
//! - GUEST: TCG instead of KVM (`raw.qemu.conf` `[machine] accel = "tcg"`, `raw.qemu`
//!   `-cpu max`), no vsock device (an empty `[device "qemu_vsock"]` section deletes
//!   it), the serial console copied to a file (`[chardev "console"] logfile`).
//!   These go into the default profile, so every instance, also those `vmblk incus
//!   launch` creates, gets them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::process::ManagedProcess;
use crate::util::wait_until;

/// Longest wait for the daemon to come up or go down.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(90);

/// A running LXD daemon.
#[derive(Debug)]
pub struct Lxd {
    proc: Option<ManagedProcess>,
    dir: tempfile::TempDir,
}

/// HOST adaptation: LXD checks that `modprobe vhost_vsock` succeeds; modules cannot be
/// loaded here.
const MODPROBE: &str = "#!/bin/sh\n\
# vmblk test harness (HOST): vhost_vsock cannot be loaded on this machine; LXD only\n\
# checks that modprobe succeeds for it.\n\
for a in \"$@\"; do [ \"$a\" = vhost_vsock ] && exit 0; done\n\
exec /sbin/modprobe \"$@\"\n";

/// HOST adaptation: this machine cannot raise RLIMIT_MEMLOCK to unlimited.
const LXD_EXEC: &str = "#!/bin/bash\n\
# vmblk test harness (HOST): LXD starts QEMU through 'lxd forklimits\n\
# limit=memlock:unlimited:unlimited', which needs CAP_SYS_RESOURCE; drop that limit.\n\
if [ \"$1\" = forklimits ]; then\n\
  args=()\n\
  for a in \"$@\"; do case $a in limit=memlock:*) ;; *) args+=(\"$a\") ;; esac; done\n\
  set -- \"${args[@]}\"\n\
fi\n\
exec /usr/bin/lxd \"$@\"\n";

impl Lxd {
    /// Starts LXD in a new temporary directory with a `dir` storage pool `default`, no
    /// network, and a default profile that makes its VMs run here (see the module doc).
    pub fn start() -> Result<Lxd> {
        let dir = tempfile::Builder::new()
            .prefix("vmblk-lxd-")
            .tempdir()
            .context("creating LXD's directory")?;
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(bin.join("path"))?;
        for (p, text) in [
            (bin.join("path/modprobe"), MODPROBE),
            (bin.join("lxd-exec"), LXD_EXEC),
        ] {
            std::fs::write(&p, text)?;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
        }
        let lxd_dir = dir.path().join("lxd");
        std::fs::create_dir_all(&lxd_dir)?;
        let mut cmd = Command::new("lxd");
        cmd.args(["--group", "lxd", "--logfile"])
            .arg(dir.path().join("lxd.log"))
            .env("LXD_DIR", &lxd_dir)
            .env("LXD_EXEC_PATH", bin.join("lxd-exec"))
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    bin.join("path").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            );
        let proc = ManagedProcess::spawn("lxd", cmd, dir.path())?;
        let lxd = Lxd {
            proc: Some(proc),
            dir,
        };
        lxd.run(&["waitready", "--timeout", "60"], "lxd")?;
        let console = lxd.console_log();
        let preseed = format!(
            "storage_pools:\n\
             - name: default\n  driver: dir\n\
             profiles:\n\
             - name: default\n  devices:\n    root: {{path: /, pool: default, type: disk}}\n  \
             config:\n    limits.cpu: \"1\"\n    limits.memory: 512MiB\n    \
             # GUEST adaptations (see integration-tests/src/lxd.rs)\n    \
             raw.qemu: -cpu max\n    raw.qemu.conf: |\n      [machine]\n      accel = \"tcg\"\n\n      \
             [device \"qemu_vsock\"]\n\n      [chardev \"console\"]\n      logfile = \"{}\"\n",
            console.display()
        );
        lxd.run_with_stdin(&["init", "--preseed"], "lxd", &preseed)?;
        Ok(lxd)
    }

    /// LXD's data directory (`LXD_DIR`): its socket is `unix.socket` there.
    pub fn lxd_dir(&self) -> PathBuf {
        self.dir.path().join("lxd")
    }

    /// The REST API's socket.
    pub fn socket(&self) -> PathBuf {
        self.lxd_dir().join("unix.socket")
    }

    /// Where the VMs' serial consoles are copied (one VM runs at a time).
    pub fn console_log(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    /// The daemon's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("lxd.log")).unwrap_or_default()
    }

    /// Runs `lxc ARGS`; returns its standard output.
    pub fn lxc(&self, args: &[&str]) -> Result<String> {
        self.run(args, "lxc")
    }

    fn run(&self, args: &[&str], prog: &str) -> Result<String> {
        self.run_with_stdin(args, prog, "")
    }

    fn run_with_stdin(&self, args: &[&str], prog: &str, stdin: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new(prog)
            .args(args)
            .env("LXD_DIR", self.lxd_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {prog} {args:?}"))?;
        if let Some(mut i) = child.stdin.take() {
            i.write_all(stdin.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{prog} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The status of instance `name` ("Running", "Stopped", ...).
    pub fn status(&self, name: &str) -> Result<String> {
        let out = self.lxc(&["list", name, "--format", "csv", "-c", "s"])?;
        Ok(out.trim().to_owned())
    }

    /// Waits (bounded) until instance `name` has stopped.
    pub fn wait_stopped(&self, name: &str, timeout: Duration) -> Result<()> {
        let r = wait_until(timeout, Duration::from_millis(500), || {
            Ok((self.status(name)?.eq_ignore_ascii_case("stopped")).then_some(()))
        })?;
        if r.is_none() {
            bail!("instance {name} still runs after {timeout:?}");
        }
        Ok(())
    }

    /// PIDs of the QEMU processes LXD started (from their pid files).
    fn qemu_pids(&self) -> Vec<i32> {
        let logs = self.lxd_dir().join("logs");
        let Ok(rd) = std::fs::read_dir(logs) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("qemu.pid")).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

/// Stops `pid` with SIGKILL if it is a QEMU process.
fn kill_qemu(pid: i32) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if exe.to_string_lossy().contains("qemu-system") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Unmounts whatever LXD left mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
}

impl Drop for Lxd {
    fn drop(&mut self) {
        // A clean shutdown stops the instances; what it leaves is killed by PID.
        let _ = self.run(&["shutdown", "--timeout", "60"], "lxd");
        for pid in self.qemu_pids() {
            kill_qemu(pid);
        }
        if let Some(mut p) = self.proc.take() {
            let _ = p.terminate(DAEMON_TIMEOUT);
        }
        unmount_under(self.dir.path());
    }
}
