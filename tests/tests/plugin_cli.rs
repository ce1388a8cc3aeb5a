//! `sluice plugin ls|push|rollback` as a process against a real gateway's
//! admin API: what it lists, live swaps and rollbacks checked with real
//! requests, the server's reasons when it refuses, the token, the address
//! from flags, environment or manifest, and an admin API that is not there.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use sluice_tests::client::{H1, get};
use sluice_tests::{Manifest, Origin, TestGateway};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice-cli");
const PROBE: &str = env!("SLUICE_TEST_PROBE_WASM");
const BLOCK: &str = env!("SLUICE_EXAMPLE_BLOCK_WASM");
const TOKEN: &str = "plugin-cli-token-0123456789";

/// What a `sluice` process did.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `sluice plugin ARGS` in `dir` with `env` and none of the caller's
/// `SLUICE_ADMIN*` variables, off the runtime so the gateway keeps serving.
async fn plugin_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Ran> {
    let mut command = Command::new(SLUICE);
    command
        .arg("plugin")
        .args(args)
        .current_dir(dir)
        .env_remove("SLUICE_ADMIN")
        .env_remove("SLUICE_ADMIN_TOKEN")
        .envs(env.iter().copied());
    let out = tokio::task::spawn_blocking(move || command.output()).await??;
    Ok(Ran {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// [`plugin_in`] an empty directory (no `sluice.toml` to find).
async fn plugin(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Ran> {
    let dir = tempfile::tempdir()?;
    plugin_in(dir.path(), args, env).await
}

/// A gateway whose route `all` runs plugin `name` (the block example: 403 to
/// requests carrying `x-block`), with an admin API behind [`TOKEN`].
async fn gateway(name: &str, origin: &Origin) -> anyhow::Result<TestGateway> {
    Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ))
        .raw(&format!("[plugin.{name}]\nsource = \"{BLOCK}\"\n"))
        .upstream("app", &[origin.addr()], "")
        .route("all", "{}", "app", &format!("policies = [\"{name}\"]"))
        .start()
        .await
}

/// `--admin ADDR --token TOKEN` for `gateway`, followed by `args`.
fn with_flags<'a>(admin: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(["--admin", admin, "--token", TOKEN]);
    all
}

/// The status of a request carrying `header: 1`: 403 when the block
/// example blocks on that header, 200 when the request goes through.
async fn status_with(web: SocketAddr, header: &'static str) -> anyhow::Result<u16> {
    let mut req = get("app.test", "/");
    req.headers_mut()
        .insert(header, http::HeaderValue::from_static("1"));
    Ok(H1::connect(web).await?.request(req).await?.status.as_u16())
}

/// The first 12 hex digits of the running version of `plugin`.
fn short_version(gateway: &TestGateway, plugin: &str) -> String {
    gateway.plugin(plugin).version.chars().take(12).collect()
}

/// The `ls` table row of `plugin`, split into its columns.
fn row(ls: &Ran, plugin: &str) -> anyhow::Result<Vec<String>> {
    ls.stdout
        .lines()
        .map(|line| {
            line.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .find(|cells| cells.first().is_some_and(|name| name == plugin))
        .ok_or_else(|| anyhow::anyhow!("no row for {plugin}:\n{ls}"))
}

#[tokio::test]
async fn ls_lists_each_plugin_with_its_short_version_and_stats() -> anyhow::Result<()> {
    let origin = Origin::echo("ls-origin").await?;
    let gateway = Manifest::new()
        .listener("web", "")
        .raw(&format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
        ))
        .raw(&format!("[plugin.ls-guard]\nsource = \"{BLOCK}\"\n"))
        .raw("[plugin.ls-picker]\nsource = \"builtin:round-robin\"\n")
        .upstream("app", &[origin.addr()], "balancer = \"ls-picker\"")
        .route("all", "{}", "app", "policies = [\"ls-guard\"]")
        .start()
        .await?;
    let admin = gateway.admin_addr().to_string();
    anyhow::ensure!(status_with(gateway.addr("web"), "x-block").await? == 403);

    let ls = plugin(&with_flags(&admin, &["ls"]), &[]).await?;
    anyhow::ensure!(ls.code == Some(0), "{ls}");
    let header = ls.stdout.lines().next().unwrap_or_default();
    for column in [
        "NAME", "SOURCE", "VERSION", "CALLS", "ERRORS", "TRAPS", "P99", "KEPT",
    ] {
        anyhow::ensure!(header.contains(column), "column {column}:\n{ls}");
    }
    let guard = row(&ls, "ls-guard")?;
    let calls: u64 = guard.get(3).and_then(|c| c.parse().ok()).unwrap_or(0);
    anyhow::ensure!(
        guard.len() == 8
            && guard[1] == BLOCK
            && guard[2] == short_version(&gateway, "ls-guard")
            && calls >= 1
            && guard[4..6] == ["0", "0"]
            && guard[6].ends_with('s')
            && guard[7] == "0",
        "name, source, version, calls, no errors, no traps, p99, nothing kept:\n{ls}"
    );
    let picker = row(&ls, "ls-picker")?;
    anyhow::ensure!(
        picker[1] == "builtin:round-robin" && picker[2] == short_version(&gateway, "ls-picker"),
        "{ls}"
    );
    anyhow::ensure!(
        !ls.stdout.contains(TOKEN) && !ls.stderr.contains(TOKEN),
        "{ls}"
    );

    let json = plugin(&with_flags(&admin, &["ls", "--json"]), &[]).await?;
    anyhow::ensure!(json.code == Some(0), "{json}");
    let listed: serde_json::Value = serde_json::from_str(&json.stdout)?;
    let guard = listed
        .as_array()
        .and_then(|all| all.iter().find(|p| p["name"] == "ls-guard"))
        .ok_or_else(|| anyhow::anyhow!("ls-guard in {listed}"))?;
    anyhow::ensure!(
        guard["version"] == gateway.plugin("ls-guard").version.as_str(),
        "the full version: {guard}"
    );
    Ok(())
}

#[tokio::test]
async fn push_swaps_the_component_live_and_rollback_restores_the_previous_one() -> anyhow::Result<()>
{
    let origin = Origin::echo("push-origin").await?;
    let gateway = gateway("push-guard", &origin).await?;
    let admin = gateway.admin_addr().to_string();
    let web = gateway.addr("web");
    let block = short_version(&gateway, "push-guard");
    anyhow::ensure!(status_with(web, "x-block").await? == 403);

    let pushed = plugin(&with_flags(&admin, &["push", "push-guard", PROBE]), &[]).await?;
    anyhow::ensure!(pushed.code == Some(0), "{pushed}");
    let probe = short_version(&gateway, "push-guard");
    anyhow::ensure!(probe != block, "a new version runs");
    anyhow::ensure!(
        pushed.stdout == format!("swapped push-guard: {block} -> {probe}\n"),
        "{pushed}"
    );
    anyhow::ensure!(
        status_with(web, "x-block").await? == 200,
        "the probe answers now: it lets x-block through"
    );
    let ls = plugin(&with_flags(&admin, &["ls"]), &[]).await?;
    let listed = row(&ls, "push-guard")?;
    anyhow::ensure!(
        listed[2] == probe && listed.last().is_some_and(|kept| kept == "1"),
        "ls shows the new version and one kept for rollback:\n{ls}"
    );

    let back = plugin(&with_flags(&admin, &["rollback", "push-guard"]), &[]).await?;
    anyhow::ensure!(back.code == Some(0), "{back}");
    anyhow::ensure!(
        back.stdout
            .starts_with(&format!("rolled back push-guard: {probe} -> {block}")),
        "{back}"
    );
    anyhow::ensure!(short_version(&gateway, "push-guard") == block);
    anyhow::ensure!(
        status_with(web, "x-block").await? == 403,
        "the block example answers again"
    );
    Ok(())
}

#[tokio::test]
async fn push_with_config_applies_it_and_bad_json_never_leaves_the_machine() -> anyhow::Result<()> {
    let origin = Origin::echo("config-origin").await?;
    let gateway = gateway("config-guard", &origin).await?;
    let admin = gateway.admin_addr().to_string();
    let web = gateway.addr("web");

    let pushed = plugin(
        &with_flags(
            &admin,
            &[
                "push",
                "config-guard",
                PROBE,
                "--config",
                r#"{"tag": "from-cli"}"#,
            ],
        ),
        &[],
    )
    .await?;
    anyhow::ensure!(pushed.code == Some(0), "{pushed}");
    anyhow::ensure!(
        pushed
            .stdout
            .trim_end()
            .ends_with(r#"config {"tag":"from-cli"}"#),
        "{pushed}"
    );
    anyhow::ensure!(status_with(web, "x-block").await? == 200);
    let seen = origin
        .last_request()
        .ok_or_else(|| anyhow::anyhow!("the origin saw no request"))?;
    anyhow::ensure!(
        seen.headers
            .get("x-probe-tag")
            .and_then(|v| v.to_str().ok())
            == Some("from-cli"),
        "the probe runs with the pushed config: {:?}",
        seen.headers
    );

    let pushed = plugin(
        &with_flags(
            &admin,
            &[
                "push",
                "config-guard",
                BLOCK,
                "--config",
                r#"{"header":"x-other"}"#,
            ],
        ),
        &[],
    )
    .await?;
    anyhow::ensure!(pushed.code == Some(0), "{pushed}");
    anyhow::ensure!(status_with(web, "x-other").await? == 403);
    anyhow::ensure!(status_with(web, "x-block").await? == 200);

    let running = gateway.plugin("config-guard").version;
    for (config, says) in [
        ("{header", "--config is not valid JSON"),
        (r#"["x-other"]"#, "--config must be a JSON object"),
    ] {
        let refused = plugin(
            &with_flags(&admin, &["push", "config-guard", PROBE, "--config", config]),
            &[],
        )
        .await?;
        anyhow::ensure!(refused.code == Some(2), "{refused}");
        anyhow::ensure!(refused.stderr.contains(says), "{refused}");
    }
    anyhow::ensure!(gateway.plugin("config-guard").version == running);
    anyhow::ensure!(status_with(web, "x-other").await? == 403);
    Ok(())
}

#[tokio::test]
async fn a_refused_change_prints_the_servers_reason_and_the_old_version_keeps_serving()
-> anyhow::Result<()> {
    let origin = Origin::echo("refused-origin").await?;
    let gateway = gateway("refused-guard", &origin).await?;
    let admin = gateway.admin_addr().to_string();
    let web = gateway.addr("web");
    let running = gateway.plugin("refused-guard").version;
    let dir = tempfile::tempdir()?;
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm garbage")?;
    let garbage = garbage.to_string_lossy().into_owned();

    let refused = plugin(
        &with_flags(&admin, &["push", "refused-guard", &garbage]),
        &[],
    )
    .await?;
    anyhow::ensure!(refused.code == Some(1), "{refused}");
    anyhow::ensure!(
        refused.stderr.contains("not a valid Wasm component") && refused.stderr.contains("422"),
        "the server's reason and status:\n{refused}"
    );
    anyhow::ensure!(refused.stdout.is_empty(), "{refused}");
    anyhow::ensure!(gateway.plugin("refused-guard").version == running);
    anyhow::ensure!(
        status_with(web, "x-block").await? == 403,
        "the running version still answers"
    );

    let nothing = plugin(&with_flags(&admin, &["rollback", "refused-guard"]), &[]).await?;
    anyhow::ensure!(nothing.code == Some(1), "{nothing}");
    anyhow::ensure!(
        nothing.stderr.contains("no earlier version") && nothing.stderr.contains("409"),
        "{nothing}"
    );

    let unknown = plugin(&with_flags(&admin, &["push", "no-such", BLOCK]), &[]).await?;
    anyhow::ensure!(unknown.code == Some(1), "{unknown}");
    anyhow::ensure!(
        unknown.stderr.contains("no plugin named \"no-such\"") && unknown.stderr.contains("404"),
        "{unknown}"
    );

    let missing = dir.path().join("missing.wasm");
    let missing = missing.to_string_lossy().into_owned();
    let unread = plugin(
        &with_flags(&admin, &["push", "refused-guard", &missing]),
        &[],
    )
    .await?;
    anyhow::ensure!(unread.code == Some(2), "{unread}");
    anyhow::ensure!(
        unread.stderr.contains(&missing),
        "names the file:\n{unread}"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_named_and_never_printed() -> anyhow::Result<()> {
    let origin = Origin::echo("token-origin").await?;
    let gateway = gateway("token-guard", &origin).await?;
    let admin = gateway.admin_addr().to_string();
    let running = gateway.plugin("token-guard").version;

    let missing = plugin(&["ls", "--admin", &admin], &[]).await?;
    anyhow::ensure!(missing.code == Some(1), "{missing}");
    anyhow::ensure!(
        missing.stderr.contains("needs a token")
            && missing.stderr.contains("--token")
            && missing.stderr.contains("SLUICE_ADMIN_TOKEN"),
        "{missing}"
    );

    // A push: the gateway refuses before reading the upload and closes.
    let wrong_token = "wrong-token-0123456789";
    let wrong = plugin(
        &[
            "push",
            "token-guard",
            PROBE,
            "--admin",
            &admin,
            "--token",
            wrong_token,
        ],
        &[],
    )
    .await?;
    anyhow::ensure!(wrong.code == Some(1), "{wrong}");
    anyhow::ensure!(
        wrong.stderr.contains("refused the token") && wrong.stderr.contains("--token"),
        "{wrong}"
    );
    anyhow::ensure!(
        !wrong.stderr.contains(wrong_token) && !wrong.stdout.contains(wrong_token),
        "the token is never printed:\n{wrong}"
    );
    anyhow::ensure!(gateway.plugin("token-guard").version == running);

    let help = plugin(&["push", "--help"], &[("SLUICE_ADMIN_TOKEN", wrong_token)]).await?;
    anyhow::ensure!(help.code == Some(0), "{help}");
    anyhow::ensure!(
        help.stdout.contains("SLUICE_ADMIN_TOKEN") && !help.stdout.contains(wrong_token),
        "--help names the variable, never its value:\n{help}"
    );
    Ok(())
}

#[tokio::test]
async fn env_vars_and_the_manifest_stand_in_for_the_flags() -> anyhow::Result<()> {
    let origin = Origin::echo("env-origin").await?;
    let gateway = gateway("env-guard", &origin).await?;
    let admin = gateway.admin_addr();
    let web = gateway.addr("web");
    let env = [
        ("SLUICE_ADMIN", admin.to_string()),
        ("SLUICE_ADMIN_TOKEN", TOKEN.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let ls = plugin(&["ls"], &env).await?;
    anyhow::ensure!(ls.code == Some(0), "{ls}");
    row(&ls, "env-guard")?;
    let pushed = plugin(&["push", "env-guard", PROBE], &env).await?;
    anyhow::ensure!(pushed.code == Some(0), "{pushed}");
    anyhow::ensure!(status_with(web, "x-block").await? == 200);
    let back = plugin(&["rollback", "env-guard"], &env).await?;
    anyhow::ensure!(back.code == Some(0), "{back}");
    anyhow::ensure!(status_with(web, "x-block").await? == 403);

    // The flag wins over the variable.
    let closed = closed_addr()?.to_string();
    let admin_flag = admin.to_string();
    let overridden = plugin(
        &["ls", "--admin", &admin_flag],
        &[
            ("SLUICE_ADMIN", closed.as_str()),
            ("SLUICE_ADMIN_TOKEN", TOKEN),
        ],
    )
    .await?;
    anyhow::ensure!(overridden.code == Some(0), "{overridden}");

    // No address given: `[admin] listen` of ./sluice.toml, or of `-c PATH`;
    // a wildcard listen address is dialled on loopback.
    let dir = tempfile::tempdir()?;
    let manifest = format!(
        "[admin]\nlisten = \"0.0.0.0:{}\"\ntoken = \"env:SLUICE_ADMIN_TOKEN\"\n",
        admin.port()
    );
    std::fs::write(dir.path().join("sluice.toml"), &manifest)?;
    let token_only = [("SLUICE_ADMIN_TOKEN", TOKEN)];
    let from_default = plugin_in(dir.path(), &["ls"], &token_only).await?;
    anyhow::ensure!(from_default.code == Some(0), "{from_default}");
    row(&from_default, "env-guard")?;
    let path = dir
        .path()
        .join("sluice.toml")
        .to_string_lossy()
        .into_owned();
    let from_flag = plugin(&["ls", "-c", &path], &token_only).await?;
    anyhow::ensure!(from_flag.code == Some(0), "{from_flag}");
    row(&from_flag, "env-guard")?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_admin_api_is_named() -> anyhow::Result<()> {
    let closed = closed_addr()?.to_string();
    let ran = plugin(&["ls", "--admin", &closed, "--token", TOKEN], &[]).await?;
    anyhow::ensure!(ran.code == Some(3), "{ran}");
    anyhow::ensure!(
        ran.stderr
            .contains(&format!("the admin API at {closed} is not reachable"))
            && ran.stderr.contains("--admin"),
        "{ran}"
    );

    let missing = plugin(&["ls", "-c", "no-such-manifest.toml"], &[]).await?;
    anyhow::ensure!(missing.code == Some(2), "{missing}");
    anyhow::ensure!(
        missing.stderr.contains("no-such-manifest.toml"),
        "{missing}"
    );

    let bad = plugin(&["ls", "--admin", "localhost"], &[]).await?;
    anyhow::ensure!(bad.code == Some(2), "{bad}");
    anyhow::ensure!(
        bad.stderr.contains("invalid admin address \"localhost\""),
        "{bad}"
    );
    Ok(())
}

/// An address nothing listens on: bound, then released.
fn closed_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
