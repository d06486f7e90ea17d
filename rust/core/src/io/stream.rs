//! Streaming reads: whole tensors copied out of a file with large sequential reads, for loaders
//! that move weights from disk to an accelerator through their own (pinned) buffers.
//!
//! Unlike [`QFile`](super::QFile), a [`StreamFile`] reads through its own file descriptor instead
//! of a memory map (except in [`ReadMode::Mmap`], kept to measure against): a file truncated or
//! rewritten while it is streamed gives an error naming the tensor, never a `SIGBUS`. The header
//! is read and validated by the same code as `QFile::open` (spec section 7) before any part.
//!
//! A tensor is read into one buffer laid out by [`TensorLayout`]: its parts, grouped into
//! segments of parts less than [`COALESCE_GAP`] apart (read with the bytes between them), and
//! segments farther apart read separately, so a buffer never holds more than the parts plus small
//! gaps, however far apart a file places them. The parts of one tensor are contiguous in files
//! written by qtensors: then the layout is one segment and the buffer is the tensor's byte range.
//! [`StreamFile::read`] copies any piece of a tensor's buffer, split into `chunk`-byte reads
//! spread over up to `threads` threads, and can check the part checksums on the bytes it read
//! (parts read piecewise, in order, are hashed incrementally).
//!
//! A compressed part (spec 2.1) is a segment of its own whose buffer holds the *decoded* bytes:
//! a read reads the stored bytes of just the chunks that cover the piece asked for (the same
//! threaded reads), decompresses them in parallel and checks the checksum on the stored bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
#[cfg(target_os = "linux")]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use memmap2::{Advice, Mmap, MmapOptions};
use xxhash_rust::xxh3::Xxh3Default;

use rayon::prelude::*;

use super::checksum::checksum;
use super::reader::read_header;
use crate::codecs::compress;
use crate::error::{Error, Result};
use crate::format::header::format_checksum;
use crate::format::{Header, TensorInfo};

/// How [`StreamFile`] gets bytes off the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// `pread` through the page cache, with `posix_fadvise(SEQUENTIAL)` and `WILLNEED` read-ahead.
    Pread,
    /// `pread` on a descriptor opened with `O_DIRECT` (no page cache). Falls back to `Pread` where
    /// the file system refuses `O_DIRECT` (tmpfs).
    Direct,
    /// Copies out of a read-only memory map with `madvise(SEQUENTIAL)` and `WILLNEED`.
    Mmap,
    /// What the page cache holds is copied from it (`mincore` tells which); the rest is read
    /// with `O_DIRECT` straight into the buffer, without filling the cache: a cold read costs
    /// the kernel no page-cache work and a warm one still reads memory. `Pread` where
    /// `O_DIRECT` is refused.
    Auto,
}

impl ReadMode {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "pread" => Ok(ReadMode::Pread),
            "direct" => Ok(ReadMode::Direct),
            "mmap" => Ok(ReadMode::Mmap),
            "auto" => Ok(ReadMode::Auto),
            other => Err(Error::Invalid(format!(
                "read mode '{other}' is not one of 'pread', 'direct', 'mmap', 'auto'"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReadMode::Pread => "pread",
            ReadMode::Direct => "direct",
            ReadMode::Mmap => "mmap",
            ReadMode::Auto => "auto",
        }
    }
}

const EINVAL: i32 = 22;

/// Block size that `O_DIRECT` offsets, lengths and buffer addresses are aligned to.
pub const DIRECT_ALIGN: u64 = 4096;
/// Default size of one read system call.
pub const DEFAULT_CHUNK: usize = 8 << 20;

/// Parts of one tensor closer than this are read as one segment, with the bytes between them;
/// farther apart, each is read alone (reading a gap costs more than one more system call).
pub const COALESCE_GAP: u64 = 1 << 20;

/// One contiguous file range of a tensor and where it lands in the tensor's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Absolute file offset.
    pub file: u64,
    /// Bytes in the buffer (decoded bytes, for a compressed part).
    pub len: u64,
    /// Offset in the buffer.
    pub buf: u64,
    /// For a compressed part: its index in the tensor's parts (the segment is that part alone).
    pub compressed: Option<usize>,
}

/// Where each part of a tensor lies in the buffer that [`StreamFile::read`] fills.
///
/// Each segment keeps its file offset's phase modulo [`DIRECT_ALIGN`] relative to the first one
/// (at most 4 KiB - 1 bytes of padding per segment): parts stay as aligned in the buffer as in
/// the file (typed views of them work), and a buffer placed at the first segment's phase gets
/// block-aligned `O_DIRECT` reads for every segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    /// In file order.
    pub segments: Vec<Segment>,
    /// (part name, buffer offset, length), in the header's order of parts.
    pub parts: Vec<(String, u64, u64)>,
    /// Bytes of the buffer (padding between segments included).
    pub len: u64,
}

