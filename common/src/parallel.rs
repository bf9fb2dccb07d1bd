//! Splitting a kernel's output rows over worker threads (rayon natively; one thread in wasm without threads).

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

    /// Writes output `[i, r]`. Only the worker that owns row `r` may call this.
    #[inline]
    fn set(&self, i: usize, r: usize, v: f32) {
        assert!(i < self.n && r < self.rows);
        // SAFETY: in bounds (checked above); no other worker writes column r (see `for_each_chunk`).
        unsafe { *self.ptr.add(i * self.rows + r) = v }
    }
}

/// Work items per thread: a few, so threads that start late still balance, each a long contiguous run of rows
/// (hardware prefetch works best on long sequential reads, and every hand-off costs a wake-up).
const CHUNKS_PER_THREAD: usize = 4;
/// Fewest rows worth handing to another thread.
const MIN_CHUNK_ROWS: usize = 16;

/// Runs `f(r0, r1, sink)` over disjoint row ranges covering `0..rows`, in parallel where threads exist;
/// `sink(i, r, value)` stores output `[i, r]` for rows in the worker's own range.
pub fn for_each_chunk<F>(out: OutMatrix<'_>, f: F)
where
    F: Fn(usize, usize, &dyn Fn(usize, usize, f32)) + Sync,
{
    let rows = out.rows;
    #[cfg(not(target_arch = "wasm32"))]
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "wasm32")]
    let threads = 1;
    let chunk_rows = rows
        .div_ceil(threads * CHUNKS_PER_THREAD)
        .max(MIN_CHUNK_ROWS);
    let chunks = rows.div_ceil(chunk_rows);
    let run = |c: usize| {
        let (r0, r1) = (c * chunk_rows, ((c + 1) * chunk_rows).min(rows));
        f(r0, r1, &|i, r, v| {
            assert!((r0..r1).contains(&r), "worker wrote outside its rows");
            out.set(i, r, v)
        });
    };
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        (0..chunks).into_par_iter().for_each(run);
    }
    #[cfg(target_arch = "wasm32")]
    (0..chunks).for_each(run);
}
