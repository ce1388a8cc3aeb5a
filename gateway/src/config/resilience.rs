//! Validation of an upstream's `health` (active checks) and `retries`.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::file::{HealthFile, RetriesFile};
use super::{Validator, did_you_mean};
use crate::upstream::{Backoff, HealthCheck, Probe, RetryBudget, RetryOn, RetryPolicy};

/// HAProxy's defaults: `inter 2s`, `rise 2`, `fall 3`.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RISE: u32 = 2;
const DEFAULT_FALL: u32 = 3;
/// Statuses a check accepts unless told otherwise: 2xx and 3xx, as HAProxy's `httpchk`.
const DEFAULT_EXPECT: (u16, u16) = (200, 399);

/// Tries in all when `retries` does not say.
const DEFAULT_ATTEMPTS: u32 = 3;
/// More tries than this is an amplifier, not a retry policy.
const MAX_ATTEMPTS: u32 = 10;
/// Envoy's default base interval.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Retry conditions when `on` is not given: nginx's `proxy_next_upstream error timeout`.
const DEFAULT_RETRY_ON: [RetryOn; 3] = [
    RetryOn::ConnectFailure,
    RetryOn::RefusedStream,
    RetryOn::Reset,
];
/// linkerd's budget: 20% extra load, and 10 retries a second whatever the traffic.
const DEFAULT_BUDGET_PERCENT: u32 = 20;
const DEFAULT_BUDGET_MIN_PER_SEC: u32 = 10;

