//! Kernel tables and runtime CPU dispatch. Every table computes exactly what `scalar` computes.

use std::sync::OnceLock;

use crate::codecs::codec::Codec;
use crate::format::DType;

/// The float type the dequantize kernels write (and the quantize kernels read, `InType`), as
/// little-endian bytes: values are narrowed in registers (round to nearest even, as `half`'s `from_f32`), with no fp32 buffer in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutType {
    F32,
    F16,
    Bf16,
}

/// The float type the quantize kernels read, as little-endian bytes: the same three types,
/// widened in registers (exactly: F16C for fp16, a 16-bit shift for bf16), with no fp32 buffer
/// in between.
pub type InType = OutType;

/// Values to quantize: little-endian bytes of `t`, any alignment.
#[derive(Debug, Clone, Copy)]
pub struct Values<'a> {
    pub bytes: &'a [u8],
    pub t: InType,
}

impl<'a> Values<'a> {
    /// fp32 values as kernel input (their memory, read as little-endian: little-endian targets).
    #[cfg(target_endian = "little")]
    pub fn f32(x: &'a [f32]) -> Self {
        // SAFETY: same memory; u8 has no alignment or validity requirement.
        let bytes = unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), size_of_val(x)) };
        Values {
            bytes,
            t: InType::F32,
        }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.bytes.len() / self.t.size()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Elements `a..b`.
    #[inline]
    pub fn slice(&self, a: usize, b: usize) -> Values<'a> {
        let s = self.t.size();
        Values {
            bytes: &self.bytes[a * s..b * s],
            t: self.t,
        }
    }
}

impl OutType {
    pub const ALL: [OutType; 3] = [OutType::F32, OutType::F16, OutType::Bf16];

    /// The kernels' type for `dtype`; None for dtypes they do not write (float64).
    pub fn of(dtype: DType) -> Option<OutType> {
        match dtype {
            DType::Float32 => Some(OutType::F32),
            DType::Float16 => Some(OutType::F16),
            DType::Bfloat16 => Some(OutType::Bf16),
            _ => None,
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            OutType::F32 => DType::Float32,
            OutType::F16 => DType::Float16,
            OutType::Bf16 => DType::Bfloat16,
        }
    }

    #[inline]
    pub fn size(self) -> usize {
        match self {
            OutType::F32 => 4,
            _ => 2,
        }
    }
}

/// Calls `$f::<T>(args)` with the float type `$t` (an `InType`) as a const parameter.
#[cfg(target_arch = "x86_64")]
macro_rules! by_type {
    ($t:expr, $f:ident($($a:expr),*)) => {
        match $t {
            OutType::F32 => $f::<OF32>($($a),*),
            OutType::F16 => $f::<OF16>($($a),*),
            OutType::Bf16 => $f::<OBF16>($($a),*),
        }
    };
}

