//! The systems compared, each answering one request end to end: edge-only, cloud-only, and tandem without
//! pipelining, without compression, and in full.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use std::time::Instant;
use tandem_common::codec::Codec;
use tandem_common::engine::{Engine, GenerateOptions};
use tandem_common::tokenizer::Message;
use tandem_edge::chat::{ChatError, CloudContext, ContextSource, KvSource, TurnStats, start_turn};
use tandem_edge::fetch;
use tandem_edge::incoming::{ArrivedLayer, IncomingKv};
use tandem_edge::protocol::{FetchError, FetchRequest};

use super::sse::stream_chat;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum System {
    /// The context prefilled on the edge, no cloud.
    EdgeOnly,
    /// `/v1/chat/completions` with the context's cached KV: the cloud generates, tokens stream to the edge.
    CloudOnly,
    /// Context KV from the cloud (adaptive codec), every layer received before the prompt is computed.
    TandemSequential,
    /// Context KV pipelined with the prompt, lossless (no compression).
    TandemLossless,
    /// Pipelined, adaptive codec.
    TandemFull,
}

impl System {
    pub const ALL: [System; 5] = [
        System::EdgeOnly,
        System::CloudOnly,
        System::TandemSequential,
        System::TandemLossless,
        System::TandemFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            System::EdgeOnly => "edge-only",
            System::CloudOnly => "cloud-only",
            System::TandemSequential => "tandem, no pipelining",
            System::TandemLossless => "tandem, no compression",
            System::TandemFull => "tandem full",
        }
    }
}

/// One request as measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub system: System,
    pub link: String,
    /// The context length asked for (the nominal bucket: 512, 2048, …).
    pub context_tokens: usize,
    pub prompt_tokens: usize,
    pub answer_tokens: usize,
    pub ttft_s: f64,
    /// Mean time per output token after the first.
    pub tpot_s: f64,
    pub e2e_s: f64,
    /// Context KV payload on the wire (0 for edge-only and cloud-only).
    pub kv_bytes: u64,
    /// When the context's last KV layer had arrived, from the start of the request.
    pub kv_done_s: f64,
    pub codec: Option<String>,
    /// The lowest context layers the cloud left to the edge to compute (a slow link).
    pub local_layers: usize,
    /// Why the edge computed the context itself although a cloud was asked (a correct answer, counted apart).
    pub fallback: Option<String>,
    pub error: Option<String>,
    /// Edge compute replayed from measured rates instead of run (many edges, one machine).
    pub replayed: bool,
    /// CPU seconds the cloud process spent while this request ran (set by the harness where requests run alone).
    pub cloud_cpu_s: f64,
}

impl Sample {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    fn failed(system: System, r: &Request, error: String) -> Sample {
        Sample {
            system,
            link: r.link.to_string(),
            context_tokens: r.context_tokens,
            prompt_tokens: 0,
            answer_tokens: 0,
            ttft_s: 0.0,
            tpot_s: 0.0,
            e2e_s: 0.0,
            kv_bytes: 0,
            kv_done_s: 0.0,
            codec: None,
            local_layers: 0,
            fallback: None,
            error: Some(error),
            replayed: false,
            cloud_cpu_s: 0.0,
        }
    }
}

/// One user's request.
pub struct Request<'a> {
    pub engine: &'a Engine,
    pub model: &'a str,
    pub link: &'a str,
    /// The cloud as the edge reaches it (through the emulated link).
    pub cloud: SocketAddr,
    pub bits_per_s: f64,
    pub context_id: &'a str,
    pub context_text: &'a str,
    pub context_tokens: usize,
    pub user: String,
    pub answer_tokens: usize,
}

impl Request<'_> {
    fn messages(&self) -> Vec<Message> {
        vec![Message::new("user", &self.user)]
    }

    fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.answer_tokens,
            stop_at_eos: false,
            ..Default::default()
        }
    }

    pub fn cloud_context(&self, codec: Option<Codec>) -> CloudContext {
        CloudContext {
            cloud_url: format!("http://{}", self.cloud),
            model: self.model.to_string(),
            context: self.context_id.to_string(),
            codec,
            mode: Default::default(),
            bandwidth_bps: Some(self.bits_per_s as u64),
            auth: None,
            timeout: Duration::from_secs(300),
        }
    }
}

