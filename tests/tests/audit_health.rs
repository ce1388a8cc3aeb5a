//! The admin API's audit log and health endpoints through real requests:
//! every change (swap, config change, refused upload, rollback, reload,
//! unauthorised attempt) is recorded in order, in memory and in the JSONL
//! file, naming the token by its hash; GETs are not recorded; an audit file
//! that cannot be opened is a manifest error. `/health/live` and
//! `/health/ready` answer load balancers without the token, ready turns 503
//! naming the route whose endpoints are all down; `/health` needs the token.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use sluice_tests::client::{admin_get, admin_send};
use sluice_tests::{Manifest, Origin, TestGateway, WAIT};

const PROBE: &str = env!("SLUICE_TEST_PROBE_WASM");
const BLOCK: &str = env!("SLUICE_EXAMPLE_BLOCK_WASM");

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `[admin]` table: loopback, `token` when given, `audit_log` when given.
fn admin_table(token: Option<&str>, audit_log: Option<&Path>) -> String {
    let mut table = "[admin]\nlisten = \"127.0.0.1:0\"\n".to_string();
    if let Some(token) = token {
        table.push_str(&format!("token = \"{token}\"\n"));
    }
    if let Some(path) = audit_log {
        table.push_str(&format!("audit_log = {:?}\n", path.display().to_string()));
    }
    table
}

/// The entries of `GET /audit` (with `query`, like `?limit=2`).
async fn audit(admin: SocketAddr, query: &str, token: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let reply = admin_get(admin, &format!("/audit{query}"), token).await?;
    anyhow::ensure!(reply.status == 200, "GET /audit: {}", reply.excerpt());
    let json = reply.json()?;
    json.as_array()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("GET /audit is not a list: {json}"))
}

