//! A QEMU guest (TCG, q35, OVMF) booting from one or more vhost-user-blk disks.
//!
//! Every run is bounded: a watchdog kills QEMU by PID at the deadline (default 90 s),
//! and every wait is bounded too. On drop QEMU is killed and reaped, its temporary
//! files removed, and, when the test is panicking, the tail of the serial log printed.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::export::Export;
use crate::process::ManagedProcess;
use crate::report::GuestReport;
use crate::util::tail;

/// OVMF code (read-only pflash).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF variable store template (copied per guest).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Default bound of one guest run.
pub const DEFAULT_GUEST_TIMEOUT: Duration = Duration::from_secs(90);

/// One vhost-user-blk disk of the guest.
#[derive(Debug, Clone)]
pub struct GuestDisk {
    /// The export's socket.
    pub socket: PathBuf,
    /// `num-queues` of the device.
    pub num_queues: u16,
    /// Firmware boot order (lower boots first); `None` for data disks.
    pub bootindex: Option<u32>,
}

impl GuestDisk {
    /// A disk served by `export`, with its queue count.
    pub fn from_export(export: &dyn Export, bootindex: Option<u32>) -> Self {
        Self {
            socket: export.socket().to_owned(),
            num_queues: export.num_queues(),
            bootindex,
        }
    }

    /// A disk on any vhost-user-blk socket (e.g. one vmblkd serves).
    pub fn socket(socket: &Path, num_queues: u16, bootindex: Option<u32>) -> Self {
        Self {
            socket: socket.to_owned(),
            num_queues,
            bootindex,
        }
    }
}

/// How to run QEMU.
#[derive(Debug, Clone)]
pub struct GuestParams {
    /// Disks in PCI order.
    pub disks: Vec<GuestDisk>,
    /// Guest memory (MiB); also the memfd size.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Hard bound of the run; QEMU is killed at this age.
    pub timeout: Duration,
    /// Let the guest reboot (omits `-no-reboot`).
    pub allow_reboot: bool,
    /// Extra QEMU arguments.
    pub extra_args: Vec<String>,
    /// When set, the serial log is kept as `target/vmblk-guest/logs/<name>.serial.log`.
    pub log_name: Option<String>,
    /// A second UART (the guest's `/dev/ttyS1`) fed by [`Guest::send`]: the guest's
    /// `/init` reads workload commands from it (see `guest/init.sh`).
    pub control: bool,
    /// `reconnect=<secs>` on every disk's chardev: QEMU reconnects when the backend goes
    /// away (e.g. vmblkd restarted) and may start before the socket exists. `None`: QEMU
    /// connects once, at start.
    pub reconnect: Option<u32>,
}

impl Default for GuestParams {
    fn default() -> Self {
        Self {
            disks: Vec::new(),
            memory_mib: 512,
            cpus: 1,
            timeout: DEFAULT_GUEST_TIMEOUT,
            allow_reboot: false,
            extra_args: Vec::new(),
            log_name: None,
            control: false,
            reconnect: None,
        }
    }
}

impl GuestParams {
    /// One boot disk served by `export`.
    pub fn boot_from(export: &dyn Export) -> Self {
        Self {
            disks: vec![GuestDisk::from_export(export, Some(1))],
            ..Self::default()
        }
    }

    /// A boot disk and a data disk, with the control channel the guest's workload reads
    /// commands from; the serial log kept as `log_name`, the run bounded by `timeout`.
    pub fn workload(boot: GuestDisk, data: GuestDisk, log_name: &str, timeout: Duration) -> Self {
        Self {
            disks: vec![boot, data],
            control: true,
            log_name: Some(log_name.to_owned()),
            timeout,
            ..Self::default()
        }
    }

    /// Keeps the serial log under `target/vmblk-guest/logs/<name>.serial.log`.
    pub fn log_name(mut self, name: &str) -> Self {
        self.log_name = Some(name.to_owned());
        self
    }
}

/// Serial-log markers whose first appearance [`Guest`] timestamps (see
/// [`GuestOutcome::milestones`]): firmware starts the boot option, the kernel's EFI stub
/// runs, the test init reports, the first round of checks ends.
pub const MILESTONES: &[(&str, &str)] = &[
    ("firmware_boots_disk", "BdsDxe: starting Boot"),
    ("kernel_efi_stub", "EFI stub:"),
    ("init_first_report", "VMBLK-BOOT n="),
    ("checks_done", "VMBLK-DONE"),
];

