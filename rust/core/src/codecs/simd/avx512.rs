//! AVX-512 kernels: quantize and statistics by the AVX2 method on 16 lanes, bit-identical to
//! `scalar` for the same reasons; what is left after the last full vector goes to the AVX2
//! kernels (every AVX-512 CPU has AVX2; `table()` checks both). Dequantize is `avx512_decode`.

use std::arch::x86_64::*;

use super::avx2::{
    self, codec_of, key1, mins_of, out_size, out_type, prefetch_in, sorted, ABS, AFF, INF_BITS,
    MXF4, NF4, NVF4, OBF16, OF16, OF32, ROUND, SYM, SYMF,
};
use super::avx512_decode::exact::{dq_bcast, dq_groups, dq_vec, dq_vec_f16};
use super::{byte_head, scalar, InType, Kernels, OutType};

/// `avx2::by_codec` plus 2- and 3-bit affine and symmetric codes and the full-level symmetric
/// codes, which these kernels also decode and encode.
macro_rules! by_codec {
    ($codec:expr, $f:ident $([$o:ident])? ($($a:expr),*), $other:expr) => {
        match $codec {
            Codec::SymmetricFull { bits: 2 } => $f::<SYMF, 2 $(, $o)?>($($a),*),
            Codec::SymmetricFull { bits: 3 } => $f::<SYMF, 3 $(, $o)?>($($a),*),
            Codec::SymmetricFull { bits: 4 } => $f::<SYMF, 4 $(, $o)?>($($a),*),
            Codec::SymmetricFull { bits: 8 } => $f::<SYMF, 8 $(, $o)?>($($a),*),
            Codec::Affine { bits: 2 } => $f::<AFF, 2 $(, $o)?>($($a),*),
            Codec::Affine { bits: 3 } => $f::<AFF, 3 $(, $o)?>($($a),*),
            Codec::Symmetric { bits: 2 } => $f::<SYM, 2 $(, $o)?>($($a),*),
            Codec::Symmetric { bits: 3 } => $f::<SYM, 3 $(, $o)?>($($a),*),
            c => avx2::by_codec!(c, $f $([$o])? ($($a),*), $other),
        }
    };
}
pub(super) use by_codec;

macro_rules! by_codec_out {
    ($codec:expr, $t:expr, $f:ident($($a:expr),*), $other:expr) => {
        match $t {
            OutType::F32 => by_codec!($codec, $f[OF32]($($a),*), $other),
            OutType::F16 => by_codec!($codec, $f[OF16]($($a),*), $other),
            OutType::Bf16 => by_codec!($codec, $f[OBF16]($($a),*), $other),
        }
    };
}
use crate::codecs::codec::Codec;

/// The AVX-512 table if this CPU has AVX-512 F, BW, VL and VBMI (Ice Lake, Zen 4 and later),
/// AVX2, F16C and BMI2. Its functions are reachable only here.
pub fn table() -> Option<&'static Kernels> {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vbmi")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("f16c")
        && is_x86_feature_detected!("bmi2")
    {
        Some(&AVX512)
    } else {
        None
    }
}

// The table and its wrappers; reachable only through `table()`, which checked AVX-512F and AVX2.
kernel_table!(
    AVX512,
    "avx512",
    min_max_avx512,
    abs_max_avx512,
    min_max_vec_avx512,
    abs_max_vec_avx512
);

/// Broadcast constants of one encode call.
#[derive(Clone, Copy)]
struct Enc {
    inv: __m512,
    m: __m512,
    qmax: __m512,
    nqmax: __m512,
    zero: __m512i,
    mid7: __m512,
    /// `mids[j + 3]`, `mids[j + 1]`, `mids[j]`: steps 2-4 of the NF4 search, indexed by the code
    /// found so far.
    t3: __m512,
    t2: __m512,
    t1: __m512,
}

