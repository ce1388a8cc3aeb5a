//! The `sluice` command as a process: `check` errors, SIGTERM drain, SIGHUP reload.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice-cli");

fn write_manifest(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `sluice check -c path` → (exit code, stderr).
fn check(path: &Path) -> (i32, String) {
    let out = Command::new(SLUICE)
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:0"

[upstream.api]
endpoints = ["127.0.0.1:9101"]

[[route]]
name = "api"
match = { path_prefix = "/v1/" }
upstream = "api"
"#;

#[test]
fn check_accepts_a_good_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_manifest(dir.path(), "good.toml", GOOD);
    let out = Command::new(SLUICE)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn check_accepts_the_demo_manifest() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml");
    let (code, stderr) = check(&demo);
    assert_eq!(code, 0, "{stderr}");
}

/// Each bad manifest → exit 2 and a message naming the file, the key and the problem.
#[test]
fn check_names_file_key_and_problem_for_each_bad_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown-key",
            GOOD.replace(
                "upstream = \"api\"",
                "upstream = \"api\"\nupstrem_timeout = \"1s\"",
            ),
            "route[0].upstrem_timeout: unknown field `upstrem_timeout`, expected one of `name`, `match`",
        ),
        (
            "undefined-upstream",
            GOOD.replace("upstream = \"api\"", "upstream = \"apx\""),
            "route[0].upstream: route \"api\": upstream \"apx\" is not defined (did you mean \"api\"?)",
        ),
        (
            "bad-duration",
            GOOD.replace(
                "[upstream.api]",
                "[upstream.api]\nconnect_timeout = \"1 fortnight\"",
            ),
            "upstream.api.connect_timeout: invalid duration \"1 fortnight\"",
        ),
        (
            "unitless-duration",
            GOOD.replace("[upstream.api]", "[upstream.api]\ntimeout = \"30\""),
            "upstream.api.timeout: invalid duration \"30\": a unit is required",
        ),
        (
            "bad-listen-address",
            GOOD.replace("127.0.0.1:0", "127.0.0.1"),
            "listener[0].listen: invalid address \"127.0.0.1\"",
        ),
        (
            "bad-endpoint-address",
            GOOD.replace("127.0.0.1:9101", "backend:80"),
            "upstream.api.endpoints[0]: invalid address \"backend:80\"",
        ),
        (
            "duplicate-route",
            format!(
                "{GOOD}\n[[route]]\nname = \"api\"\nmatch = {{ path_prefix = \"/v2/\" }}\nupstream = \"api\"\n"
            ),
            "route[1].name: duplicate route name \"api\"",
        ),
        (
            "duplicate-listener",
            format!("{GOOD}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n"),
            "listener[1].name: duplicate listener name \"web\"",
        ),
        (
            "route-never-matches",
            format!(
                "{GOOD}\n[[route]]\nname = \"shadow\"\nmatch = {{ path_prefix = \"/v1/\" }}\nupstream = \"api\"\n"
            ),
            "route[1].match: route \"shadow\" can never match: route \"api\"",
        ),
        (
            "empty-methods",
            GOOD.replace(
                "path_prefix = \"/v1/\"",
                "path_prefix = \"/v1/\", methods = []",
            ),
            "route[0].match.methods: an empty list can never match",
        ),
        (
            "missing-tls-files",
            GOOD.replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:0\"\ntls = [{ cert = \"nope.pem\", key = \"nope.key\" }]",
            ),
            "listener[0].tls[0].cert: cannot read certificate",
        ),
        (
            "plugin-init-refuses-config",
            format!(
                "{GOOD}\n[plugin.probe]\nsource = \"{}\"\nconfig = {{ fail = \"limit must be positive\" }}\n",
                env!("SLUICE_TEST_PROBE_WASM")
            ),
            "plugin.probe.config: plugin \"probe\": init refused the config: limit must be positive",
        ),
        (
            "builtin-plugin-bad-config",
            format!(
                "{GOOD}\n[plugin.hdr]\nsource = \"builtin:headers\"\nconfig = {{ request = {{ set = {{ \"bad name\" = \"1\" }} }} }}\n"
            ),
            "plugin.hdr.config: plugin \"hdr\": init refused the config: request.set.\"bad name\"",
        ),
        (
            "plugin-not-a-component",
            format!("{GOOD}\n[plugin.junk]\nsource = \"unknown-key.toml\"\n"),
            "plugin.junk.source: plugin \"junk\": not a valid Wasm component",
        ),
        (
            "plugin-missing-file",
            format!("{GOOD}\n[plugin.gone]\nsource = \"gone.wasm\"\n"),
            "plugin.gone.source: plugin \"gone\": cannot read",
        ),
        (
            "unknown-builtin",
            format!("{GOOD}\n[plugin.rl]\nsource = \"builtin:rate-limitt\"\n"),
            "plugin.rl.source: plugin \"rl\": there is no builtin plugin \"rate-limitt\"",
        ),
        (
            "undefined-policy",
            GOOD.replace(
                "upstream = \"api\"",
                "upstream = \"api\"\npolicies = [\"limit\"]",
            ),
            "route[0].policies[0]: plugin \"limit\" is not defined",
        ),
        (
            "balancer-is-not-a-policy",
            GOOD.replace(
                "upstream = \"api\"",
                "upstream = \"api\"\npolicies = [\"rr\"]",
            ) + "\n[plugin.rr]\nsource = \"builtin:round-robin\"\n",
            "route[0].policies[0]: plugin \"rr\" is a balancer only",
        ),
        (
            "policy-is-not-a-balancer",
            GOOD.replace("[upstream.api]", "[upstream.api]\nbalancer = \"hdr\"")
                + "\n[plugin.hdr]\nsource = \"builtin:headers\"\n",
            "upstream.api.balancer: plugin \"hdr\" does not export `balance`",
        ),
        (
            "bad-on-error",
            format!("{GOOD}\n[plugin.hdr]\nsource = \"builtin:headers\"\non_error = \"ignore\"\n"),
            "plugin.hdr.on_error: unknown variant `ignore`, expected `open` or `closed`",
        ),
        (
            "toml-syntax",
            GOOD.replace("name = \"web\"", "name = web"),
            "(line 3, column",
        ),
    ];
    for (name, text, expected) in cases {
        let path = write_manifest(dir.path(), &format!("{name}.toml"), text);
        let (code, stderr) = check(&path);
        assert_eq!(code, 2, "{name}: expected exit 2, stderr: {stderr}");
        assert!(
            stderr.contains(&path.display().to_string()),
            "{name}: file not named in: {stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in: {stderr}"
        );
    }
}

