//! Quantize and dequantize whole tensors: group statistics, codes, and the reverse, split across
//! threads with rayon and run through the fastest kernel table of the CPU.

pub mod codec;
pub mod compress;
pub mod float;
pub mod fp4;
pub mod region;
pub mod segments;
pub mod simd;

use rayon::prelude::*;

pub use codec::{Codec, NF4_LEVELS};
use segments::for_each_segment;
pub use simd::{InType, Kernels, OutType, Values};

use std::cell::RefCell;

use crate::error::{Error, Result};
use crate::format::{encoding::packed_len, DType, GroupLayout, GroupParams};

/// Elements per parallel task: a multiple of 8 so every task owns whole bytes of codes at any
/// bit width, and small enough (256 KiB of fp32) to stay in L2.
pub const CHUNK: usize = 1 << 16;

/// A quantized tensor in memory: codes packed, scales and mins as the fp32 values of their stored
/// (already rounded) form.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    /// Empty unless the codec has mins.
    pub mins: Vec<f32>,
    /// The NVFP4 tensor scale (1.0 for the other codecs).
    pub tensor_scale: f32,
}

/// The values to quantize: fp32, or little-endian bytes of a float dtype. The kernels read fp32,
/// fp16 and bf16 as they are (widening in registers); float64 is rounded to fp32 block by block
/// inside the threads (no whole-tensor fp32 copy).
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// fp32 values, row-major (the fast path: no copy).
    F32(&'a [f32]),
    /// Little-endian bytes of a float dtype, row-major; build with `Source::from_bytes`.
    Bytes(&'a [u8], DType),
}

impl<'a> Source<'a> {
    /// Values given as little-endian bytes of `dtype` (any alignment: the kernels read them in
    /// place).
    pub fn from_bytes(bytes: &'a [u8], dtype: DType) -> Result<Self> {
        if !dtype.is_quantizable_float() || !bytes.len().is_multiple_of(dtype.itemsize()) {
            return Err(Error::Invalid(format!(
                "{} bytes of {dtype} cannot be quantized: only whole float16, bfloat16, float32 \
                 and float64 values can",
                bytes.len()
            )));
        }
        Ok(Source::Bytes(bytes, dtype))
    }

    fn len(&self) -> usize {
        match self {
            Source::F32(x) => x.len(),
            Source::Bytes(b, d) => b.len() / d.itemsize(),
        }
    }

    /// Elements `a..b` as the kernels read them: a view of the input, or (float64, and fp32 on
    /// big-endian targets) an fp32 copy in a buffer recycled per thread (a fresh allocation per
    /// task costs an mmap and page faults larger than the work).
    fn range(&self, a: usize, b: usize) -> Result<Block<'a>> {
        match *self {
            #[cfg(target_endian = "little")]
            Source::F32(x) => Ok(Block::View(Values::f32(&x[a..b]))),
            Source::Bytes(bytes, d) if InType::of(d).is_some() => {
                let t = InType::of(d).unwrap();
                let bytes = &bytes[a * t.size()..b * t.size()];
                Ok(Block::View(Values { bytes, t }))
            }
            _ => {
                let mut buf = SPARE.with(|s| s.borrow_mut().pop()).unwrap_or_default();
                buf.resize(b - a, 0.0);
                match *self {
                    Source::F32(x) => buf.copy_from_slice(&x[a..b]),
                    Source::Bytes(bytes, d) => {
                        let size = d.itemsize();
                        float::widen_into(&bytes[a * size..b * size], d, &mut buf)?;
                    }
                }
                // The kernels read little-endian bytes.
                for v in buf.iter_mut() {
                    *v = f32::from_bits(v.to_bits().to_le());
                }
                Ok(Block::Widened(buf))
            }
        }
    }
}

thread_local! {
    static SPARE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Values of a block of elements; a widened buffer goes back to its thread's spares on drop.
enum Block<'a> {
    View(Values<'a>),
    /// Little-endian fp32 bytes in an f32 buffer.
    Widened(Vec<f32>),
}

impl Block<'_> {
    fn values(&self) -> Values<'_> {
        match self {
            Block::View(v) => *v,
            Block::Widened(v) => {
                // SAFETY: same memory; u8 has no alignment or validity requirement.
                let bytes = unsafe {
                    std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(&v[..]))
                };
                Values {
                    bytes,
                    t: InType::F32,
                }
            }
        }
    }
}

