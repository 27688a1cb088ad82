//! Incus images: unified tarballs (`metadata.yaml` + `rootfs.img` in one tar, plain or
//! gzip/xz/zstd compressed) and split images (a metadata tarball beside the rootfs file).
//!
//! ```text
//!  plain tar ───────► rootfs.img used in place (SliceReader over the tar, no copy)
//!  gz / xz / zstd ──► rootfs.img streamed into an unlinked scratch file (holes kept)
//!                          └──► detect: qcow2 or raw ──► inner source
//! ```
//!
//! Nothing is ever extracted to a path taken from the archive. Every entry's path is
//! checked all the same: an archive with absolute paths or `..` components is refused,
//! as is a `rootfs.img` that is not a regular file.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::detect::{read_up_to, QCOW2_MAGIC};
use super::{
    detect, Detected, Extent, FileReader, ImageSource, OpenOptions, ProbeInfo, Qcow2Header,
    Qcow2Source, RawSource, ReadAt, ReadAtCursor, SliceReader, SourceError, SourceFormat,
    TarCompression,
};

/// Largest `metadata.yaml` read.
const MAX_METADATA: u64 = 1 << 20;
/// Copy buffer for extraction; all-zero chunks of this size become holes.
const COPY_CHUNK: usize = 1 << 20;

/// What `metadata.yaml` says, parsed minimally (no YAML library).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct IncusMetadata {
    /// `architecture:` at the top level.
    pub architecture: Option<String>,
    /// `description:` under `properties:`.
    pub description: Option<String>,
}

impl IncusMetadata {
    /// Extracts the two fields from the text of `metadata.yaml`.
    pub fn parse(text: &str) -> Self {
        let mut md = IncusMetadata::default();
        let mut in_properties = false;
        for line in text.lines() {
            let indented = line.starts_with([' ', '\t']);
            let t = line.trim();
            if !indented {
                in_properties = t == "properties:";
                if let Some(v) = t.strip_prefix("architecture:") {
                    md.architecture = Some(unquote(v));
                }
            } else if in_properties {
                if let Some(v) = t.strip_prefix("description:") {
                    md.description.get_or_insert_with(|| unquote(v));
                }
            }
        }
        md
    }
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    let v = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v);
    v.to_string()
}

/// An Incus image: the disk inside plus where it came from.
#[derive(Debug)]
pub struct IncusSource {
    inner: Box<dyn ImageSource>,
    layout: &'static str,
    compression: TarCompression,
    metadata: Option<IncusMetadata>,
}

impl ImageSource for IncusSource {
    fn format(&self) -> SourceFormat {
        SourceFormat::Incus {
            layout: self.layout.into(),
            compression: self.compression.name().into(),
            inner: Box::new(self.inner.format()),
        }
    }
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn extents(&self) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        self.inner.extents()
    }
    fn extents_from(
        &self,
        guest_offset: u64,
    ) -> Box<dyn Iterator<Item = Result<Extent, SourceError>> + Send + '_> {
        self.inner.extents_from(guest_offset)
    }
    fn max_extent_len(&self) -> u64 {
        self.inner.max_extent_len()
    }
    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<(), SourceError> {
        self.inner.read_extent(extent, buf)
    }
    fn incus_metadata(&self) -> Option<&IncusMetadata> {
        self.metadata.as_ref()
    }
}

fn tar_err(e: io::Error) -> SourceError {
    SourceError::Corrupt(format!("tar archive: {e}"))
}

