//! Unit tests of inspect and repair on in-memory disks.

use std::io::Cursor;

use proptest::prelude::*;

use super::testutil::*;
use super::*;

const MIB: u64 = 1 << 20;

fn cur(buf: Vec<u8>) -> Cursor<Vec<u8>> {
    Cursor::new(buf)
}

fn run(buf: Vec<u8>, ss: u32, opts: &RepairOptions) -> (Result<RepairReport, Error>, Vec<u8>) {
    let len = buf.len() as u64;
    let mut c = cur(buf);
    let r = repair(&mut c, ss, len, opts);
    (r, c.into_inner())
}

/// Opens `buf` with the `gpt` crate (an independent implementation) and
/// returns its partitions as (first, last) pairs, checking both headers.
fn gpt_crate_partitions(buf: &[u8], ss: u32) -> Vec<(u64, u64)> {
    let lb = if ss == 512 {
        gpt::disk::LogicalBlockSize::Lb512
    } else {
        gpt::disk::LogicalBlockSize::Lb4096
    };
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(lb)
        .only_valid_headers(true)
        .open_from_device(Cursor::new(buf.to_vec()))
        .expect("gpt crate accepts the table");
    let last = buf.len() as u64 / u64::from(ss) - 1;
    assert_eq!(disk.primary_header().unwrap().backup_lba, last);
    assert_eq!(disk.backup_header().unwrap().current_lba, last);
    disk.partitions()
        .values()
        .map(|p| (p.first_lba, p.last_lba))
        .collect()
}

fn relocation_after_growth(ss: u32) {
    let buf = image_on_device(ss, 64 * MIB, 128 * MIB);
    let before = inspect(&mut cur(buf.clone()), ss, 128 * MIB).unwrap();
    assert_eq!(before.kind, TableKind::Gpt);
    assert!(!before.backup_at_end);
    let (r, out) = run(buf, ss, &RepairOptions::default());
    let r = r.unwrap();
    let last = 128 * MIB / u64::from(ss) - 1;
    assert_eq!(r.outcome, RepairOutcome::Repaired);
    assert!(r
        .actions
        .iter()
        .any(|a| matches!(a, RepairAction::RelocateBackup { to_lba, .. } if *to_lba == last)));
    assert!(r
        .actions
        .iter()
        .any(|a| matches!(a, RepairAction::SetAlternateLba { to, .. } if *to == last)));
    assert!(r
        .actions
        .iter()
        .any(|a| matches!(a, RepairAction::FixProtectiveMbrSize { .. })));
    let after = r.after.unwrap();
    assert!(after.is_clean(), "{:?}", after.problems);
    assert!(after.backup_at_end);
    assert_eq!(after.partitions, before.partitions);
    assert_eq!(
        after.last_usable_lba,
        Some(last - 16384 / u64::from(ss) - 1)
    );
    assert_eq!(gpt_crate_partitions(&out, ss).len(), 2);
    // The old backup header is gone.
    let old = (64 * MIB - u64::from(ss)) as usize;
    assert_ne!(&out[old..old + 8], b"EFI PART");
    // A second repair has nothing to do.
    let (r2, out2) = run(out.clone(), ss, &RepairOptions::default());
    assert_eq!(r2.unwrap().outcome, RepairOutcome::AlreadyClean);
    assert_eq!(out, out2);
}

#[test]
fn relocation_after_growth_at_512() {
    relocation_after_growth(512);
}

#[test]
fn relocation_after_growth_at_4096() {
    relocation_after_growth(4096);
}

#[test]
fn pmbr_size_fixed_alone() {
    let mut buf = image_on_device(512, 32 * MIB, 32 * MIB);
    buf[458..462].copy_from_slice(&1000u32.to_le_bytes());
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    let r = r.unwrap();
    let want = (32 * MIB / 512 - 1) as u32;
    assert_eq!(
        r.actions,
        vec![RepairAction::FixProtectiveMbrSize {
            from: 1000,
            to: want
        }]
    );
    assert_eq!(&out[458..462], &want.to_le_bytes());
    assert_eq!(out[512..], buf[512..]);
}

