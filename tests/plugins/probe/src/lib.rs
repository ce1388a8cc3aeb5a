//! The integration tests' probe: a `filter` policy that exercises every hook
//! and every way a policy can fail, driven by request headers.
//!
//! **init** — config `{"fail": "MESSAGE"}` refuses the plugin with
//! `MESSAGE`; `{"tag": "v1"}` sets the tag echoed below; anything else
//! (including no config) is accepted.
//!
//! **on-request** — counts metric `probe_requests`, then, by the first of
//! these headers present:
//! - `x-probe-mode`: `loop` spins forever; `alloc` allocates and touches
//!   memory until the instance runs out (a trap); `recurse` recurses until
//!   the stack overflows (a trap); `state-loop` calls `state.counter-add`
//!   forever (host calls, no guest work); `flood=KIND` calls one cheap host
//!   import forever: `log`, `metrics`, `clock`, `random` or `headers`
//!   (`request.header-names`); `calls=N` calls `metrics.counter-add` N times,
//!   then goes on; `trap` executes `unreachable`; `panic` panics (a trap);
//!   `sleep-ms=N` busy-waits N ms on the host clock, then goes on;
//!   `wasi-sleep-ms=N` sleeps N ms through WASI (`std::thread::sleep`: the
//!   guest waits in the host, running no code of its own), then goes on;
//!   `sandbox` tries to reach files, the environment and the network, and
//!   reports what it found in request header `x-probe-sandbox` (see
//!   [`sandbox`]), then goes on. Any other mode is ignored.
//! - `x-probe-bad-header: KIND`: tries to set a request header the gateway
//!   must refuse (`name`: an invalid name, `value`: a value with a line
//!   break, `framing`: `content-length`) and records each answer in request
//!   header `x-probe-bad-header-result` (`refused` or `accepted`); with
//!   `x-probe-answer` the answer carries that header instead, which the
//!   gateway must refuse (`name`, `value`) or drop (`framing`); on-response
//!   tries the same on the response and records the answer in response header
//!   `x-probe-bad-response-header`.
//! - `x-probe-answer: STATUS`: answers with that status, header
//!   `x-probe: answered` and body `answered by probe\n` (a value that is not
//!   a number answers with status 0, which the gateway must refuse).
//! - `x-probe-steer: NAME`: steers to upstream `NAME`.
//!
//! Whenever it lets the request through (continue, or steer) it sets request
//! headers `x-probe-tag` (the tag, or `none`), `x-probe-outcomes` (state
//! counter `outcomes`: how many outcomes this plugin has seen) and, once an
//! outcome was seen, `x-probe-last-outcome` (state value `last-outcome`),
//! and removes `x-probe-remove`.
//!
//! **on-response** — sets response header `x-probe-status` to the upstream's
//! status and removes `x-probe-remove`.
//!
//! **on-outcome** — adds 1 to state counter `outcomes` and stores in state
//! value `last-outcome` (by a compare-and-swap loop):
//! `"{route} {upstream} {status:?} {error:?}"`, e.g. `all app Some(200) None`
//! or `dead dead None Some(ErrorKind::ConnectFailed)`.

use sluice_sdk::{
    Action, Outcome, Policy, Reply, Request, Response, clock, log, metrics, random, state,
};

/// The probe's configuration: only the tag.
pub struct Probe {
    tag: Option<String>,
}

