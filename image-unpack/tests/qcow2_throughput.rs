//! Decoding throughput of a source, for measuring, not a timed test:
//!
//! ```text
//! VMBLK_BENCH_IMAGE=/path/to/image.qcow2 VMBLK_BENCH_THREADS=2 \
//!     cargo test --release -p image-unpack --test qcow2_throughput -- --ignored --nocapture
//! ```
//!
//! Reads every data extent (inflating compressed clusters) on the given number of
//! threads, the way the writer does, and prints the guest bytes per second. Its figures
//! are not kept here: one worth keeping goes to bench/RESULTS.md with the commit, the
//! machine, the image and this command.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use image_unpack::source::{self, ExtentKind, OpenOptions};

#[test]
#[ignore = "measurement: needs VMBLK_BENCH_IMAGE"]
fn decode_throughput() {
    let Ok(path) = std::env::var("VMBLK_BENCH_IMAGE") else {
        eprintln!("VMBLK_BENCH_IMAGE not set; nothing measured");
        return;
    };
    let threads: usize = std::env::var("VMBLK_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    let t0 = Instant::now();
    let src = source::open(path.as_ref(), &OpenOptions::default()).unwrap();
    let opened = t0.elapsed();
    let extents: Vec<_> = src.extents().map(|e| e.unwrap()).collect();
    let listed = t0.elapsed();
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut buf = vec![0u8; src.max_extent_len() as usize];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(e) = extents.get(i) else { break };
                    if matches!(e.kind, ExtentKind::Data { .. }) {
                        src.read_extent(e, &mut buf[..e.len as usize]).unwrap();
                    }
                }
            });
        }
    });
    let total = t0.elapsed();
    let data: u64 = extents
        .iter()
        .filter(|e| matches!(e.kind, ExtentKind::Data { .. }))
        .map(|e| e.len)
        .sum();
    let compressed = extents
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                ExtentKind::Data {
                    compressed_len: Some(_),
                    ..
                }
            )
        })
        .count();
    println!(
        "{}: {} extents ({compressed} compressed), {:.0} MiB data of {:.0} MiB; open {:?}, list {:?}, \
         total {:?} on {threads} threads: {:.0} MiB/s of data",
        src.format(),
        extents.len(),
        data as f64 / 1048576.0,
        src.virtual_size() as f64 / 1048576.0,
        opened,
        listed - opened,
        total,
        data as f64 / 1048576.0 / total.as_secs_f64()
    );
}
