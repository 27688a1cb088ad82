//! SIGKILL during create-from-image: after a restart the volume is absent or complete,
//! never half-written and marked ready, and no temporary files or loop devices remain.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tonic::Code;
use vmblk_proto::v1 as pb;

/// Every named step of a create where the daemon can be stopped by the test.
const STEPS: [&str; 5] = [
    "record-written",
    "copy-midway",
    "filled",
    "unpacked",
    "renamed",
];

async fn check_after_restart(d: &Daemon, name: &str) -> Option<pb::Volume> {
    let mut c = d.client().await;
    let r = c
        .get_volume(pb::GetVolumeRequest {
            pool: "default".into(),
            name: name.into(),
        })
        .await;
    let leftovers = temp_files(&d.state_dir);
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    assert!(
        loops_under(&d.dir).is_empty(),
        "loop devices left: {:?}",
        loops_under(&d.dir)
    );
    let pool_dir = d.state_dir.join("pools/default/volumes");
    match r {
        Err(s) => {
            assert_eq!(s.code(), Code::NotFound, "{}", s.message());
            let data = pool_dir.join(format!("{name}.img"));
            assert!(
                !data.exists(),
                "data of an absent volume left: {}",
                data.display()
            );
            None
        }
        Ok(v) => {
            let v = v.into_inner();
            assert_eq!(v.state, pb::VolumeState::Ready as i32);
            assert_gpt_clean(v.path.as_ref());
            assert_eq!(read_at(v.path.as_ref(), 20 << 20, 17), b"VMBLK-ROOT-MARKER");
            Some(v)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_each_step_of_create_leaves_the_volume_absent() {
    for step in STEPS {
        let t = tempfile::Builder::new()
            .prefix("vmblkd-crash")
            .tempdir()
            .unwrap();
        let marker = t.path().join("paused");
        let env = vec![
            ("VMBLKD_TEST_PAUSE_AT".to_string(), step.to_string()),
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
        let req = image_request("default", "vm", &images().unified, 2 * IMAGE_BYTES);
        let pending = tokio::spawn(async move { c.create_volume(req).await });
        wait_for_file(&marker, Duration::from_secs(30), &d);
        d.kill();
        assert!(
            pending.await.unwrap().is_err(),
            "create returned after SIGKILL at {step}"
        );
        d.restart_with_env(vec![]);
        let v = check_after_restart(&d, "vm").await;
        assert!(v.is_none(), "volume present after SIGKILL at {step}");
        assert!(
            d.log_text().contains("removing a volume interrupted"),
            "step {step}"
        );
        // The same create works afterwards.
        let mut c = d.client().await;
        let req = image_request("default", "vm", &images().unified, 2 * IMAGE_BYTES);
        let v = c.create_volume(req).await.unwrap().into_inner();
        assert_gpt_clean(v.path.as_ref());
        eprintln!("SIGKILL at {step}: volume absent after restart, re-create ok");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_leaves_the_volume_absent_or_complete() {
    let t = tempfile::Builder::new()
        .prefix("vmblkd-crash")
        .tempdir()
        .unwrap();
    let mut d = Daemon::start(t.path(), DaemonOpts::default());
    // How long an undisturbed create takes, to spread the kills over it.
    let mut c = d.client().await;
    c.create_volume(image_request(
        "default",
        "warm",
        &images().qcow2,
        2 * IMAGE_BYTES,
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    c.create_volume(image_request(
        "default",
        "probe",
        &images().qcow2,
        2 * IMAGE_BYTES,
    ))
    .await
    .unwrap();
    let full = t0.elapsed();
    let (mut absent, mut complete) = (0, 0);
    for i in 0..12u32 {
        let name = format!("vm{i}");
        let mut c = d.client().await;
        let req = image_request("default", &name, &images().qcow2, 2 * IMAGE_BYTES);
        let pending = tokio::spawn(async move { c.create_volume(req).await });
        // Spread kills from 0 to 330% of an undisturbed create (request and connection
        // overheads push the real window later; deterministic, no RNG needed).
        let delay = full.mul_f64(f64::from(i) * 0.3);
        tokio::time::sleep(delay).await;
        d.kill();
        let _ = pending.await;
        d.restart_with_env(vec![]);
        match check_after_restart(&d, &name).await {
            Some(_) => complete += 1,
            None => absent += 1,
        }
    }
    eprintln!("undisturbed create {full:?}; after SIGKILL: {absent} absent, {complete} complete");
}
