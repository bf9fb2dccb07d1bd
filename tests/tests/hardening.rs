//! Hardening, end to end over real sockets: signed expiring tokens on every route, per-client stream and byte-rate
//! limits, a context-size limit, backpressure against an edge that stops reading, and TLS.

use std::time::{Duration, Instant};

use tandem_cloud::ServeOptions;
use tandem_cloud::limits::Limits;
use tandem_common::codec::Codec;
use tandem_common::wire::{self, ErrorCode, Frame, PROTOCOL_VERSION};
use tandem_edge::chat::{CloudContext, KvSource};
use tandem_edge::fetch;
use tandem_edge::protocol::FetchError;
use tandem_tests::cloud::TestCloud;
use tandem_tests::tokens::TestKey;
use tandem_tests::{answers, engine, http, raw_ws};

const CONTEXT: &str = "The lighthouse keeper's log, autumn: the lamp was lit at dusk every day; the fog horn sounded \
on nine nights; a schooner named Marguerite anchored in the bay for two days to wait out a gale; the keeper's cat, \
Biscuit, caught four mice in the oil store.";

/// A cloud that requires tokens signed by one key; returns it with a token maker (client, seconds from now).
fn guarded(limits: Limits) -> (TestCloud, impl Fn(&str, i64) -> String) {
    let key = TestKey::new();
    let cloud = TestCloud::start(ServeOptions {
        auth: key.auth(),
        limits,
        ..Default::default()
    });
    (cloud, move |client: &str, ttl: i64| key.token(client, ttl))
}

fn cloud_context(cloud: &TestCloud, id: &str, auth: Option<String>) -> CloudContext {
    answers::cloud_context(&cloud.url(), id, auth)
}

fn hello(auth: Option<String>) -> Vec<u8> {
    wire::encode(&Frame::Hello {
        version: PROTOCOL_VERSION,
        auth,
        model: "smollm2".into(),
        weights: engine("smollm2").model.fingerprint().into(),
        codecs: vec![Codec::Lossless],
        bandwidth_bps: None,
    })
}

fn request(id: &str) -> Vec<u8> {
    wire::encode(&Frame::Request {
        context: id.into(),
        layers: (0, engine("smollm2").model.config().n_layers as u32),
        tokens: None,
        codec: Some(Codec::Lossless),
        edge_prefill_tps: None,
        mode: Default::default(),
    })
}

fn error_type(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON error body: {body}"));
    v["error"]["type"].as_str().unwrap_or_default().to_string()
}

