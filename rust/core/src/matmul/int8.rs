//! Integer dot products: 4- and 8-bit integer codes times activations quantized to int8 (the
//! approach of llama.cpp's Q4_1 x Q8_0 kernels).
//!
//! Each activation row is quantized once per call, per block of 32 elements: `x ~ dx * q` with
//! `dx = max|x| / 127` and `q` in -127..=127 (`Activations`). A weight group of scale `s` and
//! min `m` (affine; symmetric: `m = -zero * s` in effect) then contributes, block by block,
//!
//! ```text
//! sum_i (code_i * s + m) * dx * q_i  =  s * dx * sum_i code_i * q_i  +  m * dx * sum_i q_i
//! ```
//!
//! The first sum is exact in 32-bit integers (AVX-512 VNNI `vpdpbusd`: 64 byte products per
//! instruction, against 16 multiply-adds per fp32 FMA); the second is one number per block,
//! computed once per call. Float work per weight drops about 4x.
//!
//! Accuracy: the weight is used exactly as stored; the activations carry the rounding error of
//! int8 (at most `max|x| / 254` per element of a block of 32), so results differ from
//! decode-then-matmul by at most `sum_i |w_i| * max|x|_block(i) / 254` (`tests.rs` checks that
//! bound). Measured on a 1024x2048 affine 4-bit g64 layer with Gaussian inputs: 0.5% RMS
//! relative (0.9% with a 20x outlier channel), against 6.4% for the 4-bit weight itself versus
//! fp32. `linear(.., exact = true)` keeps fp32 activations.
//!
//! A step of the kernel takes one 512-bit register of codes per weight row: 64 8-bit codes, or
//! 128 4-bit ones, whose low and high nibbles (masked apart) meet the even and odd activations
//! in two `vpdpbusd` into the same 16 sums (the activations are stored in that order), so each
//! 32-bit lane holds one block's products and a step costs one int-to-float conversion and one
//! FMA by its blocks' `s * dx`. Up to 4 weight rows share each activation load (batch 1).
//! Each span asks for the same span of the rows `PREFETCH_ROWS` ahead (`matmul_probe`, layers
//! from memory, 1 thread: 576x1536 18 us against 21-26 without, 2048x5632 172 against 265; on
//! a layer already in cache it costs ~20%: 4096x4096 183 us against 150).
//!
//! Codes whose levels are not their integer values take the same kernel through a table of 16
//! int8 levels (`Table`), looked up per nibble with `vpshufb` before the dot products:
//!
//! * MXFP4: E2M1 values doubled are the integers 0, ±1, ±2, ±3, ±4, ±6, ±8, ±12, so the table
//!   is exact and the activations' block scales are halved (a table's `unit` rides on them):
//!   the weight is used exactly as stored. NVFP4 the same, its block scale E4M3 times the
//!   tensor scale as decoding rounds it; its blocks of 16 are half an activation block, so each lane's scale
//!   is its own block's scale times its activation block's `dx` (`Plan::g16`), and the
//!   `zero` comes out of each lane's integer sum before it is scaled: the dot products start
//!   from `-zero * sum(q)` over the lane's 8 inputs (two more `vpdpbusd` per step, shared by
//!   the rows of a pass).
//! * NF4: its levels are not integers; the table holds `round(level * 127)` (as llama.cpp's
//!   IQ4_NL does) and the activations' block scales are divided by 127. That moves each weight by at most
//!   `0.5 / 127` (0.4%) of its group's absmax, where NF4's own rounding moves it by up to half
//!   a level spacing, 4-15% of it: a small addition to the activations' rounding (`tests.rs`
//!   and `tests/test_cpu_matmul.py` bound both).
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the table stores `level + zero` (unsigned)
//! and the kernel runs as for symmetric codes with that `zero`: `- zero * s * dx * sum(q)`
//! per block, computed once per call, takes it back out.
//!
//! The float arithmetic runs in 16 lanes in a fixed order, and `scalar` repeats it lane by lane
//! with the same roundings, so the two agree bit for bit (tested).

use std::sync::atomic::{AtomicBool, Ordering};

use crate::codecs::codec::NF4_LEVELS;
use crate::codecs::fp4::E2M1_LEVELS;
use crate::codecs::region::{self, Stored};
use crate::codecs::{float, Codec};
use crate::error::Result;
use crate::format::DType;

/// Activation elements per quantization block (one scale each).
pub const BLOCK: usize = 32;
/// Code bytes per step of the kernels: one 512-bit register, 64 8-bit codes or 128 4-bit ones.
const STEP_BYTES: usize = 64;
/// Inputs must come in whole multiples of this (two blocks); 4-bit rows may end in half a step.
const CHUNK: usize = 64;
/// Blocks per span: the scales of 16 blocks fill one register.
const SPAN: usize = 16;

/// Inputs per step of the kernels for `bits`-bit codes.
const fn step_elements(bits: u8) -> usize {
    STEP_BYTES * 8 / bits as usize
}
/// Activation rows per pass over the weight rows (registers).
const MAX_NB: usize = 8;

/// Whether this CPU runs the integer kernels (AVX-512 VNNI).
pub fn available() -> bool {
    kernel::available()
}

