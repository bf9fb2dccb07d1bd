//! Helpers shared by tandem's end-to-end tests: loading the cached models, reading llama.cpp fixtures, and writing
//! small synthetic GGUF files.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tandem_common::engine::{Engine, default_device};
use tandem_common::gguf::Gguf;
use tandem_common::models;

pub mod bench;
pub mod browser;
pub mod capture;
pub mod cloud;
pub mod faults;
pub mod gguf_writer;
pub mod http;
pub mod llamacpp;
pub mod parity;
pub mod raw_ws;
pub mod redis;
pub mod rng;
pub mod shaper;
pub mod soak;
pub mod tokens;

/// A model from the cache, loaded once per test binary. Panics with the fetch command if it is missing.
pub fn engine(name: &str) -> &'static Engine {
    static SMOL: OnceLock<Engine> = OnceLock::new();
    static QWEN05: OnceLock<Engine> = OnceLock::new();
    static QWEN15: OnceLock<Engine> = OnceLock::new();
    let cell = match name {
        "smollm2" => &SMOL,
        "qwen-0.5b" => &QWEN05,
        "qwen-1.5b" => &QWEN15,
        other => panic!("no test model {other}"),
    };
    cell.get_or_init(|| {
        let path = models::resolve(name).unwrap_or_else(|e| panic!("{e}"));
        Engine::open(&path, &default_device()).unwrap_or_else(|e| panic!("loading {name}: {e}"))
    })
}

/// The parsed GGUF of a cached model.
pub fn gguf(name: &str) -> Gguf {
    Gguf::open(&models::resolve(name).unwrap_or_else(|e| panic!("{e}")))
        .expect("cached model parses")
}

/// Raw bytes of a cached model file.
pub fn model_bytes(name: &str) -> Arc<Vec<u8>> {
    Arc::new(
        std::fs::read(models::resolve(name).unwrap_or_else(|e| panic!("{e}"))).expect("readable"),
    )
}

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (as `just` sets it), else the repository's `target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from)
}

pub fn fixture_path(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(file)
}

#[derive(serde::Deserialize)]
pub struct LlamaCppFixture {
    pub model: String,
    pub tokenize: Vec<TokenizeCase>,
    pub greedy: Vec<GreedyRun>,
}

#[derive(serde::Deserialize)]
pub struct TokenizeCase {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
pub struct GreedyRun {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub steps: Vec<GreedyStep>,
}

#[derive(serde::Deserialize)]
pub struct GreedyStep {
    pub top_ids: Vec<u32>,
    pub top_logits: Vec<f32>,
}

pub fn llamacpp_fixture(model: &str) -> LlamaCppFixture {
    let file = match model {
        "smollm2" => "llamacpp_smollm2.json",
        "qwen-0.5b" => "llamacpp_qwen05b.json",
        other => panic!("no fixture for {other}"),
    };
    let f: LlamaCppFixture =
        serde_json::from_str(&std::fs::read_to_string(fixture_path(file)).expect("fixture exists"))
            .expect("fixture parses");
    assert_eq!(f.model, model);
    f
}

/// Greedy answers of the small model to one question about a shared context: computed here, or with the context's
/// KV from a cloud. Tests compare the two — a lossless cloud path must give exactly the local answer.
pub mod answers {
    use std::time::Duration;

    use tandem_common::codec::Codec;
    use tandem_common::engine::GenerateOptions;
    use tandem_common::tokenizer::Message;
    use tandem_edge::chat::{CloudContext, ContextSource, KvSource, chat_turn};

    fn turn(source: &ContextSource, question: &str) -> (Vec<u32>, KvSource) {
        let opts = GenerateOptions {
            max_tokens: 16,
            ..Default::default()
        };
        let q = [Message::new("user", question)];
        let (ids, st) = chat_turn(super::engine("smollm2"), source, &q, &opts, |_, _| {})
            .unwrap_or_else(|e| panic!("chat turn: {e}"));
        (ids, st.source)
    }

    /// The answer with `context` prefilled on this machine.
    pub fn local(context: &str, question: &str) -> Vec<u32> {
        let source = ContextSource {
            cloud: None,
            text: Some(context.into()),
        };
        turn(&source, question).0
    }

    /// Context `id` of the small model on `cloud_url`, asked for losslessly with `token`.
    pub fn cloud_context(cloud_url: &str, id: &str, token: Option<String>) -> CloudContext {
        CloudContext {
            cloud_url: cloud_url.into(),
            model: "smollm2".into(),
            context: id.into(),
            codec: Some(Codec::Lossless),
            mode: Default::default(),
            bandwidth_bps: None,
            auth: token,
            timeout: Duration::from_secs(30),
        }
    }

    /// The answer with context `id`'s KV streamed losslessly from `cloud_url`, and where the KV came from.
    pub fn from_cloud(
        cloud_url: &str,
        id: &str,
        token: Option<String>,
        question: &str,
    ) -> (Vec<u32>, KvSource) {
        let source = ContextSource {
            cloud: Some(cloud_context(cloud_url, id, token)),
            text: None,
        };
        turn(&source, question)
    }
}
