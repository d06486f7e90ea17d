//! AVX2 kernels. They repeat `scalar`'s operations in the same order (separate multiply and add,
//! round half to even, then clamp) so results are bit-identical. Only 4- and 8-bit codes are
//! vectorized; other widths, and the ends of a run that do not fill a vector, go to `scalar`.

use std::arch::x86_64::*;

use super::{byte_head, scalar, Kernels};
use crate::codecs::codec::{Codec, NF4_LEVELS};

static AVX2: Kernels = Kernels {
    name: "avx2",
    dequant_bcast,
    dequant_vec,
    encode_bcast,
    encode_vec,
    min_max,
    abs_max,
    min_max_vec,
    abs_max_vec,
};

/// The AVX2 table if this CPU has AVX2. Its functions are reachable only through here.
pub fn table() -> Option<&'static Kernels> {
    if is_x86_feature_detected!("avx2") {
        Some(&AVX2)
    } else {
        None
    }
}

// SAFETY (all wrappers below): they are only reachable through `table()`, which checked AVX2.

fn dequant_bcast(codec: Codec, codes: &[u8], first: usize, s: f32, m: f32, out: &mut [f32]) {
    unsafe { dequant::<false>(codec, codes, first, &[s], &[m], out) }
}

fn dequant_vec(codec: Codec, codes: &[u8], first: usize, s: &[f32], m: &[f32], out: &mut [f32]) {
    unsafe { dequant::<true>(codec, codes, first, s, m, out) }
}

fn encode_bcast(
    codec: Codec,
    x: &[f32],
    inv: f32,
    m: f32,
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    unsafe { encode::<false>(codec, x, &[inv], &[m], mids, codes, first) }
}

fn encode_vec(
    codec: Codec,
    x: &[f32],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    unsafe { encode::<true>(codec, x, inv, m, mids, codes, first) }
}

fn min_max(x: &[f32]) -> (f32, f32, bool) {
    unsafe { min_max_avx2(x) }
}

fn abs_max(x: &[f32]) -> (f32, bool) {
    unsafe { abs_max_avx2(x) }
}

fn min_max_vec(x: &[f32], lo: &mut [f32], hi: &mut [f32]) -> bool {
    unsafe { min_max_vec_avx2(x, lo, hi) }
}

fn abs_max_vec(x: &[f32], a: &mut [f32]) -> bool {
    unsafe { abs_max_vec_avx2(x, a) }
}

// The codec as a const parameter, so each loop is compiled once per codec and width.
pub(super) const AFF: u8 = 0;
pub(super) const SYM: u8 = 1;
pub(super) const NF4: u8 = 2;

pub(super) fn kind(codec: Codec) -> u8 {
    match codec {
        Codec::Affine { .. } => AFF,
        Codec::Symmetric { .. } => SYM,
        Codec::Nf4 => NF4,
    }
}

pub(super) const ROUND: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
pub(super) const ABS: i32 = 0x7fff_ffff;
pub(super) const INF_BITS: i32 = 0x7f80_0000;

/// Scalar fallback for elements `lo..hi` of a run (bcast passes one-element `s` and `m`).
#[allow(clippy::too_many_arguments)]
fn dequant_scalar<const VEC: bool>(
    codec: Codec,
    codes: &[u8],
    first: usize,
    s: &[f32],
    m: &[f32],
    out: &mut [f32],
    lo: usize,
    hi: usize,
) {
    if lo == hi {
        return;
    }
    let o = &mut out[lo..hi];
    if VEC {
        let m = if codec.has_mins() {
            &m[lo..hi]
        } else {
            &[][..]
        };
        scalar::dequant_vec(codec, codes, first + lo, &s[lo..hi], m, o)
    } else {
        scalar::dequant_bcast(codec, codes, first + lo, s[0], m[0], o)
    }
}

