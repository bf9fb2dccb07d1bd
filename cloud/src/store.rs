//! The context store: computed context KV, content-addressed, kept in memory within a byte budget (least recently
//! used first out) and spilled to disk rather than dropped. [`ContextStore`] is the seam for other backends.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_common::codec::{
    Codec, KvShape, LayerStep, RopeParams, StepScales, encode_layer_weighted,
};
use tandem_common::kv::{KvState, LayerKv};
use tandem_common::model::QueryEnergy;

/// A context's id: a hash over the weights it was computed with and its text.
pub fn context_id(weights_fingerprint: &str, text: &str) -> String {
    let mut h = Sha256::new();
    h.update(weights_fingerprint.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What the store keeps per context.
#[derive(Serialize, Deserialize)]
pub struct ContextRecord {
    pub id: String,
    /// The served model's name.
    pub model: String,
    pub kv: KvState,
    /// The model's rotary embedding (the codecs quantize keys without it).
    pub rope: RopeParams,
    /// How long the cloud's prefill took, milliseconds.
    pub prefill_ms: u64,
    /// The context's text, for edges that compute it themselves (unknown for contexts pulled from an upstream).
    pub text: Option<String>,
    /// How strongly the context's queries read each key channel pair, measured by this server's prefill (unknown
    /// for contexts pulled from an upstream): the `pca` codecs weight key errors by it.
    pub query_energy: Option<QueryEnergy>,
    /// Per-layer scales of the `pca` codecs' steps: the served model's calibrated ones (`tandem calibrate`), when
    /// it has them. Kept with the context so every replica encodes it alike.
    pub step_scales: Option<StepScales>,
}

/// Encoded layers by codec and layer.
type EncodedLayers = HashMap<(Codec, usize), Arc<Vec<u8>>>;

/// A stored context with its encoded layers, made once per codec and shared by every edge that asks.
pub struct StoredContext {
    pub record: ContextRecord,
    encoded: Mutex<EncodedLayers>,
}

impl StoredContext {
    pub fn new(record: ContextRecord) -> Self {
        StoredContext {
            record,
            encoded: Mutex::default(),
        }
    }

    pub fn shape(&self) -> KvShape {
        self.record.kv.shape()
    }

    /// Resident size: the f32 K and V of every layer.
    pub fn bytes(&self) -> usize {
        let kv = &self.record.kv;
        kv.layers.iter().map(|l| 4 * (l.k.len() + l.v.len())).sum()
    }

    /// Layer `layer` encoded by `codec` (cached).
    pub fn encoded_layer(&self, codec: Codec, layer: usize) -> Arc<Vec<u8>> {
        if let Some(e) = self.lock().get(&(codec, layer)) {
            return e.clone();
        }
        let kv = &self.record.kv;
        let e = Arc::new(self.encode(
            codec,
            layer,
            self.shape(),
            &kv.tokens,
            &kv.positions,
            &kv.layers[layer],
        ));
        self.lock().insert((codec, layer), e.clone());
        e
    }

    /// Encodes `data`, layer `layer` of this context (or a token slice of it: `tokens` at `positions`).
    pub fn encode(
        &self,
        codec: Codec,
        layer: usize,
        shape: KvShape,
        tokens: &[u32],
        positions: &[u32],
        data: &LayerKv,
    ) -> Vec<u8> {
        let queries = self.record.query_energy.as_ref();
        encode_layer_weighted(
            codec,
            shape,
            Some(self.record.rope.at(positions)),
            tokens,
            queries.and_then(|e| e.keys(layer)),
            (self.record.step_scales.as_ref()).map_or_else(LayerStep::default, |s| s.layer(layer)),
            data,
        )
    }

    /// Bytes on the wire for the whole context in `codec`.
    pub fn encoded_size(&self, codec: Codec) -> usize {
        (0..self.record.kv.layers.len())
            .map(|l| self.encoded_layer(codec, l).len())
            .sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EncodedLayers> {
        self.encoded.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where contexts live. Implementations must be safe to share between request handlers.
pub trait ContextStore: Send + Sync {
    fn get(&self, id: &str) -> Option<Arc<StoredContext>>;
    fn put(&self, ctx: Arc<StoredContext>);
    /// Ids of every stored context.
    fn ids(&self) -> Vec<String>;
}

/// Memory within a byte budget, least recently used spilled to a directory.
pub struct LruStore {
    budget: usize,
    spill: Option<PathBuf>,
    inner: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<String, (Arc<StoredContext>, u64)>,
    bytes: usize,
    tick: u64,
}

impl LruStore {
    /// `budget` bytes in memory; evicted contexts go to `spill` (created if missing) or are dropped without one.
    pub fn new(budget: usize, spill: Option<PathBuf>) -> std::io::Result<Self> {
        if let Some(dir) = &spill {
            std::fs::create_dir_all(dir)?;
        }
        Ok(LruStore {
            budget,
            spill,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spill_path(dir: &Path, id: &str) -> Option<PathBuf> {
        // Ids are hex; anything else never touches the file system.
        id.bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then(|| dir.join(format!("{id}.kv")))
    }

    /// Writes then renames, so a crash never leaves a half-written context under its id.
    fn write_spill(dir: &Path, ctx: &StoredContext) -> std::io::Result<()> {
        let Some(path) = Self::spill_path(dir, &ctx.record.id) else {
            return Ok(());
        };
        if path.exists() {
            return Ok(());
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let bytes = postcard::to_allocvec(&ctx.record).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    }

    fn read_spill(&self, id: &str) -> Option<StoredContext> {
        let path = Self::spill_path(self.spill.as_deref()?, id)?;
        let bytes = std::fs::read(&path).ok()?;
        match postcard::from_bytes::<ContextRecord>(&bytes) {
            Ok(r) if r.id == id && r.kv.validate().is_ok() => Some(StoredContext::new(r)),
            _ => {
                // Removed, so the context's next spill writes it afresh (spills never overwrite).
                tracing::warn!(
                    "removing unreadable spilled context {} (corrupt, or from another version)",
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    fn insert(&self, ctx: Arc<StoredContext>) {
        let mut evicted = Vec::new();
        {
            let mut lru = self.lock();
            lru.tick += 1;
            let tick = lru.tick;
            let size = ctx.bytes();
            if let Some((_, t)) = lru.entries.get_mut(&ctx.record.id) {
                *t = tick;
                return;
            }
            lru.bytes += size;
            lru.entries.insert(ctx.record.id.clone(), (ctx, tick));
            while lru.bytes > self.budget && lru.entries.len() > 1 {
                let oldest = lru
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, t))| *t)
                    .map(|(id, _)| id.clone())
                    .expect("non-empty");
                let (c, _) = lru.entries.remove(&oldest).expect("present");
                lru.bytes -= c.bytes();
                evicted.push(c);
            }
        }
        if let Some(dir) = &self.spill {
            for c in evicted {
                if let Err(e) = Self::write_spill(dir, &c) {
                    tracing::warn!("could not spill context {}: {e}", c.record.id);
                }
            }
        }
    }
}

impl ContextStore for LruStore {
    fn get(&self, id: &str) -> Option<Arc<StoredContext>> {
        {
            let mut lru = self.lock();
            lru.tick += 1;
            let tick = lru.tick;
            if let Some((c, t)) = lru.entries.get_mut(id) {
                *t = tick;
                return Some(c.clone());
            }
        }
        let ctx = Arc::new(self.read_spill(id)?);
        self.insert(ctx.clone());
        Some(ctx)
    }

    fn put(&self, ctx: Arc<StoredContext>) {
        self.insert(ctx);
    }

    fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().entries.keys().cloned().collect();
        if let Some(dir) = &self.spill
            && let Ok(rd) = std::fs::read_dir(dir)
        {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_suffix(".kv")
                    && !ids.iter().any(|i| i == id)
                {
                    ids.push(id.to_string());
                }
            }
        }
        ids.sort();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_common::kv::LayerKv;

    fn ctx(id: &str, values: usize) -> Arc<StoredContext> {
        Arc::new(StoredContext::new(ContextRecord {
            id: id.into(),
            model: "m".into(),
            text: None,
            query_energy: None,
            step_scales: None,
            kv: KvState {
                model: "fp".into(),
                first_layer: 0,
                kv_heads: 1,
                head_dim: values,
                tokens: vec![7],
                positions: vec![0],
                layers: vec![LayerKv {
                    k: vec![1.0; values],
                    v: vec![2.0; values],
                }],
            },
            rope: RopeParams {
                theta: 1e4,
                neox: true,
            },
            prefill_ms: 1,
        }))
    }

    #[test]
    fn evicts_least_recent_to_disk_and_reads_it_back() {
        let dir = std::env::temp_dir().join(format!("tandem-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Each context is 8 × 100 bytes; the budget holds two.
        let store = LruStore::new(1700, Some(dir.clone())).unwrap();
        store.put(ctx("aa", 100));
        store.put(ctx("bb", 100));
        assert!(store.get("aa").is_some()); // bb is now the least recent
        store.put(ctx("cc", 100));
        assert!(dir.join("bb.kv").exists() && !dir.join("aa.kv").exists());
        assert_eq!(store.ids(), ["aa", "bb", "cc"]);
        let back = store.get("bb").expect("read back from disk");
        assert_eq!(back.record.kv.layers[0].v, vec![2.0; 100]);
        // An unreadable spill (corrupt, or another version's format) is dropped, so the next one is written.
        std::fs::write(dir.join("dd.kv"), b"not a context").unwrap();
        assert!(store.get("dd").is_none());
        assert!(!dir.join("dd.kv").exists());
        assert!(store.get("../etc/passwd").is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ids_hash_model_and_text() {
        let a = context_id("w1", "text");
        assert_eq!(a.len(), 32);
        assert_ne!(a, context_id("w2", "text"));
        assert_ne!(a, context_id("w1", "text2"));
        assert_eq!(a, context_id("w1", "text"));
    }
}
