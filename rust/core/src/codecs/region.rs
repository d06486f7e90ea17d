//! Dequantize a box of a tensor (one `start..stop` range per dimension) straight into bytes of
//! its logical dtype. Work goes in pieces of at most `CHUNK` contiguous elements, in threads;
//! the kernels write each piece straight into the output in its dtype (fp32, fp16, bf16;
//! float64 goes through a small fp32 buffer), and only the scales and mins it needs are widened. So memory is the output plus a
//! few small buffers per thread, whatever the dtypes, and a slice reads only the code bytes and
//! scales of the groups it touches. Decoding a whole tensor is decoding its full box.

use std::cell::RefCell;
use std::ops::Range;

use rayon::prelude::*;

use super::segments::{for_each_segment, Segment};
use super::simd::OutType;
use super::{float, fp4, Codec, Kernels, CHUNK};
use crate::error::{Error, Result};
use crate::format::{DType, GroupLayout, GroupParams};

/// The contiguous runs of source elements that make up a box, in row-major order of the box:
/// `count` runs of `len` elements each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runs {
    pub count: usize,
    pub len: usize,
    /// The box's ranges over the dimensions that enumerate runs, and their strides.
    outer: Vec<(Range<usize>, usize)>,
    /// Source offset of every run's first element, before the outer dimensions are added.
    base: usize,
}

impl Runs {
    /// Runs of the box `ranges` (already checked against `shape`). Trailing dimensions the box
    /// covers fully merge into longer runs; a whole tensor is one run.
    pub fn new(shape: &[u64], ranges: &[Range<u64>]) -> Runs {
        let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        let r: Vec<Range<usize>> = ranges
            .iter()
            .map(|x| x.start as usize..x.end as usize)
            .collect();
        if r.iter().any(|x| x.is_empty()) {
            return Runs {
                count: 0,
                len: 0,
                outer: vec![],
                base: 0,
            };
        }
        // Dimensions `split..` are covered fully; dimension `split - 1` (if any) partly.
        let mut split = dims.len();
        while split > 0 && r[split - 1] == (0..dims[split - 1]) {
            split -= 1;
        }
        let strides: Vec<usize> = (0..dims.len())
            .map(|k| dims[k + 1..].iter().product())
            .collect();
        let tail: usize = dims[split..].iter().product();
        if split == 0 {
            return Runs {
                count: 1,
                len: tail,
                outer: vec![],
                base: 0,
            };
        }
        let d = split - 1;
        let outer: Vec<(Range<usize>, usize)> =
            (0..d).map(|k| (r[k].clone(), strides[k])).collect();
        Runs {
            count: outer.iter().map(|(x, _)| x.len()).product(),
            len: r[d].len() * tail,
            base: r[d].start * strides[d],
            outer,
        }
    }

    /// Source element where run `i` starts.
    pub fn start(&self, mut i: usize) -> usize {
        let mut at = self.base;
        for (range, stride) in self.outer.iter().rev() {
            let n = range.len();
            at += (range.start + i % n) * stride;
            i /= n;
        }
        at
    }

    pub fn numel(&self) -> usize {
        self.count * self.len
    }
}

/// The stored parts of a quantized tensor, scales and mins as their stored bytes.
pub struct Stored<'a> {
    pub codec: Codec,
    pub params: &'a GroupParams,
    pub layout: GroupLayout,
    pub codes: &'a [u8],
    pub scales: &'a [u8],
    /// Empty unless the codec has mins.
    pub mins: &'a [u8],
}

