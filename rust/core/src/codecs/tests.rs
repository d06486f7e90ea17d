//! The threaded drivers: round-trip error within the spec's bound, and every kernel table giving
//! the same parts and values.

use super::simd::{
    available,
    scalar::SCALAR,
    tests::{Rng, Typed},
};
use super::*;

/// (shape, axis, group size): ragged last groups, groups along earlier axes (FlexGen layout),
/// rank 0, empty, tensors that cross the driver's chunk boundary mid-group and mid-row, and one
/// whose fused pass has several tasks and column tiles.
fn cases() -> Vec<(Vec<u64>, usize, u64)> {
    vec![
        (vec![1000], 0, 64),
        (vec![37, 100], 1, 64),
        (vec![130, 48], 0, 64),
        (vec![257, 33], 0, 64),
        (vec![3, 50, 7], 1, 16),
        (vec![5, 6, 9], 2, 4),
        (vec![4, 3, 33], 0, 3),
        (vec![], 0, 64),
        (vec![0, 5], 1, 4),
        (vec![1, 1], 1, 1),
        (vec![140_001], 0, 7),
        (vec![3, 40_003], 0, 2),
        (vec![2, 70_000], 1, 64),
        (vec![260, 1032], 0, 64),
    ]
}

const CODECS: [Codec; 10] = [
    Codec::Affine { bits: 4 },
    Codec::Affine { bits: 8 },
    Codec::Affine { bits: 3 },
    Codec::Symmetric { bits: 4 },
    Codec::Symmetric { bits: 8 },
    Codec::SymmetricFull { bits: 4 },
    Codec::SymmetricFull { bits: 5 },
    Codec::Nf4,
    Codec::Mxfp4,
    // quantize computes the tensor scale, whatever this one says.
    Codec::Nvfp4 { tensor_scale: 0 },
];

/// Group parameters; the FP4 codecs keep their own scale dtype (the group size is free here:
/// the codec math does not depend on it).
fn params(codec: Codec, axis: usize, group_size: u64, scale_dtype: DType) -> GroupParams {
    let scale_dtype = match codec {
        Codec::Mxfp4 => DType::Uint8,
        Codec::Nvfp4 { .. } => DType::Float8E4m3fn,
        _ => scale_dtype,
    };
    GroupParams {
        bits: codec.bits(),
        group_size,
        axis,
        scale_dtype,
    }
}

/// The codec that decodes `q`: NVFP4 with the tensor scale quantize chose.
fn decoder(codec: Codec, q: &Quantized) -> Codec {
    match codec {
        Codec::Nvfp4 { .. } => Codec::nvfp4(q.tensor_scale),
        c => c,
    }
}

/// Values with a different spread per row, some exact zeros and a constant (flat) stretch.
fn tensor(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match (i / 97) % 7 {
            0 => 0.75,
            1 => r.unit() * 1e-3,
            _ if r.below(20) == 0 => 0.0,
            k => r.unit() * k as f32 + 0.1 * k as f32,
        })
        .collect()
}

/// Group index `s(e)` of every element (spec 4.1).
fn group_of(layout: &GroupLayout, n: usize) -> Vec<usize> {
    let (l_len, q_len) = (layout.axis_len as usize, layout.inner as usize);
    let (gs, g_len) = (
        layout.group_size as usize,
        layout.groups_along_axis as usize,
    );
    (0..n)
        .map(|e| {
            let (p, l, q) = (e / (l_len * q_len), (e / q_len) % l_len, e % q_len);
            (p * g_len + l / gs) * q_len + q
        })
        .collect()
}