impl Enc {
    #[inline]
    #[target_feature(enable = "avx512f,avx2")]
    unsafe fn new<const K: u8, const B: u8>(inv: f32, m: f32, mids: &[f32; 15]) -> Enc {
        let z = (1u32 << (B - 1)) as f32;
        // Clamp bounds of the rounded value: 0..2^b - 1 (affine), -z..z - 1 (all levels), else
        // -(z - 1)..z - 1.
        let (qmax, nqmax) = match K {
            AFF => (((1u32 << B) - 1) as f32, 0.0),
            SYMF => (z - 1.0, -z),
            _ => (z - 1.0, 1.0 - z),
        };
        // NF4 search tables `mids[j + off]` (lanes past the end are never indexed).
        let tab = |off: usize| {
            if K == NF4 {
                _mm512_maskz_loadu_ps(0x7fff >> off, mids.as_ptr().add(off))
            } else {
                _mm512_setzero_ps()
            }
        };
        Enc {
            inv: _mm512_set1_ps(inv),
            m: _mm512_set1_ps(if K == AFF { m } else { 0.0 }),
            qmax: _mm512_set1_ps(qmax),
            nqmax: _mm512_set1_ps(nqmax),
            zero: _mm512_set1_epi32(1 << (B - 1)),
            mid7: _mm512_set1_ps(mids[7]),
            t3: tab(3),
            t2: tab(1),
            t1: tab(0),
        }
    }
}

/// The 16 input values from element `i` of `p` (little-endian bytes of float type `T`),
/// widened to fp32 in registers as `avx2::load8` does.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn load16<const T: u8>(p: *const u8, i: usize) -> __m512 {
    match T {
        OF32 => _mm512_loadu_ps(p.add(4 * i).cast()),
        OF16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i).cast())),
        _ => {
            let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(2 * i).cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }
}

/// `load16` of the lanes in `k` only (the others +0.0; memory past them is not read).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn load16_masked<const T: u8>(p: *const u8, i: usize, k: __mmask16) -> __m512 {
    match T {
        OF32 => _mm512_maskz_loadu_ps(k, p.add(4 * i).cast()),
        OF16 => _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p.add(2 * i).cast())),
        _ => {
            let h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p.add(2 * i).cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(h))
        }
    }
}

#[target_feature(enable = "avx512f,avx2,f16c,bmi2")]
pub(super) unsafe fn enc_bcast<const K: u8, const B: u8, const T: u8>(
    x: &[u8],
    inv: f32,
    m: f32,
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let size = out_size::<T>();
    let n = x.len() / size;
    let head = byte_head(first, B, n);
    let body = (n - head) & !15;
    if body == 0 || (K == NF4 && !sorted(mids)) {
        return rest_bcast::<K, B, T>(x, inv, m, mids, codes, first);
    }
    if head > 0 {
        rest_bcast::<K, B, T>(&x[..head * size], inv, m, mids, codes, first);
    }
    let b0 = (first + head) * B as usize / 8;
    let dst = codes[b0..b0 + body * B as usize / 8].as_mut_ptr();
    let c = Enc::new::<K, B>(inv, m, mids);
    let none = std::ptr::null();
    enc_body::<K, B, false, T>(x[head * size..].as_ptr(), none, none, body, &c, dst);
    let r = head + body;
    if r < n {
        rest_bcast::<K, B, T>(&x[r * size..], inv, m, mids, codes, first + r);
    }
}

/// The elements the AVX-512 bodies leave (heads, tails, short runs): AVX2 kernels for 4- and
/// 8-bit codes, scalar code for 2 and 3 bits and full-level symmetric codes, which AVX2 does
/// not vectorize.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn rest_bcast<const K: u8, const B: u8, const T: u8>(
    x: &[u8],
    inv: f32,
    m: f32,
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    if B < 4 || K == SYMF {
        let (codec, t) = (codec_of::<K, B>(), out_type::<T>());
        scalar::encode_bcast(codec, t, x, inv, m, mids, codes, first)
    } else {
        avx2::enc_bcast::<K, B, T>(x, inv, m, mids, codes, first)
    }
}

