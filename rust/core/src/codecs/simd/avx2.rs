//! AVX2 kernels. They repeat `scalar`'s operations in the same order (separate multiply and add,
//! round half to even, then clamp) so results are bit-identical. Only 4- and 8-bit codes are
//! vectorized; other widths, and the ends of a run that do not fill a vector, go to `scalar`.

use std::arch::x86_64::*;

use super::{byte_head, scalar, InType, Kernels, OutType};
use crate::codecs::codec::{Codec, NF4_LEVELS};
use crate::codecs::fp4::E2M1_LEVELS;

/// The AVX2 table if this CPU has AVX2 and F16C. Its functions are reachable only through here.
pub fn table() -> Option<&'static Kernels> {
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c") {
        Some(&AVX2)
    } else {
        None
    }
}

// The codec as a const parameter, so each loop is compiled once per codec and width.
pub(super) const AFF: u8 = 0;
pub(super) const SYM: u8 = 1;
pub(super) const NF4: u8 = 2;
// The FP4 formats: E2M1 levels looked up like NF4's; MXFP4 multiplies by 1/scale, NVFP4 divides.
pub(super) const MXF4: u8 = 3;
pub(super) const NVF4: u8 = 4;
// Symmetric with all 2^b levels (`Codec::SymmetricFull`): only the AVX-512 table encodes it; it
// decodes as `SYM`.
pub(super) const SYMF: u8 = 5;

/// Whether codec `K`'s levels come from a 16-entry table (NF4, E2M1) rather than the code.
pub(super) const fn looked_up<const K: u8>() -> bool {
    matches!(K, NF4 | MXF4 | NVF4)
}

// The float type written (dequantize) or read (quantize) as a const parameter (`OutType` in
// that order).
pub(super) const OF32: u8 = 0;
pub(super) const OF16: u8 = 1;
pub(super) const OBF16: u8 = 2;

/// Calls `$f::<K, B>(args)` (or `$f::<K, B, O>` given `[O]`) for the vectorized codecs (4 and 8
/// bits), else `$other`.
macro_rules! by_codec {
    ($codec:expr, $f:ident $([$o:ident])? ($($a:expr),*), $other:expr) => {
        match $codec {
            Codec::Affine { bits: 4 } => $f::<AFF, 4 $(, $o)?>($($a),*),
            Codec::Affine { bits: 8 } => $f::<AFF, 8 $(, $o)?>($($a),*),
            Codec::Symmetric { bits: 4 } => $f::<SYM, 4 $(, $o)?>($($a),*),
            Codec::Symmetric { bits: 8 } => $f::<SYM, 8 $(, $o)?>($($a),*),
            Codec::Nf4 => $f::<NF4, 4 $(, $o)?>($($a),*),
            Codec::Mxfp4 => $f::<MXF4, 4 $(, $o)?>($($a),*),
            Codec::Nvfp4 { .. } => $f::<NVF4, 4 $(, $o)?>($($a),*),
            _ => $other,
        }
    };
}
pub(super) use by_codec;

/// `by_codec` with the output type `$t` (an `OutType`) as the third const parameter.
macro_rules! by_codec_out {
    ($codec:expr, $t:expr, $f:ident($($a:expr),*), $other:expr) => {
        match $t {
            OutType::F32 => by_codec!($codec, $f[OF32]($($a),*), $other),
            OutType::F16 => by_codec!($codec, $f[OF16]($($a),*), $other),
            OutType::Bf16 => by_codec!($codec, $f[OBF16]($($a),*), $other),
        }
    };
}

pub(super) const fn out_type<const O: u8>() -> OutType {
    match O {
        OF32 => OutType::F32,
        OF16 => OutType::F16,
        _ => OutType::Bf16,
    }
}

/// Bytes per output element.
pub(super) const fn out_size<const O: u8>() -> usize {
    if O == OF32 {
        4
    } else {
        2
    }
}

pub(super) fn codec_of<const K: u8, const B: u8>() -> Codec {
    match K {
        AFF => Codec::Affine { bits: B },
        SYM => Codec::Symmetric { bits: B },
        SYMF => Codec::SymmetricFull { bits: B },
        NF4 => Codec::Nf4,
        MXF4 => Codec::Mxfp4,
        // The scalar fallbacks get full scales (decode) and divisors (encode): they never read
        // the tensor scale.
        _ => Codec::nvfp4(1.0),
    }
}

