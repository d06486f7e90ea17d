//! Part compression (spec section 2.1): a part's bytes cut into chunks of `chunk_size`, each
//! filtered (byte planes, floats with the sign rotated down) and compressed on its own as one
//! zstd frame, so any chunk can be decoded without the others. Chunks run in parallel (rayon).
//!
//! Decoding treats the stored bytes as hostile: a chunk must be exactly one frame whose header
//! states its decoded size, and it is decompressed into a buffer of exactly that size (zstd
//! cannot write past it), so a chunk that decodes to more or less, a bomb, or a truncated frame
//! is a `FormatError` and memory never exceeds the sizes the checked header declares.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;
use zstd::zstd_safe::{self, CCtx, CParameter, DCtx};

use crate::error::{Error, Result};
use crate::format::compression::{CodecId, Compression, Filter};
use crate::format::DType;

/// What a writer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub level: i32,
    pub chunk_size: u64,
}

/// Level 1 compresses model weights best of all levels we measured (higher levels' match
/// finding only adds costly sequences on the byte planes) and fastest.
pub const DEFAULT_LEVEL: i32 = 1;
/// Match finding tuned for byte planes (`benches/results/compression.txt`): the savings are
/// the entropy of the exponent plane, which zstd's Huffman stage captures; matches there are
/// short and scattered, and each one costs a sequence to decode. The smallest hash table and
/// the longest minimum match keep only the matches that pay: MiniLM bf16 1.452x -> 1.484x and
/// decoding ~1.5x faster than plain level 1, in standard frames any zstd decoder reads.
const HASH_LOG: u32 = 6;
const MIN_MATCH: u32 = 7;
pub const DEFAULT_CHUNK: u64 = 1 << 20;
/// A part is stored compressed only when that saves at least 1/20 of its bytes: below, the
/// decompression on every read costs more than the disk it saves.
pub const MIN_SAVING: u64 = 20;

impl Default for Options {
    fn default() -> Self {
        Options {
            level: DEFAULT_LEVEL,
            chunk_size: DEFAULT_CHUNK,
        }
    }
}

thread_local! {
    static CCTX: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
    /// Filtered bytes of one chunk (before compression / after decompression).
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Parts compressed chunk by chunk, each chunk into its own slot of `buf`: part `j` owns
/// `buf[base_j..base_j + len_j]` (the parts one after another) and its chunk `i` starts at
/// `base_j + i * chunk_size`, so the chunks never wait for each other and nothing is packed (a
/// writer writes each slot's stored bytes at their place in the file).
pub struct Compressed {
    /// The slots; handed back to the next [`compress_parts`] call to be reused.
    pub buf: Vec<u8>,
    /// One per part, in the order given.
    pub parts: Vec<Packed>,
}

/// Where one part lies in [`Compressed::buf`], and how it is stored.
pub struct Packed {
    base: usize,
    len: usize,
    /// `None` when compression does not pay (saves less than 1/`MIN_SAVING`): the part is then
    /// stored as it is, and its slots hold its bytes unchanged.
    pub record: Option<Compression>,
}

impl Compressed {
    /// The stored bytes of part `j`, in order: their concatenation is the stored part.
    pub fn stored(&self, j: usize) -> impl Iterator<Item = &[u8]> {
        let p = &self.parts[j];
        let cs = p
            .record
            .as_ref()
            .map_or(p.len.max(1), |c| c.chunk_size as usize);
        let lens: Vec<usize> = match &p.record {
            Some(c) => c.chunks.iter().map(|&n| n as usize).collect(),
            None => vec![p.len],
        };
        lens.into_iter()
            .enumerate()
            .map(move |(i, n)| &self.buf[p.base + i * cs..p.base + i * cs + n])
    }

    /// Stored bytes of part `j`.
    pub fn stored_len(&self, j: usize) -> u64 {
        let p = &self.parts[j];
        p.record
            .as_ref()
            .map_or(p.len as u64, |c| c.chunks.iter().map(|&n| n as u64).sum())
    }
}

/// What [`compress_parts`] compresses: the decoded bytes of a part, its dtype, and whether they
/// are a whole part or a piece of a larger one (whole chunks of it, compressed a piece at a time
/// to bound memory). A whole part is judged (stored as it is when compression does not pay); a
/// piece never is (its record holds its chunks, whatever they save: the caller judges the part
/// with [`pays`] once all its pieces are done).
#[derive(Clone, Copy)]
pub struct Input<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub piece: bool,
}