#[test]
fn pmbr_size_capped_at_u32_max() {
    let ss = 512u32;
    // A sparse-ish check: the expected size is computed, not written, for a 3 TiB device.
    assert_eq!(inspect::pmbr_expected_size(3 << 40 >> 9), u32::MAX);
    assert_eq!(inspect::pmbr_expected_size(100), 99);
    let _ = ss;
}

#[test]
fn hybrid_mbr_entries_preserved_on_growth() {
    let mut buf = image_on_device(512, 64 * MIB, 96 * MIB);
    // Hybrid: slot 1 = FAT covering the ESP, slot 2 = 0xEE to the image end.
    let img_last = 64 * MIB / 512 - 1;
    let mut e = [0u8; 16];
    e[4] = 0xEF;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&(8 * 2048u32).to_le_bytes());
    let mut ee = [0u8; 16];
    ee[4] = 0xEE;
    ee[8..12].copy_from_slice(&1u32.to_le_bytes());
    ee[12..16].copy_from_slice(&(img_last as u32).to_le_bytes());
    buf[446..462].copy_from_slice(&e);
    buf[462..478].copy_from_slice(&ee);
    let rep = inspect(&mut cur(buf.clone()), 512, 96 * MIB).unwrap();
    assert_eq!(rep.kind, TableKind::Hybrid);
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    let r = r.unwrap();
    let new = (96 * MIB / 512 - 1) as u32;
    assert!(r.actions.contains(&RepairAction::FixProtectiveMbrSize {
        from: img_last as u32,
        to: new
    }));
    assert_eq!(
        out[..474],
        buf[..474],
        "boot code and the hybrid entry are unchanged"
    );
    assert_eq!(&out[474..478], &new.to_le_bytes());
    assert_eq!(out[478..512], buf[478..512]);
    assert_eq!(r.after.unwrap().kind, TableKind::Hybrid);
}

#[test]
fn hybrid_mbr_with_leading_ee_untouched() {
    let mut buf = image_on_device(512, 64 * MIB, 96 * MIB);
    // sgdisk -h layout: 0xEE covers 1..2047, then the hybrid entry.
    buf[450] = 0xEE;
    buf[458..462].copy_from_slice(&2047u32.to_le_bytes());
    buf[462 + 4] = 0xEF;
    buf[462 + 8..462 + 12].copy_from_slice(&2048u32.to_le_bytes());
    buf[462 + 12..462 + 16].copy_from_slice(&16384u32.to_le_bytes());
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    assert!(r
        .unwrap()
        .actions
        .iter()
        .all(|a| !matches!(a, RepairAction::FixProtectiveMbrSize { .. })));
    assert_eq!(out[..512], buf[..512]);
}

#[test]
fn primary_restored_from_backup() {
    let mut buf = image_on_device(512, 32 * MIB, 32 * MIB);
    let good = buf.clone();
    buf[512 + 40] ^= 0xFF; // header CRC now wrong
    buf[1024..1024 + 256].fill(0xAB); // and its entries
    let (r, out) = run(buf, 512, &RepairOptions::default());
    let r = r.unwrap();
    assert_eq!(
        r.actions,
        vec![RepairAction::RestorePrimaryFromBackup {
            backup_lba: 32 * MIB / 512 - 1
        }]
    );
    assert_eq!(out, good);
}

#[test]
fn backup_restored_from_primary() {
    let mut buf = image_on_device(4096, 32 * MIB, 32 * MIB);
    let good = buf.clone();
    let n = buf.len();
    buf[n - 4096..].fill(0);
    let (r, out) = run(buf, 4096, &RepairOptions::default());
    let r = r.unwrap();
    assert_eq!(
        r.actions,
        vec![RepairAction::RestoreBackupFromPrimary {
            to_lba: 32 * MIB / 4096 - 1
        }]
    );
    assert_eq!(out, good);
}

