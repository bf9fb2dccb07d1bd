//! A context store shared by several cloud replicas through Redis: a context computed by one replica is streamed by
//! any other without a second prefill. Each replica keeps its own in-memory LRU in front; Redis holds every
//! context (postcard, content-addressed by id, written once) and the set of ids.
//!
//! Redis being down costs only sharing: lookups it cannot answer are misses (logged), so a replica then prefills
//! for itself, and contexts already in its memory are still served.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::store::{ContextRecord, ContextStore, LruStore, StoredContext};

/// Longest wait for Redis on any call.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct RedisStore {
    client: redis::Client,
    /// One connection, reopened after a failure.
    conn: Mutex<Option<redis::Connection>>,
    local: LruStore,
    /// Key prefix, so several deployments can share one Redis.
    prefix: String,
}

impl RedisStore {
    /// `url`: `redis://host:port[/db]`. Checks that Redis answers now, so a typo fails at start, not at first use.
    pub fn open(url: &str, local: LruStore) -> anyhow::Result<Self> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("Redis URL {url:?}: {e}"))?;
        let store = RedisStore {
            client,
            conn: Mutex::default(),
            local,
            prefix: "tandem".into(),
        };
        store
            .with_conn(|c| redis::cmd("PING").query::<String>(c))
            .map_err(|e| anyhow::anyhow!("Redis at {url} does not answer: {e}"))?;
        Ok(store)
    }

    fn key(&self, id: &str) -> String {
        format!("{}:ctx:{id}", self.prefix)
    }

    fn ids_key(&self) -> String {
        format!("{}:contexts", self.prefix)
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            let c = self.client.get_connection_with_timeout(TIMEOUT)?;
            c.set_read_timeout(Some(TIMEOUT))?;
            c.set_write_timeout(Some(TIMEOUT))?;
            *slot = Some(c);
        }
        let result = f(slot.as_mut().expect("just opened"));
        if result
            .as_ref()
            .is_err_and(|e| e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
        {
            *slot = None;
        }
        result
    }

    fn fetch(&self, id: &str) -> Option<StoredContext> {
        let bytes: Option<Vec<u8>> = self
            .with_conn(|c| redis::cmd("GET").arg(self.key(id)).query(c))
            .map_err(|e| tracing::warn!("Redis GET {id}: {e}"))
            .ok()?;
        match postcard::from_bytes::<ContextRecord>(&bytes?) {
            Ok(r) if r.id == id && r.kv.validate().is_ok() => Some(StoredContext::new(r)),
            _ => {
                tracing::warn!("ignoring a corrupt context {id} in Redis");
                None
            }
        }
    }
}

impl ContextStore for RedisStore {
    fn get(&self, id: &str) -> Option<Arc<StoredContext>> {
        if let Some(c) = self.local.get(id) {
            return Some(c);
        }
        let ctx = Arc::new(self.fetch(id)?);
        self.local.put(ctx.clone());
        Some(ctx)
    }

    fn put(&self, ctx: Arc<StoredContext>) {
        let bytes = match postcard::to_allocvec(&ctx.record) {
            Ok(b) => b,
            Err(e) => return tracing::warn!("cannot serialise context {}: {e}", ctx.record.id),
        };
        let id = ctx.record.id.clone();
        self.local.put(ctx);
        // Contexts are content-addressed: the first write of an id is as good as any later one.
        let stored = self.with_conn(|c| {
            redis::pipe()
                .cmd("SET")
                .arg(self.key(&id))
                .arg(bytes)
                .arg("NX")
                .ignore()
                .cmd("SADD")
                .arg(self.ids_key())
                .arg(&id)
                .ignore()
                .query::<()>(c)
        });
        if let Err(e) = stored {
            tracing::warn!("Redis could not store context {id}: {e}");
        }
    }

    fn ids(&self) -> Vec<String> {
        let mut ids = self.local.ids();
        match self.with_conn(|c| {
            redis::cmd("SMEMBERS")
                .arg(self.ids_key())
                .query::<Vec<String>>(c)
        }) {
            Ok(shared) => ids.extend(shared),
            Err(e) => tracing::warn!("Redis SMEMBERS: {e}"),
        }
        ids.sort();
        ids.dedup();
        ids
    }
}
