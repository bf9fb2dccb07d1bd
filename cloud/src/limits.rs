//! Per-client limits: how many streams a client may hold open at once (KV sessions, chat completions, context
//! registrations), and how fast its KV may stream (a token bucket shared by all its sessions). A client is the name
//! in its signed token, else its IP address.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, which tests can pause and advance.
use tokio::time::Instant;

/// The limits a server enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Streams one client may hold open at once.
    pub streams_per_client: usize,
    /// KV bytes per second one client may be sent (all its sessions together); `None`: unlimited.
    pub client_bytes_per_s: Option<u64>,
    /// A KV session closes after this long without a frame from its edge, or when a send to it stalls this long
    /// (an edge that stopped reading: the server holds at most one layer for it meanwhile).
    pub idle: Duration,
    /// Longest context accepted, tokens (never more than half the model's context length).
    pub max_context_tokens: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            streams_per_client: 64,
            client_bytes_per_s: None,
            idle: Duration::from_secs(60),
            max_context_tokens: None,
        }
    }
}

/// A client's share of the server.
struct Client {
    streams: usize,
    /// Bytes it may still be sent now (negative: debt it waits off).
    allowance: f64,
    refilled: Instant,
}

/// The clients the server is serving now.
pub struct Clients {
    limits: Limits,
    by_name: Arc<Mutex<HashMap<String, Client>>>,
}

/// A held stream; dropping it frees the slot.
pub struct Slot {
    client: String,
    by_name: Arc<Mutex<HashMap<String, Client>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("client {client} already has {open} streams open (limit {limit}); retry when one ends")]
pub struct Busy {
    pub client: String,
    pub open: usize,
    pub limit: usize,
}

impl Clients {
    pub fn new(limits: Limits) -> Self {
        Clients {
            limits,
            by_name: Arc::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A stream slot for `client`, unless it holds its limit already.
    pub fn admit(&self, client: &str) -> Result<Slot, Busy> {
        let mut map = lock(&self.by_name);
        let burst = self.burst();
        let c = map.entry(client.to_string()).or_insert_with(|| Client {
            streams: 0,
            allowance: burst,
            refilled: Instant::now(),
        });
        if c.streams >= self.limits.streams_per_client {
            return Err(Busy {
                client: client.to_string(),
                open: c.streams,
                limit: self.limits.streams_per_client,
            });
        }
        c.streams += 1;
        Ok(Slot {
            client: client.to_string(),
            by_name: self.by_name.clone(),
        })
    }

    /// Waits until `slot`'s client may be sent `bytes` more; returns how long it waited.
    pub async fn spend(&self, slot: &Slot, bytes: usize) -> Duration {
        let Some(rate) = self.limits.client_bytes_per_s.filter(|&r| r > 0) else {
            return Duration::ZERO;
        };
        let wait = {
            let mut map = lock(&self.by_name);
            let Some(c) = map.get_mut(&slot.client) else {
                return Duration::ZERO;
            };
            let now = Instant::now();
            let refill = now.duration_since(c.refilled).as_secs_f64() * rate as f64;
            c.allowance = (c.allowance + refill).min(self.burst());
            c.refilled = now;
            c.allowance -= bytes as f64;
            Duration::from_secs_f64((-c.allowance).max(0.0) / rate as f64)
        };
        tokio::time::sleep(wait).await;
        wait
    }

    /// Clients holding at least one stream.
    pub fn active(&self) -> usize {
        lock(&self.by_name)
            .values()
            .filter(|c| c.streams > 0)
            .count()
    }

    /// One second's worth of bytes may go at once.
    fn burst(&self) -> f64 {
        self.limits.client_bytes_per_s.unwrap_or(0) as f64
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut map = lock(&self.by_name);
        if let Some(c) = map.get_mut(&self.client) {
            c.streams -= 1;
            // Forget idle clients without debt, so the map stays as small as the set of active clients.
            if c.streams == 0 && c.allowance >= 0.0 {
                map.remove(&self.client);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_streams_and_no_more_and_others_are_unaffected() {
        let clients = Clients::new(Limits {
            streams_per_client: 2,
            ..Limits::default()
        });
        let a1 = clients.admit("a").unwrap();
        let _a2 = clients.admit("a").unwrap();
        let busy = clients.admit("a").err().expect("third refused");
        assert_eq!((busy.open, busy.limit), (2, 2));
        let _b = clients
            .admit("b")
            .expect("another client is not limited by a");
        drop(a1);
        assert!(clients.admit("a").is_ok(), "a freed slot is reusable");
        assert_eq!(clients.active(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_rate_is_shared_by_a_clients_streams() {
        let clients = Clients::new(Limits {
            client_bytes_per_s: Some(1000),
            ..Limits::default()
        });
        let (s1, s2) = (clients.admit("a").unwrap(), clients.admit("a").unwrap());
        // The first second's worth goes at once, then each byte costs a millisecond, whichever stream sends it.
        assert_eq!(clients.spend(&s1, 1000).await, Duration::ZERO);
        assert_eq!(clients.spend(&s2, 500).await, Duration::from_millis(500));
        assert_eq!(clients.spend(&s1, 500).await, Duration::from_millis(500));
        let other = clients.admit("b").unwrap();
        assert_eq!(clients.spend(&other, 1000).await, Duration::ZERO);
    }
}
