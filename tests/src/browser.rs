//! Headless Chromium driven by playwright-core (tests/browser/chat.mjs) through the `@tandem/edge` package, for the
//! browser tests and `bench-wasm`.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// What a browser run needs: Debian's Chromium (or `TANDEM_CHROMIUM`), the package built by `just npm` and the
/// driver installed by `just browser-deps`. All are required, so a machine without them fails rather than skips.
pub struct Browser {
    pub chromium: PathBuf,
    /// `edge-wasm/npm`: serve it as the cloud's static files; its test page is `/test/index.html`.
    pub package: PathBuf,
    driver: PathBuf,
}

impl Browser {
    pub fn find() -> Browser {
        let repo = crate::repo_root();
        let chromium = std::env::var_os("TANDEM_CHROMIUM")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
        assert!(
            chromium.exists(),
            "{} is missing: install Debian's chromium (apt-get install chromium) or set TANDEM_CHROMIUM",
            chromium.display()
        );
        let package = repo.join("edge-wasm/npm");
        assert!(
            package.join("dist/wasm/tandem_edge_bg.wasm").exists()
                && package.join("dist/index.js").exists(),
            "the npm package is not built: run `just npm`"
        );
        let driver = repo.join("tests/browser");
        assert!(
            driver.join("node_modules/playwright-core").exists(),
            "playwright-core is missing: run `just browser-deps`"
        );
        Browser {
            chromium,
            package,
            driver,
        }
    }
}

/// Runs the driver `script` in tests/browser (`chat.mjs`: the package; `page.mjs`: the chat page) with `plan`, on a
/// fresh browser profile removed afterwards; returns the report it prints.
pub fn run_driver(browser: &Browser, script: &str, mut plan: Value) -> Value {
    let profile = std::env::temp_dir().join(format!(
        "tandem-chromium-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&profile);
    plan["chromium"] = browser.chromium.to_string_lossy().into();
    plan["userDataDir"] = profile.to_string_lossy().into();
    let out = Command::new("node")
        .arg(browser.driver.join(script))
        .arg(plan.to_string())
        .output()
        .expect("node runs");
    let _ = std::fs::remove_dir_all(&profile);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser driver {script} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{script} printed no report ({e}): {stdout}"))
}

/// Runs `plan` (see chat.mjs: `pageUrl` and `sessions`); returns the report, one entry per session, after checking
/// that no session failed as a whole.
pub fn run_plan(browser: &Browser, plan: Value) -> Vec<Value> {
    let report: Vec<Value> =
        serde_json::from_value(run_driver(browser, "chat.mjs", plan)).expect("a list of sessions");
    for session in &report {
        assert!(
            session.get("error").is_none(),
            "browser session failed: {session:#}"
        );
    }
    report
}
