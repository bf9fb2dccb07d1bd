//! Fitting an alignment: both models read the same calibration chunks; per-layer CKA gives the similarity matrix and
//! the monotone layer map; ridge regression (penalty chosen on a validation share of the calibration rows) gives
//! the maps; the held-out chunks measure how well projected KV reconstructs the SLM's own.

use nalgebra::DMatrix;
use tandem_common::codec::RopeParams;
use tandem_common::engine::Engine;

use super::artifact::{Alignment, LayerMap, Side};
use super::calibration::{Manifest, Split};
use super::features::layer_rows;
use super::gate::{GateFit, GateSample, fit_gates};
use super::ridge::{LAMBDAS, fit_validated, relative_error};
use super::similarity::{Centered, cka, monotone_map};

#[derive(Debug, Clone, Copy)]
pub struct FitOptions {
    /// Calibration files read (one chunk each) and held-out files scored.
    pub calibration_chunks: usize,
    pub held_out_chunks: usize,
    /// Tokens per chunk (from the start of each file).
    pub chunk_tokens: usize,
    /// Fused-mode gates: calibration chunks scored per trial, the continuation scored at the end of each, and
    /// the bands of layers that share a gate.
    pub gate_chunks: usize,
    pub gate_tokens: usize,
    pub gate_bands: usize,
}

impl Default for FitOptions {
    fn default() -> Self {
        FitOptions {
            calibration_chunks: 12,
            held_out_chunks: 6,
            chunk_tokens: 384,
            gate_chunks: 12,
            gate_tokens: 64,
            gate_bands: 4,
        }
    }
}

/// How well the projection reconstructs one SLM layer's KV on held-out text (relative squared error: 0 perfect,
/// 1 no better than the layer's mean).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeldOutError {
    pub slm_layer: usize,
    pub llm_layer: usize,
    pub k: f64,
    pub v: f64,
}

pub struct Fitted {
    pub alignment: Alignment,
    /// CKA of keys and of values, `[slm layer][llm layer]`.
    pub sim_k: Vec<Vec<f64>>,
    pub sim_v: Vec<Vec<f64>>,
    pub held_out: Vec<HeldOutError>,
    pub gates: GateFit,
    pub calibration_tokens: usize,
    pub held_out_tokens: usize,
}

/// Per layer, the token rows of all chunks stacked: keys (without rotary) and values.
struct Rows {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    width: usize,
    tokens: usize,
}

impl Rows {
    fn read(
        engine: &Engine,
        chunks: &[Vec<u32>],
        progress: &mut dyn FnMut(&str),
    ) -> anyhow::Result<Rows> {
        let c = engine.model.config();
        let rope = RopeParams::of(c);
        let mut rows = Rows {
            k: vec![Vec::new(); c.n_layers],
            v: vec![Vec::new(); c.n_layers],
            width: 0,
            tokens: 0,
        };
        for (i, tokens) in chunks.iter().enumerate() {
            progress(&format!(
                "{}: chunk {}/{} ({} tokens)",
                engine.model.fingerprint(),
                i + 1,
                chunks.len(),
                tokens.len()
            ));
            let kv = engine.prefill_kv(tokens)?;
            for l in 0..c.n_layers {
                let (k, v) = layer_rows(&kv, l, rope);
                rows.width = k.ncols();
                // Column-major transposed = row-major: rows append in token order.
                rows.k[l].extend_from_slice(k.transpose().as_slice());
                rows.v[l].extend_from_slice(v.transpose().as_slice());
            }
            rows.tokens += tokens.len();
        }
        Ok(rows)
    }

    fn k(&self, l: usize) -> DMatrix<f32> {
        DMatrix::from_row_slice(self.tokens, self.width, &self.k[l])
    }

    fn v(&self, l: usize) -> DMatrix<f32> {
        DMatrix::from_row_slice(self.tokens, self.width, &self.v[l])
    }
}

