//! Who may call the server: signed, expiring tokens (and, for simple setups, one static bearer token).
//!
//! A token is `tdm1.<key id>.<client>.<expires, unix seconds>.<signature>`, the signature being the hex HMAC-SHA256
//! of everything before it under the named key. The server holds the keys (a file of `id secret` lines, so keys can
//! be rotated: add a new id, issue with it, drop the old one later); whoever holds a key issues tokens offline
//! (`tandem auth token`). The client name inside a signed token is what the per-client limits count.
//!
//! ```
//! use tandem_cloud::auth::{Auth, issue};
//! let auth = Auth::from_keys_text("k1 000102030405060708090a0b0c0d0e0f", None).unwrap();
//! let secret: Vec<u8> = (0..16).collect();
//! let token = issue("k1", &secret, "alice", 2_000_000_000);
//! assert_eq!(auth.check(Some(&token), 1_900_000_000).unwrap().as_deref(), Some("alice"));
//! assert!(auth.check(Some(&token), 2_000_000_001).is_err()); // expired
//! ```

use std::collections::HashMap;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

const PREFIX: &str = "tdm1";
/// Shortest secret accepted: 128 bits, written as 32 hex digits or more.
const MIN_SECRET_BYTES: usize = 16;

/// Why a call was refused (the message goes back to the caller, so it names the problem without revealing keys).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Denied {
    #[error("this server requires a token (Authorization: Bearer <token>)")]
    Missing,
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signed with unknown key {0:?}")]
    UnknownKey(String),
    #[error("token signature does not match")]
    BadSignature,
    #[error("token expired at {expired} (unix seconds; now {now})")]
    Expired { expired: u64, now: u64 },
    #[error("wrong token")]
    WrongStatic,
}

/// The server's keys. With none (and no static token) every call is let in.
#[derive(Default, Clone)]
pub struct Auth {
    keys: HashMap<String, Vec<u8>>,
    static_token: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Auth")
            .field("keys", &ids)
            .field("static_token", &self.static_token.is_some())
            .finish()
    }
}

impl Auth {
    /// Keys from a file of `id secret-in-hex` lines (`#` comments), and an optional static bearer token.
    pub fn load(keys_file: Option<&Path>, static_token: Option<String>) -> anyhow::Result<Self> {
        let text = match keys_file {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading keys file {}: {e}", p.display()))?,
            None => String::new(),
        };
        Self::from_keys_text(&text, static_token)
    }

    pub fn from_keys_text(text: &str, static_token: Option<String>) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, secret) =
                parse_key_line(line).map_err(|e| anyhow::anyhow!("keys line {}: {e}", n + 1))?;
            anyhow::ensure!(
                keys.insert(id.clone(), secret).is_none(),
                "keys line {}: key {id:?} given twice",
                n + 1
            );
        }
        Ok(Auth { keys, static_token })
    }

    /// Whether calls need a token at all.
    pub fn required(&self) -> bool {
        !self.keys.is_empty() || self.static_token.is_some()
    }

    /// Checks `token` at `now` (unix seconds): `Ok(Some(client))` for a signed token, `Ok(None)` when no token is
    /// required or the static one was given.
    pub fn check(&self, token: Option<&str>, now: u64) -> Result<Option<String>, Denied> {
        if !self.required() {
            return Ok(None);
        }
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Missing)?;
        if !token.starts_with(PREFIX) || token.matches('.').count() != 4 {
            return match &self.static_token {
                Some(s) if constant_time_eq(s.as_bytes(), token.as_bytes()) => Ok(None),
                Some(_) => Err(Denied::WrongStatic),
                None => Err(Denied::Malformed(
                    "expected tdm1.<key>.<client>.<expires>.<signature>",
                )),
            };
        }
        let (signed, signature) = token.rsplit_once('.').expect("four dots");
        let mut parts = signed.split('.').skip(1);
        let (key, client, expires) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let secret = self
            .keys
            .get(key)
            .ok_or_else(|| Denied::UnknownKey(key.to_string()))?;
        let signature = decode_hex(signature).ok_or(Denied::Malformed("signature is not hex"))?;
        mac(secret, signed)
            .verify_slice(&signature)
            .map_err(|_| Denied::BadSignature)?;
        // Only a correctly signed token's fields are believed.
        let expires: u64 = expires
            .parse()
            .map_err(|_| Denied::Malformed("expiry is not a number"))?;
        if expires < now {
            return Err(Denied::Expired {
                expired: expires,
                now,
            });
        }
        Ok(Some(client.to_string()))
    }
}

