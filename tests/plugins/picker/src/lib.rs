//! The integration tests' picker: a `balancer` whose `pick` answers what
//! request header `x-pick` says, so a test can make a balancer return
//! positions that are not among the candidates.
//!
//! - absent: position 0, the first candidate;
//! - a number `N`: position `N`, whether or not there are that many
//!   candidates (`4294967295` is the largest the ABI can carry);
//! - `none`: declines (the client gets 503);
//! - `loop`: spins forever (the deadline stops it);
//! - `trap`: executes `unreachable`.
//!
//! Anything else declines too.

use sluice_sdk::{Candidates, Policy, Request, Upstream};

/// Takes no configuration.
pub struct Picker;

impl Policy for Picker {
    fn init(_config: &str) -> Result<Self, String> {
        Ok(Picker)
    }

    fn pick(&self, req: &Request, _upstream: &Upstream, _candidates: &Candidates) -> Option<u32> {
        let Some(pick) = req.header("x-pick") else {
            return Some(0);
        };
        match pick.trim() {
            "loop" => loop {
                std::hint::spin_loop();
            },
            "trap" => trap(),
            position => position.parse().ok(),
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

sluice_sdk::export_balancer!(Picker);
