//! The matmul on an OpenMP team (`matmul::pool::use_openmp`) against rayon's pool: the same
//! bits, no deadlock from inside an OpenMP region or from several threads at once, errors and
//! panics carried back to the caller. Uses the system's libgomp, loaded here as torch loads its
//! own. One test function: the pool is process-wide, and the steps switch it.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

mod common;

use std::ffi::{c_uint, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use qtensors_core::codecs::simd;
use qtensors_core::format::{DType, Encoding, GroupParams, TensorInfo};
use qtensors_core::matmul::pool;
use qtensors_core::tensor::{self, Input};
use qtensors_core::Error;

use common::values;

const GOMP: &str = "libgomp.so.1";
const TEAM: usize = 3;

/// A weight, its activations and the calls made with it.
struct Case {
    info: TensorInfo,
    parts: Vec<Vec<u8>>,
    x: Vec<u8>,
    dtype: DType,
    exact: bool,
    batch: usize,
}

impl Case {
    fn new(enc: &str, n_out: usize, n_in: usize, batch: usize, dtype: DType, exact: bool) -> Case {
        let p = GroupParams {
            bits: 4,
            group_size: 64,
            axis: 1,
            scale_dtype: DType::Float16,
        };
        let encoding = match enc {
            "affine" => Encoding::Affine(p),
            _ => Encoding::Nf4(p),
        };
        let shape = [n_out as u64, n_in as u64];
        let w = values(n_out * n_in, 7);
        let k = simd::best();
        let parts = tensor::encode(k, &encoding, DType::Float32, &shape, Input::F32(&w)).unwrap();
        let x: Vec<u8> = values(batch * n_in, 11)
            .iter()
            .flat_map(|&v| match dtype {
                DType::Bfloat16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
                _ => v.to_le_bytes().to_vec(),
            })
            .collect();
        let info = TensorInfo {
            name: "w".into(),
            dtype: DType::Float32,
            shape: shape.to_vec(),
            encoding,
            parts: vec![],
        };
        Case {
            info,
            parts,
            x,
            dtype,
            exact,
            batch,
        }
    }

    fn run(&self) -> Vec<u8> {
        let n_out = self.info.shape[0] as usize;
        let mut out = vec![0u8; self.batch * n_out * self.dtype.itemsize()];
        let parts: Vec<&[u8]> = self.parts.iter().map(|p| p.as_slice()).collect();
        let k = simd::best();
        tensor::linear(
            k, &self.info, &parts, &self.x, None, self.dtype, &mut out, self.exact,
        )
        .unwrap();
        out
    }
}

/// Calls large enough to split (>= 2^20 multiply-adds), on each kernel, and batches whose
/// activation passes (quantize, widen) split too (>= 2^15 elements).
fn cases() -> Vec<Case> {
    let f32_ = DType::Float32;
    vec![
        Case::new("affine", 1100, 1024, 1, f32_, false), // int8, batch 1
        Case::new("affine", 1100, 1024, 1, f32_, true),  // packed GEMV
        Case::new("nf4", 700, 512, 5, f32_, true),       // packed GEMV, several rows
        Case::new("affine", 300, 1024, 40, f32_, false), // int8, activations split
        Case::new("nf4", 300, 512, 70, f32_, true),      // fp32 tiles, widen split
        Case::new("affine", 300, 512, 40, DType::Bfloat16, true), // bf16 or fp32 tiles
    ]
}

type Parallel =
    unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// `GOMP_parallel` of the loaded libgomp, for opening a region around the matmul.
fn gomp_parallel(handle: *mut c_void) -> Parallel {
    let name = CString::new("GOMP_parallel").unwrap();
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) };
    assert!(!p.is_null());
    unsafe { std::mem::transmute::<*mut c_void, Parallel>(p) }
}