#[test]
fn mbr_only_untouched() {
    let mut buf = vec![0u8; 8 * MIB as usize];
    buf[446 + 4] = 0x83;
    buf[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    buf[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
    buf[510] = 0x55;
    buf[511] = 0xAA;
    let rep = inspect(&mut cur(buf.clone()), 512, 8 * MIB).unwrap();
    assert_eq!(rep.kind, TableKind::Mbr);
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    let r = r.unwrap();
    assert_eq!(r.outcome, RepairOutcome::LeftAlone);
    assert!(r.actions.is_empty());
    assert_eq!(out, buf);
}

#[test]
fn table_less_untouched() {
    let buf = vec![0u8; 4 * MIB as usize];
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    assert_eq!(r.unwrap().outcome, RepairOutcome::LeftAlone);
    assert_eq!(out, buf);
}

#[test]
fn garbage_refused_without_writes() {
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut x = 0x1234_5678u32;
    for b in buf[..64 * 1024].iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    buf[512..520].copy_from_slice(b"EFI PART");
    buf[450] = 0xEE;
    buf[510] = 0x55;
    buf[511] = 0xAA;
    let (r, out) = run(
        buf.clone(),
        512,
        &RepairOptions {
            force: true,
            ..Default::default()
        },
    );
    let e = r.unwrap_err();
    assert!(matches!(e, Error::NothingToRestore { .. }), "{e}");
    assert!(e.wrote_nothing());
    assert_eq!(out, buf);
}

#[test]
fn disagreeing_headers_refused_unless_forced() {
    let mut buf = image_on_device(512, 32 * MIB, 32 * MIB);
    // Rewrite the backup with a third partition: both copies valid, different.
    let mut other = vec![0u8; buf.len()];
    let mut parts = esp_and_root(512, 32 * MIB);
    parts[1].last -= 2048;
    parts.push(Part {
        type_guid: LINUX,
        first: parts[1].last + 1,
        last: parts[1].last + 2048,
        name: "x",
    });
    write_gpt(&mut other, 512, 32 * MIB, &parts);
    let tail = buf.len() - 33 * 512;
    buf[tail..].copy_from_slice(&other[tail..]);
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    assert!(matches!(r, Err(Error::Unrecognised { .. })));
    assert_eq!(out, buf);
    let (r, out) = run(
        buf.clone(),
        512,
        &RepairOptions {
            force: true,
            ..Default::default()
        },
    );
    let r = r.unwrap();
    assert!(!r.warnings.is_empty());
    assert_eq!(
        out[tail..],
        image_on_device(512, 32 * MIB, 32 * MIB)[tail..],
        "primary wins"
    );
}

#[test]
fn missing_protective_mbr_written() {
    let mut buf = image_on_device(512, 16 * MIB, 16 * MIB);
    buf[..512].fill(0);
    let (r, out) = run(buf.clone(), 512, &RepairOptions::default());
    let want = (16 * MIB / 512 - 1) as u32;
    assert_eq!(
        r.unwrap().actions,
        vec![RepairAction::WriteProtectiveMbr { size: want }]
    );
    assert_eq!(out[..512], image_on_device(512, 16 * MIB, 16 * MIB)[..512]);
    assert_eq!(out[512..], buf[512..]);
}

#[test]
fn foreign_table_with_partitions_refused_unless_forced() {
    // A 4K-native table with partitions, and a 512 table built over the
    // first 4 KiB of it: two live layouts, which one is meant is unknown.
    let mut buf = image_on_device(4096, 32 * MIB, 32 * MIB);
    let mut small = vec![0u8; 32 * MIB as usize];
    let parts = vec![Part {
        type_guid: LINUX,
        first: 40,
        last: 100,
        name: "x",
    }];
    write_gpt(&mut small, 512, 32 * MIB, &parts);
    // Keep the 4K primary (at 4096..) intact: copy only the 512 header + 4 entries.
    buf[..1536].copy_from_slice(&small[..1536]);
    let rep = inspect(&mut cur(buf.clone()), 4096, 32 * MIB).unwrap();
    assert!(
        rep.problems.iter().any(|p| matches!(
            p,
            Problem::ForeignGpt {
                sector_size: 512,
                ..
            }
        )),
        "{:?}",
        rep.problems
    );
    let (r, out) = run(buf.clone(), 4096, &RepairOptions::default());
    assert!(matches!(r, Err(Error::Unrecognised { .. })), "{r:?}");
    assert_eq!(out, buf);
}

#[test]
fn dry_run_writes_nothing() {
    let buf = image_on_device(512, 64 * MIB, 128 * MIB);
    let (r, out) = run(
        buf.clone(),
        512,
        &RepairOptions {
            dry_run: true,
            grow_last_partition: true,
            ..Default::default()
        },
    );
    let r = r.unwrap();
    assert_eq!(r.outcome, RepairOutcome::Repaired);
    assert!(r.actions.len() >= 4);
    assert!(r.after.is_none());
    assert_eq!(out, buf);
}

#[test]
fn grow_last_partition_extends_to_last_usable() {
    let buf = image_on_device(512, 64 * MIB, 128 * MIB);
    let (r, out) = run(
        buf,
        512,
        &RepairOptions {
            grow_last_partition: true,
            ..Default::default()
        },
    );
    let r = r.unwrap();
    let last_usable = 128 * MIB / 512 - 34;
    assert!(r.actions.iter().any(|a| matches!(a, RepairAction::GrowLastPartition { index: 2, to_last_lba, .. } if *to_last_lba == last_usable)));
    let parts = gpt_crate_partitions(&out, 512);
    assert_eq!(parts[1].1, last_usable);
}

#[test]
fn partition_beyond_device_refused() {
    // A 64 MiB image truncated to 48 MiB: the root partition runs off the end.
    let full = image_on_device(512, 64 * MIB, 64 * MIB);
    let buf = full[..48 * MIB as usize].to_vec();
    let (r, out) = run(
        buf.clone(),
        512,
        &RepairOptions {
            force: true,
            ..Default::default()
        },
    );
    assert!(
        matches!(r, Err(Error::PartitionOutsideTable { index: 2, .. })),
        "{r:?}"
    );
    assert_eq!(out, buf);
}

#[test]
fn sgdisk_e_accident_detected() {
    let mut buf = image_on_device(512, 64 * MIB, 128 * MIB);
    simulate_sgdisk_e_on_4k(&mut buf);
    let d = detect_table_sector_size(&mut cur(buf), 128 * MIB).unwrap();
    assert!(d.suspected_sgdisk_accident, "{d:?}");
    assert_eq!(d.layout, DetectedLayout::Both { likely: 512 });
    assert_eq!(d.gpt_512.unwrap().lba, 64 * MIB / 512 - 1);
}

#[test]
fn sgdisk_e_accident_recovered_from_surviving_backup() {
    let pristine = image_on_device(512, 64 * MIB, 128 * MIB);
    let mut buf = pristine.clone();
    simulate_sgdisk_e_on_4k(&mut buf);
    let (r, out) = run(buf, 512, &RepairOptions::default());
    let r = r.unwrap();
    assert!(
        r.actions
            .contains(&RepairAction::RecoverFromSurvivingBackup {
                lba: 64 * MIB / 512 - 1
            }),
        "{:#?}",
        r.actions
    );
    let after = r.after.unwrap();
    assert!(after.is_clean(), "{:?}", after.problems);
    let want = inspect(&mut cur(pristine), 512, 64 * MIB).unwrap();
    assert_eq!(after.partitions, want.partitions);
    assert_eq!(after.disk_guid, want.disk_guid);
    assert_eq!(gpt_crate_partitions(&out, 512).len(), 2);
    // No 4K GPT left anywhere.
    let d = detect_table_sector_size(&mut cur(out.clone()), 128 * MIB).unwrap();
    assert_eq!(d.layout, DetectedLayout::Gpt { sector_size: 512 });
    let n = out.len();
    assert_ne!(&out[n - 4096..n - 4096 + 8], b"EFI PART");
}

#[test]
fn sgdisk_e_accident_warns_about_partition_below_lba_48() {
    let mut buf = vec![0u8; 128 * MIB as usize];
    let mut parts = esp_and_root(512, 64 * MIB);
    parts.insert(
        0,
        Part {
            type_guid: LINUX,
            first: 34,
            last: 2047,
            name: "bios",
        },
    );
    write_gpt(&mut buf, 512, 64 * MIB, &parts);
    simulate_sgdisk_e_on_4k(&mut buf);
    let (r, _) = run(buf, 512, &RepairOptions::default());
    let r = r.unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.starts_with("partition 1 overlaps bytes 0..24576")),
        "{:?}",
        r.warnings
    );
    assert!(r.after.unwrap().is_clean());
}

