//! The AVX-512 table with bf16 output narrowed by AVX-512 BF16's vcvtne2ps2bf16 (one
//! instruction per two vectors, where the exact integer rounding takes eleven), except for
//! pairs of vectors that hold a subnormal, which the instruction would flush to zero
//! (`avx512_decode::narrow_bf16_native`): 8-bit codes, and scales per element (axis-0 groups).
//! Everything else is the `avx512` table's kernels.
//!
//! Its own decode entry points (`avx512_decode::native`) because an intrinsic only inlines into
//! a function that enables its instruction set.

// `by_codec!` names the codec constants and `avx2` where it is invoked.
use super::avx2::{self, AFF, MXF4, NF4, NVF4, OBF16, OF16, OF32, SYM, SYMF};
use super::avx512::{
    abs_max_avx512, abs_max_vec_avx512, by_codec, enc_bcast, enc_vec, min_max_avx512,
    min_max_vec_avx512,
};
use super::avx512_decode::{self as dec, OBF16N};
use super::{scalar, InType, Kernels, OutType};
use crate::codecs::codec::Codec;

macro_rules! by_codec_out {
    ($codec:expr, $t:expr, $f:ident($($a:expr),*), $other:expr) => {
        match $t {
            OutType::F32 => by_codec!($codec, $f[OF32]($($a),*), $other),
            OutType::F16 => by_codec!($codec, $f[OF16]($($a),*), $other),
            OutType::Bf16 => by_codec!($codec, $f[OBF16]($($a),*), $other),
        }
    };
}

/// The table if this CPU runs the `avx512` table and has AVX-512 BF16 and DQ (Zen 4, Sapphire
/// Rapids and later). Its functions are reachable only here.
pub fn table() -> Option<&'static Kernels> {
    if super::avx512::table().is_some()
        && is_x86_feature_detected!("avx512bf16")
        && is_x86_feature_detected!("avx512dq")
    {
        Some(&AVX512BF16)
    } else {
        None
    }
}

kernel_table!(
    AVX512BF16,
    "avx512bf16",
    min_max_avx512,
    abs_max_avx512,
    min_max_vec_avx512,
    abs_max_vec_avx512
);

/// The decode entry points: bf16 output (`O == OBF16`) by the native narrowing where the
/// kernel narrows every vector; fp32, fp16, and the one-scale kernels of codes of at most 4 bits
/// (which narrow a lookup table once per group, `$lookup`) as the `avx512` table: there the
/// native instances ran 0.91-0.94x as fast as the exact ones on MXFP4, same build and run.
macro_rules! native_bf16 {
    ($($name:ident, $lookup:literal, ($($arg:ident: $ty:ty),*);)*) => {$(
        unsafe fn $name<const K: u8, const B: u8, const O: u8>($($arg: $ty),*) {
            if O == OBF16 && !($lookup && B <= 4) {
                dec::native::$name::<K, B, OBF16N>($($arg),*)
            } else {
                dec::exact::$name::<K, B, O>($($arg),*)
            }
        }
    )*};
}

native_bf16! {
    dq_bcast, true, (codes: &[u8], first: usize, s: f32, m: f32, out: &mut [u8]);
    dq_vec, false, (codes: &[u8], first: usize, s: &[f32], m: &[f32], out: &mut [u8]);
    dq_vec_f16, false, (codes: &[u8], first: usize, s: &[u8], m: &[u8], out: &mut [u8]);
    dq_groups, true, (codes: &[u8], first: usize, g: usize, s: &[f32], m: &[f32], out: &mut [u8]);
}