/// Answers `r` with `system`.
pub fn run(system: System, r: &Request) -> Sample {
    let result = match system {
        System::CloudOnly => return cloud_only(r),
        System::EdgeOnly => turn(r, None, &fetch::start),
        System::TandemFull => turn(r, Some(r.cloud_context(None)), &fetch::start),
        System::TandemLossless => turn(
            r,
            Some(r.cloud_context(Some(Codec::Lossless))),
            &fetch::start,
        ),
        System::TandemSequential => turn(r, Some(r.cloud_context(None)), &fetch_everything_first),
    };
    match result {
        Ok(st) => {
            let g = &st.generate;
            let (codec, fallback) = match &st.source {
                KvSource::Cloud { codec, .. } => (Some(codec.to_string()), None),
                KvSource::Local { reason } if system != System::EdgeOnly => {
                    (None, Some(reason.clone()))
                }
                _ => (None, None),
            };
            Sample {
                system,
                link: r.link.to_string(),
                context_tokens: r.context_tokens,
                prompt_tokens: g.prompt_tokens,
                answer_tokens: g.generated_tokens,
                ttft_s: st.ttft.as_secs_f64(),
                tpot_s: g.decode_time.as_secs_f64()
                    / g.generated_tokens.saturating_sub(1).max(1) as f64,
                e2e_s: (st.ttft + g.decode_time).as_secs_f64(),
                kv_bytes: st.kv.kv_bytes as u64,
                kv_done_s: st.kv.done_after.as_secs_f64(),
                codec,
                local_layers: st.kv.local_layers,
                fallback,
                error: None,
                replayed: false,
                cloud_cpu_s: 0.0,
            }
        }
        Err(e) => Sample::failed(system, r, e.to_string()),
    }
}

fn turn(
    r: &Request,
    cloud: Option<CloudContext>,
    connect: &tandem_edge::incoming::Connect<'_>,
) -> Result<TurnStats, ChatError> {
    let source = ContextSource {
        cloud,
        text: Some(r.context_text.to_string()),
    };
    let mut t = start_turn(r.engine, &source, &r.messages(), &r.options(), connect)?;
    while t.next_token()?.is_some() {}
    Ok(t.finish().1)
}

/// The fetch without pipelining: every layer is received (and decoded) before the computation gets the first (layers
/// the cloud leaves to the edge are computed after that, too).
fn fetch_everything_first(req: FetchRequest, t0: Instant) -> Result<IncomingKv, FetchError> {
    let layers = req.layers as usize;
    let mut f = fetch::start(req, t0)?;
    let mut arrived = std::collections::VecDeque::new();
    for l in f.header.first_layer..layers {
        let kv = f.layer(l, t0).map_err(FetchError::Protocol)?;
        let wire_bytes = f.stats.timeline.last().map_or(0, |t| t.wire_bytes);
        arrived.push_back(ArrivedLayer {
            layer: l,
            kv,
            wire_bytes,
        });
    }
    let next = Box::new(move || {
        arrived
            .pop_front()
            .ok_or_else(|| "no more layers".to_string())
    });
    Ok(IncomingKv::new(
        f.header,
        f.codec,
        f.projection,
        f.stats.header_after,
        next,
    ))
}