/// Whether `stored` bytes for a part of `len` decoded bytes save enough to be worth decoding on
/// every read (at least 1/`MIN_SAVING`, in whole bytes rounded up: a tiny part that saves nothing
/// is no exception).
pub fn pays(stored: u64, len: u64) -> bool {
    len > 0 && stored * MIN_SAVING <= len * (MIN_SAVING - 1)
}

/// The compression record of a part of `dtype` whose chunks are stored in `chunks` bytes each.
pub fn record(opts: &Options, dtype: DType, chunks: Vec<u32>, decoded_len: u64) -> Compression {
    Compression {
        codec: CodecId::Zstd,
        level: opts.level,
        filter: Filter::for_dtype(dtype),
        chunk_size: opts.chunk_size,
        chunks,
        decoded_len,
        itemsize: dtype.itemsize(),
    }
}

/// Compress `parts` into the slots of `buf` (grown to their total size when shorter; pass back
/// the buffer of an earlier call to reuse its pages). Every chunk of every part runs in one
/// parallel pass: many small parts (one chunk each) keep every core busy as one large part does.
pub fn compress_parts(parts: &[Input<'_>], opts: &Options, mut buf: Vec<u8>) -> Result<Compressed> {
    let cs = opts.chunk_size;
    let valid = cs.is_power_of_two()
        && (crate::format::compression::MIN_CHUNK..=crate::format::compression::MAX_CHUNK)
            .contains(&cs);
    let cs = cs as usize;
    let total: usize = parts.iter().map(|p| p.bytes.len()).sum();
    if buf.len() < total {
        buf.resize(total, 0);
    }
    // Every chunk with its slot, the parts one after another; no chunk is stored longer than
    // its input, so each fits its slot.
    let mut packed = Vec::with_capacity(parts.len());
    let mut jobs = Vec::new();
    let mut rest = &mut buf[..total];
    let mut base = 0;
    for (j, &Input { bytes, dtype, .. }) in parts.iter().enumerate() {
        let (mine, tail) = std::mem::take(&mut rest).split_at_mut(bytes.len());
        rest = tail;
        packed.push(Packed {
            base,
            len: bytes.len(),
            record: None,
        });
        base += bytes.len();
        if valid && !bytes.is_empty() {
            let filter = Filter::for_dtype(dtype);
            let chunks = mine.chunks_mut(cs).zip(bytes.chunks(cs));
            jobs.extend(chunks.map(|(slot, chunk)| (j, filter, dtype.itemsize(), slot, chunk)));
        }
    }
    let lens: Vec<usize> = jobs
        .par_iter_mut()
        .map(|(_, filter, k, slot, chunk)| compress_chunk(chunk, *filter, *k, opts.level, slot))
        .collect::<Result<_>>()?;
    let mut lens = lens.into_iter();
    let mut jobs = jobs.into_iter().peekable();
    for (j, input) in parts.iter().enumerate() {
        let mut mine = Vec::new();
        while jobs.peek().is_some_and(|job| job.0 == j) {
            jobs.next();
            mine.push(lens.next().expect("one length per job") as u32);
        }
        let stored: u64 = mine.iter().map(|&n| n as u64).sum();
        let len = input.bytes.len() as u64;
        if !mine.is_empty() && (input.piece || pays(stored, len)) {
            packed[j].record = Some(record(opts, input.dtype, mine, len));
        }
    }
    // A part stored as it is: its bytes, unfiltered, back into its slots.
    for (p, input) in packed.iter().zip(parts) {
        if p.record.is_none() {
            buf[p.base..p.base + p.len].copy_from_slice(input.bytes);
        }
    }
    Ok(Compressed { buf, parts: packed })
}

/// One chunk into `slot` (as long as the chunk): its filtered bytes as one zstd frame, or the
/// filtered bytes themselves when the frame would not be shorter. Returns the stored length.
fn compress_chunk(
    chunk: &[u8],
    filter: Filter,
    k: usize,
    level: i32,
    slot: &mut [u8],
) -> Result<usize> {
    SCRATCH.with(|s| {
        let mut filtered = s.borrow_mut();
        filtered.resize(chunk.len(), 0);
        apply(filter, k, chunk, &mut filtered);
        let n = chunk.len();
        let written = CCTX.with(|c| {
            let mut c = c.borrow_mut();
            let cctx = c.get_or_insert_with(CCtx::create);
            // Parameters are sticky in the context; the level goes first (it sets the defaults
            // the others override).
            for p in [
                CParameter::CompressionLevel(level),
                CParameter::HashLog(HASH_LOG),
                CParameter::ChainLog(HASH_LOG),
                CParameter::MinMatch(MIN_MATCH),
            ] {
                cctx.set_parameter(p).map_err(|code| {
                    Error::Invalid(format!(
                        "zstd refuses level {level} ({})",
                        zstd_safe::get_error_name(code)
                    ))
                })?;
            }
            // Room for one byte less than the chunk: a frame must be shorter to be worth it
            // (and a stored length equal to the chunk's means "not compressed"). The frame
            // header records the decoded size (zstd's default when the input is given whole).
            Ok(cctx
                .compress2(&mut slot[..n.saturating_sub(1)], &filtered)
                .ok())
        })?;
        match written {
            Some(w) if w < n => Ok(w),
            _ => {
                slot.copy_from_slice(&filtered);
                Ok(n)
            }
        }
    })
}

/// Decode chunks `range` of a compressed part into `out` (their decoded bytes, contiguous).
/// `stored` holds the part's stored bytes from `stored_offsets[range.start]` on (at least up to
/// the end of the last chunk); `offsets` is [`Compression::stored_offsets`]. `what` names the
/// tensor and part in errors.
pub fn decompress_chunks(
    c: &Compression,
    offsets: &[u64],
    stored: &[u8],
    range: Range<usize>,
    out: &mut [u8],
    what: &str,
) -> Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    let base = offsets[range.start];
    let first = range.start as u64 * c.chunk_size;
    let end = first + out.len() as u64;
    if end != (range.end as u64 * c.chunk_size).min(c.decoded_len)
        || ((offsets[range.end] - base) as usize) > stored.len()
    {
        return Err(Error::Invalid(format!(
            "{what}: buffers do not match chunks {range:?}"
        )));
    }
    let k = c.itemsize;
    lowest_failure(
        out.par_chunks_mut(c.chunk_size as usize)
            .zip(range.clone().into_par_iter())
            .map(|(dst, i)| {
                let src = &stored[(offsets[i] - base) as usize..(offsets[i + 1] - base) as usize];
                let done = decode_chunk(c, k, src, dst).map_err(|e| match e {
                    Error::Format(m) => Error::Format(format!("{what} chunk {i}: {m}")),
                    other => other,
                });
                (i, done)
            }),
    )
}

