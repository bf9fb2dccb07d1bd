//! Closed-form ridge regression: the affine map from one model's per-token KV to another's.

use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

/// `y ≈ (x − mean_in) · W + mean_out`, row vectors; `w` is `d_in × d_out`, column-major.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Affine {
    pub d_in: usize,
    pub d_out: usize,
    pub w: Vec<f32>,
    pub mean_in: Vec<f32>,
    pub mean_out: Vec<f32>,
}

impl Affine {
    /// Maps the rows of `x` (`n × d_in`) to `n × d_out`.
    pub fn apply(&self, x: &DMatrix<f32>) -> DMatrix<f32> {
        assert_eq!(x.ncols(), self.d_in, "input width");
        let w = DMatrix::from_column_slice(self.d_in, self.d_out, &self.w);
        let mut centred = x.clone();
        for (mut col, m) in centred.column_iter_mut().zip(&self.mean_in) {
            col.add_scalar_mut(-m);
        }
        let mut y = centred * w;
        for (mut col, m) in y.column_iter_mut().zip(&self.mean_out) {
            col.add_scalar_mut(*m);
        }
        y
    }

    /// Whether the shapes agree with each other (for artifacts read from disk).
    pub fn is_consistent(&self) -> bool {
        self.w.len() == self.d_in * self.d_out
            && self.mean_in.len() == self.d_in
            && self.mean_out.len() == self.d_out
            && self
                .w
                .iter()
                .chain(&self.mean_in)
                .chain(&self.mean_out)
                .all(|v| v.is_finite())
    }
}

fn column_means(x: &DMatrix<f64>) -> DVector<f64> {
    let n = x.nrows().max(1) as f64;
    DVector::from_iterator(x.ncols(), x.column_iter().map(|c| c.sum() / n))
}

fn centred(x: &DMatrix<f64>, means: &DVector<f64>) -> DMatrix<f64> {
    let mut c = x.clone();
    for (mut col, m) in c.column_iter_mut().zip(means.iter()) {
        col.add_scalar_mut(-m);
    }
    c
}

/// The ridge fit of `y` on `x` with penalty `lambda` relative to the mean input variance (scale-free).
pub fn fit(x: &DMatrix<f32>, y: &DMatrix<f32>, lambda: f64) -> Affine {
    assert_eq!(x.nrows(), y.nrows(), "the same tokens");
    let (x, y) = (x.map(f64::from), y.map(f64::from));
    let (mx, my) = (column_means(&x), column_means(&y));
    let (xc, yc) = (centred(&x, &mx), centred(&y, &my));
    let mut gram = xc.transpose() * &xc;
    let d = gram.nrows();
    let scale = (gram.trace() / d.max(1) as f64).max(f64::MIN_POSITIVE);
    for i in 0..d {
        gram[(i, i)] += lambda * scale;
    }
    let rhs = xc.transpose() * &yc;
    // Positive definite once λ > 0; an LU solve covers λ = 0 on full-rank data.
    let w = match gram.clone().cholesky() {
        Some(ch) => ch.solve(&rhs),
        None => gram
            .lu()
            .solve(&rhs)
            .unwrap_or_else(|| DMatrix::zeros(d, y.ncols())),
    };
    Affine {
        d_in: d,
        d_out: y.ncols(),
        w: w.iter().map(|&v| v as f32).collect(),
        mean_in: mx.iter().map(|&v| v as f32).collect(),
        mean_out: my.iter().map(|&v| v as f32).collect(),
    }
}

/// Penalties tried by [`fit_validated`].
pub const LAMBDAS: [f64; 6] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0];

/// Fits on the first 80% of the rows for each penalty in `lambdas`, keeps the one with the lowest error on the
/// other 20%, and refits on all rows with it. The rows should come from the calibration set only.
pub fn fit_validated(x: &DMatrix<f32>, y: &DMatrix<f32>, lambdas: &[f64]) -> (Affine, f64) {
    let n = x.nrows();
    let cut = (n * 4 / 5).clamp(1, n.saturating_sub(1).max(1));
    let (xt, yt) = (x.rows(0, cut).into_owned(), y.rows(0, cut).into_owned());
    let (xv, yv) = (
        x.rows(cut, n - cut).into_owned(),
        y.rows(cut, n - cut).into_owned(),
    );
    let lambda = lambdas
        .iter()
        .copied()
        .min_by(|&a, &b| {
            let err = |l| relative_error(&fit(&xt, &yt, l).apply(&xv), &yv);
            err(a).total_cmp(&err(b))
        })
        .unwrap_or(1e-2);
    (fit(x, y, lambda), lambda)
}

/// `‖pred − y‖² / ‖y − mean(y)‖²`: 0 is perfect, 1 is no better than predicting `y`'s own mean.
pub fn relative_error(pred: &DMatrix<f32>, y: &DMatrix<f32>) -> f64 {
    let y64 = y.map(f64::from);
    let spread = centred(&y64, &column_means(&y64)).norm_squared();
    let miss = (pred.map(f64::from) - y64).norm_squared();
    if spread > 0.0 { miss / spread } else { miss }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_linear_map_and_beats_the_mean() {
        let mut s = 7u64;
        let mut rnd = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        };
        let x = DMatrix::from_fn(500, 12, |_, _| rnd());
        let truth = DMatrix::from_fn(12, 5, |_, _| rnd());
        let y = &x * &truth + DMatrix::from_fn(500, 5, |_, _| 0.01 * rnd()).add_scalar(3.0);
        let (a, lambda) = fit_validated(&x, &y, &LAMBDAS);
        assert!(
            lambda <= 1e-2,
            "little noise wants little penalty: {lambda}"
        );
        let err = relative_error(&a.apply(&x), &y);
        assert!(err < 1e-3, "{err}");
        let w = DMatrix::from_column_slice(12, 5, &a.w);
        assert!((w - truth).abs().max() < 0.01);
        assert!(a.is_consistent());
        // Unrelated targets: no better than their mean, never much worse.
        let noise = DMatrix::from_fn(500, 5, |_, _| rnd());
        let err = relative_error(&fit(&x, &noise, 10.0).apply(&x), &noise);
        assert!(err > 0.9 && err <= 1.0, "{err}");
    }
}