/// The cloud generates; the edge only reads the token stream.
fn cloud_only(r: &Request) -> Sample {
    let body = serde_json::json!({
        "model": r.model, "messages": r.messages(), "context": r.context_id, "stream": true,
        "stream_options": { "include_usage": true }, "max_tokens": r.answer_tokens, "ignore_eos": true,
        "temperature": 0,
    });
    match stream_chat(r.cloud, &body, Duration::from_secs(900)) {
        Ok(s) => {
            let prompt_tokens = r
                .engine
                .tokenizer
                .chat_tokens(&r.messages(), true)
                .map_or(0, |t| t.len());
            Sample {
                system: System::CloudOnly,
                link: r.link.to_string(),
                context_tokens: r.context_tokens,
                prompt_tokens,
                answer_tokens: s.completion_tokens,
                ttft_s: s.ttft.as_secs_f64(),
                tpot_s: (s.total - s.ttft).as_secs_f64()
                    / s.completion_tokens.saturating_sub(1).max(1) as f64,
                e2e_s: s.total.as_secs_f64(),
                kv_bytes: 0,
                kv_done_s: 0.0,
                codec: None,
                local_layers: 0,
                fallback: None,
                error: None,
                replayed: false,
                cloud_cpu_s: 0.0,
            }
        }
        Err(e) => Sample::failed(System::CloudOnly, r, e),
    }
}

/// An edge on its own device, for runs with more edges than this machine has cores: the context's KV is fetched
/// and decoded for real (the cloud's and the link's share), and the edge's prompt prefill and decode — which run
/// on the user's device, not the cloud — take the time measured for one edge on this machine (`rates`), counted
/// after the last layer arrived (no credit for pipelining, and every layer streams: no split).
pub fn replayed_tandem(r: &Request, rates: &EdgeRates) -> Sample {
    let t0 = Instant::now();
    let fetched = (|| -> Result<(u64, String, Duration), String> {
        let mut f = fetch::start(r.cloud_context(None).fetch_request(r.engine), t0)
            .map_err(|e| e.to_string())?;
        for l in 0..r.engine.model.config().n_layers {
            f.layer(l, t0)?;
        }
        Ok((
            f.stats.kv_bytes as u64,
            f.codec.to_string(),
            f.stats.done_after,
        ))
    })();
    match fetched {
        Ok((kv_bytes, codec, kv_done)) => {
            let prompt_tokens = r
                .engine
                .tokenizer
                .chat_tokens(&r.messages(), true)
                .map_or(0, |t| t.len());
            let ttft = kv_done.as_secs_f64() + prompt_tokens as f64 / rates.prefill_tokens_per_s;
            let decode = (r.answer_tokens - 1) as f64 * rates.seconds_per_token;
            Sample {
                system: System::TandemFull,
                link: r.link.to_string(),
                context_tokens: r.context_tokens,
                prompt_tokens,
                answer_tokens: r.answer_tokens,
                ttft_s: ttft,
                tpot_s: rates.seconds_per_token,
                e2e_s: ttft + decode,
                kv_bytes,
                kv_done_s: kv_done.as_secs_f64(),
                codec: Some(codec),
                local_layers: 0,
                fallback: None,
                error: None,
                replayed: true,
                cloud_cpu_s: 0.0,
            }
        }
        Err(e) => Sample::failed(System::TandemFull, r, e),
    }
}

/// One edge's compute speed with a context attached, measured on this machine.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct EdgeRates {
    pub prefill_tokens_per_s: f64,
    pub seconds_per_token: f64,
}

impl EdgeRates {
    /// Prefills a `prompt_tokens` prompt after `context` and decodes `decode` tokens, best of two.
    pub fn measure(
        e: &Engine,
        context: &tandem_common::kv::KvState,
        prompt: &[u32],
        decode: usize,
    ) -> EdgeRates {
        let mut best = EdgeRates {
            prefill_tokens_per_s: 0.0,
            seconds_per_token: f64::MAX,
        };
        for _ in 0..2 {
            let mut s = e.session();
            s.attach_context(context).expect("the context attaches");
            let t = std::time::Instant::now();
            let mut logits = s.prefill(prompt).expect("prefill");
            let prefill = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            for _ in 0..decode {
                let next = tandem_common::sample::argmax(&logits);
                logits = s.decode(next).expect("decode");
            }
            best.prefill_tokens_per_s =
                best.prefill_tokens_per_s.max(prompt.len() as f64 / prefill);
            best.seconds_per_token = best
                .seconds_per_token
                .min(t.elapsed().as_secs_f64() / decode as f64);
        }
        best
    }
}
