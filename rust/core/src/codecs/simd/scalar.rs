//! Portable kernels: the reference every SIMD path is tested against, and the fallback.

use half::{bf16, f16};

use super::{InType, Kernels, OutType};
use crate::codecs::codec::{read_code, write_code, Codec};

pub static SCALAR: Kernels = Kernels {
    name: "scalar",
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

/// Store `v` as element `i` of `out`, little-endian bytes of `t` (nearest-even narrowing).
#[inline]
pub fn put(t: OutType, v: f32, out: &mut [u8], i: usize) {
    match t {
        OutType::F32 => out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        OutType::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        OutType::Bf16 => out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
    }
}

pub fn dequant_bcast(
    codec: Codec,
    codes: &[u8],
    first: usize,
    s: f32,
    m: f32,
    t: OutType,
    out: &mut [u8],
) {
    let bits = codec.bits();
    for i in 0..out.len() / t.size() {
        put(
            t,
            codec.decode(read_code(codes, first + i, bits), s, m),
            out,
            i,
        );
    }
}

/// `dequant_vec` with fp16 scale and min bytes.
pub fn dequant_vec_f16(
    codec: Codec,
    codes: &[u8],
    first: usize,
    s: &[u8],
    m: &[u8],
    t: OutType,
    out: &mut [u8],
) {
    super::widened_vec(dequant_vec, codec, codes, first, s, m, t, out)
}

#[allow(clippy::too_many_arguments)]
pub fn dequant_vec(
    codec: Codec,
    codes: &[u8],
    first: usize,
    s: &[f32],
    m: &[f32],
    t: OutType,
    out: &mut [u8],
) {
    let bits = codec.bits();
    let has_m = codec.has_mins();
    for i in 0..out.len() / t.size() {
        let mi = if has_m { m[i] } else { 0.0 };
        put(
            t,
            codec.decode(read_code(codes, first + i, bits), s[i], mi),
            out,
            i,
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn dequant_groups(
    codec: Codec,
    codes: &[u8],
    first: usize,
    g: usize,
    s: &[f32],
    m: &[f32],
    t: OutType,
    out: &mut [u8],
) {
    let size = t.size();
    for (j, o) in out.chunks_mut(g * size).enumerate() {
        let mj = if codec.has_mins() { m[j] } else { 0.0 };
        dequant_bcast(codec, codes, first + j * g, s[j], mj, t, o);
    }
}

/// Element `i` of little-endian bytes of `t`, widened to fp32 (exact for every input type).
#[inline(always)]
pub fn get(t: InType, x: &[u8], i: usize) -> f32 {
    match t {
        InType::F32 => f32::from_le_bytes([x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]]),
        InType::F16 => f16::from_le_bytes([x[2 * i], x[2 * i + 1]]).to_f32(),
        InType::Bf16 => f32::from_bits((u16::from_le_bytes([x[2 * i], x[2 * i + 1]]) as u32) << 16),
    }
}

/// The values of little-endian bytes of `t`, widened one at a time.
#[inline(always)]
fn values(t: InType, x: &[u8]) -> impl Iterator<Item = f32> + '_ {
    (0..x.len() / t.size()).map(move |i| get(t, x, i))
}

#[allow(clippy::too_many_arguments)]
pub fn encode_bcast(
    codec: Codec,
    t: InType,
    x: &[u8],
    inv: f32,
    m: f32,
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let bits = codec.bits();
    for (i, v) in values(t, x).enumerate() {
        write_code(codes, first + i, bits, codec.encode(v, inv, m, mids));
    }
}

#[allow(clippy::too_many_arguments)]
pub fn encode_vec(
    codec: Codec,
    t: InType,
    x: &[u8],
    inv: &[f32],
    m: &[f32],
    mids: &[f32; 15],
    codes: &mut [u8],
    first: usize,
) {
    let bits = codec.bits();
    let has_m = codec.has_mins();
    for (i, v) in values(t, x).enumerate() {
        let mi = if has_m { m[i] } else { 0.0 };
        write_code(codes, first + i, bits, codec.encode(v, inv[i], mi, mids));
    }
}

/// Min and max in IEEE total order (-0 < +0): `f32::min` leaves the sign of a zero result to the
/// optimizer, which would let tables (and builds) disagree on a stored min of ±0.
#[inline]
pub fn tmin(a: f32, b: f32) -> f32 {
    if b.total_cmp(&a).is_lt() {
        b
    } else {
        a
    }
}

#[inline]
pub fn tmax(a: f32, b: f32) -> f32 {
    if b.total_cmp(&a).is_gt() {
        b
    } else {
        a
    }
}

pub fn min_max(t: InType, x: &[u8]) -> (f32, f32, bool) {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    let mut finite = true;
    for v in values(t, x) {
        finite &= v.is_finite();
        lo = tmin(lo, v);
        hi = tmax(hi, v);
    }
    (lo, hi, finite)
}

pub fn abs_max(t: InType, x: &[u8]) -> (f32, bool) {
    let mut a = 0f32;
    let mut finite = true;
    for v in values(t, x) {
        finite &= v.is_finite();
        a = tmax(a, v.abs());
    }
    (a, finite)
}

pub fn min_max_vec(t: InType, x: &[u8], lo: &mut [f32], hi: &mut [f32]) -> bool {
    let mut finite = true;
    for ((v, l), h) in values(t, x).zip(lo.iter_mut()).zip(hi.iter_mut()) {
        finite &= v.is_finite();
        *l = tmin(*l, v);
        *h = tmax(*h, v);
    }
    finite
}

pub fn abs_max_vec(t: InType, x: &[u8], a: &mut [f32]) -> bool {
    let mut finite = true;
    for (v, acc) in values(t, x).zip(a.iter_mut()) {
        finite &= v.is_finite();
        *acc = tmax(*acc, v.abs());
    }
    finite
}
