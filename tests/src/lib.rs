//! Test harness for Sluice's integration tests: real gateway, real backends,
//! real sockets, all on loopback with ports from binding `127.0.0.1:0`.
//!
//! - [`origin`]: HTTP/1.1 test backends that count connections and requests,
//!   record what they saw and answer by [`Mode`] (echo, stream, delay, stall,
//!   WebSocket).
//! - [`gateway`]: [`TestGateway`], a gateway serving a manifest in-process,
//!   stopped when dropped, and [`Manifest`], a small manifest builder.
//! - [`client`]: HTTP/1.1 and HTTP/2 client connections, a channel-backed
//!   streaming request body, and [`within`], the bounded wait every test uses.
//! - [`tls`]: a test CA issuing certificates, TLS client configs and
//!   connections.
//!
//! Every wait is bounded: a broken gateway fails a test instead of hanging it.

pub mod client;
pub mod gateway;
pub mod guests;
pub mod origin;
pub mod redis;
pub mod tls;

pub use client::{Reply, WAIT, within};
pub use gateway::{Manifest, TestGateway};
pub use origin::{Mode, Origin, SeenRequest};
