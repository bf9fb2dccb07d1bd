//! A server with an upstream cloud is a KV cache for the edges near it (a gateway): a context it does not hold is
//! fetched from upstream once, losslessly, kept in its store, and streamed from there to every edge that asks.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tandem_common::codec::{Codec, RopeParams};
use tandem_common::kv::KvState;
use tandem_common::wire::ErrorCode;
use tandem_edge::protocol::{CloudContext, FetchError};

use crate::server::{App, Served};
use crate::store::{ContextRecord, StoredContext};

/// Where a server gets the contexts it does not hold.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The upstream cloud's base URL, `http://host:port`.
    pub url: String,
    /// Its bearer token, when it asks for one.
    pub auth: Option<String>,
    /// Longest wait for the connection, the header, and each layer.
    pub timeout: Duration,
}

impl App {
    /// Context `id` of `served`'s model: from the store, else from upstream (kept for the next edge).
    /// `Ok(None)`: neither has it.
    pub async fn context_or_pull(
        self: &Arc<Self>,
        served: &Served,
        id: &str,
    ) -> Result<Option<Arc<StoredContext>>, String> {
        if let Some(c) = self.context(id).await {
            return Ok(Some(c));
        }
        let Some(up) = self.upstream.clone() else {
            return Ok(None);
        };
        // One pull at a time: an edge that asks while another's pull of the same context is under way waits for
        // it and then finds the context here, instead of causing a second transfer.
        let _one_at_a_time = self.upstream_lock.lock().await;
        if let Some(c) = self.stored(id).await {
            return Ok(Some(c));
        }
        let (engine, model, context) = (served.engine.clone(), served.name.clone(), id.to_string());
        let pulled = tokio::task::spawn_blocking(move || {
            let cloud = CloudContext {
                cloud_url: up.url,
                model: model.clone(),
                context: context.clone(),
                codec: Some(Codec::Lossless),
                mode: Default::default(),
                bandwidth_bps: None,
                auth: up.auth,
                timeout: up.timeout,
            };
            pull(&cloud, &engine).map(|kv| {
                kv.map(|kv| ContextRecord {
                    id: context,
                    model,
                    kv,
                    rope: RopeParams::of(engine.model.config()),
                    prefill_ms: 0,
                    text: None,
                    query_energy: None,
                    step_scales: None,
                })
            })
        })
        .await
        .map_err(|e| format!("upstream fetch failed: {e}"))??;
        let Some(record) = pulled else {
            return Ok(None);
        };
        self.metrics.upstream_pulls.fetch_add(1, Relaxed);
        let stored = Arc::new(StoredContext::new(record));
        self.keep(stored.clone()).await;
        Ok(Some(stored))
    }
}

/// The whole KV of `cloud`'s context (all layers, lossless); `None` when upstream does not know it.
fn pull(
    cloud: &CloudContext,
    engine: &tandem_common::engine::Engine,
) -> Result<Option<KvState>, String> {
    let started = std::time::Instant::now();
    let mut incoming = match tandem_edge::fetch::start(cloud.fetch_request(engine), started) {
        Ok(i) => i,
        Err(FetchError::Refused {
            code: ErrorCode::UnknownContext,
            ..
        }) => return Ok(None),
        Err(e) => return Err(format!("upstream {}: {e}", cloud.cloud_url)),
    };
    let mut kv = incoming.header.clone();
    for l in 0..engine.model.config().n_layers {
        let layer = incoming
            .layer(l, started)
            .map_err(|e| format!("upstream {}: layer {l}: {e}", cloud.cloud_url))?;
        kv.layers.push(layer);
    }
    kv.validate().map_err(|e| e.to_string())?;
    Ok(Some(kv))
}
