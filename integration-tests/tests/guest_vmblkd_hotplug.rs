//! Hot-remove, re-add and guest reboot through the real vmblkd (field incident 4, the
//! SPDK vhost_blk crash), and vmblkd killed under guest writes.
//!
//! ```text
//!  "NVMe controller": FuseFile A, FuseFile B (Mode) ─ 4096-sector loops ─ block pool nvme
//!  dir pool local: boot1, boot2 (files, from the test image)
//!  vmblkd (hotplug on, io_timeout 5 s) ── exports ──> guest 1: boot1 + d1
//!                                                   guest 2: boot2 + d2
//!  cycle: writers a (before), b (across the removal), scanner
//!         remove: both backings fail ENODEV + losetup -d  → vmblkd: removed
//!         re-add: backings ok + new loop devices          → vmblkd: active (by identity)
//!         odd cycles: re-add, writer c, reboot both guests
//!         even cycles: reboot both guests while removed (reads fail, no hang), re-add, writer c
//!         verify a, b, c in the guests (b: blocks whose last write succeeded) and on the host
//! ```
//!
//! The cycle count is `$VMBLK_HOTPLUG_CYCLES` (default 10).
//!
//! And a vmblkd crash: SIGKILL while the guest writes on both its disks (four writers on
//! the data disk, their records on the boot disk), restart; QEMU (`reconnect=1`)
//! reconnects to the same sockets; every writer finishes without an error and every
//! block reads back exact.

use std::time::{Duration, Instant};

use integration_tests::{
    check_blocks, io_lines, loop_tests_lock, parse_io_line, FuseFile, Guest, GuestDisk,
    GuestParams, ImageSpec, LoopDevice, Mode, ReleaseOnDrop, Vmblkd,
};

const NS_BYTES: u64 = 64 << 20;
/// Blocks of each writer (64 KiB each).
const BLOCKS: u64 = 16;

/// One namespace of the simulated controller: a FUSE file and the loop device over it.
struct Namespace {
    dev: Option<LoopDevice>,
    fuse: FuseFile,
}

impl Namespace {
    fn new() -> Self {
        let fuse = FuseFile::new(NS_BYTES).unwrap();
        let dev = Some(LoopDevice::attach(fuse.path(), 4096).unwrap());
        Self { dev, fuse }
    }

    fn path(&self) -> String {
        self.dev.as_ref().unwrap().path().display().to_string()
    }

    /// The device disappears: its I/O fails with ENODEV and its loop device is detached
    /// (the kernel detaches it once the last opener lets go).
    fn remove(&mut self) {
        self.fuse.set_mode(Mode::Fail(libc::ENODEV));
        if let Some(d) = self.dev.take() {
            d.detach().unwrap();
        }
    }

    /// The same device comes back: I/O works and a new loop device maps the same file.
    fn readd(&mut self) {
        self.fuse.set_mode(Mode::Ok);
        self.dev = Some(LoopDevice::attach(self.fuse.path(), 4096).unwrap());
    }
}

