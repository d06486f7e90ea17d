//! The general path: decode `TILE_ROWS` rows of the weight into a buffer that stays in cache
//! (through the one decode driver, so every encoding and layout works), then multiply them by
//! the activations with a register-blocked kernel (4 weight rows x 4 activation rows).
//!
//! bf16 activations (`rows_bf16`, on CPUs with AVX-512 BF16) keep their own bits: the tile is
//! decoded to bf16, as `dequantize` gives the weight in bf16, and multiplied with `vdpbf16ps`
//! (pairs of bf16 products summed into fp32 lanes: twice the multiply-adds of an fp32 FMA, and
//! half the tile's bytes). That is decode-to-bf16-then-matmul, as torch computes a bf16 model's
//! layer, with fp32 accumulation.

use std::cell::RefCell;

use crate::codecs::region::{self, Stored};
use crate::codecs::Kernels;
use crate::error::Result;

/// Weight rows decoded at a time (at 4096 inputs, 128 KiB of fp32: in L2).
const TILE_ROWS: usize = 8;
/// The same for bf16 tiles (at 4096 inputs 256 KiB, in L2): each pass over the activations
/// (from L3 at hundreds of rows) serves 32 weight rows.
const TILE_ROWS_BF16: usize = 32;

thread_local! {
    static TILE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static TILE_BF16: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether `rows_bf16` runs on this CPU (AVX-512 BF16).
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return avx512::bf16_available();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `rows` for bf16 activations `x` (`[batch][n_in]` little-endian bf16 bytes): tiles decoded
/// to bf16 and multiplied in bf16 pairs with fp32 sums. Only where `bf16_available`.
pub fn rows_bf16(
    k: &Kernels,
    w: &Stored<'_>,
    n_in: usize,
    x: &[u8],
    batch: usize,
    r0: usize,
    yt: &mut [f32],
) -> Result<()> {
    assert!(bf16_available() && x.len() == batch * n_in * 2);
    let n_rows = yt.len() / batch;
    let mut tile = TILE_BF16.with(|t| std::mem::take(&mut *t.borrow_mut()));
    tile.resize(TILE_ROWS_BF16 * n_in * 2, 0);
    let mut result = Ok(());
    for t0 in (0..n_rows).step_by(TILE_ROWS_BF16) {
        let tr = TILE_ROWS_BF16.min(n_rows - t0);
        let wt = &mut tile[..tr * n_in * 2];
        result = region::decode_span_bf16(k, w, (r0 + t0) * n_in, wt);
        if result.is_err() {
            break;
        }
        let ys = &mut yt[t0 * batch..(t0 + tr) * batch];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: checked above that the CPU has AVX-512 BF16; the sizes are checked inside.
        unsafe {
            avx512::dot_tile_bf16(wt, tr, n_in, x, batch, ys)
        };
    }
    TILE_BF16.with(|t| *t.borrow_mut() = tile);
    result
}

/// `yt[o][b] = W[r0 + o] . x[b]` for the rows `yt` holds (`yt.len() / batch` of them).
pub fn rows(
    k: &Kernels,
    w: &Stored<'_>,
    n_in: usize,
    x: &[f32],
    batch: usize,
    r0: usize,
    yt: &mut [f32],
) -> Result<()> {
    let n_rows = yt.len() / batch;
    let mut tile = TILE.with(|t| std::mem::take(&mut *t.borrow_mut()));
    tile.resize(TILE_ROWS * n_in, 0.0);
    let mut result = Ok(());
    for t0 in (0..n_rows).step_by(TILE_ROWS) {
        let tr = TILE_ROWS.min(n_rows - t0);
        let wt = &mut tile[..tr * n_in];
        result = region::decode_span(k, w, (r0 + t0) * n_in, wt);
        if result.is_err() {
            break;
        }
        dot_tile(
            wt,
            tr,
            n_in,
            x,
            batch,
            &mut yt[t0 * batch..(t0 + tr) * batch],
        );
    }
    TILE.with(|t| *t.borrow_mut() = tile);
    result
}

/// `yt[r][b] = w[r] . x[b]` for `rows` rows of `w` and `batch` rows of `x`, all `n` long.
fn dot_tile(w: &[f32], rows: usize, n: usize, x: &[f32], batch: usize, yt: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has the instructions; the blocks stay inside the slices (checked).
        unsafe { avx512::dot_tile(w, rows, n, x, batch, yt) };
        return;
    }
    for r in 0..rows {
        for b in 0..batch {
            yt[r * batch + b] = dot(&w[r * n..(r + 1) * n], &x[b * n..(b + 1) * n]);
        }
    }
}

