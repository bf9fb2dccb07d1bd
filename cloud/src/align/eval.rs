//! `just eval`: does the LLM's projected context KV help the SLM? On held-out files (never used in fitting), each
//! split into a context and its continuation, every mode scores the continuation teacher-forced: perplexity, and
//! top-1 agreement with the LLM reading the same context; plus what each mode sends and what it costs the edge.

use std::fmt::Write;
use std::time::Instant;

use serde::Serialize;
use tandem_common::engine::Engine;
use tandem_common::kv::KvState;
use tandem_common::model::LayerwisePrefill;

use super::artifact::Alignment;
use super::calibration::{Manifest, Split};
use super::score::{Scored, score};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub files: usize,
    pub context_tokens: usize,
    pub continuation_tokens: usize,
    /// Split points tried: the SLM computes its lowest `k` layers, the rest come projected from the LLM.
    pub splits: Vec<usize>,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            files: 6,
            context_tokens: 256,
            continuation_tokens: 48,
            splits: vec![6, 12, 18],
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub mode: String,
    pub perplexity: f64,
    /// Share of continuation positions where this mode's top token is the LLM's.
    pub agreement: f64,
    /// Context KV bytes on the wire per context token, at f16.
    pub wire_bytes_per_token: f64,
    /// Edge time spent computing context layers itself, per file.
    pub edge_compute_ms: f64,
}

/// What [`evaluate`] measured, over the held-out files it could use (at most `EvalOptions::files`).
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub files: usize,
    pub modes: Vec<ModeResult>,
}

/// The SLM's own KV of its lowest `k` layers (computed layer by layer, as an edge does) with the projected rest.
fn split(
    e: &Engine,
    tokens: &[u32],
    projected: &KvState,
    k: usize,
) -> anyhow::Result<(KvState, f64)> {
    let t0 = Instant::now();
    let mut lw = LayerwisePrefill::new(&e.model, tokens, 0)?;
    let mut kv = projected.clone();
    for l in 0..k {
        kv.layers[l] = lw
            .next_layer()
            .ok_or_else(|| anyhow::anyhow!("layer {l} missing"))?;
    }
    Ok((kv, t0.elapsed().as_secs_f64() * 1e3))
}

pub fn evaluate(
    llm: &Engine,
    slm: &Engine,
    alignment: &Alignment,
    manifest: &Manifest,
    o: &EvalOptions,
    progress: &mut dyn FnMut(&str),
) -> anyhow::Result<Evaluation> {
    alignment.check_models(llm.model.fingerprint(), slm.model.fingerprint())?;
    let n_layers = slm.model.config().n_layers;
    let f16_layer =
        2.0 * 2.0 * (slm.model.config().n_kv_heads * slm.model.config().head_dim) as f64;
    let mut modes: Vec<(String, f64)> = vec![
        ("SLM without the context".into(), 0.0),
        ("SLM alone, computing the context".into(), 0.0),
        ("SLM + exact cloud KV".into(), n_layers as f64 * f16_layer),
        (
            "SLM + projected LLM KV, all layers".into(),
            n_layers as f64 * f16_layer,
        ),
    ];
    let splits: Vec<usize> = o
        .splits
        .iter()
        .copied()
        .filter(|&k| k > 0 && k < n_layers)
        .collect();
    for &k in &splits {
        modes.push((
            format!("split: {k} layers own, {} projected", n_layers - k),
            (n_layers - k) as f64 * f16_layer,
        ));
    }
    // The fused mode: the SLM computes its own context KV and attends to the projected KV where a gate is set.
    let fused_layers = alignment.gates.iter().filter(|&&g| g > 0.0).count();
    modes.push((
        format!("fused: own KV + projected in {fused_layers} gated layers"),
        fused_layers as f64 * f16_layer,
    ));
    modes.push(("LLM alone".into(), 0.0));
    let mut nll = vec![0.0; modes.len()];
    let mut agree = vec![0usize; modes.len()];
    let mut compute = vec![0.0; modes.len()];
    let (mut count, mut files) = (0usize, 0usize);

    let need = o.context_tokens + o.continuation_tokens;
    for f in manifest.pick(Split::HeldOut, usize::MAX) {
        if files == o.files {
            break;
        }
        let text = std::fs::read_to_string(&f.path)?;
        let prefix: String = text.chars().take(need * 12).collect();
        let ids = slm.tokenizer.encode(&prefix)?;
        if ids.len() < need || llm.tokenizer.encode(&prefix)? != ids {
            continue;
        }
        progress(&format!("{} ({:?})", f.name, f.kind));
        let (context, continuation) = (&ids[..o.context_tokens], &ids[o.context_tokens..need]);
        let llm_kv = llm.prefill_kv(context)?;
        let t0 = Instant::now();
        let own = slm.prefill_kv(context)?;
        let own_ms = t0.elapsed().as_secs_f64() * 1e3;
        let projected = alignment.project(&llm_kv)?;
        let reference = score(llm, Some(&llm_kv), None, continuation)?;

        // The exact KV is the SLM's own (a lossless stream equals a local prefill): one score, two costs.
        let exact = score(slm, Some(&own), None, continuation)?;
        let mut runs: Vec<(Scored, f64)> = vec![
            (score(slm, None, None, continuation)?, 0.0),
            (exact.clone(), own_ms),
            (exact.clone(), 0.0),
            (score(slm, Some(&projected), None, continuation)?, 0.0),
        ];
        for &k in &splits {
            let (kv, ms) = split(slm, context, &projected, k)?;
            runs.push((score(slm, Some(&kv), None, continuation)?, ms));
        }
        let fused = match fused_layers {
            0 => exact,
            _ => score(
                slm,
                Some(&own),
                Some((&projected, &alignment.gates)),
                continuation,
            )?,
        };
        runs.push((fused, own_ms));
        let reference_top = reference.top.clone();
        runs.push((reference, 0.0));
        for (i, (s, ms)) in runs.iter().enumerate() {
            nll[i] += s.nll;
            agree[i] += s
                .top
                .iter()
                .zip(&reference_top)
                .filter(|(a, b)| a == b)
                .count();
            compute[i] += ms;
        }
        count += continuation.len() - 1;
        files += 1;
    }
    anyhow::ensure!(files > 0, "no held-out file holds {need} tokens");
    let modes = modes
        .into_iter()
        .enumerate()
        .map(|(i, (mode, bytes))| ModeResult {
            mode,
            perplexity: (nll[i] / count as f64).exp(),
            agreement: agree[i] as f64 / count as f64,
            wire_bytes_per_token: bytes,
            edge_compute_ms: compute[i] / files as f64,
        })
        .collect();
    Ok(Evaluation { files, modes })
}