impl TensorLayout {
    fn of(t: &TensorInfo, data_start: u64) -> Self {
        let mut order: Vec<usize> = (0..t.parts.len()).collect();
        order.sort_by_key(|&i| (t.parts[i].offset, t.parts[i].length));
        let mut segments: Vec<Segment> = Vec::new();
        let mut part_buf = vec![0u64; t.parts.len()];
        for i in order {
            let p = &t.parts[i];
            let (start, end) = (data_start + p.offset, data_start + p.offset + p.length);
            let joined = segments.last_mut().filter(|s| {
                p.compression.is_none()
                    && s.compressed.is_none()
                    && start.saturating_sub(s.file + s.len) < COALESCE_GAP
            });
            let seg = match joined {
                Some(s) => {
                    s.len = s.len.max(end - s.file);
                    *s
                }
                None if p.compression.is_some() => {
                    // Decoded bytes: no file phase to keep, 64-byte aligned for typed views.
                    let after = segments.last().map_or(0, |l| l.buf + l.len);
                    let s = Segment {
                        file: start,
                        len: p.decoded_len(),
                        buf: after.div_ceil(64) * 64,
                        compressed: Some(i),
                    };
                    segments.push(s);
                    part_buf[i] = s.buf;
                    continue;
                }
                None => {
                    let buf = match (segments.first(), segments.last()) {
                        (Some(first), Some(last)) if p.length > 0 => {
                            let after = last.buf + last.len;
                            let phase = (start - first.file) % DIRECT_ALIGN;
                            after + (phase + DIRECT_ALIGN - after % DIRECT_ALIGN) % DIRECT_ALIGN
                        }
                        (_, Some(last)) => last.buf + last.len,
                        _ => 0,
                    };
                    let s = Segment {
                        file: start,
                        len: p.length,
                        buf,
                        compressed: None,
                    };
                    segments.push(s);
                    s
                }
            };
            part_buf[i] = seg.buf + (start - seg.file);
        }
        let len = segments.last().map_or(0, |s| s.buf + s.len);
        let parts = t
            .parts
            .iter()
            .zip(part_buf)
            .map(|(p, b)| (p.name.clone(), b, p.decoded_len()))
            .collect();
        TensorLayout {
            segments,
            parts,
            len,
        }
    }
}

/// A piece of a read: its absolute file offset and where its bytes go.
type Piece<'a> = (u64, &'a mut [u8]);

/// A part being hashed across several reads.
struct PartialHash {
    next: u64,
    hasher: Box<Xxh3Default>,
    /// Hashed and checked to the end (kept for compressed parts, see `verify_piece`).
    done: bool,
}

/// A validated qtensors file opened for streaming reads.
pub struct StreamFile {
    file: File,
    direct: Option<File>,
    map: Option<Mmap>,
    header: Header,
    data_start: u64,
    file_len: u64,
    modified: Option<SystemTime>,
    path: PathBuf,
    mode: ReadMode,
    threads: usize,
    chunk: usize,
    hashes: Mutex<HashMap<(usize, usize), PartialHash>>,
}

/// Strided rows with gaps up to a page between them are read in spans, gaps included.
const PAGE_GAP: u64 = 4096;

/// Where a piece starting at decoded offset `from` begins inside the chunk starting at `cs`.
fn pos_in_chunk(from: u64, cs: u64) -> u64 {
    from.saturating_sub(cs)
}

fn align_down(x: u64) -> u64 {
    x & !(DIRECT_ALIGN - 1)
}

fn align_up(x: u64) -> u64 {
    align_down(x + DIRECT_ALIGN - 1)
}

impl StreamFile {
    /// Open and validate. `threads` (≥ 1) reads run at once within one [`read`](Self::read) call,
    /// each of at most `chunk` bytes (rounded up to 4 KiB).
    pub fn open(path: &Path, mode: ReadMode, threads: usize, chunk: usize) -> Result<Self> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot open '{}'", path.display()), e))?;
        let (header, data_start, file_len) = read_header(&file, path, false)?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat '{}'", path.display()), e))?;
        let mut mode = mode;
        let mut direct = None;
        let mut map = None;
        match mode {
            ReadMode::Pread => advise_file(&file, FADV_SEQUENTIAL, 0, 0),
            ReadMode::Direct | ReadMode::Auto => {
                match open_direct(path) {
                    Ok(f) => {
                        direct = Some(f);
                        if mode == ReadMode::Auto && file_len > 0 {
                            // Only for `mincore` (which pages the cache holds): never read
                            // through, so a truncation cannot fault through it.
                            // SAFETY: a read-only mapping that no code dereferences.
                            let m = unsafe { MmapOptions::new().len(file_len as usize).map(&file) };
                            map = m.ok();
                        }
                    }
                    Err(_) => {
                        // tmpfs and a few others refuse O_DIRECT: read through the page cache.
                        mode = ReadMode::Pread;
                        advise_file(&file, FADV_SEQUENTIAL, 0, 0);
                    }
                }
            }
            ReadMode::Mmap => {
                if file_len > 0 {
                    // SAFETY: read-only mapping; the length is checked against the file before
                    // every copy, which narrows (cannot close) the window in which a concurrent
                    // truncation faults. The other modes have no such window.
                    let m = unsafe { MmapOptions::new().len(file_len as usize).map(&file) }
                        .map_err(|e| Error::io(format!("cannot map '{}'", path.display()), e))?;
                    let _ = m.advise(Advice::Sequential);
                    map = Some(m);
                }
            }
        }
        let chunk = (align_up(chunk.max(1) as u64)) as usize;
        Ok(StreamFile {
            file,
            direct,
            map,
            header,
            data_start,
            file_len,
            modified: meta.modified().ok(),
            path: path.to_path_buf(),
            mode,
            threads: threads.clamp(1, 64),
            chunk,
            hashes: Mutex::new(HashMap::new()),
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn data_start(&self) -> u64 {
        self.data_start
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The mode in use (`Direct` becomes `Pread` where `O_DIRECT` is refused).
    pub fn mode(&self) -> ReadMode {
        self.mode
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensor_info(&self, index: usize) -> Result<&TensorInfo> {
        self.header.tensors.get(index).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor #{index} does not exist ('{}' has {})",
                self.path.display(),
                self.header.tensors.len()
            ))
        })
    }

    /// Absolute byte range `[start, end)` that covers every part of tensor `index` (the span:
    /// what is read is [`tensor_layout`](Self::tensor_layout)).
    pub fn tensor_range(&self, index: usize) -> Result<(u64, u64)> {
        let t = self.tensor_info(index)?;
        Ok(range_of(t, self.data_start))
    }