impl Policy for Probe {
    fn init(config: &str) -> Result<Self, String> {
        let config: serde_json::Value = serde_json::from_str(config).unwrap_or_default();
        if let Some(message) = config.get("fail").and_then(|v| v.as_str()) {
            return Err(message.to_string());
        }
        let tag = config
            .get("tag")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Probe { tag })
    }

    fn on_request(&self, req: &Request) -> Action {
        metrics::counter_add("probe_requests", 1);
        if let Some(mode) = req.header("x-probe-mode") {
            misbehave(&mode, req);
        }
        let bad = req
            .header("x-probe-bad-header")
            .and_then(|k| bad_header(&k));
        if let Some(status) = req.header("x-probe-answer") {
            let mut reply = Reply::new(status.trim().parse().unwrap_or(0))
                .with_header("x-probe", "answered")
                .with_body("answered by probe\n");
            if let Some((name, value)) = bad {
                reply = reply.with_header(name, value);
            }
            return reply.into();
        }
        if let Some((name, value)) = bad {
            let result = match req.set_header(name, value) {
                Ok(()) => "accepted",
                Err(_) => "refused",
            };
            set(req, "x-probe-bad-header-result", result);
        }
        let action = match req.header("x-probe-steer") {
            Some(upstream) => Action::Steer(upstream),
            None => Action::Continue,
        };
        let tag = self.tag.as_deref().unwrap_or("none");
        set(req, "x-probe-tag", tag);
        set(
            req,
            "x-probe-outcomes",
            &state::counter_add("outcomes", 0, 0).to_string(),
        );
        if let Some(last) = state::get("last-outcome") {
            set(req, "x-probe-last-outcome", &last);
        }
        req.remove_header("x-probe-remove");
        action
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        if let Err(e) = resp.set_header("x-probe-status", &resp.status().to_string()) {
            log::warn(&format!("probe: x-probe-status: {e}"));
        }
        resp.remove_header("x-probe-remove");
        if let Some((name, value)) = req
            .header("x-probe-bad-header")
            .and_then(|k| bad_header(&k))
        {
            let result = match resp.set_header(name, value) {
                Ok(()) => "accepted",
                Err(_) => "refused",
            };
            if let Err(e) = resp.set_header("x-probe-bad-response-header", result) {
                log::warn(&format!("probe: x-probe-bad-response-header: {e}"));
            }
        }
    }

    fn on_outcome(&self, outcome: &Outcome) {
        state::counter_add("outcomes", 1, 0);
        let description = format!(
            "{} {} {:?} {:?}",
            outcome.route, outcome.upstream, outcome.status, outcome.error
        );
        let mut current = state::get("last-outcome");
        // Another instance may store its outcome between our read and our
        // swap; the failed swap hands back the value to retry against.
        for _ in 0..100 {
            match state::compare_and_swap("last-outcome", current.as_deref(), &description, 0) {
                Ok(()) => return,
                Err(now) => current = now,
            }
        }
        log::warn("probe: last-outcome kept changing; gave up storing it");
    }
}

fn set(req: &Request, name: &str, value: &str) {
    if let Err(e) = req.set_header(name, value) {
        log::warn(&format!("probe: {name}: {e}"));
    }
}

/// A header the gateway must not let a policy set, by `x-probe-bad-header` kind.
fn bad_header(kind: &str) -> Option<(&'static str, &'static str)> {
    match kind.trim() {
        "name" => Some(("x-bad name\r\nx-injected", "1")),
        "value" => Some(("x-probe-injected", "1\r\nx-injected: 1")),
        "framing" => Some(("content-length", "0")),
        _ => None,
    }
}

/// Does what `x-probe-mode` asks; returns only for the modes that go on
/// (`calls=N`, `sleep-ms=N`, `wasi-sleep-ms=N`, `sandbox`) and unknown ones.
fn misbehave(mode: &str, req: &Request) {
    match mode.trim() {
        "loop" => loop {
            std::hint::spin_loop();
        },
        "alloc" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                // 1 MiB at a time, every page written so it is really used.
                let mut chunk = vec![0u8; 1 << 20];
                for byte in chunk.iter_mut().step_by(4096) {
                    *byte = 1;
                }
                hoard.push(std::hint::black_box(chunk));
            }
        }
        "state-loop" => loop {
            state::counter_add("state-loop", 1, 0);
        },
        "recurse" => {
            std::hint::black_box(recurse(0));
        }
        "flood=log" => loop {
            log::debug("probe: flood");
        },
        "flood=metrics" => loop {
            metrics::counter_add("flood", 1);
        },
        "flood=clock" => loop {
            std::hint::black_box(clock::monotonic_ns());
        },
        "flood=random" => loop {
            std::hint::black_box(random::next_u64());
        },
        "flood=headers" => loop {
            std::hint::black_box(req.header_names());
        },
        "trap" => trap(),
        "panic" => panic!("probe: panic requested by x-probe-mode"),
        "sandbox" => set(req, "x-probe-sandbox", &sandbox(req)),
        mode => {
            let number = |prefix: &str| {
                mode.strip_prefix(prefix)
                    .and_then(|n| n.parse::<u64>().ok())
            };
            if let Some(n) = number("calls=") {
                for _ in 0..n {
                    metrics::counter_add("calls", 1);
                }
            } else if let Some(ms) = number("sleep-ms=") {
                let until = clock::monotonic_ns().saturating_add(ms.saturating_mul(1_000_000));
                while clock::monotonic_ns() < until {
                    std::hint::spin_loop();
                }
            } else if let Some(ms) = number("wasi-sleep-ms=") {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
    }
}