/// Where an entry is: its normalised path, or a refusal for unsafe paths.
fn entry_name(path: &Path) -> Result<PathBuf, SourceError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(SourceError::Unsupported(format!(
                    "tar entry \"{}\" has a `..` component",
                    path.display()
                )))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(SourceError::Unsupported(format!(
                    "tar entry \"{}\" has an absolute path",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

/// The archive's `rootfs.img`, as found by [`scan`].
#[derive(Debug, Clone, Copy)]
enum Rootfs {
    /// A regular member whose bytes are contiguous at `offset` in the archive.
    Contiguous { offset: u64, size: u64 },
    /// A GNU sparse member: only readable through the tar stream.
    Sparse,
}

struct Scan {
    metadata: Option<IncusMetadata>,
    rootfs: Option<Rootfs>,
}

/// Walks every entry: checks paths, reads `metadata.yaml`, and hands `rootfs.img`
/// (checked to be a regular file) to `on_rootfs`, once. A seekable archive skips
/// member data without reading it.
fn scan<R: Read + io::Seek>(
    archive: &mut ::tar::Archive<R>,
    on_rootfs: &mut dyn FnMut(&mut dyn Read, Rootfs) -> Result<bool, SourceError>,
) -> Result<Scan, SourceError> {
    scan_entries(archive.entries_with_seek().map_err(tar_err)?, on_rootfs)
}

fn scan_entries<'a, R: Read + 'a>(
    entries: ::tar::Entries<'a, R>,
    on_rootfs: &mut dyn FnMut(&mut dyn Read, Rootfs) -> Result<bool, SourceError>,
) -> Result<Scan, SourceError> {
    let mut out = Scan {
        metadata: None,
        rootfs: None,
    };
    for entry in entries {
        let mut entry = entry.map_err(tar_err)?;
        let path = entry.path().map_err(tar_err)?.into_owned();
        let name = entry_name(&path)?;
        let ty = entry.header().entry_type();
        if name == Path::new("metadata.yaml") && ty.is_file() {
            let mut text = String::new();
            (&mut entry)
                .take(MAX_METADATA)
                .read_to_string(&mut text)
                .map_err(|e| SourceError::Corrupt(format!("metadata.yaml: {e}")))?;
            out.metadata = Some(IncusMetadata::parse(&text));
        } else if name == Path::new("rootfs.img") {
            if out.rootfs.is_some() {
                return Err(SourceError::Corrupt(
                    "tar archive holds two rootfs.img entries".into(),
                ));
            }
            let kind = match ty {
                t if t.is_file() => None,
                t if t.is_gnu_sparse() => None,
                t if t.is_symlink() => Some("a symbolic link"),
                t if t.is_hard_link() => Some("a hard link"),
                t if t.is_character_special() || t.is_block_special() => Some("a device"),
                t if t.is_dir() => Some("a directory"),
                t if t.is_fifo() => Some("a FIFO"),
                _ => Some("not a regular file"),
            };
            if let Some(kind) = kind {
                return Err(SourceError::Unsupported(format!(
                    "rootfs.img in the tarball is {kind}, not a regular file"
                )));
            }
            let size = entry.size();
            let rootfs = if ty.is_gnu_sparse() {
                Rootfs::Sparse
            } else {
                Rootfs::Contiguous {
                    offset: entry.raw_file_position(),
                    size,
                }
            };
            out.rootfs = Some(rootfs);
            if !on_rootfs(&mut entry, rootfs)? {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

/// Opens a unified Incus tarball held by `reader`.
pub(crate) fn open_unified(
    reader: Arc<dyn ReadAt>,
    compression: TarCompression,
    opts: &OpenOptions,
) -> Result<Box<dyn ImageSource>, SourceError> {
    let mut extracted: Option<File> = None;
    let scratch = opts.scratch_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scanned = {
        let cursor = ReadAtCursor::new(reader.as_ref());
        if compression == TarCompression::None {
            let mut archive = ::tar::Archive::new(cursor);
            scan(&mut archive, &mut |_, _| Ok(true))?
        } else {
            let decoder = compression.decoder(cursor).map_err(tar_err)?;
            let mut archive = ::tar::Archive::new(decoder);
            let entries = archive.entries().map_err(tar_err)?;
            scan_entries(entries, &mut |r, _| {
                extracted = Some(extract(r, &scratch)?);
                Ok(true)
            })?
        }
    };
    let Some(rootfs) = scanned.rootfs else {
        return Err(no_rootfs(scanned.metadata.is_some()));
    };
    let inner = match (extracted, rootfs) {
        (Some(file), _) => open_disk_file(file, &scratch)?,
        (None, Rootfs::Contiguous { offset, size }) => {
            let slice = SliceReader::new(reader.clone(), offset, size).map_err(tar_err)?;
            open_disk(Arc::new(slice), None)?
        }
        (None, Rootfs::Sparse) => {
            // A sparse member is not contiguous in the archive: extract it.
            let mut archive = ::tar::Archive::new(ReadAtCursor::new(reader.as_ref()));
            let mut file = None;
            scan(&mut archive, &mut |r, _| {
                file = Some(extract(r, &scratch)?);
                Ok(false)
            })?;
            let file = file.ok_or_else(|| no_rootfs(false))?;
            open_disk_file(file, &scratch)?
        }
    };
    Ok(Box::new(IncusSource {
        inner,
        layout: "unified",
        compression,
        metadata: scanned.metadata,
    }))
}

fn no_rootfs(has_metadata: bool) -> SourceError {
    if has_metadata {
        SourceError::Unsupported(
            "tarball holds metadata.yaml but no rootfs.img: it is the metadata half of a split \
             image; pass the rootfs file as the image and this tarball as its metadata"
                .into(),
        )
    } else {
        SourceError::Unsupported("tarball holds no rootfs.img; it is not a VM image".into())
    }
}

/// Opens the disk inside an Incus image: qcow2 or raw, nothing else.
fn open_disk(
    reader: Arc<dyn ReadAt>,
    file: Option<File>,
) -> Result<Box<dyn ImageSource>, SourceError> {
    match detect(reader.as_ref()) {
        Ok(Detected::Qcow2) => Ok(Box::new(Qcow2Source::open_with_holes(reader, file)?)),
        Ok(Detected::Raw) => Ok(Box::new(RawSource::new(reader, file))),
        Ok(Detected::Tar(_)) | Err(SourceError::Unsupported(_)) => Err(SourceError::Unsupported(
            "rootfs.img is itself an archive or compressed, not a disk".into(),
        )),
        Err(e) => Err(e),
    }
}

fn open_disk_file(file: File, scratch: &Path) -> Result<Box<dyn ImageSource>, SourceError> {
    let holes = file.try_clone().ok();
    let reader = FileReader::new(file)
        .map_err(|e| SourceError::io("reading extracted image in", scratch, e))?;
    open_disk(Arc::new(reader), holes)
}

/// Copies a member into an unlinked temporary file in `dir`, leaving holes for
/// all-zero chunks.
fn extract(r: &mut dyn Read, dir: &Path) -> Result<File, SourceError> {
    let file = tempfile::tempfile_in(dir)
        .map_err(|e| SourceError::io("creating scratch file in", dir, e))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut pos = 0u64;
    loop {
        let n = read_up_to(&mut *r, &mut buf).map_err(tar_err)?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        if chunk.iter().any(|&b| b != 0) {
            file.write_all_at(chunk, pos)
                .map_err(|e| SourceError::io("writing scratch file in", dir, e))?;
        }
        pos += n as u64;
    }
    file.set_len(pos)
        .map_err(|e| SourceError::io("sizing scratch file in", dir, e))?;
    Ok(file)
}

/// Format and virtual size of a unified tarball, reading only the head of `rootfs.img`.
pub(crate) fn probe_unified(
    reader: Arc<dyn ReadAt>,
    compression: TarCompression,
) -> Result<ProbeInfo, SourceError> {
    let mut found: Option<(SourceFormat, u64)> = None;
    let decoder = compression
        .decoder(ReadAtCursor::new(reader.as_ref()))
        .map_err(tar_err)?;
    let mut archive = ::tar::Archive::new(decoder);
    let entries = archive.entries().map_err(tar_err)?;
    let scanned = scan_entries(entries, &mut |r, rootfs| {
        let size = match rootfs {
            Rootfs::Contiguous { size, .. } => size,
            Rootfs::Sparse => 0,
        };
        let mut head = vec![0u8; (2usize << 20).min(size as usize).max(512)];
        let n = read_up_to(r, &mut head).map_err(tar_err)?;
        head.truncate(n);
        found = Some(if head.starts_with(&QCOW2_MAGIC) {
            let h = Qcow2Header::parse(&head, size)?;
            (h.format(), h.virtual_size)
        } else {
            (SourceFormat::Raw, size)
        });
        Ok(false)
    })?;
    let Some((inner, virtual_size)) = found else {
        return Err(no_rootfs(scanned.metadata.is_some()));
    };
    Ok(ProbeInfo {
        format: SourceFormat::Incus {
            layout: "unified".into(),
            compression: compression.name().into(),
            inner: Box::new(inner),
        },
        virtual_size,
    })
}

/// Reads the metadata tarball of a split image.
pub(crate) fn read_metadata_tarball(
    path: &Path,
) -> Result<(TarCompression, IncusMetadata), SourceError> {
    let file = File::open(path).map_err(|e| SourceError::io("opening", path, e))?;
    let reader = FileReader::new(file).map_err(|e| SourceError::io("reading", path, e))?;
    let compression = match detect(&reader) {
        Ok(Detected::Tar(c)) => c,
        Ok(_) | Err(SourceError::Unsupported(_)) => {
            return Err(SourceError::Unsupported(format!(
                "metadata {} is not a tarball",
                path.display()
            )))
        }
        Err(e) => return Err(e),
    };
    let decoder = compression
        .decoder(ReadAtCursor::new(&reader))
        .map_err(tar_err)?;
    let mut archive = ::tar::Archive::new(decoder);
    let entries = archive.entries().map_err(tar_err)?;
    let scanned = scan_entries(entries, &mut |_, _| Ok(true))?;
    match scanned.metadata {
        Some(md) => Ok((compression, md)),
        None => Err(SourceError::Unsupported(format!(
            "metadata tarball {} holds no metadata.yaml",
            path.display()
        ))),
    }
}

/// Wraps the rootfs of a split image with its metadata tarball.
pub(crate) fn open_split(
    inner: Box<dyn ImageSource>,
    metadata: &Path,
) -> Result<Box<dyn ImageSource>, SourceError> {
    if matches!(inner.format(), SourceFormat::Incus { .. }) {
        return Err(SourceError::Unsupported(
            "a split image's rootfs must be a disk (qcow2 or raw), not a tarball".into(),
        ));
    }
    let (compression, md) = read_metadata_tarball(metadata)?;
    Ok(Box::new(IncusSource {
        inner,
        layout: "split",
        compression,
        metadata: Some(md),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{open_reader, MemReader};
    use std::io::Write;

    fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = ::tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = ::tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(::tar::EntryType::Regular);
            // Write the name bytes directly so unsafe names can be built.
            let nb = name.as_bytes();
            h.as_old_mut().name[..nb.len()].copy_from_slice(nb);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn disk() -> Vec<u8> {
        (0..3u32 << 20)
            .map(|i| {
                if (1 << 20..2 << 20).contains(&i) {
                    0
                } else {
                    (i % 253) as u8
                }
            })
            .collect()
    }

    fn assemble(src: &dyn ImageSource) -> Vec<u8> {
        let mut out = vec![0u8; src.virtual_size() as usize];
        for e in src.extents() {
            let e = e.unwrap();
            let r = e.guest_offset as usize..(e.guest_offset + e.len) as usize;
            src.read_extent(&e, &mut out[r]).unwrap();
        }
        out
    }

    const META: &[u8] = b"architecture: x86_64\ncreation_date: 1\nproperties:\n  description: \"Debian 12\"\n  os: debian\n";

    #[test]
    fn plain_unified_tarball_is_used_in_place() {
        let d = disk();
        let t = tar_with(&[("metadata.yaml", META), ("./rootfs.img", &d)]);
        let src = open_reader(Arc::new(MemReader::new(t)), &OpenOptions::default()).unwrap();
        assert_eq!(src.virtual_size(), d.len() as u64);
        assert_eq!(assemble(src.as_ref()), d);
        let md = src.incus_metadata().unwrap();
        assert_eq!(md.architecture.as_deref(), Some("x86_64"));
        assert_eq!(md.description.as_deref(), Some("Debian 12"));
        assert!(
            matches!(src.format(), SourceFormat::Incus { ref layout, .. } if layout == "unified")
        );
    }

    #[test]
    fn gzip_unified_tarball_is_extracted() {
        let d = disk();
        let t = tar_with(&[("metadata.yaml", META), ("rootfs.img", &d)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        let src = open_reader(
            Arc::new(MemReader::new(gz.finish().unwrap())),
            &OpenOptions::default(),
        )
        .unwrap();
        assert_eq!(assemble(src.as_ref()), d);
        assert_eq!(
            src.format().to_string(),
            "incus unified image (gzip tarball) holding raw"
        );
    }

    #[test]
    fn parent_dir_entry_is_refused() {
        let t = tar_with(&[("../evil", b"x"), ("rootfs.img", &[0u8; 512])]);
        let e = open_reader(Arc::new(MemReader::new(t)), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("`..`"), "{e}");
    }

    #[test]
    fn absolute_entry_is_refused() {
        let t = tar_with(&[("/etc/passwd", b"x"), ("rootfs.img", &[0u8; 512])]);
        let e = open_reader(Arc::new(MemReader::new(t)), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
    }

    #[test]
    fn symlink_rootfs_is_refused() {
        let mut b = ::tar::Builder::new(Vec::new());
        let mut h = ::tar::Header::new_gnu();
        h.set_entry_type(::tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, "rootfs.img", "/dev/sda").unwrap();
        let t = b.into_inner().unwrap();
        let e = open_reader(Arc::new(MemReader::new(t)), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("symbolic link"), "{e}");
    }

    #[test]
    fn metadata_only_tarball_points_to_split_usage() {
        let t = tar_with(&[("metadata.yaml", META)]);
        let e = open_reader(Arc::new(MemReader::new(t)), &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("split"), "{e}");
    }

    #[test]
    fn metadata_parse_is_minimal_and_tolerant() {
        let md = IncusMetadata::parse(
            "foo: 1\nproperties:\n  os: x\n  description: 'A b'\narchitecture: aarch64\n",
        );
        assert_eq!(md.architecture.as_deref(), Some("aarch64"));
        assert_eq!(md.description.as_deref(), Some("A b"));
        assert_eq!(IncusMetadata::parse(""), IncusMetadata::default());
    }
}
