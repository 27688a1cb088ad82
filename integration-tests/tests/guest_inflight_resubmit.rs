//! A request in flight at a backend crash, behind requests that completed after it, is
//! resubmitted by the restarted backend (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), not lost.
//!
//! ```text
//!  data: FuseFile (Mode::HangRange over block 0) ── vmblk export (the file itself) ── QEMU
//!  guest: scanner s → reads block 0  (hangs in the backing: in flight, avail slot n)
//!         writer b  → blocks 100..108 (complete: the used ring moves past slot n)
//!  SIGKILL the export; release block 0; restart the export; QEMU reconnects
//!  → the scanner's read must complete: only the in-flight record says that slot n was
//!    never answered
//! ```
//!
//! Without the in-flight buffer this fails: QEMU restarts the ring from its used index,
//! so the request after the stuck one is answered twice ("id 1 is not a head!" in the
//! guest) and the stuck read never is (measured with INFLIGHT_SHMFD not offered).
//! The export sends I/O of files on FUSE to io_uring's workers (IOSQE_ASYNC): FUSE direct
//! reads otherwise wait inside `io_uring_enter`, on the queue thread.
//!
//! The stuck request is a read: io_uring runs the writes of one regular file one after
//! the other on its worker threads (hashed by inode), so a hung write would hold back the
//! later writes instead of letting them complete first.

use std::time::{Duration, Instant};

use integration_tests::{
    check_blocks, io_lines, loop_tests_lock, unpacked_volume, CommandExport, CommandExportParams,
    Export, FuseFile, Guest, GuestDisk, GuestParams, ImageSpec, Mode, IO_BLOCK,
};

fn writer_done(log: &str, name: &str) -> Option<(u64, u64)> {
    io_lines(log, "writer", name)
        .into_iter()
        .find(|m| m.contains_key("done"))
        .map(|m| (m["ok"].parse().unwrap_or(0), m["err"].parse().unwrap_or(0)))
}

#[test]
fn a_read_stuck_at_the_crash_behind_completed_writes_is_resubmitted_after_restart() {
    let _lock = loop_tests_lock().unwrap();
    let started = Instant::now();
    let image = ImageSpec::default().build().unwrap();
    let boot = unpacked_volume(&image.qcow2, 4096, 192 << 20).unwrap();
    let fuse = FuseFile::new(64 << 20).unwrap();
    let ctl = fuse.control();
    let boot_export = CommandExport::start(CommandExportParams::vmblk(boot.device(), 512)).unwrap();
    // The export serves the FUSE file itself, so that it has several requests in the
    // backing at once and they can complete out of order.
    let mut p = CommandExportParams::vmblk(fuse.path(), 512);
    p.name = "vmblk-export-data".into();
    p.args.extend(["--io-timeout-ms".into(), "0".into()]);
    let mut data_export = CommandExport::start(p).unwrap();
    let params = GuestParams {
        reconnect: Some(1),
        ..GuestParams::workload(
            GuestDisk::from_export(&boot_export, Some(1)),
            GuestDisk::from_export(&data_export, None),
            "inflight_resubmit",
            Duration::from_secs(150),
        )
    };
    let mut guest = Guest::start(&params).unwrap();
    let _release = ctl.release_on_drop();
    guest.wait_workload_ready(Duration::from_secs(90)).unwrap();

    // Block 0 hangs in the backing; blocks 100.. complete after it was taken.
    ctl.set_mode(Mode::HangRange {
        start: 0,
        end: IO_BLOCK,
    });
    let r = guest
        .command("scanner s data", Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.rc, 0);
    assert!(
        ctl.wait_blocked(1, Duration::from_secs(20)) >= 1,
        "the read of block 0 did not reach the backing: {:?}\n{}",
        ctl.stats(),
        guest.diagnostics()
    );
    let r = guest
        .command("writer b data 2 100 8", Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.rc, 0);
    let b = guest
        .wait_for(Duration::from_secs(60), |log| writer_done(log, "b"))
        .unwrap();
    assert_eq!(b, Some((8, 0)), "{}", guest.diagnostics());
    assert!(
        io_lines(&guest.serial_log(), "scanner", "s").is_empty(),
        "the scanner's first read completed while block 0 hung\n{}",
        guest.diagnostics()
    );

    // Crash with the read of block 0 in flight. The dying process cannot exit before its
    // stuck request ends, so the backing is released from another thread a moment later;
    // the late completion reaches no one.
    let releaser = {
        let ctl = ctl.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(800));
            ctl.set_mode(Mode::Ok);
        })
    };
    data_export.kill().unwrap();
    releaser.join().unwrap();
    data_export.restart().unwrap();
    let t_restart = Instant::now();

    let first = guest
        .wait_for(Duration::from_secs(40), |log| {
            io_lines(log, "scanner", "s").into_iter().next()
        })
        .unwrap();
    let Some(first) = first else {
        panic!(
            "the read in flight at the crash was not resubmitted: the guest still waits for it\n{}\n{}",
            guest.diagnostics(),
            integration_tests::tail(&data_export.all_logs(), 30)
        );
    };
    assert_eq!(first["state"], "ok", "{first:?}\n{}", guest.diagnostics());
    let resubmitted = t_restart.elapsed();
    let r = guest.command("stop s", Duration::from_secs(30)).unwrap();
    assert_eq!(r.rc, 0, "{r:#?}");
    let r = guest
        .command("verify b data", Duration::from_secs(60))
        .unwrap();
    assert_eq!(r.rc, 0, "{r:#?}");
    check_blocks(
        fuse.backing(),
        0,
        &(100..108).map(|b| (b, 2)).collect::<Vec<_>>(),
    )
    .unwrap();
    guest.send("poweroff").unwrap();
    let outcome = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !outcome.killed && outcome.exit.is_some_and(|s| s.success()),
        "{outcome:?}\n{}",
        guest.diagnostics()
    );
    data_export.check_alive().unwrap();
    eprintln!(
        "read in flight at the crash completed {resubmitted:?} after the restart; whole test {:?}",
        started.elapsed()
    );
}