    /// The buffer that [`read`](Self::read) fills for tensor `index`: its size and where each
    /// part lies in it.
    pub fn tensor_layout(&self, index: usize) -> Result<TensorLayout> {
        let t = self.tensor_info(index)?;
        Ok(TensorLayout::of(t, self.data_start))
    }

    /// Read-ahead hint for the first `limit` bytes of tensor `index`'s segments.
    pub fn will_need_tensor(&self, index: usize, limit: u64) -> Result<()> {
        let mut left = limit;
        let t = self.tensor_info(index)?;
        for s in self.tensor_layout(index)?.segments {
            if left == 0 {
                break;
            }
            let len = s.compressed.map_or(s.len, |i| t.parts[i].length);
            self.will_need(s.file, len.min(left));
            left -= len.min(left);
        }
        Ok(())
    }

    /// Hint that the absolute byte range `[start, start + len)` is wanted soon (read-ahead into
    /// the page cache; nothing in `Direct` mode).
    pub fn will_need(&self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.file_len);
        if start >= end {
            return;
        }
        match self.mode {
            ReadMode::Pread => advise_file(
                &self.file,
                FADV_WILLNEED,
                start as i64,
                (end - start) as i64,
            ),
            ReadMode::Mmap => {
                if let Some(m) = &self.map {
                    let _ =
                        m.advise_range(Advice::WillNeed, start as usize, (end - start) as usize);
                }
            }
            // Read-ahead would fill the page cache that these modes read around.
            ReadMode::Direct | ReadMode::Auto => {}
        }
    }

    /// Copy `out.len()` bytes of tensor `index`'s buffer ([`tensor_layout`](Self::tensor_layout)),
    /// from `offset` on, into `out` (padding between segments comes out as zeros). With `verify`,
    /// checks the checksum of every part that ends inside this piece; parts split over several
    /// calls are hashed incrementally and must then be read in order.
    pub fn read(&self, index: usize, offset: u64, out: &mut [u8], verify: bool) -> Result<()> {
        let t = self.tensor_info(index)?;
        let layout = TensorLayout::of(t, self.data_start);
        let (pieces, stored) = self.fill(t, &layout, offset, out)?;
        self.check_unchanged(t)?;
        if verify {
            let mut stored = stored.iter();
            for &(s, lo, hi) in &pieces {
                match s.compressed {
                    None => {
                        let at = s.file + (lo + offset - s.buf);
                        self.verify_piece(index, t, at, &out[lo as usize..hi as usize])?;
                    }
                    Some(_) => {
                        let (at, bytes) = stored.next().expect("one per compressed piece");
                        self.verify_piece(index, t, *at, bytes.as_slice())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Copy rows of tensor `index`'s buffer one after another into `out`: row `i` is the
    /// `row_len` bytes from `offset + i * stride`, for `out.len() / row_len` rows. This is how a
    /// column block of a row-major part (a tensor-parallel shard) comes out of the file in one
    /// call: rows less than a page apart in spans of about a chunk, others one read each, spread
    /// over the threads. No checksums: they cover whole parts, and a shard reads part of each.
    /// Rows inside a compressed part decode the chunks under the block once.
    pub fn read_strided(
        &self,
        index: usize,
        offset: u64,
        stride: u64,
        row_len: u64,
        out: &mut [u8],
    ) -> Result<()> {
        let t = self.tensor_info(index)?;
        let len = out.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if row_len == 0 || !len.is_multiple_of(row_len) || stride < row_len {
            return Err(Error::Invalid(format!(
                "tensor '{}': a strided read needs 0 < row length ({row_len}) <= stride ({stride}) and a buffer of whole rows ({len} bytes)",
                t.name
            )));
        }
        let layout = TensorLayout::of(t, self.data_start);
        let rows = len / row_len;
        let end = (rows - 1)
            .checked_mul(stride)
            .and_then(|x| x.checked_add(offset))
            .and_then(|x| x.checked_add(row_len));
        let Some(end) = end.filter(|&e| e <= layout.len) else {
            return Err(Error::Invalid(format!(
                "{rows} rows of {row_len} bytes every {stride} from byte {offset} lie outside tensor '{}' ({} bytes)",
                t.name, layout.len
            )));
        };
        let compressed = layout
            .segments
            .iter()
            .any(|s| s.compressed.is_some() && s.buf < end && offset < s.buf + s.len);
        if compressed {
            // Decoding a chunk per row would decode each chunk many times: decode the block once.
            let mut span = vec![0u8; (end - offset) as usize];
            self.fill(t, &layout, offset, &mut span)?;
            for (i, row) in out.chunks_mut(row_len as usize).enumerate() {
                let at = i * stride as usize;
                row.copy_from_slice(&span[at..at + row_len as usize]);
            }
        } else if stride - row_len <= PAGE_GAP {
            // Rows this close share pages, which storage reads whole anyway: one read per span
            // of rows (about a chunk) costs no more from storage and far fewer read calls.
            let per = (self.chunk as u64 / stride).max(1) as usize;
            out.par_chunks_mut(per * row_len as usize)
                .enumerate()
                .with_min_len((64 / per).max(1))
                .try_for_each(|(k, block)| {
                    let rows = block.len() / row_len as usize;
                    let first = offset + (k * per) as u64 * stride;
                    let mut span = vec![0u8; ((rows as u64 - 1) * stride + row_len) as usize];
                    self.fill(t, &layout, first, &mut span)?;
                    for (i, row) in block.chunks_mut(row_len as usize).enumerate() {
                        let at = i * stride as usize;
                        row.copy_from_slice(&span[at..at + row_len as usize]);
                    }
                    Ok::<(), Error>(())
                })?;
        } else {
            out.par_chunks_mut(row_len as usize)
                .enumerate()
                .with_min_len(64)
                .try_for_each(|(i, row)| {
                    self.fill(t, &layout, offset + i as u64 * stride, row)
                        .map(|_| ())
                })?;
        }
        self.check_unchanged(t)
    }

    /// Bytes `[offset, offset + out.len())` of tensor `t`'s buffer into `out` (padding between
    /// segments as zeros). Returns each segment's share of the piece (segment, [lo, hi) in
    /// `out`) and the stored bytes read for compressed parts (absolute offset, bytes).
    #[allow(clippy::type_complexity)]
    fn fill<'l>(
        &self,
        t: &TensorInfo,
        layout: &'l TensorLayout,
        offset: u64,
        out: &mut [u8],
    ) -> Result<(Vec<(&'l Segment, u64, u64)>, Vec<(u64, StoredBytes)>)> {
        let len = out.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > layout.len) {
            return Err(Error::Invalid(format!(
                "bytes [{offset}, {offset}+{len}) lie outside tensor '{}' ({} bytes)",
                t.name, layout.len
            )));
        }
        let end = offset + len;
        // (absolute file offset, [lo, hi) in the buffer) of each segment's share of this piece.
        // Zero-length segments at the edges count too: verify sees their (empty) parts.
        let pieces: Vec<(&Segment, u64, u64)> = layout
            .segments
            .iter()
            .map(|s| (s, s.buf.max(offset), (s.buf + s.len).min(end)))
            .filter(|&(s, lo, hi)| lo < hi || (lo == hi && s.len == 0))
            .map(|(s, lo, hi)| (s, lo - offset, hi - offset))
            .collect();
        let mut filled = 0;
        let mut stored: Vec<(u64, StoredBytes)> = Vec::new();
        for &(s, lo, hi) in &pieces {
            out[filled as usize..lo as usize].fill(0);
            let dst = &mut out[lo as usize..hi as usize];
            let from = lo + offset - s.buf;
            match s.compressed {
                None => self.read_span(t, s.file + from, dst)?,
                Some(pi) => stored.push(self.read_compressed(t, pi, from, dst)?),
            }
            filled = filled.max(hi);
        }
        out[filled as usize..].fill(0);
        Ok((pieces, stored))
    }

    /// Decoded bytes `[from, from + out.len())` of compressed part `pi`: reads the stored bytes
    /// of the chunks that cover them and decompresses those in parallel, chunks wholly inside
    /// the piece straight into `out`. Returns the stored bytes read and their file offset.
    fn read_compressed(
        &self,
        t: &TensorInfo,
        pi: usize,
        from: u64,
        out: &mut [u8],
    ) -> Result<(u64, StoredBytes)> {
        let p = &t.parts[pi];
        let c = p.compression.as_ref().expect("a compressed part");
        let to = from + out.len() as u64;
        let range = c.chunks_of(from, to);
        let offsets = c.stored_offsets();
        let (sa, sb) = (offsets[range.start], offsets[range.end]);
        let at = self.data_start + p.offset + sa;
        let mut stored = StoredBytes::new(at, (sb - sa) as usize);
        // `out` cut at chunk boundaries: (chunk, its decoded start, the slice of `out`), in
        // groups of about `self.chunk` stored bytes; `bounds`: each group's stored start.
        let mut groups: Vec<Vec<(usize, u64, &mut [u8])>> = Vec::new();
        let mut bounds = vec![sa];
        let mut group = Vec::new();
        let mut rest = out;
        let mut pos = from;
        for i in range.clone() {
            let (cs, ce) = (
                i as u64 * c.chunk_size,
                i as u64 * c.chunk_size + c.chunk_len(i),
            );
            let (head, tail) = rest.split_at_mut((ce.min(to) - pos) as usize);
            group.push((i, cs, head));
            rest = tail;
            pos = ce.min(to);
            if offsets[i + 1] - bounds[bounds.len() - 1] >= self.chunk as u64 || i + 1 == range.end
            {
                groups.push(std::mem::take(&mut group));
                bounds.push(offsets[i + 1]);
            }
        }
        let mut bufs: Vec<&mut [u8]> = Vec::with_capacity(groups.len());
        let mut left = stored.as_mut_slice();
        for w in bounds.windows(2) {
            let (head, tail) = left.split_at_mut((w[1] - w[0]) as usize);
            bufs.push(head);
            left = tail;
        }
        let what = format!("tensor '{}' part '{}'", t.name, p.name);
        let decode = |jobs: Vec<(usize, u64, &mut [u8])>, src: &[u8], base: u64| {
            let chunk = |i: usize, into: &mut [u8]| {
                let from_chunk = &src[(offsets[i] - base) as usize..];
                compress::decompress_chunks(c, &offsets, from_chunk, i..i + 1, into, &what)
            };
            compress::lowest_failure(jobs.into_par_iter().map(|(i, cs, dst)| {
                let lo = pos_in_chunk(from, cs);
                let done = if lo == 0 && dst.len() as u64 == c.chunk_len(i) {
                    chunk(i, dst)
                } else {
                    let mut whole = vec![0u8; c.chunk_len(i) as usize];
                    chunk(i, &mut whole)
                        .map(|()| dst.copy_from_slice(&whole[lo as usize..lo as usize + dst.len()]))
                };
                (i, done)
            }))
        };
        // Pipelined: group g+1 is read while group g decompresses, so that the disk and the
        // cores work at once (a cold read would otherwise wait for each in turn).
        if let Some(first) = bufs.first_mut() {
            self.read_span(t, at, first)?;
        }
        for (g, jobs) in groups.into_iter().enumerate() {
            let (done, next) = bufs.split_at_mut(g + 1);
            let src: &[u8] = done[g];
            let next_at = self.data_start + p.offset + bounds[g + 1];
            let (decoded, read) = rayon::join(
                || decode(jobs, src, bounds[g]),
                || match next.first_mut() {
                    Some(buf) => self.read_span(t, next_at, buf),
                    None => Ok(()),
                },
            );
            decoded?;
            read?;
        }
        Ok((at, stored))
    }

    /// Read the absolute range `[a, a + out.len())`, in `chunk`-sized pieces over the threads.
    fn read_span(&self, t: &TensorInfo, a: u64, out: &mut [u8]) -> Result<()> {
        let b = a + out.len() as u64;
        // Piece boundaries at multiples of `chunk` in file offsets, so that inner pieces are
        // block-aligned for O_DIRECT.
        let chunk = self.chunk as u64;
        let mut pieces: Vec<Piece<'_>> = Vec::new();
        let mut rest = out;
        let mut pos = a;
        while pos < b {
            let next = ((pos / chunk) + 1).saturating_mul(chunk).min(b);
            let (head, tail) = rest.split_at_mut((next - pos) as usize);
            pieces.push((pos, head));
            rest = tail;
            pos = next;
        }
        let workers = self.threads.min(pieces.len());
        if workers <= 1 {
            for (pos, buf) in pieces {
                self.read_piece(t, pos, buf)?;
            }
            return Ok(());
        }
        let next = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<Piece<'_>>>> =
            pieces.into_iter().map(|p| Mutex::new(Some(p))).collect();
        let errors: Mutex<Vec<(u64, Error)>> = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..workers {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = slots.get(i) else { break };
                    let Some((pos, buf)) = slot.lock().unwrap().take() else {
                        continue;
                    };
                    if let Err(e) = self.read_piece(t, pos, buf) {
                        errors.lock().unwrap().push((pos, e));
                        break;
                    }
                });
            }
        });
        let mut errors = errors.into_inner().unwrap();
        errors.sort_by_key(|(p, _)| *p);
        match errors.into_iter().next() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn read_piece(&self, t: &TensorInfo, pos: u64, buf: &mut [u8]) -> Result<()> {
        match self.mode {
            ReadMode::Pread => self.pread_exact(&self.file, t, pos, buf),
            ReadMode::Direct => self.read_direct(t, pos, buf),
            ReadMode::Mmap => self.copy_from_map(t, pos, buf),
            ReadMode::Auto => {
                let cached = self.copy_cached(t, pos, buf)?;
                self.read_direct(t, pos + cached as u64, &mut buf[cached..])
            }
        }
    }

    /// Copy the leading bytes of `[pos, pos + buf.len())` that the page cache holds: how many.
    /// `mincore` on a map of the file tells which pages are resident without reading any (a
    /// `RWF_NOWAIT` read would start read-ahead into the cache, which the direct read that
    /// follows would then read a second time); a page evicted since is read through the cache.
    #[cfg(target_os = "linux")]
    fn copy_cached(&self, t: &TensorInfo, pos: u64, buf: &mut [u8]) -> Result<usize> {
        let Some(map) = &self.map else { return Ok(0) };
        // SAFETY: sysconf only reads a constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        let end = (pos + buf.len() as u64).min(map.len() as u64);
        let first = pos / page * page;
        if first >= end {
            return Ok(0);
        }
        let mut resident = vec![0u8; (end - first).div_ceil(page) as usize];
        // SAFETY: the range lies inside the mapping and starts on a page; `resident` has a byte
        // per page. mincore reads no page, so a truncated file cannot fault here.
        let rc = unsafe {
            libc::mincore(
                map.as_ptr().add(first as usize) as *mut libc::c_void,
                (end - first) as usize,
                resident.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Ok(0);
        }
        let pages = resident.iter().take_while(|&&r| r & 1 == 1).count() as u64;
        let cached = (first + pages * page).min(end).saturating_sub(pos) as usize;
        self.pread_exact(&self.file, t, pos, &mut buf[..cached])?;
        Ok(cached)
    }

    #[cfg(not(target_os = "linux"))]
    fn copy_cached(&self, _t: &TensorInfo, _pos: u64, _buf: &mut [u8]) -> Result<usize> {
        Ok(0)
    }

    fn truncated(&self, t: &TensorInfo, pos: u64, want: u64) -> Error {
        let now = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        Error::Format(format!(
            "file '{}' truncated while streaming tensor '{}': expected {want} bytes at offset {pos}, the file now ends at byte {now} (it had {} when opened)",
            self.path.display(),
            t.name,
            self.file_len
        ))
    }

    fn pread_exact(&self, f: &File, t: &TensorInfo, pos: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], pos + done as u64) {
                Ok(0) => return Err(self.truncated(t, pos, buf.len() as u64)),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "reading tensor '{}' from '{}' at offset {}",
                            t.name,
                            self.path.display(),
                            pos + done as u64
                        ),
                        e,
                    ))
                }
            }
        }
        Ok(())
    }

    /// O_DIRECT: the block-aligned middle goes straight into `buf` when `buf` sits at the same
    /// offset modulo 4 KiB as the file position; otherwise through an aligned bounce buffer.
    /// The unaligned head and tail (under 4 KiB each) come through the page cache.
    fn read_direct(&self, t: &TensorInfo, pos: u64, buf: &mut [u8]) -> Result<()> {
        let Some(direct) = &self.direct else {
            return self.pread_exact(&self.file, t, pos, buf);
        };
        let end = pos + buf.len() as u64;
        let (ia, ib) = (align_up(pos), align_down(end));
        if ia >= ib {
            return self.pread_exact(&self.file, t, pos, buf);
        }
        let same_phase = (buf.as_ptr() as u64).wrapping_sub(pos) & (DIRECT_ALIGN - 1) == 0;
        let (head, rest) = buf.split_at_mut((ia - pos) as usize);
        let (mid, tail) = rest.split_at_mut((ib - ia) as usize);
        if !head.is_empty() {
            self.pread_exact(&self.file, t, pos, head)?;
        }
        if !tail.is_empty() {
            self.pread_exact(&self.file, t, ib, tail)?;
        }
        if same_phase {
            match self.pread_direct(direct, t, ia, mid) {
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(EINVAL) => {
                    self.pread_exact(&self.file, t, ia, mid)
                }
                r => r,
            }
        } else {
            let mut bounce = AlignedBuf::new(mid.len());
            match self.pread_direct(direct, t, ia, bounce.as_mut_slice()) {
                Ok(()) => {
                    mid.copy_from_slice(bounce.as_mut_slice());
                    Ok(())
                }
                Err(Error::Io { source, .. }) if source.raw_os_error() == Some(EINVAL) => {
                    self.pread_exact(&self.file, t, ia, mid)
                }
                Err(e) => Err(e),
            }
        }
    }

    fn pread_direct(&self, f: &File, t: &TensorInfo, pos: u64, buf: &mut [u8]) -> Result<()> {
        // Lengths and positions are block multiples here, so a short read only happens at EOF.
        self.pread_exact(f, t, pos, buf)
    }

    fn copy_from_map(&self, t: &TensorInfo, pos: u64, buf: &mut [u8]) -> Result<()> {
        let end = pos + buf.len() as u64;
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat '{}'", self.path.display()), e))?
            .len();
        let Some(map) = &self.map else {
            return Err(self.truncated(t, pos, buf.len() as u64));
        };
        if now < end || (map.len() as u64) < end {
            return Err(self.truncated(t, pos, buf.len() as u64));
        }
        let _ = map.advise_range(Advice::WillNeed, pos as usize, buf.len());
        buf.copy_from_slice(&map[pos as usize..end as usize]);
        Ok(())
    }

    /// After a read: a file that only shrank left the bytes just read intact (a truncation that
    /// reaches them makes the read itself short); any other change of size or modification
    /// time means the bytes may mix two versions of the file.
    fn check_unchanged(&self, t: &TensorInfo) -> Result<()> {
        let meta = self
            .file
            .metadata()
            .map_err(|e| Error::io(format!("cannot stat '{}'", self.path.display()), e))?;
        if meta.len() < self.file_len {
            return Ok(());
        }
        if meta.len() != self.file_len || meta.modified().ok() != self.modified {
            return Err(Error::Format(format!(
                "file '{}' was modified while streaming tensor '{}' (its size or modification time changed since it was opened)",
                self.path.display(),
                t.name
            )));
        }
        Ok(())
    }

    fn verify_piece(&self, index: usize, t: &TensorInfo, a: u64, bytes: &[u8]) -> Result<()> {
        let b = a + bytes.len() as u64;
        for (pi, p) in t.parts.iter().enumerate() {
            let (ps, pe) = (
                self.data_start + p.offset,
                self.data_start + p.offset + p.length,
            );
            let (lo, hi) = (ps.max(a), pe.min(b));
            if lo > hi || (lo == hi && p.length > 0) {
                continue;
            }
            let slice = &bytes[(lo - a) as usize..(hi - a) as usize];
            let got = if lo == ps && hi == pe {
                checksum(slice)
            } else {
                let mut map = self.hashes.lock().unwrap();
                let key = (index, pi);
                if lo == ps {
                    map.remove(&key); // a read from the part's start begins afresh
                }
                let state = map.entry(key).or_insert_with(|| PartialHash {
                    next: ps,
                    hasher: Box::new(Xxh3Default::new()),
                    done: false,
                });
                if state.done {
                    continue; // a compressed part's last chunk, read again by the next piece
                }
                // Compressed parts read in pieces re-read the chunk at each boundary: bytes
                // hashed already are skipped; a gap means the bytes came out of order.
                if lo > state.next || (lo < state.next && p.compression.is_none()) {
                    map.remove(&key);
                    return Err(Error::Invalid(format!(
                        "tensor '{}' part '{}': verifying needs its bytes in order (got offset {lo}, expected {})",
                        t.name, p.name, ps
                    )));
                }
                if hi > state.next {
                    state.hasher.update(&slice[(state.next - lo) as usize..]);
                    state.next = hi;
                }
                if hi < pe {
                    continue;
                }
                let h = state.hasher.digest();
                if p.compression.is_some() {
                    state.done = true;
                } else {
                    map.remove(&key);
                }
                h
            };
            if got != p.checksum {
                return Err(Error::Checksum(format!(
                    "tensor '{}' part '{}': checksum mismatch while streaming (file says {}, bytes hash to {}): the file is corrupted",
                    t.name,
                    p.name,
                    format_checksum(p.checksum),
                    format_checksum(got)
                )));
            }
        }
        Ok(())
    }
}