#[test]
fn check_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD
        .replace("upstream = \"api\"", "upstream = \"nope\"")
        .replace("127.0.0.1:9101", "127.0.0.1:99999");
    let path = write_manifest(dir.path(), "many.toml", &text);
    let (code, stderr) = check(&path);
    assert_eq!(code, 2);
    assert!(stderr.contains("upstream.api.endpoints[0]"), "{stderr}");
    assert!(stderr.contains("route[0].upstream"), "{stderr}");
    assert!(stderr.contains("2 problems found"), "{stderr}");
}

/// A running `sluice run`, killed on drop.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    addr: SocketAddr,
}

impl Running {
    fn start(manifest: &Path) -> Running {
        Running::start_with(&["run", "--workers", "2", "-c"], manifest)
    }

    fn start_with(args: &[&str], manifest: &Path) -> Running {
        let mut child = Command::new(SLUICE)
            .args(args)
            .arg(manifest)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut running = Running {
            child,
            lines,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let line = running.wait_for("\"listening\"", Duration::from_secs(20));
        let json: serde_json::Value = serde_json::from_str(&line).unwrap();
        running.addr = json["addr"].as_str().unwrap().parse().unwrap();
        running
    }

    /// The next stdout line containing `needle`, or a panic after `within`.
    fn wait_for(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no line with {needle} within {within:?}"),
            }
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status.code().unwrap_or(-1));
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A backend that answers every request after `delay`, with `name` as body.
/// Returns its address; runs until the test process ends.
fn slow_backend(delay: Duration, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                loop {
                    let Ok(n) = stream.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        thread::sleep(delay);
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                            name.len()
                        );
                        if stream.write_all(response.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// One GET over a fresh connection; returns (status line, body).
fn get(addr: SocketAddr, path: &str) -> (String, String) {
    get_with(addr, path, "")
}

/// `GET path` with `headers` (complete lines) added; the status line and the body.
fn get_with(addr: SocketAddr, path: &str, headers: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: test\r\n{headers}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text.lines().next().unwrap_or("").to_string();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// The entry named `name` in the JSON list the admin API answers at `path`.
fn admin_item(admin: SocketAddr, path: &str, name: &str) -> serde_json::Value {
    let (status, body) = get(admin, path);
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let items: serde_json::Value = serde_json::from_str(&body).unwrap();
    items
        .as_array()
        .unwrap()
        .iter()
        .find(|item| item["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {path}: {body}"))
        .clone()
}

fn manifest_for(backend: SocketAddr, extra_routes: &str) -> String {
    format!(
        r#"
[server]
drain_timeout = "10s"

[[listener]]
name = "web"
listen = "127.0.0.1:0"

[upstream.slow]
endpoints = ["{backend}"]

[[route]]
name = "slow"
match = {{ path_prefix = "/slow" }}
upstream = "slow"
{extra_routes}
"#
    )
}

#[test]
fn sigterm_drains_an_in_flight_request_then_exits_zero() {
    let backend = slow_backend(Duration::from_millis(1500), "finished");
    let dir = tempfile::tempdir().unwrap();
    let path = write_manifest(dir.path(), "drain.toml", &manifest_for(backend, ""));
    let mut gateway = Running::start(&path);
    let addr = gateway.addr;
    let in_flight = thread::spawn(move || get(addr, "/slow"));
    // The request is in flight once the backend has it; give it a moment to get there.
    thread::sleep(Duration::from_millis(300));
    gateway.signal("TERM");
    // Each of the two workers closes its own listening socket and says so.
    gateway.wait_for("stopped accepting", Duration::from_secs(5));
    gateway.wait_for("stopped accepting", Duration::from_secs(5));
    // New connections are refused while draining.
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "still accepting after SIGTERM"
    );
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert_eq!(body, "finished");
    assert_eq!(gateway.wait_exit(Duration::from_secs(10)), Some(0));
}

#[test]
fn sighup_reloads_routes_and_a_broken_manifest_keeps_the_old_ones() {
    let backend = slow_backend(Duration::ZERO, "fast");
    let dir = tempfile::tempdir().unwrap();
    let path = write_manifest(dir.path(), "reload.toml", &manifest_for(backend, ""));
    let gateway = Running::start(&path);
    assert!(get(gateway.addr, "/fast").0.contains("404"));

    let added =
        "[[route]]\nname = \"fast\"\nmatch = { path_prefix = \"/fast\" }\nupstream = \"slow\"\n";
    std::fs::write(&path, manifest_for(backend, added)).unwrap();
    gateway.signal("HUP");
    gateway.wait_for("reloaded routes and upstreams", Duration::from_secs(5));
    assert_eq!(
        get(gateway.addr, "/fast"),
        ("HTTP/1.1 200 OK".to_string(), "fast".to_string())
    );

    std::fs::write(
        &path,
        manifest_for(backend, added).replace("upstream = \"slow\"\n", "upstream = \"nope\"\n"),
    )
    .unwrap();
    gateway.signal("HUP");
    let refused = gateway.wait_for("reload refused", Duration::from_secs(5));
    assert!(
        refused.contains("upstream \\\"nope\\\" is not defined"),
        "{refused}"
    );
    assert_eq!(get(gateway.addr, "/fast").0, "HTTP/1.1 200 OK");
}

#[test]
fn each_request_writes_one_json_access_line() {
    let backend = slow_backend(Duration::ZERO, "fast");
    let dir = tempfile::tempdir().unwrap();
    let path = write_manifest(dir.path(), "log.toml", &manifest_for(backend, ""));
    let gateway = Running::start(&path);
    assert_eq!(get(gateway.addr, "/slow/x?q=1").0, "HTTP/1.1 200 OK");
    let line = gateway.wait_for("\"sluice::access\"", Duration::from_secs(5));
    let log: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(log["route"], "slow");
    assert_eq!(log["upstream"], "slow");
    assert_eq!(log["endpoint"], backend.to_string());
    assert_eq!(log["status"], 200);
    assert_eq!(log["method"], "GET");
    assert_eq!(log["path"], "/slow/x");
    assert_eq!(log["query"], "q=1");
    assert_eq!(log["bytes_sent"], 4);
    assert_eq!(log["completed"], true);
    assert_eq!(log["request_id"].as_str().map(str::len), Some(32));
    assert_eq!(log["trace_id"].as_str().map(str::len), Some(32));
    assert_eq!(log["span_id"].as_str().map(str::len), Some(16));
    assert!(log["duration_ms"].as_f64().is_some());

    assert!(get(gateway.addr, "/elsewhere").0.contains("404"));
    let line = gateway.wait_for("\"sluice::access\"", Duration::from_secs(5));
    let log: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(log["status"], 404);
    assert_eq!(log["error"], "no-route");
}

/// A free loopback port (bound, then released for the demo to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn demo_starts_echo_backends_and_the_gateway_in_front_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let demo = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo.toml"),
    )
    .unwrap();
    // The demo manifest with free ports, so the test never collides with anything.
    let text = demo
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:9101", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9102", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9103", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9111", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9112", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:9113", &format!("127.0.0.1:{}", free_port()))
        .replace(
            "../data/geo/",
            &format!("{}/../data/geo/", env!("CARGO_MANIFEST_DIR")),
        );
    let admin_port = free_port();
    let text = text.replace("127.0.0.1:9901", &format!("127.0.0.1:{admin_port}"));
    let path = write_manifest(dir.path(), "demo.toml", &text);
    let gateway = Running::start_with(&["demo", "-c"], &path);
    let mut backends = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let (status, body) = get(gateway.addr, "/api/hello");
        assert_eq!(status, "HTTP/1.1 200 OK");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["path"], "/api/hello");
        assert_eq!(echo["headers"]["via"], "1.1 sluice");
        assert_eq!(
            echo["headers"]["x-demo"], "via-sluice",
            "the demo's Wasm policy tagged the request"
        );
        backends.insert(echo["backend"].as_str().unwrap().to_string());
    }
    // The geo policy: a German address (behind the trusted loopback proxy) goes to eu-west.
    let (status, body) = get_with(gateway.addr, "/geo/", "X-Forwarded-For: 193.99.144.80\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-sluice-country"], "DE", "{body}");
    assert_eq!(echo["headers"]["x-sluice-region"], "eu-west", "{body}");
    assert_eq!(
        backends.len(),
        2,
        "weighted round-robin over both api echo backends: {backends:?}"
    );

    // The admin API counted the three requests: weights 1 and 2.
    let api = admin_item(
        SocketAddr::from(([127, 0, 0, 1], admin_port)),
        "/upstreams",
        "api",
    );
    assert_eq!(api["balancer"], "weighted");
    assert_eq!(api["endpoints"][0]["selected"], 1, "{api}");
    assert_eq!(api["endpoints"][1]["selected"], 2, "{api}");
    assert_eq!(api["endpoints"][1]["health"], "up", "{api}");
    assert_eq!(
        api["endpoints"][1]["check"], "up",
        "the demo's active checks run against its echo backends: {api}"
    );
}

