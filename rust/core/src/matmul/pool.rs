//! The threads that run the matmul's parallel work: rayon's pool, or the OpenMP team of an
//! OpenMP runtime the process has already loaded (torch's libgomp, `use_openmp`).
//!
//! Why OpenMP: torch's OpenMP workers spin for a while after each torch op (GOMP_SPINCOUNT).
//! With as many cores as threads, a spinning torch worker holds the core that a rayon thread
//! needs, so the matmul's second thread started late or not at all (MiniLM at batch 32 on
//! 2 cores ran at 0.74-0.80x the fp32 model). Run as an OpenMP region of the same runtime, from
//! the thread that runs torch's ops, the spinning worker is the one that takes the work.
//!
//! The entry points are looked up at runtime in a library that is already loaded
//! (`RTLD_NOLOAD`: nothing new is loaded) by their versioned names: `GOMP_parallel@GOMP_4.0`
//! (libgomp's ABI since GCC 4.9; LLVM's and Intel's OpenMP export it too), `omp_get_max_threads`
//! and `omp_in_parallel` (`OMP_1.0`). Where one is missing the call fails and the pool stays
//! rayon's. Calls made from inside an OpenMP region run on the calling thread (no nested team).

use std::any::Any;
use std::ffi::{c_int, c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// `void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags)`:
/// runs `fn(data)` on a team of up to `num_threads` threads, the caller among them, and returns
/// when all have.
type GompParallel = unsafe extern "C" fn(TeamFn, *mut c_void, c_uint, c_uint);
type TeamFn = unsafe extern "C" fn(*mut c_void);
/// `int omp_get_max_threads(void)`, `int omp_in_parallel(void)`.
type OmpQuery = unsafe extern "C" fn() -> c_int;

/// The OpenMP runtime's entry points, resolved from one loaded library.
struct OpenMp {
    parallel: GompParallel,
    max_threads: OmpQuery,
    in_parallel: OmpQuery,
    library: String,
}

/// The runtime the pool uses; null: rayon's pool.
static OPENMP: AtomicPtr<OpenMp> = AtomicPtr::new(std::ptr::null_mut());
/// Every runtime attached so far (never freed: `OPENMP` may point at any of them while a call
/// runs; switching back and forth reuses them).
static ATTACHED: Mutex<Vec<&'static OpenMp>> = Mutex::new(Vec::new());

/// Which pool runs the parallel work: "rayon", or "openmp" with the library's path.
pub fn current() -> (&'static str, Option<String>) {
    match openmp() {
        Some(o) => ("openmp", Some(o.library.clone())),
        None => ("rayon", None),
    }
}

/// Run the parallel work on rayon's pool from now on.
pub fn use_rayon() {
    OPENMP.store(std::ptr::null_mut(), Ordering::Release);
}

/// Run the parallel work on the OpenMP runtime `library` (a path or name as `dlopen` takes it),
/// which the process must already have loaded. Error (the pool unchanged) if it is not loaded,
/// lacks an entry point, or the platform has no `dlvsym`.
pub fn use_openmp(library: &str) -> Result<()> {
    let mut attached = ATTACHED.lock().unwrap_or_else(|e| e.into_inner());
    let found = attached.iter().find(|o| o.library == library).copied();
    let o = match found {
        Some(o) => o,
        None => {
            let o: &'static OpenMp = Box::leak(Box::new(resolve(library)?));
            attached.push(o);
            o
        }
    };
    OPENMP.store(o as *const OpenMp as *mut OpenMp, Ordering::Release);
    Ok(())
}

fn openmp() -> Option<&'static OpenMp> {
    // SAFETY: non-null values point at leaked `OpenMp`s (`use_openmp`), never freed.
    unsafe { OPENMP.load(Ordering::Acquire).as_ref() }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn resolve(library: &str) -> Result<OpenMp> {
    use std::ffi::CString;
    let path = CString::new(library)
        .map_err(|_| Error::Invalid(format!("OpenMP library path {library:?} holds a NUL")))?;
    // SAFETY: RTLD_NOLOAD only returns a handle to an object that is already loaded (its
    // initializers have run); nothing is loaded, and the handle is never closed.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return Err(Error::Invalid(format!(
            "OpenMP library {library} is not loaded in this process"
        )));
    }
    let symbol = |name: &str, version: &str| -> Result<*mut c_void> {
        let (n, v) = (CString::new(name).unwrap(), CString::new(version).unwrap());
        // SAFETY: a lookup in a loaded object by NUL-terminated names.
        let p = unsafe { libc::dlvsym(handle, n.as_ptr(), v.as_ptr()) };
        if p.is_null() {
            return Err(Error::Unsupported(format!(
                "{library} has no {name}@{version}: not an OpenMP runtime with libgomp's ABI"
            )));
        }
        Ok(p)
    };
    let parallel = symbol("GOMP_parallel", "GOMP_4.0")?;
    let max_threads = symbol("omp_get_max_threads", "OMP_1.0")?;
    let in_parallel = symbol("omp_in_parallel", "OMP_1.0")?;
    // SAFETY: the versioned symbols have these C signatures (libgomp's libgomp.map and
    // libgomp_g.h; the OpenMP API for the omp_ functions).
    unsafe {
        Ok(OpenMp {
            parallel: std::mem::transmute::<*mut c_void, GompParallel>(parallel),
            max_threads: std::mem::transmute::<*mut c_void, OmpQuery>(max_threads),
            in_parallel: std::mem::transmute::<*mut c_void, OmpQuery>(in_parallel),
            library: library.to_owned(),
        })
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn resolve(library: &str) -> Result<OpenMp> {
    Err(Error::Unsupported(format!(
        "OpenMP pool ({library}): only on Linux with glibc (dlvsym)"
    )))
}

/// Threads a parallel call from this thread gets: rayon's pool size, or OpenMP's team size
/// for this thread (`omp_get_max_threads`: what `torch.set_num_threads` sets on the thread that
/// calls it, and torch sets on other threads at their first parallel op, which the Python
/// caller triggers), 1 inside an OpenMP region.
pub fn threads() -> usize {
    match openmp() {
        // SAFETY: argument-less OpenMP API functions, resolved by version (`resolve`).
        Some(o) if unsafe { (o.in_parallel)() } != 0 => 1,
        Some(o) => unsafe { (o.max_threads)() }.max(1) as usize,
        None => rayon::current_num_threads(),
    }
}

/// Run `task(t)` for every `t < tasks` across the pool: the calling thread takes tasks from a
/// shared counter from the start and up to `threads() - 1` pool threads join as they wake (a
/// batch-1 layer of ~0.1 ms handed whole to the pool waited on the wake-up, and ran no faster
/// on 2 threads than on 1). The first error stops the tasks not yet started and is returned; a
/// panic in a task is resumed on the calling thread.
pub fn run<F>(tasks: usize, task: F) -> Result<()>
where
    F: Fn(usize) -> Result<()> + Sync,
{
    run_ranges(tasks, 1, |r| r.clone().try_for_each(&task))
}

/// Run `task(range)` over ranges that together cover `0..units` once, across the pool as `run`
/// does, each thread claiming ranges of consecutive units as it comes for more: a share of what
/// is left (half of it divided among the threads, at most `max_units`, at least 1), so ranges
/// start large and shrink toward the end, where they balance the threads' finishing times.
/// Why not units one by one: a batch-1 layer split into 32-row tasks, taken in turn by 2
/// threads, ran 20-25% slower than in two halves (`matmul_probe`, 4096x4096 124 us against 100;
/// 2048x5632 100 against 67): each thread's rows come in short runs, with a task's setup and
/// write-out each, and the prefetch of each run's end reaches into rows the other thread reads.
pub fn run_ranges<F>(units: usize, max_units: usize, task: F) -> Result<()>
where
    F: Fn(std::ops::Range<usize>) -> Result<()> + Sync,
{
    let team = threads().min(units.max(1));
    let shared = Shared {
        next: AtomicUsize::new(0),
        units,
        max_units: max_units.max(1),
        parts: 2 * team,
        task,
        failed: Mutex::new(None),
        panicked: Mutex::new(None),
    };
    let helpers = team - 1;
    match openmp() {
        _ if helpers == 0 => shared.work(),
        Some(o) => {
            let data = &shared as *const Shared<F> as *mut c_void;
            // SAFETY: `on_team::<F>` reads `data` as the `Shared<F>` it is, which outlives the
            // region (GOMP_parallel returns after every team thread has); it never unwinds.
            unsafe { (o.parallel)(on_team::<F>, data, (helpers + 1) as c_uint, 0) };
        }
        None => rayon::in_place_scope(|s| {
            for _ in 0..helpers {
                s.spawn(|_| shared.work());
            }
            shared.work();
        }),
    }
    if let Some(p) = shared
        .panicked
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        resume_unwind(p);
    }
    match shared
        .failed
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `f(&mut items[i])` for every item, across the pool (`run`).
pub fn for_each_mut<T, F>(items: &mut [T], f: F) -> Result<()>
where
    T: Send,
    F: Fn(&mut T) -> Result<()> + Sync,
{
    struct Items<T>(*mut T);
    // SAFETY: each index is handed to exactly one task (`run`'s counter), so the `&mut`s the
    // tasks make are disjoint; `T: Send` lets them live on other threads.
    unsafe impl<T: Send> Sync for Items<T> {}
    let base = Items(items.as_mut_ptr());
    let base = &base;
    run(items.len(), |i| {
        // SAFETY: `i < items.len()`, and no other task gets index `i` (above).
        f(unsafe { &mut *base.0.add(i) })
    })
}

/// One parallel call's state, shared by the threads that work on it.
struct Shared<F> {
    /// The first unit not yet claimed.
    next: AtomicUsize,
    units: usize,
    /// The most units one claim takes.
    max_units: usize,
    /// A claim takes what is left divided by this (2 x the team: half of what is left, shared).
    parts: usize,
    task: F,
    failed: Mutex<Option<Error>>,
    panicked: Mutex<Option<Box<dyn Any + Send>>>,
}

impl<F: Fn(std::ops::Range<usize>) -> Result<()> + Sync> Shared<F> {
    /// The next range of units, or None when all are claimed.
    fn claim(&self) -> Option<std::ops::Range<usize>> {
        let mut start = self.next.load(Ordering::Relaxed);
        loop {
            let left = self.units.checked_sub(start).filter(|&l| l > 0)?;
            let n = (left / self.parts).clamp(1, self.max_units);
            match self.next.compare_exchange_weak(
                start,
                start + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(start..start + n),
                Err(now) => start = now,
            }
        }
    }

    /// Claim and run ranges until none is left; a panic is kept for the caller (it must not
    /// unwind through OpenMP's C frames), and stops the rest as an error does.
    fn work(&self) {
        let r = catch_unwind(AssertUnwindSafe(|| {
            while let Some(range) = self.claim() {
                if let Err(e) = (self.task)(range) {
                    self.next.store(self.units, Ordering::Relaxed);
                    let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                    failed.get_or_insert(e);
                }
            }
        }));
        if let Err(p) = r {
            self.next.store(self.units, Ordering::Relaxed);
            let mut panicked = self.panicked.lock().unwrap_or_else(|e| e.into_inner());
            panicked.get_or_insert(p);
        }
    }
}

/// The function each OpenMP team thread runs: `data` is the call's `Shared<F>`.
unsafe extern "C" fn on_team<F: Fn(std::ops::Range<usize>) -> Result<()> + Sync>(
    data: *mut c_void,
) {
    // SAFETY: `run` passes a `Shared<F>` that outlives the region.
    let shared = unsafe { &*(data as *const Shared<F>) };
    shared.work();
}
