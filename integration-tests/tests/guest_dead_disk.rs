//! Shutdown with a dead disk (field incident 5): a guest keeps scanning its second disk,
//! as lvm2-monitor does, while the disk's backing goes away, then powers off. Every
//! request to the dead disk must be answered, so that the shutdown neither waits for a
//! process stuck in the kernel nor stalls QEMU.
//!
//! ```text
//!  boot:  4096-sector loop ─ vmblk unpack ─ vmblk export ─┐
//!  data:  FuseFile (Mode) ─ 4096-sector loop ─ vmblk export ┴─ QEMU ─ /init workload:
//!                                                               writer, verify, scanner,
//!                                                               poweroff (control channel)
//! ```
//!
//! - `Mode::Fail(ENODEV)`: the backing device is gone; the export answers with IOERR.
//! - `Mode::Hang`: the backing device neither completes nor fails; the export's I/O
//!   timeout (`--io-timeout-ms 3000`) answers with IOERR; afterwards the export still
//!   serves a second QEMU.
//!
//! Poweroff is timed from the host seeing `VMBLK-SHUTDOWN begin` (the guest's init
//! starts stopping its jobs) to QEMU's exit, and must take under 10 s.

use std::time::{Duration, Instant};

use integration_tests::{
    check_blocks, io_lines, loop_tests_lock, shutdown_times, unpacked_volume, verify_digest,
    CommandExport, CommandExportParams, Export, FuseFile, Guest, GuestDisk, GuestParams, ImageSpec,
    LoopDevice, Mode, ReleaseOnDrop, Volume,
};

const BOOT_BYTES: u64 = 192 << 20;
const DATA_BYTES: u64 = 64 << 20;
const POWEROFF_LIMIT: Duration = Duration::from_secs(10);
const IO_TIMEOUT_MS: u64 = 3000;

/// Everything one test runs, dropped in field order: hung I/O released first, then QEMU,
/// the exports, the loop devices, the FUSE file system.
struct Rig {
    _release: ReleaseOnDrop,
    guest: Option<Guest>,
    data_export: CommandExport,
    boot_export: CommandExport,
    data_loop: LoopDevice,
    fuse: FuseFile,
    _boot: Volume,
}

impl Rig {
    fn new(io_timeout_ms: Option<u64>) -> Self {
        let image = ImageSpec::default().build().unwrap();
        let boot = unpacked_volume(&image.qcow2, 4096, BOOT_BYTES).unwrap();
        let fuse = FuseFile::new(DATA_BYTES).unwrap();
        let data_loop = LoopDevice::attach(fuse.path(), 4096).unwrap();
        let boot_export =
            CommandExport::start(CommandExportParams::vmblk(boot.device(), 512)).unwrap();
        let mut p = CommandExportParams::vmblk(data_loop.path(), 512);
        p.name = "vmblk-export-data".into();
        // Events as JSON lines on stderr.
        p.args.push("--json".into());
        if let Some(ms) = io_timeout_ms {
            p.args.extend(["--io-timeout-ms".into(), ms.to_string()]);
        }
        let data_export = CommandExport::start(p).unwrap();
        Self {
            _release: fuse.control().release_on_drop(),
            guest: None,
            data_export,
            boot_export,
            data_loop,
            fuse,
            _boot: boot,
        }
    }

    /// Starts a guest on both disks with a control channel and waits for its workload.
    fn start_guest(&mut self, log_name: &str) -> &mut Guest {
        let params = GuestParams::workload(
            GuestDisk::from_export(&self.boot_export, Some(1)),
            GuestDisk::from_export(&self.data_export, None),
            log_name,
            Duration::from_secs(150),
        );
        let guest = self.guest.insert(Guest::start(&params).unwrap());
        guest.wait_workload_ready(Duration::from_secs(90)).unwrap();
        guest
    }

    fn guest(&mut self) -> &mut Guest {
        self.guest.as_mut().unwrap()
    }

    /// Runs `cmd` in the guest and requires exit code `rc`.
    fn cmd(&mut self, cmd: &str, timeout: Duration, rc: i32) -> Vec<String> {
        let g = self.guest();
        let r = g.command(cmd, timeout).unwrap();
        assert_eq!(r.rc, rc, "`{cmd}`: {:#?}\n{}", r.lines, g.diagnostics());
        r.lines
    }