/// The 16-entry level table of a table-decoded codec (NF4 or E2M1).
pub(super) fn lut<const K: u8>() -> &'static [f32; 16] {
    if K == NF4 {
        &NF4_LEVELS
    } else {
        &E2M1_LEVELS
    }
}

/// The mins of elements `r` (none without mins).
pub(super) fn mins_of<const K: u8>(m: &[f32], r: std::ops::Range<usize>) -> &[f32] {
    if K == AFF {
        &m[r]
    } else {
        &[]
    }
}

/// The NF4 kernels binary-search the midpoints, which equals counting only if they are sorted.
pub(super) fn sorted(mids: &[f32; 15]) -> bool {
    mids.windows(2).all(|w| w[0] <= w[1])
}

// The table and its wrappers; reachable only through `table()`, which checked AVX2.
kernel_table!(
    AVX2,
    "avx2",
    min_max_avx2,
    abs_max_avx2,
    min_max_vec_avx2,
    abs_max_vec_avx2
);

/// Floats ahead of the current position to prefetch (4 KiB; as bytes for the output, whatever
/// its type). Dequantizing prefetches the output for ownership: without it the stores' line fills come late, and a large output was written at
/// 0.6-0.8x of memcpy instead of 1.4x and more (measured on the development machine).
/// Quantizing prefetches the input of the statistics pass (a smaller gain, about 10%).
pub(super) const PREFETCH_AHEAD: usize = 1024;

/// Ask for the output line `4 * PREFETCH_AHEAD` bytes after byte `at` in a writable state
/// (`prefetchw`). A hint only: it never faults, so the address may lie past the slice (hence
/// `wrapping_add`).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn prefetch_out(o: *mut u8, at: usize) {
    _mm_prefetch::<_MM_HINT_ET0>(o.wrapping_add(at + 4 * PREFETCH_AHEAD).cast::<i8>());
}

/// Ask for the input line `4 * PREFETCH_AHEAD` bytes after byte `at` (a hint; may lie past
/// the slice).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn prefetch_in(x: *const u8, at: usize) {
    _mm_prefetch::<_MM_HINT_T0>(x.wrapping_add(at + 4 * PREFETCH_AHEAD).cast::<i8>());
}

/// The 8 input values from element `i` of `p` (little-endian bytes of float type `T`), widened
/// to fp32 in registers: exact, F16C for fp16 and a 16-bit shift for bf16, so every kernel
/// computes on the same fp32 values as on a widened copy.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn load8<const T: u8>(p: *const u8, i: usize) -> __m256 {
    match T {
        OF32 => _mm256_loadu_ps(p.add(4 * i).cast()),
        OF16 => _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast())),
        _ => {
            let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * i).cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h))
        }
    }
}

pub(super) const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
pub(super) const ABS: i32 = 0x7fff_ffff;
pub(super) const INF_BITS: i32 = 0x7f80_0000;

#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn dq_bcast<const K: u8, const B: u8, const O: u8>(
    codes: &[u8],
    first: usize,
    s: f32,
    m: f32,
    out: &mut [u8],
) {
    let (t, size) = (out_type::<O>(), out_size::<O>());
    let n = out.len() / size;
    let head = byte_head(first, B, n);
    let body = (n - head) & !7;
    let codec = codec_of::<K, B>();
    if head > 0 {
        scalar::dequant_bcast(codec, codes, first, s, m, t, &mut out[..head * size]);
    }
    if body > 0 {
        let b0 = (first + head) * B as usize / 8;
        let src = &codes[b0..b0 + body * B as usize / 8];
        let o = out[head * size..(head + body) * size].as_mut_ptr();
        // 4-bit codes into 16-bit floats: look the 16 possible outputs up.
        let looked_up = if B == 4 && O != OF32 { body & !31 } else { 0 };
        if looked_up > 0 {
            dq_lookup16::<K, O>(src.as_ptr(), o, looked_up, s, m);
        }
        if looked_up < body {
            let (p, o) = (src.as_ptr().add(looked_up / 2), o.add(looked_up * size));
            dq_body::<K, B, false, O>(p, o, body - looked_up, &s, &m);
        }
    }
    let r = head + body;
    if r < n {
        let o = &mut out[r * size..n * size];
        scalar::dequant_bcast(codec, codes, first + r, s, m, t, o);
    }
}