/// How a guest run ended.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// QEMU's exit status; `None` if the harness killed it.
    pub exit: Option<ExitStatus>,
    /// Whether the harness had to kill QEMU (timeout or no progress).
    pub killed: bool,
    /// Time from QEMU start to exit.
    pub elapsed: Duration,
    /// Parsed guest output.
    pub report: GuestReport,
    /// Time from QEMU start at which each [`MILESTONES`] marker was first seen (to the
    /// 100 ms polling step), in order; missing markers are left out.
    pub milestones: Vec<(&'static str, Duration)>,
}

/// A running QEMU.
#[derive(Debug)]
pub struct Guest {
    proc: ManagedProcess,
    serial: PathBuf,
    started: Instant,
    deadline: Instant,
    keep_log: Option<PathBuf>,
    milestones: Vec<(&'static str, Duration)>,
    control: Option<std::fs::File>,
    next_command: u32,
    /// `VMBLK-WORKLOAD ready` lines already waited for.
    ready_seen: usize,
    dir: tempfile::TempDir,
}

/// The end of one workload command (see [`Guest::command`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// Its id.
    pub id: u32,
    /// Its exit code in the guest.
    pub rc: i32,
    /// The serial lines from its `VMBLK-CMD id=.. start` line to its end line.
    pub lines: Vec<String>,
}

