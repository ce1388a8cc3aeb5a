//! Manifest reload (`POST /reload`, SIGHUP) as an operator of nginx, HAProxy
//! or Envoy expects it: a broken manifest changes nothing; a good one
//! changes routes without dropping keep-alive connections or WebSockets;
//! unchanged upstreams keep their health state and pooled connections;
//! listeners come and go without dropping what they serve.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use sluice_tests::client::{H1, admin_get, admin_send, connect, fetch, get};
use sluice_tests::{Manifest, Mode, Origin, TestGateway, WAIT, within};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const ADMIN: &str = "[admin]\nlisten = \"127.0.0.1:0\"\n";

/// Listener "web", the admin API, upstream "app" on `origin` and route
/// "app" for `/app/`.
fn base(origin: SocketAddr) -> Manifest {
    Manifest::new()
        .listener("web", "")
        .raw(ADMIN)
        .upstream("app", &[origin], "")
        .route("app", "{ path_prefix = \"/app/\" }", "app", "")
}

/// `POST /reload` on the gateway's admin API.
async fn post_reload(gateway: &TestGateway) -> anyhow::Result<sluice_tests::Reply> {
    admin_send(gateway.admin_addr(), "POST", "/reload", None, "").await
}

/// Status of `GET path` on `conn`.
async fn status_on(conn: &mut H1, path: &str) -> anyhow::Result<u16> {
    Ok(conn.request(get("app.test", path)).await?.status.as_u16())
}