/// `n` (a multiple of 32) 4-bit codes at `p` with one scale, into 16-bit floats of type `O`:
/// the 16 possible outputs are decoded (the same multiply and add) and narrowed once, and each
/// code then picks its output bytes with two byte shuffles, about four times less work per
/// element than decoding and narrowing each one.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn dq_lookup16<const K: u8, const O: u8>(
    p: *const u8,
    o: *mut u8,
    n: usize,
    s: f32,
    m: f32,
) {
    let (lv_lo, lv_hi) = match K {
        AFF => (
            _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
            _mm256_setr_ps(8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0),
        ),
        SYM => (
            _mm256_setr_ps(-8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0),
            _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0),
        ),
        _ => (
            _mm256_loadu_ps(lut::<K>().as_ptr()),
            _mm256_loadu_ps(lut::<K>().as_ptr().add(8)),
        ),
    };
    let vs = _mm256_set1_ps(s);
    let decode = |lv: __m256| {
        let v = _mm256_mul_ps(lv, vs);
        if K == AFF {
            _mm256_add_ps(v, _mm256_set1_ps(m))
        } else {
            v
        }
    };
    let mut words = [0u8; 32];
    store8::<O>(words.as_mut_ptr(), 0, decode(lv_lo));
    store8::<O>(words.as_mut_ptr(), 8, decode(lv_hi));
    // Low and high bytes of the 16 outputs as two 16-byte tables, in both 128-bit lanes.
    let w = _mm256_loadu_si256(words.as_ptr().cast());
    let split = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, //
        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
    );
    let b = _mm256_shuffle_epi8(w, split);
    let t_lo = _mm256_permute4x64_epi64::<0b10_00_10_00>(b);
    let t_hi = _mm256_permute4x64_epi64::<0b11_01_11_01>(b);
    let nib = _mm_set1_epi8(15);
    let mut i = 0;
    while i < n {
        let c = _mm_loadu_si128(p.add(i / 2).cast());
        let lo = _mm_and_si128(c, nib);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(c), nib);
        // Codes in element order: byte j holds elements 2j (low nibble) and 2j + 1.
        let idx = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
        let l = _mm256_shuffle_epi8(t_lo, idx);
        let h = _mm256_shuffle_epi8(t_hi, idx);
        let (a, b) = (_mm256_unpacklo_epi8(l, h), _mm256_unpackhi_epi8(l, h));
        let q = o.add(2 * i);
        prefetch_out(o, 2 * i);
        _mm256_storeu_si256(q.cast(), _mm256_permute2x128_si256::<0x20>(a, b));
        _mm256_storeu_si256(q.add(32).cast(), _mm256_permute2x128_si256::<0x31>(a, b));
        i += 32;
    }
}

/// `dq_bcast` over consecutive groups of `g` elements (the last may be shorter).
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn dq_groups<const K: u8, const B: u8, const O: u8>(
    codes: &[u8],
    first: usize,
    g: usize,
    s: &[f32],
    m: &[f32],
    out: &mut [u8],
) {
    let size = out_size::<O>();
    for (j, o) in out.chunks_mut(g * size).enumerate() {
        let mj = if K == AFF { m[j] } else { 0.0 };
        dq_bcast::<K, B, O>(codes, first + j * g, s[j], mj, o);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn dq_vec<const K: u8, const B: u8, const O: u8>(
    codes: &[u8],
    first: usize,
    s: &[f32],
    m: &[f32],
    out: &mut [u8],
) {
    let (t, size) = (out_type::<O>(), out_size::<O>());
    let n = out.len() / size;
    assert!(s.len() >= n && (K != AFF || m.len() >= n));
    let head = byte_head(first, B, n);
    let body = (n - head) & !7;
    let codec = codec_of::<K, B>();
    if head > 0 {
        let (mh, oh) = (mins_of::<K>(m, 0..head), &mut out[..head * size]);
        scalar::dequant_vec(codec, codes, first, &s[..head], mh, t, oh);
    }
    if body > 0 {
        let b0 = (first + head) * B as usize / 8;
        let src = &codes[b0..b0 + body * B as usize / 8];
        let o = out[head * size..(head + body) * size].as_mut_ptr();
        let mp = mins_of::<K>(m, head..n).as_ptr();
        dq_body::<K, B, true, O>(src.as_ptr(), o, body, s[head..].as_ptr(), mp);
    }
    let r = head + body;
    if r < n {
        let (mr, or) = (mins_of::<K>(m, r..n), &mut out[r * size..n * size]);
        scalar::dequant_vec(codec, codes, first + r, &s[r..n], mr, t, or);
    }
}

/// `dq_vec` over fp16 scale and min bytes, widened a chunk at a time.
pub(super) unsafe fn dq_vec_f16<const K: u8, const B: u8, const O: u8>(
    codes: &[u8],
    first: usize,
    s: &[u8],
    m: &[u8],
    out: &mut [u8],
) {
    let (codec, t) = (codec_of::<K, B>(), out_type::<O>());
    super::widened_vec(dequant_vec, codec, codes, first, s, m, t, out)
}

/// Store 8 values as elements `i..i + 8` of `o`, bytes of output type `O`.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn store8<const O: u8>(o: *mut u8, i: usize, v: __m256) {
    match O {
        OF32 => _mm256_storeu_ps(o.add(4 * i).cast(), v),
        OF16 => {
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(o.add(2 * i).cast(), h)
        }
        _ => _mm_storeu_si128(o.add(2 * i).cast(), bf16x8(v)),
    }
}

/// fp32 -> bf16 as `half::bf16::from_f32`: round to nearest even by adding `0x7fff` plus the
/// kept lowest bit, and NaN kept NaN by setting the quiet bit (the AVX-512 BF16 instruction
/// would flush subnormals to zero instead).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bf16x8(v: __m256) -> __m128i {
    let b = _mm256_castps_si256(v);
    let hi = _mm256_srli_epi32::<16>(b);
    let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
    let biased = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb);
    let rounded = _mm256_srli_epi32::<16>(biased);
    let magnitude = _mm256_and_si256(b, _mm256_set1_epi32(ABS));
    let nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(INF_BITS));
    let quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
    let r = _mm256_blendv_epi8(rounded, quiet, nan);
    // Dwords (all < 2^16) to words; packing works per 128-bit lane, so gather the halves.
    let p = _mm256_packus_epi32(r, r);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b10_00>(p))
}

