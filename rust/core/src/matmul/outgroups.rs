//! Batches of 1..=8 rows times 4-bit codes grouped along the outputs (FlexGen's layout: the
//! scales and mins of a group are shared by `group` consecutive weight rows, one per input).
//!
//! For the rows of output group `g`, `W[o][k] = level(code[o][k]) * s[g][k] + m[g][k]`, so
//!
//! ```text
//! y[o] = sum_k level(code[o][k]) * (s[g][k] * x[k])  +  sum_k m[g][k] * x[k]
//! ```
//!
//! The scales are folded into the activations once per group (`xs`, K products shared by the
//! group's rows) and the second sum is one number per group; the rows then run through the
//! packed kernel's level lookup (`packed::Plan::levels`) with no per-element scaling. The same
//! products as decode-then-matmul, rounded in another order (fp32 accumulation error).

use std::cell::RefCell;

use super::packed;
use crate::codecs::float;
use crate::codecs::region::Stored;
use crate::error::Result;

/// What the kernel needs to know about a weight it can multiply.
pub struct Plan {
    levels: packed::Plan,
    n_in: usize,
    /// Weight rows per group.
    group: usize,
    batch: usize,
    has_mins: bool,
}

thread_local! {
    /// Widened scales and mins of a group, and the scaled activations.
    static BUFFERS: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

impl Plan {
    /// A plan if the kernel applies: a 2-D weight of 4-bit codes grouped along its outputs
    /// (axis 0), inputs a multiple of 32, batch 1..=8, and a CPU with AVX-512F.
    pub fn new(w: &Stored<'_>, n_in: usize, batch: usize) -> Option<Plan> {
        let l = &w.layout;
        let axis0 = l.outer == 1 && l.inner as usize == n_in && n_in > 0;
        let levels = packed::Plan::levels_only(w.codec, n_in, batch)?;
        axis0.then_some(Plan {
            levels,
            n_in,
            group: l.group_size as usize,
            batch,
            has_mins: w.codec.has_mins(),
        })
    }

    /// Rows per task: whole groups where a group is a multiple of `base` up to 4 of them
    /// (each task then prepares each of its groups once), else `base`.
    pub fn rows_per_task(&self, base: usize) -> usize {
        if self.group.is_multiple_of(base) && self.group <= 4 * base {
            self.group
        } else {
            base
        }
    }

    /// `yt[o][b] = W[r0 + o] . x[b]` for the rows `yt` holds (`[rows][batch]`); `x` is
    /// `[batch][n_in]` in fp32.
    pub fn rows(&self, w: &Stored<'_>, x: &[f32], r0: usize, yt: &mut [f32]) -> Result<()> {
        let (n, batch) = (self.n_in, self.batch);
        let n_rows = yt.len() / batch;
        let size = w.params.scale_dtype.itemsize();
        let row_bytes = n / 2;
        let [mut s, mut m, mut xs] = BUFFERS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        s.resize(n, 0.0);
        m.resize(n, 0.0);
        xs.resize(batch * n, 0.0);
        let mut result = Ok(());
        let mut o = r0;
        while o < r0 + n_rows {
            let g = o / self.group;
            let end = ((g + 1) * self.group).min(r0 + n_rows);
            let params = g * n * size..(g + 1) * n * size;
            result = float::widen_into(&w.scales[params.clone()], w.params.scale_dtype, &mut s);
            if result.is_ok() && self.has_mins {
                result = float::widen_into(&w.mins[params], w.params.scale_dtype, &mut m);
            }
            if result.is_err() {
                break;
            }
            // The group's scales folded into the activations, in the packed kernel's order.
            let mut offsets = [0f32; 8];
            for (b, off) in offsets.iter_mut().enumerate().take(batch) {
                let xb = &x[b * n..(b + 1) * n];
                let dst = &mut xs[b * n..(b + 1) * n];
                for (i, (d, blk)) in dst
                    .chunks_exact_mut(32)
                    .zip(xb.chunks_exact(32))
                    .enumerate()
                {
                    let sb = &s[i * 32..(i + 1) * 32];
                    for t in 0..16 {
                        d[t] = sb[2 * t] * blk[2 * t];
                        d[16 + t] = sb[2 * t + 1] * blk[2 * t + 1];
                    }
                }
                if self.has_mins {
                    // 16 running sums (one vector): a single chain of 4096 dependent adds took
                    // as long as the group's rows.
                    let mut acc = [0f32; 16];
                    for (mc, xc) in m.chunks_exact(16).zip(xb.chunks_exact(16)) {
                        for l in 0..16 {
                            acc[l] += mc[l] * xc[l];
                        }
                    }
                    *off = acc.iter().sum();
                }
            }
            let ys = &mut yt[(o - r0) * batch..(end - r0) * batch];
            let codes = &w.codes[o * row_bytes..end * row_bytes];
            self.levels.levels(codes, &xs, ys);
            for row in ys.chunks_exact_mut(batch) {
                for (v, off) in row.iter_mut().zip(offsets) {
                    *v += off;
                }
            }
            o = end;
        }
        BUFFERS.with(|b| *b.borrow_mut() = [s, m, xs]);
        result
    }
}
