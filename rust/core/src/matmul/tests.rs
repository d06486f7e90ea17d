//! The CPU matmul against decode-then-matmul (in f64), for every encoding, both paths, odd
//! shapes, ragged groups and the activation dtypes.

use half::{bf16, f16};

use crate::codecs::simd::{self, tests::Rng};
use crate::format::{DType, Encoding, GroupParams, TensorInfo};
use crate::tensor::{self, Input};

fn encoding(name: &str, bits: u8, group_size: u64, axis: usize) -> Encoding {
    let p = GroupParams {
        bits,
        group_size,
        axis,
        scale_dtype: DType::Float16,
    };
    match name {
        "affine" => Encoding::Affine(p),
        "symmetric" => Encoding::Symmetric(p),
        _ => Encoding::Nf4(GroupParams { bits: 4, ..p }),
    }
}

fn to_bytes(v: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::Float16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::Bfloat16 => v
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

fn from_bytes(b: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::Float16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::Bfloat16 => b
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
    }
}

/// Run one case: returns whether the packed kernel applied (for coverage checks).
#[allow(clippy::too_many_arguments)]
fn check(
    r: &mut Rng,
    enc: &Encoding,
    n_out: usize,
    n_in: usize,
    batch: usize,
    dtype: DType,
    with_bias: bool,
) {
    let w: Vec<f32> = (0..n_out * n_in).map(|_| r.unit()).collect();
    let shape = [n_out as u64, n_in as u64];
    let k = simd::best();
    let parts = tensor::encode(k, enc, DType::Float32, &shape, Input::F32(&w)).unwrap();
    let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let info = TensorInfo {
        name: "w".into(),
        dtype: DType::Float32,
        shape: shape.to_vec(),
        encoding: enc.clone(),
        parts: vec![],
    };
    let mut wd = vec![0u8; n_out * n_in * 4];
    tensor::decode(k, &info, &parts, &mut wd).unwrap();
    let wd = from_bytes(&wd, DType::Float32);

    // Activations and bias exactly representable in `dtype`.
    let x = from_bytes(
        &to_bytes(
            &(0..batch * n_in).map(|_| r.unit()).collect::<Vec<_>>(),
            dtype,
        ),
        dtype,
    );
    let bias = from_bytes(
        &to_bytes(&(0..n_out).map(|_| r.unit()).collect::<Vec<_>>(), dtype),
        dtype,
    );
    let bias_bytes = to_bytes(&bias, dtype);
    let mut out = vec![0u8; batch * n_out * dtype.itemsize()];
    let b = with_bias.then_some(bias_bytes.as_slice());
    tensor::linear(k, &info, &parts, &to_bytes(&x, dtype), b, dtype, &mut out).unwrap();
    let got = from_bytes(&out, dtype);

    // Tolerance: fp32 accumulation error plus the output dtype's rounding.
    let out_eps = match dtype {
        DType::Float16 => 1.0 / 1024.0,
        DType::Bfloat16 => 1.0 / 128.0,
        _ => 0.0,
    };
    for bi in 0..batch {
        for o in 0..n_out {
            let (mut want, mut mag) = (0f64, 0f64);
            for i in 0..n_in {
                let p = wd[o * n_in + i] as f64 * x[bi * n_in + i] as f64;
                want += p;
                mag += p.abs();
            }
            if with_bias {
                want += bias[o] as f64;
                mag += (bias[o] as f64).abs();
            }
            let g = got[bi * n_out + o] as f64;
            let tol = mag * (n_in as f64 + 2.0) * f32::EPSILON as f64 + want.abs() * out_eps;
            assert!(
                (g - want).abs() <= tol + 1e-30,
                "{enc:?} [{n_out}, {n_in}] batch {batch} {dtype}: y[{bi}, {o}] = {g}, \
                 decode-then-matmul {want} (tolerance {tol})"
            );
        }
    }
}