/// `n` (a multiple of 8) values from byte-aligned codes at `p`, stored into `o` as bytes of
/// output type `O`. Without VEC, `sp`/`mp` point at the one scale/min.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn dq_body<const K: u8, const B: u8, const VEC: bool, const O: u8>(
    p: *const u8,
    o: *mut u8,
    n: usize,
    sp: *const f32,
    mp: *const f32,
) {
    // The table (NF4 or E2M1) of the codecs decoded by lookup; unused by the others.
    let table = if looked_up::<K>() {
        lut::<K>()
    } else {
        &NF4_LEVELS
    };
    let lv_lo = _mm256_loadu_ps(table.as_ptr());
    let lv_hi = _mm256_loadu_ps(table.as_ptr().add(8));
    let vs = _mm256_set1_ps(*sp);
    let vm = if K == AFF {
        _mm256_set1_ps(*mp)
    } else {
        _mm256_setzero_ps()
    };
    macro_rules! one {
        ($i:expr) => {{
            let i = $i;
            let lv = levels::<K, B>(p, i, lv_lo, lv_hi);
            let s = if VEC { _mm256_loadu_ps(sp.add(i)) } else { vs };
            let mut v = _mm256_mul_ps(lv, s);
            if K == AFF {
                let m = if VEC { _mm256_loadu_ps(mp.add(i)) } else { vm };
                v = _mm256_add_ps(v, m);
            }
            prefetch_out(o, i * out_size::<O>());
            store8::<O>(o, i, v);
        }};
    }
    let mut i = 0;
    while i + 32 <= n {
        one!(i);
        one!(i + 8);
        one!(i + 16);
        one!(i + 24);
        i += 32;
    }
    while i < n {
        one!(i);
        i += 8;
    }
}

/// The levels (`code`, `code - zero` or the NF4 level) of the 8 codes starting at element `i`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn levels<const K: u8, const B: u8>(
    p: *const u8,
    i: usize,
    lv_lo: __m256,
    lv_hi: __m256,
) -> __m256 {
    if B == 4 {
        let w = p.add(i / 2).cast::<i32>().read_unaligned();
        let t = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(w));
        // Dword 2j holds byte j (low nibble = code 2j), dword 2j+1 holds byte j >> 4.
        let idx = _mm256_or_si256(t, _mm256_slli_epi64::<28>(t));
        if looked_up::<K>() {
            // vpermps reads the low 3 bits; bit 3 picks the half (moved to the sign for blendv).
            let a = _mm256_permutevar8x32_ps(lv_lo, idx);
            let b = _mm256_permutevar8x32_ps(lv_hi, idx);
            _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32::<28>(idx)))
        } else {
            let c = _mm256_and_si256(idx, _mm256_set1_epi32(15));
            if K == SYM {
                _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(8)))
            } else {
                _mm256_cvtepi32_ps(c)
            }
        }
    } else {
        let c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(i).cast()));
        if K == SYM {
            _mm256_cvtepi32_ps(_mm256_sub_epi32(c, _mm256_set1_epi32(128)))
        } else {
            _mm256_cvtepi32_ps(c)
        }
    }
}

