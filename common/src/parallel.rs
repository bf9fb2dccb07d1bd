//! Splitting a kernel's output rows over worker threads.
//!
//! Decode calls ~7 mat-muls per layer, each a few tens of microseconds of work. A general pool (rayon) puts idle
//! workers to sleep and wakes them with a futex per call: measured, that cost a quarter of decode time. So the
//! kernels run on a small team of helper threads that spin briefly between jobs (as llama.cpp's threads do) and only
//! then sleep. In WebAssembly built with atomics (the browser's threaded engine), the host starts the helpers (Web
//! Workers sharing the module's memory) through [`set_host_threads`]; in other wasm builds, everything runs on the
//! calling thread.

use std::marker::PhantomData;

/// An `[n, rows]` output matrix that workers fill by disjoint row ranges.
pub struct OutMatrix<'a> {
    ptr: *mut f32,
    n: usize,
    rows: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: `for_each_chunk` hands each worker a disjoint range of weight rows, and workers only write their own.
unsafe impl Send for OutMatrix<'_> {}
unsafe impl Sync for OutMatrix<'_> {}

impl<'a> OutMatrix<'a> {
    pub fn new(out: &'a mut [f32], n: usize, rows: usize) -> Self {
        assert_eq!(out.len(), n * rows);
        OutMatrix {
            ptr: out.as_mut_ptr(),
            n,
            rows,
            _out: PhantomData,
        }
    }

    /// Writes outputs `[i, r..r + values.len()]`. Only the worker that owns those rows may call this.
    #[inline]
    fn set(&self, i: usize, r: usize, values: &[f32]) {
        assert!(i < self.n && r + values.len() <= self.rows);
        // SAFETY: in bounds (checked above); no other worker writes these columns (see `for_each_chunk`).
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.add(i * self.rows + r),
                values.len(),
            )
        }
    }
}

/// Work items per thread: a few, so threads that start late still balance, each a long contiguous run of rows
/// (hardware prefetch works best on long sequential reads).
const CHUNKS_PER_THREAD: usize = 4;
/// Fewest rows worth handing to another thread.
const MIN_CHUNK_ROWS: usize = 16;

/// Threads that compute kernels: `TANDEM_THREADS`, else `RAYON_NUM_THREADS`, else the machine's parallelism.
pub fn threads() -> usize {
    #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
    return team::get().map_or(1, |t| t.threads());
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    1
}

/// How a wasm host starts a helper thread: runs the closure on a new thread sharing this module's memory.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
pub type HostSpawn = fn(Box<dyn FnOnce() + Send>);

/// Kernel threads for a wasm build with atomics, whose threads only its host can start: `threads` in all (the
/// caller included). Takes effect if called before the first kernel runs; returns whether it did.
#[cfg(all(target_arch = "wasm32", target_feature = "atomics"))]
pub fn set_host_threads(threads: usize, spawn: HostSpawn) -> bool {
    team::HOST.set((threads, spawn)).is_ok()
}

/// Fewest weight bytes a mat-vec reads for it to be split over threads. In the browser's threaded engine, handing
/// a job to a helper Web Worker costs more than a small mat-vec's second half: with SmolLM2 (attention projections
/// of 40–200 kB) two threads decoded slower than one, 87.7 vs 90.1 tok/s; with those on one thread, 100.1 tok/s
/// (`just bench-wasm`). Native builds split every mat-vec, as before.
pub const MIN_SPLIT_BYTES: usize = if cfg!(target_arch = "wasm32") {
    256 << 10
} else {
    0
};