/// `[start, end)` of a tensor's parts, absolute. Tensors without bytes give an empty range at
/// their first part.
fn range_of(t: &TensorInfo, data_start: u64) -> (u64, u64) {
    let start = t.parts.iter().map(|p| p.offset).min().unwrap_or(0);
    let end = t
        .parts
        .iter()
        .map(|p| p.offset + p.length)
        .max()
        .unwrap_or(0)
        .max(start);
    (data_start + start, data_start + end)
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_path: &Path) -> std::io::Result<File> {
    Err(std::io::ErrorKind::Unsupported.into())
}

#[cfg(target_os = "linux")]
const FADV_SEQUENTIAL: i32 = libc::POSIX_FADV_SEQUENTIAL;
#[cfg(target_os = "linux")]
const FADV_WILLNEED: i32 = libc::POSIX_FADV_WILLNEED;
#[cfg(not(target_os = "linux"))]
const FADV_SEQUENTIAL: i32 = 0;
#[cfg(not(target_os = "linux"))]
const FADV_WILLNEED: i32 = 0;

fn advise_file(f: &File, advice: i32, offset: i64, len: i64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; posix_fadvise only hints the kernel.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), offset, len, advice);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, advice, offset, len);
}

/// The stored bytes of compressed chunks read from file offset `at`, placed at its phase modulo
/// 4 KiB: O_DIRECT reads land in them without a bounce copy. Every byte is read into before
/// any is looked at (a failed read drops the buffer).
struct StoredBytes {
    buf: AlignedBuf,
    phase: usize,
}