/// Without a valid, unexpired token every route but `/healthz` answers 401 naming why, and the KV socket refuses
/// with an `Unauthorized` frame; with one, everything works and the answer equals a local run.
#[test]
fn every_route_needs_a_valid_unexpired_token() {
    let (mut cloud, token) = guarded(Limits::default());
    let good = token("alice", 600);
    let expired = token("alice", -5);
    let forged = good.replace(".alice.", ".mallory.");
    let get = |path: &str, token: Option<&str>| {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Range", "bytes=0-3")];
        headers.extend(bearer.as_deref().map(|b| ("Authorization", b)));
        http::request_with(cloud.addr, "GET", path, "", &headers)
    };
    assert_eq!(
        get("/healthz", None).status,
        200,
        "health checks need no token"
    );
    for path in ["/v1/models", "/v1/contexts", "/metrics", "/weights/smollm2"] {
        let r = get(path, None);
        assert_eq!(r.status, 401, "{path} without a token");
        assert_eq!(error_type(&r.body), "unauthorized", "{path}: {}", r.body);
        assert!(r.body.contains("requires a token"), "{}", r.body);
        assert!(
            r.header("www-authenticate")
                .is_some_and(|h| h.starts_with("Bearer"))
        );
        let r = get(path, Some(&expired));
        assert_eq!(
            (r.status, error_type(&r.body)),
            (401, "token_expired".into()),
            "{path}: {}",
            r.body
        );
        let r = get(path, Some(&forged));
        assert_eq!(r.status, 401, "{path} with a forged token");
        assert!(r.body.contains("signature"), "{}", r.body);
        let r = get(path, Some(&good));
        assert!(
            r.status == 200 || r.status == 206,
            "{path} with a good token: {} {}",
            r.status,
            r.body
        );
    }
    let (status, body) = cloud.request(
        "POST",
        "/v1/contexts",
        &serde_json::json!({ "text": CONTEXT }).to_string(),
    );
    assert_eq!((status, error_type(&body)), (401, "unauthorized".into()));
    let (status, _) = cloud.request(
        "POST",
        "/v1/chat/completions",
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 401);
    cloud.token = Some(good.clone());
    let id = cloud.register(CONTEXT);

    // The KV socket: refused without a token, with an expired one, and with a forged one; each says why.
    for (auth, words) in [
        (None, "requires a token"),
        (Some(expired), "expired"),
        (Some(forged), "signature"),
    ] {
        match fetch::start(
            cloud_context(&cloud, &id, auth).fetch_request(engine("smollm2")),
            Instant::now(),
        ) {
            Err(FetchError::Refused {
                code: ErrorCode::Unauthorized,
                message,
            }) => {
                assert!(message.contains(words), "{message:?} should say {words:?}")
            }
            Err(e) => panic!("expected Unauthorized, got {e}"),
            Ok(_) => panic!("a KV stream without a valid token"),
        }
    }
    assert!(cloud.metric("tandem_unauthorized_total") >= 17);

    // With a good token: the cloud's lossless KV gives the local answer.
    let (got, source) =
        answers::from_cloud(&cloud.url(), &id, Some(good), "What is the cat called?");
    assert_eq!(source, KvSource::exact(Codec::Lossless));
    assert_eq!(got, answers::local(CONTEXT, "What is the cat called?"));
}