/// The quantized activations of one call.
pub struct Activations {
    batch: usize,
    n_in: usize,
    /// `[batch][qn]`; for 4-bit weights each step of 128 holds its 64 even elements, then its
    /// 64 odd ones (the order of the low, then high nibbles of 64 code bytes), zeros past `n_in`.
    q: Vec<i8>,
    /// Elements per row of `q`: `n_in` padded to whole steps.
    qn: usize,
    /// `[batch][blocks]` (blocks padded to whole spans with zeros): `dx` per block.
    dx: Vec<f32>,
    /// Like `dx`: `offset * dx * sum(q)` per block, the factor of the group's min.
    xs: Vec<f32>,
    /// Blocks per row, padded.
    stride: usize,
}

/// The kind of code, as the kernels need it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// `code * s + m`.
    Affine,
    /// `(code - zero) * s`: the min term is `s * (-zero) * dx * sum(q)`.
    Symmetric { zero: i32 },
}

/// The int8 levels of 4-bit codes that are not integers (module doc): `level * unit` is the
/// code's value before its group's scale, `level = codes[code] - zero` (`Kind::Symmetric`).
#[derive(Clone, Copy, Debug)]
struct Table {
    /// Code -> `level + zero`, in 0..=255.
    codes: [u8; 16],
    /// What a level is multiplied by, before the group's scale: 1/2 (E2M1 doubled), 1/127
    /// (NF4); applied to the activations' block scales (`quantize_row`).
    unit: f32,
}

impl Table {
    /// The table for `codec` and its `zero`, if it takes one.
    fn of(codec: Codec) -> Option<(Table, i32)> {
        let (levels, mul, zero) = match codec {
            Codec::Mxfp4 | Codec::Nvfp4 { .. } => (&E2M1_LEVELS, 2.0f32, 12),
            Codec::Nf4 => (&NF4_LEVELS, 127.0, 127),
            _ => return None,
        };
        let mut codes = [0u8; 16];
        for (c, &l) in codes.iter_mut().zip(levels) {
            // E2M1 doubled is exact; NF4 rounds (module doc)
            *c = ((l * mul).round() as i32 + zero) as u8;
        }
        Some((
            Table {
                codes,
                unit: 1.0 / mul,
            },
            zero,
        ))
    }
}

/// What the integer kernels need to know about a weight they can multiply.
pub struct Plan {
    kind: Kind,
    /// For codes looked up in a table of levels (NF4, FP4); None: the codes are the levels.
    table: Option<Table>,
    bits: u8,
    n_in: usize,
    groups_per_row: usize,
    /// Blocks per weight group (`group / 32`): it divides 16, or 16 divides it; 1 if `g16`.
    blocks_per_group: usize,
    /// Groups of 16 (NVFP4's blocks): two per activation block.
    g16: bool,
}

impl Plan {
    /// A plan if the integer kernels apply: 4- or 8-bit affine or symmetric codes, or NF4,
    /// MXFP4 or NVFP4 codes (through a `Table`), in groups of a multiple of 32 along the inputs
    /// (NVFP4: its blocks of 16), the inputs a multiple of 64, and (unless `scalar`) a CPU with
    /// AVX-512 VNNI.
    pub fn new(w: &Stored<'_>, n_in: usize, scalar: bool) -> Option<Plan> {
        let (kind, table, bits) = match w.codec {
            Codec::Affine { bits } => (Kind::Affine, None, bits),
            Codec::Symmetric { bits } | Codec::SymmetricFull { bits } => (
                Kind::Symmetric {
                    zero: w.codec.zero(),
                },
                None,
                bits,
            ),
            c @ (Codec::Nf4 | Codec::Mxfp4 | Codec::Nvfp4 { .. }) => {
                let (table, zero) = Table::of(c)?;
                (Kind::Symmetric { zero }, Some(table), 4)
            }
        };
        let group = (w.layout.group_size as usize).min(n_in);
        let g16 = matches!(w.codec, Codec::Nvfp4 { .. }) && group == 16;
        let bpg = if g16 { 1 } else { group / BLOCK };
        let fits = (bits == 4 || bits == 8)
            && w.layout.inner == 1
            && w.layout.axis_len as usize == n_in
            && n_in > 0
            && n_in.is_multiple_of(CHUNK)
            && (g16
                || (group.is_multiple_of(BLOCK)
                    && (SPAN.is_multiple_of(bpg) || bpg.is_multiple_of(SPAN))));
        (fits && (scalar || kernel::available())).then_some(Plan {
            kind,
            table,
            bits,
            n_in,
            groups_per_row: w.layout.groups_along_axis as usize,
            blocks_per_group: bpg,
            g16,
        })
    }

    /// `x` (`[batch][n_in]`) quantized for this weight; None if it holds a NaN or infinity
    /// (the fp32 kernels then keep IEEE semantics).
    #[cfg(test)]
    pub fn quantize(&self, x: &[f32], batch: usize) -> Option<Activations> {
        let bytes = float::f32_le_bytes(x);
        self.quantize_bytes(&bytes, DType::Float32, batch, false)
            .unwrap()
    }