#[test]
fn roundtrip_error_within_spec_bound() {
    let mut r = Rng::new(10);
    let k = *available().last().unwrap();
    let max_half_gap = NF4_LEVELS
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 2.0)
        .fold(0.0, f64::max);
    for (shape, axis, gs) in cases() {
        let layout = GroupLayout::new(&shape, axis, gs).unwrap();
        let n = layout.numel() as usize;
        let groups = group_of(&layout, n);
        for codec in CODECS {
            // Every scale dtype on the small shapes; one on the large (debug builds are slow).
            let dts: &[DType] = if n > 10_000 {
                &[DType::Float16]
            } else {
                &[DType::Float16, DType::Bfloat16, DType::Float32]
            };
            for &dt in dts {
                let p = params(codec, axis, gs, dt);
                let x = tensor(&mut r, n);
                let q = quantize(k, codec, &p, &shape, &x).unwrap();
                assert_eq!(q.scales.len(), layout.num_groups() as usize);
                let mut out = vec![f32::NAN; n];
                let dc = decoder(codec, &q);
                dequantize(k, dc, &p, &shape, &q.codes, &q.scales, &q.mins, &mut out).unwrap();

                let mut lo = vec![f64::INFINITY; q.scales.len()];
                let mut hi = vec![f64::NEG_INFINITY; q.scales.len()];
                for (&g, &v) in groups.iter().zip(&x) {
                    lo[g] = lo[g].min(v as f64);
                    hi[g] = hi[g].max(v as f64);
                }
                for e in 0..n {
                    let g = groups[e];
                    let (xv, xh) = (x[e] as f64, out[e] as f64);
                    let s = q.scales[g] as f64;
                    let amax = lo[g].abs().max(hi[g].abs());
                    let bound = match codec {
                        Codec::Affine { bits } => {
                            let qmax = ((1u32 << bits) - 1) as f64;
                            let m = q.mins[g] as f64;
                            s / 2.0 + (lo[g] - m).abs() + qmax * (s - (hi[g] - lo[g]) / qmax).abs()
                        }
                        Codec::Symmetric { bits } => {
                            let qmax = ((1u32 << (bits - 1)) - 1) as f64;
                            s / 2.0 + qmax * (s - amax / qmax).abs()
                        }
                        Codec::SymmetricFull { bits } => {
                            // a whole step on the side opposite the peak (it clamps)
                            let zero = (1u32 << (bits - 1)) as f64;
                            s.abs() + zero * (s.abs() - amax / zero).abs()
                        }
                        Codec::Nf4 => s * max_half_gap + (s - amax).abs(),
                        // Half the widest E2M1 gap (4 to 6) is 1 step, and values beyond 6
                        // steps saturate.
                        Codec::Mxfp4 | Codec::Nvfp4 { .. } => {
                            let d = s * q.tensor_scale as f64;
                            d + (amax - 6.0 * d).max(0.0)
                        }
                    };
                    // fp32 rounding of the steps (1/s, products, sums).
                    let slop = 1e-6 * (amax + s.abs() * 256.0); // full-level scales may be negative
                    assert!(
                        (xv - xh).abs() <= bound + slop,
                        "{codec:?} {dt} shape {shape:?} axis {axis} g {gs}: element {e} \
                         x {xv} decoded {xh}, bound {bound}"
                    );
                }
            }
        }
    }
}

#[test]
fn tables_agree_through_drivers() {
    let mut r = Rng::new(11);
    for (shape, axis, gs) in cases() {
        let n = GroupLayout::new(&shape, axis, gs).unwrap().numel() as usize;
        for codec in CODECS {
            let p = params(codec, axis, gs, DType::Float16);
            let x = tensor(&mut r, n);
            let want = quantize(&SCALAR, codec, &p, &shape, &x).unwrap();
            let mut want_out = vec![0f32; n];
            dequantize(
                &SCALAR,
                decoder(codec, &want),
                &p,
                &shape,
                &want.codes,
                &want.scales,
                &want.mins,
                &mut want_out,
            )
            .unwrap();
            for k in &available()[1..] {
                let got = quantize(k, codec, &p, &shape, &x).unwrap();
                assert!(
                    got == want,
                    "{} {codec:?} shape {shape:?}: parts differ from scalar",
                    k.name
                );
                let mut out = vec![0f32; n];
                dequantize(
                    k,
                    decoder(codec, &got),
                    &p,
                    &shape,
                    &got.codes,
                    &got.scales,
                    &got.mins,
                    &mut out,
                )
                .unwrap();
                let same = out
                    .iter()
                    .zip(&want_out)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{} {codec:?} shape {shape:?}: values differ", k.name);
            }
        }
    }
}

