//! Starts a throwaway one-node Ceph cluster, as the tests do, for a benchmark or a session
//! by hand: prints `CEPH_CONF=`, `CEPH_KEYRING=`, `CEPH_ID=` and `CEPH_POOL=` lines, then
//! `READY`, and keeps the cluster up until its standard input closes; then stops it (OSD,
//! mon) and removes its directory.
//!
//! `cargo run --release -p integration-tests --example ceph_cluster`

use std::io::{Read, Write};

use integration_tests::CephCluster;

fn main() -> anyhow::Result<()> {
    let cluster = CephCluster::start()?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "CEPH_CONF={}", cluster.conf_path().display())?;
    writeln!(out, "CEPH_KEYRING={}", cluster.keyring_path().display())?;
    writeln!(out, "CEPH_ID={}", cluster.client_id())?;
    writeln!(out, "CEPH_POOL={}", cluster.pool())?;
    writeln!(out, "READY")?;
    out.flush()?;
    drop(out);
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    cluster.stop()
}