/// The kernel spreads connections over the workers' `SO_REUSEPORT` sockets
/// by a hash, unevenly (100 connections split 43/57 as often as 50/50); a
/// worker more than one connection over the other hands new ones to it.
/// The admin API's `sluice_worker_connections` shows each worker's count.
#[test]
fn two_workers_serve_about_as_many_connections_each() {
    let dir = tempfile::tempdir().unwrap();
    let backend = slow_backend(Duration::ZERO, "ok");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = format!(
        "[admin]\nlisten = \"{admin}\"\n{}",
        manifest_for(backend, "")
    );
    let path = write_manifest(dir.path(), "spread.toml", &text);
    let gateway = Running::start(&path);

    // Keep-alive connections opened one after another, each answered once and kept open.
    let open: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut stream = TcpStream::connect(gateway.addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream
                .write_all(b"GET /slow HTTP/1.1\r\nhost: test\r\n\r\n")
                .unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 1024];
            while !seen.ends_with(b"\r\n\r\nok") {
                let n = stream.read(&mut buf).unwrap();
                assert!(n > 0, "the gateway closed a keep-alive connection");
                seen.extend_from_slice(&buf[..n]);
            }
            stream
        })
        .collect();

    let (status, metrics) = get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let per_worker = sluice_tests::client::worker_connections(&metrics, 2);
    assert_eq!(per_worker.iter().sum::<u64>(), 100, "{per_worker:?}");
    assert!(
        per_worker[0].abs_diff(per_worker[1]) <= 2,
        "connections per worker: {per_worker:?}"
    );
    drop(open);
}