    /// Writes `blocks` blocks with seed 1 on the data disk and checks them, in the guest
    /// and on the host's backing file.
    fn write_and_verify(&mut self, blocks: u64) {
        self.cmd(
            &format!("writer w data 1 0 {blocks}"),
            Duration::from_secs(5),
            0,
        );
        self.cmd("wait w 120", Duration::from_secs(130), 0);
        let log = self.guest().serial_log();
        let done = io_lines(&log, "writer", "w");
        let last = done.last().expect("writer lines");
        assert!(last.contains_key("done"), "{last:?}");
        assert_eq!(last["ok"], blocks.to_string(), "{last:?}");
        assert_eq!(last["err"], "0", "{last:?}");
        let lines = self.cmd("verify w data", Duration::from_secs(120), 0);
        let want: Vec<(u64, u64)> = (0..blocks).map(|b| (b, 1)).collect();
        let digest = verify_digest(&want);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("blocks={blocks} bad=0 skipped=0 sha256={digest}"))),
            "guest verify: {lines:#?}"
        );
        check_blocks(self.fuse.backing(), 0, &want).unwrap();
    }

    /// Starts the scanner and waits until it has read the disk successfully.
    fn start_scanner(&mut self) {
        self.cmd("scanner s data", Duration::from_secs(5), 0);
        let ok = self
            .guest()
            .wait_for(Duration::from_secs(30), |log| {
                (!io_lines(log, "scanner", "s").is_empty()).then_some(())
            })
            .unwrap();
        let log = self.guest().serial_log();
        assert!(
            ok.is_some(),
            "scanner silent\n{}",
            self.guest().diagnostics()
        );
        let first = &io_lines(&log, "scanner", "s")[0];
        assert_eq!(first["state"], "ok", "{first:?}");
    }

    /// Waits until the scanner reports errors; returns the time it took.
    fn wait_scanner_error(&mut self, since: Instant, timeout: Duration) -> Duration {
        let seen = self
            .guest()
            .wait_for(timeout, |log| {
                io_lines(log, "scanner", "s")
                    .iter()
                    .any(|m| m["state"] == "error")
                    .then_some(())
            })
            .unwrap();
        let took = since.elapsed();
        assert!(
            seen.is_some(),
            "the scanner saw no error within {timeout:?} of the backing change\n{}\n{}",
            self.guest().diagnostics(),
            integration_tests::tail(&self.data_export.logs(), 30)
        );
        took
    }

    /// Asks the guest to power off; returns (host time from `VMBLK-SHUTDOWN begin` seen
    /// to QEMU exit, guest time from begin to every job stopped).
    fn poweroff(&mut self) -> (Duration, f64) {
        let g = self.guest();
        g.send("poweroff").unwrap();
        let begun = g
            .wait_for_line("VMBLK-SHUTDOWN begin", Duration::from_secs(20))
            .unwrap();
        let t0 = Instant::now();
        assert!(begun.is_some(), "no shutdown\n{}", g.diagnostics());
        let outcome = g.wait_exit(Duration::from_secs(120)).unwrap();
        let took = t0.elapsed();
        let log = g.serial_log();
        assert!(
            !outcome.killed && outcome.exit.is_some_and(|s| s.success()),
            "QEMU did not exit cleanly after poweroff ({outcome:?}, {took:?})\n{}",
            g.diagnostics()
        );
        let (begin, stopped, left) = shutdown_times(&log).expect("shutdown lines");
        assert_eq!(
            left,
            0,
            "job processes left at poweroff\n{}",
            g.diagnostics()
        );
        let boot = outcome.report.last().expect("boot report").clone();
        if let Err(e) = boot.ensure_passed() {
            panic!("{e:#}\n{}", g.diagnostics());
        }
        (took, stopped - begin)
    }
}

/// The export's events (`--json`: one JSON object per line on stderr), by name.
fn events(e: &CommandExport) -> Vec<String> {
    e.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .filter_map(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_owned))
        .collect()
}

fn assert_alive(e: &mut CommandExport) {
    if let Err(err) = e.check_alive() {
        panic!("{err:#}");
    }
    assert!(!e.logs().contains("panicked"), "{}", e.logs());
}

#[test]
fn poweroff_with_a_removed_disk_under_scan_completes_within_10s() {
    let _lock = loop_tests_lock().unwrap();
    let started = Instant::now();
    let mut rig = Rig::new(None);
    rig.start_guest("dead_disk_enodev");
    rig.write_and_verify(32);
    rig.start_scanner();

    // The backing device goes away: its I/O fails with ENODEV.
    rig.fuse.set_mode(Mode::Fail(libc::ENODEV));
    let removed = Instant::now();
    let to_error = rig.wait_scanner_error(removed, Duration::from_secs(10));
    let probe = rig.cmd("probe data", Duration::from_secs(10), 1);
    eprintln!("scanner saw the error {to_error:?} after removal; probe: {probe:?}");
    // Let the scanner keep hitting the dead disk for a while, as a monitor would.
    std::thread::sleep(Duration::from_secs(2));

    let (poweroff, jobs) = rig.poweroff();
    eprintln!(
        "poweroff with a removed disk: {poweroff:?} from shutdown start to QEMU exit \
         (jobs stopped in {jobs:.2} s guest time); whole test {:?}",
        started.elapsed()
    );
    assert!(poweroff < POWEROFF_LIMIT, "poweroff took {poweroff:?}");
    assert!(
        rig.fuse.stats().failed > 0,
        "no I/O reached the dead backing: {:?}",
        rig.fuse.stats()
    );
    assert_alive(&mut rig.data_export);
    assert_alive(&mut rig.boot_export);
    assert!(rig.data_loop.path().exists());
    let ev = events(&rig.data_export);
    eprintln!("data export events: {ev:?}");
    assert!(
        ev.iter().any(|e| e == "removed"),
        "ENODEV did not turn the export Removed: {ev:?}\n{}",
        rig.data_export.logs()
    );
}