/// Runs `f(r0, r1, sink)` over disjoint row ranges covering `0..rows`, in parallel where threads exist and `split`
/// says the work is worth it; `sink(i, r, values)` stores outputs `[i, r..r + values.len()]` for rows in the
/// worker's own range.
pub fn for_each_chunk<F>(out: OutMatrix<'_>, split: bool, f: F)
where
    F: Fn(usize, usize, &dyn Fn(usize, usize, &[f32])) + Sync,
{
    let rows = out.rows;
    let chunk_rows = rows
        .div_ceil(threads() * CHUNKS_PER_THREAD)
        .max(MIN_CHUNK_ROWS);
    let chunks = rows.div_ceil(chunk_rows);
    let run = |c: usize| {
        let (r0, r1) = (c * chunk_rows, ((c + 1) * chunk_rows).min(rows));
        f(r0, r1, &|i, r, values| {
            assert!(
                r0 <= r && r + values.len() <= r1,
                "worker wrote outside its rows"
            );
            out.set(i, r, values)
        });
    };
    #[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
    if let Some(team) = team::get().filter(|_| split) {
        return team.run(chunks, &run);
    }
    #[cfg(all(target_arch = "wasm32", not(target_feature = "atomics")))]
    let _ = split; // one thread: nothing to split over
    (0..chunks).for_each(run);
}

#[cfg(any(not(target_arch = "wasm32"), target_feature = "atomics"))]
mod team {
    use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
    use std::ptr;
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::Duration;

    use web_time::Instant;

    /// How long an idle helper spins before it sleeps: longer than the gap between two mat-muls of one decode step.
    const SPIN: Duration = Duration::from_micros(500);

    /// One job: chunks `0..chunks` of `f`, claimed by whoever is free.
    struct Job<'a> {
        f: &'a (dyn Fn(usize) + Sync),
        chunks: usize,
        next: AtomicUsize,
        pending: AtomicUsize,
        panicked: AtomicBool,
    }

    impl Job<'_> {
        /// Claims and runs chunks until none is left.
        fn work(&self) {
            loop {
                let c = self.next.fetch_add(1, SeqCst);
                if c >= self.chunks {
                    return;
                }
                if catch_unwind(AssertUnwindSafe(|| (self.f)(c))).is_err() {
                    self.panicked.store(true, SeqCst);
                }
                self.pending.fetch_sub(1, SeqCst);
            }
        }
    }

    pub(super) struct Team {
        helpers: usize,
        /// The job being run, type-erased; null between jobs.
        job: AtomicPtr<Job<'static>>,
        generation: AtomicU64,
        /// Helpers between reading `job` and finishing with it: the dispatcher waits for zero before its job dies.
        inside: AtomicUsize,
        sleeping: AtomicUsize,
        lock: Mutex<()>,
        wake: Condvar,
        /// One dispatcher at a time; a second caller (another session's thread, or a nested call) runs serially.
        dispatch: Mutex<()>,
    }

    pub(super) fn get() -> Option<&'static Team> {
        static TEAM: OnceLock<Option<&'static Team>> = OnceLock::new();
        *TEAM.get_or_init(|| {
            let threads = thread_count();
            if threads < 2 {
                return None;
            }
            let team: &'static Team = Box::leak(Box::new(Team {
                helpers: threads - 1,
                job: AtomicPtr::new(ptr::null_mut()),
                generation: AtomicU64::new(0),
                inside: AtomicUsize::new(0),
                sleeping: AtomicUsize::new(0),
                lock: Mutex::new(()),
                wake: Condvar::new(),
                dispatch: Mutex::new(()),
            }));
            for i in 0..team.helpers {
                if !spawn(i, Box::new(move || team.helper())) {
                    return None;
                }
            }
            Some(team)
        })
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn thread_count() -> usize {
        ["TANDEM_THREADS", "RAYON_NUM_THREADS"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn spawn(i: usize, f: Box<dyn FnOnce() + Send>) -> bool {
        std::thread::Builder::new()
            .name(format!("tandem-kernel-{i}"))
            .spawn(f)
            .is_ok()
    }

    /// The host's thread count and spawner ([`super::set_host_threads`]).
    #[cfg(target_arch = "wasm32")]
    pub(super) static HOST: OnceLock<(usize, super::HostSpawn)> = OnceLock::new();

    #[cfg(target_arch = "wasm32")]
    fn thread_count() -> usize {
        HOST.get().map_or(1, |&(n, _)| n)
    }

    #[cfg(target_arch = "wasm32")]
    fn spawn(_: usize, f: Box<dyn FnOnce() + Send>) -> bool {
        HOST.get().map(|&(_, spawn)| spawn(f)).is_some()
    }

    impl Team {
        pub(super) fn threads(&self) -> usize {
            self.helpers + 1
        }

        /// Runs `f(0..chunks)` on the caller and the helpers; returns when every chunk is done.
        pub(super) fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
            let Ok(_one) = self.dispatch.try_lock() else {
                return (0..chunks).for_each(f);
            };
            let job = Job {
                f,
                chunks,
                next: AtomicUsize::new(0),
                pending: AtomicUsize::new(chunks),
                panicked: AtomicBool::new(false),
            };
            // SAFETY: the pointer is withdrawn, and every helper that read it has left (`inside` == 0), before
            // `job` goes out of scope below; the lifetime is erased only for that window.
            let erased = (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>();
            self.job.store(erased, SeqCst);
            self.generation.fetch_add(1, SeqCst);
            if self.sleeping.load(SeqCst) > 0 {
                let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.wake.notify_all();
            }
            job.work();
            while job.pending.load(SeqCst) > 0 {
                std::hint::spin_loop();
            }
            self.job.store(ptr::null_mut(), SeqCst);
            while self.inside.load(SeqCst) > 0 {
                std::hint::spin_loop();
            }
            if job.panicked.load(SeqCst) {
                resume_unwind(Box::new("a kernel worker panicked"));
            }
        }

        fn helper(&self) {
            let mut seen = self.generation.load(SeqCst);
            loop {
                let idle = Instant::now();
                let mut spins = 0u32;
                while self.generation.load(SeqCst) == seen {
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(256) && idle.elapsed() > SPIN {
                        self.sleep(seen);
                    }
                }
                seen = self.generation.load(SeqCst);
                self.inside.fetch_add(1, SeqCst);
                let job = self.job.load(SeqCst);
                // SAFETY: non-null means the dispatcher is still in `run` and waits for `inside` to drop to zero.
                if let Some(job) = unsafe { job.as_ref() } {
                    job.work();
                }
                self.inside.fetch_sub(1, SeqCst);
            }
        }

        fn sleep(&self, seen: u64) {
            let mut g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.sleeping.fetch_add(1, SeqCst);
            while self.generation.load(SeqCst) == seen {
                g = self.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            self.sleeping.fetch_sub(1, SeqCst);
        }
    }
}

// Threads and unwinding panics: neither exists in wasm, where everything runs on the calling thread.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn every_row_written_once_even_from_many_callers() {
        let rows = 1000;
        std::thread::scope(|s| {
            for caller in 0..4 {
                s.spawn(move || {
                    for round in 0..50 {
                        let mut out = vec![0f32; 2 * rows];
                        for_each_chunk(OutMatrix::new(&mut out, 2, rows), true, |r0, r1, sink| {
                            for r in r0..r1 {
                                sink(0, r, &[r as f32]);
                                sink(1, r, &[(caller * round) as f32]);
                            }
                        });
                        assert!((0..rows).all(|r| out[r] == r as f32));
                        assert!(out[rows..].iter().all(|&v| v == (caller * round) as f32));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller() {
        let mut out = vec![0f32; 64];
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each_chunk(OutMatrix::new(&mut out, 1, 64), true, |r0, _, _| {
                assert!(r0 != 16, "chunk at row 16 fails");
            })
        }));
        assert!(r.is_err());
    }
}
