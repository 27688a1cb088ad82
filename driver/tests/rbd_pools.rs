//! `rbd` pools in vmblkd, against a real one-node Ceph cluster the tests start
//! (`integration_tests::CephCluster`): the API on an rbd pool, the image cache (imported
//! once, cloned per volume, deleted while clones live), two daemons sharing one pool as
//! two hosts would (listing, refusal naming the other host, take-over with fencing after
//! a crash), a cluster that is down when vmblkd starts, and snapshots, clones and
//! renames done the RBD way (snapshots, flattened clones, `rbd rename`). Root only.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use integration_tests::{loop_tests_lock, BlkioClient, CephCluster, Guest, GuestParams, TestImage};
use tonic::Code;
use vmblk_proto::v1 as pb;

const POOL: &str = "ceph";

/// A vmblkd configuration with the cluster's pool as `ceph` (and a local dir pool), as
/// host `node`.
fn config(cluster: &CephCluster, node: &str, dir: &Path) -> String {
    format!(
        "node: {node}\n\
         pools:\n\
         \x20 - name: local\n    type: dir\n    path: {}\n\
         \x20 - name: {POOL}\n    type: rbd\n    pool: {}\n    conf: {}\n    id: {}\n    keyring: {}\n",
        dir.join("local").display(),
        cluster.pool(),
        cluster.conf_path().display(),
        cluster.client_id(),
        cluster.keyring_path().display()
    )
}

fn daemon(cluster: &CephCluster, node: &str, dir: &Path) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    Daemon::start(
        dir,
        DaemonOpts {
            config: Some(config(cluster, node, dir)),
            ..DaemonOpts::default()
        },
    )
}

fn attach_req(name: &str, force: bool) -> pb::AttachVolumeRequest {
    pb::AttachVolumeRequest {
        pool: POOL.into(),
        name: name.into(),
        logical_block_size: 512,
        read_only: false,
        num_queues: 1,
        queue_size: 0,
        force,
    }
}

fn id(name: &str) -> (String, String) {
    (POOL.into(), name.into())
}

fn boot(a: &pb::Attachment, name: &str) -> integration_tests::GuestOutcome {
    let mut args = a.qemu_args.clone();
    args[3].push_str(",bootindex=1");
    let params = GuestParams {
        extra_args: args,
        ..GuestParams::default()
    }
    .log_name(name);
    let mut guest = Guest::start(&params).expect("starting the guest");
    guest.expect_clean_run(1)
}

