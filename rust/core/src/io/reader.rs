//! The memory-mapped reader. Opening checks the prefix and the whole header (spec section 7)
//! before any part is touched; parts are then zero-copy slices of the mapping.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::{MmapMut, MmapOptions};
use rayon::prelude::*;

use super::checksum::checksum;
use crate::codecs::Kernels;
use crate::error::{Error, Result};
use crate::format::header::{format_checksum, looks_like_safetensors, parse_prefix};
use crate::format::limits::PREFIX_LEN;
use crate::format::{Header, PartInfo, TensorInfo};
use crate::tensor;

/// Read the prefix and header of an open file and run every check of spec section 7 on them
/// (shared by [`QFile`] and the streaming reader). Returns (header, data_start, file length).
pub(crate) fn read_header(file: &File, path: &Path, lenient: bool) -> Result<(Header, u64, u64)> {
    let file_len = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat '{}'", path.display()), e))?
        .len();
    let read = |buf: &mut [u8], at: u64| {
        let mut f = file;
        f.seek(SeekFrom::Start(at))
            .and_then(|_| f.read_exact(buf))
            .map_err(|e| Error::io(format!("cannot read the header of '{}'", path.display()), e))
    };
    let mut prefix = [0u8; PREFIX_LEN];
    if file_len < PREFIX_LEN as u64 {
        parse_prefix(&[], file_len, lenient)?;
    }
    read(&mut prefix, 0)?;
    if looks_like_safetensors(&prefix, file_len) {
        return Err(Error::Format(format!(
            "'{0}' is a safetensors file, not a qtensors file: convert it with `qtensors convert {0}`",
            path.display()
        )));
    }
    let (major, minor, header_len) = parse_prefix(&prefix, file_len, lenient)?;
    let data_start = PREFIX_LEN as u64 + header_len;
    // header_len is at most MAX_HEADER_LEN and within the file (checked by parse_prefix).
    let mut json = vec![0u8; header_len as usize];
    read(&mut json, PREFIX_LEN as u64)?;
    let header = Header::parse(
        &json,
        (major, minor),
        data_start,
        file_len - data_start,
        lenient,
    )?;
    Ok((header, data_start, file_len))
}

pub struct QFile {
    /// Private copy-on-write mapping: views handed to Python may be written to without ever
    /// touching the file (and without the crash a read-only mapping gives on write).
    map: MmapMut,
    /// Kept open to `fstat` before each access: a mapped page past a new end of file faults.
    file: File,
    /// Size and modification time when opened; any change means the mapping may no longer hold
    /// the bytes the header describes.
    opened: (u64, Option<SystemTime>),
    header: Header,
    data_start: usize,
    path: PathBuf,
}