/// One client holds at most its stream limit (others are unaffected), its KV comes no faster than its byte rate,
/// contexts over the size limit are refused by name, and an edge that stops reading is dropped once its socket
/// stays full for the idle limit: the server never produced the whole context for it.
#[test]
fn per_client_limits_and_backpressure() {
    let rate = 8 << 20;
    let (mut cloud, token) = guarded(Limits {
        streams_per_client: 1,
        client_bytes_per_s: Some(rate),
        idle: Duration::from_secs(2),
        max_context_tokens: Some(1000),
    });
    cloud.token = Some(token("admin", 600));
    let (status, body) = cloud.request(
        "POST",
        "/v1/contexts",
        &serde_json::json!({ "text": CONTEXT.repeat(20) }).to_string(),
    );
    assert_eq!(
        (status, error_type(&body)),
        (413, "context_too_long".into())
    );
    assert!(body.contains("at most 1000"), "{body}");
    // About 400 tokens: some 18 MB of lossless KV, far more than the kernel's socket buffers hold.
    let id = cloud.register(&CONTEXT.repeat(7));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // alice opens a session and stops reading; her second is refused, bob's is served.
        let mut held = raw_ws::connect(cloud.addr).await;
        raw_ws::send(&mut held, hello(Some(token("alice", 600)))).await;
        assert!(matches!(
            raw_ws::next(&mut held).await,
            Some(Frame::Welcome { .. })
        ));
        let mut second = raw_ws::connect(cloud.addr).await;
        raw_ws::send(&mut second, hello(Some(token("alice", 600)))).await;
        match raw_ws::next(&mut second).await {
            Some(Frame::Error {
                code: ErrorCode::Busy,
                message,
            }) => assert!(message.contains("limit 1"), "{message}"),
            other => panic!("expected Busy, got {other:?}"),
        }
        let mut bob = raw_ws::connect(cloud.addr).await;
        raw_ws::send(&mut bob, hello(Some(token("bob", 600)))).await;
        assert!(matches!(
            raw_ws::next(&mut bob).await,
            Some(Frame::Welcome { .. })
        ));
        drop(bob);

        // Backpressure: alice asks for the whole context, losslessly, and reads nothing more.
        raw_ws::send(&mut held, request(&id)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while cloud.metric("tandem_kv_sessions_stalled_total") == 0 {
            assert!(
                Instant::now() < deadline,
                "a stalled edge was never dropped"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let whole = cloud
            .app
            .store
            .get(&id)
            .unwrap()
            .encoded_size(Codec::Lossless) as u64;
        let sent = cloud.metric("tandem_kv_bytes_streamed_total");
        assert!(
            sent < whole,
            "the server produced {sent} of {whole} bytes for an edge that read none"
        );
        eprintln!("stalled edge: {sent} of {whole} KV bytes sent before the server dropped it");
        drop(held);
    });

    // The byte rate: a fresh client's whole lossless context takes at least (bytes - one second's burst) / rate.
    let whole = cloud
        .app
        .store
        .get(&id)
        .unwrap()
        .encoded_size(Codec::Lossless);
    let t0 = Instant::now();
    let mut f = fetch::start(
        cloud_context(&cloud, &id, Some(token("carol", 600))).fetch_request(engine("smollm2")),
        t0,
    )
    .unwrap();
    for l in 0..engine("smollm2").model.config().n_layers {
        f.layer(l, t0).unwrap();
    }
    let floor = (whole as f64 - rate as f64) / rate as f64;
    assert!(
        floor > 0.5,
        "the context ({whole} bytes) must outlast the burst"
    );
    assert!(
        t0.elapsed().as_secs_f64() >= floor * 0.95,
        "{whole} bytes in {:?} at {rate} B/s",
        t0.elapsed()
    );
    assert!(cloud.metric("tandem_rate_limited_ms_total") > 0);
    eprintln!(
        "rate limit: {whole} bytes in {:?} at {rate} B/s",
        t0.elapsed()
    );
    assert!(cloud.metric("tandem_busy_total") >= 1);
}

/// With a certificate the server speaks only TLS: an edge that does not trust it cannot connect, one that does gets
/// the same answer over `wss://`, and `https://` serves the routes.
#[test]
fn tls_serves_edges_that_trust_the_certificate() {
    let dir = std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) =
        tandem_cloud::listen::dev_certificate(&["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_file, &cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let cloud = TestCloud::start(ServeOptions {
        tls: Some((cert_file, key_file)),
        ..Default::default()
    });
    assert!(cloud.url().starts_with("https://"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (ctx, _) = rt
        .block_on(tandem_cloud::server::register_context(
            &cloud.app, None, CONTEXT,
        ))
        .unwrap();
    let id = ctx.record.id.clone();
    let e = engine("smollm2");
    let fetch_all = || -> Result<(), FetchError> {
        let t0 = Instant::now();
        let mut f = fetch::start(cloud_context(&cloud, &id, None).fetch_request(e), t0)?;
        for l in 0..e.model.config().n_layers {
            f.layer(l, t0).map_err(FetchError::Protocol)?;
        }
        Ok(())
    };

    // Not yet trusted: the handshake fails and says why.
    match fetch_all() {
        Err(FetchError::Unreachable { reason, .. }) => {
            assert!(reason.to_lowercase().contains("certificate"), "{reason}")
        }
        other => panic!("expected an untrusted certificate, got {other:?}"),
    }
    // Plain HTTP to the TLS port gets no HTTP answer.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(cloud.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            !got.starts_with(b"HTTP/"),
            "plain HTTP was answered over the TLS port"
        );
    }

    tandem_edge::tls::trust_pem(cert.as_bytes()).unwrap();
    fetch_all().expect("KV over wss:// once the certificate is trusted");
    let config = tandem_edge::tls::client_config().unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = rustls::ClientConnection::new(config, name).unwrap();
    let mut stream =
        rustls::StreamOwned::new(tls, std::net::TcpStream::connect(cloud.addr).unwrap());
    std::io::Write::write_all(
        &mut stream,
        b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let r = http::read_reply(stream);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("smollm2"));
    std::fs::remove_dir_all(&dir).unwrap();
}