/// Upstream `name` as `GET /upstreams` shows it.
async fn upstream(gateway: &TestGateway, name: &str) -> anyhow::Result<Value> {
    let reply = admin_get(gateway.admin_addr(), "/upstreams", None).await?;
    let all = reply.json()?;
    all.as_array()
        .and_then(|list| list.iter().find(|u| u["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no upstream {name} in {all}"))
}

/// A loopback address nothing listens on.
fn closed_port() -> anyhow::Result<SocketAddr> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_manifest_is_refused_and_everything_keeps_serving() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let good = base(origin.addr());
    let gateway = good.start().await?;
    let web = gateway.addr("web");
    let mut conn: H1 = H1::connect(web).await?;
    assert_eq!(status_on(&mut conn, "/app/before").await?, 200);

    // Another socket holds this address, without SO_REUSEPORT.
    let squatter = std::net::TcpListener::bind("127.0.0.1:0")?;
    let taken = squatter.local_addr()?;
    let new_route = "{ path_prefix = \"/new/\" }";
    let cases = [
        (
            "bad TOML",
            format!("{}\n[[route]\nname = \"new\"", good.build()),
            "test.toml: ".to_string(),
        ),
        (
            "unknown upstream",
            good.clone().route("new", new_route, "apx", "").build(),
            "route[1].upstream: route \"new\": upstream \"apx\" is not defined (did you mean \"app\"?)"
                .to_string(),
        ),
        (
            "address in use",
            good.clone()
                .route("new", new_route, "app", "")
                .raw(&format!(
                    "[[listener]]\nname = \"taken\"\nlisten = \"{taken}\"\n"
                ))
                .build(),
            format!("listener[1].listen: listener \"taken\": cannot listen on {taken}: "),
        ),
    ];
    for (case, text, expected) in cases {
        gateway.rewrite(&text)?;
        let reply = post_reload(&gateway).await?;
        assert_eq!(reply.status, 422, "{case}: {}", reply.excerpt());
        let error = reply.json()?["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            error.contains(&expected),
            "{case}: {expected:?} not in {error:?}"
        );
        let direct = gateway.reload().await;
        assert!(direct.is_err(), "{case}: a direct reload was accepted");

        // Nothing changed: the same connection, the same routes, the same listeners.
        assert_eq!(status_on(&mut conn, "/app/after").await?, 200, "{case}");
        assert_eq!(status_on(&mut conn, "/new/x").await?, 404, "{case}");
        let listeners: Vec<String> = gateway.listeners().into_iter().map(|(n, _)| n).collect();
        assert_eq!(listeners, ["web"], "{case}");
        assert_eq!(gateway.addr("web"), web, "{case}");
    }
    assert_eq!(
        origin.connections(),
        1,
        "the upstream connection was kept too"
    );
    drop(squatter);

    // The manifest fixed: it serves.
    gateway.rewrite(&good.clone().route("new", new_route, "app", "").build())?;
    let reply = post_reload(&gateway).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(status_on(&mut conn, "/new/x").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_a_route_without_dropping_keep_alive_connections_or_websockets()
-> anyhow::Result<()> {
    let app = Origin::echo("app").await?;
    let chat = Origin::start("chat", Mode::WebSocketEcho).await?;
    let before = base(app.addr()).upstream("chat", &[chat.addr()], "").route(
        "chat",
        "{ path_prefix = \"/chat/\" }",
        "chat",
        "",
    );
    let gateway = before.start().await?;
    let web = gateway.addr("web");

    let mut conn: H1 = H1::connect(web).await?;
    assert_eq!(status_on(&mut conn, "/app/1").await?, 200);
    assert_eq!(status_on(&mut conn, "/extra/1").await?, 404);
    let request = "ws://chat.example.com/chat/socket".into_client_request()?;
    let (mut ws, response) = within(
        "the WebSocket handshake",
        WAIT,
        tokio_tungstenite::client_async(request, connect(web).await?),
    )
    .await??;
    assert_eq!(response.status(), 101);
    let mut echo = async |text: &str| -> anyhow::Result<()> {
        within("sending a message", WAIT, ws.send(Message::text(text))).await??;
        let echoed = within("the echo", WAIT, ws.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the WebSocket closed"))??;
        anyhow::ensure!(echoed == Message::text(text), "echoed {echoed:?}");
        Ok(())
    };
    echo("before the reload").await?;

    let after = before.route("extra", "{ path_prefix = \"/extra/\" }", "app", "");
    gateway.rewrite(&after.build())?;
    let reply = post_reload(&gateway).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());

    // The new route answers on the connection opened before the reload.
    let reply = conn.request(get("app.test", "/extra/1")).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.json()?["path"], "/extra/1");
    assert_eq!(status_on(&mut conn, "/app/2").await?, 200);
    echo("after the reload").await?;
    assert_eq!(fetch(web, get("app.test", "/extra/2")).await?.status, 200);
    assert_eq!(gateway.addr("web"), web, "the listener kept its socket");

    // And again, with nothing changed at all.
    gateway.reload().await?;
    echo("after a second reload").await?;
    assert_eq!(status_on(&mut conn, "/extra/3").await?, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_upstream_keeps_its_health_and_pool_and_a_changed_one_starts_fresh()
-> anyhow::Result<()> {
    let watched = Origin::echo("watched").await?;
    let pooled = Origin::echo("pooled").await?;
    let changed = Origin::echo("changed").await?;
    let dead = closed_port()?;
    let check =
        "health = { type = \"tcp\", interval = \"1s\", jitter = \"0ms\", rise = 1, fall = 1 }";
    let manifest = |changed_extra: &str| {
        Manifest::new()
            .listener("web", "")
            .raw(ADMIN)
            .upstream("watched", &[watched.addr(), dead], check)
            .upstream("pooled", &[pooled.addr()], "")
            .upstream("changed", &[changed.addr()], changed_extra)
            .route("watched", "{ path_prefix = \"/watched/\" }", "watched", "")
            .route("pooled", "{ path_prefix = \"/pooled/\" }", "pooled", "")
            .route("changed", "{ path_prefix = \"/changed/\" }", "changed", "")
    };
    let gateway = manifest("").start().await?;
    let web = gateway.addr("web");

    // Active checks take the dead endpoint out.
    let started = Instant::now();
    loop {
        let status = upstream(&gateway, "watched").await?;
        if status["endpoints"][1]["check"] == "down" {
            break;
        }
        anyhow::ensure!(started.elapsed() < WAIT, "never checked down: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut conn: H1 = H1::connect(web).await?;
    for path in [
        "/watched/1",
        "/pooled/1",
        "/pooled/2",
        "/changed/1",
        "/changed/2",
    ] {
        assert_eq!(status_on(&mut conn, path).await?, 200, "{path}");
        // Let the upstream connection go back to its pool.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((pooled.connections(), changed.connections()), (1, 1));
    let watched_before = upstream(&gateway, "watched").await?;

    // `changed` gets a new timeout; `watched` and `pooled` are untouched.
    let after =
        manifest("timeout = \"20s\"").route("more", "{ path_prefix = \"/more/\" }", "pooled", "");
    gateway.rewrite(&after.build())?;
    let reply = post_reload(&gateway).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());

    // Right after the reload, with no check cycle in between, the dead
    // endpoint is still down and every figure carries on.
    let watched_after = upstream(&gateway, "watched").await?;
    let dead_after = &watched_after["endpoints"][1];
    assert_eq!(dead_after["check"], "down", "{watched_after}");
    assert_eq!(dead_after["candidate"], false, "{watched_after}");
    assert_eq!(
        dead_after["check_changes"], watched_before["endpoints"][1]["check_changes"],
        "{watched_after}"
    );
    assert_eq!(
        watched_after["endpoints"][0]["selected"], 1,
        "{watched_after}"
    );
    assert_eq!(
        upstream(&gateway, "pooled").await?["endpoints"][0]["selected"],
        2
    );
    assert_eq!(
        upstream(&gateway, "changed").await?["endpoints"][0]["selected"],
        0
    );

    // The unchanged upstream's pooled connection serves on; the changed
    // upstream opens a connection of its own.
    assert_eq!(status_on(&mut conn, "/pooled/3").await?, 200);
    assert_eq!(status_on(&mut conn, "/more/1").await?, 200);
    assert_eq!(status_on(&mut conn, "/changed/3").await?, 200);
    assert_eq!(
        pooled.connections(),
        1,
        "the idle upstream connection was reused"
    );
    assert_eq!(
        changed.connections(),
        2,
        "the changed upstream started a new pool"
    );
    assert_eq!(
        upstream(&gateway, "pooled").await?["endpoints"][0]["selected"],
        4
    );
    for _ in 0..4 {
        assert_eq!(
            status_on(&mut conn, "/watched/2").await?,
            200,
            "the dead endpoint stays out"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_health_check_starts_over_and_a_removed_upstream_stops_its_checks()
-> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let dead = closed_port()?;
    let checked = |interval: &str| {
        base(origin.addr())
            .upstream(
                "checked",
                &[origin.addr(), dead],
                &format!(
                    "health = {{ type = \"tcp\", interval = \"{interval}\", rise = 1, fall = 1 }}"
                ),
            )
            .route("checked", "{ path_prefix = \"/checked/\" }", "checked", "")
    };
    let gateway = checked("100ms").start().await?;
    within("the dead endpoint to be checked down", WAIT, async {
        while upstream(&gateway, "checked").await?["endpoints"][1]["check"] != "down" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::Ok(())
    })
    .await??;

    // A new interval is a new definition: fresh state, checks started over.
    gateway.reload_with(&checked("1h").build()).await?;
    let fresh = upstream(&gateway, "checked").await?;
    assert_eq!(fresh["endpoints"][1]["check"], "up", "{fresh}");
    assert_eq!(fresh["endpoints"][1]["check_changes"], 0, "{fresh}");

    // Removed: its checks stop (the origin sees no more probes).
    gateway.reload_with(&checked("100ms").build()).await?;
    gateway.reload_with(&base(origin.addr()).build()).await?;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let probes = origin.connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        origin.connections(),
        probes,
        "the removed upstream is still checked"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_and_removed_on_every_worker_without_dropping_requests()
-> anyhow::Result<()> {
    let app = Origin::echo("app").await?;
    let slow = Origin::start("slow", Mode::Delay(Duration::from_millis(800))).await?;
    let with = |listeners: &[&str]| {
        let mut manifest = base(app.addr()).upstream("slow", &[slow.addr()], "").route(
            "slow",
            "{ path_prefix = \"/slow/\" }",
            "slow",
            "",
        );
        for name in listeners {
            manifest = manifest.listener(name, "");
        }
        manifest
    };
    let gateway = TestGateway::start_with_workers(&with(&["old"]).build(), 2).await?;
    let (web, old) = (gateway.addr("web"), gateway.addr("old"));
    let mut kept: H1 = H1::connect(web).await?;
    assert_eq!(status_on(&mut kept, "/app/1").await?, 200);

    // A request in flight on the listener about to go.
    let mut leaving: H1 = H1::connect(old).await?;
    let in_flight = leaving.send_unbounded(get("app.test", "/slow/1"));
    let in_flight = tokio::spawn(in_flight);
    slow.wait_for_requests(1, WAIT).await?;

    gateway.reload_with(&with(&["new"]).build()).await?;

    // The removed listener stops accepting at once...
    assert!(
        tokio::net::TcpStream::connect(old).await.is_err(),
        "{old} still accepts after the reload"
    );
    // ...and its request in flight completes, then its connection closes.
    let response = within("the in-flight request", WAIT, in_flight).await???;
    let reply = sluice_tests::Reply::collect(response).await?;
    assert_eq!(reply.status, 200, "{}", reply.excerpt());
    assert_eq!(reply.json()?["origin"], "slow");
    let again = within("a request on the drained connection", WAIT, async {
        leaving.send(get("app.test", "/app/2")).await
    })
    .await?;
    assert!(
        again.is_err(),
        "the removed listener's connection stayed open"
    );

    // The new listener serves on every worker (connections spread across
    // both workers' sockets); the kept one keeps its port and connections.
    let new = gateway.addr("new");
    for i in 0..20 {
        let reply = fetch(new, get("app.test", &format!("/app/new-{i}"))).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
    }
    assert_eq!(gateway.addr("web"), web);
    assert_eq!(status_on(&mut kept, "/app/3").await?, 200);
    let names: Vec<String> = gateway.listeners().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["web", "new"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_listener_applies_its_new_settings_to_new_connections() -> anyhow::Result<()> {
    let app = Origin::echo("app").await?;
    let gateway = base(app.addr()).start().await?;
    let web = gateway.addr("web");
    let mut before: H1 = H1::connect(web).await?;
    assert_eq!(status_on(&mut before, "/app/1").await?, 200);

    let redirecting = Manifest::new()
        .listener("web", "redirect_https = 8443")
        .raw(ADMIN)
        .upstream("app", &[app.addr()], "")
        .route("app", "{ path_prefix = \"/app/\" }", "app", "");
    gateway.reload_with(&redirecting.build()).await?;

    assert_eq!(gateway.addr("web"), web, "same socket");
    let fresh = fetch(web, get("app.test", "/app/2")).await?;
    assert_eq!(fresh.status, 301, "{}", fresh.excerpt());
    assert_eq!(
        status_on(&mut before, "/app/3").await?,
        200,
        "a connection keeps the settings it was accepted with"
    );
    Ok(())
}

/// `sluice run --workers 2` as a process, killed on drop; its stdout lines
/// (JSON logs) arrive on `lines`.
struct Process {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Process {
    fn run(manifest: &std::path::Path) -> anyhow::Result<Process> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-cli"))
            .args(["run", "--workers", "2", "-c"])
            .arg(manifest)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Process { child, lines })
    }

    /// The address in the next `listening` log line of listener `name`.
    fn listening(&self, name: &str) -> anyhow::Result<SocketAddr> {
        let started = Instant::now();
        loop {
            let left = WAIT.saturating_sub(started.elapsed());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                anyhow::anyhow!("listener {name} was not reported listening within {WAIT:?}")
            })?;
            let Ok(log) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if log["message"] == "listening" && log["listener"] == name {
                return Ok(log["addr"].as_str().unwrap_or_default().parse()?);
            }
        }
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -s {signal} failed");
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_and_removes_listeners_on_every_worker_thread() -> anyhow::Result<()> {
    let origin = Origin::echo("app").await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sluice.toml");
    let with = |listeners: &[&str]| {
        let mut manifest = Manifest::new()
            .upstream("app", &[origin.addr()], "")
            .route("all", "{}", "app", "");
        for name in listeners {
            manifest = manifest.listener(name, "");
        }
        manifest.build()
    };
    std::fs::write(&path, with(&["web"]))?;
    let gateway = Process::run(&path)?;
    let web = gateway.listening("web")?;
    assert_eq!(fetch(web, get("app.test", "/")).await?.status, 200);

    std::fs::write(&path, with(&["extra"]))?;
    gateway.signal("HUP")?;
    let extra = gateway.listening("extra")?;
    // Enough fresh connections that both workers' sockets take some.
    for i in 0..20 {
        let reply = fetch(extra, get("app.test", &format!("/{i}"))).await?;
        assert_eq!(reply.status, 200, "{}", reply.excerpt());
    }
    let started = Instant::now();
    while tokio::net::TcpStream::connect(web).await.is_ok() {
        anyhow::ensure!(started.elapsed() < WAIT, "{web} still accepts");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.signal("TERM")?;
    Ok(())
}