#[test]
fn sgdisk_e_accident_with_image_size_hint() {
    let mut buf = image_on_device(512, 64 * MIB, 128 * MIB);
    simulate_sgdisk_e_on_4k(&mut buf);
    let opts = RepairOptions {
        image_size: Some(64 * MIB),
        dry_run: true,
        ..Default::default()
    };
    let (r, _) = run(buf, 512, &opts);
    assert!(r
        .unwrap()
        .actions
        .contains(&RepairAction::RecoverFromSurvivingBackup {
            lba: 64 * MIB / 512 - 1
        }));
}

#[test]
fn sgdisk_e_accident_without_survivor_writes_nothing() {
    let mut buf = image_on_device(512, 64 * MIB, 128 * MIB);
    let b = (64 * MIB - 512) as usize;
    buf[b..b + 512].fill(0);
    simulate_sgdisk_e_on_4k(&mut buf);
    let (r, out) = run(
        buf.clone(),
        512,
        &RepairOptions {
            force: true,
            ..Default::default()
        },
    );
    assert!(matches!(r, Err(Error::NothingToRestore { .. })), "{r:?}");
    assert_eq!(out, buf);
}

#[test]
fn detect_reports_each_layout() {
    let b512 = image_on_device(512, 8 * MIB, 8 * MIB);
    let d = detect_table_sector_size(&mut cur(b512), 8 * MIB).unwrap();
    assert_eq!(d.layout, DetectedLayout::Gpt { sector_size: 512 });
    let b4k = image_on_device(4096, 8 * MIB, 8 * MIB);
    let d = detect_table_sector_size(&mut cur(b4k), 8 * MIB).unwrap();
    assert_eq!(d.layout, DetectedLayout::Gpt { sector_size: 4096 });
    let mut bmbr = vec![0u8; MIB as usize];
    bmbr[450] = 0x83;
    bmbr[458] = 100;
    bmbr[510] = 0x55;
    bmbr[511] = 0xAA;
    let d = detect_table_sector_size(&mut cur(bmbr), MIB).unwrap();
    assert_eq!(d.layout, DetectedLayout::Mbr);
    let d = detect_table_sector_size(&mut cur(vec![0; MIB as usize]), MIB).unwrap();
    assert_eq!(d.layout, DetectedLayout::None);
    // A 512 image whose primary is gone is still found by its backup.
    let mut b = image_on_device(512, 8 * MIB, 8 * MIB);
    b[512..1024].fill(0);
    let d = detect_table_sector_size(&mut cur(b), 8 * MIB).unwrap();
    assert_eq!(d.gpt_512.unwrap().copy, HeaderCopy::Backup);
}

