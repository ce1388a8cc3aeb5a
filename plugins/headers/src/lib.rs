//! `builtin:headers`: sets, adds and removes request and response headers.
//!
//! ```json
//! {"request":  {"set": {"x-env": "prod"}, "add": {"via": "sluice"}, "remove": ["x-debug"]},
//!  "response": {"set": {"strict-transport-security": "max-age=31536000"}, "remove": ["server"]}}
//! ```
//!
//! Every part is optional. Each direction applies `remove`, then `set`
//! (replacing every value), then `add` (keeping existing values; a value may
//! be a list to add several). The config is checked in `init`: an error
//! names the offending key, e.g. `request.set."bad name": invalid header name`.

use serde_json::{Map, Value};
use sluice_sdk::hooks::Hook;
use sluice_sdk::{Action, Policy, Request, Response, log};

/// What to do to the headers of one direction.
#[derive(Debug, Default, PartialEq)]
struct Edits {
    remove: Vec<String>,
    set: Vec<(String, String)>,
    add: Vec<(String, String)>,
}

impl Edits {
    fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// The policy: the edits for requests and for responses.
#[derive(Debug, PartialEq)]
pub struct Headers {
    request: Edits,
    response: Edits,
}

impl Policy for Headers {
    fn init(config: &str) -> Result<Self, String> {
        let headers = parse_config(config)?;
        if headers.request.is_empty() {
            sluice_sdk::hooks::skip(Hook::OnRequest);
        }
        if headers.response.is_empty() {
            sluice_sdk::hooks::skip(Hook::OnResponse);
        }
        Ok(headers)
    }

    fn on_request(&self, req: &Request) -> Action {
        let edits = &self.request;
        for name in &edits.remove {
            req.remove_header(name);
        }
        for (name, value) in &edits.set {
            if let Err(e) = req.set_header(name, value) {
                log::warn(&format!("request.set.{name:?}: {e}"));
            }
        }
        for (name, value) in &edits.add {
            if let Err(e) = req.append_header(name, value) {
                log::warn(&format!("request.add.{name:?}: {e}"));
            }
        }
        Action::Continue
    }

    fn on_response(&self, _req: &Request, resp: &Response) {
        let edits = &self.response;
        for name in &edits.remove {
            resp.remove_header(name);
        }
        for (name, value) in &edits.set {
            if let Err(e) = resp.set_header(name, value) {
                log::warn(&format!("response.set.{name:?}: {e}"));
            }
        }
        for (name, value) in &edits.add {
            if let Err(e) = resp.append_header(name, value) {
                log::warn(&format!("response.add.{name:?}: {e}"));
            }
        }
    }
}

sluice_sdk::export_rewrite_policy!(Headers);

/// Parses and checks the whole config.
fn parse_config(config: &str) -> Result<Headers, String> {
    let value: Value =
        serde_json::from_str(config).map_err(|e| format!("config is not valid JSON: {e}"))?;
    let root = as_object(&value, "config")?;
    let mut headers = Headers {
        request: Edits::default(),
        response: Edits::default(),
    };
    for (key, part) in root {
        let edits = match key.as_str() {
            "request" => &mut headers.request,
            "response" => &mut headers.response,
            _ => {
                return Err(format!(
                    "{key}: unknown key (expected `request` or `response`)"
                ));
            }
        };
        *edits = parse_edits(part, key)?;
    }
    Ok(headers)
}

/// Parses `{"set": {..}, "add": {..}, "remove": [..]}` at `path`.
fn parse_edits(value: &Value, path: &str) -> Result<Edits, String> {
    let mut edits = Edits::default();
    for (key, part) in as_object(value, path)? {
        let path = format!("{path}.{key}");
        match key.as_str() {
            "remove" => {
                let Value::Array(names) = part else {
                    return Err(format!("{path}: expected a list of header names"));
                };
                for (i, name) in names.iter().enumerate() {
                    let Value::String(name) = name else {
                        return Err(format!("{path}[{i}]: expected a header name (a string)"));
                    };
                    check_name(name, &format!("{path}[{i}]"))?;
                    edits.remove.push(name.to_ascii_lowercase());
                }
            }
            "set" => {
                for (name, value) in as_object(part, &path)? {
                    let at = format!("{path}.{name:?}");
                    check_name(name, &at)?;
                    let Value::String(value) = value else {
                        return Err(format!("{at}: expected a header value (a string)"));
                    };
                    check_value(value, &at)?;
                    edits.set.push((name.to_ascii_lowercase(), value.clone()));
                }
            }
            "add" => {
                for (name, values) in as_object(part, &path)? {
                    let at = format!("{path}.{name:?}");
                    check_name(name, &at)?;
                    let expected =
                        || format!("{at}: expected a header value or a list of them (strings)");
                    let values: Vec<&str> = match values {
                        Value::String(value) => vec![value],
                        Value::Array(list) => list
                            .iter()
                            .map(Value::as_str)
                            .collect::<Option<_>>()
                            .ok_or_else(expected)?,
                        _ => return Err(expected()),
                    };
                    for value in values {
                        check_value(value, &at)?;
                        edits
                            .add
                            .push((name.to_ascii_lowercase(), value.to_string()));
                    }
                }
            }
            _ => {
                return Err(format!(
                    "{path}: unknown key (expected `set`, `add` or `remove`)"
                ));
            }
        }
    }
    Ok(edits)
}

fn as_object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{path}: expected an object"))
}