/// `rest_bcast` with a scale and min per element.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn rest_vec<const K: u8, const B: u8, const T: u8>(
    x: &[u8],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    if B < 4 || K == SYMF {
        let (codec, t) = (codec_of::<K, B>(), out_type::<T>());
        scalar::encode_vec(codec, t, x, inv, m, mids, codes, first)
    } else {
        avx2::enc_vec::<K, B, T>(x, inv, m, mids, codes, first)
    }
}

#[target_feature(enable = "avx512f,avx2,f16c,bmi2")]
pub(super) unsafe fn enc_vec<const K: u8, const B: u8, const T: u8>(
    x: &[u8],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let size = out_size::<T>();
    let n = x.len() / size;
    let head = byte_head(first, B, n);
    let body = (n - head) & !15;
    if body == 0 || (K == NF4 && !sorted(mids)) {
        return rest_vec::<K, B, T>(x, inv, m, mids, codes, first);
    }
    assert!(inv.len() >= n && (K != AFF || m.len() >= n));
    if head > 0 {
        let (xh, mh) = (&x[..head * size], mins_of::<K>(m, 0..head));
        rest_vec::<K, B, T>(xh, &inv[..head], mh, mids, codes, first);
    }
    let b0 = (first + head) * B as usize / 8;
    let dst = codes[b0..b0 + body * B as usize / 8].as_mut_ptr();
    let c = Enc::new::<K, B>(0.0, 0.0, mids);
    let mp = mins_of::<K>(m, head..n).as_ptr();
    let xp = x[head * size..].as_ptr();
    enc_body::<K, B, true, T>(xp, inv[head..].as_ptr(), mp, body, &c, dst);
    let r = head + body;
    if r < n {
        let (xr, mr) = (&x[r * size..n * size], mins_of::<K>(m, r..n));
        rest_vec::<K, B, T>(xr, &inv[r..n], mr, mids, codes, first + r);
    }
}

/// Codes of the 16 elements starting at `i`, one per dword.
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn code16<const K: u8, const VEC: bool, const T: u8>(
    xp: *const u8,
    ip: *const f32,
    mp: *const f32,
    i: usize,
    c: &Enc,
) -> __m512i {
    let x = load16::<T>(xp, i);
    let inv = if VEC {
        _mm512_loadu_ps(ip.add(i))
    } else {
        c.inv
    };
    match K {
        AFF => {
            let m = if VEC { _mm512_loadu_ps(mp.add(i)) } else { c.m };
            let r = _mm512_roundscale_ps::<ROUND>(_mm512_mul_ps(_mm512_sub_ps(x, m), inv));
            // maxps returns its second operand for NaN: NaN -> 0, as Rust's `NaN as u8`.
            let q = _mm512_min_ps(_mm512_max_ps(r, _mm512_setzero_ps()), c.qmax);
            _mm512_cvttps_epi32(q)
        }
        SYM | SYMF => {
            let r = _mm512_roundscale_ps::<ROUND>(_mm512_mul_ps(x, inv));
            let q = _mm512_min_ps(_mm512_max_ps(r, c.nqmax), c.qmax);
            // NaN -> 0 (Rust's `NaN as i32`), which the clamp alone would make -qmax.
            let ord = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(r, r);
            _mm512_add_epi32(_mm512_maskz_cvttps_epi32(ord, q), c.zero)
        }
        MXF4 | NVF4 => {
            let t = if K == MXF4 {
                _mm512_mul_ps(x, inv)
            } else {
                _mm512_div_ps(x, inv)
            };
            // As `fp4::e2m1_code`: thresholds below |t| (`>`: ties go down, `>=`: up), sign 8.
            let a = _mm512_abs_ps(t);
            let mut mag = _mm512_setzero_si512();
            for (v, ge) in [
                (0.25, false),
                (0.75, true),
                (1.25, false),
                (1.75, true),
                (2.5, false),
                (3.5, true),
                (5.0, false),
            ] {
                let k = if ge {
                    _mm512_cmp_ps_mask::<_CMP_GE_OQ>(a, _mm512_set1_ps(v))
                } else {
                    _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, _mm512_set1_ps(v))
                };
                mag = _mm512_mask_add_epi32(mag, k, mag, _mm512_set1_epi32(1));
            }
            let neg = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
            _mm512_mask_or_epi32(mag, neg, mag, _mm512_set1_epi32(8))
        }
        _ => {
            // Counting `t > mid[k]` over sorted mids = a 4-step binary search (NaN -> 0).
            let t = _mm512_mul_ps(x, inv);
            let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, c.mid7);
            let code = _mm512_maskz_mov_epi32(k, _mm512_set1_epi32(8));
            let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, _mm512_permutexvar_ps(code, c.t3));
            let code = _mm512_mask_add_epi32(code, k, code, _mm512_set1_epi32(4));
            let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, _mm512_permutexvar_ps(code, c.t2));
            let code = _mm512_mask_add_epi32(code, k, code, _mm512_set1_epi32(2));
            let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, _mm512_permutexvar_ps(code, c.t1));
            _mm512_mask_add_epi32(code, k, code, _mm512_set1_epi32(1))
        }
    }
}

