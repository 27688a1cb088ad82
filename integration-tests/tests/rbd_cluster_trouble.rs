//! A guest's RBD disk while its cluster goes away and comes back: the guest sees I/O
//! errors within the export's I/O timeout, not a hang; once the OSD is back the same
//! QEMU reads and writes again, no restart; and with the cluster gone for good the
//! guest still powers off promptly.
//!
//! ```text
//!  boot:  4096-sector loop ─ vmblk unpack ─ vmblk export ─────────────────┐
//!  data:  one-node Ceph (mon + OSD, started here) ─ vmblk export rbd:... ──┴─ QEMU
//!         --io-timeout-ms 5000 (the export also sets librados' op timeouts to it)
//! ```

use std::time::{Duration, Instant};

use integration_tests::{
    check_blocks, io_lines, loop_tests_lock, unpacked_volume, verify_digest, CephCluster,
    CommandExport, CommandExportParams, Export, Guest, GuestDisk, GuestParams, ImageSpec,
};

const BOOT_BYTES: u64 = 192 << 20;
const IO_TIMEOUT_MS: u64 = 5000;
const POWEROFF_LIMIT: Duration = Duration::from_secs(10);

fn cmd(g: &mut Guest, c: &str, timeout: Duration, rc: i32) -> Vec<String> {
    let r = g.command(c, timeout).unwrap();
    assert_eq!(r.rc, rc, "`{c}`: {:#?}\n{}", r.lines, g.diagnostics());
    r.lines
}

/// Writes `blocks` blocks of `seed` from `from` with writer `name`, and verifies them in
/// the guest.
fn write_verify(g: &mut Guest, name: &str, seed: u64, from: u64, blocks: u64) {
    cmd(
        g,
        &format!("writer {name} data {seed} {from} {blocks}"),
        Duration::from_secs(5),
        0,
    );
    cmd(g, &format!("wait {name} 120"), Duration::from_secs(130), 0);
    let log = g.serial_log();
    let last = io_lines(&log, "writer", name);
    let last = last.last().expect("writer lines");
    assert_eq!(last["err"], "0", "{last:?}\n{}", g.diagnostics());
    let lines = cmd(
        g,
        &format!("verify {name} data"),
        Duration::from_secs(120),
        0,
    );
    let want: Vec<(u64, u64)> = (from..from + blocks).map(|b| (b, seed)).collect();
    let digest = verify_digest(&want);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("bad=0 skipped=0 sha256={digest}"))),
        "guest verify of {name}: {lines:#?}"
    );
}

/// Waits until the scanner's last state is `state`; returns how long it took.
fn wait_scanner(g: &mut Guest, state: &str, since: Instant, timeout: Duration) -> Duration {
    let seen = g
        .wait_for(timeout, |log| {
            io_lines(log, "scanner", "s")
                .last()
                .is_some_and(|m| m["state"] == state)
                .then_some(())
        })
        .unwrap();
    assert!(
        seen.is_some(),
        "the scanner did not reach state {state} within {timeout:?}\n{}",
        g.diagnostics()
    );
    since.elapsed()
}