/// Waits until `path` holds `lines` lines; returns its text.
async fn file_with_lines(path: &Path, lines: usize) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            return Ok(text);
        }
        anyhow::ensure!(
            started.elapsed() < WAIT,
            "{} has {} lines after {WAIT:?}, expected {lines}:\n{text}",
            path.display(),
            text.lines().count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_change_is_audited_in_order_naming_the_token_by_its_hash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("audit.jsonl");
    let origin = Origin::echo("audit-origin").await?;
    let token = "audit-token-0123456789abcdef";
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin_table(Some(token), Some(&log)))
        .raw(&format!("[plugin.guard]\nsource = \"{BLOCK}\"\n"))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"guard\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr();
    let block = std::fs::read(BLOCK)?;
    let probe = std::fs::read(PROBE)?;
    let garbage = &b"\0asm garbage"[..];
    let (block_v, probe_v, garbage_v) =
        (sha256_hex(&block), sha256_hex(&probe), sha256_hex(garbage));

    let swap = admin_send(
        admin,
        "PUT",
        "/plugins/guard?config=%7B%22tag%22%3A%22b%22%7D",
        Some(token),
        probe.clone(),
    )
    .await?;
    anyhow::ensure!(swap.status == 200, "swap: {}", swap.excerpt());
    let config = admin_send(
        admin,
        "PUT",
        "/plugins/guard/config",
        Some(token),
        r#"{"tag":"c"}"#,
    )
    .await?;
    anyhow::ensure!(config.status == 200, "config: {}", config.excerpt());
    let refused = admin_send(admin, "PUT", "/plugins/guard", Some(token), garbage).await?;
    anyhow::ensure!(refused.status == 422, "garbage: {}", refused.excerpt());
    let rollback = admin_send(admin, "POST", "/plugins/guard/rollback", Some(token), "").await?;
    anyhow::ensure!(rollback.status == 200, "rollback: {}", rollback.excerpt());
    let reload = admin_send(admin, "POST", "/reload", Some(token), "").await?;
    anyhow::ensure!(reload.status == 200, "reload: {}", reload.excerpt());
    let intruder = admin_send(
        admin,
        "PUT",
        "/plugins/guard",
        Some("wrong-token-0123456789abcdef"),
        probe.clone(),
    )
    .await?;
    anyhow::ensure!(
        intruder.status == 401,
        "wrong token: {}",
        intruder.excerpt()
    );
    // Reads are not changes.
    for path in ["/plugins", "/upstreams", "/health", "/audit"] {
        let reply = admin_get(admin, path, Some(token)).await?;
        anyhow::ensure!(reply.status == 200, "GET {path}: {}", reply.excerpt());
    }
    let unauthorised_read = admin_get(admin, "/plugins", None).await?;
    anyhow::ensure!(unauthorised_read.status == 401);

    let reply = admin_get(admin, "/audit", Some(token)).await?;
    anyhow::ensure!(
        !reply.text().contains(token),
        "the token is never recorded: {}",
        reply.text()
    );
    let entries = audit(admin, "", Some(token)).await?;
    let summary: Vec<String> = entries
        .iter()
        .map(|e| format!("{} {} {}", e["action"], e["target"], e["result"]))
        .collect();
    let manifest = gateway.manifest_path().display().to_string();
    anyhow::ensure!(
        summary
            == [
                r#""upload" "guard" "ok""#.to_string(),
                r#""config" "guard" "ok""#.to_string(),
                r#""upload" "guard" "refused""#.to_string(),
                r#""rollback" "guard" "ok""#.to_string(),
                format!(r#""reload" {manifest:?} "ok""#),
                r#""upload" "guard" "unauthorized""#.to_string(),
            ],
        "{summary:#?}"
    );

    let token_id = format!("token:{}", &sha256_hex(token.as_bytes())[..12]);
    for entry in &entries[..5] {
        anyhow::ensure!(entry["who"] == token_id.as_str(), "who: {entry}");
        let peer = entry["peer"].as_str().unwrap_or_default();
        anyhow::ensure!(peer.starts_with("127.0.0.1:"), "peer: {entry}");
    }
    for entry in &entries {
        let at = entry["at"].as_str().unwrap_or_default();
        // RFC 3339, UTC, milliseconds: 2025-01-02T03:04:05.678Z
        anyhow::ensure!(
            at.len() == 24 && at.ends_with('Z') && at.as_bytes()[19] == b'.',
            "at: {entry}"
        );
    }

    let [upload, change, bad, back, reloaded, unauthorised] = &entries[..] else {
        anyhow::bail!("six entries");
    };
    anyhow::ensure!(
        upload["old_version"] == block_v.as_str()
            && upload["new_version"] == probe_v.as_str()
            && upload["config"]["tag"] == "b"
            && upload["status"] == 200,
        "swap: {upload}"
    );
    anyhow::ensure!(
        change["old_version"] == probe_v.as_str()
            && change["new_version"] == probe_v.as_str()
            && change["config"]["tag"] == "c",
        "config change: {change}"
    );
    anyhow::ensure!(
        bad["old_version"] == probe_v.as_str()
            && bad["new_version"] == garbage_v.as_str()
            && bad["status"] == 422
            && bad["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not a valid Wasm component"),
        "refused upload: {bad}"
    );
    anyhow::ensure!(
        back["old_version"] == probe_v.as_str()
            && back["new_version"] == probe_v.as_str()
            && back["config"]["tag"] == "b",
        "rollback to the swapped-in version and its config: {back}"
    );
    anyhow::ensure!(
        reloaded["status"] == 200 && reloaded.get("old_version").is_none(),
        "reload: {reloaded}"
    );
    let peer = unauthorised["peer"].as_str().unwrap_or_default();
    anyhow::ensure!(
        unauthorised["who"] == peer
            && peer.starts_with("127.0.0.1:")
            && unauthorised["status"] == 401,
        "an unauthorised attempt is named by its peer: {unauthorised}"
    );

    let last_two = audit(admin, "?limit=2", Some(token)).await?;
    anyhow::ensure!(last_two == entries[4..], "?limit=2: {last_two:?}");
    anyhow::ensure!(audit(admin, "?limit=0", Some(token)).await?.is_empty());
    let bad_limit = admin_get(admin, "/audit?limit=many", Some(token)).await?;
    anyhow::ensure!(bad_limit.status == 400, "{}", bad_limit.excerpt());

    // The file has the same entries, one JSON object a line.
    let text = file_with_lines(&log, entries.len()).await?;
    anyhow::ensure!(!text.contains(token), "the token is never written: {text}");
    let lines: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(lines == entries, "file:\n{text}\nmemory: {entries:#?}");
    Ok(())
}

