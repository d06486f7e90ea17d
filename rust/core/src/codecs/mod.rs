//! Quantize and dequantize whole tensors: group statistics, codes, and the reverse, split across
//! threads with rayon and run through the fastest kernel table of the CPU.

pub mod codec;
pub mod float;
pub mod segments;
pub mod simd;

use rayon::prelude::*;

pub use codec::{Codec, NF4_LEVELS};
use segments::for_each_segment;
pub use simd::Kernels;

use crate::error::{Error, Result};
use crate::format::{encoding::packed_len, GroupLayout, GroupParams};

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
}

fn layout_for(shape: &[u64], p: &GroupParams) -> Result<GroupLayout> {
    GroupLayout::new(shape, p.axis, p.group_size)
}

/// Quantize `x` (row-major, shape `shape`) with `codec` and `params`.
pub fn quantize(
    k: &Kernels,
    codec: Codec,
    params: &GroupParams,
    shape: &[u64],
    x: &[f32],
) -> Result<Quantized> {
    let layout = layout_for(shape, params)?;
    if layout.numel() as usize != x.len() {
        return Err(Error::Invalid(format!(
            "{} values do not fill shape {shape:?}",
            x.len()
        )));
    }
    let n_groups = layout.num_groups() as usize;
    let mut scales = vec![0f32; n_groups];
    let mut mins = vec![0f32; n_groups];
    let mut invs = vec![0f32; n_groups];
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
    if !codec.has_mins() {
        mins = Vec::new();
    }

    let bits = codec.bits() as usize;
    let n = x.len();
    let mut codes = vec![0u8; packed_len(n as u64, codec.bits()).unwrap() as usize];
    let mids = codec::nf4_midpoints();
    codes
        .par_chunks_mut(CHUNK * bits / 8)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let e0 = ci * CHUNK;
            let e1 = (e0 + CHUNK).min(n);
            for_each_segment(&layout, e0, e1, |seg| {
                let xs = &x[seg.start..seg.start + seg.len];
                let first = seg.start - e0;
                if seg.per_element {
                    let g = seg.group..seg.group + seg.len;
                    let m = if codec.has_mins() {
                        &mins[g.clone()]
                    } else {
                        &[][..]
                    };
                    (k.encode_vec)(codec, xs, &invs[g], m, &mids, chunk, first);
                } else {
                    let m = if codec.has_mins() {
                        mins[seg.group]
                    } else {
                        0.0
                    };
                    (k.encode_bcast)(codec, xs, invs[seg.group], m, &mids, chunk, first);
                }
            });
        });
    Ok(Quantized {
        codes,
        scales,
        mins,
    })
}

/// Turn group statistics into stored scale, stored min and inverse scale (spec 4.5-4.7).
#[inline]
fn finish_group(codec: Codec, params: &GroupParams, lo: f32, hi: f32) -> Result<(f32, f32, f32)> {
    let (s_raw, m_raw) = codec.raw_params(lo, hi);
    let s = float::store_scale(s_raw, params.scale_dtype);
    let m = float::store_scale(m_raw, params.scale_dtype);
    if !s.is_finite() || !m.is_finite() {
        return Err(Error::Quantization(format!(
            "a group's scale ({s_raw:e}) or min ({m_raw:e}) does not fit in {}: use scale_dtype=\"float32\"",
            params.scale_dtype
        )));
    }
    let inv = if s == 0.0 { 0.0 } else { 1.0 / s };
    Ok((s, m, inv))
}

fn non_finite() -> Error {
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
    x: &[f32],
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
    let has_mins = codec.has_mins();
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
                    let xs = &x[start..(start + gs).min(p * l_len + l_len)];
                    let (lo, hi, finite) = if has_mins {
                        (k.min_max)(xs)
                    } else {
                        let (a, f) = (k.abs_max)(xs);
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
            let l1 = (l0 + gs).min(l_len);
            let mut lo = vec![f32::INFINITY; q_len];
            let mut hi = vec![if has_mins { f32::NEG_INFINITY } else { 0.0 }; q_len];
            for l in l0..l1 {
                let start = (p * l_len + l) * q_len;
                let xs = &x[start..start + q_len];
                let finite = if has_mins {
                    (k.min_max_vec)(xs, &mut lo, &mut hi)
                } else {
                    (k.abs_max_vec)(xs, &mut hi)
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

/// Dequantize into `out` (fp32, row-major). `mins` is empty unless the codec has mins.
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
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(ci, chunk)| {
            let e0 = ci * CHUNK;
            for_each_segment(&layout, e0, e0 + chunk.len(), |seg| {
                let o = &mut chunk[seg.start - e0..seg.start - e0 + seg.len];
                if seg.per_element {
                    let g = seg.group..seg.group + seg.len;
                    let m = if codec.has_mins() {
                        &mins[g.clone()]
                    } else {
                        &[][..]
                    };
                    (k.dequant_vec)(codec, codes, seg.start, &scales[g], m, o);
                } else {
                    let m = if codec.has_mins() {
                        mins[seg.group]
                    } else {
                        0.0
                    };
                    (k.dequant_bcast)(codec, codes, seg.start, scales[seg.group], m, o);
                }
            });
        });
    Ok(())
}
