//! Processes the harness starts: each one runs in its own process group with its output
//! in log files, and is killed (by PID) and reaped on drop, also when a test panics.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// A child process owned by a test.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    pid: u32,
    child: Arc<Mutex<Child>>,
    status: Option<ExitStatus>,
    stdout: PathBuf,
    stderr: PathBuf,
    finished: Arc<AtomicBool>,
}

impl ManagedProcess {
    /// Spawns `cmd` with stdin closed and stdout/stderr in `<log_dir>/<name>.stdout|stderr`.
    /// The child leads a new process group and gets SIGKILL if the spawning thread dies.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        let stdout = log_dir.join(format!("{name}.stdout"));
        let stderr = log_dir.join(format!("{name}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).context("creating stdout log")?)
            .stderr(File::create(&stderr).context("creating stderr log")?)
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let shown = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {shown}"))?;
        tracing::info!(name, pid = child.id(), cmd = %shown, "started");
        Ok(Self {
            name: name.to_owned(),
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            status: None,
            stdout: stdout.clone(),
            stderr,
            finished: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its exit status if it has exited; reaps it.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(st) = child.try_wait().context("waitpid")? {
                self.finished.store(true, Ordering::SeqCst);
                self.status = Some(st);
            }
        }
        Ok(self.status)
    }

    /// Waits at most `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGKILL to its process group and reaps it. Idempotent.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.status {
            return Ok(st);
        }
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        // The child is not reaped yet (status is None), so its pid is still ours.
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let st = child.wait().context("reaping killed child")?;
        self.finished.store(true, Ordering::SeqCst);
        self.status = Some(st);
        tracing::info!(name = %self.name, pid = self.pid, "killed");
        Ok(st)
    }

    /// Sends SIGTERM to the process group, waits up to `grace`, then kills it.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if self.try_wait()?.is_none() {
            let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGTERM);
            if let Some(st) = self.wait_timeout(grace)? {
                return Ok(st);
            }
        }
        self.kill()
    }

    /// Starts a thread that kills the process group at `deadline` unless it has been
    /// reaped by then.
    pub fn arm_watchdog(&self, deadline: Instant) {
        let child = Arc::clone(&self.child);
        let finished = Arc::clone(&self.finished);
        let (name, pid) = (self.name.clone(), self.pid);
        std::thread::spawn(move || loop {
            if finished.load(Ordering::SeqCst) {
                return;
            }
            if Instant::now() >= deadline {
                let mut child = child.lock().unwrap_or_else(|e| e.into_inner());
                // Checked under the lock: the child is not reaped, so the pid is ours.
                if !finished.load(Ordering::SeqCst) {
                    tracing::warn!(name, pid, "watchdog: deadline passed, killing");
                    let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    let _ = child.kill();
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        });
    }

    /// Path of the stdout log.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout
    }

    /// Path of the stderr log.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr
    }

    /// Contents of the stderr log so far.
    pub fn stderr(&self) -> String {
        std::fs::read(&self.stderr)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(name = %self.name, pid = self.pid, "teardown: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // Signal 0 only checks existence; a reaped child is gone.
        nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_ok()
    }

    fn sleeper(dir: &Path) -> ManagedProcess {
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        ManagedProcess::spawn("sleeper", cmd, dir).unwrap()
    }

    #[test]
    fn drop_kills_and_reaps_even_when_panicking() {
        let dir = tempfile::tempdir().unwrap();
        let p = sleeper(dir.path());
        let pid = p.pid();
        assert!(alive(pid));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _p = p;
            panic!("test failure");
        }));
        assert!(r.is_err());
        assert!(!alive(pid));
    }

    #[test]
    fn watchdog_kills_at_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper(dir.path());
        p.arm_watchdog(Instant::now() + Duration::from_millis(300));
        let st = p.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(st.is_some_and(|s| !s.success()));
    }

    #[test]
    fn terminate_stops_a_process_that_honours_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = sleeper(dir.path());
        let st = p.terminate(Duration::from_secs(5)).unwrap();
        assert!(!st.success());
        assert!(p.try_wait().unwrap().is_some());
    }
}
