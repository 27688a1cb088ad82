//! `vmblk unpack`, `inspect` and `repair` with RBD images as targets, on a real one-node
//! Ceph cluster the test starts itself (librbd; the kernel here has no rbd module).
//!
//! What is read back goes through `qemu-img convert rbd:...` (QEMU's own librbd driver),
//! so the bytes are checked by a reader that is not vmblk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use integration_tests::{run, sha256_file, vmblk_bin, CephCluster, TestImage, IMAGE_BYTES};

fn vmblk(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out: Output = Command::new(vmblk_bin())
        .args(args)
        .output()
        .expect("running vmblk");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        format!("stdout:\n{stdout}\nstderr:\n{stderr}"),
    )
}

/// The test image as plain, zlib and zstd qcow2 and raw, in `dir`.
fn sources(image: &TestImage, dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut out = vec![("qcow2", image.qcow2.clone()), ("raw", image.raw.clone())];
    for ct in ["zlib", "zstd"] {
        let p = dir.join(format!("disk-{ct}.qcow2"));
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2", "-c", "-o"])
            .arg(format!("compression_type={ct}"))
            .arg(&image.raw)
            .arg(&p))
        .unwrap();
        out.push((ct, p));
    }
    out
}

/// `qemu-img convert -O raw` of `src` (an image file or an `rbd:` address) into `dst`.
fn to_raw(src: &str, dst: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw", src])
        .arg(dst))
    .unwrap_or_else(|e| panic!("qemu-img convert {src}: {e:#}"));
}

fn read_back(cluster: &CephCluster, image: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{image}.back.raw"));
    to_raw(&cluster.rbd_spec(image), &out);
    out
}

#[test]
fn unpack_into_new_rbd_images_equals_qemu_img_convert_for_every_format() {
    let image = TestImage::standard().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = CephCluster::start().unwrap();
    for (fmt, src) in sources(&image, dir.path()) {
        let name = format!("img-{fmt}");
        let spec = cluster.rbd_spec(&name);
        let (code, r, out) = vmblk(&[
            "unpack",
            src.to_str().unwrap(),
            &spec,
            "--size",
            &IMAGE_BYTES.to_string(),
            "--json",
        ]);
        assert_eq!(code, 0, "{fmt}: unpack failed\n{out}");
        assert_eq!(r["target"]["kind"], "rbd", "{r:#}");
        assert_eq!(r["table"]["table_sector_size"], 512, "{r:#}");
        assert!(r["table"]["bridge"].is_null(), "no bridge on RBD: {r:#}");
        assert_eq!(r["table"]["verify"]["ok"], true, "{r:#}");
        // A new image is thin: zero regions are not written.
        assert_eq!(r["copy"]["zero_method"], "already_zero", "{fmt}: {r:#}");
        assert!(r["copy"]["bytes_zeroed"].as_u64().unwrap() > 0, "{r:#}");
        // Same size as the image: the table needed nothing.
        let actions = r["table"]["repair"]["actions"].as_array().unwrap();
        assert!(actions.is_empty(), "{fmt}: {actions:?}");
        let reference = dir.path().join(format!("{fmt}.ref.raw"));
        to_raw(src.to_str().unwrap(), &reference);
        let back = read_back(&cluster, &name, dir.path());
        assert_eq!(
            sha256_file(&back).unwrap(),
            sha256_file(&reference).unwrap(),
            "{fmt}: the RBD image differs from qemu-img convert's output"
        );
        // Thin: the image uses about what the guest data takes, not its size.
        let du = cluster.rbd(&["du", "--format", "json", &format!("vmblk/{name}")]);
        eprintln!("{fmt}: rbd du {}", du.unwrap_or_default().trim());
        std::fs::remove_file(back).unwrap();
        std::fs::remove_file(reference).unwrap();
    }
    cluster.stop().unwrap();
}