impl Drop for Block<'_> {
    fn drop(&mut self) {
        if let Block::Widened(v) = self {
            let v = std::mem::take(v);
            // Keep a couple per thread; whole-tensor buffers (two-pass path) are freed.
            if v.capacity() <= 4 * CHUNK * 16 {
                SPARE.with(|s| {
                    let mut s = s.borrow_mut();
                    if s.len() < 2 {
                        s.push(v);
                    }
                });
            }
        }
    }
}

/// A zeroed Vec whose pages are touched by the calling thread. `vec![0; n]` maps fresh zero pages
/// that the worker threads would then fault in concurrently, and on virtual machines concurrent
/// first-touch faults contend so badly that two threads ran slower than one
/// (`RAYON_NUM_THREADS=2 python3 benches/bench_codecs.py` shows the scaling).
pub fn zeroed_here<T: Copy + Default>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, T::default());
    v
}

fn layout_for(shape: &[u64], p: &GroupParams) -> Result<GroupLayout> {
    GroupLayout::new(shape, p.axis, p.group_size)
}

/// Quantize `x` (row-major, shape `shape`) with `codec` and `params` (an NVFP4 codec's tensor
/// scale is computed from `x`, whatever it holds).
pub fn quantize(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    shape: &[u64],
    x: &[f32],
) -> Result<Quantized> {
    quantize_with(k, codec, params, shape, Source::F32(x), true)
}

/// Quantize values given as fp32 or as bytes of another float dtype.
pub fn quantize_source(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    shape: &[u64],
    src: Source<'_>,
) -> Result<Quantized> {
    quantize_with(k, codec, params, shape, src, true)
}

/// `fuse`: allow the one-pass path where the layout permits (tests compare both paths).
fn quantize_with(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    shape: &[u64],
    src: Source<'_>,
    fuse: bool,
) -> Result<Quantized> {
    let layout = layout_for(shape, params)?;
    if layout.numel() as usize != src.len() {
        return Err(Error::Invalid(format!(
            "{} values do not fill shape {shape:?}",
            src.len()
        )));
    }
    // NVFP4's tensor scale comes from the whole tensor, before any block.
    let codec = match codec {
        Codec::Nvfp4 { .. } => Codec::nvfp4(fp4::nvfp4_tensor_scale(fp4::tensor_amax(k, src)?)),
        c => c,
    };
    let n_groups = layout.num_groups() as usize;
    let mut scales = zeroed_here(n_groups);
    let mut mins = zeroed_here(n_groups);
    let bits = codec.bits() as usize;
    let n = src.len();
    let mut codes = zeroed_here(packed_len(n as u64, codec.bits()).unwrap() as usize);
    let mids = codec::nf4_midpoints();

    let fused = fuse
        && quantize_fused(
            k,
            codec,
            params,
            &layout,
            src,
            &mut scales,
            &mut mins,
            &mut codes,
            &mids,
        )?;
    if !fused {
        // The two-pass path reads the tensor twice: float64 is rounded once.
        let block = src.range(0, n)?;
        let x = block.values();
        let mut invs = zeroed_here(n_groups);
        group_params(
            k,
            codec,
            params,
            &layout,
            x,
            &mut scales,
            &mut mins,
            &mut invs,
        )?;
        codes
            .par_chunks_mut(CHUNK * bits / 8)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let e0 = ci * CHUNK;
                let e1 = (e0 + CHUNK).min(n);
                for_each_segment(&layout, e0, e1, |seg| {
                    let xs = x.slice(seg.start, seg.start + seg.len);
                    let first = seg.start - e0;
                    if seg.per_element {
                        let g = seg.group..seg.group + seg.len;
                        let m = if codec.has_mins() {
                            &mins[g.clone()]
                        } else {
                            &[][..]
                        };
                        (k.encode_vec)(codec, xs.t, xs.bytes, &invs[g], m, &mids, chunk, first);
                    } else {
                        let m = if codec.has_mins() {
                            mins[seg.group]
                        } else {
                            0.0
                        };
                        let inv = invs[seg.group];
                        (k.encode_bcast)(codec, xs.t, xs.bytes, inv, m, &mids, chunk, first);
                    }
                });
            });
    }
    if !codec.has_mins() {
        mins = Vec::new();
    }
    Ok(Quantized {
        codes,
        scales,
        mins,
        tensor_scale: codec.tensor_scale(),
    })
}