#[test]
fn matches_decode_then_matmul() {
    let mut r = Rng::new(11);
    // (out, in, group size, axis): packed-kernel shapes, ragged groups, odd sizes, groups along
    // the outputs (FlexGen), a group wider than the row.
    let shapes = [
        (64, 256, 64, 1),
        (33, 128, 32, 1),
        (17, 160, 64, 1), // ragged last group (160 = 2 * 64 + 32)
        (9, 100, 64, 1),  // odd: tiles path
        (13, 37, 16, 1),
        (40, 96, 128, 1), // group wider than the row
        (70, 48, 64, 0),  // groups along the outputs, ragged
        (5, 7, 3, 0),
    ];
    let encodings: Vec<(&str, u8)> = vec![
        ("affine", 4),
        ("symmetric", 4),
        ("nf4", 4),
        ("affine", 2),
        ("affine", 3),
        ("affine", 8),
        ("symmetric", 5),
        ("symmetric", 8),
    ];
    for &(n_out, n_in, g, axis) in &shapes {
        for &(name, bits) in &encodings {
            let enc = encoding(name, bits, g, axis);
            for batch in [1, 3, 8, 33] {
                check(&mut r, &enc, n_out, n_in, batch, DType::Float32, batch != 3);
            }
        }
    }
}

#[test]
fn activation_dtypes() {
    let mut r = Rng::new(12);
    for dtype in [DType::Float16, DType::Bfloat16, DType::Float32] {
        for (name, axis) in [("affine", 1), ("nf4", 1), ("symmetric", 0)] {
            let enc = encoding(name, 4, 64, axis);
            for batch in [1, 5, 9] {
                check(&mut r, &enc, 24, 192, batch, dtype, true);
            }
        }
    }
}

#[test]
fn rejects_mismatched_sizes() {
    let k = simd::best();
    let enc = encoding("affine", 4, 64, 1);
    let w = vec![0.5f32; 8 * 64];
    let parts = tensor::encode(k, &enc, DType::Float32, &[8, 64], Input::F32(&w)).unwrap();
    let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let info = TensorInfo {
        name: "w".into(),
        dtype: DType::Float32,
        shape: vec![8, 64],
        encoding: enc,
        parts: vec![],
    };
    let x = vec![0u8; 2 * 64 * 4];
    let mut out = vec![0u8; 2 * 7 * 4];
    assert!(tensor::linear(k, &info, &parts, &x, None, DType::Float32, &mut out).is_err());
    let mut out = vec![0u8; 2 * 8 * 4];
    assert!(tensor::linear(k, &info, &parts, &x, None, DType::Float64, &mut out).is_err());
    tensor::linear(k, &info, &parts, &x, None, DType::Float32, &mut out).unwrap();
}

#[test]
fn packed_kernel_covers_the_common_layout() {
    // The cases above would pass through the tiles path alone; make sure the packed kernel is
    // what ran for 4-bit codes grouped along the inputs (on CPUs that have it).
    use crate::codecs::region::Stored;
    use crate::format::GroupLayout;
    #[cfg(target_arch = "x86_64")]
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")) {
        return;
    }
    let p = GroupParams {
        bits: 4,
        group_size: 64,
        axis: 1,
        scale_dtype: DType::Float16,
    };
    for (codec, n_in, batch, want) in [
        (crate::codecs::Codec::Nf4, 256, 1, true),
        (crate::codecs::Codec::Affine { bits: 4 }, 160, 8, true),
        (crate::codecs::Codec::Affine { bits: 4 }, 160, 9, false),
        (crate::codecs::Codec::Affine { bits: 8 }, 256, 1, false),
        (crate::codecs::Codec::Symmetric { bits: 4 }, 100, 1, false),
    ] {
        let w = Stored {
            codec,
            params: &p,
            layout: GroupLayout::new(&[4, n_in], 1, 64).unwrap(),
            codes: &[],
            scales: &[],
            mins: &[],
        };
        let plan = super::packed::Plan::new(&w, n_in as usize, batch);
        assert_eq!(plan.is_some(), want, "{codec:?} in {n_in} batch {batch}");
    }
}
