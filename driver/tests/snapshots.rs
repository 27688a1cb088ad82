//! Snapshots through a real vmblkd: the API with CSI's rules on dir pools on xfs
//! (reflink) and ext4 (copies), UNIMPLEMENTED on block pools; and, with a real guest,
//! snapshots taken every 2 s while it writes (each one a prefix of what it wrote, nothing
//! torn, no I/O error in the guest), a volume grown under the running guest (it sees the
//! new size without a reboot; inside it `sgdisk -e` moves its GPT and its last partition
//! and filesystem grow, after which an offline repair finds nothing to do), and a
//! snapshot restored and booted. Root only.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use integration_tests::{
    io_lines, loop_tests_lock, pattern_block, Guest, GuestDisk, GuestParams, TestImage, IO_BLOCK,
    SCRATCH,
};
use tonic::Code;
use vmblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_api_on_dir_pools_follows_csi_and_block_pools_say_why_not() {
    let _lock = loop_lock();
    let t = tempfile::tempdir().unwrap();
    for (fs, reflink) in [("xfs", true), ("ext4", false)] {
        let p = dir_pool(t.path(), fs);
        let mut c = p.daemon.client().await;
        let pool = c
            .get_pool(pb::GetPoolRequest { name: "p".into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(pool.reflink, reflink, "{fs}");
        let v = c
            .create_volume(empty_request("p", "v", 32 * MIB))
            .await
            .unwrap()
            .into_inner();
        let path = PathBuf::from(&v.path);
        write(&path, 0, 0xA1, 4096);
        let s1 = c
            .create_snapshot(snap("p", "v", "s1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((s1.volume.as_str(), s1.size_bytes), ("v", 32 * MIB));
        // Idempotent by name; the name taken in the pool by another volume's snapshot.
        let again = c
            .create_snapshot(snap("p", "v", "s1"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.created_unix_ms, s1.created_unix_ms);
        c.create_volume(empty_request("p", "w", 8 * MIB))
            .await
            .unwrap();
        assert_code(
            c.create_snapshot(snap("p", "w", "s1")).await,
            Code::AlreadyExists,
        );
        assert_code(
            c.create_snapshot(snap("p", "absent", "s9")).await,
            Code::NotFound,
        );
        assert_code(
            c.create_snapshot(snap("p", "v", "Bad/Name")).await,
            Code::InvalidArgument,
        );
        // The volume changes; the snapshot does not; restore puts it back.
        write(&path, 0, 0xB2, 4096);
        let listed = c
            .list_snapshots(pb::ListSnapshotsRequest {
                pool: "p".into(),
                volume: "v".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.snapshots.len(), 1);
        c.restore_snapshot(restore("p", "s1")).await.unwrap();
        assert_eq!(read_at(&path, 0, 4096), vec![0xA1; 4096], "{fs}: restore");
        assert_code(c.restore_snapshot(restore("p", "s9")).await, Code::NotFound);
        // Attached: no restore.
        c.attach_volume(attach("p", "v")).await.unwrap();
        assert_code(
            c.restore_snapshot(restore("p", "s1")).await,
            Code::FailedPrecondition,
        );
        // Attached (no frontend): the snapshot is still taken, the export paused for it.
        let s2 = c
            .create_snapshot(snap("p", "v", "s2"))
            .await
            .unwrap()
            .into_inner();
        assert!(s2.taken_attached);
        c.detach_volume(pb::DetachVolumeRequest {
            pool: "p".into(),
            name: "v".into(),
        })
        .await
        .unwrap();
        // Delete: idempotent; a deleted volume takes its snapshots along.
        let del = pb::DeleteSnapshotRequest {
            pool: "p".into(),
            name: "s1".into(),
        };
        assert!(
            c.delete_snapshot(del.clone())
                .await
                .unwrap()
                .into_inner()
                .existed
        );
        assert!(!c.delete_snapshot(del).await.unwrap().into_inner().existed);
        let sdir = p.dir.join("snapshots");
        assert_eq!(
            std::fs::read_dir(&sdir).unwrap().count(),
            1,
            "{fs}: s2 only"
        );
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: "p".into(),
            name: "v".into(),
        })
        .await
        .unwrap();
        assert_eq!(
            std::fs::read_dir(&sdir).unwrap().count(),
            0,
            "{fs}: left behind"
        );
    }

    // Block pools: one volume per device, nowhere to keep a snapshot.
    let f = t.path().join("blk.img");
    std::fs::File::create(&f)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let l = Loop::attach(&f, 512);
    let ddir = t.path().join("blk-daemon");
    std::fs::create_dir_all(&ddir).unwrap();
    let d = Daemon::start(
        &ddir,
        DaemonOpts {
            config: Some(format!(
                "pools:\n  - name: b\n    type: block\n    devices: [{}]\n",
                l.dev.display()
            )),
            ..DaemonOpts::default()
        },
    );
    let mut c = d.client().await;
    c.create_volume(empty_request("b", "v", 8 * MIB))
        .await
        .unwrap();
    let e = c.create_snapshot(snap("b", "v", "s1")).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("block pool"), "{}", e.message());
    c.delete_volume(pb::DeleteVolumeRequest {
        pool: "b".into(),
        name: "v".into(),
    })
    .await
    .unwrap();
}

/// The last size of vda the guest printed (`size vda`), in sectors.
fn sectors_seen(log: &str) -> Option<u64> {
    io_lines(log, "dev", "vda")
        .iter()
        .rev()
        .find_map(|m| m.get("sectors").and_then(|s| s.parse().ok()))
}

/// The seeds the guest's writer left in blocks `0..blocks` of the scratch partition of
/// the image at `path` (0: never written); panics on a block that is no whole pattern.
fn seeds(path: &Path, blocks: u64, max_seed: u64) -> Vec<u64> {
    (0..blocks)
        .map(|b| {
            let got = read_at(path, SCRATCH.offset() + b * IO_BLOCK, IO_BLOCK as usize);
            if got.iter().all(|&x| x == 0) {
                return 0;
            }
            (1..=max_seed)
                .find(|&s| got == pattern_block(s, b))
                .unwrap_or_else(|| panic!("{}: block {b} is torn or foreign", path.display()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_under_a_writing_guest_are_crash_consistent_and_a_grown_volume_reaches_it() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let t = tempfile::tempdir().unwrap();
    let p = dir_pool(t.path(), "xfs");
    let mut c = p.daemon.client().await;
    let v = c
        .create_volume(image_request("p", "vm", &image.qcow2, 192 * MIB))
        .await
        .unwrap()
        .into_inner();
    let a = c
        .attach_volume(attach("p", "vm"))
        .await
        .unwrap()
        .into_inner();
    let params = GuestParams {
        disks: vec![GuestDisk::socket(Path::new(&a.socket_path), 1, Some(1))],
        control: true,
        timeout: Duration::from_secs(300),
        ..GuestParams::default()
    }
    .log_name("snapshots_while_writing");
    let mut guest = tokio::task::block_in_place(|| Guest::start(&params)).unwrap();
    tokio::task::block_in_place(|| guest.wait_workload_ready(Duration::from_secs(120))).unwrap();

    // The writer goes round the scratch partition's 128 blocks, pass after pass (seed
    // 1 + pass), each block written with O_DIRECT and fsync before the next.
    const BLOCKS: u64 = 128;
    let r = tokio::task::block_in_place(|| {
        guest.command(
            &format!("writer w scratch 1 0 {BLOCKS} 0"),
            Duration::from_secs(5),
        )
    })
    .unwrap();
    assert_eq!(r.rc, 0);
    // Every 2 s for 20 s: what the guest had acknowledged, then a snapshot.
    let mut taken = Vec::new();
    for i in 0..10 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let acked = io_lines(&guest.serial_log(), "writer", "w")
            .last()
            .filter(|m| m.contains_key("pass") && m.contains_key("block"))
            .map(|m| {
                (
                    m["pass"].parse::<u64>().unwrap(),
                    m["block"].parse::<u64>().unwrap(),
                )
            });
        let t0 = std::time::Instant::now();
        let s = c
            .create_snapshot(snap("p", "vm", &format!("s{i}")))
            .await
            .unwrap()
            .into_inner();
        assert!(s.taken_attached);
        eprintln!(
            "snapshot s{i}: {:?} (guest had acked {acked:?})",
            t0.elapsed()
        );
        taken.push((s.name, acked));
    }
    let r =
        tokio::task::block_in_place(|| guest.command("stop w", Duration::from_secs(30))).unwrap();
    assert_eq!(r.rc, 0);
    let log = guest.serial_log();
    let lines = io_lines(&log, "writer", "w");
    assert!(
        !lines.iter().any(|m| m.contains_key("write-error")),
        "the guest saw a write error: {lines:?}"
    );
    let last = lines.last().unwrap();
    assert_eq!(last["err"], "0", "{last:?}");
    let passes = lines
        .iter()
        .filter_map(|m| m.get("pass").and_then(|p| p.parse::<u64>().ok()))
        .max()
        .unwrap_or(0);
    eprintln!("writer: {} blocks in {} passes", last["ok"], passes + 1);

    // Online grow: the running guest sees the new size, no reboot.
    let r =
        tokio::task::block_in_place(|| guest.command("size vda", Duration::from_secs(5))).unwrap();
    assert_eq!(
        sectors_seen(&guest.serial_log()),
        Some(192 * MIB / 512),
        "{r:?}"
    );
    let g = c
        .grow_volume(pb::GrowVolumeRequest {
            pool: "p".into(),
            name: "vm".into(),
            size_bytes: 256 * MIB,
            grow_last_partition: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(g.note.contains("sees"), "{}", g.note);
    let mut seen = 0u64;
    for _ in 0..50 {
        tokio::task::block_in_place(|| guest.command("size vda", Duration::from_secs(5))).unwrap();
        seen = sectors_seen(&guest.serial_log()).unwrap_or(0);
        if seen == 256 * MIB / 512 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        seen,
        256 * MIB / 512,
        "the guest did not see the grown volume"
    );
    // The guest's own tool moves its backup GPT to the new end.
    let r = tokio::task::block_in_place(|| guest.command("gpt-grow vda", Duration::from_secs(30)))
        .unwrap();
    assert_eq!(
        r.rc,
        0,
        "sgdisk -e in the guest failed:\n{}",
        guest.diagnostics()
    );
    // Its last partition and the filesystem on it grow to the new end.
    let r = tokio::task::block_in_place(|| guest.command("fs-grow vda", Duration::from_secs(60)))
        .unwrap();
    assert_eq!(
        r.rc,
        0,
        "growing in the guest failed:\n{}",
        guest.diagnostics()
    );
    let grown: Vec<_> = io_lines(&guest.serial_log(), "dev", "vda")
        .into_iter()
        .filter(|m| m.contains_key("fs-grow"))
        .collect();
    let g = grown.last().expect("no fs-grow line");
    let (before, after): (u64, u64) = (
        g["blocks_before"].parse().unwrap(),
        g["blocks_after"].parse().unwrap(),
    );
    // 1 KiB ext4 blocks on the 8 MiB partition: the 64 MiB grown are the filesystem's.
    assert!(
        after >= before + 60 * 1024,
        "the filesystem did not grow: {before} -> {after} blocks"
    );
    eprintln!("guest filesystem grown from {before} to {after} blocks");
    tokio::task::block_in_place(|| {
        guest.send("poweroff").unwrap();
        guest.wait_exit(Duration::from_secs(120)).unwrap()
    });

    // Each snapshot: whole blocks only, a prefix of the writer's order (blocks 0..k of
    // one pass, the rest of the pass before), and everything acknowledged before it.
    let sdir = p.dir.join("snapshots");
    for (name, acked) in &taken {
        let path = sdir.join(format!("{}@{name}.img", v.uuid));
        let s = seeds(&path, BLOCKS, passes + 2);
        let top = *s.iter().max().unwrap();
        let k = s.iter().take_while(|&&x| x == top).count();
        assert!(
            s[k..].iter().all(|&x| x + 1 == top || (top == 1 && x == 0)),
            "{name}: not a prefix state: {s:?}"
        );
        if let Some((pass, block)) = acked {
            let need = 1 + pass;
            assert!(
                s[..=(*block as usize)].iter().all(|&x| x >= need),
                "{name}: a write acknowledged before the snapshot is missing \
                 (pass {pass}, block {block}): {s:?}"
            );
        }
    }

    // Detached, a snapshot restored, and the guest boots from it.
    c.detach_volume(pb::DetachVolumeRequest {
        pool: "p".into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
    // What the guest did to its table is what an offline repair would have done.
    let g = c
        .grow_volume(pb::GrowVolumeRequest {
            pool: "p".into(),
            name: "vm".into(),
            size_bytes: 256 * MIB,
            grow_last_partition: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !g.table_repaired,
        "an offline repair still had work: {}",
        g.note
    );
    assert!(g.note.contains("needed nothing"), "{}", g.note);
    let rv = c
        .restore_snapshot(restore("p", "s5"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rv.size_bytes, 192 * MIB);
    let a = c
        .attach_volume(attach("p", "vm"))
        .await
        .unwrap()
        .into_inner();
    let outcome = tokio::task::block_in_place(|| {
        let params = GuestParams {
            disks: vec![GuestDisk::socket(Path::new(&a.socket_path), 1, Some(1))],
            ..GuestParams::default()
        }
        .log_name("snapshot_restored_boot");
        Guest::start(&params).unwrap().expect_clean_run(1)
    });
    eprintln!("restored snapshot booted in {:?}", outcome.elapsed);
}