    /// `x`, `batch` rows of `n_in` little-endian `dtype` values, quantized for this weight,
    /// row by row (across the pool if `parallel`: at hundreds of rows this pass alone
    /// took as long as a thread's share of the matmul); None if it holds a NaN or infinity.
    pub fn quantize_bytes(
        &self,
        x: &[u8],
        dtype: DType,
        batch: usize,
        parallel: bool,
    ) -> Result<Option<Activations>> {
        let n = self.n_in;
        let blocks = n / BLOCK;
        let stride = blocks.div_ceil(SPAN) * SPAN;
        let qn = n.div_ceil(step_elements(self.bits)) * step_elements(self.bits);
        let offset = match self.kind {
            Kind::Affine => 1.0,
            Kind::Symmetric { zero } => -(zero as f32),
        };
        // A table's unit rides on the activations' scales (once per block, not per weight group)
        let unit = self.table.map_or(1.0, |t| t.unit);
        let mut a = Activations {
            batch,
            n_in: n,
            q: vec![0i8; batch * qn],
            qn,
            dx: vec![0f32; batch * stride],
            xs: vec![0f32; batch * stride],
            stride,
        };
        let size = dtype.itemsize();
        let bits = self.bits;
        // One row: widened into `buf`, then quantized; false if it is not all finite.
        let row = |buf: &mut Vec<f32>, q: &mut [i8], dx: &mut [f32], xs: &mut [f32], src: &[u8]| {
            buf.resize(n, 0.0);
            float::widen_into(src, dtype, buf)?;
            if !buf.iter().all(|v| v.is_finite()) {
                return Ok(false);
            }
            quantize_row(buf, q, dx, xs, offset, unit, bits);
            Ok(true)
        };
        let Activations { q, dx, xs, .. } = &mut a;
        let finite = if parallel {
            // Tasks of a few rows, each with its own widening buffer.
            let per = super::rows_per_pass_task(n);
            let mut tasks: Vec<_> = q
                .chunks_mut(per * qn)
                .zip(dx.chunks_mut(per * stride))
                .zip(xs.chunks_mut(per * stride))
                .zip(x.chunks(per * n * size))
                .collect();
            let all = AtomicBool::new(true);
            super::pool::for_each_mut(&mut tasks, |(((q, dx), xs), src)| {
                let mut buf = Vec::new();
                let rows = q
                    .chunks_mut(qn)
                    .zip(dx.chunks_mut(stride))
                    .zip(xs.chunks_mut(stride))
                    .zip(src.chunks(n * size));
                for (((q, dx), xs), src) in rows {
                    if !row(&mut buf, q, dx, xs, src)? {
                        all.store(false, Ordering::Relaxed);
                        break;
                    }
                }
                Ok(())
            })?;
            all.into_inner()
        } else {
            let mut buf = Vec::new();
            let mut all = true;
            for (((q, dx), xs), src) in q
                .chunks_mut(qn)
                .zip(dx.chunks_mut(stride))
                .zip(xs.chunks_mut(stride))
                .zip(x.chunks(n * size))
            {
                all &= row(&mut buf, q, dx, xs, src)?;
                if !all {
                    break;
                }
            }
            all
        };
        Ok(finite.then_some(a))
    }

    /// `yt[o][b] = W[r0 + o] . x[b]` for the rows `yt` holds (`[rows][batch]`).
    pub fn rows<'a>(
        &self,
        w: &Stored<'a>,
        a: &Activations,
        r0: usize,
        yt: &mut [f32],
        scalar: bool,
    ) -> Result<()> {
        let batch = a.batch;
        let n_rows = yt.len() / batch;
        let gpr = self.groups_per_row;
        let window = r0 * gpr..(r0 + n_rows) * gpr;
        let size = w.params.scale_dtype.itemsize();
        let bytes = window.start * size..window.end * size;
        let affine = self.kind == Kind::Affine;
        // fp16 and bf16 scales and mins, MXFP4's E8M0 and NVFP4's E4M3 scales are widened inside
        // the kernel (widening MXFP4's here, a scale per 32 weights, took as long as the matmul;
        // bf16's added 40%); other types here (as decoding widens them), with one span of slack: the
        // kernel loads whole spans (masked past the end).
        let raw_kind = match w.params.scale_dtype {
            DType::Float16 => Some(Raw::F16),
            DType::Bfloat16 => Some(Raw::Bf16),
            DType::Uint8 if w.codec == Codec::Mxfp4 => Some(Raw::E8m0),
            DType::Float8E4m3fn if matches!(w.codec, Codec::Nvfp4 { .. }) => Some(Raw::E4m3),
            _ => None,
        };
        // NVFP4's E4M3 scales (one per 16 weights) are widened again for each pass of MAX_NB
        // activation rows: past one pass, widening them once here is faster (batch 32 ran
        // 0.70-0.95x as fast widened in the kernel, `benches/results/cpu_matmul_nvfp4.txt`).
        let in_kernel = raw_kind.is_some() && (raw_kind != Some(Raw::E4m3) || batch <= MAX_NB);
        let half = !scalar && in_kernel;
        let [mut s, mut m] = WIDENED.with(|b| std::mem::take(&mut *b.borrow_mut()));
        s.clear();
        m.clear();
        if !half {
            region::widen_scales(w, window.clone(), &mut s, &mut m)?;
            s.resize(window.len() + SPAN, 0.0);
            if affine {
                m.resize(window.len() + SPAN, 0.0);
            }
        }
        let raw = |p: &'a [u8]| if half { &p[bytes.start..] } else { &[][..] };
        let row_bytes = self.n_in * self.bits as usize / 8;
        // From the task's first row to the end of the weight: the kernel prefetches ahead.
        let codes = &w.codes[r0 * row_bytes..];
        assert!(a.n_in == self.n_in && a.q.len() == batch * a.qn);
        let args = Args {
            plan: self,
            codes,
            s: &s,
            m: &m,
            s16: raw(w.scales),
            m16: if affine { raw(w.mins) } else { &[] },
            raw: raw_kind.unwrap_or(Raw::F16),
            tensor_scale: w.codec.tensor_scale(),
            levels: self
                .table
                .map_or(std::array::from_fn(|c| c as u8), |t| t.codes),
            a,
        };
        let mut b0 = 0;
        while b0 < batch {
            let nb = (batch - b0).min(MAX_NB);
            if scalar {
                scalar::rows(&args, b0, nb, yt);
            } else {
                // SAFETY: `Plan::new` checked the CPU; `Args` has the sizes the kernel reads.
                unsafe { kernel::rows(&args, b0, nb, yt) };
            }
            b0 += nb;
        }
        WIDENED.with(|b| *b.borrow_mut() = [s, m]);
        Ok(())
    }
}