/// Chunks decoded in parallel, `(index, result)` each: every one runs, and the error reported
/// is the lowest-indexed chunk's, the same whichever thread ends first.
pub(crate) fn lowest_failure(
    results: impl ParallelIterator<Item = (usize, Result<()>)>,
) -> Result<()> {
    let failed = results
        .filter_map(|(i, r)| r.err().map(|e| (i, e)))
        .min_by_key(|(i, _)| *i);
    failed.map_or(Ok(()), |(_, e)| Err(e))
}

fn decode_chunk(c: &Compression, k: usize, src: &[u8], dst: &mut [u8]) -> Result<()> {
    if src.len() == dst.len() {
        // Stored uncompressed (only filtered).
        unapply(c.filter, k, src, dst);
        return Ok(());
    }
    match zstd_safe::find_frame_compressed_size(src) {
        Ok(n) if n == src.len() => {}
        Ok(n) => {
            return Err(Error::Format(format!(
                "its {} stored bytes are not one zstd frame (the frame ends after {n} bytes)",
                src.len()
            )))
        }
        Err(code) => {
            return Err(Error::Format(format!(
                "not a complete zstd frame ({})",
                zstd_safe::get_error_name(code)
            )))
        }
    }
    match zstd_safe::get_frame_content_size(src) {
        Ok(Some(n)) if n == dst.len() as u64 => {}
        Ok(Some(n)) => {
            return Err(Error::Format(format!(
                "the zstd frame says it decodes to {n} bytes, the chunk table {}",
                dst.len()
            )))
        }
        _ => {
            return Err(Error::Format(
                "the zstd frame does not state its decoded size".into(),
            ))
        }
    }
    let run = |into: &mut [u8]| -> Result<()> {
        let got = DCTX.with(|d| {
            let mut d = d.borrow_mut();
            let dctx = d.get_or_insert_with(DCtx::create);
            dctx.decompress(into, src)
        });
        match got {
            Ok(n) if n == into.len() => Ok(()),
            Ok(n) => Err(Error::Format(format!(
                "decoded to {n} bytes, {} expected",
                into.len()
            ))),
            Err(code) => Err(Error::Format(format!(
                "zstd cannot decode it ({})",
                zstd_safe::get_error_name(code)
            ))),
        }
    };
    if c.filter == Filter::None || k == 1 {
        return run(dst);
    }
    SCRATCH.with(|s| {
        let mut filtered = s.borrow_mut();
        filtered.resize(dst.len(), 0);
        run(&mut filtered)?;
        unapply(c.filter, k, &filtered, dst);
        Ok(())
    })
}