/// Broadcast constants of one encode call.
#[derive(Clone, Copy)]
struct Enc {
    inv: __m256,
    m: __m256,
    qmax: __m256,
    nqmax: __m256,
    zero: __m256i,
    mid7: __m256,
    mid3: __m256,
    mid11: __m256,
    /// mids 1, 5, 9, 13 (step 3 of the NF4 search, indexed by code / 4)
    tab3: __m256,
    /// mids 0, 2, ..., 14 (step 4, indexed by code / 2)
    tab4: __m256,
}

impl Enc {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn new<const K: u8, const B: u8>(inv: f32, m: f32, mids: &[f32; 15]) -> Enc {
        let qmax = if K == AFF {
            ((1u32 << B) - 1) as f32
        } else {
            ((1u32 << (B - 1)) - 1) as f32
        };
        Enc {
            inv: _mm256_set1_ps(inv),
            m: _mm256_set1_ps(if K == AFF { m } else { 0.0 }),
            qmax: _mm256_set1_ps(qmax),
            nqmax: _mm256_set1_ps(-qmax),
            zero: _mm256_set1_epi32(1 << (B - 1)),
            mid7: _mm256_set1_ps(mids[7]),
            mid3: _mm256_set1_ps(mids[3]),
            mid11: _mm256_set1_ps(mids[11]),
            tab3: _mm256_setr_ps(mids[1], mids[5], mids[9], mids[13], 0.0, 0.0, 0.0, 0.0),
            tab4: _mm256_setr_ps(
                mids[0], mids[2], mids[4], mids[6], mids[8], mids[10], mids[12], mids[14],
            ),
        }
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn enc_bcast<const K: u8, const B: u8, const T: u8>(
    x: &[u8],
    inv: f32,
    m: f32,
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let (t, size) = (out_type::<T>(), out_size::<T>());
    let n = x.len() / size;
    let codec = codec_of::<K, B>();
    if K == NF4 && !sorted(mids) {
        return scalar::encode_bcast(codec, t, x, inv, m, mids, codes, first);
    }
    let head = byte_head(first, B, n);
    let body = (n - head) & !7;
    if head > 0 {
        scalar::encode_bcast(codec, t, &x[..head * size], inv, m, mids, codes, first);
    }
    if body > 0 {
        let b0 = (first + head) * B as usize / 8;
        let dst = codes[b0..b0 + body * B as usize / 8].as_mut_ptr();
        let c = Enc::new::<K, B>(inv, m, mids);
        let xp = x[head * size..].as_ptr();
        let none = std::ptr::null();
        enc_body::<K, B, false, T>(xp, none, none, body, &c, dst);
    }
    let r = head + body;
    if r < n {
        let xr = &x[r * size..n * size];
        scalar::encode_bcast(codec, t, xr, inv, m, mids, codes, first + r);
    }
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn enc_vec<const K: u8, const B: u8, const T: u8>(
    x: &[u8],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let (t, size) = (out_type::<T>(), out_size::<T>());
    let n = x.len() / size;
    let codec = codec_of::<K, B>();
    if K == NF4 && !sorted(mids) {
        return scalar::encode_vec(codec, t, x, inv, m, mids, codes, first);
    }
    assert!(inv.len() >= n && (K != AFF || m.len() >= n));
    let head = byte_head(first, B, n);
    let body = (n - head) & !7;
    if head > 0 {
        let (xh, mh) = (&x[..head * size], mins_of::<K>(m, 0..head));
        scalar::encode_vec(codec, t, xh, &inv[..head], mh, mids, codes, first);
    }
    if body > 0 {
        let b0 = (first + head) * B as usize / 8;
        let dst = codes[b0..b0 + body * B as usize / 8].as_mut_ptr();
        let c = Enc::new::<K, B>(0.0, 0.0, mids);
        let mp = mins_of::<K>(m, head..n).as_ptr();
        let xp = x[head * size..].as_ptr();
        enc_body::<K, B, true, T>(xp, inv[head..].as_ptr(), mp, body, &c, dst);
    }
    let r = head + body;
    if r < n {
        let (xr, mr) = (&x[r * size..n * size], mins_of::<K>(m, r..n));
        scalar::encode_vec(codec, t, xr, &inv[r..n], mr, mids, codes, first + r);
    }
}

/// Codes of the 8 elements starting at `i`, one per dword.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn code8<const K: u8, const VEC: bool, const T: u8>(
    xp: *const u8,
    ip: *const f32,
    mp: *const f32,
    i: usize,
    c: &Enc,
) -> __m256i {
    let x = load8::<T>(xp, i);
    let inv = if VEC {
        _mm256_loadu_ps(ip.add(i))
    } else {
        c.inv
    };
    match K {
        AFF => {
            let m = if VEC { _mm256_loadu_ps(mp.add(i)) } else { c.m };
            let r = _mm256_round_ps::<ROUND>(_mm256_mul_ps(_mm256_sub_ps(x, m), inv));
            // maxps returns its second operand for NaN: NaN -> 0, as Rust's `NaN as u8`.
            let q = _mm256_min_ps(_mm256_max_ps(r, _mm256_setzero_ps()), c.qmax);
            _mm256_cvttps_epi32(q)
        }
        SYM => {
            let r = _mm256_round_ps::<ROUND>(_mm256_mul_ps(x, inv));
            // NaN -> 0 (Rust's `NaN as i32`), before the clamp would turn it into -qmax.
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
            let q = _mm256_min_ps(_mm256_max_ps(r, c.nqmax), c.qmax);
            _mm256_add_epi32(_mm256_cvttps_epi32(q), c.zero)
        }
        MXF4 | NVF4 => {
            let t = if K == MXF4 {
                _mm256_mul_ps(x, inv)
            } else {
                _mm256_div_ps(x, inv)
            };
            fp4_code8(x, t)
        }
        _ => {
            // Counting `t > mid[k]` over sorted mids = a 4-step binary search (NaN -> 0).
            let t = _mm256_mul_ps(x, inv);
            let k = _mm256_cmp_ps::<_CMP_GT_OQ>(t, c.mid7);
            let code = _mm256_and_si256(_mm256_castps_si256(k), _mm256_set1_epi32(8));
            let mid = _mm256_blendv_ps(c.mid3, c.mid11, k);
            let k = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(t, mid));
            let code = _mm256_or_si256(code, _mm256_and_si256(k, _mm256_set1_epi32(4)));
            let mid = _mm256_permutevar8x32_ps(c.tab3, _mm256_srli_epi32::<2>(code));
            let k = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(t, mid));
            let code = _mm256_or_si256(code, _mm256_and_si256(k, _mm256_set1_epi32(2)));
            let mid = _mm256_permutevar8x32_ps(c.tab4, _mm256_srli_epi32::<1>(code));
            let k = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(t, mid));
            _mm256_sub_epi32(code, k)
        }
    }
}

