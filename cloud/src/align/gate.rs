//! The fused mode's gates: per SLM layer, the weight in [0, 1] with which attention over the projected LLM KV is
//! blended with attention over the SLM's own KV of the same context ([`tandem_common::attention::blend`]). Fitted
//! on calibration text by coordinate descent over bands of layers on a small grid, minimising the perplexity of
//! each chunk's continuation; all gates start at 0 (the SLM's own KV alone), so the fit never ends worse than that
//! on the calibration text.

use tandem_common::engine::Engine;
use tandem_common::kv::KvState;

use super::artifact::Alignment;
use super::score::score;

/// Weights tried for each band (1: the projected reading replaces the SLM's own in those layers).
pub const GATE_GRID: [f32; 6] = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0];

/// What the fit found: the gates, and calibration perplexity with the SLM's own KV alone and fused.
#[derive(Debug, Clone)]
pub struct GateFit {
    pub gates: Vec<f32>,
    pub own_perplexity: f64,
    pub fused_perplexity: f64,
}

/// One calibration chunk split for scoring: the SLM's own KV and the projected LLM KV of its context, and the
/// continuation after it.
pub struct GateSample {
    pub own: KvState,
    pub projected: KvState,
    pub continuation: Vec<u32>,
}

impl GateSample {
    /// Splits `tokens` into a context and its last `continuation` tokens and computes both readings of the context.
    pub fn new(
        llm: &Engine,
        slm: &Engine,
        alignment: &Alignment,
        tokens: &[u32],
        continuation: usize,
    ) -> anyhow::Result<GateSample> {
        anyhow::ensure!(
            continuation >= 2 && tokens.len() > continuation,
            "a gate sample of {} tokens cannot hold a {continuation}-token continuation",
            tokens.len()
        );
        let (context, rest) = tokens.split_at(tokens.len() - continuation);
        Ok(GateSample {
            own: slm.prefill_kv(context)?,
            projected: alignment.project(&llm.prefill_kv(context)?)?,
            continuation: rest.to_vec(),
        })
    }
}

/// Perplexity of every sample's continuation with `gates`.
fn perplexity(slm: &Engine, samples: &[GateSample], gates: &[f32]) -> anyhow::Result<f64> {
    let (mut nll, mut count) = (0.0, 0usize);
    for s in samples {
        let gated = gates
            .iter()
            .any(|&g| g > 0.0)
            .then_some((&s.projected, gates));
        let r = score(slm, Some(&s.own), gated, &s.continuation)?;
        nll += r.nll;
        count += r.count;
    }
    Ok((nll / count.max(1) as f64).exp())
}

/// Fits one gate per SLM layer, shared within each of `bands` contiguous bands of layers (one descent pass).
pub fn fit_gates(
    slm: &Engine,
    samples: &[GateSample],
    bands: usize,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<GateFit> {
    let layers = slm.model.config().n_layers;
    let bands = bands.clamp(1, layers);
    let mut gates = vec![0.0; layers];
    let own = perplexity(slm, samples, &gates)?;
    let mut best = own;
    for b in 0..bands {
        let band = b * layers / bands..(b + 1) * layers / bands;
        let start = gates[band.start];
        for &g in GATE_GRID.iter().filter(|&&g| g != start) {
            let mut trial = gates.clone();
            trial[band.clone()].fill(g);
            let p = perplexity(slm, samples, &trial)?;
            progress(&format!(
                "gate {g} for SLM layers {band:?}: calibration perplexity {p:.3} (best so far {best:.3})"
            ));
            if p < best {
                (best, gates) = (p, trial);
            }
        }
    }
    Ok(GateFit {
        gates,
        own_perplexity: own,
        fused_perplexity: best,
    })
}