#[test]
fn report_serialises() {
    let buf = image_on_device(512, 64 * MIB, 128 * MIB);
    let (r, _) = run(buf, 512, &RepairOptions::default());
    let r = r.unwrap();
    let j = serde_json::to_string(&r).unwrap();
    assert!(j.contains("\"action\":\"relocate_backup\""));
    assert!(j.contains("EFI System"));
    for a in &r.actions {
        assert!(!a.to_string().is_empty());
    }
}

#[test]
fn sector_size_must_be_power_of_two() {
    let buf = image_on_device(512, MIB, MIB);
    assert!(matches!(
        inspect(&mut cur(buf), 1000, MIB),
        Err(Error::InvalidSectorSize(1000))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..40_000),
        sig512 in any::<bool>(),
        sig4k in any::<bool>(),
        ss in prop_oneof![Just(512u32), Just(4096u32)],
    ) {
        let mut bytes = bytes;
        if sig512 && bytes.len() >= 600 { bytes[512..520].copy_from_slice(b"EFI PART"); }
        if sig4k && bytes.len() >= 4200 { bytes[4096..4104].copy_from_slice(b"EFI PART"); }
        let len = bytes.len() as u64;
        let _ = inspect(&mut cur(bytes.clone()), ss, len);
        let _ = detect_table_sector_size(&mut cur(bytes.clone()), len);
        // A repair of garbage may refuse; it must not panic.
        let _ = repair(&mut cur(bytes), ss, len, &RepairOptions::default());
    }

    #[test]
    fn header_fields_fuzzed_never_panic(
        field in 0usize..92,
        value in any::<u64>(),
        ss in prop_oneof![Just(512u32), Just(4096u32)],
    ) {
        let mut buf = image_on_device(ss, 2 * MIB, 3 * MIB);
        let off = ss as usize + field.min(84);
        buf[off..off + 8].copy_from_slice(&value.to_le_bytes());
        // Re-seal the CRC so validation gets past it.
        let raw = buf[ss as usize..2 * ss as usize].to_vec();
        if let Some(crc) = ondisk::header_crc(&raw, 92) {
            buf[ss as usize + 16..ss as usize + 20].copy_from_slice(&crc.to_le_bytes());
        }
        let _ = inspect(&mut cur(buf.clone()), ss, 3 * MIB);
        let _ = repair(&mut cur(buf), ss, 3 * MIB, &RepairOptions::default());
    }

    #[test]
    fn repaired_random_table_is_accepted_by_gpt_crate(
        ss in prop_oneof![Just(512u32), Just(4096u32)],
        cuts in proptest::collection::vec(1u64..64, 1..6),
        grow_mib in 0u64..8,
        grow_last in any::<bool>(),
    ) {
        let img = 8 * MIB;
        let dev = img + grow_mib * MIB;
        let s = u64::from(ss);
        let first_usable = 2 + 16384 / s;
        let last_usable = img / s - 1 - 16384 / s - 1;
        // Partitions laid end to end, sized by the cuts (in 1/64ths of the space).
        let span = last_usable - first_usable + 1;
        let total: u64 = cuts.iter().sum();
        let mut parts = Vec::new();
        let mut at = first_usable;
        for (i, c) in cuts.iter().enumerate() {
            let len = (span * c / total.max(64)).max(1);
            if at + len - 1 > last_usable { break; }
            parts.push(Part { type_guid: if i == 0 { ESP } else { LINUX }, first: at, last: at + len - 1, name: "p" });
            at += len;
        }
        let mut buf = vec![0u8; dev as usize];
        write_gpt(&mut buf, ss, img, &parts);
        let opts = RepairOptions { grow_last_partition: grow_last, ..Default::default() };
        let (r, out) = run(buf, ss, &opts);
        let r = r.unwrap();
        prop_assert!(r.after.as_ref().is_none_or(|a| a.is_clean()), "{:?}", r.after);
        let got = gpt_crate_partitions(&out, ss);
        prop_assert_eq!(got.len(), parts.len());
    }
}