fn images_in(cluster: &CephCluster) -> Vec<String> {
    let mut v: Vec<String> = cluster
        .rbd(&["ls", "-p", cluster.pool()])
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// Inside the test image's root partition.
const MARK: u64 = 30 << 20;

fn rbd_image(address: &str) -> rbd::Image {
    let spec = rbd::RbdSpec::parse(address).unwrap();
    rbd::open(&spec, &rbd::ClusterOptions::from_spec(&spec), false).unwrap()
}

/// Writes a block of `byte` at MARK of the volume at `address`.
fn rbd_mark(address: &str, byte: u8) {
    let img = rbd_image(address);
    img.write_at(&[byte; 4096], MARK).unwrap();
    img.flush().unwrap();
}

/// The first byte at MARK of the volume at `address`.
fn rbd_marked(address: &str) -> u8 {
    let mut b = [0u8; 4096];
    rbd_image(address).read_at(&mut b, MARK).unwrap();
    b[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_clones_and_renames_on_an_rbd_pool_are_done_by_ceph() {
    let cluster = CephCluster::start().unwrap();
    let t = tempfile::tempdir().unwrap();
    let d = daemon(&cluster, "host-a", t.path());
    let mut c = d.client().await;
    let snaps_of = |image: &str| {
        cluster
            .rbd(&["snap", "ls", &format!("vmblk/{image}")])
            .unwrap()
    };

    let src = c
        .create_volume(image_request(POOL, "src", &images().qcow2, 0))
        .await
        .unwrap()
        .into_inner();
    rbd_mark(&src.path, 0xA1);
    let s1 = c
        .create_snapshot(snap(POOL, "src", "s1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s1.size_bytes, src.size_bytes);
    assert!(
        snaps_of("vol-src").contains("snap-s1"),
        "{}",
        snaps_of("vol-src")
    );
    rbd_mark(&src.path, 0xB2);

    // A clone of the snapshot, larger: flattened (no parent), its data, GPT at its end.
    let big = src.size_bytes + (64 << 20);
    let c1 = c
        .create_volume(clone_request(POOL, "c1", "src", "s1", big))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c1.size_bytes, big);
    assert_eq!(rbd_marked(&c1.path), 0xA1);
    let info = cluster.rbd(&["info", "vmblk/vol-c1"]).unwrap();
    assert!(!info.contains("parent:"), "{info}");
    let out = std::process::Command::new(vmblk_bin())
        .args(["inspect", &c1.path, "--json"])
        .output()
        .unwrap();
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["table"]["backup_at_end"], true, "{rep:#}");
    // Published: the snapshot as a qcow2 image equal to it (qemu-img reads both).
    let published = t.path().join("s1.qcow2");
    let r = c
        .publish_volume(pb::PublishVolumeRequest {
            pool: POOL.into(),
            name: "src".into(),
            snapshot: "s1".into(),
            path: published.display().to_string(),
            compression: pb::ImageCompression::Zlib as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.virtual_size, src.size_bytes);
    let snap_addr = rbd::RbdSpec::parse(&src.path)
        .unwrap()
        .at_snapshot(Some("snap-s1"))
        .to_string();
    let same = std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2", &snap_addr])
        .arg(&published)
        .status()
        .unwrap();
    assert!(
        same.success(),
        "the published snapshot differs from {snap_addr}"
    );
    // A clone of the detached volume: its data now; the temporary snapshot gone.
    let c2 = c
        .create_volume(clone_request(POOL, "c2", "src", "", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rbd_marked(&c2.path), 0xB2);
    let left = snaps_of("vol-src");
    assert!(!left.contains("vmblk-clone-"), "{left}");
    let info = cluster.rbd(&["info", "vmblk/vol-c2"]).unwrap();
    assert!(!info.contains("parent:"), "{info}");
    // The snapshot is protected only while a clone is made.
    let info = cluster.rbd(&["info", "vmblk/vol-src@snap-s1"]).unwrap();
    assert!(info.contains("protected: False"), "{info}");
    assert_code(
        c.create_volume(clone_request(POOL, "c3", "src", "nosuch", 0))
            .await,
        Code::NotFound,
    );

    // Rename: the image and its snapshots; restore and delete work under the new name.
    let rename = pb::RenameVolumeRequest {
        pool: POOL.into(),
        name: "src".into(),
        new_name: "moved".into(),
    };
    c.attach_volume(attach_req("src", false)).await.unwrap();
    assert_code(
        c.rename_volume(rename.clone()).await,
        Code::FailedPrecondition,
    );
    c.detach_volume(pb::DetachVolumeRequest {
        pool: POOL.into(),
        name: "src".into(),
    })
    .await
    .unwrap();
    let moved = c.rename_volume(rename).await.unwrap().into_inner();
    assert!(
        moved.path.starts_with("rbd:vmblk/vol-moved:"),
        "{}",
        moved.path
    );
    assert_eq!(images_in(&cluster), ["vol-c1", "vol-c2", "vol-moved"]);
    assert!(snaps_of("vol-moved").contains("snap-s1"));
    c.restore_snapshot(restore(POOL, "s1")).await.unwrap();
    assert_eq!(rbd_marked(&moved.path), 0xA1);
    // A second host reads the renamed record from the cluster.
    let d2 = daemon(&cluster, "host-b", &t.path().join("b"));
    let mut c2h = d2.client().await;
    let seen = c2h
        .get_volume(pb::GetVolumeRequest {
            pool: POOL.into(),
            name: "moved".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.uuid, src.uuid);
    drop(d2);

    // The source gone (its snapshots with it), the clones keep their data.
    let del = |n: &str| pb::DeleteVolumeRequest {
        pool: POOL.into(),
        name: n.into(),
    };
    c.delete_volume(del("moved")).await.unwrap();
    assert_eq!(rbd_marked(&c1.path), 0xA1);
    assert_eq!(rbd_marked(&c2.path), 0xB2);
    c.delete_volume(del("c1")).await.unwrap();
    c.delete_volume(del("c2")).await.unwrap();
    assert!(images_in(&cluster).is_empty(), "{:?}", images_in(&cluster));
    cluster.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_on_an_rbd_pool_is_idempotent_and_names_its_errors() {
    let cluster = CephCluster::start().unwrap();
    let t = tempfile::tempdir().unwrap();
    let d = daemon(&cluster, "host-a", t.path());
    let mut c = d.client().await;

    let p = c
        .get_pool(pb::GetPoolRequest { name: POOL.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p.r#type, pb::PoolType::Rbd as i32);
    assert!(p.available, "{p:?}");
    assert_eq!(p.rbd.as_ref().unwrap().pool, cluster.pool());

    let (pool, name) = id("v1");
    let v = c
        .create_volume(empty_request(&pool, &name, 64 << 20))
        .await
        .unwrap()
        .into_inner();
    assert!(v.path.starts_with("rbd:vmblk/vol-v1:"), "{}", v.path);
    assert_eq!(v.size_bytes, 64 << 20);
    assert_eq!(images_in(&cluster), ["vol-v1"]);
    // Again: the same volume.
    let again = c
        .create_volume(empty_request(&pool, &name, 64 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.uuid, v.uuid);
    assert_code(
        c.create_volume(empty_request(&pool, &name, 128 << 20))
            .await,
        Code::AlreadyExists,
    );
    // A racing create of another volume: one wins, the other is told it is busy or
    // gets the same volume; never two images.
    let (mut c1, mut c2) = (d.client().await, d.client().await);
    let (r1, r2) = tokio::join!(
        c1.create_volume(empty_request(&pool, "race", 32 << 20)),
        c2.create_volume(empty_request(&pool, "race", 32 << 20)),
    );
    for r in [&r1, &r2] {
        if let Err(s) = r {
            assert_eq!(s.code(), Code::Aborted, "{s:?}");
        }
    }
    assert!(r1.is_ok() || r2.is_ok());
    assert_eq!(images_in(&cluster), ["vol-race", "vol-v1"]);

    // Grow: the image grows.
    let g = c
        .grow_volume(pb::GrowVolumeRequest {
            pool: pool.clone(),
            name: name.clone(),
            size_bytes: 96 << 20,
            grow_last_partition: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.volume.unwrap().size_bytes, 96 << 20);
    let info = cluster.rbd(&["info", "vmblk/vol-v1"]).unwrap();
    assert!(info.contains("size 96 MiB"), "{info}");

    // Errors name what is wrong.
    assert_code(
        c.get_volume(pb::GetVolumeRequest {
            pool: pool.clone(),
            name: "absent".into(),
        })
        .await,
        Code::NotFound,
    );
    let bad_pool = pb::CreatePoolRequest {
        name: "bad".into(),
        r#type: pb::PoolType::Rbd as i32,
        path: String::new(),
        devices: vec![],
        capacity_bytes: 0,
        rbd: Some(pb::RbdPool {
            pool: "no/such".into(),
            ..Default::default()
        }),
    };
    assert_code(c.create_pool(bad_pool).await, Code::InvalidArgument);

    // Delete: gone from the cluster; again: did not exist.
    for n in ["v1", "race"] {
        let del = pb::DeleteVolumeRequest {
            pool: pool.clone(),
            name: n.into(),
        };
        assert!(
            c.delete_volume(del.clone())
                .await
                .unwrap()
                .into_inner()
                .existed
        );
        assert!(!c.delete_volume(del).await.unwrap().into_inner().existed);
    }
    assert!(images_in(&cluster).is_empty());
    cluster.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_cached_once_cloned_per_volume_and_deleted_only_after_their_last_clone() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let cluster = CephCluster::start().unwrap();
    let t = tempfile::tempdir().unwrap();
    let d = daemon(&cluster, "host-a", t.path());
    let mut c = d.client().await;
    let import = pb::ImportImageRequest {
        pool: POOL.into(),
        fingerprint: "f00d".repeat(16),
        image: Some(pb::ImageFile {
            path: image.qcow2.display().to_string(),
            metadata_path: String::new(),
        }),
    };
    let first = c.import_image(import.clone()).await.unwrap().into_inner();
    assert!(first.unpacked);
    let second = c.import_image(import.clone()).await.unwrap().into_inner();
    assert!(!second.unpacked, "imported twice");
    let fp = import.fingerprint.clone();
    assert!(images_in(&cluster).contains(&format!("img-{fp}")));

    // A 20 GiB volume from it: a clone, grown, its GPT moved to the new end.
    let t0 = Instant::now();
    let v = c
        .create_volume(pb::CreateVolumeRequest {
            pool: POOL.into(),
            name: "vm".into(),
            size_bytes: 20 << 30,
            origin: Some(pb::VolumeOrigin {
                source: Some(pb::volume_origin::Source::ImageFingerprint(fp.clone())),
            }),
            grow_last_partition: false,
        })
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "20 GiB volume from a cached image ready in {:?}",
        t0.elapsed()
    );
    assert_eq!(v.size_bytes, 20 << 30);
    let info = cluster.rbd(&["info", "vmblk/vol-vm"]).unwrap();
    assert!(
        info.contains(&format!("parent: vmblk/img-{fp}@vmblk-base")),
        "{info}"
    );
    let out = std::process::Command::new(vmblk_bin())
        .args(["inspect", &v.path, "--json"])
        .output()
        .unwrap();
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["table"]["backup_at_end"], true, "{rep:#}");

    // The cached image deleted while the clone lives: hidden, the clone boots.
    let del = pb::DeleteImageRequest {
        pool: POOL.into(),
        fingerprint: fp.clone(),
    };
    assert!(c.delete_image(del).await.unwrap().into_inner().existed);
    let listed = c
        .list_images(pb::ListImagesRequest { pool: POOL.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.images.is_empty(), "{listed:?}");
    assert_eq!(
        images_in(&cluster),
        ["vol-vm".to_string(), format!("zombie-img-{fp}")]
    );
    let a = c
        .attach_volume(attach_req("vm", false))
        .await
        .unwrap()
        .into_inner();
    let outcome = tokio::task::spawn_blocking(move || boot(&a, "rbd_pool_clone"))
        .await
        .unwrap();
    eprintln!("clone of a deleted image booted in {:?}", outcome.elapsed);
    c.detach_volume(pb::DetachVolumeRequest {
        pool: POOL.into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
    // The last clone goes: so does the image.
    assert!(
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: POOL.into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .existed
    );
    assert!(images_in(&cluster).is_empty(), "{:?}", images_in(&cluster));
    cluster.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_a_pool_and_the_second_takes_over_only_by_force_fencing_the_first() {
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let cluster = CephCluster::start().unwrap();
    let t = tempfile::tempdir().unwrap();
    let mut a = daemon(&cluster, "host-a", &t.path().join("a"));
    let b = daemon(&cluster, "host-b", &t.path().join("b"));
    let (mut ca, mut cb) = (a.client().await, b.client().await);

    // Created on A, seen on B.
    let v = ca
        .create_volume(image_request(POOL, "vm", &image.qcow2, 256 << 20))
        .await
        .unwrap()
        .into_inner();
    let on_b = cb
        .get_volume(pb::GetVolumeRequest {
            pool: POOL.into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(on_b.uuid, v.uuid);

    // Attached on A; B is refused, naming A.
    let att_a = ca
        .attach_volume(attach_req("vm", false))
        .await
        .unwrap()
        .into_inner();
    let refused = cb.attach_volume(attach_req("vm", false)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("host-a"),
        "{}",
        refused.message()
    );

    // A's client writes a marker, then A freezes (SIGSTOP: alive, not answering).
    const MARKER_AT: u64 = 200 << 20;
    let mut old = BlkioClient::connect(Path::new(&att_a.socket_path), 256, 1 << 20).unwrap();
    old.mem()[..4096].fill(0xA5);
    assert_eq!(old.write(MARKER_AT, 0, 4096).unwrap(), 0);
    assert_eq!(old.flush().unwrap(), 0);
    let a_pid = nix::unistd::Pid::from_raw(a.pid().unwrap() as i32);
    nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGSTOP).unwrap();

    // B takes over by force: A's client is fenced.
    let att_b = cb
        .attach_volume(attach_req("vm", true))
        .await
        .unwrap()
        .into_inner();
    let blocklist = cluster.ceph(&["osd", "blocklist", "ls"]).unwrap();
    assert!(
        blocklist.contains("127.0.0.1"),
        "no client fenced: {blocklist}"
    );
    // A wakes up: its late write is refused by the cluster (the OSD answers its
    // blocklisted client EBLOCKLISTED) and nothing of it reaches the image: read back on
    // B below. Whether A's guest hears of it is librbd's business: its writearound cache
    // acknowledges a write before the OSD answers, and the flush after it usually
    // fails (EIO), unless librbd, seeing its lock lost, flushed and swallowed the error
    // first.
    nix::sys::signal::kill(a_pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    old.mem()[..4096].fill(0x66);
    let late = old.write(MARKER_AT, 0, 4096).unwrap();
    let late_flush = old.flush().unwrap();
    eprintln!("fenced host: write returned {late}, flush {late_flush}");
    drop(old);
    // A crashes for good.
    a.kill();

    // The guest runs on B, and A's data is there.
    let outcome = tokio::task::spawn_blocking({
        let att_b = att_b.clone();
        move || boot(&att_b, "rbd_pool_takeover")
    })
    .await
    .unwrap();
    eprintln!("guest booted on host B in {:?}", outcome.elapsed);
    let mut reader = BlkioClient::connect(Path::new(&att_b.socket_path), 256, 1 << 20).unwrap();
    assert_eq!(reader.read(MARKER_AT, 0, 4096).unwrap(), 0);
    assert!(
        reader.mem()[..4096].iter().all(|&x| x == 0xA5),
        "A's write is not there, or the fenced write got through"
    );
    drop(reader);
    // B detaches; the volume is free for anyone.
    cb.detach_volume(pb::DetachVolumeRequest {
        pool: POOL.into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
    let free = cb
        .get_volume(pb::GetVolumeRequest {
            pool: POOL.into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(free.attachment.is_none(), "{free:?}");
    drop(b);
    cluster.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_down_at_start_leaves_its_pool_unavailable_and_the_others_serving() {
    let mut cluster = CephCluster::start().unwrap();
    cluster.stop_mon().unwrap();
    let t = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let d = daemon(&cluster, "host-a", t.path());
    eprintln!("vmblkd started with its cluster down in {:?}", t0.elapsed());
    let mut c = d.client().await;
    let p = c
        .get_pool(pb::GetPoolRequest { name: POOL.into() })
        .await
        .unwrap()
        .into_inner();
    assert!(!p.available, "{p:?}");
    assert!(!p.unavailable_reason.is_empty(), "{p:?}");
    eprintln!("unavailable: {}", p.unavailable_reason);
    // The local pool serves.
    c.create_volume(empty_request("local", "l1", 16 << 20))
        .await
        .unwrap();
    // The rbd pool says it is unavailable.
    assert_code(
        c.create_volume(empty_request(POOL, "r1", 16 << 20)).await,
        Code::Unavailable,
    );
    // The cluster comes back: the pool serves, no restart.
    cluster.start_mon().unwrap();
    let back = Instant::now();
    loop {
        let p = c
            .get_pool(pb::GetPoolRequest { name: POOL.into() })
            .await
            .unwrap()
            .into_inner();
        if p.available {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(60),
            "the pool did not come back: {}\n{}",
            p.unavailable_reason,
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "pool available {:?} after the cluster came back",
        back.elapsed()
    );
    c.create_volume(empty_request(POOL, "r1", 16 << 20))
        .await
        .unwrap();
    assert_eq!(images_in(&cluster), ["vol-r1"]);
    drop(d);
    cluster.stop().unwrap();
}
