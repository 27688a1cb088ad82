//! What vmblkd records is true: an export that stops on its own is recorded failed (on
//! Watch, in GetVolume, across a restart) and a new Attach works without a Detach; two
//! imports racing for the space of one cannot both pass the quota.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use vmblk_proto::v1 as pb;

const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmblkd-records")
        .tempdir()
        .unwrap()
}

fn attach_request(name: &str) -> pb::AttachVolumeRequest {
    pb::AttachVolumeRequest {
        pool: "default".into(),
        name: name.into(),
        ..Default::default()
    }
}

async fn attachment(c: &mut vmblkd::client::Client, name: &str) -> pb::Attachment {
    c.get_volume(pb::GetVolumeRequest {
        pool: "default".into(),
        name: name.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .attachment
    .expect("still attached")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_whose_socket_is_removed_is_recorded_failed_and_attach_replaces_it() {
    let t = tmp();
    let mut d = Daemon::start(t.path(), DaemonOpts::default());
    let mut c = d.client().await;
    c.create_volume(empty_request("default", "vm", 16 * MIB))
        .await
        .unwrap();
    let a = c
        .attach_volume(attach_request("vm"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.backend_state, pb::BackendState::Active as i32);
    let mut w = c
        .watch(pb::WatchRequest {
            pool: "default".into(),
            name: "vm".into(),
        })
        .await
        .unwrap()
        .into_inner();

    // The export stops on its own: its socket is gone, nobody can connect any more.
    std::fs::remove_file(&a.socket_path).unwrap();
    let t0 = Instant::now();
    let message = loop {
        let left = Duration::from_secs(15).saturating_sub(t0.elapsed());
        let ev = tokio::time::timeout(left, w.message())
            .await
            .expect("no ExportError event within 15 s")
            .unwrap()
            .expect("watch ended");
        if let Some(pb::event::Kind::ExportError(e)) = ev.kind {
            break e.message;
        }
    };
    assert!(message.contains("removed or replaced"), "{message}");
    let got = attachment(&mut c, "vm").await;
    assert_eq!(
        got.backend_state,
        pb::BackendState::Failed as i32,
        "{got:?}"
    );
    assert!(got.backend_removed_reason.contains("removed or replaced"));

    // A restart does not bring it back as serving.
    d.restart_with_env(vec![]);
    let mut c = d.client().await;
    let got = attachment(&mut c, "vm").await;
    assert_eq!(
        got.backend_state,
        pb::BackendState::Failed as i32,
        "{got:?}"
    );
    assert!(!std::path::Path::new(&got.socket_path).exists());

    // Attach again, without a Detach: served again on the same socket.
    let again = c
        .attach_volume(attach_request("vm"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.backend_state, pb::BackendState::Active as i32);
    assert_eq!(again.socket_path, a.socket_path);
    std::os::unix::net::UnixStream::connect(&again.socket_path).expect("the export listens");
    let got = attachment(&mut c, "vm").await;
    assert_eq!(
        got.backend_state,
        pb::BackendState::Active as i32,
        "{got:?}"
    );
    assert!(got.backend_removed_reason.is_empty());
    c.detach_volume(pb::DetachVolumeRequest {
        pool: "default".into(),
        name: "vm".into(),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_imports_racing_for_the_space_of_one_cannot_both_pass_the_quota() {
    let t = tmp();
    let image_size = 64 * MIB;
    let cfg = format!(
        "pools:\n  - name: small\n    type: dir\n    path: {}\n    capacity_bytes: {}\n",
        t.path().join("small").display(),
        image_size + MIB
    );
    let d = Daemon::start(
        t.path(),
        DaemonOpts {
            config: Some(cfg),
            ..Default::default()
        },
    );
    let c = d.client().await;
    let import = |fp: &str| pb::ImportImageRequest {
        pool: "small".into(),
        fingerprint: fp.into(),
        image: Some(pb::ImageFile {
            path: images().qcow2.display().to_string(),
            metadata_path: String::new(),
        }),
    };
    let (mut c1, mut c2) = (c.clone(), c.clone());
    let (r1, r2) = tokio::join!(
        c1.import_image(import(&"a".repeat(64))),
        c2.import_image(import(&"b".repeat(64))),
    );
    let codes: Vec<Code> = [&r1, &r2]
        .iter()
        .map(|r| r.as_ref().map_or_else(|s| s.code(), |_| Code::Ok))
        .collect();
    assert!(
        codes.contains(&Code::Ok) && codes.contains(&Code::ResourceExhausted),
        "{codes:?}"
    );
    let mut c = c;
    let images = c
        .list_images(pb::ListImagesRequest {
            pool: "small".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(images.len(), 1, "{images:?}");
    // Nothing stays reserved: the pool counts the one image.
    let pool = c
        .get_pool(pb::GetPoolRequest {
            name: "small".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pool.provisioned_bytes, image_size);
}
