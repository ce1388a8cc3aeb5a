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
//!   memory until the instance runs out (a trap); `state-loop` calls
//!   `state.counter-add` forever (host calls, no guest work); `trap` executes
//!   `unreachable`; `panic` panics (a trap); `sleep-ms=N` busy-waits N ms on
//!   the host clock, then goes on as if the header were absent. Any other
//!   mode is ignored.
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

use sluice_sdk::{Action, Outcome, Policy, Reply, Request, Response, clock, log, metrics, state};

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
            misbehave(&mode);
        }
        if let Some(status) = req.header("x-probe-answer") {
            let reply = Reply::new(status.trim().parse().unwrap_or(0))
                .with_header("x-probe", "answered")
                .with_body("answered by probe\n");
            return reply.into();
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

    fn on_response(&self, _req: &Request, resp: &Response) {
        if let Err(e) = resp.set_header("x-probe-status", &resp.status().to_string()) {
            log::warn(&format!("probe: x-probe-status: {e}"));
        }
        resp.remove_header("x-probe-remove");
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

/// Does what `x-probe-mode` asks; returns only for `sleep-ms=N` and unknown modes.
fn misbehave(mode: &str) {
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
        "trap" => trap(),
        "panic" => panic!("probe: panic requested by x-probe-mode"),
        mode => {
            if let Some(ms) = mode
                .strip_prefix("sleep-ms=")
                .and_then(|ms| ms.parse::<u64>().ok())
            {
                let until = clock::monotonic_ns().saturating_add(ms.saturating_mul(1_000_000));
                while clock::monotonic_ns() < until {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// A wasm `unreachable` instruction: a trap, without the panic machinery.
fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

sluice_sdk::export_filter!(Probe);