#[test]
fn unpack_into_a_larger_rbd_image_moves_the_backup_gpt_and_inspect_sees_it_clean() {
    let image = TestImage::standard().unwrap();
    let cluster = CephCluster::start().unwrap();
    let spec = cluster.rbd_spec("big");
    let size = 3 * IMAGE_BYTES;
    let (code, r, out) = vmblk(&[
        "unpack",
        image.qcow2.to_str().unwrap(),
        &spec,
        "--size",
        &size.to_string(),
        "--json",
    ]);
    assert_eq!(code, 0, "unpack failed\n{out}");
    assert_eq!(r["target"]["size"], size, "{r:#}");
    let actions = r["table"]["repair"]["actions"].as_array().unwrap();
    assert!(
        actions.iter().any(|a| a["action"] == "relocate_backup"),
        "backup GPT not moved: {actions:?}"
    );
    let fs: Vec<_> = r["table"]["verify"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["fs_type"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        fs,
        ["vfat", "ext4", ""],
        "filesystems libblkid found: {r:#}"
    );
    let (code, i, out) = vmblk(&["inspect", &spec, "--json"]);
    assert_eq!(code, 0, "inspect failed\n{out}");
    assert_eq!(i["table"]["kind"], "gpt", "{i:#}");
    assert_eq!(i["table"]["backup_at_end"], true, "{i:#}");
    assert_eq!(i["table"]["problems"], serde_json::json!([]), "{i:#}");
    // A repair of a clean table at the true end has nothing to do.
    let (code, p, out) = vmblk(&["repair", &spec, "--json"]);
    assert_eq!(code, 0, "repair failed\n{out}");
    assert_eq!(
        p["table"]["repair"]["actions"],
        serde_json::json!([]),
        "{p:#}"
    );
    cluster.stop().unwrap();
}

#[test]
fn unpack_over_an_existing_rbd_image_zeroes_what_was_there() {
    let image = TestImage::standard().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = CephCluster::start().unwrap();
    let size = 2 * IMAGE_BYTES;
    // An image full of an older guest's bytes.
    let old = dir.path().join("old.raw");
    run(Command::new("sh").arg("-c").arg(format!(
        "yes vmblk-old-guest-data | head -c {size} > {}",
        old.display()
    )))
    .unwrap();
    cluster
        .rbd(&["import", old.to_str().unwrap(), "vmblk/reused"])
        .unwrap();
    let spec = cluster.rbd_spec("reused");
    let (code, r, out) = vmblk(&[
        "unpack",
        image.qcow2.to_str().unwrap(),
        &spec,
        "--zero-tail",
        "--json",
    ]);
    assert_eq!(code, 0, "unpack failed\n{out}");
    assert_eq!(r["copy"]["zero_method"], "rbd_write_zeroes", "{r:#}");
    assert_eq!(r["tail_zeroed"], size - IMAGE_BYTES, "{r:#}");
    assert_eq!(r["table"]["verify"]["ok"], true, "{r:#}");
    let back = read_back(&cluster, "reused", dir.path());
    let reference = dir.path().join("ref.raw");
    to_raw(image.qcow2.to_str().unwrap(), &reference);
    let back = std::fs::read(back).unwrap();
    let reference = std::fs::read(reference).unwrap();
    // The partitions hold exactly the image's bytes (the old guest's bytes in the image's
    // zero regions are gone); past the image only the moved backup GPT remains.
    let first = 34 * 512;
    let last = IMAGE_BYTES as usize - 33 * 512;
    assert!(
        back[first..last] == reference[first..last],
        "old data survived inside the image's range"
    );
    let tail = &back[IMAGE_BYTES as usize..back.len() - 33 * 512];
    assert!(
        tail.iter().all(|&b| b == 0),
        "old data survived past the image"
    );
    cluster.stop().unwrap();
}

#[test]
fn bad_rbd_targets_are_refused_naming_what_is_wrong_and_nothing_is_written() {
    let image = TestImage::standard().unwrap();
    let cluster = CephCluster::start().unwrap();
    let qcow2 = image.qcow2.to_str().unwrap();
    let conf = cluster.conf_path();
    let keyring = cluster.keyring_path();
    let unpack = |target: &str, extra: &[&str]| {
        let mut args = vec!["unpack", qcow2, target];
        args.extend_from_slice(extra);
        vmblk(&args)
    };
    let size = IMAGE_BYTES.to_string();
    let cases: Vec<(String, Vec<&str>, &str)> = vec![
        (
            format!(
                "rbd:nopool/x:conf={}:id=admin:keyring={}",
                conf.display(),
                keyring.display()
            ),
            vec!["--size", &size],
            "pool nopool",
        ),
        (cluster.rbd_spec("absent"), vec![], "does not exist (give a size"),
        (
            "rbd:vmblk/x:conf=/nonexistent/ceph.conf:id=admin".to_string(),
            vec!["--size", &size],
            "/nonexistent/ceph.conf",
        ),
        (
            format!(
                "rbd:vmblk/x:conf={}:id=nobody:keyring={}",
                conf.display(),
                keyring.display()
            ),
            vec!["--size", &size],
            "client.nobody",
        ),
        (
            // A cluster that is down: nothing listens on port 1.
            format!(
                "rbd:vmblk/x:conf={}:id=admin:keyring={}:mon_host=127.0.0.1\\:1:client_mount_timeout=3",
                conf.display(),
                keyring.display()
            ),
            vec!["--size", &size],
            "connect to the Ceph cluster",
        ),
        (
            cluster.rbd_spec("small"),
            vec!["--size", "16M"],
            "the image needs",
        ),
        ("rbd:vmblk".to_string(), vec![], "names no image"),
    ];
    for (target, extra, want) in &cases {
        let t0 = std::time::Instant::now();
        let (code, _, out) = unpack(target, extra);
        assert_ne!(code, 0, "{target}: unpack succeeded\n{out}");
        assert!(out.contains(want), "{target}: no {want:?} in\n{out}");
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "{target}: took {:?}",
            t0.elapsed()
        );
    }
    // Nothing was created or written: the pool holds no image.
    let images = cluster.rbd(&["ls", "-p", "vmblk"]).unwrap();
    assert_eq!(images.trim(), "", "images left behind: {images}");
    // An existing image smaller than the source stays as it was.
    cluster
        .rbd(&["create", "--size", "16M", "vmblk/tiny"])
        .unwrap();
    let (code, _, out) = unpack(&cluster.rbd_spec("tiny"), &[]);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("the image needs"), "{out}");
    let du = cluster.rbd(&["du", "vmblk/tiny"]).unwrap();
    assert!(du.contains(" 0 B"), "written to: {du}");
    cluster.stop().unwrap();
}