thread_local! {
    /// Per-thread buffers: decoded fp32 values (for float64 output only), widened scales,
    /// widened mins.
    static BUFFERS: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// This thread's buffer `i`, taken out while in use (so nested uses cannot alias it).
fn take_buffer(i: usize) -> Vec<f32> {
    BUFFERS.with(|b| std::mem::take(&mut b.borrow_mut()[i]))
}

fn put_buffer(i: usize, v: Vec<f32>) {
    BUFFERS.with(|b| b.borrow_mut()[i] = v);
}

/// Decode the box `runs` of `q` into `out`, bytes of `dtype` (a float dtype), row-major.
/// fp32, fp16 and bf16 are written by the kernels themselves; float64 (rare) is decoded to fp32
/// in cache and widened.
pub fn decode_box(
    k: &Kernels,
    q: &Stored<'_>,
    runs: &Runs,
    dtype: DType,
    out: &mut [u8],
) -> Result<()> {
    let size = dtype.itemsize();
    if !dtype.is_quantizable_float() || out.len() != runs.numel() * size {
        return Err(Error::Invalid(format!(
            "cannot decode {} elements into {} bytes of {dtype}",
            runs.numel(),
            out.len()
        )));
    }
    if runs.len == 0 {
        return Ok(());
    }
    // Tasks of about `piece` elements: pieces of long runs, or groups of short runs.
    let piece = match OutType::of(dtype) {
        Some(_) => piece_len(&q.layout),
        None => CHUNK, // through an fp32 buffer of a piece
    };
    let min_runs = (piece / runs.len).max(1);
    out.par_chunks_mut(runs.len * size)
        .with_min_len(min_runs)
        .enumerate()
        .try_for_each(|(i, run)| {
            let start = runs.start(i);
            run.par_chunks_mut(piece * size)
                .enumerate()
                .try_for_each(|(p, chunk)| {
                    let e0 = start + p * piece;
                    if let Some(t) = OutType::of(dtype) {
                        return decode_piece(k, q, e0, t, chunk);
                    }
                    let mut vals = take_buffer(0);
                    vals.resize(chunk.len() / size, 0.0);
                    let bytes = float::f32_bytes_mut(&mut vals);
                    let result = decode_piece(k, q, e0, OutType::F32, bytes).and_then(|()| {
                        float::from_le_in_place(&mut vals);
                        float::narrow_into(&vals, dtype, chunk)
                    });
                    put_buffer(0, vals);
                    result
                })
        })
}

/// Elements per task. Groups along an earlier axis share a row of scales and mins between
/// `group_size` rows: a task of such a whole group-row (up to 4 * CHUNK) widens that row once
/// where CHUNK-sized tasks of 4096-column rows widened it four times, a fifth of the time of
/// decoding to 16-bit floats.
fn piece_len(layout: &GroupLayout) -> usize {
    let group_row = (layout.inner as usize).saturating_mul(layout.group_size as usize);
    if layout.inner > 1 && group_row <= 4 * CHUNK {
        group_row.max(CHUNK)
    } else {
        CHUNK
    }
}

/// Decode the contiguous elements `e0..e0 + out.len()` of `q` into `out` as fp32, on the calling
/// thread (for callers that are threads already, such as the matmul's tiles).
pub fn decode_span(k: &Kernels, q: &Stored<'_>, e0: usize, out: &mut [f32]) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    decode_piece(k, q, e0, OutType::F32, float::f32_bytes_mut(out))?;
    float::from_le_in_place(out);
    Ok(())
}

/// Decode the contiguous elements `e0..e0 + out.len() / 2` of `q` into `out` as little-endian
/// bf16 (the kernels' own rounding, as `decode_box` gives them), on the calling thread.
pub fn decode_span_bf16(k: &Kernels, q: &Stored<'_>, e0: usize, out: &mut [u8]) -> Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    decode_piece(k, q, e0, OutType::Bf16, out)
}

/// Decode the contiguous elements `e0..` into `out`, bytes of `t` (as many as it holds).
fn decode_piece(k: &Kernels, q: &Stored<'_>, e0: usize, t: OutType, out: &mut [u8]) -> Result<()> {
    let size = t.size();
    let e1 = e0 + out.len() / size;
    let (mut s_buf, mut m_buf) = (take_buffer(1), take_buffer(2));
    let mut result = Ok(());
    if q.layout.inner == 1 {
        // Groups along the last axis: their scales widened a chunk at a time, so the fp32
        // copy stays in cache (widened for the whole piece, NVFP4's were 4 MiB at 4096^2,
        // written and read back from memory).
        let l_len = q.layout.axis_len as usize;
        let g = (q.layout.group_size as usize).min(l_len);
        let mut c0 = e0;
        while c0 < e1 && result.is_ok() {
            let mut c1 = e1.min(c0 + WIDEN_CHUNK);
            let into = (c1 % l_len) % g;
            if c1 < e1 && c1 - into > c0 {
                c1 -= into; // end on a group's start
            }
            let window = scale_window(&q.layout, c0, c1);
            result = widen_scales(q, window.clone(), &mut s_buf, &mut m_buf);
            if result.is_ok() {
                let o = &mut out[(c0 - e0) * size..(c1 - e0) * size];
                decode_runs(k, q, c0, c1, window.start, &s_buf, &m_buf, t, o);
            }
            c0 = c1;
        }
    } else {
        let window = scale_window(&q.layout, e0, e1);
        // A piece that needs few of the scales in its window (a narrow column of a tensor
        // grouped along an earlier axis) widens them segment by segment instead.
        let per_segment = window.len() > 2 * (e1 - e0) + 64;
        // fp16 scales and mins go to the kernel as stored, widened as they are loaded: a
        // 4096-column row of them is 16 KiB where its fp32 copy was 32 KiB, which left L1
        // between the rows that share it.
        let stored = q.params.scale_dtype == DType::Float16;
        if !per_segment && !stored {
            result = widen_scales(q, window.clone(), &mut s_buf, &mut m_buf);
        }
        // Groups along an earlier axis: a row of scales and mins per row of `inner` elements.
        // (Blocks of 512-2048 columns through the rows, to keep those in L1 from row to row,
        // ran 0.4-0.9x as fast at 4096 columns: `benches/results/flexgen_columns.txt`.)
        for_each_segment(&q.layout, e0, e1, |seg| {
            if result.is_err() {
                return;
            }
            let o = &mut out[(seg.start - e0) * size..(seg.start - e0 + seg.len) * size];
            if stored {
                let b = 2 * seg.group..2 * (seg.group + seg.len);
                let m = if q.codec.has_mins() {
                    &q.mins[b.clone()]
                } else {
                    &[][..]
                };
                (k.dequant_vec_f16)(q.codec, q.codes, seg.start, &q.scales[b], m, t, o);
                return;
            }
            let w = if per_segment {
                let w = segment_window(&seg);
                if let Err(e) = widen_scales(q, w.clone(), &mut s_buf, &mut m_buf) {
                    result = Err(e);
                    return;
                }
                w
            } else {
                window.clone()
            };
            let g = seg.group - w.start;
            if seg.per_element {
                let m = if q.codec.has_mins() {
                    &m_buf[g..g + seg.len]
                } else {
                    &[][..]
                };
                let s = &s_buf[g..g + seg.len];
                (k.dequant_vec)(q.codec, q.codes, seg.start, s, m, t, o);
            } else {
                let m = if q.codec.has_mins() { m_buf[g] } else { 0.0 };
                (k.dequant_bcast)(q.codec, q.codes, seg.start, s_buf[g], m, t, o);
            }
        });
    }
    put_buffer(1, s_buf);
    put_buffer(2, m_buf);
    result
}

/// Elements whose scales `decode_piece` widens at a time, for groups along the last axis: 4096
/// NVFP4 scales (16 KiB of fp32), where a whole 4096^2 piece's were 4 MiB written to memory and
/// read back (and a temporary that grew with the tensor).
const WIDEN_CHUNK: usize = 65536;

/// Decode elements `e0..e1` of `q` (groups along the last axis) into `out` with the widened
/// scales and mins of the groups from `w0` on: runs of whole groups go to the kernel in one
/// call (a call per 64-element group, through the segment walker, cost as much as the
/// decoding).
#[allow(clippy::too_many_arguments)]
fn decode_runs(
    k: &Kernels,
    q: &Stored<'_>,
    e0: usize,
    e1: usize,
    w0: usize,
    s_buf: &[f32],
    m_buf: &[f32],
    t: OutType,
    out: &mut [u8],
) {
    let size = t.size();
    let l_len = q.layout.axis_len as usize;
    let g = (q.layout.group_size as usize).min(l_len);
    let g_len = q.layout.groups_along_axis as usize;
    let mut e = e0;
    while e < e1 {
        let l = e % l_len;
        // Rows made of whole groups chain into one run; a ragged last group ends it.
        let stop = if l_len.is_multiple_of(g) {
            e1
        } else {
            e1.min(e - l + l_len)
        };
        let kk = l / g;
        let into = l - kk * g;
        let len = if into > 0 {
            (g.min(l_len - kk * g) - into).min(stop - e)
        } else {
            stop - e
        };
        let gi = (e / l_len) * g_len + kk - w0..;
        let m = if q.codec.has_mins() {
            &m_buf[gi.clone()]
        } else {
            &[][..]
        };
        let o = &mut out[(e - e0) * size..(e - e0 + len) * size];
        // A run that starts inside a group is that group's rest: one "group" of `len`.
        let run_g = if into > 0 { len } else { g };
        (k.dequant_groups)(q.codec, q.codes, e, run_g, &s_buf[gi], m, t, o);
        e += len;
    }
}

/// The range of scale indices that elements `e0..e1` (non-empty) can use: every group-row
/// (one outer index, one group along the axis, every inner index) they touch.
pub(crate) fn scale_window(layout: &GroupLayout, e0: usize, e1: usize) -> Range<usize> {
    let q = layout.inner as usize;
    let l_len = layout.axis_len as usize;
    let gs = layout.group_size as usize;
    let g_len = layout.groups_along_axis as usize;
    let group_row = |e: usize| (e / (q * l_len)) * g_len + ((e / q) % l_len) / gs;
    group_row(e0) * q..(group_row(e1 - 1) + 1) * q
}

fn segment_window(seg: &Segment) -> Range<usize> {
    if seg.per_element {
        seg.group..seg.group + seg.len
    } else {
        seg.group..seg.group + 1
    }
}

/// Widen the stored scales (and mins) of `window` into the two buffers.
pub(crate) fn widen_scales(
    q: &Stored<'_>,
    window: Range<usize>,
    s_buf: &mut Vec<f32>,
    m_buf: &mut Vec<f32>,
) -> Result<()> {
    let size = q.params.scale_dtype.itemsize();
    let bytes = window.start * size..window.end * size;
    s_buf.resize(window.len(), 0.0);
    let scales = &q.scales[bytes.clone()];
    match q.params.scale_dtype {
        d @ (DType::Uint8 | DType::Float8E4m3fn) => fp4::widen_scales(scales, d, s_buf)?,
        d => float::widen_into(scales, d, s_buf)?,
    }
    if let Codec::Nvfp4 { .. } = q.codec {
        // A block's full scale is its E4M3 scale times the tensor scale, rounded once.
        let g = q.codec.tensor_scale();
        s_buf.iter_mut().for_each(|s| *s *= g);
    }
    if q.codec.has_mins() {
        m_buf.resize(window.len(), 0.0);
        float::widen_into(&q.mins[bytes], q.params.scale_dtype, m_buf)?;
    }
    Ok(())
}

/// Copy the box `runs` of a raw tensor's bytes (`size` bytes per element) into `out`.
pub fn copy_box(data: &[u8], size: usize, runs: &Runs, out: &mut [u8]) {
    if runs.len == 0 {
        return;
    }
    let min_runs = (CHUNK / runs.len).max(1);
    out.par_chunks_mut(runs.len * size)
        .with_min_len(min_runs)
        .enumerate()
        .for_each(|(i, run)| {
            let at = runs.start(i) * size;
            run.copy_from_slice(&data[at..at + run.len()]);
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Source indices of a box, one element at a time.
    fn reference(shape: &[u64], ranges: &[Range<u64>]) -> Vec<usize> {
        let mut out = vec![];
        let n: u64 = shape.iter().product();
        'e: for e in 0..n {
            let mut rest = e;
            for (d, r) in shape.iter().zip(ranges).rev() {
                if !r.contains(&(rest % d)) {
                    continue 'e;
                }
                rest /= d;
            }
            out.push(e as usize);
        }
        out
    }

    #[test]
    #[allow(clippy::single_range_in_vec_init)] // one range per dimension of a 1-D shape
    fn runs_enumerate_the_box_in_order() {
        let cases: &[(&[u64], &[Range<u64>])] = &[
            (&[4, 6], &[0..4, 0..6]),
            (&[4, 6], &[1..3, 0..6]),
            (&[4, 6], &[0..4, 2..5]),
            (&[3, 4, 5], &[1..3, 0..4, 1..2]),
            (&[3, 4, 5], &[0..3, 2..3, 0..5]),
            (&[3, 4, 5], &[2..3, 1..4, 0..5]),
            (&[7], &[3..6]),
            (&[], &[]),
            (&[2, 0, 3], &[0..2, 0..0, 0..3]),
        ];
        for (shape, ranges) in cases {
            let runs = Runs::new(shape, ranges);
            let got: Vec<usize> = (0..runs.count)
                .flat_map(|i| runs.start(i)..runs.start(i) + runs.len)
                .collect();
            assert_eq!(got, reference(shape, ranges), "{shape:?} {ranges:?}");
        }
    }

    /// Groups along axis 0 whose group-row is longer than CHUNK (a task per group-row), odd
    /// columns, a ragged last row group, whole and sliced boxes: every table writes each type
    /// bit for bit as the spec's value of each element, rounded to the type.
    #[test]
    fn axis0_decode_to_every_type_matches_per_element() {
        use crate::codecs::codec::read_code;
        use crate::codecs::simd::{available, scalar::put, tests::Rng};
        use half::f16;
        let (rows, cols, gs) = (133usize, 1031usize, 64u64);
        let shape = [rows as u64, cols as u64];
        let layout = GroupLayout::new(&shape, 0, gs).unwrap();
        assert!(piece_len(&layout) > CHUNK);
        let groups = layout.num_groups() as usize;
        let mut r = Rng::new(5);
        let mut halves = |n: usize, lo: f32, width: f32| -> Vec<u8> {
            (0..n)
                .flat_map(|_| f16::from_f32(lo + width * r.unit()).to_le_bytes())
                .collect()
        };
        let (scales, mins) = (halves(groups, 0.001, 0.2), halves(groups, -1.0, 2.0));
        for codec in [
            Codec::Affine { bits: 4 },
            Codec::Affine { bits: 8 },
            Codec::Symmetric { bits: 4 },
        ] {
            let bits = codec.bits();
            let codes = Rng::new(bits as u64).bytes((rows * cols * bits as usize).div_ceil(8));
            let params = GroupParams {
                bits,
                group_size: gs,
                axis: 0,
                scale_dtype: DType::Float16,
            };
            let q = Stored {
                codec,
                params: &params,
                layout,
                codes: &codes,
                scales: &scales,
                mins: if codec.has_mins() { &mins } else { &[] },
            };
            let half_at =
                |b: &[u8], g: usize| f16::from_le_bytes([b[2 * g], b[2 * g + 1]]).to_f32();
            let boxes: [[Range<u64>; 2]; 5] = [
                [0..133, 0..1031],
                [3..130, 0..1031],
                [0..133, 5..1000],
                [70..71, 1..1030],
                [1..133, 1000..1031],
            ];
            for ranges in boxes {
                let runs = Runs::new(&shape, &ranges);
                let elements: Vec<usize> = (0..runs.count)
                    .flat_map(|i| runs.start(i)..runs.start(i) + runs.len)
                    .collect();
                for t in OutType::ALL {
                    let mut want = vec![0u8; elements.len() * t.size()];
                    for (i, &e) in elements.iter().enumerate() {
                        let g = (e / cols / gs as usize) * cols + e % cols;
                        let m = if codec.has_mins() {
                            half_at(&mins, g)
                        } else {
                            0.0
                        };
                        let v = codec.decode(read_code(&codes, e, bits), half_at(&scales, g), m);
                        put(t, v, &mut want, i);
                    }
                    for k in available() {
                        let mut out = vec![0u8; want.len()];
                        decode_box(k, &q, &runs, t.dtype(), &mut out).unwrap();
                        assert!(out == want, "{} {codec:?} {t:?} {ranges:?}", k.name);
                    }
                }
            }
        }
    }

    #[test]
    fn full_box_is_one_run() {
        let runs = Runs::new(&[8, 16, 4], &[0..8, 0..16, 0..4]);
        assert_eq!((runs.count, runs.len), (1, 512));
    }
}
