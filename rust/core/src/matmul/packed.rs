//! Dot products straight over packed 4-bit codes (batch 1..=8, groups along the input axis).
//!
//! Per group, the 16 values its codes can decode to (`level * s + m`, the same multiply and add
//! as `dequantize`) are put in one vector; 32 codes (16 bytes) are then widened to lanes and
//! looked up with two permutes, low nibbles and high nibbles. To skip re-interleaving nibbles,
//! the activations are reordered once per call so that each block of 32 holds its even
//! elements, then its odd ones (`interleave`).

use crate::codecs::float;
use crate::codecs::region::Stored;
use crate::codecs::Codec;
use crate::error::Result;

/// Elements per block of codes (16 bytes of 4-bit codes).
const BLOCK: usize = 32;

/// What the packed kernel needs to know about a weight it can multiply.
pub struct Plan {
    codec: Codec,
    n_in: usize,
    /// Elements per group along the input axis (a multiple of `BLOCK`).
    group: usize,
    groups_per_row: usize,
    batch: usize,
}

impl Plan {
    /// A plan if the packed kernel applies: 4-bit codes grouped along the inputs in whole
    /// blocks, batch 1..=8, and a CPU with AVX-512F.
    pub fn new(w: &Stored<'_>, n_in: usize, batch: usize) -> Option<Plan> {
        let four_bit = matches!(
            w.codec,
            Codec::Affine { bits: 4 } | Codec::Symmetric { bits: 4 } | Codec::Nf4
        );
        let group = (w.layout.group_size as usize).min(n_in);
        let fits = four_bit
            && (1..=8).contains(&batch)
            && w.layout.inner == 1
            && w.layout.axis_len as usize == n_in
            && n_in.is_multiple_of(BLOCK)
            && group.is_multiple_of(BLOCK);
        (fits && kernel::available()).then_some(Plan {
            codec: w.codec,
            n_in,
            group,
            groups_per_row: w.layout.groups_along_axis as usize,
            batch,
        })
    }

    /// A plan for rows of 4-bit codes without scales: `levels` multiplies them by their
    /// levels alone (`code`, `code - 8` or NF4's), one group per row. For `outgroups`, which
    /// folds each row's scales into the activations.
    pub fn levels_only(codec: Codec, n_in: usize, batch: usize) -> Option<Plan> {
        let four_bit = matches!(
            codec,
            Codec::Affine { bits: 4 }
                | Codec::Symmetric { bits: 4 }
                | Codec::SymmetricFull { bits: 4 }
                | Codec::Nf4
        );
        let fits = four_bit && (1..=8).contains(&batch) && n_in.is_multiple_of(BLOCK);
        (fits && n_in > 0 && kernel::available()).then_some(Plan {
            codec,
            n_in,
            group: n_in,
            groups_per_row: 1,
            batch,
        })
    }

    /// `yt[o][b] = sum_k level(codes[o][k]) * xp[b][k]` for the rows of `codes` (`n_in / 2`
    /// bytes each) that `yt` holds, with a plan of `levels_only`; `xp` is `interleave`d.
    pub fn levels(&self, codes: &[u8], xp: &[f32], yt: &mut [f32]) {
        assert!(self.groups_per_row == 1 && self.group == self.n_in);
        let n_rows = yt.len() / self.batch;
        let (ones, zeros) = (vec![1f32; n_rows], vec![0f32; n_rows]);
        assert!(codes.len() >= n_rows * self.n_in / 2 && xp.len() == self.batch * self.n_in);
        // SAFETY: `levels_only` checked the CPU; the slices have the sizes the kernel reads. A
        // group's table is `level * 1 + 0`: the levels exactly.
        unsafe { kernel::rows(self, codes, &ones, &zeros, xp, yt) };
    }

    /// `yt[o][b] = W[r0 + o] . x[b]` for the rows `yt` holds; `xp` is `interleave`d.
    pub fn rows(&self, w: &Stored<'_>, xp: &[f32], r0: usize, yt: &mut [f32]) -> Result<()> {
        let n_rows = yt.len() / self.batch;
        let gpr = self.groups_per_row;
        let window = r0 * gpr..(r0 + n_rows) * gpr;
        let size = w.params.scale_dtype.itemsize();
        let mut s = vec![0f32; window.len()];
        float::widen_into(
            &w.scales[window.start * size..window.end * size],
            w.params.scale_dtype,
            &mut s,
        )?;
        let mut m = Vec::new();
        if w.codec.has_mins() {
            m.resize(window.len(), 0.0);
            let bytes = &w.mins[window.start * size..window.end * size];
            float::widen_into(bytes, w.params.scale_dtype, &mut m)?;
        }
        let row_bytes = self.n_in / 2;
        let codes = &w.codes[r0 * row_bytes..(r0 + n_rows) * row_bytes];
        assert!(xp.len() == self.batch * self.n_in);
        // SAFETY: `Plan::new` checked the CPU; the slices have the sizes the kernel reads.
        unsafe { kernel::rows(self, codes, &s, &m, xp, yt) };
        Ok(())
    }
}