/// E2M1 codes as `fp4::e2m1_code`: the count of rounding thresholds below |t| (`>` where ties
/// go down, `>=` where they go up), plus 8 where `x < 0`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fp4_code8(x: __m256, t: __m256) -> __m256i {
    let a = _mm256_and_ps(t, _mm256_castsi256_ps(_mm256_set1_epi32(ABS)));
    let gt = |v: f32| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, _mm256_set1_ps(v)));
    let ge = |v: f32| _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GE_OQ>(a, _mm256_set1_ps(v)));
    // Each true comparison is -1: the sum is minus the magnitude code.
    let s = _mm256_add_epi32(
        _mm256_add_epi32(_mm256_add_epi32(gt(0.25), ge(0.75)), gt(1.25)),
        _mm256_add_epi32(
            _mm256_add_epi32(ge(1.75), gt(2.5)),
            _mm256_add_epi32(ge(3.5), gt(5.0)),
        ),
    );
    let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps()));
    let sign = _mm256_and_si256(neg, _mm256_set1_epi32(8));
    _mm256_or_si256(_mm256_sub_epi32(_mm256_setzero_si256(), s), sign)
}

/// Four vectors of dword codes (0..=255) as 32 bytes in element order.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pack_bytes(a0: __m256i, a1: __m256i, a2: __m256i, a3: __m256i) -> __m256i {
    let p01 = _mm256_packs_epi32(a0, a1);
    let p23 = _mm256_packs_epi32(a2, a3);
    // Per 128-bit lane: 4 codes of a0, a1, a2, a3; lane 1 has each vector's upper half.
    let b = _mm256_packus_epi16(p01, p23);
    _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

/// Bytes of 4-bit codes in element order -> nibble pairs (`c[2j] | c[2j+1] << 4`) in the low
/// half of each 128-bit lane.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pair_nibbles(b: __m256i) -> __m256i {
    let w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x1001));
    _mm256_packus_epi16(w, w)
}

