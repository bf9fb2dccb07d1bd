//! `tandem auth`: make keys, issue tokens, and make a development TLS certificate.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::auth;

#[derive(Subcommand)]
pub enum AuthCommand {
    /// Print a new key line (`<id> <secret>`) to append to the server's keys file.
    NewKey {
        #[arg(long, default_value = "k1")]
        id: String,
    },
    /// Issue a token for a client, signed by a key from the keys file.
    Token(TokenArgs),
    /// Write a self-signed TLS certificate and key for development (`serve --tls-cert/--tls-key`; clients pass the
    /// certificate as the one to trust).
    DevCert {
        /// Host names and IP addresses the certificate is for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        /// Directory for cert.pem and key.pem.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Parser)]
pub struct TokenArgs {
    /// The server's keys file.
    #[arg(long, env = "TANDEM_AUTH_KEYS")]
    keys: PathBuf,
    /// Which key signs (default: the file's last, the newest by convention).
    #[arg(long)]
    key: Option<String>,
    /// The client's name: what the server's per-client limits count.
    #[arg(long)]
    client: String,
    /// How long the token is valid: seconds, or with s/m/h/d.
    #[arg(long, default_value = "24h")]
    ttl: String,
}

pub fn run(cmd: AuthCommand) -> Result<()> {
    match cmd {
        AuthCommand::NewKey { id } => {
            if !auth::valid_name(&id) {
                bail!("key id {id:?}: use letters, digits, - and _ (at most 64)");
            }
            println!("{id} {}", auth::new_secret()?);
        }
        AuthCommand::Token(t) => {
            let text = std::fs::read_to_string(&t.keys)
                .with_context(|| format!("reading {}", t.keys.display()))?;
            let keys = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(auth::parse_key_line)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow::anyhow!("{}: {e}", t.keys.display()))?;
            let (id, secret) = match &t.key {
                Some(k) => keys.iter().find(|(id, _)| id == k),
                None => keys.last(),
            }
            .with_context(|| format!("no such key in {}", t.keys.display()))?;
            if !auth::valid_name(&t.client) {
                bail!(
                    "client {:?}: use letters, digits, - and _ (at most 64)",
                    t.client
                );
            }
            let expires = auth::now() + parse_ttl(&t.ttl)?;
            println!("{}", auth::issue(id, secret, &t.client, expires));
        }
        AuthCommand::DevCert { names, out } => {
            let (cert, key) = crate::listen::dev_certificate(&names)?;
            std::fs::create_dir_all(&out)?;
            let (c, k) = (out.join("cert.pem"), out.join("key.pem"));
            std::fs::write(&c, cert).with_context(|| format!("writing {}", c.display()))?;
            std::fs::write(&k, key).with_context(|| format!("writing {}", k.display()))?;
            println!(
                "wrote {} and {} for {}",
                c.display(),
                k.display(),
                names.join(", ")
            );
        }
    }
    Ok(())
}

/// `90`, `90s`, `15m`, `12h`, `7d` → seconds.
fn parse_ttl(s: &str) -> Result<u64> {
    let s = s.trim();
    let (n, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let n: u64 = n
        .parse()
        .with_context(|| format!("ttl {s:?}: expected a number with s, m, h or d"))?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => bail!("ttl {s:?}: unit must be s, m, h or d"),
    };
    n.checked_mul(unit)
        .filter(|&t| t > 0)
        .with_context(|| format!("ttl {s:?} is not a usable duration"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ttls() {
        assert_eq!(super::parse_ttl("90").unwrap(), 90);
        assert_eq!(super::parse_ttl("15m").unwrap(), 900);
        assert_eq!(super::parse_ttl("7d").unwrap(), 604800);
        assert!(
            super::parse_ttl("0").is_err()
                && super::parse_ttl("3w").is_err()
                && super::parse_ttl("h").is_err()
        );
    }
}