thread_local! {
    /// `Plan::rows`' widened scales and mins, kept between calls: a range of rows holds up to
    /// a few MiB of them (NVFP4: a scale per 16 weights), which a fresh buffer per call maps
    /// and faults in again.
    static WIDENED: std::cell::RefCell<[Vec<f32>; 2]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

/// One row `x` quantized into `q` (in the kernels' order), `dx` and `xs` (per block), `dx`
/// times `unit` (a `Table`'s; 1 for integer codes).
fn quantize_row(
    x: &[f32],
    q: &mut [i8],
    dx: &mut [f32],
    xs: &mut [f32],
    offset: f32,
    unit: f32,
    bits: u8,
) {
    let mut tmp = [0i8; BLOCK];
    for (k, blk) in x.chunks_exact(BLOCK).enumerate() {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Blocks below ~4e-37 (where 127 / max|x| would overflow) count as zeros.
        let (d, inv) = if amax > 127.0 / f32::MAX {
            (amax / 127.0, 127.0 / amax)
        } else {
            (0.0, 0.0)
        };
        let mut sum = 0i32;
        for (t, &v) in tmp.iter_mut().zip(blk) {
            // Round half to even, exactly, for |v * inv| <= 127 < 2^22.
            const MAGIC: f32 = 12582912.0; // 1.5 * 2^23
            let r = ((v * inv + MAGIC) - MAGIC).clamp(-127.0, 127.0) as i32;
            *t = r as i8;
            sum += r;
        }
        place(&tmp, k, q, bits);
        dx[k] = d * unit;
        xs[k] = offset * (dx[k] * sum as f32);
    }
}

/// The stored scale formats the kernel widens itself.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Raw {
    F16,
    Bf16,
    /// MXFP4's power-of-two scales (`fp4::e8m0_value`).
    E8m0,
    /// NVFP4's block scales (`fp4::e4m3_value`), times `Args::tensor_scale` (one rounding, as
    /// `region::widen_scales`).
    E4m3,
}

impl Raw {
    fn size(self) -> usize {
        match self {
            Raw::E8m0 | Raw::E4m3 => 1,
            _ => 2,
        }
    }
}

/// One call's operands for the kernels, for the rows of one task.
struct Args<'a> {
    plan: &'a Plan,
    codes: &'a [u8],
    /// Widened scales (and mins if affine) of the task's rows, `SPAN` zeros after; empty if
    /// `s16` (and `m16`) hold them as stored, in `raw`'s format.
    s: &'a [f32],
    m: &'a [f32],
    s16: &'a [u8],
    m16: &'a [u8],
    raw: Raw,
    /// NVFP4's tensor scale (`Raw::E4m3` scales are multiplied by it); 1 otherwise.
    tensor_scale: f32,
    /// Code -> the byte the dot products take: the table's, or the code itself.
    levels: [u8; 16],
    a: &'a Activations,
}

/// Store one block's codes `t` (block `k` of a row) in the order the kernels read.
fn place(t: &[i8; BLOCK], k: usize, q: &mut [i8], bits: u8) {
    if bits == 8 {
        q[k * BLOCK..(k + 1) * BLOCK].copy_from_slice(t);
        return;
    }
    // Step of 128 = blocks 4c..4c + 4: byte j < 64 is element 2j (a low nibble), byte 64 + j
    // element 2j + 1 (a high one); so lane l of either half holds elements 8l..8l + 8.
    let (c, p) = (k / 4, k % 4);
    let dst = &mut q[c * 128..(c + 1) * 128];
    for j in 0..BLOCK / 2 {
        dst[p * 16 + j] = t[2 * j];
        dst[64 + p * 16 + j] = t[2 * j + 1];
    }
}

/// For step `c` of a span, the block (0..16 in the span) of each lane's products: lane l
/// covers inputs 4l..4l + 4 of a step (8-bit), or 8l..8l + 8 (4-bit, both nibbles).
fn lane_block(bits: u8, c: usize, lane: usize) -> usize {
    if bits == 8 {
        2 * c + lane / 8
    } else {
        4 * c + lane / 4
    }
}

/// Steps of the kernels over the `nblk` blocks of a span (4-bit: the last one may be half).
fn span_steps(bits: u8, nblk: usize) -> usize {
    nblk.div_ceil(step_elements(bits) / BLOCK)
}

/// The index of the weight scale (within the span's first group) of each block of a span.
fn span_group(bpg: usize, i: usize) -> usize {
    i / bpg
}

