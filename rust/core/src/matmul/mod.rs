//! `y = x @ W^T (+ bias)` on the CPU, with `W` a stored quantized weight of shape `[out, in]`
//! that is never decoded to memory as a whole.
//!
//! * `int8` (the default where it applies): 4- and 8-bit integer codes grouped along `in`, any
//!   batch: the activations are quantized to int8 per block of 32 and multiplied by the codes
//!   in integer dot products (AVX-512 VNNI), scaled per block; ~0.5% RMS relative error from
//!   the activations' rounding (see `int8`). `exact` keeps the fp32 kernels below.
//! * `packed`: batches of 1..=8 rows and 4-bit codes grouped along `in` (the common layout):
//!   SIMD dot products straight over the packed codes, each group's 16 decoded values looked up
//!   from a table built once per group (as llama.cpp does for its block formats).
//! * `tiles`: everything else (larger batches, other widths, groups along `out`): a few rows of
//!   `W` at a time are decoded into a buffer that stays in cache, then multiplied by a
//!   register-blocked kernel.
//!
//! Output rows are split across rayon threads. Activations, bias and output are fp32, fp16 or
//! bf16; outside `int8` the arithmetic is fp32 (products of the decoded weights, as `dequantize` gives them,
//! and the activations widened to fp32), so results equal decode-then-matmul up to the order of
//! the fp32 additions.

mod int8;
mod packed;
mod tiles;

use rayon::prelude::*;

use crate::codecs::region::Stored;
use crate::codecs::{float, Kernels};
use crate::error::{Error, Result};
use crate::format::DType;

/// Whether `linear` multiplies integer codes by int8 activations on this CPU (unless `exact`).
pub fn int8_available() -> bool {
    int8::available()
}

/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 32;

/// Below this many multiply-adds a call runs on the calling thread, as it does whenever the pool
/// has one thread: handing a small layer to the rayon pool (waking a worker, then waiting on it)
/// costs about as much as its matmul (SmolLM2-135M's 576x1536 layers, MiniLM's 384x1536).
const INLINE_MAX_MACS: usize = 1 << 20;

/// `out = x @ W^T + bias` for `x` of shape `[batch, in]` (`batch` follows from the sizes), `W`
/// the weight `w` of shape `[n_out, n_in]`, `bias` of shape `[n_out]`; `x`, `bias` and `out`
/// are little-endian bytes of `dtype` (float16, bfloat16 or float32), `out` of shape
/// `[batch, n_out]`. `exact`: fp32 activations throughout (no int8 kernel), for results equal
/// to decode-then-matmul up to the order of fp32 additions.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    k: &Kernels,
    w: &Stored<'_>,
    n_out: usize,
    n_in: usize,
    x: &[u8],
    bias: Option<&[u8]>,
    dtype: DType,
    out: &mut [u8],
    exact: bool,
) -> Result<()> {
    if !matches!(dtype, DType::Float16 | DType::Bfloat16 | DType::Float32) {
        return Err(Error::Invalid(format!(
            "linear takes float16, bfloat16 or float32 activations, not {dtype}"
        )));
    }
    let size = dtype.itemsize();
    let batch = if n_in == 0 {
        out.len() / (n_out * size).max(1)
    } else {
        x.len() / (n_in * size)
    };
    let numel = w.layout.numel() as usize;
    if numel != n_out * n_in
        || x.len() != batch * n_in * size
        || out.len() != batch * n_out * size
        || bias.is_some_and(|b| b.len() != n_out * size)
    {
        return Err(Error::Invalid(format!(
            "linear: weight [{n_out}, {n_in}] ({numel} elements), {} bytes of input, {} of \
             output and {} of bias do not fit together in {dtype}",
            x.len(),
            out.len(),
            bias.map_or(0, |b| b.len())
        )));
    }
    let mut x32 = vec![0f32; batch * n_in];
    float::widen_into(x, dtype, &mut x32)?;
    let y32 = linear_f32(k, w, n_out, n_in, &x32, batch, exact)?;
    let mut b32 = vec![0f32; n_out];
    if let Some(b) = bias {
        float::widen_into(b, dtype, &mut b32)?;
    }
    // y32 is [out][batch]; the output is [batch][out]. Transposed 16 outputs at a time: 16
    // sequential reads, one 16-wide write per batch row (at batch 448 an element-wise
    // transpose took as long as the matmul).
    let mut y = vec![0f32; batch * n_out];
    const T: usize = 16;
    for o0 in (0..n_out).step_by(T) {
        let o1 = (o0 + T).min(n_out);
        for b in 0..batch {
            let dst = &mut y[b * n_out + o0..b * n_out + o1];
            for (o, d) in (o0..o1).zip(dst) {
                *d = y32[o * batch + b] + b32[o];
            }
        }
    }
    float::narrow_into(&y, dtype, out)
}

/// `x @ W^T` for fp32 `x` of shape `[batch, n_in]`, returned transposed: `[n_out][batch]`
/// (each thread's rows are then one contiguous slice).
fn linear_f32(
    k: &Kernels,
    w: &Stored<'_>,
    n_out: usize,
    n_in: usize,
    x: &[f32],
    batch: usize,
    exact: bool,
) -> Result<Vec<f32>> {
    let mut yt = vec![0f32; n_out * batch];
    if yt.is_empty() {
        return Ok(yt);
    }
    if n_in == 0 {
        return Ok(yt);
    }
    let chunk = ROWS_PER_TASK * batch;
    let inline = rayon::current_num_threads() == 1 || n_out * n_in * batch < INLINE_MAX_MACS;
    let int8 = (!exact).then(|| int8::Plan::new(w, n_in, false)).flatten();
    if let Some((plan, xq)) = int8.and_then(|p| p.quantize(x, batch).map(|a| (p, a))) {
        for_each_task(&mut yt, chunk, inline, |t, ys| {
            plan.rows(w, &xq, t * ROWS_PER_TASK, ys, false)
        })?;
        return Ok(yt);
    }
    if let Some(plan) = packed::Plan::new(w, n_in, batch) {
        let xp = packed::interleave(x, n_in);
        for_each_task(&mut yt, chunk, inline, |t, ys| {
            plan.rows(w, &xp, t * ROWS_PER_TASK, ys)
        })?;
        return Ok(yt);
    }
    for_each_task(&mut yt, chunk, inline, |t, ys| {
        tiles::rows(k, w, n_in, x, batch, t * ROWS_PER_TASK, ys)
    })?;
    Ok(yt)
}

/// `f(task index, its output rows)` over `chunk`-sized pieces of `yt`, on the calling thread
/// (`inline`) or across the rayon pool.
fn for_each_task<F>(yt: &mut [f32], chunk: usize, inline: bool, f: F) -> Result<()>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync + Send,
{
    if inline {
        yt.chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(t, ys)| f(t, ys))
    } else {
        yt.par_chunks_mut(chunk)
            .enumerate()
            .try_for_each(|(t, ys)| f(t, ys))
    }
}

#[cfg(test)]
mod tests;
