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
//! * `outgroups`: batches of 1..=8 rows and 4-bit codes grouped along `out` (FlexGen): the
//!   group's scales folded into the activations, then the packed kernel's level lookup.
//! * `tiles`: everything else (larger batches, other widths, groups along `out`): a few rows of
//!   `W` at a time are decoded into a buffer that stays in cache, then multiplied by a
//!   register-blocked kernel. bf16 activations on CPUs with AVX-512 BF16 keep their bits and
//!   the tile is decoded to bf16 (`tiles::rows_bf16`).
//!
//! Output rows are split across the threads of `pool` (rayon's, or torch's OpenMP team); each
//! task also writes its own rows out (bias,
//! narrowing, the transpose), and the activations are quantized across the pool, so no pass
//! over the batch runs on one thread. Activations, bias and output are fp32, fp16 or bf16;
//! outside `int8` the arithmetic is fp32: products of the decoded weights, as `dequantize`
//! gives them in fp32 (in bf16 for bf16 tiles), and the activations widened to fp32, so
//! results equal decode-then-matmul (in the activations' dtype for bf16 tiles) up to the
//! order of the fp32 additions.

mod int8;
mod outgroups;
mod packed;
pub mod pool;
mod tiles;

use crate::codecs::region::Stored;
use crate::codecs::{float, Kernels};
use crate::error::{Error, Result};
use crate::format::DType;
use std::cell::RefCell;

/// Whether `linear` multiplies integer codes by int8 activations on this CPU (unless `exact`).
pub fn int8_available() -> bool {
    int8::available()
}

/// Whether `linear` multiplies bf16 activations by bf16 tiles of the weight on this CPU (AVX-512
/// BF16), where neither the int8 kernel nor a GEMV (packed, outgroups) takes the call.
pub fn bf16_available() -> bool {
    tiles::bf16_available()
}

/// Activation elements from which their quantize / widen pass is split across the pool.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Output rows per unit of the split across the pool (ranges of whole units: `run_tasks`).
const ROWS_PER_TASK: usize = 32;

/// Below this many multiply-adds a call runs on the calling thread, as it does whenever the pool
/// has one thread: handing a small layer to the pool (waking a worker, then waiting on it)
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
    if out.is_empty() {
        return Ok(());
    }
    // Empty without a bias (zeroing one per call cost a few us on a 5632-row GEMV).
    let mut b32 = Vec::new();
    if let Some(b) = bias {
        b32.resize(n_out, 0f32);
        float::widen_into(b, dtype, &mut b32)?;
    }
    let sink = Sink {
        out: out.as_mut_ptr(),
        n_out,
        batch,
        dtype,
        bias: &b32,
    };
    // Small layers run on the calling thread (see INLINE_MAX_MACS); so do the activation and
    // output passes, which at hundreds of rows take as long as the matmul when done serially.
    let inline = pool::threads() == 1 || n_out * n_in * batch < INLINE_MAX_MACS;
    // The passes over the activations go to the pool only when they are large (a batch of a
    // few rows is a few microseconds: less than waking a worker).
    let wide = !inline && batch * n_in >= PARALLEL_MIN_ELEMENTS;
    if n_in == 0 {
        return run_tasks(n_out, batch, inline, &sink, |_, yt| {
            yt.fill(0.0);
            Ok(())
        });
    }
    let int8 = (!exact).then(|| int8::Plan::new(w, n_in, false)).flatten();
    if let Some(plan) = int8 {
        if let Some(xq) = plan.quantize_bytes(x, dtype, batch, wide)? {
            return run_tasks(n_out, batch, inline, &sink, |r0, yt| {
                plan.rows(w, &xq, r0, yt, false)
            });
        }
    }
    let path = float_path(w, n_in, batch, dtype);
    if let FloatPath::TilesBf16 = path {
        return run_tasks(n_out, batch, inline, &sink, |r0, yt| {
            tiles::rows_bf16(k, w, n_in, x, batch, r0, yt)
        });
    }
    let mut x32 = vec![0f32; batch * n_in];
    widen_rows(x, dtype, n_in, &mut x32, !wide)?;
    match path {
        FloatPath::Packed(plan) => {
            let xp = packed::interleave(&x32, n_in);
            run_tasks(n_out, batch, inline, &sink, |r0, yt| {
                plan.rows(w, &xp, r0, yt)
            })
        }
        // A task per output group (up to 4 x ROWS_PER_TASK rows): each folds its scales into
        // the activations once.
        FloatPath::OutGroups(plan) => {
            let per_task = plan.rows_per_task(ROWS_PER_TASK);
            run_tasks_of(per_task, n_out, batch, inline, &sink, |r0, yt| {
                plan.rows(w, &x32, r0, yt)
            })
        }
        _ => run_tasks(n_out, batch, inline, &sink, |r0, yt| {
            tiles::rows(k, w, n_in, &x32, batch, r0, yt)
        }),
    }
}

/// The float kernel that multiplies a weight at a batch (outside `int8`).
enum FloatPath {
    Packed(packed::Plan),
    OutGroups(outgroups::Plan),
    TilesBf16,
    Tiles,
}

