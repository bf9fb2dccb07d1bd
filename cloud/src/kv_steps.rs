//! A model's calibrated step scales for the `pca` codecs ([`StepScales`]): measured once by `tandem calibrate`,
//! kept beside the model's weights as `<weights file>.kv-steps.json`, and used by every server that loads that model.
//!
//! The measurement: a context's exact KV and three questions' exact greedy runs after it; then, for each layer,
//! its keys alone (then its values alone) coded with pca2, the rest exact, and how far that moves the log
//! probabilities of the runs' tokens (teacher-forced).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tandem_common::codec::{Codec, LayerStep, StepScales};
use tandem_common::engine::{Engine, EngineError};
use tandem_common::quant::Precision;

use crate::codec_report::Probe;

/// What `tandem calibrate` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepProfile {
    /// The weights it was measured on ([`Model::fingerprint`](tandem_common::model::Model::fingerprint)).
    pub model: String,
    pub context_tokens: usize,
    /// Teacher-forced tokens scored per measurement.
    pub probe_tokens: usize,
    /// Mean |Δ log p| with one layer's keys (values) coded at the probe step, all else exact.
    pub key_sensitivity: Vec<f64>,
    pub value_sensitivity: Vec<f64>,
    pub scales: StepScales,
}

/// The codec each tensor is coded with while its sensitivity is measured, at its own step: near the steps the
/// profile is used at. Damage measured far coarser ranks layers differently (on Qwen2.5-Coder-0.5B, a profile
/// probed at twice pca2's step left pca3 with a mean |Δ log p| of 0.029 on the README, this one 0.019).
const PROBE: Codec = Codec::Pca2;

/// Questions asked after the calibration context.
pub const QUESTIONS: [&str; 3] = [
    "Summarise the context in two sentences.",
    "What is the most important detail in the context?",
    "Write one question a reader might ask about it.",
];

/// Where a model's profile lives: beside its weights.
pub fn path_for(weights: &Path) -> PathBuf {
    let mut name = weights.as_os_str().to_owned();
    name.push(".kv-steps.json");
    PathBuf::from(name)
}

/// Measures every layer's sensitivity on `context` (tokens), `steps` tokens per question; `progress(done, total)`
/// after each measurement.
pub fn calibrate(
    engine: &Engine,
    context: &[u32],
    questions: &[&str],
    steps: usize,
    precision: Precision,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<StepProfile, EngineError> {
    let probe = Probe::new(engine, context, questions, steps, precision)?;
    let layers = probe.exact.layers.len();
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut done = 0;
    for l in 0..layers {
        let coded = probe.decode(PROBE, &probe.encode(PROBE, l, LayerStep::default()));
        for (keys_coded, out) in [(true, &mut keys), (false, &mut values)] {
            let mut kv = probe.exact.clone();
            match keys_coded {
                true => kv.layers[l].k = coded.k.clone(),
                false => kv.layers[l].v = coded.v.clone(),
            }
            out.push(probe.score(&kv)?.logprob_shift);
            done += 1;
            progress(done, 2 * layers);
        }
    }
    Ok(StepProfile {
        model: engine.model.fingerprint().to_string(),
        context_tokens: probe.exact.len(),
        probe_tokens: probe.scored_tokens(),
        scales: StepScales::from_sensitivity(&keys, &values),
        key_sensitivity: keys,
        value_sensitivity: values,
    })
}

impl StepProfile {
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(tmp, path)
    }

    /// The profile beside `weights`, if there is one ([`load`](Self::load)).
    pub fn load_for(weights: &Path, engine: &Engine) -> anyhow::Result<Option<StepProfile>> {
        let path = path_for(weights);
        match path.try_exists() {
            Ok(false) => Ok(None),
            _ => Self::load(&path, engine).map(Some),
        }
    }

    /// The profile in `path`; an error names what is wrong with one that does not fit `engine`'s model.
    pub fn load(path: &Path, engine: &Engine) -> anyhow::Result<StepProfile> {
        let bytes =
            std::fs::read(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        let p: StepProfile = serde_json::from_slice(&bytes)
            .map_err(|e| anyhow::anyhow!("{} is not a step profile: {e}", path.display()))?;
        let layers = engine.model.config().n_layers;
        anyhow::ensure!(
            p.model == engine.model.fingerprint(),
            "{} was measured on other weights ({}) than these ({}): run `tandem calibrate` again",
            path.display(),
            p.model,
            engine.model.fingerprint()
        );
        anyhow::ensure!(
            p.scales.keys.len() == layers && p.scales.values.len() == layers,
            "{} has scales for {} layers, the model has {layers}",
            path.display(),
            p.scales.keys.len()
        );
        anyhow::ensure!(
            (p.scales.keys.iter().chain(&p.scales.values)).all(|s| s.is_finite() && *s > 0.0),
            "{} holds a scale that is not a positive number",
            path.display()
        );
        Ok(p)
    }
}
