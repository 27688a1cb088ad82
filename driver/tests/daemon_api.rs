//! Drives every RPC of the real vmblkd binary through the generated client: happy
//! paths, every error code, idempotent repeats, races on one name.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tonic::Code;
use vmblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmblkd-test")
        .tempdir()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_serves_a_dir_pool_on_a_0660_socket() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let mut c = d.client().await;
    let pools = c
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].name, "default");
    assert_eq!(pools[0].r#type, pb::PoolType::Dir as i32);
    assert_eq!(pools[0].origin, pb::PoolOrigin::Config as i32);
    assert!(pools[0].path.starts_with(d.state_dir.to_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_rpcs_are_idempotent_and_validate() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let extra = t.path().join("extra");
    let req = pb::CreatePoolRequest {
        name: "extra".into(),
        r#type: pb::PoolType::Dir as i32,
        path: extra.display().to_string(),
        devices: vec![],
        capacity_bytes: 0,
        rbd: None,
    };
    let p = c.create_pool(req.clone()).await.unwrap().into_inner();
    assert_eq!(p.origin, pb::PoolOrigin::Api as i32);
    assert!(extra.join("volumes").is_dir());
    // Compatible repeat: the same pool.
    assert_eq!(
        c.create_pool(req.clone()).await.unwrap().into_inner().name,
        "extra"
    );
    // Incompatible repeat.
    let other = pb::CreatePoolRequest {
        path: t.path().join("x").display().to_string(),
        ..req.clone()
    };
    assert_code(c.create_pool(other).await, Code::AlreadyExists);
    // Bad arguments.
    for bad in [
        pb::CreatePoolRequest {
            name: "a/b".into(),
            ..req.clone()
        },
        pb::CreatePoolRequest {
            name: "..".into(),
            ..req.clone()
        },
        pb::CreatePoolRequest {
            name: "y".into(),
            path: "relative".into(),
            ..req.clone()
        },
        pb::CreatePoolRequest {
            name: "y".into(),
            r#type: 0,
            ..req.clone()
        },
        pb::CreatePoolRequest {
            name: "y".into(),
            r#type: pb::PoolType::Block as i32,
            path: String::new(),
            devices: vec![extra.display().to_string()],
            capacity_bytes: 0,
            rbd: None,
        },
    ] {
        assert_code(c.create_pool(bad).await, Code::InvalidArgument);
    }
    assert_code(
        c.get_pool(pb::GetPoolRequest {
            name: "nope".into(),
        })
        .await,
        Code::NotFound,
    );
    assert_eq!(
        c.get_pool(pb::GetPoolRequest {
            name: "extra".into()
        })
        .await
        .unwrap()
        .into_inner()
        .path,
        p.path
    );
    // Configured pools cannot be deleted; pools holding volumes cannot either.
    assert_code(
        c.delete_pool(pb::DeletePoolRequest {
            name: "default".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    c.create_volume(empty_request("extra", "v", 4 * MIB))
        .await
        .unwrap();
    assert_code(
        c.delete_pool(pb::DeletePoolRequest {
            name: "extra".into(),
        })
        .await,
        Code::FailedPrecondition,
    );
    c.delete_volume(pb::DeleteVolumeRequest {
        pool: "extra".into(),
        name: "v".into(),
    })
    .await
    .unwrap();
    let r = c
        .delete_pool(pb::DeletePoolRequest {
            name: "extra".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.existed);
    let r = c
        .delete_pool(pb::DeletePoolRequest {
            name: "extra".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.existed);
    // API pools survive a restart.
    c.create_pool(req.clone()).await.unwrap();
    drop(c);
    let mut d = d;
    d.restart_with_env(vec![]);
    let mut c = d.client().await;
    let names: Vec<String> = c
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["default", "extra"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_volume_lifecycle_and_error_codes() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let v = c
        .create_volume(empty_request("default", "vm1", 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.state, pb::VolumeState::Ready as i32);
    assert_eq!(v.size_bytes, 64 * MIB);
    assert_eq!(std::fs::metadata(&v.path).unwrap().len(), 64 * MIB);
    // Idempotent repeat returns the same volume; an incompatible one is refused.
    let again = c
        .create_volume(empty_request("default", "vm1", 64 * MIB))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.uuid, v.uuid);
    assert_code(
        c.create_volume(empty_request("default", "vm1", 32 * MIB))
            .await,
        Code::AlreadyExists,
    );
    let img = image_request("default", "vm1", &images().qcow2, 0);
    assert_code(c.create_volume(img).await, Code::AlreadyExists);
    // Validation.
    for (pool, name, size) in [
        ("default", "a/b", 4 * MIB),
        ("default", "..", 4 * MIB),
        ("default", "a\0b", 4 * MIB),
        ("default", "", 4 * MIB),
        ("default", "ok", 0),
        ("default", "ok", 4 * MIB + 512),
        ("../x", "ok", 4 * MIB),
    ] {
        assert_code(
            c.create_volume(empty_request(pool, name, size)).await,
            Code::InvalidArgument,
        );
    }
    assert_code(
        c.create_volume(empty_request("nopool", "ok", 4 * MIB))
            .await,
        Code::NotFound,
    );
    let get = |name: &str| pb::GetVolumeRequest {
        pool: "default".into(),
        name: name.into(),
    };
    assert_code(c.get_volume(get("missing")).await, Code::NotFound);
    assert_eq!(
        c.get_volume(get("vm1")).await.unwrap().into_inner().uuid,
        v.uuid
    );
    let list = c
        .list_volumes(pb::ListVolumesRequest {
            pool: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.volumes.len(), 1);
    assert_code(
        c.list_volumes(pb::ListVolumesRequest {
            pool: "nopool".into(),
        })
        .await,
        Code::NotFound,
    );
    let usage = c
        .get_volume_usage(pb::GetVolumeUsageRequest {
            pool: "default".into(),
            name: "vm1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage.size_bytes, 64 * MIB);
    assert!(
        usage.allocated_bytes < MIB,
        "an empty volume is sparse: {usage:?}"
    );
    // Grow, grow to the same size, shrink.
    let grow = |size| pb::GrowVolumeRequest {
        pool: "default".into(),
        name: "vm1".into(),
        size_bytes: size,
        grow_last_partition: false,
    };
    let g = c.grow_volume(grow(128 * MIB)).await.unwrap().into_inner();
    assert_eq!(g.volume.unwrap().size_bytes, 128 * MIB);
    assert_eq!(std::fs::metadata(&v.path).unwrap().len(), 128 * MIB);
    let g = c.grow_volume(grow(128 * MIB)).await.unwrap().into_inner();
    assert!(!g.table_repaired);
    assert_code(c.grow_volume(grow(64 * MIB)).await, Code::InvalidArgument);
    assert_code(
        c.grow_volume(grow(128 * MIB + 100)).await,
        Code::InvalidArgument,
    );
    assert_code(
        c.grow_volume(pb::GrowVolumeRequest {
            name: "missing".into(),
            ..grow(128 * MIB)
        })
        .await,
        Code::NotFound,
    );
    // Delete is idempotent.
    let del = pb::DeleteVolumeRequest {
        pool: "default".into(),
        name: "vm1".into(),
    };
    assert!(
        c.delete_volume(del.clone())
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(
        !c.delete_volume(del.clone())
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(!std::path::Path::new(&v.path).exists());
    assert_code(c.get_volume(get("vm1")).await, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_from_image_unpacks_repairs_and_grow_moves_the_backup_gpt() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let im = images();
    // Size 0: the image's size.
    let v = c
        .create_volume(image_request("default", "q", &im.qcow2, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size_bytes, IMAGE_BYTES);
    assert_gpt_clean(v.path.as_ref());
    assert_eq!(read_at(v.path.as_ref(), 20 << 20, 17), b"VMBLK-ROOT-MARKER");
    // Larger than the image: the backup header is moved to the end.
    let v2 = c
        .create_volume(image_request(
            "default",
            "big",
            &im.unified,
            2 * IMAGE_BYTES,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v2.size_bytes, 2 * IMAGE_BYTES);
    assert_gpt_clean(v2.path.as_ref());
    assert_eq!(
        read_at(v2.path.as_ref(), 20 << 20, 17),
        b"VMBLK-ROOT-MARKER"
    );
    // Grow runs the repair again.
    let g = c
        .grow_volume(pb::GrowVolumeRequest {
            pool: "default".into(),
            name: "q".into(),
            size_bytes: 3 * IMAGE_BYTES,
            grow_last_partition: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(g.table_repaired, "{g:?}");
    assert_gpt_clean(v.path.as_ref());
    // Idempotent repeat of an image create.
    let again = c
        .create_volume(image_request(
            "default",
            "big",
            &im.unified,
            2 * IMAGE_BYTES,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.uuid, v2.uuid);
    // Bad images and paths.
    assert_code(
        c.create_volume(image_request("default", "g", &im.garbage, 0))
            .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.create_volume(image_request(
            "default",
            "g",
            std::path::Path::new("disk.qcow2"),
            0,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.create_volume(image_request(
            "default",
            "g",
            std::path::Path::new("/nonexistent.qcow2"),
            0,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.create_volume(image_request(
            "default",
            "g",
            std::path::Path::new("/tmp"),
            0,
        ))
        .await,
        Code::InvalidArgument,
    );
    assert_code(
        c.create_volume(image_request("default", "g", &im.qcow2, IMAGE_BYTES / 2))
            .await,
        Code::InvalidArgument,
    );
    // Failed creates leave nothing behind.
    let vols = c
        .list_volumes(pb::ListVolumesRequest {
            pool: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vols.volumes.len(), 2);
    assert!(
        temp_files(&d.state_dir).is_empty(),
        "{:?}",
        temp_files(&d.state_dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_quota_is_resource_exhausted() {
    let t = tmp();
    let cfg = format!(
        "pools:\n  - name: small\n    type: dir\n    path: {}\n    capacity_bytes: {}\n",
        t.path().join("small").display(),
        100 * MIB
    );
    let d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            ..Default::default()
        },
    );
    let mut c = d.client().await;
    // Two creates of different names racing for the same space: one wins.
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = tokio::join!(
        c1.create_volume(image_request("small", "r1", &images().qcow2, 64 * MIB)),
        c2.create_volume(image_request("small", "r2", &images().qcow2, 64 * MIB)),
    );
    let codes: Vec<Code> = [&r1, &r2]
        .iter()
        .map(|r| r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok))
        .collect();
    assert!(
        codes.contains(&Code::Ok) && codes.contains(&Code::ResourceExhausted),
        "{codes:?}"
    );
    let winner = if r1.is_ok() { "r1" } else { "r2" };
    let del = pb::DeleteVolumeRequest {
        pool: "small".into(),
        name: winner.into(),
    };
    c.delete_volume(del).await.unwrap();
    c.create_volume(empty_request("small", "a", 64 * MIB))
        .await
        .unwrap();
    assert_code(
        c.create_volume(empty_request("small", "b", 64 * MIB)).await,
        Code::ResourceExhausted,
    );
    assert_code(
        c.grow_volume(pb::GrowVolumeRequest {
            pool: "small".into(),
            name: "a".into(),
            size_bytes: 128 * MIB,
            grow_last_partition: false,
        })
        .await,
        Code::ResourceExhausted,
    );
    // Only the configured pool exists: no embedded default beside it.
    let pools = c
        .list_pools(pb::ListPoolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].capacity_bytes, 100 * MIB);
    assert_eq!(pools[0].provisioned_bytes, 64 * MIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_detach_and_attached_volume_preconditions() {
    let t = tmp();
    let mut d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let mut watch = c
        .watch(pb::WatchRequest {
            pool: "default".into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let v = c
        .create_volume(image_request("default", "vm", &images().qcow2, 0))
        .await
        .unwrap()
        .into_inner();
    let att = |lbs| pb::AttachVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
        logical_block_size: lbs,
        read_only: false,
        num_queues: 0,
        queue_size: 0,
        force: false,
    };
    let a = c.attach_volume(att(0)).await.unwrap().into_inner();
    assert_eq!(a.logical_block_size, 512);
    assert!(
        std::path::Path::new(&a.socket_path).exists(),
        "export socket missing"
    );
    assert_eq!(
        a.qemu_args,
        ["-chardev", &a.qemu_chardev, "-device", &a.qemu_device]
    );
    assert!(a.qemu_chardev.contains(&a.socket_path));
    assert!(a.qemu_device.starts_with("vhost-user-blk-pci,"));
    let got = c
        .get_volume(pb::GetVolumeRequest {
            pool: "default".into(),
            name: "vm".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        got.into_inner().attachment.unwrap().socket_path,
        a.socket_path
    );
    // Repeat with the same parameters: same attachment; other parameters: refused.
    assert_eq!(
        c.attach_volume(att(512))
            .await
            .unwrap()
            .into_inner()
            .socket_path,
        a.socket_path
    );
    assert_code(c.attach_volume(att(4096)).await, Code::AlreadyExists);
    assert_code(c.attach_volume(att(1000)).await, Code::InvalidArgument);
    assert_code(
        c.attach_volume(pb::AttachVolumeRequest {
            name: "zz".into(),
            ..att(0)
        })
        .await,
        Code::NotFound,
    );
    // An attached volume cannot be deleted or shrunk; it can grow (the guest repairs).
    let del = pb::DeleteVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
    };
    assert_code(c.delete_volume(del.clone()).await, Code::FailedPrecondition);
    let grow = |size| pb::GrowVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
        size_bytes: size,
        grow_last_partition: false,
    };
    assert_code(
        c.grow_volume(grow(IMAGE_BYTES / 2)).await,
        Code::FailedPrecondition,
    );
    let g = c
        .grow_volume(grow(2 * IMAGE_BYTES))
        .await
        .unwrap()
        .into_inner();
    assert!(!g.table_repaired && g.note.contains("attached"), "{g:?}");
    // The export survives a daemon restart (it is exported again).
    drop(c);
    std::fs::remove_file(&a.socket_path).unwrap();
    d.restart_with_env(vec![]);
    assert!(
        std::path::Path::new(&a.socket_path).exists(),
        "not re-exported:\n{}",
        d.log_text()
    );
    let mut c = d.client().await;
    let det = pb::DetachVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
    };
    assert!(
        c.detach_volume(det.clone())
            .await
            .unwrap()
            .into_inner()
            .was_attached
    );
    assert!(
        !c.detach_volume(det.clone())
            .await
            .unwrap()
            .into_inner()
            .was_attached
    );
    assert!(!std::path::Path::new(&a.socket_path).exists());
    // Once detached, growing to the same size repairs what the attached grow left.
    let g = c
        .grow_volume(grow(2 * IMAGE_BYTES))
        .await
        .unwrap()
        .into_inner();
    assert!(g.table_repaired, "{g:?}");
    assert_gpt_clean(v.path.as_ref());
    assert!(c.delete_volume(del).await.unwrap().into_inner().existed);
    // The watch saw the attach (hotplug) and the state changes of the create.
    let mut seen = Vec::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), watch.message()).await
    {
        seen.push(e);
    }
    let hotplugs = seen
        .iter()
        .filter(|e| matches!(e.kind, Some(pb::event::Kind::Hotplug(_))))
        .count();
    let ready = seen.iter().any(|e| {
        matches!(&e.kind, Some(pb::event::Kind::StateChanged(s)) if s.new_state == pb::VolumeState::Ready as i32)
    });
    let progress = seen
        .iter()
        .any(|e| matches!(&e.kind, Some(pb::event::Kind::Progress(p)) if p.phase == "copy"));
    assert!(hotplugs >= 1 && ready && progress, "events: {seen:?}");
    let _ = v;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_on_a_busy_volume_are_aborted() {
    let t = tmp();
    let marker = t.path().join("paused");
    let env = vec![
        ("VMBLKD_TEST_PAUSE_AT".to_string(), "filled".to_string()),
        (
            "VMBLKD_TEST_PAUSE_MARKER".to_string(),
            marker.display().to_string(),
        ),
    ];
    let mut d = Daemon::start(
        t.path(),
        DaemonOpts {
            env,
            ..Default::default()
        },
    );
    let mut c = d.client().await;
    let mut c2 = c.clone();
    let req = image_request("default", "busy", &images().qcow2, 0);
    let slow = tokio::spawn(async move { c2.create_volume(req).await });
    wait_for_file(&marker, Duration::from_secs(30), &d);
    let get = c
        .get_volume(pb::GetVolumeRequest {
            pool: "default".into(),
            name: "busy".into(),
        })
        .await
        .unwrap();
    assert_eq!(get.into_inner().state, pb::VolumeState::Creating as i32);
    assert_code(
        c.create_volume(image_request("default", "busy", &images().qcow2, 0))
            .await,
        Code::Aborted,
    );
    assert_code(
        c.grow_volume(pb::GrowVolumeRequest {
            pool: "default".into(),
            name: "busy".into(),
            size_bytes: 2 * IMAGE_BYTES,
            grow_last_partition: false,
        })
        .await,
        Code::Aborted,
    );
    assert_code(
        c.delete_volume(pb::DeleteVolumeRequest {
            pool: "default".into(),
            name: "busy".into(),
        })
        .await,
        Code::Aborted,
    );
    assert_code(
        c.attach_volume(pb::AttachVolumeRequest {
            pool: "default".into(),
            name: "busy".into(),
            logical_block_size: 0,
            read_only: false,
            num_queues: 0,
            queue_size: 0,
            force: false,
        })
        .await,
        Code::Aborted,
    );
    // Other volumes are not blocked.
    c.create_volume(empty_request("default", "other", 4 * MIB))
        .await
        .unwrap();
    d.kill();
    assert!(slow.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_racing_on_one_name_get_one_volume() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let c = d.client().await;
    for round in 0..5 {
        let name = format!("race{round}");
        let mut a = d.client().await;
        let mut b = c.clone();
        let (ra, rb) = tokio::join!(
            a.create_volume(image_request("default", &name, &images().qcow2, 0)),
            b.create_volume(image_request("default", &name, &images().qcow2, 0)),
        );
        let oks: Vec<pb::Volume> = [ra, rb]
            .into_iter()
            .filter_map(|r| match r {
                Ok(v) => Some(v.into_inner()),
                Err(s) => {
                    assert_eq!(s.code(), Code::Aborted, "{}", s.message());
                    None
                }
            })
            .collect();
        assert!(!oks.is_empty(), "neither racer succeeded");
        assert!(
            oks.iter().all(|v| v.uuid == oks[0].uuid),
            "two different volumes: {oks:?}"
        );
        assert_gpt_clean(oks[0].path.as_ref());
    }
    let mut c = c;
    let n = c
        .list_volumes(pb::ListVolumesRequest {
            pool: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.volumes.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_import_once_and_clone_into_volumes() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let fp = "0123456789abcdef".repeat(4);
    let what = vmblkd::hook::ImageImport {
        fingerprint: fp.clone(),
        image: images().unified.clone(),
        metadata: None,
        pool: String::new(),
    };
    let r1 = vmblkd::hook::image_import(&mut c, &what).await.unwrap();
    assert!(r1.unpacked);
    let r2 = vmblkd::hook::image_import(&mut c, &what).await.unwrap();
    assert!(!r2.unpacked);
    assert_eq!(r1.image, r2.image);
    let imgs = c
        .list_images(pb::ListImagesRequest {
            pool: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(imgs.images.len(), 1);
    let from_fp = |name: &str, size| pb::CreateVolumeRequest {
        pool: "default".into(),
        name: name.into(),
        size_bytes: size,
        origin: Some(pb::VolumeOrigin {
            source: Some(pb::volume_origin::Source::ImageFingerprint(fp.clone())),
        }),
        grow_last_partition: false,
    };
    let v = c
        .create_volume(from_fp("c1", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.size_bytes, IMAGE_BYTES);
    let pool = c
        .get_pool(pb::GetPoolRequest {
            name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        v.reflinked, pool.reflink,
        "clone method does not match the pool's capability"
    );
    assert_gpt_clean(v.path.as_ref());
    let v2 = c
        .create_volume(from_fp("c2", 4 * IMAGE_BYTES))
        .await
        .unwrap()
        .into_inner();
    assert_gpt_clean(v2.path.as_ref());
    assert_eq!(
        read_at(v2.path.as_ref(), 20 << 20, 17),
        b"VMBLK-ROOT-MARKER"
    );
    let missing = pb::CreateVolumeRequest {
        origin: Some(pb::VolumeOrigin {
            source: Some(pb::volume_origin::Source::ImageFingerprint(
                "ffffffffffff".into(),
            )),
        }),
        ..from_fp("c3", 0)
    };
    assert_code(c.create_volume(missing).await, Code::NotFound);
    let bad = pb::CreateVolumeRequest {
        origin: Some(pb::VolumeOrigin {
            source: Some(pb::volume_origin::Source::ImageFingerprint("../x".into())),
        }),
        ..from_fp("c3", 0)
    };
    assert_code(c.create_volume(bad).await, Code::InvalidArgument);
    let bad_fp = vmblkd::hook::ImageImport {
        fingerprint: "XYZ".into(),
        ..what.clone()
    };
    assert_code(
        vmblkd::hook::image_import(&mut c, &bad_fp).await,
        Code::InvalidArgument,
    );
    // Deleting the cached image does not affect clones.
    let del = pb::DeleteImageRequest {
        pool: String::new(),
        fingerprint: fp.clone(),
    };
    assert!(
        c.delete_image(del.clone())
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    assert!(!c.delete_image(del).await.unwrap().into_inner().existed);
    assert_gpt_clean(v.path.as_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let socket = d.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://vmblkd.local")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let s = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(s).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let r = h
        .check(tonic_health::pb::HealthCheckRequest {
            service: "vmblk.v1.StorageDriver".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut rc = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = rc
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = l.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"vmblk.v1.StorageDriver".to_string()),
        "{names:?}"
    );
}

#[test]
fn unknown_config_key_stops_startup_naming_it() {
    let t = tmp();
    let cfg = t.path().join("bad.yaml");
    std::fs::write(&cfg, "socket_mod: \"0600\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmblkd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(t.path().join("s.sock"))
        .arg("--state-dir")
        .arg(t.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("socket_mod"), "{err}");
}

#[test]
fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let t = tmp();
    let _d = Daemon::start(t.path(), DaemonOpts::default());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vmblkd"))
        .arg("--socket")
        .arg(t.path().join("other.sock"))
        .arg("--state-dir")
        .arg(t.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another vmblkd"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let t = tmp();
    let opts = DaemonOpts {
        args: vec!["--log-format".into(), "json".into()],
        ..Default::default()
    };
    let mut d = Daemon::start(t.path(), opts);
    let mut c = d.client().await;
    c.create_volume(empty_request("default", "v", 4 * MIB))
        .await
        .unwrap();
    d.stop();
    let log = d.log_text();
    let mut n = 0;
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        n += 1;
    }
    assert!(n >= 3 && log.contains("volume created"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_incus_images_import_and_create() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let what = vmblkd::hook::ImageImport {
        fingerprint: "abcdef0123456789".into(),
        image: images().qcow2.clone(),
        metadata: Some(images().metadata.clone()),
        pool: "default".into(),
    };
    assert!(
        vmblkd::hook::image_import(&mut c, &what)
            .await
            .unwrap()
            .unpacked
    );
    let mut req = image_request("default", "split", &images().qcow2, 0);
    if let Some(pb::volume_origin::Source::Image(f)) =
        req.origin.as_mut().and_then(|o| o.source.as_mut())
    {
        f.metadata_path = images().metadata.display().to_string();
    }
    let v = c.create_volume(req).await.unwrap().into_inner();
    assert_gpt_clean(v.path.as_ref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_within_the_grace_period_even_with_a_stuck_operation() {
    let t = tmp();
    let marker = t.path().join("paused");
    let env = vec![
        ("VMBLKD_TEST_PAUSE_AT".to_string(), "filled".to_string()),
        (
            "VMBLKD_TEST_PAUSE_MARKER".to_string(),
            marker.display().to_string(),
        ),
    ];
    let opts = DaemonOpts {
        config: Some("shutdown_grace_secs: 1\n".into()),
        env,
        ..Default::default()
    };
    let mut d = Daemon::start(t.path(), opts);
    let mut c = d.client().await;
    let req = image_request("default", "stuck", &images().qcow2, 0);
    let pending = tokio::spawn(async move { c.create_volume(req).await });
    wait_for_file(&marker, Duration::from_secs(30), &d);
    let t0 = std::time::Instant::now();
    d.stop(); // SIGTERM; panics if the daemon is still alive after 10 s
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(d.log_text().contains("grace period"), "{}", d.log_text());
    let _ = pending.await;
    // The abandoned create is cleaned up like a crash.
    d.restart_with_env(vec![]);
    let mut c = d.client().await;
    assert_code(
        c.get_volume(pb::GetVolumeRequest {
            pool: "default".into(),
            name: "stuck".into(),
        })
        .await,
        Code::NotFound,
    );
}