/// Inside a region: every team thread runs every case; `data` is `(cases, expected, ok count)`.
unsafe extern "C" fn in_region(data: *mut c_void) {
    let (cases, expected, ok) =
        unsafe { &*(data as *const (Vec<Case>, Vec<Vec<u8>>, std::sync::atomic::AtomicUsize)) };
    // nested: the matmul runs on the calling thread rather than starting a team
    let inline = pool::threads() == 1;
    let same = cases.iter().zip(expected).all(|(c, e)| c.run() == *e);
    if inline && same {
        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn openmp_pool() {
    // OMP_NUM_THREADS is read when libgomp loads: a team of TEAM threads on any machine.
    std::env::set_var("OMP_NUM_THREADS", TEAM.to_string());
    let name = CString::new(GOMP).unwrap();
    // SAFETY: loading the system libgomp, as torch loads its own.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW) };
    if handle.is_null() {
        eprintln!("no {GOMP} on this system: OpenMP pool not tested");
        return;
    }

    // refusals leave the pool as it was
    assert_eq!(pool::current().0, "rayon");
    let err = pool::use_openmp("libqtensors-no-such-omp.so").unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("not loaded")),
        "{err}"
    );
    let err = pool::use_openmp("libc.so.6").unwrap_err();
    assert!(
        matches!(err, Error::Unsupported(ref m) if m.contains("GOMP_parallel")),
        "{err}"
    );
    assert_eq!(pool::current(), ("rayon", None));

    let cases = cases();
    let expected: Vec<Vec<u8>> = cases.iter().map(Case::run).collect();

    pool::use_openmp(GOMP).unwrap();
    assert_eq!(pool::current(), ("openmp", Some(GOMP.to_string())));
    assert_eq!(pool::threads(), TEAM);
    // the same bits as on rayon's pool (each task's rows are computed the same way anywhere)
    for (c, e) in cases.iter().zip(&expected) {
        assert!(c.run() == *e, "{:?} batch {}", c.info.encoding, c.batch);
    }

    // several threads at once, each its own OpenMP team
    std::thread::scope(|s| {
        let runs: Vec<_> = (0..4)
            .map(|_| s.spawn(|| cases.iter().zip(&expected).all(|(c, e)| c.run() == *e)))
            .collect();
        assert!(runs.into_iter().all(|r| r.join().unwrap()));
    });

    // from inside an OpenMP region: no nested team, no deadlock, the same results
    let data = (cases, expected, std::sync::atomic::AtomicUsize::new(0));
    let parallel = gomp_parallel(handle);
    let p = &data as *const _ as *mut c_void;
    unsafe { parallel(in_region, p, TEAM as c_uint, 0) };
    assert_eq!(data.2.load(std::sync::atomic::Ordering::Relaxed), TEAM);

    // errors and panics of tasks come back to the caller, on both pools
    for openmp in [true, false] {
        if openmp {
            pool::use_openmp(GOMP).unwrap();
        } else {
            pool::use_rayon();
        }
        let done = std::sync::atomic::AtomicUsize::new(0);
        let r = pool::run(1000, |t| {
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match t {
                3 => Err(Error::Invalid("task 3".into())),
                _ => Ok(()),
            }
        });
        assert!(matches!(r, Err(Error::Invalid(ref m)) if m == "task 3"));
        // the tasks not yet started when it failed were not run
        assert!(done.into_inner() < 1000);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool::run(100, |t| {
                assert!(t != 50, "task 50 panics");
                Ok(())
            })
        }));
        let payload = r.unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"task 50 panics"));
        // for_each_mut touches each item once
        let mut items = vec![0u32; 777];
        pool::for_each_mut(&mut items, |v| {
            *v += 1;
            Ok(())
        })
        .unwrap();
        assert!(items.iter().all(|&v| v == 1));
        // run_ranges covers every unit once, in ranges of 1..=max units, the first ones large
        let taken = std::sync::Mutex::new(Vec::new());
        pool::run_ranges(1000, 64, |r| {
            taken.lock().unwrap().push(r);
            Ok(())
        })
        .unwrap();
        let mut taken = taken.into_inner().unwrap();
        assert!(taken.iter().all(|r| (1..=64).contains(&r.len())));
        assert!(taken.iter().any(|r| r.len() == 64));
        taken.sort_by_key(|r| r.start);
        assert_eq!(taken[0].start, 0);
        assert!(taken.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(taken.last().unwrap().end, 1000);
        pool::run_ranges(0, 8, |_| panic!("no units, no calls")).unwrap();
    }
    pool::use_rayon();
}