/// `x` (rows of `n_in`, a multiple of `BLOCK`) with each block of 32 reordered as its 16 even
/// elements, then its 16 odd ones: the order of low and high nibbles of 16 code bytes.
pub fn interleave(x: &[f32], n_in: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (o, b) in out.chunks_exact_mut(BLOCK).zip(x.chunks_exact(BLOCK)) {
        for t in 0..BLOCK / 2 {
            o[t] = b[2 * t];
            o[BLOCK / 2 + t] = b[2 * t + 1];
        }
    }
    debug_assert!(n_in.is_multiple_of(BLOCK));
    out
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::Plan;
    use crate::codecs::{Codec, NF4_LEVELS};

    const AFF: u8 = 0;
    const SYM: u8 = 1;
    const NF4: u8 = 2;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
    }

    /// Dispatch on codec and batch: two weight rows at a time up to batch 4 (more independent
    /// sums to hide the multiply-add latency), one above (registers).
    pub unsafe fn rows(p: &Plan, codes: &[u8], s: &[f32], m: &[f32], xp: &[f32], yt: &mut [f32]) {
        macro_rules! by_batch {
            ($k:ident) => {
                match p.batch {
                    1 => run::<$k, 1, 2>(p, codes, s, m, xp, yt),
                    2 => run::<$k, 2, 2>(p, codes, s, m, xp, yt),
                    3 => run::<$k, 3, 2>(p, codes, s, m, xp, yt),
                    4 => run::<$k, 4, 2>(p, codes, s, m, xp, yt),
                    5 => run::<$k, 5, 1>(p, codes, s, m, xp, yt),
                    6 => run::<$k, 6, 1>(p, codes, s, m, xp, yt),
                    7 => run::<$k, 7, 1>(p, codes, s, m, xp, yt),
                    _ => run::<$k, 8, 1>(p, codes, s, m, xp, yt),
                }
            };
        }
        match p.codec {
            Codec::Affine { .. } => by_batch!(AFF),
            Codec::Symmetric { .. } | Codec::SymmetricFull { .. } => by_batch!(SYM),
            Codec::Nf4 => by_batch!(NF4),
            Codec::Mxfp4 | Codec::Nvfp4 { .. } => unreachable!("Plan::new excludes FP4"),
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    unsafe fn run<const K: u8, const NB: usize, const R: usize>(
        p: &Plan,
        codes: &[u8],
        s: &[f32],
        m: &[f32],
        xp: &[f32],
        yt: &mut [f32],
    ) {
        let n_rows = yt.len() / NB;
        let (gpr, row_bytes) = (p.groups_per_row, p.n_in / 2);
        assert!(codes.len() >= n_rows * row_bytes && s.len() >= n_rows * gpr);
        assert!(K != AFF || m.len() >= n_rows * gpr);
        let mut r = 0;
        while r + R <= n_rows {
            let mp = if K == AFF {
                m.as_ptr().add(r * gpr)
            } else {
                m.as_ptr()
            };
            rows_dot::<K, NB, R>(
                p,
                codes.as_ptr().add(r * row_bytes),
                s.as_ptr().add(r * gpr),
                mp,
                xp.as_ptr(),
                yt.as_mut_ptr().add(r * NB),
            );
            r += R;
        }
        if r < n_rows {
            let mp = if K == AFF {
                m.as_ptr().add(r * gpr)
            } else {
                m.as_ptr()
            };
            rows_dot::<K, NB, 1>(
                p,
                codes.as_ptr().add(r * row_bytes),
                s.as_ptr().add(r * gpr),
                mp,
                xp.as_ptr(),
                yt.as_mut_ptr().add(r * NB),
            );
        }
    }

    /// The 16 levels of the codec (`code`, `code - 8` or NF4's).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn levels<const K: u8>() -> __m512 {
        match K {
            AFF => _mm512_setr_ps(
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                15.0,
            ),
            SYM => _mm512_setr_ps(
                -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0,
                7.0,
            ),
            _ => _mm512_loadu_ps(NF4_LEVELS.as_ptr()),
        }
    }

    /// `y[r * NB + b] = W[r] . x[b]` for R consecutive weight rows starting at `codes`.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn rows_dot<const K: u8, const NB: usize, const R: usize>(
        p: &Plan,
        codes: *const u8,
        s: *const f32,
        m: *const f32,
        x: *const f32,
        y: *mut f32,
    ) {
        let (n_in, g, gpr, row_bytes) = (p.n_in, p.group, p.groups_per_row, p.n_in / 2);
        let lv = levels::<K>();
        // Low and high nibbles accumulate apart: two independent chains per row and batch.
        let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; R];
        for j in 0..gpr {
            let e0 = j * g;
            let e1 = (e0 + g).min(n_in);
            let mut tab = [lv; R];
            for (r, t) in tab.iter_mut().enumerate() {
                *t = _mm512_mul_ps(lv, _mm512_set1_ps(*s.add(r * gpr + j)));
                if K == AFF {
                    *t = _mm512_add_ps(*t, _mm512_set1_ps(*m.add(r * gpr + j)));
                }
            }
            let mut e = e0;
            while e < e1 {
                for (r, (row, &t)) in acc.iter_mut().zip(&tab).enumerate() {
                    let c = _mm_loadu_si128(codes.add(r * row_bytes + e / 2).cast());
                    let c = _mm512_cvtepu8_epi32(c);
                    // vpermps reads the low 4 bits of each index: the low nibble as is.
                    let wl = _mm512_permutexvar_ps(c, t);
                    let wh = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(c), t);
                    for (b, a) in row.iter_mut().enumerate() {
                        let xb = x.add(b * n_in + e);
                        a[0] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xb), a[0]);
                        a[1] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xb.add(16)), a[1]);
                    }
                }
                e += super::BLOCK;
            }
        }
        for (r, rows) in acc.iter().enumerate() {
            for (b, a) in rows.iter().enumerate() {
                *y.add(r * NB + b) = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::Plan;

    pub fn available() -> bool {
        false
    }

    pub unsafe fn rows(_: &Plan, _: &[u8], _: &[f32], _: &[f32], _: &[f32], _: &mut [f32]) {
        unreachable!("Plan::new returns None without the kernel")
    }
}