/// The 16 lanes' sum, in the order of `kernel::reduce`.
fn reduce(v: [f32; 16]) -> f32 {
    let mut h8 = [0f32; 8];
    for i in 0..8 {
        h8[i] = v[i] + v[i + 8];
    }
    let mut h4 = [0f32; 4];
    for i in 0..4 {
        h4[i] = h8[i] + h8[i + 4];
    }
    let (a, b) = (h4[0] + h4[2], h4[1] + h4[3]);
    a + b
}

/// The lane-by-lane model of the SIMD kernel (and its reference in tests).
mod scalar {
    use super::*;

    pub fn rows(args: &Args<'_>, b0: usize, nb: usize, yt: &mut [f32]) {
        let p = args.plan;
        let a = args.a;
        let (n, gpr, bpg) = (p.n_in, p.groups_per_row, p.blocks_per_group);
        let row_bytes = n * p.bits as usize / 8;
        let n_rows = yt.len() / a.batch;
        let blocks = n / BLOCK;
        for r in 0..n_rows {
            let codes = &args.codes[r * row_bytes..(r + 1) * row_bytes];
            for b in b0..b0 + nb {
                let mut acc = [0f32; 16];
                let q = &a.q[b * a.qn..(b + 1) * a.qn];
                for k0 in (0..blocks).step_by(SPAN) {
                    if p.g16 {
                        g16_span(args, codes, r, b, k0, &mut acc);
                        continue;
                    }
                    let j0 = k0 / bpg;
                    let mut sd = [0f32; 16];
                    let mut coef = [0f32; 16];
                    for i in 0..SPAN {
                        let j = j0 + span_group(bpg, i);
                        let inside = k0 + i < blocks && j < gpr;
                        let s = if inside { args.s[r * gpr + j] } else { 0.0 };
                        let m = match p.kind {
                            Kind::Affine if inside => args.m[r * gpr + j],
                            Kind::Affine => 0.0,
                            Kind::Symmetric { .. } => s,
                        };
                        sd[i] = s * a.dx[b * a.stride + k0 + i];
                        coef[i] = m;
                    }
                    for (l, v) in acc.iter_mut().enumerate() {
                        *v = coef[l].mul_add(a.xs[b * a.stride + k0 + l], *v);
                    }
                    let steps = span_steps(p.bits, (blocks - k0).min(SPAN));
                    for c in 0..steps {
                        // The step's first input, and its first code byte in the row.
                        let e = (k0 + c * step_elements(p.bits) / BLOCK) * BLOCK;
                        let e_byte = e * p.bits as usize / 8;
                        for (l, v) in acc.iter_mut().enumerate() {
                            let mut dot = 0i32;
                            for t in 0..4 {
                                let byte = 4 * l + t;
                                if p.bits == 8 {
                                    dot += codes[e + byte] as i32 * q[e + byte] as i32;
                                } else if e_byte + byte < row_bytes {
                                    let code = codes[e_byte + byte];
                                    let lv = &args.levels;
                                    dot += lv[(code & 15) as usize] as i32 * q[e + byte] as i32;
                                    dot +=
                                        lv[(code >> 4) as usize] as i32 * q[e + 64 + byte] as i32;
                                }
                            }
                            *v = (dot as f32).mul_add(sd[lane_block(p.bits, c, l)], *v);
                        }
                    }
                }
                yt[r * a.batch + b] = reduce(acc);
            }
        }
    }

