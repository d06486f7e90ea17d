//! The FP4 block formats (spec 4.8 `mxfp4`, 4.9 `nvfp4`): E2M1 elements, their rounding, and the
//! block scales' own 8-bit types (E8M0 exponents, E4M3 floats). The per-element and per-block
//! math runs through `Codec` like the other encodings; this file holds what is FP4-specific.

use rayon::prelude::*;

use super::{non_finite, Kernels, Source, CHUNK};
use crate::error::{Error, Result};
use crate::format::DType;

/// The 16 E2M1 values by code: bit 3 the sign, bits 0-2 the magnitude (code 8 is -0).
pub const E2M1_LEVELS: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The largest E2M1 magnitude and E4M3 value.
pub const E2M1_MAX: f32 = 6.0;
pub const E4M3_MAX: f32 = 448.0;

/// Code of element `x` whose scaled value is `t`: the sign of `x` (`x < 0`, so -0.0 gives
/// +0) and `|t|` rounded to nearest-even on the E2M1 magnitudes, saturating at 6. The
/// thresholds are the midpoints; at a tie the even code wins, hence `>` at 0.25, 1.25, 2.5, 5
/// (ties go down) and `>=` at 0.75, 1.75, 3.5 (ties go up).
#[inline]
pub fn e2m1_code(x: f32, t: f32) -> u8 {
    let a = t.abs();
    let mag = (a > 0.25) as u8
        + (a >= 0.75) as u8
        + (a > 1.25) as u8
        + (a >= 1.75) as u8
        + (a > 2.5) as u8
        + (a >= 3.5) as u8
        + (a > 5.0) as u8;
    ((x < 0.0) as u8) << 3 | mag
}

/// MXFP4 block scale of a block with max |x| = `amax` (finite), as the biased E8M0 exponent:
/// `floor(log2(amax)) - 2 + 127`, at least 0. floor(log2) of a normal fp32 is its exponent
/// field minus 127; zero and subnormal amax (exponent field 0) give the smallest scale, 0.
#[inline]
pub fn e8m0_of_amax(amax: f32) -> u8 {
    (((amax.to_bits() >> 23) & 0xff) as u8).saturating_sub(2)
}

/// The value of an E8M0 scale byte: 2^(b - 127); 255 is NaN.
#[inline]
pub fn e8m0_value(b: u8) -> f32 {
    match b {
        255 => f32::NAN,
        0 => f32::from_bits(0x0040_0000), // 2^-127, a subnormal fp32
        _ => f32::from_bits((b as u32) << 23),
    }
}

/// The value of an E4M3 (float8_e4m3fn) byte: bias 7, subnormals, no infinities, S.1111.111
/// is NaN.
#[inline]
pub const fn e4m3_value(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((b >> 3) & 15, b & 7);
    if e == 15 && m == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m as f32 * (1.0 / 512.0)
    } else {
        f32::from_bits((((e as u32) + 120) << 23) | ((m as u32) << 20))
    };
    sign * mag
}

/// `e4m3_value` of every byte: NVFP4 widens one scale per 16 elements, and the branches of
/// `e4m3_value` cost a third as much as decoding the block.
static E4M3_VALUES: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = e4m3_value(b as u8);
        b += 1;
    }
    t
};

/// A non-negative finite fp32 rounded to E4M3, nearest-even, saturating at 448.
#[inline]
pub fn e4m3_of(v: f32) -> u8 {
    if v >= E4M3_MAX {
        return 0x7e;
    }
    if v < 1.0 / 64.0 {
        // Subnormal range: multiples of 2^-9 (k = 8 is the smallest normal, byte 8).
        return (v * 512.0).round_ties_even() as u8;
    }
    let bits = v.to_bits();
    let (e, m) = ((bits >> 23) as i32 - 127, bits & 0x7f_ffff);
    let (mut keep, rest) = (m >> 20, m & 0xf_ffff);
    if rest > 0x8_0000 || (rest == 0x8_0000 && keep & 1 == 1) {
        keep += 1;
    }
    // keep == 8 carries into the exponent, which the addition does by itself.
    ((((e + 7) as u32) << 3) + keep) as u8
}

/// NVFP4 per-tensor scale: `amax / (6 * 448)` in fp32, at least 2^-126 (so that the all-zero
/// tensor, and tensors of subnormal values, have a usable scale).
#[inline]
pub fn nvfp4_tensor_scale(amax: f32) -> f32 {
    (amax / (E2M1_MAX * E4M3_MAX)).max(f32::MIN_POSITIVE)
}

/// NVFP4 block scale (an E4M3 value) of a block with max |x| = `amax`, given the tensor scale
/// `g`: `amax / (6 * g)` rounded to E4M3 within [2^-9, 448]; a zero block takes 1.0.
#[inline]
pub fn nvfp4_block_scale(amax: f32, g: f32) -> f32 {
    let r = amax / (E2M1_MAX * g);
    if r == 0.0 {
        return 1.0;
    }
    e4m3_value(e4m3_of(r.clamp(1.0 / 512.0, E4M3_MAX)))
}

/// Max |x| over a whole tensor (for the NVFP4 tensor scale), in threads; NaN or Inf is the
/// usual quantization error.
pub fn tensor_amax(k: &Kernels, src: Source<'_>) -> Result<f32> {
    let n = src.len();
    let tasks = n.div_ceil(CHUNK);
    let maxes = (0..tasks)
        .into_par_iter()
        .map(|t| -> Result<f32> {
            let block = src.range(t * CHUNK, ((t + 1) * CHUNK).min(n))?;
            let x = block.values();
            let (a, finite) = (k.abs_max)(x.t, x.bytes);
            if finite {
                Ok(a)
            } else {
                Err(non_finite())
            }
        })
        .collect::<Result<Vec<f32>>>()?;
    Ok(maxes.into_iter().fold(0.0, f32::max))
}