/// Statistics, parameters and codes of each block of groups in one pass while the block is in
/// cache, instead of two passes over the tensor (which is then read from memory twice).
///
/// Tasks are runs of group-rows (one outer index, one group along the axis, every inner index:
/// contiguous elements and scales), so they need each group-row to start on a code-byte boundary.
/// Returns false, having done nothing, where that fails or where too few tasks would leave
/// threads idle; the two-pass path computes the same results.
#[allow(clippy::too_many_arguments)]
fn quantize_fused(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    layout: &GroupLayout,
    src: Source<'_>,
    scales: &mut [f32],
    mins: &mut [f32],
    codes: &mut [u8],
    mids: &[f32; 15],
) -> Result<bool> {
    let n = src.len();
    let l_len = layout.axis_len as usize;
    let q_len = layout.inner as usize;
    let g_len = layout.groups_along_axis as usize;
    let bits = codec.bits() as usize;
    if n == 0 {
        return Ok(false);
    }
    // Elements along the axis per group (a group larger than the axis is the whole axis).
    let gs = (layout.group_size as usize).min(l_len);
    if !(gs * q_len * bits).is_multiple_of(8) || !(l_len * q_len * bits).is_multiple_of(8) {
        return Ok(false);
    }
    let rows = layout.outer as usize * g_len;
    let per_task = (CHUNK / (gs * q_len)).max(1);
    let n_tasks = rows.div_ceil(per_task);
    if n > CHUNK && n_tasks < rayon::current_num_threads() {
        return Ok(false);
    }
    // First element of group-row `j`.
    let start = |j: usize| {
        if j >= rows {
            n
        } else {
            ((j / g_len) * l_len + (j % g_len) * gs) * q_len
        }
    };
    let has_mins = codec.has_mins();
    let signed = codec.signed_stats();

    let mut tasks = Vec::with_capacity(n_tasks);
    let (mut c_rest, mut s_rest, mut m_rest) = (codes, scales, mins);
    for t in 0..n_tasks {
        let (j0, j1) = (t * per_task, ((t + 1) * per_task).min(rows));
        let e0 = start(j0);
        let nb = if j1 == rows {
            c_rest.len()
        } else {
            (start(j1) - e0) * bits / 8
        };
        let (c, rest) = std::mem::take(&mut c_rest).split_at_mut(nb);
        c_rest = rest;
        let (s, rest) = std::mem::take(&mut s_rest).split_at_mut((j1 - j0) * q_len);
        s_rest = rest;
        let (m, rest) = std::mem::take(&mut m_rest).split_at_mut((j1 - j0) * q_len);
        m_rest = rest;
        tasks.push((j0, j1, e0, c, s, m));
    }

    tasks
        .into_par_iter()
        .try_for_each(|(j0, j1, e0, c, s, m)| -> Result<()> {
            if q_len == 1 {
                // Each group-row is one group of contiguous elements. Batches of groups (in L1)
                // go through statistics, parameters and codes in turn, so that the divisions and
                // scale roundings of different groups overlap instead of forming one chain.
                const BATCH: usize = 64;
                let (mut lo, mut hi, mut inv) = ([0f32; BATCH], [0f32; BATCH], [0f32; BATCH]);
                for b0 in (j0..j1).step_by(BATCH) {
                    let b1 = (b0 + BATCH).min(j1);
                    // The batch's elements (float64 rounded to fp32 a batch at a time, into L1).
                    let base = start(b0);
                    let block = src.range(base, start(b1))?;
                    let x = block.values();
                    for j in b0..b1 {
                        let xs = x.slice(start(j) - base, start(j + 1) - base);
                        let (l, h, finite) = if signed {
                            (k.min_max)(xs.t, xs.bytes)
                        } else {
                            let (h, f) = (k.abs_max)(xs.t, xs.bytes);
                            (0.0, h, f)
                        };
                        if !finite {
                            return Err(non_finite());
                        }
                        (lo[j - b0], hi[j - b0]) = (l, h);
                    }
                    let nb = b1 - b0;
                    finish_groups(
                        codec,
                        params,
                        &lo[..nb],
                        &hi[..nb],
                        &mut s[b0 - j0..b1 - j0],
                        &mut m[b0 - j0..b1 - j0],
                        &mut inv[..nb],
                    )?;
                    for j in b0..b1 {
                        let (a, b) = (start(j), start(j + 1));
                        let mb = if has_mins { m[j - j0] } else { 0.0 };
                        let xs = x.slice(a - base, b - base);
                        (k.encode_bcast)(codec, xs.t, xs.bytes, inv[j - b0], mb, mids, c, a - e0);
                    }
                }
                return Ok(());
            }
            // This task's elements (float64 rounded to fp32 here).
            let block = src.range(e0, start(j1))?;
            let x = block.values();
            // Groups along an earlier axis: columns in tiles of about CHUNK elements per group,
            // statistics over the tile's rows, then its codes while the rows are still cached.
            let w = ((CHUNK / gs).max(8) & !7).min(q_len);
            let (mut lo, mut hi, mut inv) = (vec![0f32; w], vec![0f32; w], vec![0f32; w]);
            for j in j0..j1 {
                let (p, kk) = (j / g_len, j % g_len);
                let l0 = kk * gs;
                let l1 = l0 + gs.min(l_len - l0);
                let sb = (j - j0) * q_len;
                for q0 in (0..q_len).step_by(w) {
                    let q1 = (q0 + w).min(q_len);
                    let wq = q1 - q0;
                    lo[..wq].fill(f32::INFINITY);
                    hi[..wq].fill(if signed { f32::NEG_INFINITY } else { 0.0 });
                    for l in l0..l1 {
                        let r = (p * l_len + l) * q_len;
                        let xs = x.slice(r + q0 - e0, r + q1 - e0);
                        let finite = if signed {
                            (k.min_max_vec)(xs.t, xs.bytes, &mut lo[..wq], &mut hi[..wq])
                        } else {
                            (k.abs_max_vec)(xs.t, xs.bytes, &mut hi[..wq])
                        };
                        if !finite {
                            return Err(non_finite());
                        }
                    }
                    let g = sb + q0..sb + q1;
                    finish_groups(
                        codec,
                        params,
                        &lo[..wq],
                        &hi[..wq],
                        &mut s[g.clone()],
                        &mut m[g],
                        &mut inv[..wq],
                    )?;
                    let mv = if has_mins {
                        &m[sb + q0..sb + q1]
                    } else {
                        &[][..]
                    };
                    for l in l0..l1 {
                        let r = (p * l_len + l) * q_len;
                        let xs = x.slice(r + q0 - e0, r + q1 - e0);
                        let iv = &inv[..wq];
                        (k.encode_vec)(codec, xs.t, xs.bytes, iv, mv, mids, c, r + q0 - e0);
                    }
                }
            }
            Ok(())
        })?;
    Ok(true)
}

