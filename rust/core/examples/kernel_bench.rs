//! Throughput of quantize/dequantize per kernel table against a memcpy of the same bytes.
//!
//!     RAYON_NUM_THREADS=1 cargo run --release -p qtensors-core --example kernel_bench
//!
//! Optional arguments: the fp32 size in MiB (default 64), the repetitions (best of, default 5) and
//! a comma-separated list of tables (default all). GB/s counts the fp32 bytes (input of quantize,
//! output of dequantize) per second. Each case's ratio is taken against a memcpy timed right
//! before it, so that load from other processes skews both alike. On Linux the times are the
//! process's CPU time (immune to being descheduled on a shared machine; with one rayon thread it
//! equals the wall time of an undisturbed run), elsewhere wall time.

use std::hint::black_box;
use std::time::Duration;
#[cfg(not(target_os = "linux"))]
use std::time::Instant;

use qtensors_core::codecs::{self, simd, Codec};
use qtensors_core::format::{DType, GroupParams};

#[cfg(target_os = "linux")]
fn now() -> Duration {
    #[repr(C)]
    struct Timespec {
        sec: std::ffi::c_long,
        nsec: std::ffi::c_long,
    }
    extern "C" {
        fn clock_gettime(clock: std::ffi::c_int, ts: *mut Timespec) -> std::ffi::c_int;
    }
    const CLOCK_PROCESS_CPUTIME_ID: std::ffi::c_int = 2;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: a valid pointer to a timespec; the clock exists on every Linux.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    Duration::new(ts.sec as u64, ts.nsec as u32)
}

#[cfg(not(target_os = "linux"))]
fn now() -> Duration {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed()
}

fn best_of(reps: usize, mut f: impl FnMut()) -> Duration {
    (0..reps)
        .map(|_| {
            let t = now();
            f();
            now() - t
        })
        .min()
        .unwrap()
}

fn gbps(bytes: usize, t: Duration) -> f64 {
    bytes as f64 / t.as_secs_f64() / 1e9
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: usize = args.get(1).map_or(64, |a| a.parse().expect("size in MiB"));
    let reps: usize = args.get(2).map_or(5, |a| a.parse().expect("repetitions"));
    let only: Option<Vec<&str>> = args.get(3).map(|a| a.split(',').collect());
    let n = mib << 18; // fp32 elements
    let cols = 4096usize;
    let rows = n / cols;
    let n = rows * cols;
    let bytes = n * 4;

    // Deterministic values with a spread that changes along both axes.
    let mut state = 0x1234_5678_9abc_def0u64;
    let x: Vec<f32> = (0..n)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let u = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u * (1.0 + (i % 97) as f32 * 0.05)
        })
        .collect();
    let mut out = vec![1f32; n];

    let mut copy_gbps = || {
        let t = best_of(reps, || {
            out.copy_from_slice(black_box(&x));
            black_box(&out);
        });
        gbps(bytes, t)
    };
    let first_copy = copy_gbps();
    println!(
        "{mib} MiB fp32 [{rows}, {cols}], {} rayon thread(s), best of {reps}",
        rayon::current_num_threads()
    );
    println!("memcpy (copy_from_slice): {first_copy:6.2} GB/s\n");
    println!(
        "{:<8} {:<22} {:>11} {:>10} {:>7} {:>10} {:>7}",
        "table", "case", "memcpy GB/s", "quant GB/s", "x copy", "deq GB/s", "x copy"
    );

    let cases = [
        ("affine4 g64 axis -1", Codec::Affine { bits: 4 }, 1usize),
        ("affine4 g64 axis 0", Codec::Affine { bits: 4 }, 0),
        ("symmetric8 g64 axis -1", Codec::Symmetric { bits: 8 }, 1),
        ("nf4 g64 axis -1", Codec::Nf4, 1),
    ];
    let shape = [rows as u64, cols as u64];
    for k in simd::available() {
        if only.as_ref().is_some_and(|o| !o.contains(&k.name)) {
            continue;
        }
        for (name, codec, axis) in cases {
            let p = GroupParams {
                bits: codec.bits(),
                group_size: 64,
                axis,
                scale_dtype: DType::Float16,
            };
            let copy = copy_gbps();
            let mut q = None;
            let tq = best_of(reps, || {
                q = Some(codecs::quantize(k, codec, &p, &shape, black_box(&x)).unwrap());
            });
            let q = q.unwrap();
            let mut dst = vec![1f32; n];
            let td = best_of(reps, || {
                codecs::dequantize(k, codec, &p, &shape, &q.codes, &q.scales, &q.mins, &mut dst)
                    .unwrap();
                black_box(&dst);
            });
            println!(
                "{:<8} {:<22} {:>11.2} {:>10.2} {:>7.2} {:>10.2} {:>7.2}",
                k.name,
                name,
                copy,
                gbps(bytes, tq),
                gbps(bytes, tq) / copy,
                gbps(bytes, td),
                gbps(bytes, td) / copy
            );
        }
    }
}
