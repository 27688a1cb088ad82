//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`), and the replay of
//! their committed corpora as plain unit tests: every input a fuzzer kept (and every
//! crash it found) runs again in `cargo test`, on the stable toolchain, in the debug
//! profile with overflow checks on.

use std::io::Cursor;
use std::sync::Arc;

use crate::partition::{detect_table_sector_size, inspect, repair, RepairOptions};
use crate::source::{
    open_reader, ExtentKind, ImageSource, MemReader, OpenOptions, Qcow2Header, Qcow2Source,
};

/// Extents read per input: enough to reach every kind, bounded so an input that maps
/// a huge disk of tiny extents stays quick.
const MAX_EXTENTS: usize = 4096;

/// Reads the data extents of `src` (decompressing them), ignoring their errors.
fn read_all(src: &dyn ImageSource) {
    let mut buf = vec![0u8; src.max_extent_len().min(64 << 20) as usize];
    for extent in src.extents().take(MAX_EXTENTS).flatten() {
        if let ExtentKind::Data { .. } = extent.kind {
            if let Some(b) = buf.get_mut(..extent.len as usize) {
                let _ = src.read_extent(&extent, b);
            }
        }
    }
}

/// The qcow2 parser on arbitrary bytes: header validation, the map's validation and
/// walk, compressed-cluster decoding. Must never panic, hang or allocate without bound.
pub fn qcow2(data: &[u8]) {
    let _ = Qcow2Header::parse(data, data.len() as u64);
    if let Ok(src) = Qcow2Source::open(Arc::new(MemReader::new(data.to_vec()))) {
        read_all(&src);
    }
}

/// Format detection and the Incus tarball reader on arbitrary bytes (plain or
/// compressed tar holding rootfs.img). A compressed input may extract a rootfs.img
/// into the system temporary directory (an unlinked file, gone with the source).
pub fn tar_open(data: &[u8]) {
    let reader = Arc::new(MemReader::new(data.to_vec()));
    if let Ok(src) = open_reader(reader, &OpenOptions::default()) {
        let _ = src.format();
        read_all(src.as_ref());
    }
}

/// GPT and MBR parsing at both sector sizes: detection, inspection and (on a copy)
/// repair never panic, and repair never changes the device's size.
pub fn partition_table(data: &[u8]) {
    let size = data.len() as u64;
    let _ = detect_table_sector_size(&mut Cursor::new(data), size);
    for ss in [512u32, 4096] {
        let _ = inspect(&mut Cursor::new(data), ss, size);
        let mut dev = Cursor::new(data.to_vec());
        let _ = repair(&mut dev, ss, size, &RepairOptions::default());
        assert_eq!(
            dev.get_ref().len(),
            data.len(),
            "repair changed the device size"
        );
    }
}

#[cfg(test)]
pub(crate) mod replay {
    //! Runs every committed input of a fuzz target's corpus (`fuzz/corpus/<target>/`)
    //! and its regressions (`fuzz/regressions/<target>/`) through the target.

    use std::path::{Path, PathBuf};

    /// The inputs of `target`, sorted; fails when the corpus is missing or empty.
    pub(crate) fn inputs(target: &str) -> Vec<PathBuf> {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut files = Vec::new();
        for dir in ["corpus", "regressions"] {
            let d = fuzz.join(dir).join(target);
            if let Ok(rd) = std::fs::read_dir(&d) {
                files.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_file()));
            }
        }
        files.sort();
        assert!(
            !files.is_empty(),
            "no committed inputs for fuzz target {target} under {}",
            fuzz.display()
        );
        files
    }

    /// Feeds each input of `target` to `run`, naming the input that panics.
    pub(crate) fn replay(target: &str, run: fn(&[u8])) -> usize {
        let files = inputs(target);
        for f in &files {
            let data = std::fs::read(f).expect("read corpus input");
            let r = std::panic::catch_unwind(|| run(&data));
            assert!(
                r.is_ok(),
                "fuzz target {target} panicked on {}",
                f.display()
            );
        }
        files.len()
    }

    #[test]
    fn qcow2_corpus_replays() {
        assert!(replay("qcow2_header", super::qcow2) > 0);
    }

    #[test]
    fn tar_open_corpus_replays() {
        assert!(replay("tar_open", super::tar_open) > 0);
    }

    #[test]
    fn partition_table_corpus_replays() {
        assert!(replay("partition_table", super::partition_table) > 0);
    }
}