#[tokio::test]
async fn without_a_token_or_a_file_changes_are_kept_in_memory_by_peer() -> anyhow::Result<()> {
    let origin = Origin::echo("memory-origin").await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin_table(None, None))
        .raw(&format!("[plugin.guard]\nsource = \"{BLOCK}\"\n"))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", "policies = [\"guard\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr();
    let reply = admin_send(admin, "PUT", "/plugins/guard/config", None, "{}").await?;
    anyhow::ensure!(reply.status == 200, "{}", reply.excerpt());
    let missing = admin_send(admin, "POST", "/plugins/nope/rollback", None, "").await?;
    anyhow::ensure!(missing.status == 404, "{}", missing.excerpt());
    let entries = audit(admin, "", None).await?;
    anyhow::ensure!(entries.len() == 2, "{entries:#?}");
    for entry in &entries {
        let who = entry["who"].as_str().unwrap_or_default();
        anyhow::ensure!(
            who.starts_with("127.0.0.1:") && entry["peer"] == who,
            "the peer is who: {entry}"
        );
    }
    anyhow::ensure!(
        entries[1]["action"] == "rollback"
            && entries[1]["target"] == "nope"
            && entries[1]["result"] == "refused"
            && entries[1]["status"] == 404,
        "{}",
        entries[1]
    );
    Ok(())
}

#[tokio::test]
async fn an_audit_log_that_cannot_be_opened_is_an_error_naming_the_key() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let origin: SocketAddr = "127.0.0.1:9".parse()?;
    for path in [
        dir.path().to_path_buf(),
        dir.path().join("no/such/dir/audit.jsonl"),
    ] {
        let started = Manifest::simple(origin, "", "")
            .raw(&admin_table(None, Some(&path)))
            .start()
            .await;
        let Err(error) = started else {
            anyhow::bail!("{} was accepted as the audit log", path.display());
        };
        let message = format!("{error:#}");
        anyhow::ensure!(
            message.contains("admin.audit_log") && message.contains(&path.display().to_string()),
            "the error names the key and the path: {message}"
        );
    }
    Ok(())
}

