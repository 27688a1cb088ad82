//! A volume served by vmblkd boots a real guest (QEMU, OVMF, the test image) from the
//! attachment vmblkd returns; grown while attached, repaired once detached, it boots
//! again with the new size; then it is detached and deleted. Root only (the guest
//! harness holds /tmp/vmblk-loop-tests.lock).

mod common;

use common::*;
use integration_tests::{loop_tests_lock, Guest, GuestParams, TestImage};
use vmblk_proto::v1 as pb;

fn boot(a: &pb::Attachment, name: &str) -> integration_tests::GuestOutcome {
    // QEMU gets the attachment's arguments as they are, with the boot index a caller
    // adds; the harness adds no disk of its own.
    assert_eq!(
        a.qemu_args,
        ["-chardev", &a.qemu_chardev, "-device", &a.qemu_device]
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_volume_boots_grows_and_boots_again_then_detaches() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root"
    );
    let _lock = loop_tests_lock().unwrap();
    let image = TestImage::standard().unwrap();
    let t = tempfile::Builder::new()
        .prefix("vmblkd-guest")
        .tempdir()
        .unwrap();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    let v = c
        .create_volume(image_request("default", "vm", &image.qcow2, 0))
        .await
        .unwrap()
        .into_inner();
    let attach = pb::AttachVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
        logical_block_size: 512,
        read_only: false,
        num_queues: 1,
        queue_size: 0,
        force: false,
    };
    let a = c.attach_volume(attach.clone()).await.unwrap().into_inner();
    let first = tokio::task::spawn_blocking({
        let a = a.clone();
        move || boot(&a, "daemon_guest_first")
    })
    .await
    .unwrap();
    let b = first.report.last().unwrap();
    assert_eq!(b.value("logical_block_size"), Some("512"));
    assert_eq!(
        b.value("disk_bytes"),
        Some(v.size_bytes.to_string().as_str())
    );
    eprintln!("first boot {:?}", first.elapsed);

    // Grow while attached: extended, table left to the guest.
    let new_size = v.size_bytes + (256 << 20);
    let grow = pb::GrowVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
        size_bytes: new_size,
        grow_last_partition: false,
    };
    let g = c.grow_volume(grow.clone()).await.unwrap().into_inner();
    assert!(!g.table_repaired);
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
    // Detached: the same grow repairs the table (backup GPT to the new end).
    let g = c.grow_volume(grow).await.unwrap().into_inner();
    assert!(g.table_repaired, "{g:?}");
    assert_gpt_clean(v.path.as_ref());

    let a = c.attach_volume(attach).await.unwrap().into_inner();
    let second = tokio::task::spawn_blocking({
        let a = a.clone();
        move || boot(&a, "daemon_guest_grown")
    })
    .await
    .unwrap();
    let b = second.report.last().unwrap();
    assert_eq!(b.value("disk_bytes"), Some(new_size.to_string().as_str()));
    eprintln!("second boot (grown volume) {:?}", second.elapsed);

    assert!(
        c.detach_volume(det)
            .await
            .unwrap()
            .into_inner()
            .was_attached
    );
    let del = pb::DeleteVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
    };
    assert!(c.delete_volume(del).await.unwrap().into_inner().existed);
    assert!(!std::path::Path::new(&v.path).exists());
}
