//! Large → small: making the cloud LLM's context KV usable by the edge SLM (CE-LSLM's layer alignment and
//! representation projection). The two Qwen2.5-Coder models share a tokenizer, so their KV rows line up token by
//! token; `tandem align` fits, per SLM layer, the most similar LLM layer (a monotone map by linear CKA) and ridge
//! maps of its keys (before rotary) and values into the SLM's space, and stores them as a versioned artifact.

pub mod artifact;
pub mod calibration;
pub mod eval;
pub mod features;
pub mod fit;
pub mod gate;
pub mod heatmap;
pub mod ridge;
pub mod score;
pub mod similarity;

use std::fmt::Write;
use std::path::Path;

pub use artifact::{AlignError, Alignment};
pub use fit::{FitOptions, Fitted, fit};

/// Writes a fit's artifact, the calibration manifest, the similarity heat map and a report into `dir`; returns the
/// report (also printed by `tandem align`).
pub fn save(f: &Fitted, manifest: &calibration::Manifest, dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("alignment.bin"), f.alignment.to_bytes())?;
    std::fs::write(
        dir.join("calibration.json"),
        serde_json::to_string_pretty(manifest)?,
    )?;
    let both: Vec<Vec<f64>> = f
        .sim_k
        .iter()
        .zip(&f.sim_v)
        .map(|(k, v)| k.iter().zip(v).map(|(a, b)| (a + b) / 2.0).collect())
        .collect();
    let map: Vec<usize> = f.alignment.layers.iter().map(|l| l.llm_layer).collect();
    heatmap::write(&dir.join("similarity.png"), &both, &map)?;
    let report = report(f);
    std::fs::write(dir.join("report.txt"), &report)?;
    Ok(report)
}

/// The similarity matrix (mean of key and value CKA, ×100), the layer map and the held-out reconstruction errors.
pub fn report(f: &Fitted) -> String {
    let a = &f.alignment;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "alignment {} — LLM {} ({} layers) → SLM {} ({} layers); {} calibration tokens, {} held-out tokens; \
         calibration manifest {}",
        a.id(),
        a.llm.fingerprint,
        a.llm.layers,
        a.slm.fingerprint,
        a.slm.layers,
        f.calibration_tokens,
        f.held_out_tokens,
        &a.calibration[..16]
    );
    let _ = writeln!(
        out,
        "\nlinear CKA ×100 (mean of K and V); rows: SLM layers, columns: LLM layers; * the map"
    );
    let _ = write!(out, "     ");
    for l in 0..a.llm.layers {
        let _ = write!(out, "{l:>4}");
    }
    let _ = writeln!(out);
    for (s, (k, v)) in f.sim_k.iter().zip(&f.sim_v).enumerate() {
        let _ = write!(out, "{s:>4} ");
        for l in 0..k.len() {
            let mark = if a.layers[s].llm_layer == l { '*' } else { ' ' };
            let _ = write!(out, "{:>3.0}{mark}", 50.0 * (k[l] + v[l]));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(
        out,
        "\nSLM layer ← LLM layer: CKA K/V, ridge λ K/V, held-out relative error K/V (1 = the mean)"
    );
    for (m, e) in a.layers.iter().zip(&f.held_out) {
        let _ = writeln!(
            out,
            "{:>4} ← {:>2}: {:.2}/{:.2}  λ {:.0e}/{:.0e}  error {:.3}/{:.3}",
            m.slm_layer, m.llm_layer, m.cka.0, m.cka.1, m.lambda.0, m.lambda.1, e.k, e.v
        );
    }
    let g = &f.gates;
    let _ = writeln!(
        out,
        "\nfused-mode gates (weight of the projected KV per SLM layer; 0: unused): {:?}\n\
         calibration perplexity: SLM's own KV {:.3}, fused {:.3}",
        g.gates, g.own_perplexity, g.fused_perplexity
    );
    out
}