/// Polls `/health/ready` (no token) until it answers `want`.
async fn ready_becomes(admin: SocketAddr, want: u16) -> anyhow::Result<Value> {
    let started = Instant::now();
    loop {
        let reply = admin_get(admin, "/health/ready", None).await?;
        if reply.status == want {
            return reply.json();
        }
        anyhow::ensure!(
            started.elapsed() < WAIT,
            "/health/ready answered {} after {WAIT:?}, expected {want}: {}",
            reply.status,
            reply.excerpt()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_503_naming_the_route_whose_endpoints_are_all_down() -> anyhow::Result<()> {
    let origin = Origin::echo("ready-origin").await?;
    let spare = Origin::echo("ready-spare").await?;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let token = "health-token-0123456789abcdef";
    let check =
        "health = { type = \"tcp\", interval = \"50ms\", timeout = \"200ms\", rise = 1, fall = 1 }";
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&admin_table(Some(token), None))
        .upstream("app", &[origin.addr()], check)
        .raw(&format!(
            "[upstream.backed]\nendpoints = [\"{closed}\", {{ addr = \"{}\", backup = true }}]\n{check}\n",
            spare.addr()
        ))
        .route("all", "{}", "app", "")
        .route("fallback", "{ path_prefix = \"/fallback/\" }", "backed", "")
        .start()
        .await?;
    let admin = gateway.admin_addr();

    let live = admin_get(admin, "/health/live", None).await?;
    anyhow::ensure!(live.status == 200, "{}", live.excerpt());
    anyhow::ensure!(live.json()?["status"] == "live");

    // The closed primary goes down; its backup keeps the route ready.
    wait_for_check(&gateway, token, "backed", 0, "down").await?;
    let ready = ready_becomes(admin, 200).await?;
    anyhow::ensure!(ready["status"] == "ready", "{ready}");

    let anonymous = admin_get(admin, "/health", None).await?;
    anyhow::ensure!(anonymous.status == 401, "{}", anonymous.excerpt());
    let detail = admin_get(admin, "/health", Some(token)).await?;
    anyhow::ensure!(detail.status == 200, "{}", detail.excerpt());
    let detail = detail.json()?;
    anyhow::ensure!(
        detail["status"] == "ready"
            && detail["config"]["source"] == gateway.manifest_path().display().to_string().as_str()
            && detail["config"]["loaded_at"].is_string()
            && detail["uptime_ms"].is_u64()
            && detail["listeners"][0]["name"] == "web"
            && detail["listeners"][0]["bound"] == gateway.addr("web").to_string().as_str(),
        "{detail:#}"
    );
    let route = |detail: &Value, name: &str| {
        detail["routes"]
            .as_array()
            .and_then(|routes| routes.iter().find(|r| r["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    let all = route(&detail, "all");
    anyhow::ensure!(
        all["upstream"] == "app" && all["healthy"] == 1 && all["total"] == 1,
        "{all}"
    );
    let fallback = route(&detail, "fallback");
    anyhow::ensure!(
        fallback["upstream"] == "backed"
            && fallback["healthy"] == 1
            && fallback["total"] == 2
            && fallback["backups"]["healthy"] == 1
            && fallback["backups"]["total"] == 1,
        "{fallback}"
    );

    // The only endpoint of `app` goes away.
    drop(origin);
    let not_ready = ready_becomes(admin, 503).await?;
    anyhow::ensure!(
        not_ready["routes_without_healthy_endpoints"] == serde_json::json!(["all"]),
        "{not_ready}"
    );
    let problems = not_ready["problems"].to_string();
    anyhow::ensure!(
        problems.contains("\\\"all\\\"") && problems.contains("\\\"app\\\""),
        "{problems}"
    );
    let live = admin_get(admin, "/health/live", None).await?;
    anyhow::ensure!(
        live.status == 200,
        "live while not ready: {}",
        live.excerpt()
    );
    let detail = admin_get(admin, "/health", Some(token)).await?.json()?;
    anyhow::ensure!(
        detail["status"] == "not ready" && route(&detail, "all")["healthy"] == 0,
        "{detail:#}"
    );
    Ok(())
}

/// Polls `/upstreams` until endpoint `id` of upstream `upstream` has check state `want`.
async fn wait_for_check(
    gateway: &TestGateway,
    token: &str,
    upstream: &str,
    id: usize,
    want: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let json = admin_get(gateway.admin_addr(), "/upstreams", Some(token))
            .await?
            .json()?;
        let state = json
            .as_array()
            .and_then(|list| list.iter().find(|u| u["name"] == upstream))
            .map(|u| u["endpoints"][id]["check"].clone())
            .unwrap_or_default();
        if state == want {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < WAIT,
            "{upstream}[{id}] check is {state} after {WAIT:?}, expected {want}: {json}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_reload_whose_audit_log_cannot_be_opened_is_refused_and_audited() -> anyhow::Result<()> {
    let origin = Origin::echo("reload-origin").await?;
    let text = |audit_log: &str| {
        Manifest::simple(origin.addr(), "", "").raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\naudit_log = \"{audit_log}\"\n"
        ))
    };
    let gateway = text("audit.jsonl").start().await?;
    let admin = gateway.admin_addr();
    let manifest = gateway.manifest_path().to_path_buf();
    // Relative to the manifest's directory, not the working directory.
    let log = manifest
        .parent()
        .ok_or_else(|| anyhow::anyhow!("the manifest has a directory"))?
        .join("audit.jsonl");
    anyhow::ensure!(
        log.is_file(),
        "the audit log is created next to the manifest"
    );

    gateway.rewrite(&text("missing/audit.jsonl").build())?;
    let refused = admin_send(admin, "POST", "/reload", None, "").await?;
    anyhow::ensure!(refused.status == 422, "{}", refused.excerpt());
    anyhow::ensure!(
        refused.text().contains("admin.audit_log"),
        "{}",
        refused.text()
    );
    let health = admin_get(admin, "/health", None).await?.json()?;
    anyhow::ensure!(health["config"]["reloads"] == 0, "{health:#}");
    let ready = admin_get(admin, "/health/ready", None).await?;
    anyhow::ensure!(ready.status == 200, "still serving: {}", ready.excerpt());

    gateway.rewrite(&text("audit.jsonl").build())?;
    let reloaded = admin_send(admin, "POST", "/reload", None, "").await?;
    anyhow::ensure!(reloaded.status == 200, "{}", reloaded.excerpt());
    let health = admin_get(admin, "/health", None).await?.json()?;
    anyhow::ensure!(health["config"]["reloads"] == 1, "{health:#}");

    let text = file_with_lines(&log, 2).await?;
    let entries: Vec<Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let target = manifest.display().to_string();
    anyhow::ensure!(
        entries.len() == 2
            && entries
                .iter()
                .all(|e| e["action"] == "reload" && e["target"] == target.as_str())
            && entries[0]["result"] == "refused"
            && entries[0]["status"] == 422
            && entries[1]["result"] == "ok"
            && entries[1]["status"] == 200,
        "{text}"
    );
    Ok(())
}
