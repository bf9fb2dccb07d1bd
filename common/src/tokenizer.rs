//! The tokenizer, built from a GGUF file's own vocabulary (byte-level BPE for Qwen2 and SmolLM2), and the ChatML
//! chat template both model families use.
//!
//! Pre-tokenization follows llama.cpp's per-model rules (`tokenizer.ggml.pre`), and control / user-defined tokens
//! are matched as special tokens in the text, so ids equal llama.cpp's `tokenize(text, special = true)`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::gguf::{Gguf, GgufError, Value};

/// Qwen2's split pattern (llama.cpp `LLAMA_VOCAB_PRE_TYPE_QWEN2`).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split pattern, used after splitting digits for SmolLM (`LLAMA_VOCAB_PRE_TYPE_SMOLLM`).
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// GGUF token types.
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer model {0:?} is not supported (only byte-level BPE, \"gpt2\")")]
    UnsupportedModel(String),
    #[error("pre-tokenizer {0:?} is not supported (known: qwen2, smollm, gpt2)")]
    UnsupportedPre(String),
    #[error("tokenizer metadata: {0}")]
    Gguf(#[from] GgufError),
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("token id {0} is outside the vocabulary")]
    BadId(u32),
}

fn tk_err(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Tokenizers(e.to_string())
}

/// A ready tokenizer plus the ids the generation loop needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos: Option<u32>,
    pub add_bos: bool,
    /// Ids that end a generation: the file's EOS, ChatML's `<|im_end|>` and `<|endoftext|>`.
    pub stop_ids: Vec<u32>,
    vocab_size: usize,
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self, TokenizerError> {
        let model = g.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        let pre = g.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let tokens = g.get_strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match g.get_array("tokenizer.ggml.token_type") {
            Ok(a) => a
                .iter()
                .map(|v| if let Value::I32(t) = v { *t } else { 1 })
                .collect(),
            Err(_) => vec![1; tokens.len()],
        };
        let merges = g
            .get_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                let (a, b) = m
                    .split_once(' ')
                    .ok_or_else(|| tk_err(format!("merge {m:?} has no space")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>, TokenizerError>>()?;
        let vocab: ahash::AHashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tk_err)?;

        let split = |p: &str| -> Result<PreTokenizerWrapper, TokenizerError> {
            Ok(Split::new(
                SplitPattern::Regex(p.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tk_err)?
            .into())
        };
        let bytes = ByteLevel::new(false, false, false).into();
        let steps: Vec<PreTokenizerWrapper> = match pre {
            "qwen2" => vec![split(QWEN2_PATTERN)?, bytes],
            "smollm" => vec![Digits::new(true).into(), split(GPT2_PATTERN)?, bytes],
            "gpt2" | "default" => vec![split(GPT2_PATTERN)?, bytes],
            other => return Err(TokenizerError::UnsupportedPre(other.to_string())),
        };

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(steps)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL || **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);

        let id_of = |s: &str| tokens.iter().position(|t| *t == s).map(|i| i as u32);
        let eos = g
            .get_u64("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|v| v as u32);
        let mut stop_ids: Vec<u32> = [eos, id_of("<|im_end|>"), id_of("<|endoftext|>")]
            .into_iter()
            .flatten()
            .collect();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let add_bos = matches!(g.get("tokenizer.ggml.add_bos_token"), Ok(Value::Bool(true)));
        Ok(Tokenizer {
            inner,
            bos: g
                .get_u64("tokenizer.ggml.bos_token_id")
                .ok()
                .map(|v| v as u32),
            add_bos,
            stop_ids,
            vocab_size: tokens.len(),
        })
    }

    /// Tokenizes `text`; special tokens written in the text (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= self.vocab_size) {
            return Err(TokenizerError::BadId(bad));
        }
        self.inner.decode(ids, false).map_err(tk_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }
}

/// Streams decoded text token by token, holding back bytes of a UTF-8 character split across tokens.
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    /// Tokens not yet emitted as text (the start of a character split across tokens).
    pending: Vec<u32>,
}

impl<'a> TextStream<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        TextStream {
            tok,
            pending: Vec::new(),
        }
    }

    /// Adds a token and returns the text that became complete. Byte-level tokens decode independently of what
    /// came before, so only the pending tokens are decoded (linear in the answer's length).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.pending.push(id);
        let text = self.tok.decode(&self.pending)?;
        // An incomplete character decodes to U+FFFD at the end: wait for the rest of it.
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        self.pending.clear();
        Ok(text)
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// ChatML, the template of Qwen2.5 and SmolLM2: `<|im_start|>{role}\n{content}<|im_end|>\n` per message,
/// then `<|im_start|>assistant\n` to ask for the answer.
pub fn chatml(messages: &[Message], add_generation_prompt: bool) -> String {
    let mut s = String::new();
    for m in messages {
        s.push_str("<|im_start|>");
        s.push_str(&m.role);
        s.push('\n');
        s.push_str(&m.content);
        s.push_str("<|im_end|>\n");
    }
    if add_generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

/// A chat split the CE-LSLM way: the shared context (the system message, computed once in the cloud) and the
/// conversation after it (user data, computed on the edge). Tokenizing the parts separately gives the same ids as
/// tokenizing the whole, because ChatML's special tokens split the text first.
impl Tokenizer {
    /// Tokens of a shared context: the beginning-of-sequence token where the model wants one, then `text` as the
    /// system message.
    pub fn context_tokens(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = self.bos_prefix();
        ids.extend(self.encode(&chatml(&[Message::new("system", text)], false))?);
        Ok(ids)
    }

    /// Tokens of the conversation `messages` and the assistant prompt, following a context (`after_context`) or
    /// starting the sequence.
    pub fn chat_tokens(
        &self,
        messages: &[Message],
        after_context: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = if after_context {
            Vec::new()
        } else {
            self.bos_prefix()
        };
        ids.extend(self.encode(&chatml(messages, true))?);
        Ok(ids)
    }

    fn bos_prefix(&self) -> Vec<u32> {
        match (self.add_bos, self.bos) {
            (true, Some(b)) => vec![b],
            _ => Vec::new(),
        }
    }
}
