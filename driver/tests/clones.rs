//! Clones and renames through a real vmblkd: volumes cloned from a snapshot and from a
//! detached volume (CSI's content source) on dir pools on xfs (reflink) and ext4
//! (copies) and on a block pool (a device copied onto a larger 4K device), the GPT
//! moved to a larger clone's end, clones independent of their source, CSI's errors;
//! renames of detached volumes with their snapshots following; a volume and a snapshot
//! published as qcow2 images that `qemu-img compare` finds equal to them. Root only.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tonic::Code;
use vmblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;
/// Inside the test image's root partition.
const MARK: u64 = 30 * MIB;

fn rename(name: &str, new_name: &str) -> pb::RenameVolumeRequest {
    pb::RenameVolumeRequest {
        pool: "p".into(),
        name: name.into(),
        new_name: new_name.into(),
    }
}

fn detach(name: &str) -> pb::DetachVolumeRequest {
    pb::DetachVolumeRequest {
        pool: "p".into(),
        name: name.into(),
    }
}

fn publish(name: &str, snapshot: &str, path: &Path) -> pb::PublishVolumeRequest {
    pb::PublishVolumeRequest {
        pool: "p".into(),
        name: name.into(),
        snapshot: snapshot.into(),
        path: path.display().to_string(),
        compression: pb::ImageCompression::Zstd as i32,
    }
}

/// `qemu-img compare` of a raw volume and a qcow2 image.
fn equal_to_qcow2(raw: &Path, qcow2: &Path) -> bool {
    std::process::Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2"])
        .arg(raw)
        .arg(qcow2)
        .status()
        .unwrap()
        .success()
}

