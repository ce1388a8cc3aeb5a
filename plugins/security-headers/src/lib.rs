//! `builtin:security-headers`: adds the browser security headers to
//! upstream responses and strips the ones that advertise the software
//! (world `rewrite-policy`).
//!
//! ```json
//! {"hsts": {"max_age": "365d", "include_subdomains": true},
//!  "content_security_policy": "default-src 'self'", "override": false}
//! ```
//!
//! With `{}` the plugin sends `Strict-Transport-Security` (on https only),
//! `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: strict-origin-when-cross-origin`, keeps any of them the
//! upstream already set, and removes `Server` and `X-Powered-By`. The
//! README has every setting.

pub mod config;

use sluice_sdk::{Policy, Request, Response, log};

use crate::config::Config;

/// The policy: its validated config.
pub struct SecurityHeaders {
    config: Config,
}

impl Policy for SecurityHeaders {
    fn init(config: &str) -> Result<Self, String> {
        Ok(SecurityHeaders {
            config: Config::parse(config)?,
        })
    }

    fn on_response(&self, req: &Request, resp: &Response) {
        // One read of the names instead of one call per header.
        let present = resp.header_names();
        let edits = Edits::plan(&self.config, &present, || req.scheme() == "https");
        for name in edits.remove {
            resp.remove_header(name);
        }
        for (name, value) in edits.set {
            if let Err(e) = resp.set_header(name, value) {
                log::warn(&format!("{name}: {e}"));
            }
        }
    }
}

sluice_sdk::export_rewrite_policy!(SecurityHeaders);

/// What to do to one response's headers: remove, then set.
#[derive(Debug, PartialEq, Eq)]
pub struct Edits<'a> {
    /// Headers to remove (the present ones among `strip`).
    pub remove: Vec<&'a str>,
    /// Headers to set, replacing any value.
    pub set: Vec<(&'a str, &'a str)>,
}

impl<'a> Edits<'a> {
    /// The edits for a response whose header names are `present`
    /// (lowercase); `https` tells whether the request came over https, and
    /// is asked only when HSTS depends on it.
    pub fn plan(config: &'a Config, present: &[String], https: impl FnOnce() -> bool) -> Edits<'a> {
        let remove: Vec<&str> = config
            .strip
            .iter()
            .map(String::as_str)
            .filter(|name| present.iter().any(|p| p == name))
            .collect();
        // A header the upstream sent is kept, unless it is stripped or replaced.
        let keep = |name: &str| {
            !config.replace && present.iter().any(|p| p == name) && !remove.contains(&name)
        };
        let mut set = Vec::with_capacity(config.headers.len() + 1);
        if let Some(hsts) = &config.hsts
            && !keep("strict-transport-security")
            && (!hsts.https_only || https())
        {
            set.push(("strict-transport-security", hsts.value.as_str()));
        }
        for (name, value) in &config.headers {
            if !keep(name) {
                set.push((*name, value.as_str()));
            }
        }
        Edits { remove, set }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(config: &str, present: &[&str], https: bool) -> (Vec<String>, Vec<String>) {
        let config = Config::parse(config).unwrap();
        let present: Vec<String> = present.iter().map(|p| p.to_string()).collect();
        let edits = Edits::plan(&config, &present, || https);
        (
            edits.remove.iter().map(|n| n.to_string()).collect(),
            edits.set.iter().map(|(n, v)| format!("{n}: {v}")).collect(),
        )
    }

    #[test]
    fn defaults_on_https_and_http() {
        let (remove, set) = plan("{}", &["content-type", "server", "x-powered-by"], true);
        assert_eq!(remove, ["server", "x-powered-by"]);
        assert_eq!(
            set,
            [
                "strict-transport-security: max-age=31536000; includeSubDomains",
                "x-frame-options: DENY",
                "x-content-type-options: nosniff",
                "referrer-policy: strict-origin-when-cross-origin",
            ]
        );
        let (remove, set) = plan("{}", &["content-type"], false);
        assert!(remove.is_empty());
        assert_eq!(set.len(), 3, "no HSTS on plain http: {set:?}");
        assert!(!set[0].starts_with("strict-transport-security"));
        // Unless asked to send it anyway (TLS ends in front of the gateway).
        let (_, set) = plan(r#"{"hsts": {"https_only": false}}"#, &[], false);
        assert!(set[0].starts_with("strict-transport-security: "), "{set:?}");
    }

    #[test]
    fn the_upstream_value_is_kept_unless_override() {
        let present = ["x-frame-options", "strict-transport-security"];
        let (_, set) = plan("{}", &present, true);
        assert_eq!(
            set,
            [
                "x-content-type-options: nosniff",
                "referrer-policy: strict-origin-when-cross-origin",
            ]
        );
        let (_, set) = plan(r#"{"override": true}"#, &present, true);
        assert_eq!(set.len(), 4, "{set:?}");
        // A stripped header is replaced whatever `override` says.
        let (remove, set) = plan(r#"{"strip": ["x-frame-options"]}"#, &present, true);
        assert_eq!(remove, ["x-frame-options"]);
        assert!(
            set.contains(&"x-frame-options: DENY".to_string()),
            "{set:?}"
        );
    }

    #[test]
    fn https_is_asked_only_when_needed() {
        let config = Config::parse(r#"{"hsts": false}"#).unwrap();
        let edits = Edits::plan(&config, &[], || panic!("scheme read without HSTS"));
        assert_eq!(edits.set.len(), 3);
    }
}