/// Encode `n` (a multiple of 8) elements of type `T` at `xp` into byte-aligned `dst`, OR-ing
/// into what is there. Without VEC, `ip` and `mp` are unused (the constants are in `c`).
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn enc_body<const K: u8, const B: u8, const VEC: bool, const T: u8>(
    xp: *const u8,
    ip: *const f32,
    mp: *const f32,
    n: usize,
    c: &Enc,
    dst: *mut u8,
) {
    let mut i = 0;
    while i + 32 <= n {
        let b = pack_bytes(
            code8::<K, VEC, T>(xp, ip, mp, i, c),
            code8::<K, VEC, T>(xp, ip, mp, i + 8, c),
            code8::<K, VEC, T>(xp, ip, mp, i + 16, c),
            code8::<K, VEC, T>(xp, ip, mp, i + 24, c),
        );
        if B == 8 {
            let d = dst.add(i).cast::<__m256i>();
            _mm256_storeu_si256(d, _mm256_or_si256(_mm256_loadu_si256(d), b));
        } else {
            let q = _mm256_permute4x64_epi64::<0b10_00>(pair_nibbles(b));
            let d = dst.add(i / 2).cast::<__m128i>();
            let q = _mm256_castsi256_si128(q);
            _mm_storeu_si128(d, _mm_or_si128(_mm_loadu_si128(d), q));
        }
        i += 32;
    }
    let z = _mm256_setzero_si256();
    while i < n {
        let b = pack_bytes(code8::<K, VEC, T>(xp, ip, mp, i, c), z, z, z);
        if B == 8 {
            let d = dst.add(i).cast::<__m128i>();
            let v = _mm_or_si128(_mm_loadl_epi64(d), _mm256_castsi256_si128(b));
            _mm_storel_epi64(d, v);
        } else {
            let q = _mm_cvtsi128_si32(_mm256_castsi256_si128(pair_nibbles(b)));
            let d = dst.add(i / 2).cast::<i32>();
            d.write_unaligned(d.read_unaligned() | q);
        }
        i += 8;
    }
}

/// Float bits -> an integer key whose signed order is IEEE total order (-0 < +0, NaNs outside
/// ±inf); the map is its own inverse.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn key(v: __m256i) -> __m256i {
    _mm256_xor_si256(v, _mm256_srli_epi32::<1>(_mm256_srai_epi32::<31>(v)))
}