fn mark(path: &Path) -> u8 {
    read_at(path, MARK, 4096)[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_and_renames_on_dir_pools_copy_what_they_name_and_follow_csi() {
    let _lock = loop_lock();
    let t = tempfile::tempdir().unwrap();
    for (fs, reflink) in [("xfs", true), ("ext4", false)] {
        let p = dir_pool(t.path(), fs);
        let mut c = p.daemon.client().await;
        let src = c
            .create_volume(image_request("p", "src", &images().qcow2, 0))
            .await
            .unwrap()
            .into_inner();
        let src_path = PathBuf::from(&src.path);
        write(&src_path, MARK, 0xA1, 4096);
        c.create_snapshot(snap("p", "src", "s1")).await.unwrap();
        write(&src_path, MARK, 0xB2, 4096);

        // From the snapshot, larger: its data, the backup GPT at the new end.
        let big = src.size_bytes + 64 * MIB;
        let c1 = c
            .create_volume(clone_request("p", "c1", "src", "s1", big))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c1.size_bytes, big, "{fs}");
        assert_eq!(c1.reflinked, reflink, "{fs}");
        let c1_path = PathBuf::from(&c1.path);
        assert_eq!(mark(&c1_path), 0xA1, "{fs}: the snapshot's data");
        assert_gpt_clean(&c1_path);
        // From the (detached) volume, its size: its data now.
        let c2 = c
            .create_volume(clone_request("p", "c2", "src", "", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(c2.size_bytes, src.size_bytes, "{fs}");
        let c2_path = PathBuf::from(&c2.path);
        assert_eq!(mark(&c2_path), 0xB2, "{fs}: the volume's data");
        assert_gpt_clean(&c2_path);
        assert_eq!(mark(&src_path), 0xB2, "{fs}: the source is untouched");

        // CSI: idempotent for the same source; the name taken by another source.
        let again = c
            .create_volume(clone_request("p", "c2", "src", "", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again.uuid, c2.uuid);
        assert_code(
            c.create_volume(clone_request("p", "c2", "src", "s1", 0))
                .await,
            Code::AlreadyExists,
        );
        assert_code(
            c.create_volume(clone_request("p", "c3", "absent", "", 0))
                .await,
            Code::NotFound,
        );
        assert_code(
            c.create_volume(clone_request("p", "self", "self", "", 0))
                .await,
            Code::InvalidArgument,
        );
        assert_code(
            c.create_volume(clone_request("p", "c3", "src", "nosuch", 0))
                .await,
            Code::NotFound,
        );
        assert_code(
            c.create_volume(clone_request("p", "c3", "src", "", 4 * MIB))
                .await,
            Code::InvalidArgument,
        );
        assert_code(
            c.create_volume(clone_request("p", "c3", "src", "Bad/Name", 0))
                .await,
            Code::InvalidArgument,
        );
        // Published: the volume and its snapshot, each as the qcow2 image of its bytes.
        let img_vol = t.path().join(format!("{fs}-src.qcow2"));
        let img_s1 = t.path().join(format!("{fs}-s1.qcow2"));
        let r = c
            .publish_volume(publish("src", "", &img_vol))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.virtual_size, src.size_bytes);
        assert_eq!(r.file_bytes, std::fs::metadata(&img_vol).unwrap().len());
        assert!(
            equal_to_qcow2(&src_path, &img_vol),
            "{fs}: published volume"
        );
        c.publish_volume(publish("src", "s1", &img_s1))
            .await
            .unwrap();
        let s1_file = p.dir.join("snapshots").join(format!("{}@s1.img", src.uuid));
        assert!(
            equal_to_qcow2(&s1_file, &img_s1),
            "{fs}: published snapshot"
        );
        assert_code(
            c.publish_volume(publish("src", "", &img_vol)).await,
            Code::AlreadyExists,
        );
        assert_code(
            c.publish_volume(publish("src", "", Path::new("rel.qcow2")))
                .await,
            Code::InvalidArgument,
        );
        assert_code(
            c.publish_volume(publish("src", "nosuch", &t.path().join("x.qcow2")))
                .await,
            Code::NotFound,
        );

        // Attached: a snapshot of it is cloned (or published), not the volume.
        c.attach_volume(attach("p", "src")).await.unwrap();
        assert_code(
            c.publish_volume(publish("src", "", &t.path().join("y.qcow2")))
                .await,
            Code::FailedPrecondition,
        );
        let e = c
            .create_volume(clone_request("p", "c3", "src", "", 0))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("snapshot"), "{}", e.message());
        c.create_volume(clone_request("p", "c3", "src", "s1", 0))
            .await
            .unwrap();
        assert_code(
            c.rename_volume(rename("src", "moved")).await,
            Code::FailedPrecondition,
        );
        c.detach_volume(detach("src")).await.unwrap();

        // Rename: the file, the record and the snapshots move; a retry answers the same.
        let moved = c
            .rename_volume(rename("src", "moved"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (moved.name.as_str(), moved.uuid.as_str()),
            ("moved", src.uuid.as_str())
        );
        assert!(!src_path.exists(), "{fs}: the old file is gone");
        let moved_path = PathBuf::from(&moved.path);
        assert_eq!(mark(&moved_path), 0xB2);
        let retry = c
            .rename_volume(rename("src", "moved"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(retry.uuid, src.uuid);
        assert_code(
            c.get_volume(pb::GetVolumeRequest {
                pool: "p".into(),
                name: "src".into(),
            })
            .await,
            Code::NotFound,
        );
        let listed = c
            .list_snapshots(pb::ListSnapshotsRequest {
                pool: "p".into(),
                volume: "moved".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.snapshots.len(), 1, "{fs}: {listed:?}");
        assert_eq!(listed.snapshots[0].volume, "moved");
        c.restore_snapshot(restore("p", "s1")).await.unwrap();
        assert_eq!(mark(&moved_path), 0xA1, "{fs}: restored after the rename");
        assert_code(
            c.rename_volume(rename("c1", "c2")).await,
            Code::AlreadyExists,
        );
        assert_code(c.rename_volume(rename("absent", "x")).await, Code::NotFound);
        assert_code(
            c.rename_volume(rename("c1", "bad/name")).await,
            Code::InvalidArgument,
        );

        // Clones are copies: the source deleted, they keep their data.
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: "p".into(),
            name: "moved".into(),
        })
        .await
        .unwrap();
        assert_eq!(mark(&c1_path), 0xA1, "{fs}");
        assert_eq!(mark(&c2_path), 0xB2, "{fs}");
        for v in ["c1", "c2", "c3"] {
            c.delete_volume(pb::DeleteVolumeRequest {
                pool: "p".into(),
                name: v.into(),
            })
            .await
            .unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(p.dir.join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{fs}: left behind: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_pool_clones_a_volume_onto_a_larger_4k_device_and_renames_it() {
    let _lock = loop_lock();
    let t = tempfile::tempdir().unwrap();
    let backing = |name: &str, size: u64| {
        let f = t.path().join(name);
        std::fs::File::create(&f).unwrap().set_len(size).unwrap();
        f
    };
    let l512 = Loop::attach(&backing("512.img", 64 * MIB), 512);
    let l4k = Loop::attach(&backing("4k.img", 96 * MIB), 4096);
    // The 4K device starts dirty: what a clone does not cover must read as zeros.
    write(&l4k.dev, 90 * MIB, 0xEE, 4096);
    let ddir = t.path().join("daemon");
    std::fs::create_dir_all(&ddir).unwrap();
    let d = Daemon::start(
        &ddir,
        DaemonOpts {
            config: Some(format!(
                "pools:\n  - name: p\n    type: block\n    devices: [{}, {}]\n",
                l512.dev.display(),
                l4k.dev.display()
            )),
            ..DaemonOpts::default()
        },
    );
    let mut c = d.client().await;
    let src = c
        .create_volume(image_request("p", "src", &images().qcow2, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(src.path, l512.dev.display().to_string());
    write(&l512.dev, MARK, 0xA1, 4096);
    let copy = c
        .create_volume(clone_request("p", "copy", "src", "", 96 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(copy.path, l4k.dev.display().to_string());
    assert_eq!(mark(&l4k.dev), 0xA1);
    assert_eq!(
        read_at(&l4k.dev, 90 * MIB, 4096),
        vec![0; 4096],
        "old data past the copy"
    );
    // The 512-byte table on the 4K device, its backup at the device's end.
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
        rep.table
            .as_ref()
            .is_some_and(|t| t.is_good() && t.backup_at_end),
        "{:?}",
        rep.table
    );
    // No device left: NO_SPACE names it; snapshots are not kept here.
    let e = c
        .create_volume(clone_request("p", "third", "src", "", 0))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Rename: the record only, the device stays.
    let r = c
        .rename_volume(rename("copy", "renamed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.path, copy.path);
    assert_eq!(mark(&l4k.dev), 0xA1);
    for v in ["src", "renamed"] {
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: "p".into(),
            name: v.into(),
        })
        .await
        .unwrap();
    }
}
