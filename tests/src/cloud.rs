//! A real cloud server on 127.0.0.1 for tests: its own tokio runtime on a background thread, stopped on drop.

use std::net::SocketAddr;
use std::sync::Arc;

use tandem_cloud::{App, ServeOptions, load_app, serve};
use tandem_common::codec::Codec;
use tandem_edge::chat::CloudContext;

pub struct TestCloud {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    /// Sent by [`TestCloud::register`] and [`TestCloud::metric`], for a cloud that requires one.
    pub token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestCloud {
    /// Serves `opts` on an ephemeral port.
    pub fn start(opts: ServeOptions) -> TestCloud {
        let app = load_app(&opts).unwrap_or_else(|e| panic!("cloud loads: {e:#}"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let served = app.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                ready_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("test waits");
                serve(served, listener, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        let addr = ready.recv().expect("server starts");
        TestCloud {
            addr,
            app,
            token: None,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.app.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// How a native edge reaches context `id` of SmolLM2 here, in `codec` when given (else the cloud picks).
    pub fn edge_context(&self, id: &str, codec: Option<Codec>) -> CloudContext {
        CloudContext {
            cloud_url: self.url(),
            model: "smollm2".into(),
            context: id.into(),
            codec,
            mode: Default::default(),
            bandwidth_bps: None,
            auth: None,
            timeout: std::time::Duration::from_secs(30),
        }
    }

    /// Registers `text` as a context of the default model; returns its id.
    pub fn register(&self, text: &str) -> String {
        let body = serde_json::json!({ "text": text }).to_string();
        let (status, reply) = self.request("POST", "/v1/contexts", &body);
        assert!(status == 200 || status == 201, "register: {status} {reply}");
        let v: serde_json::Value = serde_json::from_str(&reply).expect("JSON");
        v["id"].as_str().expect("id").to_string()
    }

    /// A request carrying [`TestCloud::token`] when set.
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let bearer = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("Authorization", b.as_str()))
            .collect();
        let r = crate::http::request_with(self.addr, method, path, body, &headers);
        (r.status, r.body)
    }

    /// A counter from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, text) = self.request("GET", "/metrics", "");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }
}

impl Drop for TestCloud {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