/// 16 dword codes as bytes (8 bytes of nibble pairs for 4 bits, 16 bytes for 8 bits).
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn pack16<const B: u8>(c: __m512i) -> __m128i {
    if B == 8 {
        _mm512_cvtepi32_epi8(c)
    } else {
        // Low byte of each qword = code 2j | code 2j+1 << 4.
        _mm512_cvtepi64_epi8(_mm512_or_si512(c, _mm512_srli_epi64::<28>(c)))
    }
}

/// Encode `n` (a multiple of 16) elements of type `T` at `xp` into byte-aligned `dst`, OR-ing
/// into what is there. Without VEC, `ip` and `mp` are unused (the constants are in `c`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,bmi2")]
unsafe fn enc_body<const K: u8, const B: u8, const VEC: bool, const T: u8>(
    xp: *const u8,
    ip: *const f32,
    mp: *const f32,
    n: usize,
    c: &Enc,
    dst: *mut u8,
) {
    if B < 4 {
        // 16 codes of B bits are 2B whole bytes: their B low bits gathered from the 16 bytes.
        let low = 0x0101_0101_0101_0101u64 * ((1u64 << B) - 1);
        for i in (0..n).step_by(16) {
            let b = _mm512_cvtepi32_epi8(code16::<K, VEC, T>(xp, ip, mp, i, c));
            let lo = _pext_u64(_mm_cvtsi128_si64(b) as u64, low);
            let hi = _pext_u64(_mm_extract_epi64::<1>(b) as u64, low);
            or_bytes(
                dst.add(i * B as usize / 8),
                lo | hi << (8 * B),
                2 * B as usize,
            );
        }
        return;
    }
    let mut i = 0;
    while i + 32 <= n {
        let a = pack16::<B>(code16::<K, VEC, T>(xp, ip, mp, i, c));
        let b = pack16::<B>(code16::<K, VEC, T>(xp, ip, mp, i + 16, c));
        if B == 8 {
            let d = dst.add(i).cast::<__m256i>();
            let v = _mm256_set_m128i(b, a);
            _mm256_storeu_si256(d, _mm256_or_si256(_mm256_loadu_si256(d), v));
        } else {
            let d = dst.add(i / 2).cast::<__m128i>();
            let v = _mm_unpacklo_epi64(a, b);
            _mm_storeu_si128(d, _mm_or_si128(_mm_loadu_si128(d), v));
        }
        i += 32;
    }
    if i < n {
        let a = pack16::<B>(code16::<K, VEC, T>(xp, ip, mp, i, c));
        if B == 8 {
            let d = dst.add(i).cast::<__m128i>();
            _mm_storeu_si128(d, _mm_or_si128(_mm_loadu_si128(d), a));
        } else {
            let d = dst.add(i / 2).cast::<__m128i>();
            _mm_storel_epi64(d, _mm_or_si128(_mm_loadl_epi64(d), a));
        }
    }
}