/// Recurses until the stack overflows; each frame keeps a small array live
/// so neither the wasm stack nor the shadow stack in linear memory is spared.
fn recurse(depth: u64) -> u64 {
    if std::hint::black_box(depth) == u64::MAX {
        return 0;
    }
    let frame = std::hint::black_box([depth; 8]);
    frame[7].wrapping_add(recurse(depth + 1))
}

/// Tries every capability a sandboxed policy must not have, and describes
/// what it found: `fs=… env=… args=… tcp=… listen=… udp=… dns=…`, each
/// `denied(REASON)`, `none`, or `GRANTED(WHAT)`.
///
/// - `fs`: read `/etc/passwd`, list `/` and `.`, create a file in `/tmp`;
/// - `env`: the environment's variables (none expected);
/// - `args`: the command-line arguments (none expected);
/// - `tcp`: connect to the address in request header `x-probe-sandbox-target`
///   (the test's own origin, so the attempt would succeed if allowed);
/// - `listen`: bind a TCP listener on `127.0.0.1:0`;
/// - `udp`: bind a UDP socket on `127.0.0.1:0`;
/// - `dns`: resolve `localhost`.
fn sandbox(req: &Request) -> String {
    use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs as _, UdpSocket};
    fn verdict<T>(what: &str, result: std::io::Result<T>) -> String {
        match result {
            Ok(_) => format!("GRANTED({what})"),
            Err(e) => format!("denied({:?})", e.kind()),
        }
    }
    let fs = [
        verdict("read /etc/passwd", std::fs::read("/etc/passwd")),
        verdict("list /", std::fs::read_dir("/")),
        verdict("list .", std::fs::read_dir(".")),
        verdict(
            "create /tmp/sluice-probe",
            std::fs::File::create("/tmp/sluice-probe"),
        ),
    ];
    let fs = fs
        .iter()
        .find(|v| v.starts_with("GRANTED"))
        .unwrap_or(&fs[0])
        .clone();
    let vars = std::env::vars_os().count();
    let env = if vars == 0 && std::env::var_os("PATH").is_none() {
        "none".to_string()
    } else {
        format!("GRANTED({vars} variables)")
    };
    let args = std::env::args_os().count();
    let args = if args == 0 {
        "none".to_string()
    } else {
        format!("GRANTED({args} arguments)")
    };
    let tcp = match req
        .header("x-probe-sandbox-target")
        .and_then(|t| t.trim().parse::<SocketAddr>().ok())
    {
        Some(target) => verdict(
            "connect",
            TcpStream::connect_timeout(&target, std::time::Duration::from_millis(200)),
        ),
        None => "untested(no x-probe-sandbox-target)".to_string(),
    };
    let listen = verdict("listen", TcpListener::bind("127.0.0.1:0"));
    let udp = verdict("udp", UdpSocket::bind("127.0.0.1:0"));
    let dns = verdict("resolve", ("localhost", 80).to_socket_addrs());
    format!("fs={fs} env={env} args={args} tcp={tcp} listen={listen} udp={udp} dns={dns}")
}

/// A wasm `unreachable` instruction: a trap, without the panic machinery.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

sluice_sdk::export_filter!(Probe);