#[test]
fn non_finite_input_is_rejected_by_every_table() {
    for k in available() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for (shape, axis) in [(vec![4u64, 100], 1usize), (vec![100, 4], 0)] {
                let mut x = vec![0.5f32; 400];
                x[203] = bad;
                for codec in [
                    Codec::Affine { bits: 4 },
                    Codec::Symmetric { bits: 8 },
                    Codec::Nf4,
                    Codec::Mxfp4,
                    Codec::nvfp4(1.0),
                ] {
                    let p = params(codec, axis, 64, DType::Float16);
                    let err = quantize(k, codec, &p, &shape, &x).unwrap_err();
                    assert!(matches!(err, Error::Quantization(_)), "{}: {err}", k.name);
                    // The same from fp16 and bf16 bytes read in place, on both paths.
                    for t in [InType::F16, InType::Bf16] {
                        let typed = Typed::new(t, &x);
                        for fuse in [true, false] {
                            let src = Source::Bytes(typed.bytes(), t.dtype());
                            let err = quantize_with(k, codec, &p, &shape, src, fuse).unwrap_err();
                            assert!(matches!(err, Error::Quantization(_)), "{}: {err}", k.name);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn fused_and_two_pass_quantize_agree() {
    let mut r = Rng::new(12);
    let mut fused_runs = 0;
    for (shape, axis, gs) in cases() {
        let layout = GroupLayout::new(&shape, axis, gs).unwrap();
        let n = layout.numel() as usize;
        for codec in CODECS {
            let p = params(codec, axis, gs, DType::Bfloat16);
            let x = tensor(&mut r, n);
            for k in available() {
                let one = quantize_with(k, codec, &p, &shape, Source::F32(&x), true).unwrap();
                let two = quantize_with(k, codec, &p, &shape, Source::F32(&x), false).unwrap();
                assert!(one == two, "{} {codec:?} shape {shape:?}", k.name);
                // fp16, bf16 and unaligned fp32 bytes read in place by the kernels give what
                // widening the whole tensor first gives, on both paths.
                for t in OutType::ALL {
                    let typed = Typed::new(t, &x);
                    let wide = Source::F32(&typed.wide);
                    let want = quantize_with(k, codec, &p, &shape, wide, true).unwrap();
                    for fuse in [true, false] {
                        let src = Source::Bytes(typed.bytes(), t.dtype());
                        let got = quantize_with(k, codec, &p, &shape, src, fuse).unwrap();
                        assert!(
                            got == want,
                            "{t:?} source, fuse={fuse}, {codec:?} {shape:?}"
                        );
                    }
                }
                // float64 is the one input rounded to fp32 in a buffer (exactly, here).
                let doubles: Vec<u8> = x.iter().flat_map(|v| (*v as f64).to_le_bytes()).collect();
                for fuse in [true, false] {
                    let src = Source::Bytes(&doubles, DType::Float64);
                    let got = quantize_with(k, codec, &p, &shape, src, fuse).unwrap();
                    assert!(got == one, "f64 source, fuse={fuse}, {codec:?} {shape:?}");
                }
            }
            let g = layout.num_groups() as usize;
            let (mut s, mut m) = (vec![0f32; g], vec![0f32; g]);
            let mut c = vec![0u8; packed_len(n as u64, codec.bits()).unwrap() as usize];
            let mids = codec::nf4_midpoints();
            let k = &SCALAR;
            let src = Source::F32(&x);
            if quantize_fused(k, codec, &p, &layout, src, &mut s, &mut m, &mut c, &mids).unwrap() {
                fused_runs += 1;
            }
        }
    }
    // Both paths must have been taken for the comparison to mean anything.
    let total = cases().len() * CODECS.len();
    assert!(
        fused_runs > 0 && fused_runs < total,
        "{fused_runs} of {total}"
    );
}