#[test]
fn the_guest_sees_errors_while_the_cluster_is_away_resumes_after_and_powers_off_without_it() {
    let _lock = loop_tests_lock().unwrap();
    let image = ImageSpec::default().build().unwrap();
    let boot = unpacked_volume(&image.qcow2, 4096, BOOT_BYTES).unwrap();
    let mut cluster = CephCluster::start().unwrap();
    cluster
        .rbd(&["create", "--size", "64M", "vmblk/data"])
        .unwrap();
    let boot_export = CommandExport::start(CommandExportParams::vmblk(boot.device(), 512)).unwrap();
    let spec = cluster.rbd_spec("data");
    let mut p = CommandExportParams::vmblk(std::path::Path::new(&spec), 512);
    p.name = "vmblk-export-rbd".into();
    p.args
        .extend(["--io-timeout-ms".into(), IO_TIMEOUT_MS.to_string()]);
    let mut data_export = CommandExport::start(p).unwrap();
    let params = GuestParams::workload(
        GuestDisk::from_export(&boot_export, Some(1)),
        GuestDisk::from_export(&data_export, None),
        "rbd_cluster_trouble",
        Duration::from_secs(240),
    );
    let mut guest = Guest::start(&params).unwrap();
    guest.wait_workload_ready(Duration::from_secs(90)).unwrap();

    // The guest's writes land in the RBD image, as the rbd tool exports it.
    write_verify(&mut guest, "w", 1, 0, 16);
    let exported = tempfile::NamedTempFile::new().unwrap();
    let out = exported.path().to_str().unwrap().to_owned();
    std::fs::remove_file(&out).unwrap();
    cluster.rbd(&["export", "vmblk/data", &out]).unwrap();
    let want: Vec<(u64, u64)> = (0..16).map(|b| (b, 1)).collect();
    check_blocks(std::path::Path::new(&out), 0, &want).unwrap();

    // The cluster goes away under a scanning and writing guest.
    cmd(&mut guest, "scanner s data", Duration::from_secs(5), 0);
    wait_scanner(&mut guest, "ok", Instant::now(), Duration::from_secs(30));
    cmd(
        &mut guest,
        "writer w2 data 2 16 64 0",
        Duration::from_secs(5),
        0,
    );
    std::thread::sleep(Duration::from_secs(1));
    cluster.stop_osd().unwrap();
    let gone = Instant::now();
    let to_error = wait_scanner(
        &mut guest,
        "error",
        gone,
        Duration::from_millis(IO_TIMEOUT_MS + 15_000),
    );
    eprintln!("the scanner saw an error {to_error:?} after the OSD stopped");
    assert!(
        to_error >= Duration::from_millis(IO_TIMEOUT_MS / 2),
        "an error before the I/O timeout could expire ({to_error:?})"
    );
    if let Err(e) = data_export.check_alive() {
        panic!("{e:#}");
    }

    // The cluster is back: the same QEMU reads and writes again.
    let took = cluster.start_osd().unwrap();
    let back = Instant::now();
    eprintln!("OSD back in {took:?}");
    let to_ok = wait_scanner(&mut guest, "ok", back, Duration::from_secs(60));
    eprintln!("the scanner read again {to_ok:?} after the OSD was back");
    cmd(&mut guest, "stop w2", Duration::from_secs(30), 0);
    write_verify(&mut guest, "w3", 3, 0, 16);

    // The cluster is gone for good: the guest still powers off.
    cluster.stop_osd().unwrap();
    let gone = Instant::now();
    wait_scanner(
        &mut guest,
        "error",
        gone,
        Duration::from_millis(IO_TIMEOUT_MS + 15_000),
    );
    guest.send("poweroff").unwrap();
    let begun = guest
        .wait_for_line("VMBLK-SHUTDOWN begin", Duration::from_secs(20))
        .unwrap();
    assert!(begun.is_some(), "no shutdown\n{}", guest.diagnostics());
    let t0 = Instant::now();
    let outcome = guest.wait_exit(Duration::from_secs(120)).unwrap();
    let poweroff = t0.elapsed();
    eprintln!("poweroff with the cluster gone: {poweroff:?}");
    assert!(
        !outcome.killed && outcome.exit.is_some_and(|s| s.success()),
        "QEMU did not exit cleanly ({outcome:?})\n{}",
        guest.diagnostics()
    );
    assert!(poweroff < POWEROFF_LIMIT, "poweroff took {poweroff:?}");
    if let Err(e) = data_export.check_alive() {
        panic!("{e:#}");
    }
    assert!(
        !data_export.logs().contains("panicked"),
        "{}",
        data_export.logs()
    );
    drop(guest);
    drop(data_export);
    drop(boot_export);
    cluster.stop().unwrap();
}