// ---------------------------------------------------------------- LBA fields

/// Rewrites the GPT header at `lba` with `f` applied, its CRC fixed.
fn patch_header(buf: &mut [u8], ss: u32, lba: u64, f: impl FnOnce(&mut ondisk::GptHeader)) {
    use zerocopy::{FromBytes, IntoBytes};
    let at = (lba * u64::from(ss)) as usize;
    let mut h = ondisk::GptHeader::read_from_bytes(&buf[at..at + ondisk::GPT_HEADER_SIZE])
        .expect("a header");
    f(&mut h);
    h.header_crc32 = 0.into();
    buf[at..at + ondisk::GPT_HEADER_SIZE].copy_from_slice(h.as_bytes());
    let size = h.header_size.get() as usize;
    let crc = ondisk::header_crc(&buf[at..at + ss as usize], size).expect("header size");
    buf[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
}

/// Validates the header at `lba` of `buf` as inspect and repair do.
fn validate_at(buf: &[u8], ss: u32, lba: u64) -> Result<(), ondisk::HeaderDefect> {
    use zerocopy::FromBytes;
    let at = (lba * u64::from(ss)) as usize;
    let raw = &buf[at..at + ss as usize];
    let h = ondisk::GptHeader::read_from_bytes(&raw[..ondisk::GPT_HEADER_SIZE]).expect("a header");
    h.validate(raw, ss, lba, buf.len() as u64 / u64::from(ss))
}

#[derive(Debug, Clone, Copy)]
enum Field {
    Alternate,
    FirstUsable,
    LastUsable,
    EntriesLba,
    EntryCount,
    EntrySize,
}

fn set(h: &mut ondisk::GptHeader, field: Field, v: u64) {
    match field {
        Field::Alternate => h.alternate_lba = v.into(),
        Field::FirstUsable => h.first_usable_lba = v.into(),
        Field::LastUsable => h.last_usable_lba = v.into(),
        Field::EntriesLba => h.partition_entry_lba = v.into(),
        Field::EntryCount => h.num_partition_entries = (v.min(u64::from(u32::MAX)) as u32).into(),
        Field::EntrySize => h.partition_entry_size = (v.min(u64::from(u32::MAX)) as u32).into(),
    }
}

/// Every LBA field of the primary header at 0, at the device's last LBA, one past it
/// and at u64::MAX: validation gives the named defect (or accepts a table for a bigger
/// disk), and inspect and repair run to an answer without overflowing (this runs in
/// the debug profile, overflow checks on), a refused primary restored from the backup.
fn primary_fields_at_the_edges(ss: u32) {
    use ondisk::HeaderDefect as D;
    let size = 64 * MIB;
    let dev = size / u64::from(ss);
    let end = dev - 1;
    let good = image_on_device(ss, size, size);
    type Expect = fn(&Result<(), D>) -> bool;
    let ok: Expect = |r| r.is_ok();
    let alt: Expect = |r| matches!(r, Err(D::BadAlternate { .. }));
    let usable: Expect = |r| matches!(r, Err(D::BadUsableRange { .. }));
    let entries: Expect = |r| matches!(r, Err(D::EntriesOutOfRange));
    let count: Expect = |r| matches!(r, Err(D::BadEntryCount(_)));
    let esize: Expect = |r| matches!(r, Err(D::BadEntrySize(_)));
    let cases: Vec<(Field, u64, Expect)> = vec![
        (Field::Alternate, 0, alt),
        (Field::Alternate, end, ok),
        // A backup past the device: a table for a bigger disk.
        (Field::Alternate, dev, ok),
        (Field::Alternate, u64::MAX, alt),
        (Field::FirstUsable, 0, usable),
        (Field::FirstUsable, end, usable),
        (Field::FirstUsable, dev, usable),
        (Field::FirstUsable, u64::MAX, usable),
        (Field::LastUsable, 0, usable),
        // Reaching the backup header's own LBA.
        (Field::LastUsable, end, alt),
        (Field::LastUsable, dev, alt),
        (Field::LastUsable, u64::MAX, usable),
        (Field::EntriesLba, 0, entries),
        (Field::EntriesLba, end, entries),
        (Field::EntriesLba, dev, entries),
        (Field::EntriesLba, u64::MAX, entries),
        (Field::EntryCount, 0, count),
        (Field::EntryCount, size / 128, count),
        (Field::EntryCount, u64::MAX, count),
        (Field::EntrySize, 0, esize),
        (Field::EntrySize, size, esize),
        (Field::EntrySize, u64::MAX, esize),
    ];
    for (field, v, expect) in cases {
        let mut buf = good.clone();
        patch_header(&mut buf, ss, 1, |h| set(h, field, v));
        let r = validate_at(&buf, ss, 1);
        assert!(expect(&r), "{ss}: {field:?} = {v}: {r:?}");
        // Both run to an answer: no arithmetic on the field overflows.
        inspect(&mut cur(buf.clone()), ss, size).expect("inspect answers");
        let _ = run(buf, ss, &RepairOptions::default());
    }
    // A refused primary is restored from the intact backup.
    let mut buf = good.clone();
    patch_header(&mut buf, ss, 1, |h| set(h, Field::Alternate, u64::MAX));
    let (r, out) = run(buf, ss, &RepairOptions::default());
    assert!(r.is_ok(), "{r:?}");
    assert_eq!(validate_at(&out, ss, 1), Ok(()));
    assert_eq!(out, good);
}

#[test]
fn primary_header_fields_at_the_edges_at_512() {
    primary_fields_at_the_edges(512);
}

#[test]
fn primary_header_fields_at_the_edges_at_4096() {
    primary_fields_at_the_edges(4096);
}

#[test]
fn backup_header_alternate_at_the_edges() {
    use ondisk::HeaderDefect as D;
    for ss in [512u32, 4096] {
        let size = 64 * MIB;
        let dev = size / u64::from(ss);
        let good = image_on_device(ss, size, size);
        for v in [0, dev - 1, dev, u64::MAX] {
            let mut buf = good.clone();
            patch_header(&mut buf, ss, dev - 1, |h| set(h, Field::Alternate, v));
            let r = validate_at(&buf, ss, dev - 1);
            assert!(matches!(r, Err(D::BadAlternate { .. })), "{ss}: {v}: {r:?}");
            // The primary is intact: the backup is rebuilt from it.
            let (r, out) = run(buf, ss, &RepairOptions::default());
            assert!(r.is_ok(), "{ss}: {v}: {r:?}");
            assert_eq!(out, good, "{ss}: {v}");
        }
    }
}

#[test]
fn hybrid_mbr_with_an_alternate_lba_at_u64_max_is_not_an_overflow() {
    // The 0xEE entry does not cover the disk, so repair compares its end with the
    // image's old end, computed from the alternate LBA: u64::MAX + 1 before.
    let mut buf = image_on_device(512, 64 * MIB, 96 * MIB);
    let mut e = [0u8; 16];
    e[4] = 0xEF;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&(8 * 2048u32).to_le_bytes());
    let mut ee = [0u8; 16];
    ee[4] = 0xEE;
    ee[8..12].copy_from_slice(&1u32.to_le_bytes());
    ee[12..16].copy_from_slice(&1000u32.to_le_bytes());
    buf[446..462].copy_from_slice(&e);
    buf[462..478].copy_from_slice(&ee);
    patch_header(&mut buf, 512, 1, |h| set(h, Field::Alternate, u64::MAX));
    // Repair runs to an answer (it panicked in the debug profile, wrapped in release).
    let (r, _) = run(buf.clone(), 512, &RepairOptions::default());
    assert!(r.is_ok(), "{r:?}");
    // The primary is refused by name; the backup, at the image's old end, is found.
    let rep = inspect(&mut cur(buf), 512, 96 * MIB).unwrap();
    assert!(
        rep.problems.iter().any(|p| matches!(p,
            Problem::HeaderInvalid { lba: 1, reason, .. } if reason.contains("alternate header LBA"))),
        "{:?}",
        rep.problems
    );
}
