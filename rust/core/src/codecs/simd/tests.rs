//! Every kernel table this CPU runs, bit for bit against `scalar`.

use super::{available, scalar::SCALAR, InType, Kernels, OutType};
use crate::codecs::codec::{nf4_midpoints, Codec};

/// xorshift64*: deterministic and dependency-free.
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

const LENS: [usize; 20] = [
    0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 129, 1000, 1031,
];
const FIRSTS: [usize; 9] = [0, 1, 2, 3, 5, 7, 8, 13, 64];

/// Hot widths of every codec, plus widths that take the scalar fallback.
const CODECS: [Codec; 17] = [
    Codec::SymmetricFull { bits: 4 },
    Codec::SymmetricFull { bits: 8 },
    Codec::SymmetricFull { bits: 3 },
    Codec::SymmetricFull { bits: 5 },
    Codec::Affine { bits: 4 },
    Codec::Affine { bits: 8 },
    Codec::Symmetric { bits: 4 },
    Codec::Symmetric { bits: 8 },
    Codec::Nf4,
    Codec::Mxfp4,
    Codec::Nvfp4 {
        tensor_scale: 0x3f80_0000,
    },
    Codec::Affine { bits: 2 },
    Codec::Affine { bits: 3 },
    Codec::Symmetric { bits: 3 },
    Codec::Affine { bits: 1 },
    Codec::Symmetric { bits: 6 },
    Codec::Symmetric { bits: 2 },
];

fn simd_tables() -> Vec<&'static Kernels> {
    let all = available();
    assert_eq!(all[0].name, "scalar");
    // Tell the log which tables ran, so a green run on a narrow CPU is not mistaken for coverage.
    eprintln!(
        "kernel tables: {:?}",
        all.iter().map(|k| k.name).collect::<Vec<_>>()
    );
    all[1..].to_vec()
}

/// Values as kernel input of type `t`: rounded to `t` (nearest even, as `half`) and stored as
/// little-endian bytes one byte into the buffer (the kernels take any alignment), with the fp32
/// values those bytes hold.
pub(crate) struct Typed {
    buf: Vec<u8>,
    pub wide: Vec<f32>,
}

impl Typed {
    pub fn new(t: InType, x: &[f32]) -> Typed {
        let mut buf = vec![0u8];
        for &v in x {
            match t {
                InType::F32 => buf.extend(v.to_le_bytes()),
                InType::F16 => buf.extend(half::f16::from_f32(v).to_le_bytes()),
                InType::Bf16 => buf.extend(half::bf16::from_f32(v).to_le_bytes()),
            }
        }
        let wide = (0..x.len())
            .map(|i| super::scalar::get(t, &buf[1..], i))
            .collect();
        Typed { buf, wide }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf[1..]
    }

    /// The widened values as fp32 kernel input (the widen-first reference).
    pub fn wide_bytes(&self) -> Vec<u8> {
        self.wide.iter().flat_map(|v| v.to_le_bytes()).collect()
    }
}

#[test]
fn typed_input_widens_exactly() {
    // The reference the typed kernels are held to: `get` is `half`'s widening, bit for bit.
    let mut r = Rng::new(9);
    let x: Vec<f32> = (0..4096)
        .map(|_| f32::from_bits(r.next_u64() as u32))
        .collect();
    for t in [InType::F16, InType::Bf16] {
        let v = Typed::new(t, &x);
        for (i, b) in v.bytes().chunks_exact(2).enumerate() {
            let want = match t {
                InType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            };
            assert!(
                want.to_bits() == v.wide[i].to_bits() || (want.is_nan() && v.wide[i].is_nan()),
                "{t:?} {want} {}",
                v.wide[i]
            );
        }
    }
}

