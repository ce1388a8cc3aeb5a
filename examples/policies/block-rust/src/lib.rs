//! Answers 403 to any request that carries the header `x-block` (or the one
//! named by the config: `{"header": "x-other"}`), and counts the denials.

use serde::Deserialize;
use sluice_sdk::{Action, Policy, Request, metrics};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_header")]
    header: String,
}

fn default_header() -> String {
    "x-block".to_string()
}

/// The policy: which header to block on.
pub struct Block {
    header: String,
}

impl Policy for Block {
    fn init(config: &str) -> Result<Self, String> {
        let config: Config = serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
        Ok(Block {
            header: config.header,
        })
    }

    fn on_request(&self, req: &Request) -> Action {
        if req.header(&self.header).is_some() {
            metrics::counter_add("blocked", 1);
            return Action::respond(403, "blocked\n");
        }
        Action::Continue
    }
}

sluice_sdk::export_request_policy!(Block);
