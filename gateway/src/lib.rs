//! Sluice: an edge gateway whose routing and traffic policies are meant to be
//! WebAssembly components.
//!
//! The request path, in module order: [`config`] turns a manifest into
//! immutable tables; [`proxy`] accepts connections (TLS by SNI, HTTP/1.1 and
//! HTTP/2), matches a route, and forwards through an upstream's keep-alive
//! pool; [`telemetry`] writes the access log; [`admin`] serves the admin API. [`demo`] runs echo backends for
//! `sluice demo`, and [`cli`] is the `sluice` command line.

pub mod admin;
#[doc(hidden)]
pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod plugin;
pub mod proxy;
mod route;
pub mod telemetry;
mod upstream;

pub use config::{Config, ConfigError};
pub use plugin::{CallStatsSnapshot, PluginReport};
pub use proxy::{Drained, Gateway, Reloader, StartError, Worker, bind_for_workers};
pub use upstream::HealthChecks;
