//! The audit log: one entry for every admin change (plugin upload, config
//! change, rollback, reload by request or SIGHUP) and every change attempt
//! refused for its token: when, who, what, which versions, and the result.
//!
//! The last [`KEPT_ENTRIES`] are kept in memory for `GET /audit`; with
//! `[admin] audit_log` each entry is also appended to that file as one JSON
//! line, by a writer thread so a slow disk never holds up the admin API.

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::AuditLogFile;
use crate::plugin::sha256_hex;

/// How many entries `GET /audit` can show.
pub(crate) const KEPT_ENTRIES: usize = 1000;

/// Lines waiting for the writer thread; past this the file misses entries
/// (logged) rather than the admin API waiting on the disk.
const QUEUED_LINES: usize = 1024;

/// How long dropping the log waits for queued lines to reach the file.
const FLUSH_ON_DROP: Duration = Duration::from_secs(1);

/// Who asked for a change.
#[derive(Debug, Clone)]
pub(crate) enum Actor {
    /// An admin request that presented the token, named by the token's id.
    Token {
        /// `token:` and the first 12 hex digits of the token's SHA-256.
        id: Arc<str>,
        peer: SocketAddr,
    },
    /// An admin request from `peer`, when no token is configured or it
    /// presented a wrong one.
    Peer(SocketAddr),
    /// A signal to the process, like `SIGHUP`.
    Signal(&'static str),
}

impl Actor {
    /// The id that names `token` in the log: never the token itself.
    pub(crate) fn token_id(token: &str) -> Arc<str> {
        let digest = sha256_hex(token.as_bytes());
        Arc::from(format!("token:{}", &digest[..12]))
    }

    fn who(&self) -> String {
        match self {
            Actor::Token { id, .. } => id.to_string(),
            Actor::Peer(peer) => peer.to_string(),
            Actor::Signal(name) => format!("signal:{name}"),
        }
    }

    fn peer(&self) -> Option<SocketAddr> {
        match self {
            Actor::Token { peer, .. } | Actor::Peer(peer) => Some(*peer),
            Actor::Signal(_) => None,
        }
    }
}

/// What was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Action {
    /// `PUT /plugins/{name}`: a new component.
    Upload,
    /// `PUT /plugins/{name}/config`: new config for the running component.
    Config,
    /// `POST /plugins/{name}/rollback`.
    Rollback,
    /// `POST /reload` or SIGHUP: the manifest re-read.
    Reload,
}

/// How a change ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Outcome {
    /// Applied.
    Ok,
    /// Refused; the running config is untouched.
    Refused,
    /// Refused for a missing or wrong token.
    Unauthorized,
}

/// One audit entry, as `GET /audit` and the JSONL file show it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AuditEntry {
    /// RFC 3339, UTC, milliseconds.
    at: String,
    /// A token id, a peer address, or `signal:SIGHUP`.
    who: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<SocketAddr>,
    action: Action,
    /// A plugin name, or the manifest path of a reload.
    target: String,
    /// SHA-256 of the component running before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) old_version: Option<String>,
    /// SHA-256 of the component running after (or offered, when refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) new_version: Option<String>,
    /// The plugin's config JSON now running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) config: Option<serde_json::Value>,
    result: Outcome,
    /// The HTTP status the change was answered with.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    /// Why it was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Longest target kept: a name from a refused request's path is the
/// client's to choose.
const MAX_TARGET_CHARS: usize = 256;

impl AuditEntry {
    /// An entry for `action` on `target` by `actor`, result `ok` until
    /// [`AuditEntry::refused`] says otherwise.
    pub(crate) fn new(actor: &Actor, action: Action, target: &str) -> AuditEntry {
        AuditEntry {
            at: String::new(),
            who: actor.who(),
            peer: actor.peer(),
            action,
            target: target.chars().take(MAX_TARGET_CHARS).collect(),
            old_version: None,
            new_version: None,
            config: None,
            result: Outcome::Ok,
            status: None,
            error: None,
        }
    }

    /// Who asked.
    pub(crate) fn who(&self) -> &str {
        &self.who
    }

    /// What was asked for.
    pub(crate) fn action(&self) -> Action {
        self.action
    }

    /// The plugin name, or the manifest path.
    pub(crate) fn target(&self) -> &str {
        &self.target
    }

    /// Applied, answered with `status` when a request asked.
    pub(crate) fn ok(mut self, status: Option<u16>) -> AuditEntry {
        self.result = Outcome::Ok;
        self.status = status;
        self
    }

    /// Refused for `error`, answered with `status` when a request asked.
    pub(crate) fn refused(mut self, status: Option<u16>, error: &str) -> AuditEntry {
        self.result = Outcome::Refused;
        self.status = status;
        self.error = Some(error.to_string());
        self
    }

    /// Refused for a missing or wrong token.
    pub(crate) fn unauthorized(mut self, status: u16) -> AuditEntry {
        self.result = Outcome::Unauthorized;
        self.status = Some(status);
        self.error = Some("a valid bearer token is required".to_string());
        self
    }
}

/// The audit log shared by the admin API and the SIGHUP handler.
#[derive(Debug)]
pub(crate) struct AuditLog {
    recent: Mutex<VecDeque<AuditEntry>>,
    file: Option<Writer>,
}

