//! The throwaway Ceph cluster of the RBD tests (integration-tests/src/ceph.rs) is real
//! and cleans up after itself.
//!
//! ```text
//!  CephCluster::start()  ── mon + OSD (bluestore, sparse file) + pool vmblk
//!  rbd create img 64M; qemu-img convert -n SRC rbd:vmblk/img:..   (write a pattern)
//!  qemu-img convert rbd:.. OUT, rbd export  ── same bytes as SRC
//!  stop_osd(): rbd info / qemu-img read with a 5 s OSD op timeout fail, bounded
//!  start_osd(): the same read works again
//!  drop: mon and OSD PIDs gone, directory removed, nothing in /var/log/ceph & co.
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use integration_tests::{run, CephCluster, IO_BLOCK};

const IMAGE_BYTES: u64 = 64 << 20;

/// How long a client waits for the stopped OSD before it gives up (seconds).
const OSD_OP_TIMEOUT: &str = "5";

/// Paths a Ceph daemon or client would write on this host without the cluster's
/// ceph.conf; none may appear or change while the test runs.
const HOST_PATHS: &[&str] = &[
    "/etc/ceph/ceph.conf",
    "/etc/ceph/ceph.client.admin.keyring",
    "/var/lib/ceph/mon/ceph-a",
    "/var/lib/ceph/osd/ceph-0",
    "/var/log/ceph/ceph.log",
    "/var/log/ceph/ceph.audit.log",
    "/var/log/ceph/ceph-mon.a.log",
    "/var/log/ceph/ceph-osd.0.log",
    "/var/log/ceph/ceph-client.admin.log",
    "/var/run/ceph/ceph-mon.a.asok",
    "/var/run/ceph/ceph-osd.0.asok",
    "/var/run/ceph/ceph-client.admin.asok",
];

fn host_paths() -> Vec<(&'static str, Option<SystemTime>)> {
    HOST_PATHS
        .iter()
        .map(|p| (*p, std::fs::metadata(p).and_then(|m| m.modified()).ok()))
        .collect()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A 64 MiB file of distinct 64 KiB blocks (each a repeated line naming the block).
fn pattern_file(dir: &Path) -> PathBuf {
    let p = dir.join("src.raw");
    let block = IO_BLOCK as usize;
    let mut bytes = Vec::with_capacity(IMAGE_BYTES as usize);
    for b in 0..IMAGE_BYTES / IO_BLOCK {
        let line = format!("vmblk-ceph block={b:06}\n");
        bytes.extend_from_slice(&line.repeat(block / line.len() + 1).as_bytes()[..block]);
    }
    std::fs::write(&p, bytes).unwrap();
    p
}

fn assert_same(want: &Path, got: &Path, what: &str) {
    let (a, b) = (std::fs::read(want).unwrap(), std::fs::read(got).unwrap());
    assert_eq!(a.len(), b.len(), "{what}: size");
    if a != b {
        let i = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(0);
        panic!("{what}: first difference at byte {i}");
    }
}

/// `qemu-img convert -O raw SPEC OUT`: reads the whole image through QEMU's rbd driver.
fn qemu_read(spec: &str, out: &Path) -> anyhow::Result<String> {
    let _ = std::fs::remove_file(out);
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", spec])
        .arg(out))
}

