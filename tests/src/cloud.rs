//! A real cloud server on 127.0.0.1 for tests: its own tokio runtime on a background thread, stopped on drop.

use std::net::SocketAddr;
use std::sync::Arc;

use tandem_cloud::{App, ServeOptions, load_app, serve};

pub struct TestCloud {
    pub addr: SocketAddr,
    pub app: Arc<App>,
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
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers `text` as a context of the default model; returns its id.
    pub fn register(&self, text: &str) -> String {
        let body = serde_json::json!({ "text": text }).to_string();
        let (status, reply) = crate::http::request(self.addr, "POST", "/v1/contexts", &body);
        assert!(status == 200 || status == 201, "register: {status} {reply}");
        let v: serde_json::Value = serde_json::from_str(&reply).expect("JSON");
        v["id"].as_str().expect("id").to_string()
    }

    /// A counter from `/metrics`.
    pub fn metric(&self, name: &str) -> u64 {
        let (_, text) = crate::http::request(self.addr, "GET", "/metrics", "");
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
