//! TLS for native edges' `wss://` connections: the public web roots, plus certificates this process was told to
//! trust (a development cloud's self-signed one, `tandem chat --ca cert.pem`).

use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

static EXTRA: Mutex<Vec<CertificateDer<'static>>> = Mutex::new(Vec::new());

/// Trusts the certificates in `pem` for every later `wss://` connection of this process; returns how many.
pub fn trust_pem(pem: &[u8]) -> Result<usize, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    let n = certs.len();
    EXTRA
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(certs);
    Ok(n)
}

/// The client configuration for a `wss://` connection.
pub fn client_config() -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in EXTRA.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        roots
            .add(c.clone())
            .map_err(|e| format!("a trusted certificate is unusable: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
