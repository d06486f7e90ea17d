//! The CPU matmul alone (no Python, no torch): best wall time of `tensor::linear` for 4-bit
//! affine g64 weights with fp16 scales and bf16 activations, per shape and batch, and the
//! multiply-adds per second it makes. For profiling the kernels; the comparison against torch
//! is `benches/bench_cpu_matmul.py`.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p qtensors-core --example matmul_probe [reps] [batches] [in:out,..] [layers]
//!
//! `layers` > 1: that many weights of each shape, multiplied in turn (as a model's layers are),
//! so that with enough of them each one comes from memory rather than cache.

use std::time::Instant;

use qtensors_core::codecs::simd;
use qtensors_core::format::{DType, Encoding, GroupParams, TensorInfo};
use qtensors_core::tensor::{self, Input};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).map_or(200, |a| a.parse().unwrap());
    let batches: Vec<usize> = args
        .get(2)
        .map_or("1", |s| s.as_str())
        .split(',')
        .map(|b| b.parse().unwrap())
        .collect();
    let shapes: Vec<(usize, usize)> = args
        .get(3)
        .map_or("4096:4096,2048:5632,1024:1024", |s| s.as_str())
        .split(',')
        .map(|s| {
            let (i, o) = s.split_once(':').unwrap();
            (i.parse().unwrap(), o.parse().unwrap())
        })
        .collect();
    let layers: usize = args.get(4).map_or(1, |a| a.parse().unwrap());
    let k = simd::best();
    let enc = Encoding::Affine(GroupParams {
        bits: 4,
        group_size: 64,
        axis: 1,
        scale_dtype: DType::Float16,
    });
    let mut seed = 1u64;
    let mut unit = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for (n_in, n_out) in shapes {
        let w: Vec<f32> = (0..n_in * n_out).map(|_| unit()).collect();
        let shape = [n_out as u64, n_in as u64];
        let parts = tensor::encode(k, &enc, DType::Float32, &shape, Input::F32(&w)).unwrap();
        let copies: Vec<Vec<Vec<u8>>> = (0..layers).map(|_| parts.clone()).collect();
        let slices: Vec<Vec<&[u8]>> = copies
            .iter()
            .map(|c| c.iter().map(|p| p.as_slice()).collect())
            .collect();
        let info = TensorInfo {
            name: "w".into(),
            dtype: DType::Float32,
            shape: shape.to_vec(),
            encoding: enc.clone(),
            parts: vec![],
        };
        for &batch in &batches {
            let x: Vec<u8> = (0..batch * n_in)
                .flat_map(|_| half::bf16::from_f32(unit()).to_le_bytes())
                .collect();
            let mut out = vec![0u8; batch * n_out * 2];
            let mut best = f64::MAX;
            for rep in 0..reps {
                let layer = slices[rep % layers].as_slice();
                let t = Instant::now();
                tensor::linear(k, &info, layer, &x, None, DType::Bfloat16, &mut out, false)
                    .unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            let macs = (batch * n_in * n_out) as f64;
            println!(
                "{n_in:>5} in x {n_out:>5} out, batch {batch}, {layers} layers: {:8.1} us, \
                 {:6.1} GMAC/s",
                best * 1e6,
                macs / best / 1e9
            );
        }
    }
}