#[inline]
pub(super) fn key1(b: i32) -> i32 {
    b ^ (((b >> 31) as u32) >> 1) as i32
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hmin(v: __m256i) -> i32 {
    let v = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let v = _mm_min_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
    let v = _mm_min_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
    _mm_cvtsi128_si32(v)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hmax(v: __m256i) -> i32 {
    let v = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let v = _mm_max_epi32(v, _mm_shuffle_epi32::<0b01_00_11_10>(v));
    let v = _mm_max_epi32(v, _mm_shuffle_epi32::<0b10_11_00_01>(v));
    _mm_cvtsi128_si32(v)
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn min_max_avx2<const T: u8>(x: &[u8]) -> (f32, f32, bool) {
    let (t, size) = (out_type::<T>(), out_size::<T>());
    let body = (x.len() / size) & !7;
    if body == 0 {
        return scalar::min_max(t, x);
    }
    let p = x.as_ptr();
    let ld = |i: usize| key(_mm256_castps_si256(load8::<T>(p, i)));
    let (mut lo0, mut hi0) = (_mm256_set1_epi32(i32::MAX), _mm256_set1_epi32(i32::MIN));
    let (mut lo1, mut hi1) = (lo0, hi0);
    let mut i = 0;
    while i + 16 <= body {
        prefetch_in(p, i * size);
        let (k0, k1) = (ld(i), ld(i + 8));
        lo0 = _mm256_min_epi32(lo0, k0);
        hi0 = _mm256_max_epi32(hi0, k0);
        lo1 = _mm256_min_epi32(lo1, k1);
        hi1 = _mm256_max_epi32(hi1, k1);
        i += 16;
    }
    if i < body {
        let k0 = ld(i);
        lo0 = _mm256_min_epi32(lo0, k0);
        hi0 = _mm256_max_epi32(hi0, k0);
    }
    let lk = hmin(_mm256_min_epi32(lo0, lo1));
    let hk = hmax(_mm256_max_epi32(hi0, hi1));
    // NaN keys lie beyond the keys of ±inf, so the extremes tell finiteness.
    let finite = lk > key1(f32::NEG_INFINITY.to_bits() as i32) && hk < INF_BITS;
    let lo = f32::from_bits(key1(lk) as u32);
    let hi = f32::from_bits(key1(hk) as u32);
    // Folding in the rest (or the scalar start values, ±inf) keeps all-NaN input identical too.
    let (rl, rh, rf) = scalar::min_max(t, &x[body * size..]);
    (scalar::tmin(lo, rl), scalar::tmax(hi, rh), finite && rf)
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn abs_max_avx2<const T: u8>(x: &[u8]) -> (f32, bool) {
    let (t, size) = (out_type::<T>(), out_size::<T>());
    let body = (x.len() / size) & !7;
    if body == 0 {
        return scalar::abs_max(t, x);
    }
    // |x| as bits orders like the floats (NaN above inf), so an integer max is exact.
    let p = x.as_ptr();
    let abs = _mm256_set1_epi32(ABS);
    let ld = |i: usize| _mm256_and_si256(_mm256_castps_si256(load8::<T>(p, i)), abs);
    let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i + 16 <= body {
        prefetch_in(p, i * size);
        a0 = _mm256_max_epi32(a0, ld(i));
        a1 = _mm256_max_epi32(a1, ld(i + 8));
        i += 16;
    }
    if i < body {
        a0 = _mm256_max_epi32(a0, ld(i));
    }
    let a = hmax(_mm256_max_epi32(a0, a1));
    let (ra, rf) = scalar::abs_max(t, &x[body * size..]);
    (
        scalar::tmax(f32::from_bits(a as u32), ra),
        a < INF_BITS && rf,
    )
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn min_max_vec_avx2<const T: u8>(
    x: &[u8],
    lo: &mut [f32],
    hi: &mut [f32],
) -> bool {
    let (t, size) = (out_type::<T>(), out_size::<T>());
    let n = (x.len() / size).min(lo.len()).min(hi.len());
    let body = n & !7;
    let (xp, lp, hp) = (x.as_ptr(), lo.as_mut_ptr(), hi.as_mut_ptr());
    let abs = _mm256_set1_epi32(ABS);
    let mut fin = _mm256_setzero_si256();
    let mut i = 0;
    while i < body {
        prefetch_in(xp, i * size);
        let v = load8::<T>(xp, i);
        let l = _mm256_loadu_ps(lp.add(i));
        let h = _mm256_loadu_ps(hp.add(i));
        // minps/maxps return the second operand on ties; both orders combined give the
        // total-order result for ±0 (-0 for the min, +0 for the max).
        let l = _mm256_or_ps(_mm256_min_ps(l, v), _mm256_min_ps(v, l));
        let h = _mm256_and_ps(_mm256_max_ps(h, v), _mm256_max_ps(v, h));
        _mm256_storeu_ps(lp.add(i), l);
        _mm256_storeu_ps(hp.add(i), h);
        fin = _mm256_max_epi32(fin, _mm256_and_si256(_mm256_castps_si256(v), abs));
        i += 8;
    }
    let xr = &x[body * size..n * size];
    let rf = scalar::min_max_vec(t, xr, &mut lo[body..n], &mut hi[body..n]);
    hmax(fin) < INF_BITS && rf
}

#[target_feature(enable = "avx2,f16c")]
pub(super) unsafe fn abs_max_vec_avx2<const T: u8>(x: &[u8], a: &mut [f32]) -> bool {
    let (t, size) = (out_type::<T>(), out_size::<T>());
    let n = (x.len() / size).min(a.len());
    let body = n & !7;
    let (xp, ap) = (x.as_ptr(), a.as_mut_ptr().cast::<__m256i>());
    let abs = _mm256_set1_epi32(ABS);
    let mut fin = _mm256_setzero_si256();
    let mut i = 0;
    while i < body {
        prefetch_in(xp, i * size);
        let v = _mm256_and_si256(_mm256_castps_si256(load8::<T>(xp, i)), abs);
        // A negative accumulator (bits < 0 as i32) loses to any |x|, as in total order.
        let acc = _mm256_max_epi32(_mm256_loadu_si256(ap.add(i / 8)), v);
        _mm256_storeu_si256(ap.add(i / 8), acc);
        fin = _mm256_max_epi32(fin, v);
        i += 8;
    }
    let rf = scalar::abs_max_vec(t, &x[body * size..n * size], &mut a[body..n]);
    hmax(fin) < INF_BITS && rf
}