impl StoredBytes {
    fn new(at: u64, len: usize) -> Self {
        let phase = (at % DIRECT_ALIGN) as usize;
        StoredBytes {
            buf: AlignedBuf::new(phase + len),
            phase,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut_slice()[self.phase..]
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: as `AlignedBuf::as_mut_slice`, read-only.
        let all = unsafe { std::slice::from_raw_parts(self.buf.ptr.as_ptr(), self.buf.len) };
        &all[self.phase..]
    }
}

/// A 4 KiB-aligned heap buffer for O_DIRECT reads.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let size = (align_up(len as u64) as usize).max(DIRECT_ALIGN as usize);
        let layout = std::alloc::Layout::from_size_align(size, DIRECT_ALIGN as usize)
            .expect("size fits in isize");
        // SAFETY: non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        let ptr =
            std::ptr::NonNull::new(p).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` ≤ the allocation; u8 needs no initialization for reads into it, and
        // every byte is written by the read before it is copied out.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Encoding;
    use crate::io::{FileWriter, PlannedTensor, QFile};
    use std::collections::BTreeMap;

    /// Every read path, so each test covers them all.
    const EVERY_MODE: [ReadMode; 4] = [
        ReadMode::Pread,
        ReadMode::Direct,
        ReadMode::Mmap,
        ReadMode::Auto,
    ];

    fn write_file(dir: &Path, alignment: u64) -> PathBuf {
        let path = dir.join("s.qtensors");
        let enc = |bits: u64| {
            let mut m = serde_json::Map::new();
            m.insert("name".into(), "affine".into());
            m.insert("bits".into(), bits.into());
            m.insert("group_size".into(), 64.into());
            m.insert("axis".into(), 0.into());
            m.insert("scale_dtype".into(), "float16".into());
            Encoding::from_json(&m, 2, false).unwrap()
        };
        let plans = vec![
            PlannedTensor {
                name: "a".into(),
                dtype: crate::format::DType::Float32,
                shape: vec![256, 300],
                encoding: enc(4),
            },
            PlannedTensor {
                name: "b".into(),
                dtype: crate::format::DType::Float32,
                shape: vec![100, 33],
                encoding: enc(3),
            },
        ];
        let mut w = FileWriter::create(&path, plans, BTreeMap::new(), alignment).unwrap();
        let k = crate::codecs::simd::best();
        for i in 0..2 {
            let t = w.header().tensors[i].clone();
            let n = crate::format::encoding::numel(&t.shape).unwrap() as usize;
            let x: Vec<f32> = (0..n)
                .map(|j| ((j * 7919 + i) % 1000) as f32 / 10.0)
                .collect();
            let parts = crate::tensor::encode(
                k,
                &t.encoding,
                t.dtype,
                &t.shape,
                crate::tensor::Input::F32(&x),
            )
            .unwrap();
            w.write_tensor(i, &parts).unwrap();
        }
        w.finish().unwrap();
        path
    }

    #[test]
    fn every_mode_reads_the_same_bytes_as_the_map() {
        let dir = tempfile::tempdir().unwrap();
        for alignment in [64, 4096] {
            let path = write_file(dir.path(), alignment);
            let q = QFile::open(&path, false).unwrap();
            for mode in EVERY_MODE {
                // Tiny chunks and several threads: many pieces, unaligned heads and tails.
                let s = StreamFile::open(&path, mode, 3, 4096).unwrap();
                assert_eq!(s.header(), q.header());
                for i in 0..2 {
                    let (a, b) = s.tensor_range(i).unwrap();
                    s.will_need(a, b - a);
                    let mut whole = vec![0u8; (b - a) as usize];
                    s.read(i, 0, &mut whole, true).unwrap();
                    assert_eq!(&whole[..], &q_bytes(&q)[a as usize..b as usize]);
                    // The same in three uneven pieces, verified incrementally.
                    let cuts = [0, 1000, 9000.min(whole.len()), whole.len()];
                    for w in cuts.windows(2) {
                        let mut piece = vec![0u8; w[1] - w[0]];
                        s.read(i, w[0] as u64, &mut piece, true).unwrap();
                        assert_eq!(&piece[..], &whole[w[0]..w[1]]);
                    }
                }
                let (a, b) = s.tensor_range(1).unwrap();
                let mut too_long = vec![0u8; (b - a + 1) as usize];
                assert!(matches!(
                    s.read(1, 0, &mut too_long, false),
                    Err(Error::Invalid(_))
                ));
            }
        }
    }

    #[test]
    fn strided_reads_gather_the_rows_of_a_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), 64);
        for mode in EVERY_MODE {
            let s = StreamFile::open(&path, mode, 3, 4096).unwrap();
            let (a, b) = s.tensor_range(0).unwrap();
            let mut whole = vec![0u8; (b - a) as usize];
            s.read(0, 0, &mut whole, false).unwrap();
            // 150 bytes of codes per row of 'a' (300 4-bit codes): columns 40..115 of each row
            // (read in spans of 4096-byte chunks), contiguous rows, rows a page apart (one read
            // each).
            let cases = [
                (40u64, 150u64, 75u64, 256u64),
                (7, 9, 9, 3),
                (5, 9000, 100, 4),
            ];
            for (offset, stride, row_len, rows) in cases {
                let mut got = vec![0u8; (row_len * rows) as usize];
                s.read_strided(0, offset, stride, row_len, &mut got)
                    .unwrap();
                let want: Vec<u8> = (0..rows)
                    .flat_map(|i| {
                        let at = (offset + i * stride) as usize;
                        whole[at..at + row_len as usize].to_vec()
                    })
                    .collect();
                assert_eq!(got, want);
            }
            let mut none: [u8; 0] = [];
            s.read_strided(0, 0, 1, 1, &mut none).unwrap();
            // Rows past the end, a stride shorter than a row, a ragged buffer: named errors.
            let mut two = vec![0u8; 2 * 10];
            for (offset, stride, row_len) in [(b - a - 15, 10, 10), (0, 5, 10), (0, 10, 3)] {
                let e = s
                    .read_strided(0, offset, stride, row_len, &mut two)
                    .unwrap_err();
                assert!(matches!(e, Error::Invalid(_)), "{e}");
                assert!(e.to_string().contains("tensor 'a'"), "{e}");
            }
        }
    }

    fn with_parts(parts: &[(u64, u64)]) -> TensorInfo {
        let part = |(i, &(offset, length)): (usize, &(u64, u64))| crate::format::PartInfo {
            name: format!("p{i}"),
            dtype: crate::format::DType::Uint8,
            shape: vec![length],
            offset,
            length,
            checksum: 0,
            compression: None,
        };
        TensorInfo {
            name: "t".into(),
            dtype: crate::format::DType::Uint8,
            shape: vec![],
            encoding: Encoding::Raw,
            parts: parts.iter().enumerate().map(part).collect(),
        }
    }

    #[test]
    fn layout_reads_parts_not_the_span_between_them() {
        // Contiguous parts (with alignment padding): one segment, the buffer is the range.
        let t = with_parts(&[(128, 100), (256, 64), (320, 0)]);
        let l = TensorLayout::of(&t, 1024);
        assert_eq!(
            l.segments,
            vec![Segment {
                file: 1152,
                len: 192,
                buf: 0,
                compressed: None,
            }]
        );
        assert_eq!(l.len, 192);
        let offsets: Vec<u64> = l.parts.iter().map(|p| p.1).collect();
        assert_eq!(offsets, [0, 128, 192]);
        // Parts 1.5 GiB apart, listed out of file order: two segments, the far one placed at
        // its file phase modulo 4 KiB, the buffer holds parts and padding only.
        let far = 3 << 29;
        let t = with_parts(&[(far + 4096 + 192, 64), (64, 100)]);
        let l = TensorLayout::of(&t, 0);
        let second = Segment {
            file: far + 4096 + 192,
            len: 64,
            buf: 128,
            compressed: None,
        };
        assert_eq!(l.segments[1], second);
        assert_eq!(l.len, 192);
        assert_eq!(
            l.parts[0].1 % DIRECT_ALIGN,
            (far + 4096 + 192 - 64) % DIRECT_ALIGN
        );
        // A gap just under COALESCE_GAP is read through; at the limit it is not.
        let t = with_parts(&[(0, 64), (64 + COALESCE_GAP - 1, 64)]);
        assert_eq!(TensorLayout::of(&t, 0).segments.len(), 1);
        let t = with_parts(&[(0, 64), (64 + COALESCE_GAP, 64)]);
        assert_eq!(TensorLayout::of(&t, 0).segments.len(), 2);
        // No parts with bytes: an empty buffer, whatever the offsets.
        let t = with_parts(&[(0, 0), (far, 0)]);
        assert_eq!(TensorLayout::of(&t, 0).len, 0);
    }

    #[test]
    fn layout_of_written_files_is_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), 4096);
        let s = StreamFile::open(&path, ReadMode::Pread, 1, 1 << 20).unwrap();
        for i in 0..2 {
            let (a, b) = s.tensor_range(i).unwrap();
            let l = s.tensor_layout(i).unwrap();
            assert_eq!(
                l.segments,
                vec![Segment {
                    file: a,
                    len: b - a,
                    buf: 0,
                    compressed: None,
                }]
            );
            for (name, off, len) in &l.parts {
                let p = s.header().tensors[i].part(name).unwrap();
                assert_eq!((a + off, *len), (s.data_start() + p.offset, p.length));
            }
        }
    }

    fn q_bytes(q: &QFile) -> Vec<u8> {
        std::fs::read(q.path()).unwrap()
    }

    #[test]
    fn truncation_and_corruption_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), 64);
        for mode in EVERY_MODE {
            let s = StreamFile::open(&path, mode, 2, 4096).unwrap();
            let (a, b) = s.tensor_range(1).unwrap();
            let f = OpenOptions::new().write(true).open(&path).unwrap();
            let full = s.file_len();
            f.set_len(a + (b - a) / 2).unwrap();
            let mut buf = vec![0u8; (b - a) as usize];
            let e = s.read(1, 0, &mut buf, false).unwrap_err().to_string();
            assert!(e.contains("truncated while streaming tensor 'b'"), "{e}");
            f.set_len(full).unwrap();
        }
        // A flipped byte in tensor a: checksum error naming it (the file is rewritten first, so
        // it is opened after the change).
        let mut bytes = std::fs::read(&path).unwrap();
        let s = StreamFile::open(&path, ReadMode::Pread, 1, 1 << 20).unwrap();
        let (a, b) = s.tensor_range(0).unwrap();
        bytes[a as usize + 5] ^= 0xff;
        drop(s);
        std::fs::write(&path, &bytes).unwrap();
        let s = StreamFile::open(&path, ReadMode::Pread, 1, 1 << 20).unwrap();
        let mut buf = vec![0u8; (b - a) as usize];
        s.read(0, 0, &mut buf, false).unwrap();
        let e = s.read(0, 0, &mut buf, true).unwrap_err();
        assert!(matches!(e, Error::Checksum(_)));
        assert!(e.to_string().contains("tensor 'a' part 'codes'"), "{e}");
    }
}