/// The first of the float kernels that takes the call: the GEMVs on the packed codes, then
/// bf16 tiles for bf16 activations (where the CPU has them), then fp32 tiles.
fn float_path(w: &Stored<'_>, n_in: usize, batch: usize, dtype: DType) -> FloatPath {
    if let Some(p) = packed::Plan::new(w, n_in, batch) {
        return FloatPath::Packed(p);
    }
    if let Some(p) = outgroups::Plan::new(w, n_in, batch) {
        return FloatPath::OutGroups(p);
    }
    if dtype == DType::Bfloat16 && tiles::bf16_available() {
        return FloatPath::TilesBf16;
    }
    FloatPath::Tiles
}

/// `x` (rows of `n_in` elements of `dtype`) widened into `out`, across the pool unless `inline`.
fn widen_rows(x: &[u8], dtype: DType, n_in: usize, out: &mut [f32], inline: bool) -> Result<()> {
    let size = dtype.itemsize();
    if inline {
        return float::widen_into(x, dtype, out);
    }
    let per = rows_per_pass_task(n_in);
    let mut tasks: Vec<_> = out
        .chunks_mut(per * n_in)
        .zip(x.chunks(per * n_in * size))
        .collect();
    pool::for_each_mut(&mut tasks, |(o, s)| float::widen_into(s, dtype, o))
}

/// Rows of `n_in` activations per task of a pass over them (widen, quantize): a few thousand
/// elements, so that a task is worth taking from the shared counter.
pub(crate) fn rows_per_pass_task(n_in: usize) -> usize {
    (4096 / n_in.max(1)).max(1)
}

/// Where the tasks put their results: `out[b][o] = yt[o][b] + bias[o]` in `dtype`, written
/// by each task for its own output rows (columns of `out`), so no pass over the whole output
/// runs on one thread.
struct Sink<'a> {
    out: *mut u8,
    n_out: usize,
    batch: usize,
    dtype: DType,
    /// Empty if there is no bias.
    bias: &'a [f32],
}

// SAFETY: tasks write disjoint columns of `out` (`Sink::write`), which outlives them.
unsafe impl Send for Sink<'_> {}
unsafe impl Sync for Sink<'_> {}

impl Sink<'_> {
    /// Output rows `r0..r0 + n` from `yt` (`[n][batch]`); each task calls it for its own rows.
    fn write(&self, r0: usize, yt: &[f32]) -> Result<()> {
        let size = self.dtype.itemsize();
        let mut row = [0f32; ROWS_PER_TASK];
        // ROWS_PER_TASK columns at a time (tasks may hold more rows).
        for (c, yc) in yt.chunks(ROWS_PER_TASK * self.batch).enumerate() {
            let r = r0 + c * ROWS_PER_TASK;
            let n = yc.len() / self.batch;
            let bias = self.bias.get(r..r + n);
            for b in 0..self.batch {
                for (o, v) in row[..n].iter_mut().enumerate() {
                    *v = yc[o * self.batch + b] + bias.map_or(0.0, |bias| bias[o]);
                }
                // SAFETY: inside `out` (its length was checked against batch * n_out); the
                // columns r..r + n of row b belong to this task alone.
                let dst = unsafe {
                    let at = (b * self.n_out + r) * size;
                    std::slice::from_raw_parts_mut(self.out.add(at), n * size)
                };
                float::narrow_into(&row[..n], self.dtype, dst)?;
            }
        }
        Ok(())
    }
}

thread_local! {
    /// A task's results, `[rows][batch]`, kept between calls (a fresh one per call cost page
    /// faults at hundreds of rows).
    static RESULTS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f(first row, its results [rows][batch])` over ranges of whole tasks of `ROWS_PER_TASK`
/// output rows that cover them all, on the calling thread (`inline`: one range) or across the
/// pool (`pool::run_ranges`: large ranges first), each range writing its rows out.
fn run_tasks<F>(n_out: usize, batch: usize, inline: bool, sink: &Sink<'_>, f: F) -> Result<()>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync + Send,
{
    run_tasks_of(ROWS_PER_TASK, n_out, batch, inline, sink, f)
}

/// Results a range holds at most (`[rows][batch]` fp32: 256 KiB), so that at large batches they
/// stay in cache between the kernel and the write-out; at batch 1 no limit in practice.
const MAX_RANGE_RESULTS: usize = 1 << 16;

/// `run_tasks` with tasks of `per_task` rows.
fn run_tasks_of<F>(
    per_task: usize,
    n_out: usize,
    batch: usize,
    inline: bool,
    sink: &Sink<'_>,
    f: F,
) -> Result<()>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync + Send,
{
    let tasks = n_out.div_ceil(per_task);
    let max_tasks = (MAX_RANGE_RESULTS / (per_task * batch).max(1)).max(1);
    let range = |t: std::ops::Range<usize>| -> Result<()> {
        let r0 = t.start * per_task;
        let n = (t.end * per_task).min(n_out) - r0;
        let mut yt = RESULTS.with(|v| std::mem::take(&mut *v.borrow_mut()));
        yt.resize(n * batch, 0.0);
        let result = f(r0, &mut yt[..n * batch]).and_then(|()| sink.write(r0, &yt[..n * batch]));
        RESULTS.with(|v| *v.borrow_mut() = yt);
        result
    };
    if inline {
        return (0..tasks)
            .step_by(max_tasks)
            .try_for_each(|t| range(t..(t + max_tasks).min(tasks)));
    }
    pool::run_ranges(tasks, max_tasks, range)
}

#[cfg(test)]
mod tests;
