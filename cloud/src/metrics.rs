//! Counters the server exposes at `GET /metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Metrics {
    pub http_requests: AtomicU64,
    pub kv_sessions: AtomicU64,
    pub kv_sessions_active: AtomicU64,
    pub kv_bytes_streamed: AtomicU64,
    pub kv_layers_streamed: AtomicU64,
    pub kv_layers_left_to_edges: AtomicU64,
    pub kv_errors: AtomicU64,
    pub store_hits: AtomicU64,
    pub store_misses: AtomicU64,
    pub contexts_prefilled: AtomicU64,
    /// Contexts the LLM prefilled and an alignment projected for edges (split and fused modes).
    pub contexts_projected: AtomicU64,
    pub prefill_tokens: AtomicU64,
    pub prefill_ms: AtomicU64,
    pub completions: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub upstream_pulls: AtomicU64,
    pub unauthorized: AtomicU64,
    pub busy: AtomicU64,
    pub rate_limited_ms: AtomicU64,
    pub stalled_sessions: AtomicU64,
}

/// Counts an active KV session for as long as it lives.
pub struct ActiveSession<'a>(&'a Metrics);

impl<'a> ActiveSession<'a> {
    pub fn start(m: &'a Metrics) -> Self {
        m.kv_sessions.fetch_add(1, Relaxed);
        m.kv_sessions_active.fetch_add(1, Relaxed);
        ActiveSession(m)
    }
}

impl Drop for ActiveSession<'_> {
    fn drop(&mut self) {
        self.0.kv_sessions_active.fetch_sub(1, Relaxed);
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let rows: [(&str, &str, &str, &AtomicU64); 20] = [
            (
                "tandem_unauthorized_total",
                "counter",
                "calls refused for a missing, wrong or expired token",
                &self.unauthorized,
            ),
            (
                "tandem_busy_total",
                "counter",
                "calls refused because their client held its stream limit",
                &self.busy,
            ),
            (
                "tandem_rate_limited_ms_total",
                "counter",
                "milliseconds KV streams waited on their client's byte-rate limit",
                &self.rate_limited_ms,
            ),
            (
                "tandem_kv_sessions_stalled_total",
                "counter",
                "KV sessions closed because their edge stopped reading",
                &self.stalled_sessions,
            ),
            (
                "tandem_http_requests_total",
                "counter",
                "HTTP requests served",
                &self.http_requests,
            ),
            (
                "tandem_kv_sessions_total",
                "counter",
                "KV WebSocket sessions opened",
                &self.kv_sessions,
            ),
            (
                "tandem_kv_sessions_active",
                "gauge",
                "KV WebSocket sessions open now",
                &self.kv_sessions_active,
            ),
            (
                "tandem_kv_bytes_streamed_total",
                "counter",
                "KV payload bytes sent to edges",
                &self.kv_bytes_streamed,
            ),
            (
                "tandem_kv_layers_streamed_total",
                "counter",
                "KV layer chunks sent to edges",
                &self.kv_layers_streamed,
            ),
            (
                "tandem_kv_layers_left_to_edges_total",
                "counter",
                "context layers edges computed themselves while the others streamed",
                &self.kv_layers_left_to_edges,
            ),
            (
                "tandem_kv_errors_total",
                "counter",
                "KV sessions ended by an Error frame",
                &self.kv_errors,
            ),
            (
                "tandem_store_hits_total",
                "counter",
                "context lookups found in the store",
                &self.store_hits,
            ),
            (
                "tandem_store_misses_total",
                "counter",
                "context lookups not found",
                &self.store_misses,
            ),
            (
                "tandem_contexts_prefilled_total",
                "counter",
                "contexts prefilled",
                &self.contexts_prefilled,
            ),
            (
                "tandem_contexts_projected_total",
                "counter",
                "contexts the LLM prefilled and an alignment projected for edges",
                &self.contexts_projected,
            ),
            (
                "tandem_prefill_tokens_total",
                "counter",
                "context tokens prefilled",
                &self.prefill_tokens,
            ),
            (
                "tandem_prefill_milliseconds_total",
                "counter",
                "time spent prefilling contexts",
                &self.prefill_ms,
            ),
            (
                "tandem_completions_total",
                "counter",
                "chat completions served",
                &self.completions,
            ),
            (
                "tandem_completion_tokens_total",
                "counter",
                "tokens generated for completions",
                &self.completion_tokens,
            ),
            (
                "tandem_upstream_pulls_total",
                "counter",
                "contexts pulled from the upstream cloud (a gateway's cache misses)",
                &self.upstream_pulls,
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Relaxed)
            );
        }
        out
    }
}
