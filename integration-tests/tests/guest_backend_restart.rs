//! Backend restart under load: the vhost-user-blk servers of a guest's two disks are
//! killed with SIGKILL while the guest writes, and started again on the same sockets.
//! QEMU (`reconnect=1` on its chardevs) reconnects; requests in flight at the crash are
//! resubmitted from the in-flight buffer QEMU keeps (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD);
//! the guest carries on without an I/O error, and everything it wrote reads back exact,
//! in the guest and on the host.
//!
//! ```text
//!  boot: 4096-sector loop ─ vmblk export ─┐  SIGKILL both,     ┌─ QEMU reconnect=1
//!  data: 4096-sector loop ─ vmblk export ─┴─ restart both ─────┘  4 writers in parallel,
//!                                                                   64 blocks each
//! ```

use std::time::{Duration, Instant};

use integration_tests::{
    check_blocks, io_lines, loop_tests_lock, unpacked_volume, verify_digest, CommandExport,
    CommandExportParams, Export, Guest, GuestDisk, GuestParams, ImageSpec, Volume, IO_BLOCK,
};

const BOOT_BYTES: u64 = 192 << 20;
const DATA_BYTES: u64 = 64 << 20;
/// Writers running at once (several requests in flight, completing out of order).
const WRITERS: u64 = 4;
/// Blocks per writer.
const BLOCKS: u64 = 64;

/// Blocks written so far by all writers (from their progress lines).
fn written(log: &str) -> u64 {
    (0..WRITERS)
        .map(|i| {
            io_lines(log, "writer", &format!("w{i}"))
                .last()
                .and_then(|m| m.get("ok").and_then(|v| v.parse::<u64>().ok()))
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn guest_writes_survive_sigkill_and_restart_of_its_export_processes() {
    let _lock = loop_tests_lock().unwrap();
    let started = Instant::now();
    let image = ImageSpec::default().build().unwrap();
    let boot = unpacked_volume(&image.qcow2, 4096, BOOT_BYTES).unwrap();
    let data = Volume::new(4096, DATA_BYTES).unwrap();
    let mut boot_export =
        CommandExport::start(CommandExportParams::vmblk(boot.device(), 512)).unwrap();
    let mut p = CommandExportParams::vmblk(data.device(), 512);
    p.name = "vmblk-export-data".into();
    let mut data_export = CommandExport::start(p).unwrap();

    let params = GuestParams {
        reconnect: Some(1),
        ..GuestParams::workload(
            GuestDisk::from_export(&boot_export, Some(1)),
            GuestDisk::from_export(&data_export, None),
            "backend_restart",
            Duration::from_secs(170),
        )
    };
    let mut guest = Guest::start(&params).unwrap();
    guest.wait_workload_ready(Duration::from_secs(90)).unwrap();
    for i in 0..WRITERS {
        let cmd = format!("writer w{i} data {} {} {BLOCKS}", i + 1, i * BLOCKS);
        let r = guest.command(&cmd, Duration::from_secs(5)).unwrap();
        assert_eq!(r.rc, 0, "{r:?}");
    }

    // Crash both servers in the middle of the writes.
    let mid = guest
        .wait_for(Duration::from_secs(60), |log| {
            (written(log) >= 48).then_some(())
        })
        .unwrap();
    assert!(mid.is_some(), "writers too slow\n{}", guest.diagnostics());
    let before = written(&guest.serial_log());
    let t_kill = Instant::now();
    boot_export.kill().unwrap();
    data_export.kill().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    boot_export.restart().unwrap();
    data_export.restart().unwrap();
    let down = t_kill.elapsed();

    // The guest carries on: every writer finishes, without a single error.
    for i in 0..WRITERS {
        let name = format!("w{i}");
        let done = guest
            .wait_for(Duration::from_secs(120), |log| {
                io_lines(log, "writer", &name)
                    .into_iter()
                    .find(|m| m.contains_key("done"))
            })
            .unwrap();
        let Some(done) = done else {
            panic!(
                "writer {name} did not finish after the restart ({before} blocks before)\n{}\n{}",
                guest.diagnostics(),
                integration_tests::tail(&data_export.all_logs(), 30)
            );
        };
        assert_eq!(
            done["err"],
            "0",
            "the guest saw I/O errors: {done:?}\n{}",
            guest.diagnostics()
        );
        assert_eq!(done["ok"], BLOCKS.to_string(), "{done:?}");
    }
    let resumed = t_kill.elapsed();

    // Everything they wrote reads back exact: in the guest (checksum) and on the host.
    for i in 0..WRITERS {
        let want: Vec<(u64, u64)> = (i * BLOCKS..(i + 1) * BLOCKS).map(|b| (b, i + 1)).collect();
        let r = guest
            .command(&format!("verify w{i} data"), Duration::from_secs(150))
            .unwrap();
        let digest = verify_digest(&want);
        assert!(
            r.rc == 0
                && r.lines.iter().any(
                    |l| l.contains(&format!("blocks={BLOCKS} bad=0 skipped=0 sha256={digest}"))
                ),
            "guest verify: {r:#?}"
        );
        check_blocks(data.device(), 0, &want).unwrap();
    }
    guest.send("poweroff").unwrap();
    let outcome = guest.wait_exit(Duration::from_secs(60)).unwrap();
    assert!(
        !outcome.killed && outcome.exit.is_some_and(|s| s.success()),
        "{outcome:?}\n{}",
        guest.diagnostics()
    );
    if let Err(e) = outcome.report.last().unwrap().ensure_passed() {
        panic!("{e:#}\n{}", guest.diagnostics());
    }
    for e in [&mut boot_export, &mut data_export] {
        e.check_alive().unwrap();
        assert!(!e.all_logs().contains("panicked"), "{}", e.all_logs());
    }
    eprintln!(
        "SIGKILL after {before} of {} blocks ({} MiB); servers back after {down:?}; \
         writers done {resumed:?} after the kill; whole test {:?}",
        WRITERS * BLOCKS,
        (before * IO_BLOCK) >> 20,
        started.elapsed()
    );
}