fn cycles() -> u32 {
    std::env::var("VMBLK_HOTPLUG_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
}

/// Runs `cmd` in every guest at once; waits for each; requires exit code 0.
fn all(guests: &mut [Guest], cmd: &str, timeout: Duration) {
    let ids: Vec<u32> = guests.iter_mut().map(|g| g.send(cmd).unwrap()).collect();
    for (g, id) in guests.iter_mut().zip(ids) {
        let r = g.wait_command(id, timeout).unwrap();
        match r {
            Some(r) if r.rc == 0 => {}
            other => panic!("`{cmd}`: {other:#?}\n{}", g.diagnostics()),
        }
    }
}

/// Waits until `pred` holds for every guest's log.
fn all_see(guests: &mut [Guest], what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) {
    for g in guests.iter_mut() {
        let seen = g.wait_for(timeout, |log| pred(log).then_some(())).unwrap();
        assert!(seen.is_some(), "{what}: not seen\n{}", g.diagnostics());
    }
}

fn writer_done_ok(log: &str, name: &str) -> Option<(u64, u64)> {
    io_lines(log, "writer", name)
        .into_iter()
        .find(|m| m.contains_key("done"))
        .map(|m| (m["ok"].parse().unwrap_or(0), m["err"].parse().unwrap_or(0)))
}

fn writer_errors(log: &str, name: &str) -> usize {
    io_lines(log, "writer", name)
        .iter()
        .filter(|m| m.contains_key("write-error"))
        .count()
}

/// `verify NAME data` in every guest: no block differs; with `expect`, exactly that many
/// blocks were checked and none skipped; otherwise checked + skipped = [`BLOCKS`].
fn verify_all(guests: &mut [Guest], name: &str, expect: Option<u64>, k: u32) {
    let cmd = format!("verify {name} data");
    let ids: Vec<u32> = guests.iter_mut().map(|g| g.send(&cmd).unwrap()).collect();
    for (g, id) in guests.iter_mut().zip(ids) {
        let r = g.wait_command(id, Duration::from_secs(120)).unwrap();
        let line = r.as_ref().and_then(|r| {
            r.lines.iter().filter_map(|l| parse_io_line(l)).find(|m| {
                m.get("verify").map(String::as_str) == Some(name) && m.contains_key("blocks")
            })
        });
        let ok = r.as_ref().is_some_and(|r| r.rc == 0)
            && line.as_ref().is_some_and(|m| {
                let n: u64 = m["blocks"].parse().unwrap_or(0);
                let skipped: u64 = m["skipped"].parse().unwrap_or(0);
                m["bad"] == "0"
                    && match expect {
                        Some(e) => n == e && skipped == 0,
                        None => n + skipped == BLOCKS,
                    }
            });
        assert!(ok, "cycle {k}: `{cmd}`: {r:#?}\n{}", g.diagnostics());
    }
}

/// Reboots every guest (workload `reboot`) and waits until each runs its workload again.
fn reboot_all(guests: &mut [Guest], k: u32) {
    for g in guests.iter_mut() {
        g.send("reboot").unwrap();
    }
    for g in guests.iter_mut() {
        if let Err(e) = g.wait_workload_ready(Duration::from_secs(150)) {
            panic!("cycle {k}: {e:#}");
        }
    }
}

fn create_and_attach(vd: &Vmblkd, pool: &str, name: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["volume", "create", name, "--pool", pool];
    args.extend_from_slice(extra);
    let v = vd.vmblk(&args).unwrap();
    let a = vd
        .vmblk(&[
            "volume",
            "attach",
            name,
            "--pool",
            pool,
            "--logical-block-size",
            "512",
        ])
        .unwrap();
    (
        v["path"].as_str().unwrap().to_owned(),
        a["socket_path"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn two_guests_survive_hot_remove_readd_and_reboot_cycles_with_exact_data() {
    let _lock = loop_tests_lock().unwrap();
    let started = Instant::now();
    let cycles = cycles();
    let image = ImageSpec::default().build().unwrap();
    let mut ns = [Namespace::new(), Namespace::new()];
    let pool_dir = tempfile::Builder::new()
        .prefix("vmblk-dirpool-")
        .tempdir()
        .unwrap();
    let config = format!(
        "hotplug: {{enabled: true}}\nexports: {{io_timeout_ms: 5000}}\npools:\n  - {{name: local, type: dir, path: {}}}\n  - {{name: nvme, type: block, devices: [{}, {}]}}\n",
        pool_dir.path().display(),
        ns[0].path(),
        ns[1].path()
    );
    let mut vd = Vmblkd::start(&config).unwrap();
    let qcow2 = image.qcow2.display().to_string();
    let mut guests: Vec<Guest> = Vec::new();
    // data volume i of guest i lives on namespace ns_of[i].
    let mut ns_of = [0usize; 2];
    for (i, ns_i) in ns_of.iter_mut().enumerate() {
        let (_, boot_sock) =
            create_and_attach(&vd, "local", &format!("boot{i}"), &["--image", &qcow2]);
        let (path, data_sock) =
            create_and_attach(&vd, "nvme", &format!("d{i}"), &["--size", "32M"]);
        *ns_i = ns
            .iter()
            .position(|n| n.path() == path)
            .expect("data volume on a namespace");
        let params = GuestParams {
            allow_reboot: true,
            ..GuestParams::workload(
                GuestDisk::socket(boot_sock.as_ref(), 1, Some(1)),
                GuestDisk::socket(data_sock.as_ref(), 1, None),
                &format!("vmblkd_hotplug_guest{i}"),
                Duration::from_secs(120 + 90 * u64::from(cycles)),
            )
        };
        guests.push(Guest::start(&params).unwrap());
    }
    assert_ne!(ns_of[0], ns_of[1]);
    // Hung or failing I/O is released before anything is torn down.
    let _release: Vec<ReleaseOnDrop> = ns
        .iter()
        .map(|n| n.fuse.control().release_on_drop())
        .collect();
    for g in guests.iter_mut() {
        g.wait_workload_ready(Duration::from_secs(120)).unwrap();
    }
    eprintln!("two guests up after {:?}", started.elapsed());
    let vols = [("nvme", "d0"), ("nvme", "d1")];
    let mut removed_ms = Vec::new();
    let mut resumed_ms = Vec::new();

    for k in 1..=cycles {
        let t_cycle = Instant::now();
        // Before the removal: writer a, complete.
        all(
            &mut guests,
            &format!("writer a{k} data {} 0 {BLOCKS}", 100 + k),
            Duration::from_secs(5),
        );
        all(
            &mut guests,
            &format!("wait a{k} 60"),
            Duration::from_secs(70),
        );
        for g in guests.iter_mut() {
            let done = writer_done_ok(&g.serial_log(), &format!("a{k}"));
            assert_eq!(done, Some((BLOCKS, 0)), "cycle {k}\n{}", g.diagnostics());
        }
        // Across the removal: writer b (until stopped) and a scanner.
        all(
            &mut guests,
            &format!("writer b{k} data {} 64 {BLOCKS} 0", 200 + k),
            Duration::from_secs(5),
        );
        all(
            &mut guests,
            &format!("scanner s{k} data"),
            Duration::from_secs(5),
        );
        all_see(
            &mut guests,
            "writer b progress",
            Duration::from_secs(60),
            |log| !io_lines(log, "writer", &format!("b{k}")).is_empty(),
        );

        // Hot-remove the whole controller.
        let t0 = Instant::now();
        for n in ns.iter_mut() {
            n.remove();
        }
        let took = vd
            .wait_backend_state(&vols, "removed", Duration::from_secs(20))
            .unwrap();
        removed_ms.push(took.as_millis());
        all_see(
            &mut guests,
            "write errors after removal",
            Duration::from_secs(30),
            |log| writer_errors(log, &format!("b{k}")) > 0,
        );
        let removal_to_errors = t0.elapsed();

        // The devices stay away for a while; the scanners keep hitting them.
        std::thread::sleep(Duration::from_secs(1));

        // Odd cycles: re-add, then reboot. Even cycles: reboot while the disks are
        // removed (the guests must boot and see disks that error, not hang), then re-add.
        let reboot_first = k % 2 == 0;
        if reboot_first {
            reboot_all(&mut guests, k);
            let ids: Vec<u32> = guests
                .iter_mut()
                .map(|g| g.send("probe data").unwrap())
                .collect();
            for (g, id) in guests.iter_mut().zip(ids) {
                let r = g.wait_command(id, Duration::from_secs(30)).unwrap();
                assert!(
                    r.as_ref().is_some_and(|r| r.rc == 1),
                    "cycle {k}: a removed disk after reboot must fail reads: {r:#?}\n{}",
                    g.diagnostics()
                );
            }
        }
        let t1 = Instant::now();
        for n in ns.iter_mut() {
            n.readd();
        }
        let took = vd
            .wait_backend_state(&vols, "active", Duration::from_secs(20))
            .unwrap();
        resumed_ms.push(took.as_millis());
        if !reboot_first {
            std::thread::sleep(Duration::from_secs(1));
            all(
                &mut guests,
                &format!("stop b{k} 20"),
                Duration::from_secs(30),
            );
            all(
                &mut guests,
                &format!("stop s{k} 20"),
                Duration::from_secs(30),
            );
        }
        // After the re-add: writer c, complete and without an error.
        all(
            &mut guests,
            &format!("writer c{k} data {} {BLOCKS} {BLOCKS}", 300 + k),
            Duration::from_secs(5),
        );
        all(
            &mut guests,
            &format!("wait c{k} 60"),
            Duration::from_secs(70),
        );
        for g in guests.iter_mut() {
            let done = writer_done_ok(&g.serial_log(), &format!("c{k}"));
            assert_eq!(
                done,
                Some((BLOCKS, 0)),
                "cycle {k}: writes after the re-add\n{}",
                g.diagnostics()
            );
        }
        let readd_to_io = t1.elapsed();
        if !reboot_first {
            reboot_all(&mut guests, k);
        }

        // Everything written before the removal and after the re-add reads back exact;
        // of writer b, every block whose last write succeeded.
        for w in ["a", "b", "c"] {
            let expect = (w != "b").then_some(BLOCKS);
            verify_all(&mut guests, &format!("{w}{k}"), expect, k);
        }
        for (i, g) in guests.iter().enumerate() {
            let backing = ns[ns_of[i]].fuse.backing().to_owned();
            let a: Vec<(u64, u64)> = (0..BLOCKS).map(|b| (b, 100 + u64::from(k))).collect();
            let c: Vec<(u64, u64)> = (BLOCKS..2 * BLOCKS)
                .map(|b| (b, 300 + u64::from(k)))
                .collect();
            if let Err(e) =
                check_blocks(&backing, 0, &a).and_then(|_| check_blocks(&backing, 0, &c))
            {
                panic!("cycle {k}, guest {i}: {e:#}\n{}", g.diagnostics());
            }
        }
        vd.check_alive().unwrap();
        eprintln!(
            "cycle {k}: removal -> errors in both guests {removal_to_errors:?}, re-add -> \
             writes done {readd_to_io:?}, cycle {:?}",
            t_cycle.elapsed()
        );
    }

    // Power off both; every boot's checks (including the verifies) passed.
    for g in guests.iter_mut() {
        g.send("poweroff").unwrap();
    }
    for g in guests.iter_mut() {
        let outcome = g.wait_exit(Duration::from_secs(60)).unwrap();
        assert!(
            !outcome.killed && outcome.exit.is_some_and(|s| s.success()),
            "{outcome:?}\n{}",
            g.diagnostics()
        );
        assert_eq!(outcome.report.completed_boots(), cycles as usize + 1);
        for b in &outcome.report.boots {
            if let Err(e) = b.ensure_passed() {
                panic!("{e:#}\n{}", g.diagnostics());
            }
        }
    }
    vd.check_alive().unwrap();
    let logs = vd.logs();
    assert!(!logs.contains("panicked"), "{logs}");
    eprintln!(
        "{cycles} cycles: vmblkd saw the removal in {removed_ms:?} ms, the re-add in \
         {resumed_ms:?} ms; whole test {:?}",
        started.elapsed()
    );
    drop(guests);
    drop(vd);
}

/// Blocks written so far by writers `w0..w{n}` (from their progress lines).
fn written(log: &str, writers: u64) -> u64 {
    (0..writers)
        .map(|i| {
            io_lines(log, "writer", &format!("w{i}"))
                .last()
                .and_then(|m| m.get("ok").and_then(|v| v.parse::<u64>().ok()))
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn guest_carries_on_when_vmblkd_is_killed_during_writes_and_restarted() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 64;
    let _lock = loop_tests_lock().unwrap();
    let started = Instant::now();
    let image = ImageSpec::default().build().unwrap();
    let data = integration_tests::Volume::new(4096, NS_BYTES).unwrap();
    let pool_dir = tempfile::Builder::new()
        .prefix("vmblk-dirpool-")
        .tempdir()
        .unwrap();
    let config = format!(
        "hotplug: {{enabled: true}}\npools:\n  - {{name: local, type: dir, path: {}}}\n  - {{name: nvme, type: block, devices: [{}]}}\n",
        pool_dir.path().display(),
        data.device().display()
    );
    let mut vd = Vmblkd::start(&config).unwrap();
    let qcow2 = image.qcow2.display().to_string();
    let (_, boot_sock) = create_and_attach(&vd, "local", "boot", &["--image", &qcow2]);
    let (_, data_sock) = create_and_attach(&vd, "nvme", "data", &["--size", "32M"]);
    let params = GuestParams {
        reconnect: Some(1),
        ..GuestParams::workload(
            GuestDisk::socket(boot_sock.as_ref(), 1, Some(1)),
            GuestDisk::socket(data_sock.as_ref(), 1, None),
            "vmblkd_restart",
            Duration::from_secs(170),
        )
    };
    let mut guest = Guest::start(&params).unwrap();
    guest.wait_workload_ready(Duration::from_secs(90)).unwrap();
    for i in 0..WRITERS {
        let cmd = format!("writer w{i} data {} {} {PER_WRITER}", i + 1, i * PER_WRITER);
        let r = guest.command(&cmd, Duration::from_secs(5)).unwrap();
        assert_eq!(r.rc, 0, "{r:?}");
    }
    let mid = guest
        .wait_for(Duration::from_secs(60), |log| {
            (written(log, WRITERS) >= 48).then_some(())
        })
        .unwrap();
    assert!(mid.is_some(), "writers too slow\n{}", guest.diagnostics());

    // The daemon crashes in the middle of the writes and comes back.
    let before = written(&guest.serial_log(), WRITERS);
    let t_kill = Instant::now();
    vd.kill().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vd.restart().unwrap();
    let back = t_kill.elapsed();
    for (name, sock) in [("boot", &boot_sock), ("data", &data_sock)] {
        let pool = if name == "boot" { "local" } else { "nvme" };
        let v = vd.vmblk(&["volume", "get", name, "--pool", pool]).unwrap();
        assert_eq!(
            v["attachment"]["socket_path"].as_str(),
            Some(sock.as_str()),
            "{name}: not on the same socket after the restart: {v}"
        );
    }

    // The guest carries on: every writer finishes without an error.
    for i in 0..WRITERS {
        let name = format!("w{i}");
        let done = guest
            .wait_for(Duration::from_secs(120), |log| writer_done_ok(log, &name))
            .unwrap();
        assert_eq!(
            done,
            Some((PER_WRITER, 0)),
            "writer {name} after the restart ({before} blocks before)\n{}\n{}",
            guest.diagnostics(),
            integration_tests::tail(&vd.logs(), 30)
        );
    }
    let resumed = t_kill.elapsed();
    // QEMU reconnected both disks to the new daemon.
    let reconnects = vd.current_logs().matches("frontend connected").count();
    assert!(reconnects >= 2, "{}", vd.current_logs());
    // Everything it wrote reads back exact: the guest's checksum and the host's file.
    for i in 0..WRITERS {
        let want: Vec<(u64, u64)> = (i * PER_WRITER..(i + 1) * PER_WRITER)
            .map(|b| (b, i + 1))
            .collect();
        let r = guest
            .command(&format!("verify w{i} data"), Duration::from_secs(150))
            .unwrap();
        let digest = integration_tests::verify_digest(&want);
        assert!(
            r.rc == 0
                && r.lines.iter().any(|l| l.contains(&format!(
                    "blocks={PER_WRITER} bad=0 skipped=0 sha256={digest}"
                ))),
            "guest verify: {r:#?}"
        );
        check_blocks(data.file(), 0, &want).unwrap();
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
    vd.check_alive().unwrap();
    assert!(!vd.logs().contains("panicked"), "{}", vd.logs());
    eprintln!(
        "vmblkd SIGKILL after {before} of {} blocks; back (gRPC) after {back:?}; writers \
         done {resumed:?} after the kill; whole test {:?}",
        WRITERS * PER_WRITER,
        started.elapsed()
    );
}