impl Guest {
    /// Starts QEMU; the watchdog kills it after `params.timeout`.
    pub fn start(params: &GuestParams) -> Result<Self> {
        // A disk comes from `disks`, or from `extra_args` given as they are (a daemon's
        // -chardev/-device pair).
        if params.disks.is_empty() && !params.extra_args.iter().any(|a| a == "-device") {
            bail!("a guest needs at least one disk");
        }
        let dir = tempfile::Builder::new()
            .prefix("vmblk-guest-")
            .tempdir()
            .context("creating guest directory")?;
        let vars = dir.path().join("OVMF_VARS.fd");
        std::fs::copy(OVMF_VARS, &vars).with_context(|| format!("copying {OVMF_VARS}"))?;
        let serial = dir.path().join("serial.log");
        std::fs::File::create(&serial)?;

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "q35", "-nodefaults"])
            .args(["-m", &params.memory_mib.to_string()])
            .args(["-smp", &params.cpus.to_string()])
            .arg("-object")
            .arg(format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                params.memory_mib
            ))
            .args(["-numa", "node,memdev=mem"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,unit=1,file={}",
                vars.display()
            ));
        for (i, d) in params.disks.iter().enumerate() {
            let mut chardev = format!("socket,id=vu{i},path={}", d.socket.display());
            if let Some(r) = params.reconnect {
                chardev.push_str(&format!(",reconnect={r}"));
            }
            cmd.arg("-chardev").arg(chardev);
            let mut dev = format!(
                "vhost-user-blk-pci,chardev=vu{i},id=disk{i},disable-legacy=on,num-queues={}",
                d.num_queues
            );
            if let Some(b) = d.bootindex {
                dev.push_str(&format!(",bootindex={b}"));
            }
            cmd.arg("-device").arg(dev);
        }
        cmd.arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .args(["-display", "none", "-monitor", "none"]);
        let mut control = None;
        if params.control {
            // QEMU's pipe chardev opens <path>.in and <path>.out read-write; so does the
            // harness, so neither side blocks on the FIFOs.
            let base = dir.path().join("control");
            for ext in ["in", "out"] {
                nix::unistd::mkfifo(
                    &base.with_extension(ext),
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                )
                .context("mkfifo for the control channel")?;
            }
            control = Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(base.with_extension("in"))
                    .context("opening the control FIFO")?,
            );
            cmd.arg("-serial").arg(format!("pipe:{}", base.display()));
        }
        if !params.allow_reboot {
            cmd.arg("-no-reboot");
        }
        cmd.args(&params.extra_args);

        let proc = ManagedProcess::spawn("qemu", cmd, dir.path())?;
        let started = Instant::now();
        let deadline = started + params.timeout;
        proc.arm_watchdog(deadline);
        let keep_log = match &params.log_name {
            Some(name) => {
                let logs = crate::util::cache_dir()?.join("logs");
                std::fs::create_dir_all(&logs)?;
                Some(logs.join(format!("{name}.serial.log")))
            }
            None => None,
        };
        Ok(Self {
            proc,
            serial,
            started,
            deadline,
            keep_log,
            milestones: Vec::new(),
            control,
            next_command: 0,
            ready_seen: 0,
            dir,
        })
    }

    /// QEMU's PID.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// The serial log file.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// The serial log so far.
    pub fn serial_log(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the serial log.
    pub fn serial_tail(&self, lines: usize) -> String {
        tail(&self.serial_log(), lines)
    }

    /// QEMU's stderr so far.
    pub fn qemu_stderr(&self) -> String {
        self.proc.stderr()
    }

    /// The guest's report so far.
    pub fn report(&self) -> GuestReport {
        GuestReport::parse(&self.serial_log())
    }

    /// Waits (at most `timeout`, and never past the run's deadline) for a serial line
    /// containing `needle`; returns it. `Ok(None)` when the time is up or QEMU exited
    /// without printing it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<Option<String>> {
        self.wait_for(timeout, |log| {
            log.lines()
                .find(|l| l.contains(needle))
                .map(|l| l.trim_end().to_owned())
        })
    }

    /// Waits for `pred` to find something in the serial log (bounded like
    /// [`Guest::wait_for_line`]).
    pub fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> Option<T>,
    ) -> Result<Option<T>> {
        let end = (Instant::now() + timeout).min(self.deadline);
        loop {
            // Read the log before checking for exit, so output written just before
            // QEMU exits is seen.
            let exited = self.proc.try_wait()?.is_some();
            let log = self.serial_log();
            self.note_milestones(&log);
            if let Some(v) = pred(&log) {
                return Ok(Some(v));
            }
            if exited || Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn note_milestones(&mut self, log: &str) {
        for (name, marker) in MILESTONES {
            if !self.milestones.iter().any(|(n, _)| n == name) && log.contains(marker) {
                self.milestones.push((name, self.started.elapsed()));
            }
        }
    }

    /// Milestones seen so far (see [`GuestOutcome::milestones`]).
    pub fn milestones(&self) -> &[(&'static str, Duration)] {
        &self.milestones
    }

    /// Waits for QEMU to exit on its own, at most `timeout` (and the deadline); kills it
    /// otherwise.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<GuestOutcome> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        let exit = self.proc.wait_timeout(timeout.min(left))?;
        let killed = exit.is_none();
        let exit = match exit {
            Some(st) if !self.watchdog_fired(st) => Some(st),
            Some(_) => None,
            None => {
                self.proc.kill()?;
                None
            }
        };
        let log = self.serial_log();
        self.note_milestones(&log);
        Ok(GuestOutcome {
            exit,
            killed: killed || exit.is_none(),
            elapsed: self.started.elapsed(),
            report: GuestReport::parse(&log),
            milestones: self.milestones.clone(),
        })
    }

    /// Runs until the guest has printed `VMBLK-DONE` `boots` times and QEMU exited
    /// (or the deadline). The usual way to finish a test run.
    pub fn run_to_completion(&mut self, boots: usize) -> Result<GuestOutcome> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        self.wait_for(left, |log| {
            (GuestReport::parse(log).completed_boots() >= boots).then_some(())
        })?;
        // After the last VMBLK-DONE the guest powers off at once.
        self.wait_exit(Duration::from_secs(20))
    }

    /// Test helper: runs to completion and panics, with the serial tail, unless QEMU
    /// exited cleanly after `boots` boots that each reported `VMBLK-DONE` with every
    /// check passed.
    pub fn expect_clean_run(&mut self, boots: usize) -> GuestOutcome {
        let outcome = match self.run_to_completion(boots) {
            Ok(o) => o,
            Err(e) => panic!("guest run failed: {e:#}\n{}", self.diagnostics()),
        };
        if outcome.killed || !outcome.exit.is_some_and(|s| s.success()) {
            panic!(
                "guest did not power off cleanly (exit {:?}, killed {}, {:?})\n{}",
                outcome.exit,
                outcome.killed,
                outcome.elapsed,
                self.diagnostics()
            );
        }
        if outcome.report.completed_boots() != boots {
            panic!(
                "expected {boots} completed boot(s), saw {}\n{}",
                outcome.report.completed_boots(),
                self.diagnostics()
            );
        }
        for b in &outcome.report.boots {
            if let Err(e) = b.ensure_passed() {
                panic!("{e:#}\n{}", self.diagnostics());
            }
        }
        outcome
    }

    /// Waits (bounded) until the guest's `/init` reads commands from the control channel
    /// (`VMBLK-WORKLOAD ready`, printed once per boot): the first call waits for the first
    /// boot's line, each later call for the line of the boot after the one before (e.g.
    /// after a `reboot` command).
    pub fn wait_workload_ready(&mut self, timeout: Duration) -> Result<()> {
        let n = self.ready_seen;
        let seen = self.wait_for(timeout, |log| {
            let c = log.matches("VMBLK-WORKLOAD ready").count();
            (c > n).then_some(c)
        })?;
        match seen {
            Some(c) => {
                self.ready_seen = c;
                Ok(())
            }
            None => bail!(
                "guest did not get ready for commands\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Sends one workload command (without the id) on the control channel; returns its id.
    /// Needs [`GuestParams::control`]; the guest reads only after `VMBLK-WORKLOAD ready`.
    pub fn send(&mut self, command: &str) -> Result<u32> {
        use std::io::Write;
        self.next_command += 1;
        let id = self.next_command;
        let f = self
            .control
            .as_mut()
            .context("the guest has no control channel (GuestParams::control)")?;
        f.write_all(format!("{id} {command}\n").as_bytes())
            .context("writing to the control channel")?;
        Ok(id)
    }

    /// Waits (bounded) for the end of command `id`; `Ok(None)` if it did not end in time.
    pub fn wait_command(&mut self, id: u32, timeout: Duration) -> Result<Option<CommandResult>> {
        let start = format!("VMBLK-CMD id={id} start ");
        let end = format!("VMBLK-CMD id={id} rc=");
        self.wait_for(timeout, |log| {
            let lines: Vec<&str> = log.lines().collect();
            let first = lines.iter().position(|l| l.contains(&start))?;
            let last = first + lines[first..].iter().position(|l| l.contains(&end))?;
            let rc = lines[last][lines[last].find(&end)? + end.len()..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(CommandResult {
                id,
                rc,
                lines: lines[first..=last]
                    .iter()
                    .map(|l| l.trim_end().to_owned())
                    .collect(),
            })
        })
    }

    /// Sends a command and waits for it (bounded); fails if it does not end in time.
    pub fn command(&mut self, command: &str, timeout: Duration) -> Result<CommandResult> {
        let id = self.send(command)?;
        match self.wait_command(id, timeout)? {
            Some(r) => Ok(r),
            None => bail!(
                "guest command {id} `{command}` did not end within {timeout:?}\n{}",
                self.diagnostics()
            ),
        }
    }

    /// Kills QEMU now.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.kill().map(|_| ())
    }

    fn watchdog_fired(&self, st: ExitStatus) -> bool {
        use std::os::unix::process::ExitStatusExt;
        st.signal() == Some(libc::SIGKILL)
    }

    /// A failure report: the serial tail and QEMU's stderr.
    pub fn diagnostics(&self) -> String {
        format!(
            "---- serial log (tail), {:?} after start ----\n{}\n---- qemu stderr ----\n{}\n----",
            self.elapsed(),
            self.serial_tail(60),
            tail(&self.qemu_stderr(), 20)
        )
    }

    /// Copies the serial log to `dst` (to keep it after the guest is dropped).
    pub fn save_serial(&self, dst: &Path) -> Result<()> {
        std::fs::copy(&self.serial, dst)?;
        Ok(())
    }

    /// The guest's temporary directory (serial log, OVMF vars, QEMU's logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        if let Some(dst) = &self.keep_log {
            let _ = std::fs::copy(&self.serial, dst);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.diagnostics());
        }
    }
}