/// The table of an x86 instruction set and its safe wrappers. The invoking module provides the
/// kernels (`dq_bcast`, `dq_vec`, `dq_groups`, `enc_bcast`, `enc_vec`, generic over the codec
/// and the float type read or written, and the four statistics functions named here, generic
/// over the float type read) and `by_codec!`. The wrappers pick the codec so that the
/// kernels take at most six integer arguments, all in registers: re-passing stack arguments costs
/// a store-forwarding stall per call, as much as a 64-element group's work.
///
/// SAFETY of the generated wrappers: they are only reachable through the table, which the
/// module's `table()` hands out only after checking the instruction set.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel_table {
    ($table:ident, $name:literal, $min_max:ident, $abs_max:ident, $min_max_vec:ident,
     $abs_max_vec:ident) => {
        static $table: Kernels = Kernels {
            name: $name,
            dequant_bcast,
            dequant_vec,
            dequant_vec_f16,
            dequant_groups,
            encode_bcast,
            encode_vec,
            min_max,
            abs_max,
            min_max_vec,
            abs_max_vec,
        };

        fn dequant_bcast(
            codec: Codec,
            codes: &[u8],
            first: usize,
            s: f32,
            m: f32,
            t: OutType,
            out: &mut [u8],
        ) {
            unsafe {
                by_codec_out!(
                    codec,
                    t,
                    dq_bcast(codes, first, s, m, out),
                    scalar::dequant_bcast(codec, codes, first, s, m, t, out)
                )
            }
        }

        fn dequant_vec(
            codec: Codec,
            codes: &[u8],
            first: usize,
            s: &[f32],
            m: &[f32],
            t: OutType,
            out: &mut [u8],
        ) {
            unsafe {
                by_codec_out!(
                    codec,
                    t,
                    dq_vec(codes, first, s, m, out),
                    scalar::dequant_vec(codec, codes, first, s, m, t, out)
                )
            }
        }

        fn dequant_vec_f16(
            codec: Codec,
            codes: &[u8],
            first: usize,
            s: &[u8],
            m: &[u8],
            t: OutType,
            out: &mut [u8],
        ) {
            unsafe {
                by_codec_out!(
                    codec,
                    t,
                    dq_vec_f16(codes, first, s, m, out),
                    super::widened_vec(dequant_vec, codec, codes, first, s, m, t, out)
                )
            }
        }

        #[allow(clippy::too_many_arguments)]
        fn dequant_groups(
            codec: Codec,
            codes: &[u8],
            first: usize,
            g: usize,
            s: &[f32],
            m: &[f32],
            t: OutType,
            out: &mut [u8],
        ) {
            unsafe {
                by_codec_out!(
                    codec,
                    t,
                    dq_groups(codes, first, g, s, m, out),
                    scalar::dequant_groups(codec, codes, first, g, s, m, t, out)
                )
            }
        }

        #[allow(clippy::too_many_arguments)]
        fn encode_bcast(
            codec: Codec,
            t: InType,
            x: &[u8],
            inv: f32,
            m: f32,
            mids: &[f32; 15],
            codes: &mut [u8],
            first: usize,
        ) {
            unsafe {
                by_codec_out!(
                    codec,
                    t,
                    enc_bcast(x, inv, m, mids, codes, first),
                    scalar::encode_bcast(codec, t, x, inv, m, mids, codes, first)
                )
            }
        }

        #[allow(clippy::too_many_arguments)]
        fn encode_vec(
            codec: Codec,
            t: InType,
            x: &[u8],
            inv: &[f32],
            m: &[f32],
            mids: &[f32; 15],
            codes: &mut [u8],
            first: usize,
        ) {
            unsafe {
                by_codec_out!(
                    codec,
                    t,
                    enc_vec(x, inv, m, mids, codes, first),
                    scalar::encode_vec(codec, t, x, inv, m, mids, codes, first)
                )
            }
        }

        fn min_max(t: InType, x: &[u8]) -> (f32, f32, bool) {
            unsafe { by_type!(t, $min_max(x)) }
        }

        fn abs_max(t: InType, x: &[u8]) -> (f32, bool) {
            unsafe { by_type!(t, $abs_max(x)) }
        }

        fn min_max_vec(t: InType, x: &[u8], lo: &mut [f32], hi: &mut [f32]) -> bool {
            unsafe { by_type!(t, $min_max_vec(x, lo, hi)) }
        }

        fn abs_max_vec(t: InType, x: &[u8], a: &mut [f32]) -> bool {
            unsafe { by_type!(t, $abs_max_vec(x, a)) }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_decode;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
pub mod scalar;
#[cfg(test)]
pub(crate) mod tests;

/// The hot loops of quantization, one table per instruction set.
#[allow(clippy::type_complexity)] // the signatures are the interface; aliases would hide them
/// `codes` + `first`: the packed stream and the index (in codes) of the first element concerned.
/// Dequantize writes `out.len() / t.size()` elements as little-endian bytes of `t`.
pub struct Kernels {
    pub name: &'static str,
    /// `out[i] = decode(code[first + i], s, m)`
    pub dequant_bcast: fn(Codec, &[u8], usize, f32, f32, OutType, &mut [u8]),
    /// `out[i] = decode(code[first + i], s[i], m[i])` (`m` is empty without mins)
    pub dequant_vec: fn(Codec, &[u8], usize, &[f32], &[f32], OutType, &mut [u8]),
    /// `dequant_vec` with the scales and mins as little-endian fp16 bytes (2 per element), widened
    /// inside the kernel: half the bytes of fp32 rows to keep in cache, and no widening pass.
    pub dequant_vec_f16: fn(Codec, &[u8], usize, &[u8], &[u8], OutType, &mut [u8]),
    /// `out[i] = decode(code[first + i], s[i / g], m[i / g])`: runs of whole groups of `g`
    /// (the last may be shorter) in one call, as `dequant_bcast` per group would.
    pub dequant_groups: fn(Codec, &[u8], usize, usize, &[f32], &[f32], OutType, &mut [u8]),
    /// `code[first + i] |= encode(x[i], inv, m)`, into a zeroed stream; `x` holds
    /// little-endian bytes of the `InType` (so do the statistics' inputs).
    pub encode_bcast: fn(Codec, InType, &[u8], f32, f32, &[f32; 15], &mut [u8], usize),
    /// `code[first + i] |= encode(x[i], inv[i], m[i])`
    pub encode_vec: fn(Codec, InType, &[u8], &[f32], &[f32], &[f32; 15], &mut [u8], usize),
    /// `(min, max, all finite)`
    pub min_max: fn(InType, &[u8]) -> (f32, f32, bool),
    /// `(max |x|, all finite)`
    pub abs_max: fn(InType, &[u8]) -> (f32, bool),
    /// elementwise running min and max; returns all finite
    pub min_max_vec: fn(InType, &[u8], &mut [f32], &mut [f32]) -> bool,
    /// elementwise running max |x|; returns all finite
    pub abs_max_vec: fn(InType, &[u8], &mut [f32]) -> bool,
}

/// A `dequant_vec` table function over fp16 scale and min bytes: widened a stack chunk at a
/// time, for the tables that do not widen inside the kernel.
#[allow(clippy::too_many_arguments, clippy::type_complexity)] // `vec` is a `Kernels` field's type
pub(crate) fn widened_vec(
    vec: fn(Codec, &[u8], usize, &[f32], &[f32], OutType, &mut [u8]),
    codec: Codec,
    codes: &[u8],
    first: usize,
    s: &[u8],
    m: &[u8],
    t: OutType,
    out: &mut [u8],
) {
    const STEP: usize = 256;
    let (mut sw, mut mw) = ([0f32; STEP], [0f32; STEP]);
    let widen = |src: &[u8], dst: &mut [f32]| {
        for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        }
    };
    let n = out.len() / t.size();
    for i in (0..n).step_by(STEP) {
        let k = STEP.min(n - i);
        widen(&s[2 * i..2 * (i + k)], &mut sw[..k]);
        let mv = if codec.has_mins() {
            widen(&m[2 * i..2 * (i + k)], &mut mw[..k]);
            &mw[..k]
        } else {
            &[][..]
        };
        let o = &mut out[i * t.size()..(i + k) * t.size()];
        vec(codec, codes, first + i, &sw[..k], mv, t, o);
    }
}

/// Every kernel table this CPU can run, best last.
pub fn available() -> Vec<&'static Kernels> {
    #[allow(unused_mut)]
    let mut all = vec![&scalar::SCALAR];
    #[cfg(target_arch = "x86_64")]
    {
        all.extend(avx2::table());
        all.extend(avx512::table());
        all.extend(avx512bf16::table());
    }
    all
}

/// Elements at the start of a run that the SIMD kernels leave to scalar code so that their body
/// starts on a byte boundary of the code stream: `8 / gcd(bits, 8)` elements fill whole bytes.
#[cfg(target_arch = "x86_64")]
#[inline]
fn byte_head(first: usize, bits: u8, len: usize) -> usize {
    let per = 8 >> bits.trailing_zeros().min(3);
    ((per - first % per) % per).min(len)
}

/// The best table for this CPU, unless `QTENSORS_KERNELS` names another (e.g. `scalar`).
pub fn best() -> &'static Kernels {
    static BEST: OnceLock<&'static Kernels> = OnceLock::new();
    BEST.get_or_init(|| {
        let all = available();
        if let Ok(want) = std::env::var("QTENSORS_KERNELS") {
            if let Some(k) = all.iter().find(|k| k.name == want) {
                return k;
            }
        }
        all.last().copied().expect("scalar kernels always exist")
    })
}

pub fn by_name(name: &str) -> Option<&'static Kernels> {
    available().into_iter().find(|k| k.name == name)
}