/// The results as a markdown table, with the honesty rule applied: modes worse than the SLM with its own KV say so.
pub fn markdown(e: &Evaluation, o: &EvalOptions, alignment_id: &str) -> String {
    let (results, files) = (&e.modes, e.files);
    let exact = results
        .iter()
        .find(|r| r.mode.starts_with("SLM + exact"))
        .map_or(f64::NAN, |r| r.perplexity);
    // Modes that carry the context: compared with the SLM's own reading of it.
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Held-out files: {files}, each {} context tokens + {} continuation tokens (scored teacher-forced); \
         alignment {alignment_id}.\n",
        o.context_tokens, o.continuation_tokens
    );
    let _ = writeln!(
        out,
        "| mode | perplexity | top-1 agreement with the LLM | wire bytes / context token (f16) | edge context compute | vs SLM + exact KV |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | --- |");
    for r in results {
        let verdict = if r.mode.starts_with("SLM + exact")
            || r.mode.starts_with("SLM alone")
            || r.mode == "LLM alone"
        {
            String::new()
        } else {
            let change = 100.0 * (r.perplexity / exact - 1.0);
            // Within a percent is within the noise of a few thousand scored tokens.
            let word = match change {
                c if c.abs() < 1.0 => "about the same",
                c if c > 0.0 => "worse",
                _ => "better",
            };
            format!("{word} ({change:+.1}%)")
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {:.1}% | {:.0} | {:.0} ms | {verdict} |",
            r.mode,
            r.perplexity,
            100.0 * r.agreement,
            r.wire_bytes_per_token,
            r.edge_compute_ms
        );
    }
    out
}

/// A bar chart of perplexity per mode, as SVG.
pub fn svg(results: &[ModeResult]) -> String {
    let (w, row, left) = (760.0, 28.0, 300.0);
    let h = 40.0 + row * results.len() as f64;
    let max = results.iter().map(|r| r.perplexity).fold(1.0, f64::max);
    let mut out = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{left}' y='16'>perplexity of held-out continuations (lower is better)</text>"
    );
    for (i, r) in results.iter().enumerate() {
        let y = 28.0 + row * i as f64;
        let bw = (w - left - 80.0) * r.perplexity / max;
        let _ = write!(
            out,
            "<text x='{}' y='{}' text-anchor='end'>{}</text><rect x='{left}' y='{y}' width='{bw:.1}' height='{}' \
             fill='#2a788e'/><text x='{}' y='{}'>{:.2}</text>",
            left - 6.0,
            y + 15.0,
            r.mode.replace('&', "&amp;"),
            row - 8.0,
            left + bw + 4.0,
            y + 15.0,
            r.perplexity
        );
    }
    out + "</svg>"
}