impl QFile {
    /// Open and validate. `lenient` accepts newer minor versions and unknown encodings (listing).
    pub fn open(path: &Path, lenient: bool) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
        let (header, data_start, file_len) = read_header(&file, path, lenient)?;
        let modified = stat(&file, path)?.modified().ok();
        // SAFETY: the mapping is private and exactly `file_len` bytes long. If another process
        // truncates the file while it is mapped, touching a page past the new end faults
        // (SIGBUS); every access through `QFile` first checks the size (`check_unchanged`),
        // which leaves only a truncation racing a call already in flight (see README).
        let map = unsafe { MmapOptions::new().len(file_len as usize).map_copy(&file) }
            .map_err(|e| Error::io(format!("cannot map '{}'", path.display()), e))?;
        Ok(QFile {
            map,
            file,
            opened: (file_len, modified),
            header,
            data_start: data_start as usize,
            path: path.to_path_buf(),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Absolute file offset of the data section.
    pub fn data_start(&self) -> usize {
        self.data_start
    }

    /// Absolute file offset of a part.
    pub fn part_offset(&self, p: &PartInfo) -> usize {
        self.data_start + p.offset as usize
    }

    /// Fail cleanly when the file was truncated or rewritten in place since it was opened: the
    /// mapping would fault (SIGBUS) past the new end, or hold bytes the header does not describe.
    /// One `fstat`; every method that touches the mapping calls it first, and so must callers of
    /// [`part_bytes`](Self::part_bytes) and of the mapping's base pointer.
    pub fn check_unchanged(&self) -> Result<()> {
        let meta = stat(&self.file, &self.path)?;
        let (len, modified) = self.opened;
        if meta.len() < len {
            return Err(Error::Format(format!(
                "file '{}' was truncated after it was opened ({len} bytes then, {} now): reopen it",
                self.path.display(),
                meta.len()
            )));
        }
        if meta.len() != len || meta.modified().ok() != modified {
            return Err(Error::Format(format!(
                "file '{}' was modified after it was opened (its size or modification time changed): reopen it",
                self.path.display()
            )));
        }
        Ok(())
    }

    /// The bytes of part `p`. Unchecked: call [`check_unchanged`](Self::check_unchanged) first.
    pub fn part_bytes(&self, p: &PartInfo) -> &[u8] {
        let start = self.part_offset(p);
        &self.map[start..start + p.length as usize]
    }

    /// Base pointer of the whole mapping (for buffer-protocol views).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.header.get(name).ok_or_else(|| {
            Error::Invalid(format!(
                "no tensor named '{name}' in '{}'",
                self.path.display()
            ))
        })
    }

    pub fn verify_tensor(&self, t: &TensorInfo) -> Result<()> {
        self.check_unchanged()?;
        self.compare_checksums(t)
    }

    /// Verify every part's checksum, in parallel; reports the first corrupted tensor in file order.
    pub fn verify(&self) -> Result<()> {
        self.check_unchanged()?;
        let results: Vec<Result<()>> = self
            .header
            .tensors
            .par_iter()
            .map(|t| {
                // Checked again before each tensor with bytes: a truncation during a long verify
                // is caught at the next tensor instead of faulting.
                if t.parts.iter().any(|p| p.length > 0) {
                    self.check_unchanged()?;
                }
                self.compare_checksums(t)
            })
            .collect();
        results.into_iter().collect()
    }

    fn compare_checksums(&self, t: &TensorInfo) -> Result<()> {
        for p in &t.parts {
            let got = checksum(self.part_bytes(p));
            if got != p.checksum {
                return Err(Error::Checksum(format!(
                    "tensor '{}' part '{}': checksum mismatch (file says {}, bytes hash to {}): the file is corrupted",
                    t.name,
                    p.name,
                    format_checksum(p.checksum),
                    format_checksum(got)
                )));
            }
        }
        Ok(())
    }

    /// Decode tensor `t` into `out` (bytes of its logical dtype).
    pub fn decode(&self, k: &Kernels, t: &TensorInfo, out: &mut [u8]) -> Result<()> {
        self.check_unchanged()?;
        tensor::decode(k, t, &self.parts_of(t), out)
    }

    /// Decode the box `ranges` of tensor `t` into `out` (see [`tensor::decode_region`]).
    pub fn decode_region(
        &self,
        k: &Kernels,
        t: &TensorInfo,
        ranges: &[Range<u64>],
        out: &mut [u8],
    ) -> Result<()> {
        self.check_unchanged()?;
        tensor::decode_region(k, t, &self.parts_of(t), ranges, out)
    }

    /// The decoded bytes of part `part` of `t` in a new buffer (decompressed if compressed).
    pub fn decoded_part(&self, t: &TensorInfo, part: usize) -> Result<Vec<u8>> {
        self.check_unchanged()?;
        let p = t
            .parts
            .get(part)
            .ok_or_else(|| Error::Invalid(format!("tensor '{}' has no part #{part}", t.name)))?;
        tensor::decoded_part(t, part, self.part_bytes(p))
    }

    fn parts_of(&self, t: &TensorInfo) -> Vec<&[u8]> {
        t.parts.iter().map(|p| self.part_bytes(p)).collect()
    }
}

fn stat(file: &File, path: &Path) -> Result<std::fs::Metadata> {
    file.metadata()
        .map_err(|e| Error::io(format!("cannot stat '{}'", path.display()), e))
}
