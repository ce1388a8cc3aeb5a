//! The same small policy — answer 403 to requests carrying `x-block`, count
//! the denials in a metric — written in Rust, Python and JavaScript, built
//! with each language's real toolchain, loaded by the gateway and run on real
//! requests. And a response policy in Python and JavaScript whose config can
//! turn its `on-response` off through `hooks.skip` (`tests/guests/stamp-*`).
//!
//! Without componentize-py or the JavaScript tools (`npm ci --prefix
//! sdk/js`) the Python and JavaScript cases are skipped with a message;
//! under `CI=true` they fail instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderValue;
use sluice_tests::client::{H1, get};
use sluice_tests::guests::{js_component, python_component};
use sluice_tests::{Manifest, Origin, TestGateway};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A plugin name no other test in this process uses: a plugin's call
/// statistics, metrics and state belong to its name process-wide (they
/// survive swaps and reloads), and the tests here run side by side.
fn unique_plugin_name(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A gateway whose one route sends every request through plugin `name`
/// (the component at `wasm`, with `config`) to `origin`.
async fn one_policy_gateway(
    origin: &Origin,
    name: &str,
    wasm: &Path,
    config: &str,
) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .upstream("app", &[origin.addr()], "")
        .raw(&format!(
            "[plugin.{name}]\nsource = \"{}\"\nconfig = {config}\n",
            wasm.display()
        ))
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

/// Runs the block policy at `wasm` with `config` and checks what it does.
async fn block_policy_works(wasm: &Path, config: &str, header: &str) -> anyhow::Result<()> {
    let name = unique_plugin_name("block");
    let origin = Origin::echo("app").await?;
    let gateway = one_policy_gateway(&origin, &name, wasm, config).await?;
    let mut client = H1::connect(gateway.addr("web")).await?;

    let plain = client.request(get("app.test", "/")).await?;
    assert_eq!(plain.status, 200, "{}", plain.excerpt());
    for _ in 0..3 {
        let mut blocked = get("app.test", "/");
        blocked.headers_mut().insert(
            http::HeaderName::from_bytes(header.as_bytes())?,
            HeaderValue::from_static("1"),
        );
        let reply = client.request(blocked).await?;
        assert_eq!(reply.status, 403, "{}", reply.excerpt());
        assert_eq!(reply.text(), "blocked\n");
    }
    assert_eq!(
        origin.requests(),
        1,
        "blocked requests never reach the origin"
    );
    let report = gateway.plugin(&name);
    assert_eq!(
        report.counters.get("blocked"),
        Some(&3),
        "each denial was counted: {report:?}"
    );
    assert_eq!(report.stats.errors, 0, "{report:?}");
    Ok(())
}

/// The block policy with its default and its custom header; `None` (the
/// language's tools are missing outside CI) skips.
async fn both_configs(wasm: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(wasm) = wasm else {
        return Ok(());
    };
    block_policy_works(&wasm, "{}", "x-block").await?;
    block_policy_works(&wasm, "{ header = \"x-other\" }", "x-other").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_block_policy_answers_real_requests() -> anyhow::Result<()> {
    both_configs(Some(PathBuf::from(env!("SLUICE_EXAMPLE_BLOCK_WASM")))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_block_policy_answers_real_requests() -> anyhow::Result<()> {
    let app = repo().join("examples/policies/block-python");
    both_configs(python_component(&app, "request-policy")?).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_block_policy_answers_real_requests() -> anyhow::Result<()> {
    let source = repo().join("examples/policies/block-js/policy.js");
    both_configs(js_component(&source, "request-policy")?).await
}

/// Runs the stamp policy at `wasm` (which sets `x-stamp: {stamp}` on each
/// response) with its default config and with `{ stamp = false }`, whose
/// `init` skips `on-response`: then the gateway never calls that hook.
async fn stamp_policy_skips_on_response(wasm: Option<PathBuf>, stamp: &str) -> anyhow::Result<()> {
    let Some(wasm) = wasm else {
        return Ok(());
    };
    let origin = Origin::echo("app").await?;
    for (config, hooks, stamped) in [
        ("{}", vec!["on-request", "on-response"], Some(stamp)),
        ("{ stamp = false }", vec!["on-request"], None),
    ] {
        let name = unique_plugin_name("stamp");
        let gateway = one_policy_gateway(&origin, &name, &wasm, config).await?;
        assert_eq!(gateway.plugin(&name).hooks, hooks, "config {config}");
        let mut client = H1::connect(gateway.addr("web")).await?;
        for _ in 0..3 {
            let reply = client.request(get("app.test", "/")).await?;
            assert_eq!(reply.status, 200, "{}", reply.excerpt());
            assert_eq!(reply.header("x-stamp"), stamped, "config {config}");
        }
        let report = gateway.plugin(&name);
        assert_eq!(
            report.stats.calls,
            3 * hooks.len() as u64,
            "config {config}: Wasm calls for 3 requests"
        );
        assert_eq!(report.stats.errors, 0, "{report:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_can_skip_its_response_hook() -> anyhow::Result<()> {
    let app = repo().join("tests/guests/stamp-python");
    stamp_policy_skips_on_response(python_component(&app, "rewrite-policy")?, "python").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_policy_can_skip_its_response_hook() -> anyhow::Result<()> {
    let source = repo().join("tests/guests/stamp-js/policy.js");
    stamp_policy_skips_on_response(js_component(&source, "rewrite-policy")?, "javascript").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_refusing_its_config_is_a_manifest_error() -> anyhow::Result<()> {
    let wasm = env!("SLUICE_EXAMPLE_BLOCK_WASM");
    let manifest = Manifest::new()
        .listener("web", "")
        .upstream("app", &["127.0.0.1:9".parse()?], "")
        .raw(&format!(
            "[plugin.block]\nsource = \"{wasm}\"\nconfig = {{ headr = \"x\" }}\n"
        ))
        .route("all", "{}", "app", "policies = [\"block\"]")
        .build();
    let error = sluice::Config::parse(&manifest, Path::new("test.toml"))
        .expect_err("a config the plugin refuses is an error");
    let text = error.to_string();
    assert!(
        text.contains("plugin.block.config: plugin \"block\": init refused the config")
            && text.contains("headr"),
        "{text}"
    );
    Ok(())
}
