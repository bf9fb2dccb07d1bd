//! Projected contexts: for an edge that asks for the cloud LLM's reading of a context (split and fused modes), the
//! server prefills the context's tokens with the LLM, projects that KV into the edge model's space with a fitted
//! [`Alignment`], and keeps the result in the context store beside the exact KV (computed once per context and
//! alignment, then streamed in any codec like any other context).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use anyhow::Context;
use tandem_common::codec::RopeParams;
use tandem_common::wire::Projection;

use crate::align::Alignment;
use crate::server::{App, Served};
use crate::store::{ContextRecord, StoredContext};

/// An alignment this server projects with, between two of its served models.
pub struct Aligned {
    pub alignment: Alignment,
    /// The alignment's id (the hash of its file).
    pub id: String,
    /// Indices into [`App::models`].
    pub llm: usize,
    pub slm: usize,
}

/// Loads the alignment at `path` and finds its two models among `models` by weights fingerprint.
pub fn load(path: &std::path::Path, models: &[Served]) -> anyhow::Result<Aligned> {
    let alignment = Alignment::load(path).with_context(|| format!("{}", path.display()))?;
    let find = |which: &str, fingerprint: &str| {
        models
            .iter()
            .position(|m| m.engine.model.fingerprint() == fingerprint)
            .with_context(|| {
                format!(
                    "alignment {} needs its {which} (weights {fingerprint}) among the served models: add it with \
                     --model",
                    path.display()
                )
            })
    };
    let llm = find("LLM", &alignment.llm.fingerprint)?;
    let slm = find("SLM", &alignment.slm.fingerprint)?;
    Ok(Aligned {
        id: alignment.id(),
        alignment,
        llm,
        slm,
    })
}

/// The store id of context `context` projected by alignment `alignment` (not a valid id of a registered context,
/// which is plain hex).
pub fn projected_id(context: &str, alignment: &str) -> String {
    format!("{context}-{alignment}")
}

pub fn is_projected(id: &str) -> bool {
    id.contains('-')
}

impl Aligned {
    /// What an edge is told about chunks this alignment made.
    pub fn projection(&self, app: &App) -> Projection {
        Projection {
            alignment: self.id.clone(),
            llm: app.models[self.llm].name.clone(),
            gates: self.alignment.gates.clone(),
        }
    }
}

/// The alignment whose SLM is `slm` (a served model's name), if this server has one.
pub fn for_edge<'a>(app: &'a App, slm: &str) -> Option<&'a Aligned> {
    app.alignments
        .iter()
        .find(|a| app.models[a.slm].name == slm)
}

/// `ctx` (the edge model's own context) as the LLM reads it, projected: from the store, or computed now.
pub async fn projected(
    app: &Arc<App>,
    ctx: &StoredContext,
    aligned: &Aligned,
) -> Result<Arc<StoredContext>, String> {
    let id = projected_id(&ctx.record.id, &aligned.id);
    // One projection at a time: a second edge asking for the same one waits and finds it stored.
    let _one = app.projection_lock.lock().await;
    if let Some(found) = app.stored(&id).await {
        return Ok(found);
    }
    let (llm, slm) = (&app.models[aligned.llm], &app.models[aligned.slm]);
    let (engine, tokens) = (llm.engine.clone(), ctx.record.kv.tokens.clone());
    let alignment = aligned.alignment.clone();
    let t0 = Instant::now();
    let kv = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let llm_kv = engine.prefill_kv(&tokens)?;
        Ok(alignment.project(&llm_kv)?)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("projecting with {}: {e:#}", llm.name))?;
    let prefill_ms = t0.elapsed().as_millis() as u64;
    app.metrics.contexts_projected.fetch_add(1, Relaxed);
    tracing::info!(%id, llm = %llm.name, prefill_ms, "context projected");
    let stored = Arc::new(StoredContext::new(ContextRecord {
        id,
        model: slm.name.clone(),
        rope: RopeParams::of(slm.engine.model.config()),
        kv,
        prefill_ms,
        text: None,
        query_energy: None,
        step_scales: slm.step_scales.clone(),
    }));
    app.keep(stored.clone()).await;
    Ok(stored)
}