#[test]
fn a_throwaway_ceph_cluster_serves_rbd_survives_its_osd_going_away_and_cleans_up() {
    let t0 = Instant::now();
    let before = host_paths();
    let work = tempfile::tempdir().unwrap();
    let src = pattern_file(work.path());
    let out = work.path().join("out.raw");

    eprintln!("ceph: pattern file made in {:.2?}", t0.elapsed());
    let mut cluster = CephCluster::start().unwrap();
    let (mon_pid, osd_pid) = (cluster.mon_pid().unwrap(), cluster.osd_pid().unwrap());
    let dir = cluster.dir().to_owned();
    eprintln!(
        "ceph: cluster usable after {:.2?} (dir {}, mon {} pid {mon_pid}, osd pid {osd_pid})",
        cluster.started_in(),
        dir.display(),
        cluster.mon_addr(),
    );
    eprintln!(
        "ceph: RSS after start: mon {} MiB, osd {} MiB",
        rss_kib(mon_pid) / 1024,
        rss_kib(osd_pid) / 1024
    );

    // A 64 MiB image, written by qemu-img through librbd, read back two ways.
    cluster
        .rbd(&[
            "create",
            "--size",
            "64M",
            &format!("{}/img", cluster.pool()),
        ])
        .unwrap();
    let spec = cluster.rbd_spec("img");
    let info = run(Command::new("qemu-img").args(["info", "--output=json", &spec])).unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], IMAGE_BYTES, "{info}");
    // The --blockdev form (qemu-storage-daemon, QEMU) opens the same image.
    let info = run(Command::new("qemu-img").args([
        "info",
        "--output=json",
        "--image-opts",
        &cluster.blockdev_opts("img"),
    ]))
    .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], IMAGE_BYTES, "{info}");
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-O", "raw"])
        .arg(&src)
        .arg(&spec))
    .unwrap();
    eprintln!("ceph: wrote 64 MiB with qemu-img in {:.2?}", t.elapsed());
    qemu_read(&spec, &out).unwrap();
    assert_same(&src, &out, "qemu-img read back");
    let exported = work.path().join("export.raw");
    cluster
        .rbd(&[
            "export",
            &format!("{}/img", cluster.pool()),
            exported.to_str().unwrap(),
        ])
        .unwrap();
    assert_same(&src, &exported, "rbd export");
    eprintln!(
        "ceph: RSS after 64 MiB of I/O: mon {} MiB, osd {} MiB",
        rss_kib(mon_pid) / 1024,
        rss_kib(osd_pid) / 1024
    );

    // The cluster goes away (the OSD): bounded clients fail and say why.
    let t = Instant::now();
    cluster.stop_osd().unwrap();
    eprintln!(
        "ceph: OSD stopped (down in the osdmap) in {:.2?}",
        t.elapsed()
    );
    assert!(!alive(osd_pid), "the stopped OSD {osd_pid} still runs");
    let t = Instant::now();
    let err = cluster
        .rbd(&[
            "info",
            &format!("{}/img", cluster.pool()),
            "--rados-osd-op-timeout",
            OSD_OP_TIMEOUT,
        ])
        .expect_err("rbd info answered without an OSD");
    let took = t.elapsed();
    eprintln!("ceph: without the OSD, rbd info failed after {took:.2?}: {err:#}");
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    assert!(took < Duration::from_secs(30), "{took:?}");
    let t = Instant::now();
    let err = qemu_read(
        &format!("{spec}:rados_osd_op_timeout={OSD_OP_TIMEOUT}"),
        &out,
    )
    .expect_err("qemu-img read without an OSD");
    let took = t.elapsed();
    eprintln!("ceph: without the OSD, qemu-img read failed after {took:.2?}: {err:#}");
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    assert!(took < Duration::from_secs(30), "{took:?}");

    // It comes back: the same data is read again.
    let back = cluster.start_osd().unwrap();
    let new_osd = cluster.osd_pid().unwrap();
    eprintln!("ceph: OSD back and serving after {back:.2?} (pid {new_osd})");
    qemu_read(&spec, &out).unwrap();
    assert_same(&src, &out, "qemu-img read after the OSD restart");

    // Dropped: no process, no directory, nothing on the host.
    let t = Instant::now();
    drop(cluster);
    eprintln!("ceph: cluster dropped in {:.2?}", t.elapsed());
    for pid in [mon_pid, osd_pid, new_osd] {
        assert!(!alive(pid), "ceph process {pid} still exists after drop");
    }
    assert!(!dir.exists(), "{} still exists after drop", dir.display());
    assert_eq!(
        host_paths(),
        before,
        "the cluster wrote outside its directory"
    );
}

#[test]
fn stopping_a_ceph_cluster_explicitly_leaves_nothing() {
    let cluster = CephCluster::start().unwrap();
    let pids = [cluster.mon_pid().unwrap(), cluster.osd_pid().unwrap()];
    let dir = cluster.dir().to_owned();
    assert_eq!(
        cluster.rbd(&["ls", "-p", cluster.pool()]).unwrap().trim(),
        ""
    );
    cluster.stop().unwrap();
    for pid in pids {
        assert!(!alive(pid), "ceph process {pid} still exists after stop");
    }
    assert!(!dir.exists(), "{} still exists after stop", dir.display());
}