/// A dot product with eight running sums, which the compiler keeps in vector registers.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (u, v) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += u[l] * v[l];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(u, v)| u * v).sum();
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
    }

    pub fn bf16_available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }

    /// `dot_tile` for bf16 bytes `w` and `x`: blocks of up to 4 weight rows by 4 activation rows,
    /// 32 elements (one register of bf16) a step.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn dot_tile_bf16(
        w: &[u8],
        rows: usize,
        n: usize,
        x: &[u8],
        batch: usize,
        yt: &mut [f32],
    ) {
        assert!(w.len() >= rows * n * 2 && x.len() >= batch * n * 2);
        assert!(yt.len() >= rows * batch);
        // Activation rows outside: their 4 rows stay in L1 while the tile's rows (in L2) pass
        // by; rows outside re-read all of x (from L3 at hundreds of rows) per 4 weight rows.
        for b in (0..batch).step_by(4) {
            for r in (0..rows).step_by(4) {
                let (wp, xp) = (w.as_ptr().add(r * n * 2), x.as_ptr().add(b * n * 2));
                let yp = yt.as_mut_ptr().add(r * batch + b);
                macro_rules! go {
                    ($($rr:literal $cc:literal),*) => {
                        match ((rows - r).min(4), (batch - b).min(4)) {
                            $(($rr, $cc) => block_bf16::<$rr, $cc>(wp, xp, n, yp, batch),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
            }
        }
    }

    /// `y[r * ldy + c] = w[r] . x[c]` for R rows of bf16 `w` and C rows of bf16 `x`, `n` long.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn block_bf16<const R: usize, const C: usize>(
        w: *const u8,
        x: *const u8,
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut k = 0;
        while k < n {
            // The last step reads only the elements inside the rows (zeros add nothing).
            let mask: __mmask32 = if n - k >= 32 {
                !0
            } else {
                ((1u64 << (n - k)) - 1) as __mmask32
            };
            let mut xv = [_mm512_setzero_si512(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_epi16(mask, x.add(2 * (c * n + k)).cast());
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_epi16(mask, w.add(2 * (r * n + k)).cast());
                let wv: __m512bh = std::mem::transmute(wv);
                for (a, &v) in row.iter_mut().zip(&xv) {
                    *a = _mm512_dpbf16_ps(*a, wv, std::mem::transmute::<__m512i, __m512bh>(v));
                }
            }
            k += 32;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, &a) in row.iter().enumerate() {
                *y.add(r * ldy + c) = _mm512_reduce_add_ps(a);
            }
        }
    }

    /// `dot_tile` in blocks of up to 4 weight rows by 4 activation rows: 16 accumulators, and
    /// 8 loads per 16 fused multiply-adds.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn dot_tile(
        w: &[f32],
        rows: usize,
        n: usize,
        x: &[f32],
        batch: usize,
        yt: &mut [f32],
    ) {
        assert!(w.len() >= rows * n && x.len() >= batch * n && yt.len() >= rows * batch);
        for r in (0..rows).step_by(4) {
            for b in (0..batch).step_by(4) {
                let (wp, xp) = (w.as_ptr().add(r * n), x.as_ptr().add(b * n));
                let yp = yt.as_mut_ptr().add(r * batch + b);
                macro_rules! go {
                    ($($rr:literal $cc:literal),*) => {
                        match ((rows - r).min(4), (batch - b).min(4)) {
                            $(($rr, $cc) => block::<$rr, $cc>(wp, xp, n, yp, batch),)*
                            _ => unreachable!(),
                        }
                    };
                }
                go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
            }
        }
    }

    /// `y[r * ldy + c] = w[r] . x[c]` for R rows of `w` and C rows of `x`, `n` long.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn block<const R: usize, const C: usize>(
        w: *const f32,
        x: *const f32,
        n: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        let mut k = 0;
        while k < n {
            // The last block reads only the lanes inside the rows.
            let mask: __mmask16 = if n - k >= 16 {
                0xffff
            } else {
                ((1u32 << (n - k)) - 1) as __mmask16
            };
            let mut xv = [_mm512_setzero_ps(); C];
            for (c, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, x.add(c * n + k));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_ps(mask, w.add(r * n + k));
                for (a, &v) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, v, *a);
                }
            }
            k += 16;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, &a) in row.iter().enumerate() {
                *y.add(r * ldy + c) = _mm512_reduce_add_ps(a);
            }
        }
    }
}