/// `SLUICE_WASM_PROFILER` takes `perfmap` (or `none`); anything else is
/// refused by name when the first plugin is loaded, not silently ignored.
#[test]
fn an_unknown_wasm_profiler_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = format!(
        "{GOOD}\n[upstream.rr]\nendpoints = [\"127.0.0.1:9101\"]\nbalancer = \"round-robin\"\n"
    );
    let path = write_manifest(dir.path(), "profiled.toml", &manifest);
    let run = |value: &str| {
        let child = Command::new(SLUICE)
            .args(["check", "-c"])
            .arg(&path)
            .env("SLUICE_WASM_PROFILER", value)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let out = child.wait_with_output().unwrap();
        // perf's map of the compiled code, which `perfmap` writes.
        let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run("perfmap");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = run("bogus");
    assert_ne!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("SLUICE_WASM_PROFILER=\"bogus\": unknown profiler (perfmap or none)"),
        "{stderr}"
    );
}

/// A call's deadline is wall-clock time, but time the OS keeps the gateway
/// off the CPU does not count against a call that has barely run. The
/// process is stopped (SIGSTOP, as an oversubscribed host or a throttled
/// container would hold it) for longer than the probe's deadline while the
/// probe's call is busy: the request still succeeds, and the plugin's
/// statistics show a call that spanned the stop.
#[test]
fn a_call_held_off_the_cpu_past_its_deadline_is_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let backend = slow_backend(Duration::ZERO, "ok");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let probed = r#"
[[route]]
name = "probed"
match = { path_prefix = "/probed" }
upstream = "slow"
policies = ["probe"]
"#;
    let text = format!(
        "[admin]\nlisten = \"{admin}\"\n{}\n[plugin.probe]\nsource = \"{}\"\ndeadline = \"1s\"\non_error = \"closed\"\nmax_host_calls = 1000000000\n",
        manifest_for(backend, probed),
        env!("SLUICE_TEST_PROBE_WASM"),
    );
    let path = write_manifest(dir.path(), "stopped.toml", &text);
    let gateway = Running::start_with(&["run", "--workers", "1", "-c"], &path);
    assert_eq!(get(gateway.addr, "/probed").0, "HTTP/1.1 200 OK");

    let addr = gateway.addr;
    let busy = thread::spawn(move || {
        let started = Instant::now();
        let answer = get_with(addr, "/probed", "x-probe-mode: sleep-ms=400\r\n");
        (answer, started.elapsed())
    });
    // The call busy-waits 400 ms of wall time; stop the process inside it,
    // for 1.5 s: past the 1 s deadline, of which the call ran ~0.1 s.
    thread::sleep(Duration::from_millis(100));
    gateway.signal("STOP");
    thread::sleep(Duration::from_millis(1500));
    gateway.signal("CONT");
    let ((status, body), took) = busy.join().unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    assert!(took >= Duration::from_millis(1500), "answered in {took:?}");

    let probe = admin_item(admin, "/plugins", "probe");
    let stats = &probe["stats"];
    assert_eq!(stats["errors"], 0, "{stats}");
    assert_eq!(stats["traps"], 0, "{stats}");
    assert_eq!(stats["timeouts"], 0, "{stats}");
    // The probe's calls took 1.5 s in all only if the stop fell inside one
    // (a call the stop missed busy-waits 0.4 s, the others microseconds).
    let (status, metrics) = get(admin, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let call_seconds: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("sluice_plugin_call_duration_seconds_sum")
                && l.contains("plugin=\"probe\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no probe call time in /metrics:\n{metrics}"));
    assert!(
        call_seconds >= 1.5,
        "the stop missed the call: {call_seconds} s of calls, {stats}"
    );
}