#[test]
fn poweroff_with_a_hung_disk_under_scan_completes_and_the_export_serves_again() {
    let _lock = loop_tests_lock().unwrap();
    let started = Instant::now();
    let mut rig = Rig::new(Some(IO_TIMEOUT_MS));
    rig.start_guest("dead_disk_hang");
    rig.write_and_verify(16);
    rig.start_scanner();

    // The backing device stalls: nothing completes, nothing fails.
    let ctl = rig.fuse.control();
    ctl.set_mode(Mode::Hang);
    let hung = Instant::now();
    assert!(
        ctl.wait_blocked(1, Duration::from_secs(10)) >= 1,
        "no request reached the hung backing: {:?}",
        ctl.stats()
    );
    let to_error = rig.wait_scanner_error(hung, Duration::from_millis(IO_TIMEOUT_MS + 8000));
    eprintln!("scanner saw an error {to_error:?} after the backing hung");
    assert!(
        to_error >= Duration::from_millis(IO_TIMEOUT_MS / 2),
        "error before the I/O timeout could have expired ({to_error:?}): not the timeout path?"
    );
    // Power off while the scanner's next read is stuck (it reads every 0.2 s; each read
    // of the hung disk ends only with the export's I/O timeout).
    std::thread::sleep(Duration::from_secs(1));

    let (poweroff, jobs) = rig.poweroff();
    eprintln!(
        "poweroff with a hung disk: {poweroff:?} from shutdown start to QEMU exit \
         (jobs stopped in {jobs:.2} s guest time); {} requests blocked in the backing",
        ctl.stats().blocked
    );
    assert!(poweroff < POWEROFF_LIMIT, "poweroff took {poweroff:?}");
    assert!(
        jobs > 0.5,
        "the shutdown did not wait for a stuck read ({jobs:.2} s): the test did not hit one"
    );
    assert!(ctl.stats().blocked >= 1, "{:?}", ctl.stats());

    // The export is alive and serves a second QEMU; the disk is still hung, so its
    // requests end in the I/O timeout's error, not in a hang.
    assert_alive(&mut rig.data_export);
    rig.guest = None;
    rig.start_guest("dead_disk_hang_second_qemu");
    let lines = rig.cmd("probe data", Duration::from_secs(30), 1);
    let probe = lines
        .iter()
        .find_map(|l| integration_tests::parse_io_line(l).filter(|m| m.contains_key("probe")))
        .expect("probe line");
    let secs: f64 = probe["t1"].parse::<f64>().unwrap() - probe["t0"].parse::<f64>().unwrap();
    eprintln!("second QEMU: a read of the hung disk failed after {secs:.2} s");
    assert!(secs < (IO_TIMEOUT_MS as f64 / 1000.0) + 5.0, "{probe:?}");
    let (poweroff2, _) = rig.poweroff();
    eprintln!("second QEMU powered off in {poweroff2:?}");
    assert!(poweroff2 < POWEROFF_LIMIT, "poweroff took {poweroff2:?}");

    // The backing recovers; the stale requests drain; the export is still there, and the
    // first session's io_uring requests, left in flight when it ended, are accounted for
    // once the kernel has let go of them.
    ctl.set_mode(Mode::Ok);
    std::thread::sleep(Duration::from_millis(500));
    assert_alive(&mut rig.data_export);
    assert_eq!(ctl.stats().blocked, 0);
    let released = Instant::now();
    while !rig
        .data_export
        .logs()
        .contains("requests of a closed session ended")
    {
        assert!(
            released.elapsed() < Duration::from_secs(10),
            "the requests left in flight by the first session were never released:\n{}",
            rig.data_export.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = rig.data_export.logs();
    for l in logs
        .lines()
        .filter(|l| l.contains("closed session") || l.contains("still in the kernel"))
    {
        eprintln!("{l}");
    }
    let ev = events(&rig.data_export);
    eprintln!(
        "data export events: {ev:?}; whole test {:?}",
        started.elapsed()
    );
    assert!(ev.iter().any(|e| e == "timed_out"), "{ev:?}");
    assert!(
        ev.iter().filter(|e| *e == "connected").count() >= 2,
        "the second QEMU did not connect: {ev:?}"
    );
}
