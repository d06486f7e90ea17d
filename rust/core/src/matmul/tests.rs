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
    // bf16 activations outside the packed kernel multiply the weight as decoded to bf16
    // (`tiles::rows_bf16`): decode-then-matmul in bf16, as torch would.
    let (codec, params) = crate::codecs::Codec::from_encoding(enc).unwrap();
    let layout = crate::format::GroupLayout::new(&shape, params.axis, params.group_size);
    let stored = crate::codecs::region::Stored {
        codec: codec.decoder(),
        params: &params,
        layout: layout.unwrap(),
        codes: &[],
        scales: &[],
        mins: &[],
    };
    let bf16_tiles = matches!(
        super::float_path(&stored, n_in, batch, dtype),
        super::FloatPath::TilesBf16
    );
    let wdt = if bf16_tiles {
        DType::Bfloat16
    } else {
        DType::Float32
    };
    let mut wd = vec![0u8; n_out * n_in * wdt.itemsize()];
    let info_as = TensorInfo {
        dtype: wdt,
        ..info.clone()
    };
    tensor::decode(k, &info_as, &parts, &mut wd).unwrap();
    let wd = from_bytes(&wd, wdt);

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
    tensor::linear(
        k,
        &info,
        &parts,
        &to_bytes(&x, dtype),
        b,
        dtype,
        &mut out,
        true,
    )
    .unwrap();
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
        (70, 96, 64, 0), // along the outputs, whole blocks of 32 inputs: outgroups, ragged
        (45, 160, 16, 0), // groups of 16 rows: a task of 32 rows spans several
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
fn bf16_tiles_odd_shapes() {
    // bf16 activations beyond the packed kernel: tiles decoded to bf16, AVX-512 BF16 dot
    // products in blocks of 4 x 4 and steps of 32 (masked tails), every encoding and layout.
    let mut r = Rng::new(13);
    let shapes = [
        (17, 160, 64, 1),
        (13, 37, 16, 1),
        (9, 100, 64, 1),
        (70, 48, 64, 0),
        (5, 7, 3, 0),
        (6, 1030, 128, 1),
    ];
    for &(n_out, n_in, g, axis) in &shapes {
        for (name, bits) in [("affine", 4), ("nf4", 4), ("affine", 3), ("symmetric", 8)] {
            let enc = encoding(name, bits, g, axis);
            for batch in [1, 6, 9, 35] {
                check(
                    &mut r,
                    &enc,
                    n_out,
                    n_in,
                    batch,
                    DType::Bfloat16,
                    batch != 6,
                );
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
    assert!(tensor::linear(k, &info, &parts, &x, None, DType::Float32, &mut out, true).is_err());
    let mut out = vec![0u8; 2 * 8 * 4];
    assert!(tensor::linear(k, &info, &parts, &x, None, DType::Float64, &mut out, true).is_err());
    tensor::linear(k, &info, &parts, &x, None, DType::Float32, &mut out, true).unwrap();
}

/// The parameters of a g64 fp16-scaled weight grouped along `axis`, and the header-only (no
/// bytes) `Stored` of a `rows x n_in` such weight: enough for the kernels' path choice.
fn g64_params(axis: usize) -> GroupParams {
    GroupParams {
        bits: 4,
        group_size: 64,
        axis,
        scale_dtype: DType::Float16,
    }
}

fn header_only(
    codec: crate::codecs::Codec,
    p: &GroupParams,
    rows: u64,
    n_in: u64,
) -> crate::codecs::region::Stored<'_> {
    crate::codecs::region::Stored {
        codec,
        params: p,
        layout: crate::format::GroupLayout::new(&[rows, n_in], p.axis, p.group_size).unwrap(),
        codes: &[],
        scales: &[],
        mins: &[],
    }
}

/// Whether this CPU has the kernels the path tests below look for.
fn has_avx512_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[test]
fn outgroups_kernel_covers_flexgen() {
    // 4-bit codes grouped along the outputs, inputs in blocks of 32, batch 1..=8: outgroups.
    if !has_avx512_fma() {
        return;
    }
    let p = g64_params(0);
    for (codec, n_in, batch, want) in [
        (crate::codecs::Codec::Affine { bits: 4 }, 96, 1, true),
        (crate::codecs::Codec::Nf4, 4096, 8, true),
        (crate::codecs::Codec::Affine { bits: 4 }, 96, 9, false),
        (crate::codecs::Codec::Affine { bits: 4 }, 48, 1, false),
        (crate::codecs::Codec::Affine { bits: 8 }, 96, 1, false),
    ] {
        let w = header_only(codec, &p, 70, n_in);
        let path = super::float_path(&w, n_in as usize, batch, DType::Float32);
        let got = matches!(path, super::FloatPath::OutGroups(_));
        assert_eq!(got, want, "{codec:?} in {n_in} batch {batch}");
    }
}

#[test]
fn packed_kernel_covers_the_common_layout() {
    // The cases above would pass through the tiles path alone; make sure the packed kernel is
    // what ran for 4-bit codes grouped along the inputs (on CPUs that have it).
    if !has_avx512_fma() {
        return;
    }
    let p = g64_params(1);
    for (codec, n_in, batch, want) in [
        (crate::codecs::Codec::Nf4, 256, 1, true),
        (crate::codecs::Codec::Affine { bits: 4 }, 160, 8, true),
        (crate::codecs::Codec::Affine { bits: 4 }, 160, 9, false),
        (crate::codecs::Codec::Affine { bits: 8 }, 256, 1, false),
        (crate::codecs::Codec::Symmetric { bits: 4 }, 100, 1, false),
    ] {
        let w = header_only(codec, &p, 4, n_in);
        let plan = super::packed::Plan::new(&w, n_in as usize, batch);
        assert_eq!(plan.is_some(), want, "{codec:?} in {n_in} batch {batch}");
    }
}

/// A weight of `rows x n_in` random values encoded with `enc`, its parts, and its decoded values.
fn encoded(r: &mut Rng, enc: &Encoding, rows: usize, n_in: usize) -> (Vec<Vec<u8>>, Vec<f32>) {
    let w: Vec<f32> = (0..rows * n_in).map(|_| r.unit()).collect();
    let shape = [rows as u64, n_in as u64];
    let k = simd::best();
    let parts = tensor::encode(k, enc, DType::Float32, &shape, Input::F32(&w)).unwrap();
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let info = TensorInfo {
        name: "w".into(),
        dtype: DType::Float32,
        shape: shape.to_vec(),
        encoding: enc.clone(),
        parts: vec![],
    };
    let mut wd = vec![0u8; rows * n_in * 4];
    tensor::decode(k, &info, &slices, &mut wd).unwrap();
    (parts, from_bytes(&wd, DType::Float32))
}

fn int8_encoding(name: &str, bits: u8, group_size: u64, scale_dtype: DType) -> Encoding {
    let p = GroupParams {
        bits,
        group_size,
        axis: 1,
        scale_dtype,
    };
    let fp4 = |scale_dtype, group_size| GroupParams {
        bits: 4,
        group_size,
        axis: 1,
        scale_dtype,
    };
    match name {
        "affine" => Encoding::Affine(p),
        "symmetric" => Encoding::Symmetric(p),
        "full" => Encoding::SymmetricFull(p),
        "nf4" => Encoding::Nf4(p),
        // their own block sizes and scale types, whatever `group_size` says
        "mxfp4" => Encoding::Mxfp4(fp4(DType::Uint8, 32)),
        _ => Encoding::Nvfp4(fp4(DType::Float8E4m3fn, 16)),
    }
}

/// The encodings the int8 kernel takes, by `int8_encoding`'s names, and their bits.
const INT8_KINDS: [(&str, u8); 8] = [
    ("affine", 4),
    ("symmetric", 4),
    ("full", 4),
    ("affine", 8),
    ("symmetric", 8),
    ("nf4", 4),
    ("mxfp4", 4),
    ("nvfp4", 4),
];

/// (n_in, group size): one span and less, ragged spans (576 = 18 blocks), ragged groups
/// (576 = 4.5 groups of 128), groups of 16 blocks and more, a group wider than the row.
const INT8_SHAPES: [(usize, u64); 8] = [
    (64, 32),
    (576, 32),
    (576, 64),
    (576, 128),
    (1024, 512),
    (2048, 1024),
    (1536, 1536),
    (256, 4096),
];

#[test]
fn int8_kernel_bit_identical_to_scalar() {
    use super::int8::Plan;
    use crate::codecs::region::Stored;
    use crate::format::GroupLayout;
    if Plan::new(&empty_stored(), 64, false).is_none() {
        return; // no AVX-512 VNNI here: the scalar model is all there is
    }
    let mut r = Rng::new(21);
    // fp16 scales are widened inside the kernel, others before it: both.
    let scale_dtypes = [DType::Float16, DType::Bfloat16, DType::Float32];
    for (t, (n_in, g)) in INT8_SHAPES.into_iter().enumerate() {
        for (name, bits) in INT8_KINDS {
            let enc = int8_encoding(name, bits, g, scale_dtypes[(t + bits as usize) % 3]);
            let rows = 7;
            let (parts, _) = encoded(&mut r, &enc, rows, n_in);
            let (codec, params) = crate::codecs::Codec::from_encoding(&enc).unwrap();
            let g = params.group_size;
            let w = Stored {
                codec: codec.decoder(),
                params: &params,
                layout: GroupLayout::new(&[rows as u64, n_in as u64], 1, g).unwrap(),
                codes: &parts[0],
                scales: &parts[1],
                mins: if codec.has_mins() { &parts[2] } else { &[] },
            };
            let simd_plan = Plan::new(&w, n_in, false).expect("the int8 kernel applies");
            let scalar_plan = Plan::new(&w, n_in, true).unwrap();
            for batch in [1, 2, 5, 8, 11] {
                // Outliers too: a block's scale follows its largest element.
                let x: Vec<f32> = (0..batch * n_in)
                    .map(|i| r.unit() * if i % 37 == 0 { 40.0 } else { 1.0 })
                    .collect();
                let a = simd_plan.quantize(&x, batch).unwrap();
                let (mut y1, mut y2) = (vec![0f32; rows * batch], vec![0f32; rows * batch]);
                // Rows 1.. of the weight: a task that does not start at row 0.
                simd_plan.rows(&w, &a, 1, &mut y1[batch..], false).unwrap();
                scalar_plan.rows(&w, &a, 1, &mut y2[batch..], true).unwrap();
                let (b1, b2): (Vec<u32>, Vec<u32>) = (
                    y1.iter().map(|v| v.to_bits()).collect(),
                    y2.iter().map(|v| v.to_bits()).collect(),
                );
                assert_eq!(b1, b2, "{enc:?} in {n_in} batch {batch}");
                assert!(b1.iter().any(|&v| v != 0), "ran");
            }
        }
    }
}

#[test]
fn int8_e8m0_scales_widened_in_the_kernel_as_decoded() {
    // MXFP4's scale bytes are widened inside the kernel: every kind of byte (0: 2^-127, a
    // subnormal; 255: NaN; the rest powers of two) against the scalar model's widening
    use super::int8::Plan;
    use crate::codecs::region::Stored;
    use crate::codecs::Codec;
    use crate::format::GroupLayout;
    if Plan::new(&empty_stored(), 64, false).is_none() {
        return;
    }
    let mut r = Rng::new(24);
    let (rows, n_in) = (5, 256);
    let params = GroupParams {
        bits: 4,
        group_size: 32,
        axis: 1,
        scale_dtype: DType::Uint8,
    };
    let codes: Vec<u8> = (0..rows * n_in / 2)
        .map(|_| (r.unit() * 1e6) as u8)
        .collect();
    let picks = [0u8, 1, 2, 100, 127, 128, 150, 200, 230];
    let mut scales: Vec<u8> = (0..rows * n_in / 32)
        .map(|i| picks[i % picks.len()])
        .collect();
    scales[rows * n_in / 32 - 1] = 255; // the last group of the last row
    let w = Stored {
        codec: Codec::Mxfp4,
        params: &params,
        layout: GroupLayout::new(&[rows as u64, n_in as u64], 1, 32).unwrap(),
        codes: &codes,
        scales: &scales,
        mins: &[],
    };
    let y = kernel_as_scalar_model(&w, n_in, 1, &mut r);
    assert!(y[rows - 1].is_nan() && y[..rows - 1].iter().all(|v| v.is_finite()));
}

/// `w` times a random activation batch by the SIMD kernel, checked equal (bit for bit, or both
/// NaN) to the scalar model with its own widening; the kernel's outputs.
fn kernel_as_scalar_model(
    w: &crate::codecs::region::Stored<'_>,
    n_in: usize,
    batch: usize,
    r: &mut Rng,
) -> Vec<f32> {
    use super::int8::Plan;
    let (simd_plan, scalar_plan) = (
        Plan::new(w, n_in, false).unwrap(),
        Plan::new(w, n_in, true).unwrap(),
    );
    let x: Vec<f32> = (0..batch * n_in).map(|_| r.unit()).collect();
    let a = simd_plan.quantize(&x, batch).unwrap();
    let rows = w.layout.outer as usize * w.layout.axis_len as usize / n_in;
    let (mut y1, mut y2) = (vec![0f32; rows * batch], vec![0f32; rows * batch]);
    simd_plan.rows(w, &a, 0, &mut y1, false).unwrap();
    scalar_plan.rows(w, &a, 0, &mut y2, true).unwrap();
    for (o, (v1, v2)) in y1.iter().zip(&y2).enumerate() {
        assert!(
            v1.to_bits() == v2.to_bits() || (v1.is_nan() && v2.is_nan()),
            "batch {batch} output {o}: {v1} {v2}"
        );
    }
    y1
}

#[test]
fn int8_e4m3_scales_widened_in_the_kernel_as_decoded() {
    // NVFP4's block scales are widened inside the kernel and multiplied by the tensor scale:
    // every E4M3 byte (subnormals, both zeros, 448, negative values) against the scalar model's
    // widening, and S.1111.111 (NaN) in the last block of the last row
    use super::int8::Plan;
    use crate::codecs::region::Stored;
    use crate::codecs::Codec;
    use crate::format::GroupLayout;
    if Plan::new(&empty_stored(), 64, false).is_none() {
        return;
    }
    let mut r = Rng::new(25);
    let (rows, n_in) = (17, 256);
    let params = GroupParams {
        bits: 4,
        group_size: 16,
        axis: 1,
        scale_dtype: DType::Float8E4m3fn,
    };
    let codes: Vec<u8> = (0..rows * n_in / 2)
        .map(|_| (r.unit() * 1e6) as u8)
        .collect();
    let bytes: Vec<u8> = (0..=255u8).filter(|b| b & 0x7f != 0x7f).collect();
    let mut scales: Vec<u8> = (0..rows * n_in / 16)
        .map(|i| bytes[i % bytes.len()])
        .collect();
    scales[rows * n_in / 16 - 1] = 0x7f;
    let w = Stored {
        codec: Codec::nvfp4(0.37),
        params: &params,
        layout: GroupLayout::new(&[rows as u64, n_in as u64], 1, 16).unwrap(),
        codes: &codes,
        scales: &scales,
        mins: &[],
    };
    for batch in [1, 3] {
        let y = kernel_as_scalar_model(&w, n_in, batch, &mut r);
        let (others, last) = y.split_at((rows - 1) * batch);
        assert!(last.iter().all(|v| v.is_nan()) && others.iter().all(|v| v.is_finite()));
    }
}

fn empty_stored() -> crate::codecs::region::Stored<'static> {
    static P: GroupParams = GroupParams {
        bits: 4,
        group_size: 64,
        axis: 1,
        scale_dtype: DType::Float16,
    };
    crate::codecs::region::Stored {
        codec: crate::codecs::Codec::Affine { bits: 4 },
        params: &P,
        layout: crate::format::GroupLayout::new(&[1, 64], 1, 64).unwrap(),
        codes: &[],
        scales: &[],
        mins: &[],
    }
}

#[test]
fn int8_matches_decode_then_matmul_within_activation_rounding() {
    // Each activation is off by at most half a step of its block's int8 scale, max|x| / 254:
    // the result by at most sum_i |w_i| * that, plus fp32 accumulation error. NF4's weights are
    // moved too, by at most 0.5 / 127 of their group's scale (its int8 table, int8.rs): that
    // adds sum_i |x_i| * s_i / 254 (and the moved weights' own share of the first term).
    let mut r = Rng::new(22);
    let k = simd::best();
    for (n_in, g) in INT8_SHAPES {
        for (name, bits) in INT8_KINDS {
            let enc = int8_encoding(name, bits, g, DType::Float16);
            let rows = 5;
            let (parts, wd) = encoded(&mut r, &enc, rows, n_in);
            // NF4: each weight's largest move, from its group's scale (the decoded max |w|:
            // the group's absmax element decodes to +-scale)
            let g = enc.group_params().unwrap().group_size as usize;
            let moved: Vec<f64> = wd
                .chunks(n_in)
                .flat_map(|row| {
                    row.chunks(g.min(n_in)).flat_map(|grp| {
                        let s = grp.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                        let d = if name == "nf4" { s * 0.5 / 127.0 } else { 0.0 };
                        std::iter::repeat_n(d, grp.len())
                    })
                })
                .collect();
            let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let info = TensorInfo {
                name: "w".into(),
                dtype: DType::Float32,
                shape: vec![rows as u64, n_in as u64],
                encoding: enc.clone(),
                parts: vec![],
            };
            for batch in [1, 9] {
                let x: Vec<f32> = (0..batch * n_in)
                    .map(|i| r.unit() * if i % 53 == 0 { 30.0 } else { 1.0 })
                    .collect();
                let mut out = vec![0u8; batch * rows * 4];
                let xb = to_bytes(&x, DType::Float32);
                tensor::linear(
                    k,
                    &info,
                    &slices,
                    &xb,
                    None,
                    DType::Float32,
                    &mut out,
                    false,
                )
                .unwrap();
                let got = from_bytes(&out, DType::Float32);
                let (mut worst, mut exact_diff) = (0f64, 0f64);
                for b in 0..batch {
                    let xr = &x[b * n_in..(b + 1) * n_in];
                    let step: Vec<f64> = xr
                        .chunks(32)
                        .map(|c| c.iter().fold(0f64, |m, v| m.max(v.abs() as f64)) / 254.0)
                        .collect();
                    for o in 0..rows {
                        let wr = &wd[o * n_in..(o + 1) * n_in];
                        let (mut want, mut bound, mut mag) = (0f64, 0f64, 0f64);
                        for i in 0..n_in {
                            let d = moved[o * n_in + i];
                            want += wr[i] as f64 * xr[i] as f64;
                            bound += ((wr[i] as f64).abs() + d) * step[i / 32];
                            bound += d * (xr[i] as f64).abs();
                            mag += (wr[i] as f64 * xr[i] as f64).abs();
                        }
                        let tol = bound * 1.001 + mag * (n_in as f64 + 8.0) * f32::EPSILON as f64;
                        let g = got[b * rows + o] as f64;
                        assert!(
                            (g - want).abs() <= tol,
                            "{enc:?} in {n_in} batch {batch}: y[{b}, {o}] = {g}, exact {want}, \
                             bound {tol}"
                        );
                        worst = worst.max((g - want).abs() / mag);
                        exact_diff += (g - want).abs();
                    }
                }
                // The bound is not slack everywhere: int8 activations do change the results.
                // (NF4: up to 0.4% of the scale per weight on top, 1-2% of a short row)
                let most = if name == "nf4" { 0.03 } else { 0.02 };
                assert!(exact_diff > 0.0 && worst < most, "{enc:?}: worst {worst}");
            }
        }
    }
}

#[test]
fn int8_falls_back_for_non_finite_activations() {
    let mut r = Rng::new(23);
    let k = simd::best();
    let enc = int8_encoding("affine", 4, 64, DType::Float16);
    let (parts, _) = encoded(&mut r, &enc, 3, 128);
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let info = TensorInfo {
        name: "w".into(),
        dtype: DType::Float32,
        shape: vec![3, 128],
        encoding: enc,
        parts: vec![],
    };
    for bad in [f32::NAN, f32::INFINITY] {
        let mut x = vec![0.5f32; 128];
        x[77] = bad;
        let mut out = vec![0u8; 3 * 4];
        let xb = to_bytes(&x, DType::Float32);
        tensor::linear(
            k,
            &info,
            &slices,
            &xb,
            None,
            DType::Float32,
            &mut out,
            false,
        )
        .unwrap();
        let y = from_bytes(&out, DType::Float32);
        assert!(y.iter().all(|v| !v.is_finite()), "{bad} in x gave {y:?}");
    }
}

#[test]
fn int8_plan_covers_the_integer_layouts() {
    use super::int8::Plan;
    use crate::codecs::region::Stored;
    use crate::codecs::Codec;
    use crate::format::GroupLayout;
    let p = GroupParams {
        bits: 4,
        group_size: 64,
        axis: 1,
        scale_dtype: DType::Float16,
    };
    for (codec, n_in, g, axis, want) in [
        (Codec::Affine { bits: 4 }, 576, 32, 1, true),
        (Codec::Symmetric { bits: 8 }, 576, 32, 1, true),
        (Codec::Affine { bits: 4 }, 4096, 48 * 32, 1, true),
        (Codec::Affine { bits: 4 }, 4096, 96, 1, false), // 3 blocks a group, across spans
        (Codec::Affine { bits: 4 }, 160, 32, 1, false),  // not whole chunks of 64
        (Codec::Affine { bits: 3 }, 256, 64, 1, false),
        (Codec::Nf4, 256, 64, 1, true),
        (Codec::Mxfp4, 256, 32, 1, true),
        (Codec::nvfp4(1.0), 256, 16, 1, true), // blocks of 16: half an activation block
        (Codec::nvfp4(1.0), 160, 16, 1, false), // not whole chunks of 64
        (Codec::Affine { bits: 4 }, 256, 64, 0, false),
    ] {
        let shape = [8, n_in as u64];
        let w = Stored {
            codec,
            params: &p,
            layout: GroupLayout::new(&shape, axis, g).unwrap(),
            codes: &[],
            scales: &[],
            mins: &[],
        };
        let plan = Plan::new(&w, n_in, true);
        assert_eq!(
            plan.is_some(),
            want,
            "{codec:?} in {n_in} group {g} axis {axis}"
        );
    }
}