    /// Span `k0` of weight row `r` (its `codes`) times activation row `b`, groups of 16: lane
    /// l of step c holds group `2 k0 + 8c + l/2` of the row, in block `k0 + 4c + l/4`.
    fn g16_span(args: &Args<'_>, codes: &[u8], r: usize, b: usize, k0: usize, acc: &mut [f32]) {
        let (p, a) = (args.plan, args.a);
        let (n, gpr) = (p.n_in, p.groups_per_row);
        let row_bytes = n / 2;
        let zero = match p.kind {
            Kind::Symmetric { zero } => zero,
            Kind::Affine => 0,
        };
        let q = &a.q[b * a.qn..(b + 1) * a.qn];
        let steps = span_steps(4, (n / BLOCK - k0).min(SPAN));
        for c in 0..steps {
            let e = (k0 + 4 * c) * BLOCK;
            let e_byte = e / 2;
            for (l, v) in acc.iter_mut().enumerate() {
                let (mut dot, mut sum) = (0i32, 0i32);
                for t in 0..4 {
                    let byte = 4 * l + t;
                    sum += q[e + byte] as i32 + q[e + 64 + byte] as i32;
                    if e_byte + byte < row_bytes {
                        let code = codes[e_byte + byte];
                        let lv = &args.levels;
                        dot += lv[(code & 15) as usize] as i32 * q[e + byte] as i32;
                        dot += lv[(code >> 4) as usize] as i32 * q[e + 64 + byte] as i32;
                    }
                }
                let j = 2 * k0 + 8 * c + l / 2;
                let s = if j < gpr { args.s[r * gpr + j] } else { 0.0 };
                let sd = s * a.dx[b * a.stride + k0 + lane_block(4, c, l)];
                *v = ((dot - zero * sum) as f32).mul_add(sd, *v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{
        lane_block, span_group, step_elements, Args, Kind, BLOCK, MAX_NB, SPAN, STEP_BYTES,
    };

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("fma")
    }

    /// Activation rows `b0..b0 + nb` against every weight row of the task: several weight rows
    /// at a time (each activation load serves them all, and their independent sums hide
    /// latency), fewer as the activation rows take the registers.
    pub unsafe fn rows(args: &Args<'_>, b0: usize, nb: usize, yt: &mut [f32]) {
        debug_assert!((1..=MAX_NB).contains(&nb));
        macro_rules! by_batch {
            ($bits:literal, $half:literal, $table:literal, $g16:literal) => {
                match nb {
                    1 => run::<$bits, $half, $table, $g16, 1, 4>(args, b0, yt),
                    2 => run::<$bits, $half, $table, $g16, 2, 3>(args, b0, yt),
                    3 => run::<$bits, $half, $table, $g16, 3, 2>(args, b0, yt),
                    4 => run::<$bits, $half, $table, $g16, 4, 2>(args, b0, yt),
                    5 => run::<$bits, $half, $table, $g16, 5, 1>(args, b0, yt),
                    6 => run::<$bits, $half, $table, $g16, 6, 1>(args, b0, yt),
                    7 => run::<$bits, $half, $table, $g16, 7, 1>(args, b0, yt),
                    _ => run::<$bits, $half, $table, $g16, 8, 1>(args, b0, yt),
                }
            };
        }
        // Tables: 4-bit codes; groups of 16 (NVFP4): a table, E4M3 scales as stored or
        // widened (`Plan::rows`).
        let p = args.plan;
        match (p.bits == 8, args.s.is_empty(), p.table.is_some(), p.g16) {
            (true, true, ..) => by_batch!(8, true, false, false),
            (true, false, ..) => by_batch!(8, false, false, false),
            (false, true, false, _) => by_batch!(4, true, false, false),
            (false, true, true, false) => by_batch!(4, true, true, false),
            (false, true, true, true) => by_batch!(4, true, true, true),
            (false, false, false, _) => by_batch!(4, false, false, false),
            (false, false, true, false) => by_batch!(4, false, true, false),
            (false, false, true, true) => by_batch!(4, false, true, true),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    unsafe fn run<
        const BITS: u8,
        const HALF: bool,
        const TABLE: bool,
        const G16: bool,
        const NB: usize,
        const R: usize,
    >(
        args: &Args<'_>,
        b0: usize,
        yt: &mut [f32],
    ) {
        let p = args.plan;
        let a = args.a;
        let n_rows = yt.len() / a.batch;
        let (gpr, row_bytes) = (p.groups_per_row, p.n_in * BITS as usize / 8);
        assert!(args.codes.len() >= n_rows * row_bytes);
        let affine = p.kind == Kind::Affine;
        if HALF {
            let size = args.raw.size();
            assert!(args.s16.len() >= n_rows * gpr * size);
            assert!(!affine || args.m16.len() >= n_rows * gpr * size);
        } else {
            assert!(args.s.len() >= n_rows * gpr + SPAN);
            assert!(!affine || args.m.len() >= n_rows * gpr + SPAN);
        }
        assert!(a.qn >= p.n_in.div_ceil(step_elements(BITS)) * step_elements(BITS));
        assert!(a.q.len() >= (b0 + NB) * a.qn && a.dx.len() >= (b0 + NB) * a.stride);
        let bpg = p.blocks_per_group;
        let mut table = [[0i32; 16]; SPAN / 2 + 1];
        for (i, v) in table[SPAN / 2].iter_mut().enumerate() {
            *v = span_group(bpg, i) as i32;
        }
        for (c, lanes) in table[..SPAN / 2].iter_mut().enumerate() {
            for (l, v) in lanes.iter_mut().enumerate() {
                *v = lane_block(BITS, c, l).min(SPAN - 1) as i32;
            }
        }
        let pairs: [i32; 16] = std::array::from_fn(|l| l as i32 / 2);
        let mut consts = Consts {
            group_of: _mm512_loadu_si512(table[SPAN / 2].as_ptr().cast()),
            lanes: [_mm512_setzero_si512(); SPAN / 2],
            levels: _mm512_broadcast_i32x4(_mm_loadu_si128(args.levels.as_ptr().cast())),
            pairs: _mm512_loadu_si512(pairs.as_ptr().cast()),
            zero: _mm512_set1_epi8(match p.kind {
                Kind::Symmetric { zero } => zero as i8,
                Kind::Affine => 0,
            }),
        };
        for (v, t) in consts.lanes.iter_mut().zip(&table) {
            *v = _mm512_loadu_si512(t.as_ptr().cast());
        }
        let mut r = 0;
        while r < n_rows {
            if r + R <= n_rows {
                rows_dot::<BITS, HALF, TABLE, G16, NB, R>(args, &consts, r, b0, yt);
                r += R;
            } else {
                rows_dot::<BITS, HALF, TABLE, G16, NB, 1>(args, &consts, r, b0, yt);
                r += 1;
            }
        }
    }

    /// Permutation indices: the span block of each lane's weight scale (`group_of`), and of
    /// each lane's products in step c (`lanes[c]`); `Args::levels` in each 128-bit lane (for
    /// `vpshufb`); for groups of 16, each lane's group in a step (`pairs`: l / 2) and the
    /// table's `zero` in every byte.
    struct Consts {
        group_of: __m512i,
        lanes: [__m512i; SPAN / 2],
        levels: __m512i,
        pairs: __m512i,
        zero: __m512i,
    }

    /// `yt[(r + i) * batch + b0 + b] = W[r + i] . x[b0 + b]` for `i < R`, `b < NB`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    unsafe fn rows_dot<
        const BITS: u8,
        const HALF: bool,
        const TABLE: bool,
        const G16: bool,
        const NB: usize,
        const R: usize,
    >(
        args: &Args<'_>,
        consts: &Consts,
        r: usize,
        b0: usize,
        yt: &mut [f32],
    ) {
        let p = args.plan;
        let a = args.a;
        let (n, gpr, bpg) = (p.n_in, p.groups_per_row, p.blocks_per_group);
        let row_bytes = n * BITS as usize / 8;
        let blocks = n / BLOCK;
        let blocks_per_step = step_elements(BITS) / BLOCK;
        let affine = p.kind == Kind::Affine;
        let (group_of, lanes) = (consts.group_of, &consts.lanes);
        let ahead = args.codes.len() / row_bytes >= r + R + PREFETCH_ROWS;
        let low4 = _mm512_set1_epi8(15);
        let mut acc = [[_mm512_setzero_ps(); NB]; R];
        let mut k0 = 0;
        while k0 < blocks {
            let j0 = if G16 { 2 * k0 } else { k0 / bpg };
            // Weight groups of this span (the rest of the row at most, zeros past it).
            let groups = (gpr - j0).min(SPAN);
            let gmask: __mmask16 = ((1u32 << groups) - 1) as __mmask16;
            let bmask: __mmask16 = ((1u32 << (blocks - k0).min(SPAN)) - 1) as __mmask16;
            let mut sd = [[_mm512_setzero_ps(); NB]; R];
            // Groups of 16: each block's dx, for the lanes' own scales in the steps.
            let mut dxs = [_mm512_setzero_ps(); NB];
            for (b, d) in dxs.iter_mut().enumerate().take(if G16 { NB } else { 0 }) {
                *d = _mm512_loadu_ps(a.dx.as_ptr().add((b0 + b) * a.stride + k0));
            }
            for i in 0..R {
                let at = (r + i) * gpr + j0;
                if ahead {
                    prefetch_span::<BITS, HALF>(args, r + i + PREFETCH_ROWS, k0);
                }
                if G16 {
                    continue;
                }
                let sg = load_groups::<HALF>(args, args.s, args.s16, at, gmask);
                let s = _mm512_maskz_permutexvar_ps(bmask, group_of, sg);
                let coef = if affine {
                    let mg = load_groups::<HALF>(args, args.m, args.m16, at, gmask);
                    _mm512_maskz_permutexvar_ps(bmask, group_of, mg)
                } else {
                    s
                };
                for b in 0..NB {
                    let row = (b0 + b) * a.stride + k0;
                    let dx = _mm512_loadu_ps(a.dx.as_ptr().add(row));
                    let xs = _mm512_loadu_ps(a.xs.as_ptr().add(row));
                    sd[i][b] = _mm512_mul_ps(s, dx);
                    acc[i][b] = _mm512_fmadd_ps(coef, xs, acc[i][b]);
                }
            }
            let steps = super::span_steps(BITS, (blocks - k0).min(SPAN));
            for (c, &lane) in lanes.iter().enumerate().take(steps) {
                let e = (k0 + c * blocks_per_step) * BLOCK;
                let e_byte = e * BITS as usize / 8;
                // A 4-bit row of an odd number of 64 inputs ends in half a step.
                let whole = e_byte + STEP_BYTES <= row_bytes;
                let (mut lo, mut hi) = ([_mm512_setzero_si512(); R], [_mm512_setzero_si512(); R]);
                for i in 0..R {
                    let src = args.codes.as_ptr().add((r + i) * row_bytes + e_byte);
                    let v = if whole {
                        _mm512_loadu_si512(src.cast())
                    } else {
                        _mm512_maskz_loadu_epi8(0xffff_ffff, src.cast())
                    };
                    if BITS == 8 {
                        lo[i] = v;
                    } else {
                        lo[i] = _mm512_and_si512(v, low4);
                        hi[i] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                        if TABLE {
                            lo[i] = _mm512_shuffle_epi8(consts.levels, lo[i]);
                            hi[i] = _mm512_shuffle_epi8(consts.levels, hi[i]);
                        }
                    }
                }
                // Groups of 16: the step's 8 scales of each row, lane l taking group l / 2.
                let mut s16 = [_mm512_setzero_ps(); R];
                if G16 {
                    let j = j0 + 8 * c;
                    let gmask = ((1u32 << (gpr - j).min(8)) - 1) as __mmask16;
                    for (i, v) in s16.iter_mut().enumerate() {
                        let at = (r + i) * gpr + j;
                        let sg = load_groups::<HALF>(args, args.s, args.s16, at, gmask);
                        *v = _mm512_permutexvar_ps(consts.pairs, sg);
                    }
                }
                for b in 0..NB {
                    let q = a.q.as_ptr().add((b0 + b) * a.qn + e);
                    let ql = _mm512_loadu_si512(q.cast());
                    let qh = if BITS == 8 {
                        ql
                    } else {
                        _mm512_loadu_si512(q.add(STEP_BYTES).cast())
                    };
                    // Groups of 16: each lane's sum starts at -zero * (its inputs' sum of q).
                    let (mut start, mut dx) = (_mm512_setzero_si512(), _mm512_setzero_ps());
                    if G16 {
                        let zq = _mm512_dpbusd_epi32(_mm512_setzero_si512(), consts.zero, ql);
                        let zq = _mm512_dpbusd_epi32(zq, consts.zero, qh);
                        start = _mm512_sub_epi32(_mm512_setzero_si512(), zq);
                        dx = _mm512_permutexvar_ps(lane, dxs[b]);
                    }
                    for i in 0..R {
                        let mut dot = _mm512_dpbusd_epi32(start, lo[i], ql);
                        if BITS == 4 {
                            dot = _mm512_dpbusd_epi32(dot, hi[i], qh);
                        }
                        let scale = if G16 {
                            _mm512_mul_ps(s16[i], dx)
                        } else {
                            _mm512_permutexvar_ps(lane, sd[i][b])
                        };
                        acc[i][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][b]);
                    }
                }
            }
            k0 += SPAN;
        }
        for (i, rows) in acc.iter().enumerate() {
            for (b, &v) in rows.iter().enumerate() {
                yt[(r + i) * a.batch + b0 + b] = reduce(v);
            }
        }
    }

    /// Weight rows between a row's span and the one asked for with it: a layer from memory
    /// otherwise waits on it row after row (the hardware prefetcher follows 4 interleaved row
    /// streams poorly).
    const PREFETCH_ROWS: usize = 8;

    /// Ask for span `k0` of weight row `row` (codes, scales, mins) to be cached in L2.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_span<const BITS: u8, const HALF: bool>(
        args: &Args<'_>,
        row: usize,
        k0: usize,
    ) {
        let p = args.plan;
        let bytes_per_block = BLOCK * BITS as usize / 8;
        let row_bytes = p.n_in * BITS as usize / 8;
        let start = row * row_bytes + k0 * bytes_per_block;
        let span_bytes = (p.n_in / BLOCK - k0).min(SPAN) * bytes_per_block;
        for line in (0..span_bytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T1>(args.codes.as_ptr().add(start + line).cast());
        }
        let group = row * p.groups_per_row
            + if p.g16 {
                2 * k0
            } else {
                k0 / p.blocks_per_group
            };
        let (at, params): (usize, [&[u8]; 2]) = if HALF {
            (group * args.raw.size(), [args.s16, args.m16])
        } else {
            let f = |v: &[f32]| std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), v.len() * 4);
            (group * 4, [f(args.s), f(args.m)])
        };
        for p in params {
            if at < p.len() {
                _mm_prefetch::<_MM_HINT_T1>(p.as_ptr().add(at).cast());
            }
        }
    }

    /// The values of the groups `at..` in `mask`'s lanes (zeros elsewhere), from fp32 `f` or,
    /// if `HALF`, bytes `h` in `args.raw`'s format (E4M3 scales times `args.tensor_scale`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load_groups<const HALF: bool>(
        args: &Args<'_>,
        f: &[f32],
        h: &[u8],
        at: usize,
        mask: __mmask16,
    ) -> __m512 {
        if !HALF {
            return _mm512_maskz_loadu_ps(mask, f.as_ptr().add(at));
        }
        let raw = args.raw;
        let p16 = || h.as_ptr().cast::<i16>().add(at);
        if raw == super::Raw::Bf16 {
            // a bf16 is the top half of its fp32
            let v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p16()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v))
        } else if raw == super::Raw::E4m3 {
            // S.EEEE.MMM, bias 7: a normal's exponent and mantissa bits shift into place and
            // the exponent is rebiased (+120); a subnormal is mant * 2^-9; S.1111.111 is NaN
            let b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, h.as_ptr().add(at).cast()));
            let mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
            let normal =
                _mm512_add_epi32(_mm512_slli_epi32::<20>(mag), _mm512_set1_epi32(120 << 23));
            let sub = _mm512_mul_ps(_mm512_cvtepi32_ps(mag), _mm512_set1_ps(1.0 / 512.0));
            let small = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
            let nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f));
            let bits = _mm512_mask_mov_epi32(normal, small, _mm512_castps_si512(sub));
            let bits =
                _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(f32::NAN.to_bits() as i32));
            let sign = _mm512_slli_epi32::<24>(_mm512_and_si512(b, _mm512_set1_epi32(0x80)));
            let v = _mm512_castsi512_ps(_mm512_or_si512(bits, sign));
            _mm512_maskz_mul_ps(mask, v, _mm512_set1_ps(args.tensor_scale))
        } else if raw == super::Raw::E8m0 {
            // 2^(b - 127): b in the exponent field; 0 is 2^-127 (a subnormal), 255 NaN
            let b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, h.as_ptr().add(at).cast()));
            let bits = _mm512_slli_epi32::<23>(b);
            let low = _mm512_mask_cmpeq_epi32_mask(mask, b, _mm512_setzero_si512());
            let nan = _mm512_cmpeq_epi32_mask(b, _mm512_set1_epi32(255));
            let bits = _mm512_mask_mov_epi32(bits, low, _mm512_set1_epi32(0x0040_0000));
            let bits =
                _mm512_mask_mov_epi32(bits, nan, _mm512_set1_epi32(f32::NAN.to_bits() as i32));
            _mm512_castsi512_ps(bits)
        } else {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p16()))
        }
    }

    /// The sum of the 16 lanes in the order of `super::reduce`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn reduce(v: __m512) -> f32 {
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        let h8 = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
        let h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps::<1>(h8));
        let h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
        _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps::<1>(h2, h2)))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    use super::Args;

    pub fn available() -> bool {
        false
    }

    pub unsafe fn rows(_: &Args<'_>, _: usize, _: usize, _: &mut [f32]) {
        unreachable!("Plan::new returns None without the kernel")
    }
}