impl Validator<'_> {
    /// Checks `health = { ... }` of upstream `key`.
    pub(super) fn health(&mut self, key: &str, file: &HealthFile) -> Option<Arc<HealthCheck>> {
        let key = format!("{key}.health");
        let before = self.problems.len();
        let tcp = match file.kind.as_deref() {
            None | Some("http") => false,
            Some("tcp") => true,
            Some(other) => {
                self.problem(
                    format!("{key}.type"),
                    format!("unknown check type \"{other}\": expected \"http\" or \"tcp\""),
                );
                false
            }
        };
        let probe = if tcp {
            for (field, present) in [
                ("path", file.path.is_some()),
                ("host", file.host.is_some()),
                ("expect", file.expect.is_some()),
            ] {
                if present {
                    self.problem(
                        format!("{key}.{field}"),
                        "only HTTP checks have this; remove it or use type = \"http\"",
                    );
                }
            }
            Probe::Tcp
        } else {
            let path_text = file.path.as_deref().unwrap_or("/");
            let path = match path_text.parse::<http::uri::PathAndQuery>() {
                Ok(path) if path_text.starts_with('/') => Some(path),
                _ => {
                    self.problem(
                        format!("{key}.path"),
                        format!("\"{path_text}\" is not a path: it must start with \"/\""),
                    );
                    None
                }
            };
            let host = file.host.as_deref().and_then(|host| {
                let value = HeaderValue::from_str(host).ok();
                if value.is_none() {
                    self.problem(
                        format!("{key}.host"),
                        format!("\"{host}\" is not a valid Host"),
                    );
                }
                value
            });
            let (low, high) = match &file.expect {
                None => DEFAULT_EXPECT,
                Some(value) => self.status_range(&format!("{key}.expect"), value),
            };
            Probe::Http {
                path: path.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
                host,
                expect: low..=high,
            }
        };
        let interval = file.interval.map_or(DEFAULT_CHECK_INTERVAL, |d| d.0);
        let timeout = file.timeout.map_or(DEFAULT_CHECK_TIMEOUT, |d| d.0);
        let jitter = file.jitter.map_or(interval / 10, |d| d.0);
        for (field, value) in [("interval", interval), ("timeout", timeout)] {
            if value.is_zero() {
                self.problem(format!("{key}.{field}"), "must be greater than zero");
            }
        }
        if !interval.is_zero() && jitter >= interval {
            self.problem(
                format!("{key}.jitter"),
                format!("must be less than the interval ({interval:?})"),
            );
        }
        let rise = file.rise.unwrap_or(DEFAULT_RISE);
        let fall = file.fall.unwrap_or(DEFAULT_FALL);
        for (field, value) in [("rise", rise), ("fall", fall)] {
            if value == 0 {
                self.problem(format!("{key}.{field}"), "must be at least 1");
            }
        }
        (self.problems.len() == before).then(|| {
            Arc::new(HealthCheck {
                probe,
                interval,
                timeout,
                rise,
                fall,
                jitter,
            })
        })
    }

    /// `"200-399"`, `"200"` or `200`: an inclusive status range.
    fn status_range(&mut self, key: &str, value: &toml::Value) -> (u16, u16) {
        let parsed = match value {
            toml::Value::Integer(n) => u16::try_from(*n).ok().map(|n| (n, n)),
            toml::Value::String(text) => {
                let (low, high) = text.split_once('-').unwrap_or((text, text));
                low.trim().parse().ok().zip(high.trim().parse().ok())
            }
            _ => None,
        };
        match parsed {
            Some((low, high)) if (100..=599).contains(&low) && (low..=599).contains(&high) => {
                (low, high)
            }
            _ => {
                self.problem(
                    key,
                    "expected a status or a range of statuses within 100-599, like \"200-399\"",
                );
                DEFAULT_EXPECT
            }
        }
    }

    /// Checks `retries = { ... }` of upstream `key`.
    pub(super) fn retries(&mut self, key: &str, file: &RetriesFile) -> Option<Arc<RetryPolicy>> {
        let key = format!("{key}.retries");
        let before = self.problems.len();
        let attempts = file.attempts.unwrap_or(DEFAULT_ATTEMPTS);
        if !(1..=MAX_ATTEMPTS).contains(&attempts) {
            self.problem(
                format!("{key}.attempts"),
                format!("must be between 1 and {MAX_ATTEMPTS} (tries in all, the first included)"),
            );
        }
        let per_try_timeout = file.per_try_timeout.map(|d| d.0);
        if per_try_timeout.is_some_and(|d| d.is_zero()) {
            self.problem(
                format!("{key}.per_try_timeout"),
                "must be greater than zero",
            );
        }
        let mut on = Vec::new();
        match &file.on {
            None => on.extend(DEFAULT_RETRY_ON),
            Some(names) => {
                let known: Vec<&str> = RetryOn::NAMES.iter().map(|(n, _)| *n).collect();
                for (i, name) in names.iter().enumerate() {
                    match RetryOn::NAMES.iter().find(|(n, _)| n == name) {
                        Some((_, condition)) => on.push(*condition),
                        None => self.problem(
                            format!("{key}.on[{i}]"),
                            format!(
                                "unknown retry condition \"{name}\"{}; expected one of {}",
                                did_you_mean(name, &known),
                                known.join(", ")
                            ),
                        ),
                    }
                }
            }
        }
        let backoff = match &file.backoff {
            None => Backoff::from_initial(DEFAULT_BACKOFF),
            Some(value) => self.backoff(&format!("{key}.backoff"), value),
        };
        let (percent, min_per_sec) = file.budget.as_ref().map_or(
            (DEFAULT_BUDGET_PERCENT, DEFAULT_BUDGET_MIN_PER_SEC),
            |b| {
                (
                    b.percent.unwrap_or(DEFAULT_BUDGET_PERCENT),
                    b.min_per_sec.unwrap_or(DEFAULT_BUDGET_MIN_PER_SEC),
                )
            },
        );
        if percent > 1000 {
            self.problem(
                format!("{key}.budget.percent"),
                "must be at most 1000 (retries per 100 requests)",
            );
        }
        (self.problems.len() == before).then(|| {
            Arc::new(RetryPolicy::new(
                attempts,
                per_try_timeout,
                &on,
                backoff,
                RetryBudget::new(percent, min_per_sec),
            ))
        })
    }

    /// `"25ms"`, or `{ initial = "25ms", multiplier = 2, max = "250ms", jitter = 0.5 }`.
    fn backoff(&mut self, key: &str, value: &toml::Value) -> Backoff {
        let duration = |this: &mut Self, field: &str, value: &toml::Value| {
            let parsed = value
                .as_str()
                .ok_or_else(|| "expected a duration with a unit, like \"25ms\"".to_string())
                .and_then(super::file::parse_duration);
            parsed
                .map_err(|message| this.problem(format!("{key}{field}"), message))
                .ok()
        };
        let table = match value {
            toml::Value::String(_) => {
                let initial = duration(self, "", value).unwrap_or(DEFAULT_BACKOFF);
                return Backoff::from_initial(initial);
            }
            toml::Value::Table(table) => table,
            _ => {
                self.problem(
                    key,
                    "expected a duration (\"25ms\") or { initial, multiplier, max, jitter }",
                );
                return Backoff::from_initial(DEFAULT_BACKOFF);
            }
        };
        let mut backoff = Backoff::from_initial(DEFAULT_BACKOFF);
        let mut max = None;
        for (field, value) in table {
            match field.as_str() {
                "initial" => {
                    if let Some(d) = duration(self, ".initial", value) {
                        backoff.initial = d;
                    }
                }
                "max" => max = duration(self, ".max", value),
                "multiplier" | "jitter" => {
                    let number = value.as_float().or_else(|| {
                        value
                            .as_integer()
                            .and_then(|n| i32::try_from(n).ok())
                            .map(f64::from)
                    });
                    let (range, slot) = if field == "multiplier" {
                        (1.0..=10.0, &mut backoff.multiplier)
                    } else {
                        (0.0..=1.0, &mut backoff.jitter)
                    };
                    match number.filter(|n| range.contains(n)) {
                        Some(n) => *slot = n,
                        None => self.problem(
                            format!("{key}.{field}"),
                            format!(
                                "expected a number from {} to {}",
                                range.start(),
                                range.end()
                            ),
                        ),
                    }
                }
                other => self.problem(
                    format!("{key}.{other}"),
                    "unknown key; expected initial, multiplier, max or jitter",
                ),
            }
        }
        backoff.max = max.unwrap_or_else(|| backoff.initial.saturating_mul(10));
        if backoff.max < backoff.initial {
            self.problem(format!("{key}.max"), "must not be less than `initial`");
        }
        backoff
    }
}

