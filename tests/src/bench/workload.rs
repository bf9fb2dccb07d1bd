//! The benchmark's inputs: shared contexts and user prompts cut from real text no one here wrote for it (this
//! repository's Rust sources), at exact token counts, and a seeded generator for the lengths.

use std::path::Path;

use tandem_common::engine::Engine;

/// Every `.rs` file under the repository's crates, in a fixed order, as token ids.
pub struct Corpus {
    ids: Vec<u32>,
}

impl Corpus {
    pub fn load(e: &Engine) -> Result<Corpus, String> {
        let mut files = Vec::new();
        for dir in [
            "common/src",
            "cloud/src",
            "edge-wasm/src",
            "edge-wasm/gateway/src",
            "tests/src",
            "tests/tests",
        ] {
            collect_rs(&crate::repo_root().join(dir), &mut files);
        }
        files.sort();
        let mut text = String::new();
        for f in files {
            text.push_str(
                &std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?,
            );
        }
        let ids = e.tokenizer.encode(&text).map_err(|e| e.to_string())?;
        Ok(Corpus { ids })
    }

    /// `n` tokens of text starting at token `offset` (wrapping around).
    pub fn text(&self, e: &Engine, offset: usize, n: usize) -> String {
        let ids: Vec<u32> = (0..n)
            .map(|i| self.ids[(offset + i) % self.ids.len()])
            .collect();
        e.tokenizer.decode(&ids).expect("the corpus decodes")
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect_rs(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A user's question about the shared context: an instruction and a snippet of about `n` tokens.
pub fn user_prompt(corpus: &Corpus, e: &Engine, seed: usize, n: usize) -> String {
    let snippet = corpus.text(
        e,
        corpus.tokens() / 2 + seed * 997,
        n.saturating_sub(12).max(4),
    );
    format!("Explain how this code relates to the document above:\n{snippet}")
}