/// Filter `src` (whole elements of `k` bytes) into `dst`: elements to byte planes.
pub fn apply(filter: Filter, k: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / k;
    match (filter, k) {
        (Filter::None, _) | (_, 1) => dst.copy_from_slice(src),
        (Filter::Float, 2) => split2(src, dst, n, true),
        (Filter::Float, 4) => split4(src, dst, n, true),
        (Filter::Float, 8) => split::<8>(src, dst, n, |v| v.rotate_left(1)),
        (_, 2) => split2(src, dst, n, false),
        (_, 4) => split4(src, dst, n, false),
        (_, 8) => split::<8>(src, dst, n, |v| v),
        _ => dst.copy_from_slice(src),
    }
}

/// The inverse of [`apply`]: byte planes back to elements.
pub fn unapply(filter: Filter, k: usize, src: &[u8], dst: &mut [u8]) {
    let n = src.len() / k;
    match (filter, k) {
        (Filter::None, _) | (_, 1) => dst.copy_from_slice(src),
        (Filter::Float, 2) => join2(src, dst, n, true),
        (Filter::Float, 4) => join4(src, dst, n, true),
        (Filter::Float, 8) => join::<8>(src, dst, n, |v| v.rotate_right(1)),
        (_, 2) => join2(src, dst, n, false),
        (_, 4) => join4(src, dst, n, false),
        (_, 8) => join::<8>(src, dst, n, |v| v),
        _ => dst.copy_from_slice(src),
    }
}

fn split<const K: usize>(src: &[u8], dst: &mut [u8], n: usize, f: impl Fn(u64) -> u64) {
    for (i, e) in src.chunks_exact(K).enumerate() {
        let mut b = [0u8; 8];
        b[..K].copy_from_slice(e);
        let v = f(u64::from_le_bytes(b)).to_le_bytes();
        for j in 0..K {
            dst[j * n + i] = v[j];
        }
    }
}

fn join<const K: usize>(src: &[u8], dst: &mut [u8], n: usize, f: impl Fn(u64) -> u64) {
    for (i, e) in dst.chunks_exact_mut(K).enumerate() {
        let mut b = [0u8; 8];
        for j in 0..K {
            b[j] = src[j * n + i];
        }
        e.copy_from_slice(&f(u64::from_le_bytes(b)).to_le_bytes()[..K]);
    }
}

/// The hot paths (bf16/fp16 and fp32 weights), written so that the compiler vectorizes them.
fn split2(src: &[u8], dst: &mut [u8], n: usize, rotate: bool) {
    let (p0, p1) = dst.split_at_mut(n);
    for ((e, a), b) in src.chunks_exact(2).zip(p0).zip(&mut p1[..n]) {
        let v = u16::from_le_bytes([e[0], e[1]]);
        let v = if rotate { v.rotate_left(1) } else { v };
        [*a, *b] = v.to_le_bytes();
    }
}

/// Four planes: eight elements at a time, each plane's eight bytes gathered in a register and
/// stored at once (the byte-by-byte scatter into four streams does not vectorize).
fn split4(src: &[u8], dst: &mut [u8], n: usize, rotate: bool) {
    let (p0, rest) = dst.split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, p3) = rest.split_at_mut(n);
    let whole = n / 8 * 8;
    let blocks = src[..whole * 4].chunks_exact(32);
    let planes = p0.chunks_exact_mut(8).zip(p1.chunks_exact_mut(8));
    let planes = planes.zip(p2.chunks_exact_mut(8).zip(p3.chunks_exact_mut(8)));
    for (block, ((a, b), (c, d))) in blocks.zip(planes) {
        let mut w = [0u64; 4];
        for (i, e) in block.chunks_exact(4).enumerate() {
            let v = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
            let v = if rotate { v.rotate_left(1) } else { v };
            for (j, w) in w.iter_mut().enumerate() {
                *w |= (((v >> (8 * j)) & 0xff) as u64) << (8 * i);
            }
        }
        a.copy_from_slice(&w[0].to_le_bytes());
        b.copy_from_slice(&w[1].to_le_bytes());
        c.copy_from_slice(&w[2].to_le_bytes());
        d.copy_from_slice(&w[3].to_le_bytes());
    }
    for i in whole..n {
        let e = &src[4 * i..4 * i + 4];
        let v = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let v = if rotate { v.rotate_left(1) } else { v };
        [p0[i], p1[i], p2[i], p3[i]] = v.to_le_bytes();
    }
}