#[cfg(test)]
mod tests {
    /// Problems with `upstream` lines added to a good manifest, as `key: message`.
    fn errors(upstream: &str) -> Vec<String> {
        super::super::tests::errors(&format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
             [upstream.api]\nendpoints = [\"127.0.0.1:9101\"]\n{upstream}\n\
             [[route]]\nname = \"api\"\nupstream = \"api\"\n"
        ))
    }

    #[test]
    fn the_design_example_is_accepted() {
        assert_eq!(
            errors(
                "health = { path = \"/health\", interval = \"2s\", timeout = \"1s\", rise = 2, fall = 3 }\n\
                 retries = { attempts = 3, per_try_timeout = \"2s\", on = [\"connect-failure\", \"gateway-error\"], backoff = \"25ms\" }"
            ),
            Vec::<String>::new()
        );
        assert_eq!(
            errors(
                "health = { type = \"tcp\", interval = \"500ms\", jitter = \"100ms\" }\n\
                 retries = { on = [\"5xx\", \"reset\", \"refused-stream\"], backoff = { initial = \"10ms\", multiplier = 1.5, max = \"1s\", jitter = 0 }, budget = { percent = 50, min_per_sec = 0 } }"
            ),
            Vec::<String>::new()
        );
    }

    #[test]
    fn health_problems_name_their_key() {
        assert_eq!(
            errors("health = { type = \"udp\" }"),
            ["upstream.api.health.type: unknown check type \"udp\": expected \"http\" or \"tcp\""]
        );
        assert_eq!(
            errors("health = { type = \"tcp\", path = \"/x\" }"),
            [
                "upstream.api.health.path: only HTTP checks have this; remove it or use type = \"http\""
            ]
        );
        let errs = errors(
            "health = { path = \"health\", rise = 0, expect = \"99-200\", interval = \"1s\", jitter = \"1s\" }",
        );
        assert_eq!(errs.len(), 4, "{errs:?}");
        assert!(errs[0].starts_with("upstream.api.health.path: \"health\" is not a path"));
        assert!(errs[1].starts_with("upstream.api.health.expect: expected a status"));
        assert!(errs[2].starts_with("upstream.api.health.jitter: must be less than the interval"));
        assert_eq!(errs[3], "upstream.api.health.rise: must be at least 1");
    }

    #[test]
    fn retry_problems_name_their_key() {
        assert_eq!(
            errors("retries = { on = [\"gateway-eror\"] }"),
            [
                "upstream.api.retries.on[0]: unknown retry condition \"gateway-eror\" (did you mean \"gateway-error\"?); expected one of connect-failure, refused-stream, reset, gateway-error, 5xx"
            ]
        );
        assert_eq!(
            errors("retries = { attempts = 0 }"),
            [
                "upstream.api.retries.attempts: must be between 1 and 10 (tries in all, the first included)"
            ]
        );
        assert_eq!(
            errors("retries = { backoff = \"25\" }"),
            [
                "upstream.api.retries.backoff: invalid duration \"25\": a unit is required, like \"25s\" or \"25ms\""
            ]
        );
        let errs = errors(
            "retries = { backoff = { initial = \"100ms\", max = \"10ms\", multiplier = 0.5, jiter = 1 } }",
        );
        assert_eq!(
            errs,
            [
                "upstream.api.retries.backoff.jiter: unknown key; expected initial, multiplier, max or jitter",
                "upstream.api.retries.backoff.multiplier: expected a number from 1 to 10",
                "upstream.api.retries.backoff.max: must not be less than `initial`",
            ]
        );
    }
}
