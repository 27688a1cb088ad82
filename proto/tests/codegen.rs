//! Regenerates the checked-in gRPC code into a temporary directory and fails when it
//! differs from `src/gen/`. `VMBLK_PROTO_REGEN=1 cargo test -p vmblk-proto --test codegen`
//! writes the fresh code into `src/gen/` instead.

use std::path::{Path, PathBuf};

use prost::Message;

const GENERATED: [&str; 2] = ["vmblk.v1.rs", "vmblk.v1.bin"];

fn generate(out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["vmblk/v1/vmblk.proto"], [root.join("proto")])
        .expect("compiling vmblk.proto");
    std::fs::write(out.join("vmblk.v1.bin"), fds.encode_to_vec()).expect("writing descriptor");
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .out_dir(out)
        .compile_fds(fds)
        .expect("generating code");
}

#[test]
fn checked_in_code_matches_the_proto() {
    let gen_dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    if std::env::var_os("VMBLK_PROTO_REGEN").is_some() {
        generate(&gen_dir);
        return;
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    generate(tmp.path());
    for name in GENERATED {
        let fresh = std::fs::read(tmp.path().join(name)).expect("reading fresh code");
        let checked_in = std::fs::read(gen_dir.join(name)).unwrap_or_default();
        assert!(
            fresh == checked_in,
            "src/gen/{name} is stale: regenerate with \
             VMBLK_PROTO_REGEN=1 cargo test -p vmblk-proto --test codegen"
        );
    }
}
