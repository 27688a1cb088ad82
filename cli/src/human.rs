//! Human-readable summaries of the reports.

use image_unpack::{InspectReport, RepairCommandReport, TableWork, UnpackReport};

/// An error and its causes, outermost first, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn table(t: &TableWork) {
    match (&t.skipped, t.table_sector_size) {
        (Some(why), _) => println!("partition table: {why}"),
        (None, Some(ss)) => {
            match &t.bridge {
                Some(b) => println!(
                    "partition table: built for {ss}-byte sectors, worked on through bridge {} ({}-byte sectors, removed)",
                    b.device.display(),
                    b.sector_size
                ),
                None => println!("partition table: built for {ss}-byte sectors, worked on in place"),
            }
            if let Some(r) = &t.repair {
                if r.actions.is_empty() {
                    println!("repair: nothing to do");
                }
                for a in &r.actions {
                    println!("repair: {a}");
                }
            }
            if let Some(v) = &t.verify {
                println!("verify: {}", if v.ok { "ok" } else { "FAILED" });
                for p in &v.problems {
                    println!("verify: problem: {p}");
                }
                for p in &v.partitions {
                    println!(
                        "  {:>3}  {:<12} {:>10}  {:<6} uuid={} label={} partuuid={}",
                        p.index,
                        p.part_label,
                        size(p.size_bytes),
                        p.fs_type.as_deref().unwrap_or("-"),
                        p.uuid.as_deref().unwrap_or("-"),
                        p.label.as_deref().unwrap_or("-"),
                        p.partuuid
                    );
                }
            }
        }
        (None, None) => {}
    }
}

/// `vmblk unpack` summary; the last line has the figures.
pub fn unpack(r: &UnpackReport) {
    println!(
        "image: {} ({}, {})",
        r.image.display(),
        r.source_format,
        size(r.virtual_size)
    );
    println!(
        "target: {} ({:?}, {}, logical {} / physical {} bytes, direct I/O {})",
        r.target.path.display(),
        r.target.kind,
        size(r.target.size),
        r.target.logical_block_size,
        r.target.physical_block_size,
        if r.target.direct_io { "on" } else { "off" }
    );
    table(&r.table);
    let zm = r
        .copy
        .zero_method
        .map(|m| format!(" by {m:?}"))
        .unwrap_or_default();
    println!(
        "wrote {} ({} bytes), skipped {} as zero{zm}, {}/s, {:.2} s",
        size(r.copy.bytes_written),
        r.copy.bytes_written,
        size(r.copy.bytes_zeroed),
        size(r.throughput_bytes_per_sec),
        r.elapsed_ms as f64 / 1000.0
    );
}

/// `vmblk repair` summary.
pub fn repair(r: &RepairCommandReport) {
    println!(
        "volume: {} ({}, logical {} bytes){}",
        r.target.path.display(),
        size(r.target.size),
        r.target.logical_block_size,
        if r.dry_run {
            " — dry run, nothing written"
        } else {
            ""
        }
    );
    table(&r.table);
}

/// `vmblk inspect` summary.
pub fn inspect(r: &InspectReport) {
    match &r.source_format {
        Some(f) => println!("image: {} ({f}, {})", r.path.display(), size(r.size)),
        None => println!("volume: {} ({})", r.path.display(), size(r.size)),
    }
    if let Some(t) = &r.target {
        println!(
            "block sizes: logical {} / physical {}",
            t.logical_block_size, t.physical_block_size
        );
    }
    println!("table layout: {:?}", r.detection.layout);
    if r.detection.suspected_sgdisk_accident {
        println!(
            "warning: an empty 4K GPT lies over a 512-byte GPT with partitions (sgdisk -e run on the 4K device?): `vmblk repair` restores it"
        );
    }
    if let Some(t) = &r.table {
        println!("table at {}-byte sectors: {:?}", t.sector_size, t.kind);
        for p in &t.partitions {
            println!(
                "  {:>3}  LBA {:>10}..={:<10} {:>10}  {}  {}",
                p.index,
                p.first_lba,
                p.last_lba,
                size(p.size_bytes),
                p.type_name.unwrap_or(&p.type_guid),
                p.name
            );
        }
        for p in &t.problems {
            println!("problem: {p}");
        }
    }
}

/// `vmblk pack`'s report.
pub fn pack(r: &image_unpack::PackReport) {
    let total = r.compressed_clusters + r.raw_clusters + r.zero_clusters;
    println!(
        "packed {} ({} bytes) into {} ({} bytes, {:?}): {} of {} clusters compressed, {} raw, \
         {} zero left out; {} threads, {} ms",
        r.source.display(),
        r.virtual_size,
        r.output.display(),
        r.file_bytes,
        r.compression,
        r.compressed_clusters,
        total,
        r.raw_clusters,
        r.zero_clusters,
        r.threads,
        r.elapsed_ms
    );
}