#[target_feature(enable = "avx2")]
pub(super) unsafe fn dequant<const VEC: bool>(
    codec: Codec,
    codes: &[u8],
    first: usize,
    s: &[f32],
    m: &[f32],
    out: &mut [f32],
) {
    let n = out.len();
    let bits = codec.bits();
    let head = byte_head(first, bits, n);
    let body = if bits == 4 || bits == 8 {
        (n - head) & !7
    } else {
        0
    };
    if VEC {
        assert!(s.len() >= n && (!codec.has_mins() || m.len() >= n));
    }
    dequant_scalar::<VEC>(codec, codes, first, s, m, out, 0, head);
    if body > 0 {
        let b0 = (first + head) * bits as usize / 8;
        let src = &codes[b0..b0 + body * bits as usize / 8];
        let o = out[head..head + body].as_mut_ptr();
        let sp = if VEC { s[head..].as_ptr() } else { s.as_ptr() };
        let mp = if codec.has_mins() && VEC {
            m[head..].as_ptr()
        } else {
            m.as_ptr()
        };
        let p = src.as_ptr();
        match (kind(codec), bits) {
            (AFF, 4) => dq_body::<AFF, 4, VEC>(p, o, body, sp, mp),
            (AFF, _) => dq_body::<AFF, 8, VEC>(p, o, body, sp, mp),
            (SYM, 4) => dq_body::<SYM, 4, VEC>(p, o, body, sp, mp),
            (SYM, _) => dq_body::<SYM, 8, VEC>(p, o, body, sp, mp),
            _ => dq_body::<NF4, 4, VEC>(p, o, body, sp, mp),
        }
    }
    dequant_scalar::<VEC>(codec, codes, first, s, m, out, head + body, n);
}