/// `finish_group` for a batch of groups, as array operations: the divisions vectorize and the
/// roundings to fp16/bf16 go through F16C where the CPU has it. Results are identical.
#[allow(clippy::too_many_arguments)]
fn finish_groups(
    codec: Codec,
    params: &GroupParams,
    lo: &[f32],
    hi: &[f32],
    s: &mut [f32],
    m: &mut [f32],
    inv: &mut [f32],
) -> Result<()> {
    for i in 0..lo.len() {
        (s[i], m[i]) = codec.raw_params(lo[i], hi[i]);
    }
    float::store_scales(s, params.scale_dtype);
    float::store_scales(m, params.scale_dtype);
    let mut finite = true;
    for i in 0..lo.len() {
        // `+ 0.0`: see finish_group.
        s[i] += 0.0;
        m[i] += 0.0;
        finite &= s[i].is_finite() & m[i].is_finite();
        inv[i] = codec.encode_factor(s[i]);
    }
    if !finite {
        // Rare: redo one by one for the message of the first failing group.
        for i in 0..lo.len() {
            finish_group(codec, params, lo[i], hi[i])?;
        }
    }
    Ok(())
}

/// Turn group statistics into stored scale, stored min and inverse scale (spec 4.5-4.7).
#[inline]
fn finish_group(codec: Codec, params: &GroupParams, lo: f32, hi: f32) -> Result<(f32, f32, f32)> {
    let (s_raw, m_raw) = codec.raw_params(lo, hi);
    // `+ 0.0` stores a zero scale or min as +0.0 whichever zero min/max picked (spec 4.5).
    let s = float::store_scale(s_raw, params.scale_dtype) + 0.0;
    let m = float::store_scale(m_raw, params.scale_dtype) + 0.0;
    if !s.is_finite() || !m.is_finite() {
        return Err(Error::Quantization(format!(
            "a group's scale ({s_raw:e}) or min ({m_raw:e}) does not fit in {}: use scale_dtype=\"float32\"",
            params.scale_dtype
        )));
    }
    Ok((s, m, codec.encode_factor(s)))
}

pub(crate) fn non_finite() -> Error {
    Error::Quantization(
        "tensor holds NaN or infinite values, which cannot be quantized: store it raw or clean it"
            .into(),
    )
}

