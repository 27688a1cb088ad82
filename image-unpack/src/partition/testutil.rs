//! Test helpers: build GPT disks in memory, and do to them what
//! `sgdisk -e` does to a 512-byte image on a 4K device.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::ondisk::{
    guid_from_str, header_crc, GptEntry, GptHeader, Mbr, GPT_HEADER_SIZE, GPT_REVISION,
    GPT_SIGNATURE, MBR_SIGNATURE, MBR_TYPE_GPT_PROTECTIVE,
};

pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

#[derive(Clone, Debug)]
pub struct Part {
    pub type_guid: &'static str,
    pub first: u64,
    pub last: u64,
    pub name: &'static str,
}

pub fn esp_and_root(ss: u32, size: u64) -> Vec<Part> {
    let ss = u64::from(ss);
    let mib = (1 << 20) / ss;
    let last_usable = size / ss - 1 - 16384 / ss - 1;
    vec![
        Part {
            type_guid: ESP,
            first: mib,
            last: 9 * mib - 1,
            name: "ESP",
        },
        Part {
            type_guid: LINUX,
            first: 9 * mib,
            last: last_usable,
            name: "root",
        },
    ]
}

fn entries_bytes(parts: &[Part], n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n * 128];
    for (i, p) in parts.iter().enumerate() {
        let mut name = [U16::new(0); 36];
        for (d, c) in name.iter_mut().zip(p.name.encode_utf16()) {
            *d = U16::new(c);
        }
        let mut uniq = [0u8; 16];
        for (j, b) in uniq.iter_mut().enumerate() {
            *b = (i as u8 + 1).wrapping_mul(31).wrapping_add(j as u8 * 7);
        }
        let e = GptEntry {
            type_guid: guid_from_str(p.type_guid),
            unique_guid: uniq,
            starting_lba: U64::new(p.first),
            ending_lba: U64::new(p.last),
            attributes: U64::new(0),
            name,
        };
        out[i * 128..(i + 1) * 128].copy_from_slice(e.as_bytes());
    }
    out
}

#[allow(clippy::too_many_arguments)] // mirrors the header fields one to one
pub fn header(
    ss: u32,
    my: u64,
    alt: u64,
    first: u64,
    last: u64,
    pel: u64,
    ecrc: u32,
    n: u32,
) -> Vec<u8> {
    let mut h = GptHeader {
        signature: GPT_SIGNATURE,
        revision: U32::new(GPT_REVISION),
        header_size: U32::new(GPT_HEADER_SIZE as u32),
        header_crc32: U32::new(0),
        reserved: U32::new(0),
        my_lba: U64::new(my),
        alternate_lba: U64::new(alt),
        first_usable_lba: U64::new(first),
        last_usable_lba: U64::new(last),
        disk_guid: guid_from_str("5C8560A4-5A54-4981-AF59-9B6B2674C04B"),
        partition_entry_lba: U64::new(pel),
        num_partition_entries: U32::new(n),
        partition_entry_size: U32::new(128),
        partition_entry_array_crc32: U32::new(ecrc),
    };
    let mut raw = vec![0u8; ss as usize];
    raw[..92].copy_from_slice(h.as_bytes());
    h.header_crc32 = U32::new(header_crc(&raw, 92).unwrap());
    raw[..92].copy_from_slice(h.as_bytes());
    raw
}

pub fn put(buf: &mut [u8], off: u64, bytes: &[u8]) {
    let off = off as usize;
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// Writes a protective MBR and both GPT copies for a disk of `size` bytes
/// (which may be smaller than `buf`, like an image on a bigger device).
pub fn write_gpt(buf: &mut [u8], ss: u32, size: u64, parts: &[Part]) {
    let s = u64::from(ss);
    let sectors = size / s;
    let last = sectors - 1;
    let es = 16384 / s;
    let entries = entries_bytes(parts, 128);
    let ecrc = crc32fast::hash(&entries);
    let mut mbr = Mbr::read_from_bytes(&[0u8; 512][..]).unwrap();
    mbr.partitions[0].os_type = MBR_TYPE_GPT_PROTECTIVE;
    mbr.partitions[0].start_chs = [0, 2, 0];
    mbr.partitions[0].end_chs = [0xff, 0xff, 0xff];
    mbr.partitions[0].starting_lba = U32::new(1);
    mbr.partitions[0].size_in_lba = U32::new(u32::try_from(sectors - 1).unwrap_or(u32::MAX));
    mbr.signature = U16::new(MBR_SIGNATURE);
    put(buf, 0, mbr.as_bytes());
    let (first, lastu) = (2 + es, last - es - 1);
    put(buf, s, &header(ss, 1, last, first, lastu, 2, ecrc, 128));
    put(buf, 2 * s, &entries);
    put(buf, (last - es) * s, &entries);
    put(
        buf,
        last * s,
        &header(ss, last, 1, first, lastu, last - es, ecrc, 128),
    );
}

/// A 512-byte-sector image of `image` bytes with an ESP and a root partition,
/// on a zeroed device of `dev` bytes.
pub fn image_on_device(ss: u32, image: u64, dev: u64) -> Vec<u8> {
    let mut buf = vec![0u8; dev as usize];
    write_gpt(&mut buf, ss, image, &esp_and_root(ss, image));
    buf
}

/// What `sgdisk -e /dev/loopN` writes when the loop device has 4096-byte
/// sectors and holds a 512-byte image (measured; docs/sgdisk-e-accident.md):
/// LBA 0 rewritten (boot code kept, disk signature zeroed, 0xEE entry sized
/// for 4K sectors, bytes 512..4096 zeroed), an empty 4K GPT at 4096 with
/// zeroed entries at 8192..24576, and its backup in the last 5 4K sectors.
pub fn simulate_sgdisk_e_on_4k(buf: &mut [u8]) {
    let len = buf.len() as u64;
    let sectors = len / 4096;
    let last = sectors - 1;
    let mut mbr = Mbr::read_from_bytes(&buf[..512]).unwrap();
    mbr.disk_signature = U32::new(0);
    for p in mbr.partitions.iter_mut() {
        *p = Default::default();
    }
    mbr.partitions[0].os_type = MBR_TYPE_GPT_PROTECTIVE;
    mbr.partitions[0].start_chs = [0, 2, 0];
    mbr.partitions[0].end_chs = [0xff, 0xff, 0xff];
    mbr.partitions[0].starting_lba = U32::new(1);
    mbr.partitions[0].size_in_lba = U32::new((sectors - 1) as u32);
    mbr.signature = U16::new(MBR_SIGNATURE);
    let mut lba0 = vec![0u8; 4096];
    lba0[..512].copy_from_slice(mbr.as_bytes());
    put(buf, 0, &lba0);
    let entries = vec![0u8; 16384];
    let ecrc = crc32fast::hash(&entries);
    put(buf, 4096, &header(4096, 1, last, 6, last - 5, 2, ecrc, 128));
    put(buf, 8192, &entries);
    put(buf, (last - 4) * 4096, &entries);
    put(
        buf,
        last * 4096,
        &header(4096, last, 1, 6, last - 5, last - 4, ecrc, 128),
    );
}