fn bits_of(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn codes_len(first: usize, len: usize, bits: u8) -> usize {
    ((first + len) * bits as usize).div_ceil(8)
}

/// A scale: mostly random, sometimes 0 (flat group), -0, a power of two or tiny.
fn scale(r: &mut Rng) -> f32 {
    match r.below(6) {
        0 => 0.0,
        1 => -0.0,
        2 => 0.25,
        3 => 1e-30,
        _ => r.unit().abs() * 3.0 + 1e-3,
    }
}

fn min_of(r: &mut Rng) -> f32 {
    match r.below(4) {
        0 => 0.0,
        1 => -0.0,
        _ => r.unit() * 2.0,
    }
}

/// A scale for the narrowing checks: besides `scale`, values whose products overflow fp16 or
/// bf16, land on exact ties of their rounding, are subnormal there, or are NaN / inf.
fn wide_scale(r: &mut Rng) -> f32 {
    match r.below(10) {
        0 => 5000.0,
        1 => 3.0e38 / 8.0,
        2 => 1.0 + f32::EPSILON * 2048.0 * 3.0, // 1 + 3 * 2^-12: fp16 tie, to even
        3 => 1.0 + 1.0 / 256.0,                 // bf16 tie (2^-8 below the 8 kept bits)
        4 => 3.0e-40,
        5 => 1.0e-6,
        6 => r.pick(&[f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY]),
        _ => scale(r),
    }
}

#[test]
fn dequant_matches_scalar() {
    let mut r = Rng::new(1);
    for k in simd_tables() {
        for t in OutType::ALL {
            let size = t.size();
            for codec in CODECS {
                let bits = codec.bits();
                for len in LENS {
                    for first in FIRSTS {
                        let extra = r.below(3);
                        let codes = r.bytes(codes_len(first, len, bits) + extra);
                        let (s, m) = (wide_scale(&mut r), min_of(&mut r));
                        // Prefilled, so a kernel that writes too few or too many bytes shows.
                        let fill = r.bytes(len * size + 3);
                        let (mut want, mut got) = (fill.clone(), fill.clone());
                        let o = ..len * size;
                        (SCALAR.dequant_bcast)(codec, &codes, first, s, m, t, &mut want[o]);
                        (k.dequant_bcast)(codec, &codes, first, s, m, t, &mut got[o]);
                        assert_eq!(
                            want, got,
                            "{} dequant_bcast {codec:?} {t:?} len {len} first {first} s {s} m {m}",
                            k.name
                        );

                        let sv: Vec<f32> = (0..len).map(|_| wide_scale(&mut r)).collect();
                        let mv: Vec<f32> = if codec.has_mins() {
                            (0..len).map(|_| min_of(&mut r)).collect()
                        } else {
                            Vec::new()
                        };
                        let (mut want, mut got) = (fill.clone(), fill.clone());
                        (SCALAR.dequant_vec)(codec, &codes, first, &sv, &mv, t, &mut want[o]);
                        (k.dequant_vec)(codec, &codes, first, &sv, &mv, t, &mut got[o]);
                        assert_eq!(
                            want, got,
                            "{} dequant_vec {codec:?} {t:?} len {len} first {first}",
                            k.name
                        );

                        // The same with fp16 scale and min bytes (NaN, inf, subnormal and
                        // tie-prone values among them), against scalar on their widened values.
                        let halves = |v: &[f32]| -> (Vec<u8>, Vec<f32>) {
                            let h: Vec<half::f16> =
                                v.iter().map(|&x| half::f16::from_f32(x)).collect();
                            (
                                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                                h.iter().map(|x| x.to_f32()).collect(),
                            )
                        };
                        let ((sb, sw), (mb, mw)) = (halves(&sv), halves(&mv));
                        let (mut want, mut got) = (fill.clone(), fill);
                        (SCALAR.dequant_vec)(codec, &codes, first, &sw, &mw, t, &mut want[o]);
                        (k.dequant_vec_f16)(codec, &codes, first, &sb, &mb, t, &mut got[o]);
                        assert_eq!(
                            want, got,
                            "{} dequant_vec_f16 {codec:?} {t:?} len {len} first {first}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn dequant_groups_matches_scalar_per_group() {
    let mut r = Rng::new(6);
    for k in available() {
        for t in OutType::ALL {
            for codec in CODECS {
                for g in [1usize, 7, 16, 32, 48, 64, 100] {
                    for len in [0usize, 1, g, 3 * g, 3 * g + 5, 10 * g - 1] {
                        let first = r.pick(&[0usize, 1, 64, 2 * g]);
                        let codes = r.bytes(codes_len(first, len, codec.bits()) + 2);
                        let groups = len.div_ceil(g);
                        let sv: Vec<f32> = (0..groups).map(|_| wide_scale(&mut r)).collect();
                        let mv: Vec<f32> = if codec.has_mins() {
                            (0..groups).map(|_| min_of(&mut r)).collect()
                        } else {
                            Vec::new()
                        };
                        let size = t.size();
                        let mut want = vec![0u8; len * size];
                        for (j, o) in want.chunks_mut(g * size).enumerate() {
                            let m = if codec.has_mins() { mv[j] } else { 0.0 };
                            (SCALAR.dequant_bcast)(codec, &codes, first + j * g, sv[j], m, t, o);
                        }
                        let mut got = vec![0u8; len * size];
                        (k.dequant_groups)(codec, &codes, first, g, &sv, &mv, t, &mut got);
                        assert_eq!(
                            want, got,
                            "{} dequant_groups {codec:?} {t:?} g {g} len {len} first {first}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

/// fp32 values whose narrowing to fp16 and bf16 is easy to get wrong, as vectors of `n`:
/// normals only (the AVX-512 BF16 instruction's path), normals with one subnormal (which that
/// instruction would flush to zero), every special value, and random bit patterns.
fn narrowing_inputs(r: &mut Rng, n: usize) -> Vec<Vec<f32>> {
    let bits = |b: u32| f32::from_bits(b);
    let special = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        bits(0x7fc0_0000), // quiet NaN
        bits(0xffc0_0000), // negative quiet NaN
        bits(0x7fc1_2345), // payload in both halves
        bits(0xff81_0001), // signalling NaN: quieted by the decode's multiply
        bits(0x7f80_0001), // signalling NaN, payload in the low half only
        bits(0x0000_0001), // smallest subnormal
        bits(0x8000_8000), // negative subnormal, a rounding tie
        bits(0x007f_ffff), // largest subnormal: rounds up to the smallest normal
        bits(0x0000_ffff), // subnormal whose bf16 rounds down
        f32::MIN_POSITIVE, // smallest normal
        bits(0x7f7f_ffff), // largest finite: bf16 rounds to inf
        bits(0x3f80_8000), // bf16 tie to even (down)
        bits(0x3f81_8000), // bf16 tie to even (up)
        65520.0,           // fp16 rounds to inf
        bits(0x3380_0000), // 2^-24: smallest fp16 subnormal
        -1.5,
    ];
    let normal = |r: &mut Rng| r.unit() * 1e3 + 2e-3;
    let mut out = vec![];
    out.push((0..n).map(|_| normal(r)).collect::<Vec<_>>());
    let mut one = out[0].clone();
    one[r.below(n)] = bits(r.below(0x7f_ffff) as u32 + 1);
    out.push(one);
    out.push((0..n).map(|i| special[i % special.len()]).collect());
    out.push((0..n).map(|_| bits(r.next_u64() as u32)).collect());
    out
}

#[test]
fn narrowing_special_values_matches_scalar_and_half() {
    // Per-element scales with every code at level 1 (affine: with min -0) decode to the scales
    // themselves, so each kernel narrows exactly these fp32 values: bit for bit as scalar, and
    // as `half` for every value but NaN (whose payload the decode's multiply may change).
    let mut r = Rng::new(8);
    let cases = [
        (Codec::Symmetric { bits: 8 }, 129u8),
        (Codec::Affine { bits: 8 }, 1),
        (Codec::Symmetric { bits: 4 }, 0x99),
        (Codec::Affine { bits: 4 }, 0x11),
    ];
    for k in simd_tables() {
        for t in [OutType::F16, OutType::Bf16] {
            for (codec, byte) in cases {
                for n in [1usize, 31, 32, 33, 64, 1031] {
                    for sv in narrowing_inputs(&mut r, n) {
                        let codes = vec![byte; codes_len(0, n, codec.bits())];
                        let mv = if codec.has_mins() {
                            vec![-0.0f32; n]
                        } else {
                            vec![]
                        };
                        let at = format!("{} {codec:?} {t:?} n {n}", k.name);
                        let mut wide = vec![0u8; 4 * n];
                        (SCALAR.dequant_vec)(codec, &codes, 0, &sv, &mv, OutType::F32, &mut wide);
                        for (i, w) in wide.chunks_exact(4).enumerate() {
                            let w = f32::from_le_bytes(w.try_into().unwrap());
                            let same = w.to_bits() == sv[i].to_bits();
                            assert!(same || (w.is_nan() && sv[i].is_nan()), "{at} level 1");
                        }
                        let mut want = vec![0u8; 2 * n];
                        (SCALAR.dequant_vec)(codec, &codes, 0, &sv, &mv, t, &mut want);
                        for (i, h) in want.chunks_exact(2).enumerate() {
                            let h = u16::from_le_bytes([h[0], h[1]]);
                            let v = sv[i];
                            let exact = match t {
                                OutType::F16 => half::f16::from_f32(v).to_bits(),
                                _ => half::bf16::from_f32(v).to_bits(),
                            };
                            assert!(v.is_nan() || h == exact, "{at} scalar {v:e}");
                        }
                        let mut got = vec![0u8; 2 * n];
                        (k.dequant_vec)(codec, &codes, 0, &sv, &mv, t, &mut got);
                        assert_eq!(want, got, "{at} dequant_vec");
                        // One group per element: the one-scale kernels (and their lookup
                        // tables, narrowed once per group) on the same values.
                        let mut got = vec![0u8; 2 * n];
                        (k.dequant_groups)(codec, &codes, 0, 1, &sv, &mv, t, &mut got);
                        assert_eq!(want, got, "{at} dequant_groups");
                    }
                }
            }
        }
    }
}

#[test]
fn scalar_narrowing_is_decode_then_round() {
    // The reference itself: each output element is the fp32 decode rounded by `half`.
    let mut r = Rng::new(5);
    let codec = Codec::Affine { bits: 4 };
    let codes = r.bytes(64);
    let mut f = vec![0u8; 128 * 4];
    (SCALAR.dequant_bcast)(codec, &codes, 0, 0.3, -1.1, OutType::F32, &mut f);
    for t in [OutType::F16, OutType::Bf16] {
        let mut h = vec![0u8; 128 * 2];
        (SCALAR.dequant_bcast)(codec, &codes, 0, 0.3, -1.1, t, &mut h);
        for i in 0..128 {
            let v = f32::from_le_bytes(f[4 * i..4 * i + 4].try_into().unwrap());
            let want = match t {
                OutType::F16 => half::f16::from_f32(v).to_bits(),
                _ => half::bf16::from_f32(v).to_bits(),
            };
            assert_eq!(u16::from_le_bytes([h[2 * i], h[2 * i + 1]]), want);
        }
    }
}

/// Inputs for encoding: random values, exact ties of the grid `inv` defines, ±0, values beyond
/// the clamp, and (rarely, as the kernels must still agree) NaN and ±inf.
fn encode_input(r: &mut Rng, len: usize, inv: f32, m: f32) -> Vec<f32> {
    let step = if inv != 0.0 && inv.is_finite() {
        1.0 / inv
    } else {
        0.5
    };
    (0..len)
        .map(|_| match r.below(16) {
            0 => 0.0,
            1 => -0.0,
            2..=5 => m + (r.below(40) as f32 - 20.0 + 0.5) * step,
            6 => m + (r.below(40) as f32 - 20.0) * step,
            7 => r.unit() * 1e6,
            8 => r.pick(&[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-45, -1e-45]),
            9 => r.pick(&nf4_midpoints()) * step,
            _ => m + r.unit() * 20.0 * step,
        })
        .collect()
}

fn inv_of(r: &mut Rng) -> f32 {
    match r.below(8) {
        0 => 0.0,
        1 => f32::INFINITY,
        2 => 4.0,
        3 => 1.0,
        4 => 0.5,
        _ => 1.0 / (r.unit().abs() * 0.5 + 1e-3),
    }
}

#[test]
fn encode_matches_scalar() {
    // Every table and input type against scalar code on the widened fp32 values: SIMD equals
    // scalar, and fp16/bf16 read in place equals widening first.
    let mut r = Rng::new(2);
    let mids = nf4_midpoints();
    let f32_ = InType::F32;
    for k in available() {
        for t in OutType::ALL {
            for codec in CODECS {
                let bits = codec.bits();
                for len in LENS {
                    for first in FIRSTS {
                        let n = codes_len(first, len, bits) + 1;
                        // Zeroed as the drivers hand it, or prefilled to check the OR at the ends.
                        let base = if r.below(2) == 0 {
                            vec![0u8; n]
                        } else {
                            r.bytes(n)
                        };
                        let (inv, m) = (inv_of(&mut r), min_of(&mut r));
                        let x = Typed::new(t, &encode_input(&mut r, len, inv, m));
                        let (mut want, mut got) = (base.clone(), base.clone());
                        let wide = x.wide_bytes();
                        (SCALAR.encode_bcast)(codec, f32_, &wide, inv, m, &mids, &mut want, first);
                        (k.encode_bcast)(codec, t, x.bytes(), inv, m, &mids, &mut got, first);
                        assert_eq!(
                            want, got,
                            "{} encode_bcast {codec:?} {t:?} len {len} first {first} inv {inv} m {m}",
                            k.name
                        );

                        let iv: Vec<f32> = (0..len).map(|_| inv_of(&mut r)).collect();
                        let mv: Vec<f32> = if codec.has_mins() {
                            (0..len).map(|_| min_of(&mut r)).collect()
                        } else {
                            Vec::new()
                        };
                        let x = Typed::new(t, &encode_input(&mut r, len, 4.0, 0.0));
                        let (mut want, mut got) = (base.clone(), base);
                        let wide = x.wide_bytes();
                        (SCALAR.encode_vec)(codec, f32_, &wide, &iv, &mv, &mids, &mut want, first);
                        (k.encode_vec)(codec, t, x.bytes(), &iv, &mv, &mids, &mut got, first);
                        assert_eq!(
                            want, got,
                            "{} encode_vec {codec:?} {t:?} len {len} first {first}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn encode_with_unsorted_midpoints_still_counts() {
    // Not what the drivers pass, but the kernels must not assume it.
    let mut r = Rng::new(3);
    let mut mids = nf4_midpoints();
    mids.swap(3, 9);
    for k in simd_tables() {
        for t in OutType::ALL {
            let x = Typed::new(t, &(0..200).map(|_| r.unit()).collect::<Vec<_>>());
            let (mut want, mut got) = (vec![0u8; 100], vec![0u8; 100]);
            (SCALAR.encode_bcast)(Codec::Nf4, t, x.bytes(), 1.0, 0.0, &mids, &mut want, 0);
            (k.encode_bcast)(Codec::Nf4, t, x.bytes(), 1.0, 0.0, &mids, &mut got, 0);
            assert_eq!(want, got, "{} {t:?}", k.name);
        }
    }
}

/// Values for the statistics: random, with runs of ±0 and, when `special`, one NaN or ±inf.
fn stats_input(r: &mut Rng, len: usize, special: bool) -> Vec<f32> {
    let zeros = r.below(3) == 0;
    let mut x: Vec<f32> = (0..len)
        .map(|_| {
            if zeros {
                r.pick(&[0.0, -0.0])
            } else {
                match r.below(8) {
                    0 => 0.0,
                    1 => -0.0,
                    _ => r.unit() * 100.0,
                }
            }
        })
        .collect();
    if special && len > 0 {
        let i = r.below(len);
        x[i] = r.pick(&[f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
    }
    x
}

#[test]
fn statistics_match_scalar() {
    // As `encode_matches_scalar`: every table and input type against scalar code on the
    // widened fp32 values.
    let mut r = Rng::new(4);
    let f32_ = InType::F32;
    for k in available() {
        for t in OutType::ALL {
            for len in LENS {
                for special in [false, false, true] {
                    let x = Typed::new(t, &stats_input(&mut r, len, special));
                    let (xt, wide) = (x.bytes(), x.wide_bytes());
                    let (wl, wh, wf) = (SCALAR.min_max)(f32_, &wide);
                    let (gl, gh, gf) = (k.min_max)(t, xt);
                    let at = format!("{} {t:?} len {len}", k.name);
                    assert_eq!(wf, gf, "{at} min_max finite");
                    assert_eq!(wf, !special || len == 0);
                    if wf {
                        assert_eq!(
                            (wl.to_bits(), wh.to_bits()),
                            (gl.to_bits(), gh.to_bits()),
                            "{at} min_max: {wl} {wh} vs {gl} {gh}",
                        );
                    }

                    let (wa, wf) = (SCALAR.abs_max)(f32_, &wide);
                    let (ga, gf) = (k.abs_max)(t, xt);
                    assert_eq!(wf, gf, "{at} abs_max finite");
                    if wf {
                        assert_eq!(wa.to_bits(), ga.to_bits(), "{at} abs_max");
                    }

                    // Running accumulators: fresh (±inf, 0) or already holding values and zeros.
                    let fresh = r.below(2) == 0;
                    let acc = |r: &mut Rng, start: f32, abs: bool| -> Vec<f32> {
                        (0..len)
                            .map(|_| match (fresh, abs) {
                                (true, _) => start,
                                (false, false) => stats_input(r, 1, false)[0],
                                (false, true) => stats_input(r, 1, false)[0].abs(),
                            })
                            .collect()
                    };
                    let lo0 = acc(&mut r, f32::INFINITY, false);
                    let hi0 = acc(&mut r, f32::NEG_INFINITY, false);
                    let a0 = acc(&mut r, 0.0, true);
                    let (mut wl, mut wh) = (lo0.clone(), hi0.clone());
                    let (mut gl, mut gh) = (lo0, hi0);
                    let wf = (SCALAR.min_max_vec)(f32_, &wide, &mut wl, &mut wh);
                    let gf = (k.min_max_vec)(t, xt, &mut gl, &mut gh);
                    assert_eq!(wf, gf, "{at} min_max_vec finite");
                    if wf {
                        assert_eq!(bits_of(&wl), bits_of(&gl), "{at} min_max_vec lo");
                        assert_eq!(bits_of(&wh), bits_of(&gh), "{at} min_max_vec hi");
                    }

                    let (mut wa, mut ga) = (a0.clone(), a0);
                    let wf = (SCALAR.abs_max_vec)(f32_, &wide, &mut wa);
                    let gf = (k.abs_max_vec)(t, xt, &mut ga);
                    assert_eq!(wf, gf, "{at} abs_max_vec finite");
                    if wf {
                        assert_eq!(bits_of(&wa), bits_of(&ga), "{at} abs_max_vec");
                    }
                }
            }
        }
    }
}

#[test]
fn signed_zero_statistics_are_total_order() {
    // -0 < +0 whatever the position or the table: a group of zeros stores min -0 iff it has one.
    for k in available() {
        for n in [3usize, 8, 16, 40] {
            for pos in [0, n / 2, n - 1] {
                let mut x = vec![0.0f32; n];
                x[pos] = -0.0;
                let (lo, hi, f) =
                    (k.min_max)(InType::F32, &Typed::new(InType::F32, &x).wide_bytes());
                assert!(
                    f && lo.is_sign_negative() && hi.is_sign_positive(),
                    "{}",
                    k.name
                );
                let mut x = vec![-0.0f32; n];
                x[pos] = 0.0;
                let (lo, hi, _) =
                    (k.min_max)(InType::F32, &Typed::new(InType::F32, &x).wide_bytes());
                assert!(lo.is_sign_negative() && hi.is_sign_positive(), "{}", k.name);
            }
        }
    }
}

#[test]
fn fp4_encode_ties_and_signs_match_scalar() {
    // Every E2M1 threshold, its fp32 neighbours, both signs, zeros of both signs and values far
    // beyond 6, with a unit scale (so t = x) and with a scale that divides exactly.
    let mut x = vec![0.0f32, -0.0, 6.0, -6.0, 7.9, -100.0, 1e-30, -1e-30];
    for t in [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0] {
        for v in [
            t,
            f32::from_bits(t.to_bits() - 1),
            f32::from_bits(t.to_bits() + 1),
        ] {
            x.extend([v, -v]);
        }
    }
    let mids = nf4_midpoints();
    for k in simd_tables() {
        for codec in [Codec::Mxfp4, Codec::nvfp4(1.0)] {
            for scale in [1.0f32, 0.5, 4.0] {
                // MXFP4 multiplies by 1/scale, NVFP4 divides by the scale.
                let inv = if codec == Codec::Mxfp4 {
                    1.0 / scale
                } else {
                    scale
                };
                let xs: Vec<f32> = x.iter().map(|v| v * scale).collect();
                let n = xs.len().div_ceil(2);
                let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
                let xs = Typed::new(InType::F32, &xs).wide_bytes();
                (SCALAR.encode_bcast)(codec, InType::F32, &xs, inv, 0.0, &mids, &mut want, 0);
                (k.encode_bcast)(codec, InType::F32, &xs, inv, 0.0, &mids, &mut got, 0);
                assert_eq!(want, got, "{} {codec:?} scale {scale}", k.name);
            }
        }
    }
}
