//! Tests on loop devices (root only; serialized by /tmp/vmblk-loop-tests.lock): the
//! image-import hook with reflink clones on xfs, and block pools on 512- and 4096-byte
//! sector devices, including SIGKILL while the loop bridge is up.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use vmblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;

fn sparse_file(path: &std::path::Path, size: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// A 1 GiB GPT image with 256 MiB of data, as an Incus unified tarball.
fn big_unified(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let raw = dir.join("big.raw");
    sparse_file(&raw, 1 << 30);
    run(Command::new("sgdisk")
        .args(["-n1:2048:+64M", "-t1:ef00", "-n2:0:0", "-t2:8300"])
        .arg(&raw));
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i % 251) as u8 | 1).collect();
    for i in 0..256u64 {
        f.write_all_at(&chunk, (100 + i * 3) * MIB).unwrap();
    }
    f.write_all_at(b"VMBLK-ROOT-MARKER", 20 << 20).unwrap();
    drop(f);
    let t = dir.join("unified");
    std::fs::create_dir(&t).unwrap();
    std::fs::write(t.join("metadata.yaml"), "architecture: x86_64\n").unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(t.join("rootfs.img")));
    std::fs::remove_file(&raw).unwrap();
    let tar = dir.join("big.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&t)
        .arg("-cf")
        .arg(&tar)
        .args(["metadata.yaml", "rootfs.img"]));
    tar
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_imports_once_and_volumes_from_it_are_reflinked_fast_on_xfs() {
    let _lock = loop_lock();
    let t = tempfile::Builder::new()
        .prefix("vmblkd-reflink")
        .tempdir()
        .unwrap();
    let backing = t.path().join("xfs.img");
    sparse_file(&backing, 4 << 30);
    let lo = Loop::attach(&backing, 512);
    run(Command::new("mkfs.xfs")
        .args(["-q", "-f", "-m", "reflink=1"])
        .arg(&lo.dev));
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    run(Command::new("mount").arg(&lo.dev).arg(&mnt));
    let mount = Mount { dir: mnt.clone() };
    let image = big_unified(t.path());
    let cfg = format!(
        "pools:\n  - name: fast\n    type: dir\n    path: {}\n  - name: plain\n    type: dir\n    path: {}\n",
        mnt.join("pool").display(),
        t.path().join("plain").display()
    );
    let mut d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            ..Default::default()
        },
    );
    let mut c = d.client().await;
    let pool = c
        .get_pool(pb::GetPoolRequest {
            name: "fast".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        pool.reflink,
        "xfs with reflink=1 not detected as reflink-capable"
    );

    let fp = "f00dfeed".repeat(8);
    let what = vmblkd::hook::ImageImport {
        fingerprint: fp.clone(),
        image: image.clone(),
        metadata: None,
        pool: String::new(),
    };
    let t0 = Instant::now();
    let r1 = vmblkd::hook::image_import(&mut c, &what).await.unwrap();
    let import_time = t0.elapsed();
    assert!(r1.unpacked);
    let t1 = Instant::now();
    let r2 = vmblkd::hook::image_import(&mut c, &what).await.unwrap();
    let repeat_time = t1.elapsed();
    assert!(!r2.unpacked, "second import unpacked again");
    assert_eq!(
        d.log_text().matches("image cached").count(),
        1,
        "unpacked more than once"
    );

    let from_fp = |name: &str, size| pb::CreateVolumeRequest {
        pool: "fast".into(),
        name: name.into(),
        size_bytes: size,
        origin: Some(pb::VolumeOrigin {
            source: Some(pb::volume_origin::Source::ImageFingerprint(fp.clone())),
        }),
        grow_last_partition: false,
    };
    let t2 = Instant::now();
    let v = c
        .create_volume(from_fp("vm1", 0))
        .await
        .unwrap()
        .into_inner();
    let clone_time = t2.elapsed();
    assert!(v.reflinked, "not reflinked: {v:?}");
    assert_eq!(v.state, pb::VolumeState::Ready as i32);
    assert_gpt_clean(v.path.as_ref());
    assert_eq!(read_at(v.path.as_ref(), 20 << 20, 17), b"VMBLK-ROOT-MARKER");
    // A larger volume: reflink, then the backup GPT is moved to the new end.
    let t3 = Instant::now();
    let v2 = c
        .create_volume(from_fp("vm2", 4 << 30))
        .await
        .unwrap()
        .into_inner();
    let clone_grow_time = t3.elapsed();
    assert!(v2.reflinked);
    assert_gpt_clean(v2.path.as_ref());
    eprintln!(
        "xfs reflink: import (unpack 1 GiB image, 256 MiB data) {import_time:?}, repeat import \
         {repeat_time:?}, create from fingerprint {clone_time:?}, create 4 GiB from fingerprint \
         (clone + GPT repair) {clone_grow_time:?}"
    );
    assert!(
        clone_time < Duration::from_secs(1),
        "create from fingerprint took {clone_time:?}"
    );
    // For comparison: the same on the test's own file system, if it cannot reflink
    // (ext4): the clone is a sparse copy.
    let plain = c
        .get_pool(pb::GetPoolRequest {
            name: "plain".into(),
        })
        .await
        .unwrap()
        .into_inner();
    if !plain.reflink {
        let what = vmblkd::hook::ImageImport {
            pool: "plain".into(),
            ..what.clone()
        };
        assert!(
            vmblkd::hook::image_import(&mut c, &what)
                .await
                .unwrap()
                .unpacked
        );
        let t4 = Instant::now();
        let p = c
            .create_volume(pb::CreateVolumeRequest {
                pool: "plain".into(),
                ..from_fp("vm3", 0)
            })
            .await
            .unwrap()
            .into_inner();
        let copy_time = t4.elapsed();
        assert!(!p.reflinked);
        assert_gpt_clean(p.path.as_ref());
        eprintln!("no reflink (sparse copy fallback): create from fingerprint {copy_time:?}");
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: "plain".into(),
            name: "vm3".into(),
        })
        .await
        .unwrap();
    }
    for n in ["vm1", "vm2"] {
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: "fast".into(),
            name: n.into(),
        })
        .await
        .unwrap();
    }
    drop(c);
    d.stop();
    drop(d);
    drop(mount);
    drop(lo);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_pool_hands_out_devices_and_unpacks_through_the_bridge_on_4k() {
    let _lock = loop_lock();
    let t = tempfile::Builder::new()
        .prefix("vmblkd-block")
        .tempdir()
        .unwrap();
    let (f512, f4k) = (t.path().join("d512.img"), t.path().join("d4k.img"));
    sparse_file(&f512, 128 * MIB);
    sparse_file(&f4k, 96 * MIB);
    let l512 = Loop::attach(&f512, 512);
    let l4k = Loop::attach(&f4k, 4096);
    let cfg = format!(
        "pools:\n  - name: default\n    type: dir\n    path: {}\n  - name: nvme\n    type: block\n    devices: [{}, {}]\n",
        t.path().join("dirpool").display(),
        l512.dev.display(),
        l4k.dev.display()
    );
    let marker = t.path().join("paused");
    let env = vec![
        ("VMBLKD_TEST_PAUSE_AT".to_string(), "verify".to_string()),
        (
            "VMBLKD_TEST_PAUSE_MARKER".to_string(),
            marker.display().to_string(),
        ),
    ];
    let mut d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            env,
            ..Default::default()
        },
    );
    let c = d.client().await;
    // SIGKILL while the 512-byte bridge over the 4K device is up.
    let mut c2 = c.clone();
    let req = image_request("nvme", "vm", &images().qcow2, 0);
    let pending = tokio::spawn(async move { c2.create_volume(req).await });
    wait_for_file(&marker, Duration::from_secs(60), &d);
    let bridges_during = loops_backed_by(&l4k.dev);
    d.kill();
    let _ = pending.await;
    d.restart_with_env(vec![]);
    let mut c = d.client().await;
    assert_code(
        c.get_volume(pb::GetVolumeRequest {
            pool: "nvme".into(),
            name: "vm".into(),
        })
        .await,
        Code::NotFound,
    );
    assert!(
        loops_backed_by(&l4k.dev).is_empty(),
        "bridge left over {}",
        l4k.dev.display()
    );
    eprintln!("bridges over the 4K device while paused: {bridges_during:?}; after restart: none");

    // Now complete: the smallest fitting device (the 4K one) is chosen.
    let v = c
        .create_volume(image_request("nvme", "vm", &images().qcow2, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.path, l4k.dev.display().to_string());
    assert_eq!(v.size_bytes, 96 * MIB);
    assert_eq!(v.backing_logical_block_size, 4096);
    let rep = image_unpack::inspect(&l4k.dev).unwrap();
    assert!(
        matches!(
            rep.detection.layout,
            image_unpack::partition::DetectedLayout::Gpt { sector_size: 512 }
        ),
        "{:?}",
        rep.detection.layout
    );
    assert!(
        rep.table.as_ref().is_some_and(|t| t.is_good()),
        "{:?}",
        rep.table
    );
    assert!(loops_backed_by(&l4k.dev).is_empty());
    // The guest sees 512-byte sectors through the export.
    let a = c
        .attach_volume(pb::AttachVolumeRequest {
            pool: "nvme".into(),
            name: "vm".into(),
            logical_block_size: 512,
            read_only: false,
            num_queues: 0,
            queue_size: 0,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(std::path::Path::new(&a.socket_path).exists());
    // Block volumes fill their device: growing beyond it is refused.
    let grow = pb::GrowVolumeRequest {
        pool: "nvme".into(),
        name: "vm".into(),
        size_bytes: 256 * MIB,
        grow_last_partition: false,
    };
    assert_code(c.grow_volume(grow).await, Code::ResourceExhausted);
    // The second device, then none left.
    let e = c
        .create_volume(empty_request("nvme", "scratch", 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.path, l512.dev.display().to_string());
    assert_code(
        c.create_volume(empty_request("nvme", "third", 4 * MIB))
            .await,
        Code::ResourceExhausted,
    );
    // Deleting frees (and wipes) the device.
    c.detach_volume(pb::DetachVolumeRequest {
        pool: "nvme".into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
    c.delete_volume(pb::DeleteVolumeRequest {
        pool: "nvme".into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
    assert!(
        read_at(&l4k.dev, 0, 8192).iter().all(|b| *b == 0),
        "device head not wiped"
    );
    c.create_volume(empty_request("nvme", "third", 4 * MIB))
        .await
        .unwrap();
    drop(c);
    d.stop();
    drop(d);
    drop(l4k);
    drop(l512);
}

/// Loop devices whose backing file is `dev` (the bridges over it).
fn loops_backed_by(dev: &std::path::Path) -> Vec<String> {
    let out = Command::new("losetup").arg("-j").arg(dev).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}
