//! How alike two models' layers are, and which LLM layer each SLM layer should take its KV from.
//!
//! Linear CKA (Kornblith et al. 2019) compares two representations of the same tokens whatever their widths:
//! `‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)` on column-centred `X` (n × d₁) and `Y` (n × d₂); 1 for representations equal up
//! to rotation and scale, near 0 for unrelated ones.

use nalgebra::DMatrix;

/// A representation prepared for CKA: centred, with its Gram norm.
pub struct Centered {
    x: DMatrix<f32>,
    gram_norm: f64,
}

impl Centered {
    pub fn new(x: &DMatrix<f32>) -> Self {
        let mut x = x.clone();
        let n = x.nrows().max(1) as f32;
        for mut col in x.column_iter_mut() {
            let mean = col.sum() / n;
            col.add_scalar_mut(-mean);
        }
        let gram_norm = (x.transpose() * &x).map(|v| v as f64).norm();
        Centered { x, gram_norm }
    }
}

/// Linear CKA of two centred representations of the same tokens.
pub fn cka(a: &Centered, b: &Centered) -> f64 {
    assert_eq!(a.x.nrows(), b.x.nrows(), "CKA compares the same tokens");
    let cross = (b.x.transpose() * &a.x).map(|v| v as f64).norm_squared();
    let denom = a.gram_norm * b.gram_norm;
    if denom > 0.0 { cross / denom } else { 0.0 }
}

/// The monotone map that maximises total similarity: `map[s]` is the LLM layer for SLM layer `s`, never decreasing
/// with `s` (deeper stays deeper), every SLM layer mapped. `sim[s][l]`: similarity of SLM layer `s` and LLM layer `l`.
pub fn monotone_map(sim: &[Vec<f64>]) -> Vec<usize> {
    let (slm, llm) = (sim.len(), sim.first().map_or(0, Vec::len));
    if slm == 0 || llm == 0 {
        return Vec::new();
    }
    // best[s][l]: the best total for SLM layers 0..=s with s mapped to l; from[s][l]: s-1's layer on that path.
    let mut best = vec![vec![f64::NEG_INFINITY; llm]; slm];
    let mut from = vec![vec![0; llm]; slm];
    best[0].clone_from(&sim[0]);
    for s in 1..slm {
        let (mut run, mut arg) = (f64::NEG_INFINITY, 0);
        for l in 0..llm {
            if best[s - 1][l] > run {
                (run, arg) = (best[s - 1][l], l);
            }
            best[s][l] = run + sim[s][l];
            from[s][l] = arg;
        }
    }
    let mut l = (0..llm)
        .max_by(|&a, &b| best[slm - 1][a].total_cmp(&best[slm - 1][b]))
        .expect("non-empty");
    let mut map = vec![0; slm];
    for s in (0..slm).rev() {
        map[s] = l;
        l = from[s][l];
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, d: usize, seed: u64) -> DMatrix<f32> {
        let mut s = seed;
        DMatrix::from_fn(n, d, |_, _| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
    }

    #[test]
    fn cka_sees_through_rotation_and_scale_not_noise() {
        let x = random(400, 16, 1);
        // An orthogonal map (a permutation with sign flips) and a scale, into a wider space.
        let mut q = DMatrix::zeros(16, 24);
        for i in 0..16 {
            q[(i, (i * 7) % 24)] = if i % 2 == 0 { 3.0 } else { -3.0 };
        }
        let (a, b) = (Centered::new(&x), Centered::new(&(&x * q)));
        assert!((cka(&a, &b) - 1.0).abs() < 1e-4, "{}", cka(&a, &b));
        assert!((cka(&a, &a) - 1.0).abs() < 1e-4);
        let noise = Centered::new(&random(400, 16, 99));
        assert!(cka(&a, &noise) < 0.2, "{}", cka(&a, &noise));
    }

    #[test]
    fn the_map_is_monotone_complete_and_follows_the_ridge() {
        // 4 SLM layers, 6 LLM layers: similarity peaks at l = round(1.6 s) except where monotonicity forbids it.
        let mut sim: Vec<Vec<f64>> = (0..4)
            .map(|s| {
                (0..6)
                    .map(|l| 1.0 - (l as f64 - 1.6 * s as f64).abs() / 6.0)
                    .collect()
            })
            .collect();
        assert_eq!(monotone_map(&sim), vec![0, 2, 3, 5]);
        // A tempting backwards jump is refused: SLM layer 2 alone prefers LLM layer 0.
        sim[2][0] = 5.0;
        let map = monotone_map(&sim);
        assert!(map.windows(2).all(|w| w[0] <= w[1]), "{map:?}");
        assert_eq!(map.len(), 4);
    }
}