/// `n` (a multiple of 8) values from byte-aligned codes at `p`. Without VEC, `sp`/`mp` point at
/// the one scale/min.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn dq_body<const K: u8, const B: u8, const VEC: bool>(
    p: *const u8,
    o: *mut f32,
    n: usize,
    sp: *const f32,
    mp: *const f32,
) {
    let lv_lo = _mm256_loadu_ps(NF4_LEVELS.as_ptr());
    let lv_hi = _mm256_loadu_ps(NF4_LEVELS.as_ptr().add(8));
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
            _mm256_storeu_ps(o.add(i), v);
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
        if K == NF4 {
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

#[allow(clippy::too_many_arguments)]
fn encode_scalar<const VEC: bool>(
    codec: Codec,
    x: &[f32],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
    lo: usize,
    hi: usize,
) {
    if lo == hi {
        return;
    }
    let xs = &x[lo..hi];
    if VEC {
        let m = if codec.has_mins() {
            &m[lo..hi]
        } else {
            &[][..]
        };
        scalar::encode_vec(codec, xs, &inv[lo..hi], m, mids, codes, first + lo)
    } else {
        scalar::encode_bcast(codec, xs, inv[0], m[0], mids, codes, first + lo)
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

#[target_feature(enable = "avx2")]
pub(super) unsafe fn encode<const VEC: bool>(
    codec: Codec,
    x: &[f32],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let n = x.len();
    let bits = codec.bits();
    // The NF4 kernel binary-searches the midpoints, which equals counting only if they are sorted.
    let sorted = codec != Codec::Nf4 || mids.windows(2).all(|w| w[0] <= w[1]);
    let head = byte_head(first, bits, n);
    let body = if (bits == 4 || bits == 8) && sorted {
        (n - head) & !7
    } else {
        0
    };
    if VEC {
        assert!(inv.len() >= n && (!codec.has_mins() || m.len() >= n));
    }
    encode_scalar::<VEC>(codec, x, inv, m, mids, codes, first, 0, head);
    if body > 0 {
        let b0 = (first + head) * bits as usize / 8;
        let dst = codes[b0..b0 + body * bits as usize / 8].as_mut_ptr();
        let xp = x[head..].as_ptr();
        let ip = if VEC {
            inv[head..].as_ptr()
        } else {
            inv.as_ptr()
        };
        let mp = if codec.has_mins() && VEC {
            m[head..].as_ptr()
        } else {
            m.as_ptr()
        };
        let qmax = match codec {
            Codec::Affine { bits } => ((1u32 << bits) - 1) as f32,
            _ => ((1u32 << (bits - 1)) - 1) as f32,
        };
        let c = Enc {
            inv: _mm256_set1_ps(inv[0]),
            m: _mm256_set1_ps(if codec.has_mins() { m[0] } else { 0.0 }),
            qmax: _mm256_set1_ps(qmax),
            nqmax: _mm256_set1_ps(-qmax),
            zero: _mm256_set1_epi32(1 << (bits - 1)),
            mid7: _mm256_set1_ps(mids[7]),
            mid3: _mm256_set1_ps(mids[3]),
            mid11: _mm256_set1_ps(mids[11]),
            tab3: _mm256_setr_ps(mids[1], mids[5], mids[9], mids[13], 0.0, 0.0, 0.0, 0.0),
            tab4: _mm256_setr_ps(
                mids[0], mids[2], mids[4], mids[6], mids[8], mids[10], mids[12], mids[14],
            ),
        };
        match (kind(codec), bits) {
            (AFF, 4) => enc_body::<AFF, 4, VEC>(xp, ip, mp, body, &c, dst),
            (AFF, _) => enc_body::<AFF, 8, VEC>(xp, ip, mp, body, &c, dst),
            (SYM, 4) => enc_body::<SYM, 4, VEC>(xp, ip, mp, body, &c, dst),
            (SYM, _) => enc_body::<SYM, 8, VEC>(xp, ip, mp, body, &c, dst),
            _ => enc_body::<NF4, 4, VEC>(xp, ip, mp, body, &c, dst),
        }
    }
    encode_scalar::<VEC>(codec, x, inv, m, mids, codes, first, head + body, n);
}

/// Codes of the 8 elements starting at `i`, one per dword.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn code8<const K: u8, const VEC: bool>(
    xp: *const f32,
    ip: *const f32,
    mp: *const f32,
    i: usize,
    c: &Enc,
) -> __m256i {
    let x = _mm256_loadu_ps(xp.add(i));
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

/// Encode `n` (a multiple of 8) elements into byte-aligned `dst`, OR-ing into what is there.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn enc_body<const K: u8, const B: u8, const VEC: bool>(
    xp: *const f32,
    ip: *const f32,
    mp: *const f32,
    n: usize,
    c: &Enc,
    dst: *mut u8,
) {
    let mut i = 0;
    while i + 32 <= n {
        let b = pack_bytes(
            code8::<K, VEC>(xp, ip, mp, i, c),
            code8::<K, VEC>(xp, ip, mp, i + 8, c),
            code8::<K, VEC>(xp, ip, mp, i + 16, c),
            code8::<K, VEC>(xp, ip, mp, i + 24, c),
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
        let b = pack_bytes(code8::<K, VEC>(xp, ip, mp, i, c), z, z, z);
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

#[target_feature(enable = "avx2")]
pub(super) unsafe fn min_max_avx2(x: &[f32]) -> (f32, f32, bool) {
    let body = x.len() & !7;
    if body == 0 {
        return scalar::min_max(x);
    }
    let p = x.as_ptr().cast::<__m256i>();
    let (mut lo0, mut hi0) = (_mm256_set1_epi32(i32::MAX), _mm256_set1_epi32(i32::MIN));
    let (mut lo1, mut hi1) = (lo0, hi0);
    let mut i = 0;
    while i + 16 <= body {
        let k0 = key(_mm256_loadu_si256(p.add(i / 8)));
        let k1 = key(_mm256_loadu_si256(p.add(i / 8 + 1)));
        lo0 = _mm256_min_epi32(lo0, k0);
        hi0 = _mm256_max_epi32(hi0, k0);
        lo1 = _mm256_min_epi32(lo1, k1);
        hi1 = _mm256_max_epi32(hi1, k1);
        i += 16;
    }
    if i < body {
        let k0 = key(_mm256_loadu_si256(p.add(i / 8)));
        lo0 = _mm256_min_epi32(lo0, k0);
        hi0 = _mm256_max_epi32(hi0, k0);
    }
    let lk = hmin(_mm256_min_epi32(lo0, lo1));
    let hk = hmax(_mm256_max_epi32(hi0, hi1));
    // NaN keys lie beyond the keys of ±inf, so the extremes tell finiteness.
    let finite = lk > key1(f32::NEG_INFINITY.to_bits() as i32) && hk < INF_BITS;
    let lo = f32::from_bits(key1(lk) as u32);
    let hi = f32::from_bits(key1(hk) as u32);
    let (rl, rh, rf) = scalar::min_max(&x[body..]);
    (scalar::tmin(lo, rl), scalar::tmax(hi, rh), finite && rf)
}

#[target_feature(enable = "avx2")]
pub(super) unsafe fn abs_max_avx2(x: &[f32]) -> (f32, bool) {
    let body = x.len() & !7;
    if body == 0 {
        return scalar::abs_max(x);
    }
    // |x| as bits orders like the floats (NaN above inf), so an integer max is exact.
    let p = x.as_ptr().cast::<__m256i>();
    let abs = _mm256_set1_epi32(ABS);
    let (mut a0, mut a1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let mut i = 0;
    while i + 16 <= body {
        a0 = _mm256_max_epi32(a0, _mm256_and_si256(_mm256_loadu_si256(p.add(i / 8)), abs));
        a1 = _mm256_max_epi32(
            a1,
            _mm256_and_si256(_mm256_loadu_si256(p.add(i / 8 + 1)), abs),
        );
        i += 16;
    }
    if i < body {
        a0 = _mm256_max_epi32(a0, _mm256_and_si256(_mm256_loadu_si256(p.add(i / 8)), abs));
    }
    let a = hmax(_mm256_max_epi32(a0, a1));
    let (ra, rf) = scalar::abs_max(&x[body..]);
    (
        scalar::tmax(f32::from_bits(a as u32), ra),
        a < INF_BITS && rf,
    )
}

#[target_feature(enable = "avx2")]
pub(super) unsafe fn min_max_vec_avx2(x: &[f32], lo: &mut [f32], hi: &mut [f32]) -> bool {
    let n = x.len().min(lo.len()).min(hi.len());
    let body = n & !7;
    let (xp, lp, hp) = (x.as_ptr(), lo.as_mut_ptr(), hi.as_mut_ptr());
    let abs = _mm256_set1_epi32(ABS);
    let mut fin = _mm256_setzero_si256();
    let mut i = 0;
    while i < body {
        let v = _mm256_loadu_ps(xp.add(i));
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
    let rf = scalar::min_max_vec(&x[body..n], &mut lo[body..n], &mut hi[body..n]);
    hmax(fin) < INF_BITS && rf
}

#[target_feature(enable = "avx2")]
pub(super) unsafe fn abs_max_vec_avx2(x: &[f32], a: &mut [f32]) -> bool {
    let n = x.len().min(a.len());
    let body = n & !7;
    let (xp, ap) = (
        x.as_ptr().cast::<__m256i>(),
        a.as_mut_ptr().cast::<__m256i>(),
    );
    let abs = _mm256_set1_epi32(ABS);
    let mut fin = _mm256_setzero_si256();
    let mut i = 0;
    while i < body {
        let v = _mm256_and_si256(_mm256_loadu_si256(xp.add(i / 8)), abs);
        // A negative accumulator (bits < 0 as i32) loses to any |x|, as in total order.
        let acc = _mm256_max_epi32(_mm256_loadu_si256(ap.add(i / 8)), v);
        _mm256_storeu_si256(ap.add(i / 8), acc);
        fin = _mm256_max_epi32(fin, v);
        i += 8;
    }
    let rf = scalar::abs_max_vec(&x[body..n], &mut a[body..n]);
    hmax(fin) < INF_BITS && rf
}