/// The queue to the thread appending to `[admin] audit_log`.
#[derive(Debug)]
struct Writer {
    path: PathBuf,
    lines: Option<SyncSender<String>>,
    /// Closed by the thread when it has written every queued line.
    done: Mutex<Receiver<()>>,
}

impl AuditLog {
    /// A log kept in memory, and appended to `file` when given.
    pub(crate) fn new(file: Option<&AuditLogFile>) -> AuditLog {
        AuditLog {
            recent: Mutex::new(VecDeque::new()),
            file: file.and_then(Writer::start),
        }
    }

    /// Stamps `entry` with the time and records it: in memory at once, to
    /// the file as soon as the writer gets to it.
    pub(crate) fn record(&self, mut entry: AuditEntry) {
        entry.at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let line = self.file.as_ref().and_then(|_| {
            serde_json::to_string(&entry)
                .map_err(|error| tracing::error!(%error, "audit entry not serialisable"))
                .ok()
        });
        // One lock around both, so the file has the order memory has.
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == KEPT_ENTRIES {
            recent.pop_front();
        }
        recent.push_back(entry);
        if let (Some(writer), Some(line)) = (&self.file, line) {
            writer.send(line);
        }
    }

    /// The last `limit` entries (all kept ones when `None`), oldest first.
    pub(crate) fn recent(&self, limit: Option<usize>) -> Vec<AuditEntry> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = limit.map_or(0, |limit| recent.len().saturating_sub(limit));
        recent.iter().skip(skip).cloned().collect()
    }
}

impl Writer {
    /// Starts the thread that appends to `file`; `None` (logged) when no
    /// thread can be started, leaving the log in memory only.
    fn start(file: &AuditLogFile) -> Option<Writer> {
        let (lines, queued) = std::sync::mpsc::sync_channel::<String>(QUEUED_LINES);
        let (finished, done) = std::sync::mpsc::channel::<()>();
        let target = file.file.clone();
        let path = file.path.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-audit".to_string())
            .spawn({
                let path = path.clone();
                move || {
                    for mut line in queued {
                        line.push('\n');
                        if let Err(error) = (&*target).write_all(line.as_bytes()) {
                            tracing::error!(path = %path.display(), %error, "cannot append to the audit log");
                        }
                    }
                    drop(finished);
                }
            });
        match spawned {
            Ok(_) => Some(Writer {
                path,
                lines: Some(lines),
                done: Mutex::new(done),
            }),
            Err(error) => {
                tracing::error!(path = %path.display(), %error, "cannot start the audit log writer; entries are kept in memory only");
                None
            }
        }
    }

    fn send(&self, line: String) {
        let Some(lines) = &self.lines else { return };
        match lines.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => tracing::error!(
                path = %self.path.display(),
                "the audit log file is {QUEUED_LINES} entries behind; this entry is in GET /audit but not in the file"
            ),
            Err(TrySendError::Disconnected(_)) => tracing::error!(
                path = %self.path.display(),
                "the audit log writer has stopped; this entry is in GET /audit but not in the file"
            ),
        }
    }
}

impl Drop for Writer {
    /// Gives the writer a moment to append what is queued.
    fn drop(&mut self) {
        self.lines = None;
        let done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = done.recv_timeout(FLUSH_ON_DROP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 4000))
    }

    #[test]
    fn a_token_is_named_by_its_hash_never_itself() {
        let id = Actor::token_id("secret-token-0123456789");
        assert!(
            id.starts_with("token:") && id.len() == "token:".len() + 12,
            "{id}"
        );
        assert!(!id.contains("secret"));
        assert_eq!(id, Actor::token_id("secret-token-0123456789"));
        assert_ne!(id, Actor::token_id("secret-token-0123456780"));
    }

    #[test]
    fn memory_keeps_the_newest_entries_in_order() {
        let log = AuditLog::new(None);
        for i in 0..KEPT_ENTRIES + 5 {
            log.record(AuditEntry::new(
                &Actor::Peer(peer()),
                Action::Reload,
                &i.to_string(),
            ));
        }
        let all = log.recent(None);
        assert_eq!(all.len(), KEPT_ENTRIES);
        assert_eq!(all[0].target, "5");
        let last = log.recent(Some(2));
        let targets: Vec<&str> = last.iter().map(|e| e.target.as_str()).collect();
        let newest = (KEPT_ENTRIES + 4).to_string();
        let before = (KEPT_ENTRIES + 3).to_string();
        assert_eq!(targets, [before.as_str(), newest.as_str()]);
        assert!(log.recent(Some(0)).is_empty());
    }

    #[test]
    fn entries_serialise_with_only_what_applies() {
        let entry = AuditEntry::new(&Actor::Signal("SIGHUP"), Action::Reload, "/etc/sluice.toml")
            .refused(None, "bad manifest");
        let json = serde_json::to_value(&entry).unwrap_or_default();
        assert_eq!(json["who"], "signal:SIGHUP");
        assert_eq!(json["result"], "refused");
        assert_eq!(json["error"], "bad manifest");
        assert!(
            json.get("peer").is_none() && json.get("status").is_none(),
            "{json}"
        );
    }
}
