//! The host's side of the guest workload (`guest/init.sh`, section "Workload"): the data
//! pattern the guest's writer puts on a disk, and the `VMBLK-IO` / `VMBLK-SHUTDOWN`
//! lines it prints.
//!
//! ```text
//!  test ──Guest::command("writer w data 1 0 32")──> /dev/ttyS1 ──> /init: writer job
//!                                                                   │ 64 KiB blocks, O_DIRECT
//!  serial log <── VMBLK-IO writer=w block=15 ok=16 err=0 t=12.3 ────┘
//!  host: pattern_block(seed, block) == bytes of the backing file at block * IO_BLOCK
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::util::hex;

/// Size of one block of the guest's writer.
pub const IO_BLOCK: u64 = 65536;

/// Block `block` written with `seed`: `vmblk-io seed=<seed> block=<block>\n` repeated,
/// cut at [`IO_BLOCK`] bytes (what `yes ... | head -c 65536` makes in the guest).
pub fn pattern_block(seed: u64, block: u64) -> Vec<u8> {
    let line = format!("vmblk-io seed={seed} block={block}\n");
    line.bytes().cycle().take(IO_BLOCK as usize).collect()
}

/// What the guest's `verify` prints as `sha256=`: the SHA-256 of the lines
/// `<sha256 of block>\n` of the verified blocks in block order.
pub fn verify_digest(blocks: &[(u64, u64)]) -> String {
    let mut h = Sha256::new();
    let mut sorted = blocks.to_vec();
    sorted.sort_unstable();
    for &(block, seed) in &sorted {
        h.update(hex(&Sha256::digest(pattern_block(seed, block))));
        h.update(b"\n");
    }
    hex(&h.finalize())
}

/// Checks that each `(block, seed)` of `blocks` holds its pattern in `path` at
/// `offset + block * IO_BLOCK` (a backing file or device, read on the host).
pub fn check_blocks(path: &Path, offset: u64, blocks: &[(u64, u64)]) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; IO_BLOCK as usize];
    let mut bad = Vec::new();
    for &(b, s) in blocks {
        f.read_exact_at(&mut buf, offset + b * IO_BLOCK)
            .with_context(|| format!("reading block {b} of {}", path.display()))?;
        if buf != pattern_block(s, b) {
            bad.push(b);
        }
    }
    if !bad.is_empty() {
        bail!(
            "{} of {} blocks differ in {}: {:?}",
            bad.len(),
            blocks.len(),
            path.display(),
            &bad[..bad.len().min(20)]
        );
    }
    Ok(())
}

/// One `VMBLK-IO` line as `key=value` pairs (words without `=` map to an empty value).
pub fn parse_io_line(line: &str) -> Option<BTreeMap<String, String>> {
    let rest = &line[line.find("VMBLK-IO ")? + 9..];
    Some(
        rest.split_whitespace()
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (w.to_owned(), String::new()),
            })
            .collect(),
    )
}

/// Every `VMBLK-IO` line of `log` that has `key=value`, parsed.
pub fn io_lines(log: &str, key: &str, value: &str) -> Vec<BTreeMap<String, String>> {
    log.lines()
        .filter_map(parse_io_line)
        .filter(|m| m.get(key).map(String::as_str) == Some(value))
        .collect()
}

/// Guest uptimes (seconds) of `VMBLK-SHUTDOWN begin` and `jobs-stopped`, and the number
/// of job processes left then, of the last shutdown in `log`.
pub fn shutdown_times(log: &str) -> Option<(f64, f64, u32)> {
    let field = |l: &str, k: &str| -> Option<String> {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(k).map(str::to_owned))
    };
    let begin = log.lines().rfind(|l| l.contains("VMBLK-SHUTDOWN begin"))?;
    let stopped = log
        .lines()
        .rfind(|l| l.contains("VMBLK-SHUTDOWN jobs-stopped"))?;
    Some((
        field(begin, "t=")?.parse().ok()?,
        field(stopped, "t=")?.parse().ok()?,
        field(stopped, "left=")?.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_matches_what_yes_and_head_make() {
        let b = pattern_block(7, 3);
        assert_eq!(b.len(), IO_BLOCK as usize);
        assert!(b.starts_with(b"vmblk-io seed=7 block=3\nvmblk-io seed=7 block=3\n"));
        assert_ne!(pattern_block(7, 3), pattern_block(8, 3));
        assert_ne!(pattern_block(7, 3), pattern_block(7, 4));
        // The guest's own generator, when busybox is around to compare with.
        if Path::new("/bin/busybox").exists() {
            let out = std::process::Command::new("/bin/busybox")
                .args(["sh", "-c", "yes 'vmblk-io seed=7 block=3' | head -c 65536"])
                .output()
                .unwrap();
            assert_eq!(out.stdout, b);
        }
    }

    #[test]
    fn parses_io_and_shutdown_lines() {
        let log = "x\r\nVMBLK-IO writer=w done ok=32 err=0 t=20.5\r\n\
                   VMBLK-IO scanner=s reads=4 errors=1 state=error t=21.0\r\n\
                   VMBLK-SHUTDOWN begin action=poweroff jobs=1 t=22.25\r\n\
                   VMBLK-SHUTDOWN jobs-stopped left=0 t=23.5\r\n";
        let w = io_lines(log, "writer", "w");
        assert_eq!(w.len(), 1);
        assert_eq!(w[0]["ok"], "32");
        assert!(w[0].contains_key("done"));
        assert_eq!(io_lines(log, "state", "error").len(), 1);
        assert_eq!(shutdown_times(log), Some((22.25, 23.5, 0)));
    }
}