/// A header name is an RFC 9110 token.
fn check_name(name: &str, at: &str) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("{at}: invalid header name"));
    }
    Ok(())
}

/// A header value has no control characters other than tab.
fn check_value(value: &str, at: &str) -> Result<(), String> {
    if value
        .chars()
        .any(|c| (c.is_control() && c != '\t') || c == '\u{7f}')
    {
        return Err(format!("{at}: invalid header value (control character)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_config() {
        let h = parse_config("{}").unwrap();
        assert_eq!(
            h,
            Headers {
                request: Edits::default(),
                response: Edits::default()
            }
        );
    }

    #[test]
    fn full_config() {
        let h = parse_config(
            r#"{"request": {"set": {"X-Env": "prod"}, "add": {"via": ["a", "b"], "x-one": "1"}, "remove": ["X-Debug"]},
                "response": {"remove": ["server"]}}"#,
        )
        .unwrap();
        assert_eq!(h.request.set, pairs(&[("x-env", "prod")]));
        assert_eq!(
            h.request.add,
            pairs(&[("via", "a"), ("via", "b"), ("x-one", "1")])
        );
        assert_eq!(h.request.remove, ["x-debug"]);
        assert_eq!(
            h.response,
            Edits {
                remove: vec!["server".into()],
                ..Edits::default()
            }
        );
    }

    #[test]
    fn errors_name_the_key() {
        let err = |config: &str| parse_config(config).unwrap_err();
        assert_eq!(
            err(r#"{"request": {"set": {"bad name": "x"}}}"#),
            r#"request.set."bad name": invalid header name"#
        );
        assert_eq!(
            err(r#"{"response": {"add": {"x": "a\nb"}}}"#),
            r#"response.add."x": invalid header value (control character)"#
        );
        assert_eq!(
            err(r#"{"request": {"remove": ["ok", ""]}}"#),
            "request.remove[1]: invalid header name"
        );
        assert_eq!(
            err(r#"{"request": {"replace": {}}}"#),
            "request.replace: unknown key (expected `set`, `add` or `remove`)"
        );
        assert_eq!(
            err(r#"{"requests": {}}"#),
            "requests: unknown key (expected `request` or `response`)"
        );
        assert_eq!(
            err(r#"{"request": {"set": {"x": 1}}}"#),
            r#"request.set."x": expected a header value (a string)"#
        );
        assert_eq!(err(r#"{"request": []}"#), "request: expected an object");
        assert!(err("[").starts_with("config is not valid JSON"));
    }
}