fn join2(src: &[u8], dst: &mut [u8], n: usize, rotate: bool) {
    let (p0, p1) = (&src[..n], &src[n..2 * n]);
    for ((e, &a), &b) in dst.chunks_exact_mut(2).zip(p0).zip(p1) {
        let v = u16::from_le_bytes([a, b]);
        let v = if rotate { v.rotate_right(1) } else { v };
        e.copy_from_slice(&v.to_le_bytes());
    }
}

fn join4(src: &[u8], dst: &mut [u8], n: usize, rotate: bool) {
    let (p0, rest) = src.split_at(n);
    let (p1, rest) = rest.split_at(n);
    let (p2, p3) = rest.split_at(n);
    let planes = p0.iter().zip(p1).zip(p2.iter().zip(&p3[..n]));
    for (e, ((&a, &b), (&c, &d))) in dst.chunks_exact_mut(4).zip(planes) {
        let v = u32::from_le_bytes([a, b, c, d]);
        let v = if rotate { v.rotate_right(1) } else { v };
        e.copy_from_slice(&v.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_invert() {
        let src: Vec<u8> = (0..4120u32) // not a multiple of 8 elements: the tails too
            .map(|i| (i.wrapping_mul(2654435761u32) >> 13) as u8)
            .collect();
        for filter in [Filter::None, Filter::Bytes, Filter::Float] {
            for k in [1, 2, 4, 8] {
                let mut mid = vec![0u8; src.len()];
                let mut back = vec![0u8; src.len()];
                apply(filter, k, &src, &mut mid);
                unapply(filter, k, &mid, &mut back);
                assert_eq!(back, src, "{filter:?} {k}");
            }
        }
        // bf16 1.0 (0x3f80): rotated 0x7f00: exponent byte 0x7f in the high plane.
        let mut mid = [0u8; 2];
        apply(Filter::Float, 2, &[0x80, 0x3f], &mut mid);
        assert_eq!(mid, [0x00, 0x7f]);
    }

    #[test]
    fn parts_compress_together_and_each_decodes_on_its_own() {
        // One pass over several parts: compressible, incompressible (stored as it is), empty,
        // shorter than a chunk and several chunks long; each part's stored chunks decode to it.
        let smooth: Vec<u8> = (0..10_000u32)
            .flat_map(|i| half_like(i).to_le_bytes())
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..5000)
            .map(|_| {
                x ^= x << 13; // xorshift: no pattern for zstd to find
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect();
        let small = smooth[..600].to_vec();
        let input = |bytes, dtype, piece| Input {
            bytes,
            dtype,
            piece,
        };
        let parts = vec![
            input(&smooth, DType::Float16, false),
            input(&noise, DType::Uint8, false),
            input(&[], DType::Float32, false),
            input(&small, DType::Float16, false),
            input(&noise, DType::Uint8, true), // a piece: its chunks, whatever they save
        ];
        let opts = Options {
            level: DEFAULT_LEVEL,
            chunk_size: 4096,
        };
        let c = compress_parts(&parts, &opts, vec![7u8; 3]).unwrap();
        assert!(c.parts[0].record.is_some() && c.parts[1].record.is_none());
        assert!(c.parts[2].record.is_none() && c.stored_len(2) == 0);
        assert!(c.parts[4].record.is_some() && c.stored_len(4) >= noise.len() as u64);
        for (j, &Input { bytes, .. }) in parts.iter().enumerate() {
            let stored: Vec<u8> = c.stored(j).flatten().copied().collect();
            assert_eq!(stored.len() as u64, c.stored_len(j));
            let Some(rec) = &c.parts[j].record else {
                assert_eq!(stored, bytes, "part {j} is stored as it is");
                continue;
            };
            assert!(stored.len() < bytes.len() || j == 4);
            let mut out = vec![0u8; bytes.len()];
            let offsets = rec.stored_offsets();
            decompress_chunks(rec, &offsets, &stored, 0..rec.chunks.len(), &mut out, "t").unwrap();
            assert_eq!(out, bytes, "part {j}");
        }
    }

    /// Values like small weights in half precision: few distinct exponents.
    fn half_like(i: u32) -> u16 {
        let r = i.wrapping_mul(2654435761);
        0x2000 | ((r >> 20) as u16 & 0x0fff) | (((r >> 31) as u16) << 15)
    }
}