#[allow(clippy::too_many_arguments)]
fn group_params(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    layout: &GroupLayout,
    x: Values<'_>,
    scales: &mut [f32],
    mins: &mut [f32],
    invs: &mut [f32],
) -> Result<()> {
    let l_len = layout.axis_len as usize;
    let q_len = layout.inner as usize;
    let gs = layout.group_size as usize;
    let g_len = layout.groups_along_axis as usize;
    if scales.is_empty() {
        return Ok(());
    }
    let signed = codec.signed_stats();
    if q_len == 1 {
        // Groups are contiguous runs: one task per block of groups.
        const GROUPS_PER_TASK: usize = 1024;
        return scales
            .par_chunks_mut(GROUPS_PER_TASK)
            .zip(mins.par_chunks_mut(GROUPS_PER_TASK))
            .zip(invs.par_chunks_mut(GROUPS_PER_TASK))
            .enumerate()
            .try_for_each(|(ti, ((sc, mn), iv))| -> Result<()> {
                for j in 0..sc.len() {
                    let g = ti * GROUPS_PER_TASK + j;
                    let (p, kk) = (g / g_len, g % g_len);
                    let start = p * l_len + kk * gs;
                    let xs = x.slice(start, start.saturating_add(gs).min(p * l_len + l_len));
                    let (lo, hi, finite) = if signed {
                        (k.min_max)(xs.t, xs.bytes)
                    } else {
                        let (a, f) = (k.abs_max)(xs.t, xs.bytes);
                        (0.0, a, f)
                    };
                    if !finite {
                        return Err(non_finite());
                    }
                    (sc[j], mn[j], iv[j]) = finish_group(codec, params, lo, hi)?;
                }
                Ok(())
            });
    }
    // Groups along an earlier axis: one scale row (Q wide) per (p, group), statistics taken
    // elementwise over the group's rows.
    scales
        .par_chunks_mut(q_len)
        .zip(mins.par_chunks_mut(q_len))
        .zip(invs.par_chunks_mut(q_len))
        .enumerate()
        .try_for_each(|(row, ((sc, mn), iv))| -> Result<()> {
            let (p, kk) = (row / g_len, row % g_len);
            let l0 = kk * gs;
            let l1 = l0.saturating_add(gs).min(l_len);
            let mut lo = vec![f32::INFINITY; q_len];
            let mut hi = vec![if signed { f32::NEG_INFINITY } else { 0.0 }; q_len];
            for l in l0..l1 {
                let start = (p * l_len + l) * q_len;
                let xs = x.slice(start, start + q_len);
                let finite = if signed {
                    (k.min_max_vec)(xs.t, xs.bytes, &mut lo, &mut hi)
                } else {
                    (k.abs_max_vec)(xs.t, xs.bytes, &mut hi)
                };
                if !finite {
                    return Err(non_finite());
                }
            }
            for q in 0..q_len {
                (sc[q], mn[q], iv[q]) = finish_group(codec, params, lo[q], hi[q])?;
            }
            Ok(())
        })
}

/// Dequantize into `out` (fp32, row-major). `mins` is empty unless the codec has mins; scales
/// and mins are the fp32 values of their stored form. Runs the one decode driver,
/// `region::decode_box`, over the whole tensor.
#[allow(clippy::too_many_arguments)]
pub fn dequantize(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    shape: &[u64],
    codes: &[u8],
    scales: &[f32],
    mins: &[f32],
    out: &mut [f32],
) -> Result<()> {
    let layout = layout_for(shape, params)?;
    let n = layout.numel() as usize;
    let n_groups = layout.num_groups() as usize;
    if out.len() != n
        || codes.len() != packed_len(n as u64, codec.bits()).unwrap() as usize
        || scales.len() != n_groups
        || mins.len() != if codec.has_mins() { n_groups } else { 0 }
    {
        return Err(Error::Invalid(format!(
            "parts do not match shape {shape:?}: {} code bytes, {} scales, {} mins for {n} elements",
            codes.len(),
            scales.len(),
            mins.len()
        )));
    }
    // The fp32 values of the stored scales are exact, so decoding them as fp32 scales is the same.
    let params = GroupParams {
        scale_dtype: DType::Float32,
        ..*params
    };
    let stored = region::Stored {
        codec: codec.decoder(),
        params: &params,
        layout,
        codes,
        scales: &float::f32_le_bytes(scales),
        mins: &float::f32_le_bytes(mins),
    };
    let full: Vec<std::ops::Range<u64>> = shape.iter().map(|&d| 0..d).collect();
    let runs = region::Runs::new(shape, &full);
    region::decode_box(k, &stored, &runs, DType::Float32, float::f32_bytes_mut(out))?;
    float::from_le_in_place(out);
    Ok(())
}

#[cfg(test)]
mod tests;