/// A token for `client`, signed by key `key_id`, valid until `expires` (unix seconds).
pub fn issue(key_id: &str, secret: &[u8], client: &str, expires: u64) -> String {
    let signed = format!("{PREFIX}.{key_id}.{client}.{expires}");
    let signature = mac(secret, &signed).finalize().into_bytes();
    format!("{signed}.{}", encode_hex(&signature))
}

/// A new random secret, hex.
pub fn new_secret() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(encode_hex(&bytes))
}

/// Names usable as key ids and client names: they sit between the token's dots.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `id secret` → the id and the secret's bytes.
pub fn parse_key_line(line: &str) -> Result<(String, Vec<u8>), String> {
    let mut words = line.split_whitespace();
    let (Some(id), Some(secret), None) = (words.next(), words.next(), words.next()) else {
        return Err("expected `<key id> <secret in hex>`".into());
    };
    if !valid_name(id) {
        return Err(format!(
            "key id {id:?}: use letters, digits, - and _ (at most 64)"
        ));
    }
    let secret = decode_hex(secret).ok_or_else(|| format!("key {id:?}: the secret is not hex"))?;
    if secret.len() < MIN_SECRET_BYTES {
        return Err(format!(
            "key {id:?}: the secret has {} bytes; use at least {MIN_SECRET_BYTES}",
            secret.len()
        ));
    }
    Ok((id.to_string(), secret))
}

fn mac(secret: &[u8], signed: &str) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    m.update(signed.as_bytes());
    m
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "00112233445566778899aabbccddeeff";

    fn auth() -> Auth {
        Auth::from_keys_text(
            &format!("# rotated monthly\nold {SECRET}ff\nnew {SECRET}\n"),
            None,
        )
        .unwrap()
    }

    #[test]
    fn signed_tokens_name_their_client_until_they_expire() {
        let secret = decode_hex(SECRET).unwrap();
        let t = issue("new", &secret, "gw-7", 100);
        assert_eq!(auth().check(Some(&t), 100), Ok(Some("gw-7".into())));
        assert_eq!(
            auth().check(Some(&t), 101),
            Err(Denied::Expired {
                expired: 100,
                now: 101
            })
        );
    }

    #[test]
    fn forged_or_broken_tokens_are_refused_by_name() {
        let secret = decode_hex(SECRET).unwrap();
        let t = issue("new", &secret, "gw-7", 100);
        let a = auth();
        assert_eq!(a.check(None, 0), Err(Denied::Missing));
        assert_eq!(
            a.check(Some(&t.replace("gw-7", "gw-8")), 0),
            Err(Denied::BadSignature)
        );
        assert_eq!(
            a.check(Some(&t.replace(".100.", ".999.")), 0),
            Err(Denied::BadSignature)
        );
        assert_eq!(
            a.check(Some(&t.replace("new", "gone")), 0),
            Err(Denied::UnknownKey("gone".into()))
        );
        assert_eq!(
            a.check(Some(&issue("old", &secret, "x", 100)), 0),
            Err(Denied::BadSignature)
        );
        assert!(matches!(
            a.check(Some("hello"), 0),
            Err(Denied::Malformed(_))
        ));
        assert!(matches!(
            a.check(Some(&format!("{}zz", &t[..t.len() - 2])), 0),
            Err(Denied::Malformed(_))
        ));
    }

    #[test]
    fn a_static_token_and_no_keys() {
        assert_eq!(Auth::default().check(None, 0), Ok(None));
        let a = Auth::from_keys_text("", Some("s3cret".into())).unwrap();
        assert_eq!(a.check(Some("s3cret"), 0), Ok(None));
        assert_eq!(a.check(Some("s3cre"), 0), Err(Denied::WrongStatic));
    }

    #[test]
    fn bad_key_files_say_which_line() {
        let e = Auth::from_keys_text("a 0011", None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("at least 16"), "{e}");
        let e = Auth::from_keys_text(&format!("a {SECRET}\na {SECRET}"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
        assert!(Auth::from_keys_text("a.b 00", None).is_err());
    }
}
