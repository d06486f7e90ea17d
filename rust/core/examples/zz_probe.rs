use qtensors_core::codecs::{codec::nf4_midpoints, float::store_scale, simd, Codec};
use qtensors_core::format::DType;
use std::hint::black_box;
use std::time::Instant;
fn main() {
    let n = 16usize << 20;
    let mut st = 1u64;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (st >> 40) as f32 / 16777216.0 - 0.5
        })
        .collect();
    let mut out = vec![0f32; n];
    let k = simd::by_name(&std::env::args().nth(1).unwrap_or("avx512".into())).unwrap();
    let codec = Codec::Affine { bits: 4 };
    let g = n / 64;
    let (mut lo, mut hi) = (vec![0f32; g], vec![0f32; g]);
    let (mut s, mut m, mut inv) = (vec![0f32; g], vec![0f32; g], vec![0f32; g]);
    let mut codes = vec![0u8; n / 2];
    let mids = nf4_midpoints();
    for _ in 0..3 {
        let t = Instant::now();
        out.copy_from_slice(black_box(&x));
        let tc = t.elapsed();
        let t = Instant::now();
        for i in 0..g {
            let (a, b, _) = (k.min_max)(&x[i * 64..i * 64 + 64]);
            lo[i] = a;
            hi[i] = b;
        }
        let ts = t.elapsed();
        let t = Instant::now();
        for i in 0..g {
            let (sr, mr) = codec.raw_params(lo[i], hi[i]);
            s[i] = store_scale(sr, DType::Float16);
            m[i] = store_scale(mr, DType::Float16);
            inv[i] = if s[i] == 0.0 { 0.0 } else { 1.0 / s[i] };
        }
        let tf = t.elapsed();
        let t = Instant::now();
        for i in 0..g {
            (k.encode_bcast)(
                codec,
                &x[i * 64..i * 64 + 64],
                inv[i],
                m[i],
                &mids,
                &mut codes,
                i * 64,
            );
        }
        let te = t.elapsed();
        let t = Instant::now();
        for i in 0..g {
            let (a, b, _) = (k.min_max)(&x[i * 64..i * 64 + 64]);
            lo[i] = a;
            hi[i] = b;
            (k.encode_bcast)(
                codec,
                &x[i * 64..i * 64 + 64],
                inv[i],
                m[i],
                &mids,
                &mut codes,
                i * 64,
            );
        }
        let tfu = t.elapsed();
        let t = Instant::now();
        let v = vec![0u8; n / 2 + 3 * 4 * g];
        black_box(&v);
        let mut v = v;
        for j in (0..v.len()).step_by(4096) {
            v[j] = 1;
        }
        black_box(&v);
        let tp = t.elapsed();
        let t = Instant::now();
        for i in 0..g {
            (k.dequant_bcast)(
                codec,
                &codes,
                i * 64,
                s[i],
                m[i],
                &mut out[i * 64..i * 64 + 64],
            );
        }
        let td = t.elapsed();
        println!("memcpy {:?} stats {:?} finish {:?} encode {:?} fused stats+enc {:?} pagefault(11MiB) {:?} dequant {:?}", tc, ts, tf, te, tfu, tp, td);
    }
}
