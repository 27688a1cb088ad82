//! The pool-backend conformance suite (`vmblkd::pool::conformance`) on every backend:
//! `block` pools of real loop devices with 512 and 4096-byte sectors, and `dir` pools
//! on ext4 and xfs (with reflink) file systems. Root only (loop devices).

mod common;

use std::path::Path;

use common::*;
use vmblkd::pool::{backend, conformance};
use vmblkd::PoolKind;

const MIB: u64 = 1 << 20;

fn sparse(path: &Path, len: u64) {
    std::fs::File::create(path).unwrap().set_len(len).unwrap();
}

#[test]
fn block_pools_of_512_and_4096_byte_loop_devices_conform() {
    let _lock = loop_lock();
    let t = tempfile::tempdir().unwrap();
    for ss in [512u32, 4096] {
        // Two devices of different sizes: the smallest that fits is taken first.
        let files = [
            t.path().join(format!("a{ss}")),
            t.path().join(format!("b{ss}")),
        ];
        sparse(&files[0], 16 * MIB);
        sparse(&files[1], 32 * MIB);
        let loops: Vec<Loop> = files.iter().map(|f| Loop::attach(f, ss)).collect();
        let kind = PoolKind::Block {
            devices: loops.iter().map(|l| l.dev.clone()).collect(),
        };
        let b = backend(&kind);
        b.prepare().unwrap();
        conformance::check_all(b.as_ref(), t.path());
    }
}

#[test]
fn dir_pools_on_ext4_and_xfs_conform() {
    let _lock = loop_lock();
    let t = tempfile::tempdir().unwrap();
    for (fs, mkfs) in [("ext4", "mkfs.ext4"), ("xfs", "mkfs.xfs")] {
        let img = t.path().join(format!("{fs}.img"));
        sparse(&img, 512 * MIB);
        let l = Loop::attach(&img, 512);
        run(std::process::Command::new(mkfs).arg("-q").arg(&l.dev));
        let dir = t.path().join(fs);
        std::fs::create_dir_all(&dir).unwrap();
        run(std::process::Command::new("mount").arg(&l.dev).arg(&dir));
        let _m = Mount { dir: dir.clone() };
        let kind = PoolKind::Dir {
            path: dir.join("pool"),
            capacity_bytes: 0,
        };
        std::fs::create_dir_all(dir.join("pool")).unwrap();
        let b = backend(&kind);
        b.prepare().unwrap();
        assert_eq!(b.reflink(), fs == "xfs", "{fs}: reflink");
        conformance::check_all(b.as_ref(), t.path());
    }
}

#[test]
fn an_rbd_pool_of_a_one_node_ceph_cluster_conforms() {
    let cluster = integration_tests::CephCluster::start().unwrap();
    let t = tempfile::tempdir().unwrap();
    let kind = PoolKind::Rbd(vmblkd::RbdPoolConfig {
        pool: cluster.pool().into(),
        namespace: String::new(),
        conf: Some(cluster.conf_path()),
        id: Some(cluster.client_id().into()),
        keyring: Some(cluster.keyring_path()),
    });
    let b = backend(&kind);
    b.prepare().unwrap();
    assert_eq!(b.unavailable(), None);
    conformance::check_all(b.as_ref(), t.path());
    // Nothing left behind in the cluster.
    let left = cluster.rbd(&["ls", "-p", cluster.pool()]).unwrap();
    assert_eq!(left.trim(), "", "images left: {left}");
    cluster.stop().unwrap();
}