/// The first `n` tokens of each picked file, identical under both tokenizers (or an error saying they differ).
fn chunks(
    llm: &Engine,
    slm: &Engine,
    manifest: &Manifest,
    split: Split,
    files: usize,
    n: usize,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut out = Vec::new();
    for f in manifest.pick(split, files) {
        let text = std::fs::read_to_string(&f.path)?;
        // A prefix comfortably longer than n tokens, without tokenizing whole large files.
        let prefix: String = text.chars().take(n * 12).collect();
        let ids = slm.tokenizer.encode(&prefix)?;
        anyhow::ensure!(
            llm.tokenizer.encode(&prefix)? == ids,
            "the two models tokenize {} differently: KV of different tokens cannot be aligned",
            f.name
        );
        if ids.len() >= n {
            out.push(ids[..n].to_vec());
        }
    }
    anyhow::ensure!(!out.is_empty(), "no {split:?} file holds {n} tokens");
    Ok(out)
}

fn side(e: &Engine) -> Side {
    let c = e.model.config();
    Side {
        fingerprint: e.model.fingerprint().to_string(),
        layers: c.n_layers,
        kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        rope: RopeParams::of(c),
    }
}

pub fn fit(
    llm: &Engine,
    slm: &Engine,
    manifest: &Manifest,
    o: FitOptions,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Fitted> {
    let cal = chunks(
        llm,
        slm,
        manifest,
        Split::Calibration,
        o.calibration_chunks,
        o.chunk_tokens,
    )?;
    let held = chunks(
        llm,
        slm,
        manifest,
        Split::HeldOut,
        o.held_out_chunks,
        o.chunk_tokens,
    )?;
    let (big, small) = (
        Rows::read(llm, &cal, progress)?,
        Rows::read(slm, &cal, progress)?,
    );
    let (nl, ns) = (big.k.len(), small.k.len());

    progress("similarity (linear CKA) of every layer pair");
    let centred = |rows: &Rows, n: usize| -> (Vec<Centered>, Vec<Centered>) {
        (0..n)
            .map(|l| (Centered::new(&rows.k(l)), Centered::new(&rows.v(l))))
            .unzip()
    };
    let ((bk, bv), (sk, sv)) = (centred(&big, nl), centred(&small, ns));
    let sim_k: Vec<Vec<f64>> = sk
        .iter()
        .map(|s| bk.iter().map(|b| cka(s, b)).collect())
        .collect();
    let sim_v: Vec<Vec<f64>> = sv
        .iter()
        .map(|s| bv.iter().map(|b| cka(s, b)).collect())
        .collect();
    drop((bk, bv, sk, sv));
    let both: Vec<Vec<f64>> = sim_k
        .iter()
        .zip(&sim_v)
        .map(|(k, v)| k.iter().zip(v).map(|(a, b)| a + b).collect())
        .collect();
    let map = monotone_map(&both);

    let mut layers = Vec::with_capacity(ns);
    for (s, &l) in map.iter().enumerate() {
        progress(&format!("ridge fit of SLM layer {s} from LLM layer {l}"));
        let (k, lk) = fit_validated(&big.k(l), &small.k(s), &LAMBDAS);
        let (v, lv) = fit_validated(&big.v(l), &small.v(s), &LAMBDAS);
        layers.push(LayerMap {
            slm_layer: s,
            llm_layer: l,
            cka: (sim_k[s][l], sim_v[s][l]),
            k,
            v,
            lambda: (lk, lv),
        });
    }
    let mut alignment = Alignment {
        llm: side(llm),
        slm: side(slm),
        layers,
        gates: vec![0.0; ns],
        calibration: manifest.hash(),
    };
    let calibration_tokens = big.tokens;
    drop((big, small));

    progress("fused-mode gates on calibration continuations");
    let samples = cal
        .iter()
        .take(o.gate_chunks.max(1))
        .map(|c| GateSample::new(llm, slm, &alignment, c, o.gate_tokens))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let gates = fit_gates(slm, &samples, o.gate_bands, progress)?;
    alignment.gates = gates.gates.clone();

    let (hb, hs) = (
        Rows::read(llm, &held, progress)?,
        Rows::read(slm, &held, progress)?,
    );
    let held_out = alignment
        .layers
        .iter()
        .map(|m| HeldOutError {
            slm_layer: m.slm_layer,
            llm_layer: m.llm_layer,
            k: relative_error(&m.k.apply(&hb.k(m.llm_layer)), &hs.k(m.slm_layer)),
            v: relative_error(&m.v.apply(&hb.v(m.llm_layer)), &hs.v(m.slm_layer)),
        })
        .collect();
    Ok(Fitted {
        alignment,
        sim_k,
        sim_v,
        held_out,
        gates,
        calibration_tokens,
        held_out_tokens: hb.tokens,
    })
}