/// Widen stored block scales to their fp32 values: E8M0 bytes (mxfp4's `uint8` scales) or
/// E4M3 bytes.
pub fn widen_scales(bytes: &[u8], dtype: DType, out: &mut [f32]) -> Result<()> {
    match dtype {
        // e8m0_value's bits picked by the byte (no float per case), so the loop can run as
        // vector selects: MXFP4 widens a scale per 32 elements
        DType::Uint8 => out.iter_mut().zip(bytes).for_each(|(o, &b)| {
            let bits = match b {
                0 => 0x0040_0000,
                255 => f32::NAN.to_bits(),
                _ => (b as u32) << 23,
            };
            *o = f32::from_bits(bits)
        }),
        DType::Float8E4m3fn => out
            .iter_mut()
            .zip(bytes)
            .for_each(|(o, &b)| *o = E4M3_VALUES[b as usize]),
        other => {
            return Err(Error::Invalid(format!(
                "{other} is not an FP4 block scale dtype"
            )))
        }
    }
    Ok(())
}

/// Stored block scales (fp32 values that are exact E8M0 or E4M3 values) as their bytes.
pub fn scale_bytes(values: &[f32], dtype: DType) -> Result<Vec<u8>> {
    match dtype {
        DType::Uint8 => Ok(values
            .iter()
            .map(|&v| {
                // 2^k: the exponent field is k + 127, or 0 for the subnormal 2^-127.
                let e = (v.to_bits() >> 23) as u8;
                if e == 0 {
                    0
                } else {
                    e
                }
            })
            .collect()),
        DType::Float8E4m3fn => Ok(values.iter().map(|&v| e4m3_of(v)).collect()),
        other => Err(Error::Invalid(format!(
            "{other} is not an FP4 block scale dtype"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_finite_byte() {
        for b in 0..=0x7eu8 {
            let v = e4m3_value(b);
            assert_eq!(e4m3_of(v), b, "byte {b:#x} = {v}");
        }
        assert!(e4m3_value(0x7f).is_nan() && e4m3_value(0xff).is_nan());
        assert_eq!(e4m3_value(0x7e), 448.0);
        assert_eq!(e4m3_value(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_value(0x38), 1.0);
    }

    #[test]
    fn e4m3_rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the tie goes to the even 1.0; above it, up.
        assert_eq!(e4m3_of(1.0625), 0x38);
        assert_eq!(e4m3_of(1.0626), 0x39);
        // Between 1.125 and 1.25 (0x3a): the tie goes up to the even 0x3a.
        assert_eq!(e4m3_of(1.1875), 0x3a);
        // 1.9375 is halfway to 2.0: the mantissa carries into the exponent.
        assert_eq!(e4m3_of(1.9375), 0x40);
        assert_eq!(e4m3_of(460.0), 0x7e);
        assert_eq!(e4m3_of(1e30), 0x7e);
        // Subnormals: 1.5 * 2^-9 is a tie between 1 and 2 (times 2^-9): 2 is even.
        assert_eq!(e4m3_of(1.5 / 512.0), 2);
        assert_eq!(e4m3_of(0.4 / 512.0), 0);
    }

    #[test]
    fn e2m1_ties_go_to_even_codes() {
        let cases = [
            (0.25, 0),
            (0.2501, 1),
            (0.75, 2),
            (1.25, 2),
            (1.75, 4),
            (2.5, 4),
            (3.5, 6),
            (5.0, 6),
            (5.01, 7),
            (100.0, 7),
        ];
        for (t, code) in cases {
            assert_eq!(e2m1_code(t, t), code, "{t}");
            assert_eq!(e2m1_code(-t, -t), code | 8, "-{t}");
        }
        assert_eq!(e2m1_code(-0.0, -0.0), 0);
        assert_eq!(e2m1_code(-0.1, -0.1), 8);
    }

    #[test]
    fn e8m0_scale_is_floor_log2_minus_2() {
        for (amax, want) in [
            (6.0f32, 127u8),
            (4.0, 127),
            (7.99, 127),
            (8.0, 128),
            (1.0, 125),
            (0.0, 0),
            (1e-40, 0),
            (f32::MAX, 252),
        ] {
            assert_eq!(e8m0_of_amax(amax), want, "{amax}");
        }
        assert_eq!(e8m0_value(127), 1.0);
        assert_eq!(e8m0_value(0), 2f32.powi(-127));
        assert!(e8m0_value(255).is_nan());
        let all: Vec<u8> = (0..=255).collect();
        let mut wide = vec![0f32; 256];
        widen_scales(&all, DType::Uint8, &mut wide).unwrap();
        for (&b, w) in all.iter().zip(&wide) {
            assert_eq!(w.to_bits(), e8m0_value(b).to_bits(), "byte {b}");
        }
        let bytes = scale_bytes(
            &[e8m0_value(0), e8m0_value(1), e8m0_value(254)],
            DType::Uint8,
        );
        assert_eq!(bytes.unwrap(), vec![0, 1, 254]);
    }

    #[test]
    fn nvfp4_scales() {
        let g = nvfp4_tensor_scale(2688.0);
        assert_eq!(g, 1.0);
        assert_eq!(nvfp4_block_scale(2688.0, g), 448.0);
        assert_eq!(nvfp4_block_scale(0.0, g), 1.0);
        assert_eq!(nvfp4_block_scale(1e-9, g), 1.0 / 512.0);
        assert_eq!(nvfp4_tensor_scale(0.0), f32::MIN_POSITIVE);
    }
}