/// OR the `k` (4 or 6) low bytes of `v` into `d`.
#[inline]
unsafe fn or_bytes(d: *mut u8, v: u64, k: usize) {
    let d4 = d.cast::<u32>();
    d4.write_unaligned(d4.read_unaligned() | v as u32);
    if k == 6 {
        let d2 = d.add(4).cast::<u16>();
        d2.write_unaligned(d2.read_unaligned() | (v >> 32) as u16);
    }
}

/// Float bits -> integer key in IEEE total order (see `avx2::key`).
#[inline]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn key(v: __m512i) -> __m512i {
    _mm512_xor_si512(v, _mm512_srli_epi32::<1>(_mm512_srai_epi32::<31>(v)))
}

/// Lanes `0..r` (`r < 16`) set.
#[inline]
fn tail_mask(r: usize) -> __mmask16 {
    ((1u32 << r) - 1) as __mmask16
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub(super) unsafe fn min_max_avx512<const T: u8>(x: &[u8]) -> (f32, f32, bool) {
    let size = out_size::<T>();
    let n = x.len() / size;
    if n == 0 {
        return scalar::min_max(out_type::<T>(), x);
    }
    let p = x.as_ptr();
    let ld = |i: usize| key(_mm512_castps_si512(load16::<T>(p, i)));
    let (mut lo0, mut hi0) = (_mm512_set1_epi32(i32::MAX), _mm512_set1_epi32(i32::MIN));
    let (mut lo1, mut hi1) = (lo0, hi0);
    let mut i = 0;
    while i + 32 <= n {
        prefetch_in(p, i * size);
        prefetch_in(p, (i + 16) * size);
        let (k0, k1) = (ld(i), ld(i + 16));
        lo0 = _mm512_min_epi32(lo0, k0);
        hi0 = _mm512_max_epi32(hi0, k0);
        lo1 = _mm512_min_epi32(lo1, k1);
        hi1 = _mm512_max_epi32(hi1, k1);
        i += 32;
    }
    if i + 16 <= n {
        let k0 = ld(i);
        lo0 = _mm512_min_epi32(lo0, k0);
        hi0 = _mm512_max_epi32(hi0, k0);
        i += 16;
    }
    if i < n {
        // Masked lanes are neither read nor counted.
        let t = tail_mask(n - i);
        let k1 = key(_mm512_castps_si512(load16_masked::<T>(p, i, t)));
        lo1 = _mm512_mask_min_epi32(lo1, t, lo1, k1);
        hi1 = _mm512_mask_max_epi32(hi1, t, hi1, k1);
    }
    let lk = _mm512_reduce_min_epi32(_mm512_min_epi32(lo0, lo1));
    let hk = _mm512_reduce_max_epi32(_mm512_max_epi32(hi0, hi1));
    // NaN keys lie beyond the keys of ±inf, so the extremes tell finiteness.
    let finite = lk > key1(f32::NEG_INFINITY.to_bits() as i32) && hk < INF_BITS;
    // Folding in the scalar start values (+inf, -inf) keeps all-NaN input identical to scalar.
    let lo = scalar::tmin(f32::INFINITY, f32::from_bits(key1(lk) as u32));
    let hi = scalar::tmax(f32::NEG_INFINITY, f32::from_bits(key1(hk) as u32));
    (lo, hi, finite)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
pub(super) unsafe fn abs_max_avx512<const T: u8>(x: &[u8]) -> (f32, bool) {
    // |x| as bits orders like the floats (NaN above inf), so an integer max is exact.
    let (size, p) = (out_size::<T>(), x.as_ptr());
    let n = x.len() / size;
    let abs = _mm512_set1_epi32(ABS);
    let ld = |i: usize| _mm512_and_si512(_mm512_castps_si512(load16::<T>(p, i)), abs);
    let (mut a0, mut a1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let mut i = 0;
    while i + 32 <= n {
        prefetch_in(p, i * size);
        prefetch_in(p, (i + 16) * size);
        a0 = _mm512_max_epi32(a0, ld(i));
        a1 = _mm512_max_epi32(a1, ld(i + 16));
        i += 32;
    }
    if i + 16 <= n {
        a0 = _mm512_max_epi32(a0, ld(i));
        i += 16;
    }
    if i < n {
        // Zeroed lanes are +0, the start value of the scalar loop.
        let v1 = _mm512_castps_si512(load16_masked::<T>(p, i, tail_mask(n - i)));
        a1 = _mm512_max_epi32(a1, _mm512_and_si512(v1, abs));
    }
    let a = _mm512_reduce_max_epi32(_mm512_max_epi32(a0, a1));
    (f32::from_bits(a as u32), a < INF_BITS)
}

#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn min_max_vec_avx512<const T: u8>(
    x: &[u8],
    lo: &mut [f32],
    hi: &mut [f32],
) -> bool {
    let size = out_size::<T>();
    let n = (x.len() / size).min(lo.len()).min(hi.len());
    let body = n & !15;
    let (xp, lp, hp) = (x.as_ptr(), lo.as_mut_ptr(), hi.as_mut_ptr());
    let abs = _mm512_set1_epi32(ABS);
    let mut fin = _mm512_setzero_si512();
    let mut i = 0;
    while i < body {
        prefetch_in(xp, i * size);
        let v = load16::<T>(xp, i);
        let l = _mm512_loadu_ps(lp.add(i));
        let h = _mm512_loadu_ps(hp.add(i));
        // Both operand orders combined give the total-order result for ±0 (see avx2).
        let l = _mm512_or_si512(
            _mm512_castps_si512(_mm512_min_ps(l, v)),
            _mm512_castps_si512(_mm512_min_ps(v, l)),
        );
        let h = _mm512_and_si512(
            _mm512_castps_si512(_mm512_max_ps(h, v)),
            _mm512_castps_si512(_mm512_max_ps(v, h)),
        );
        _mm512_storeu_si512(lp.add(i).cast(), l);
        _mm512_storeu_si512(hp.add(i).cast(), h);
        fin = _mm512_max_epi32(fin, _mm512_and_si512(_mm512_castps_si512(v), abs));
        i += 16;
    }
    let xr = &x[body * size..n * size];
    let rf = avx2::min_max_vec_avx2::<T>(xr, &mut lo[body..n], &mut hi[body..n]);
    _mm512_reduce_max_epi32(fin) < INF_BITS && rf
}

#[target_feature(enable = "avx512f,avx2,f16c")]
pub(super) unsafe fn abs_max_vec_avx512<const T: u8>(x: &[u8], a: &mut [f32]) -> bool {
    let size = out_size::<T>();
    let n = (x.len() / size).min(a.len());
    let body = n & !15;
    let (xp, ap) = (x.as_ptr(), a.as_mut_ptr());
    let abs = _mm512_set1_epi32(ABS);
    let mut fin = _mm512_setzero_si512();
    let mut i = 0;
    while i < body {
        prefetch_in(xp, i * size);
        let v = _mm512_and_si512(_mm512_castps_si512(load16::<T>(xp, i)), abs);
        // A negative accumulator (bits < 0 as i32) loses to any |x|, as in total order.
        let acc = _mm512_max_epi32(_mm512_loadu_si512(ap.add(i).cast()), v);
        _mm512_storeu_si512(ap.add(i).cast(), acc);
        fin = _mm512_max_epi32(fin, v);
        i += 16;
    }
    let rf = avx2::abs_max_vec_avx2::<T>(&x[body * size..n * size], &mut a[body..n]);
    _mm512_reduce_max_epi32(fin) < INF_BITS && rf
}
