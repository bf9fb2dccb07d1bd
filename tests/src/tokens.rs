//! A signing key made for one test run, the server's `Auth` holding it, and tokens signed by it.

use tandem_cloud::auth::{self, Auth};

pub struct TestKey {
    /// The line of a keys file (`--auth-keys`) holding the key.
    pub line: String,
    secret: Vec<u8>,
}

impl TestKey {
    /// A fresh random key with id `k1`.
    pub fn new() -> TestKey {
        let hex = auth::new_secret().expect("randomness");
        let line = format!("k1 {hex}");
        let (_, secret) = auth::parse_key_line(&line).expect("a valid key line");
        TestKey { line, secret }
    }

    /// A server configuration requiring tokens signed by this key.
    pub fn auth(&self) -> Auth {
        Auth::from_keys_text(&self.line, None).expect("a valid keys file")
    }

    /// A token for `client`, expiring `ttl_s` seconds from now (negative: already expired).
    pub fn token(&self, client: &str, ttl_s: i64) -> String {
        auth::issue(
            "k1",
            &self.secret,
            client,
            (auth::now() as i64 + ttl_s) as u64,
        )
    }
}

impl Default for TestKey {
    fn default() -> Self {
        Self::new()
    }
}
