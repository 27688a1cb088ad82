//! vmblkd served to clients that are not tonic: Python's grpcio with default channel
//! options, learning every message from server reflection; and raw HTTP/2 requests
//! whose `:authority` is the socket's path, URL-encoded or not, or empty (what
//! grpc-core, grpc-java, grpc-swift and grpcurl send on unix sockets).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmblkd-foreign")
        .tempdir()
        .unwrap()
}

/// The Python interpreter of the virtual environment scripts/setup.sh makes.
fn venv_python() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyvenv/bin/python3");
    assert!(
        p.exists(),
        "{} is missing: run scripts/setup.sh (it installs grpcio from PyPI there)",
        p.display()
    );
    p
}

#[test]
fn python_grpcio_with_default_options_works_through_reflection_alone() {
    let t = tmp();
    let d = Daemon::start(
        t.path(),
        DaemonOpts {
            env: vec![("RUST_LOG".into(), "info,h2=debug".into())],
            ..Default::default()
        },
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/reflection_client.py");
    let out = Command::new(venv_python())
        .arg(&script)
        .arg(&d.socket)
        .arg("default")
        .output()
        .expect("running the Python client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed: {stdout}\n{}\nvmblkd:\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.log_text()
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON from the client");
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert!(services.contains(&"vmblk.v1.StorageDriver"), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health"), "{services:?}");
    assert_eq!(v["health"]["ok"]["status"], "SERVING", "{v}");
    assert_eq!(v["create"]["ok"]["name"], "py-vol", "{v}");
    let listed: Vec<&str> = v["list"]["ok"]["volumes"]
        .as_array()
        .expect("volumes listed")
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["py-vol"], "{v}");
    assert!(v["delete"]["ok"].is_object(), "{v}");
    assert_eq!(v["bad_name"]["code"], "INVALID_ARGUMENT", "{v}");
    assert_eq!(v["missing"]["code"], "NOT_FOUND", "{v}");
    // The client did send a path as :authority (or this test proves nothing).
    assert!(
        d.log_text()
            .contains("ignoring an :authority that is not host[:port]"),
        "grpcio sent a plain host as :authority:\n{}",
        d.log_text()
    );
}

/// An HPACK integer with an `n`-bit prefix whose other bits are `flags`.
fn hpack_int(out: &mut Vec<u8>, flags: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A header block of literal fields without indexing (no Huffman, no table).
fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.push(0);
        hpack_int(&mut b, 0, 7, name.len());
        b.extend_from_slice(name.as_bytes());
        hpack_int(&mut b, 0, 7, value.len());
        b.extend_from_slice(value.as_bytes());
    }
    b
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;

/// What the server answered to one request on stream 1.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// A DATA frame with this gRPC message.
    Message(Vec<u8>),
    /// RST_STREAM with this error code.
    Reset(u32),
    /// GOAWAY with this error code.
    GoAway(u32),
}

/// Sends a gRPC Health/Check with `authority` over a fresh connection, as raw frames.
fn health_check_with_authority(socket: &Path, authority: &str) -> Answer {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    out.extend(frame(HEADERS, 0x4, 1, &block));
    // An empty HealthCheckRequest: uncompressed, zero length.
    out.extend(frame(DATA, 0x1, 1, &[0, 0, 0, 0, 0]));
    s.write_all(&out).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = Vec::new();
    loop {
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match kind {
                SETTINGS if flags & 1 == 0 => s.write_all(&frame(SETTINGS, 1, 0, &[])).unwrap(),
                DATA if stream == 1 => return Answer::Message(payload),
                RST_STREAM if stream == 1 => {
                    return Answer::Reset(u32::from_be_bytes(payload[..4].try_into().unwrap()))
                }
                GOAWAY => {
                    return Answer::GoAway(u32::from_be_bytes(payload[4..8].try_into().unwrap()))
                }
                _ => {}
            }
        }
        assert!(Instant::now() < deadline, "no answer for {authority:?}");
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("reading the server's frames");
        assert!(
            n > 0,
            "connection closed without an answer for {authority:?}"
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn requests_whose_authority_is_a_socket_path_are_served() {
    let t = tmp();
    let d = Daemon::start(t.path(), DaemonOpts::default());
    let path = d.socket.display().to_string();
    let encoded = path.replace('/', "%2F");
    // HealthCheckResponse { status: SERVING (1) }, as one uncompressed gRPC message.
    let serving = Answer::Message(vec![0, 0, 0, 0, 2, 0x08, 0x01]);
    for authority in [
        path.as_str(),
        encoded.as_str(),
        encoded.trim_start_matches("%2F"),
        "",
        "localhost",
    ] {
        assert_eq!(
            health_check_with_authority(&d.socket, authority),
            serving,
            ":authority {authority:?}"
        );
    }
}
