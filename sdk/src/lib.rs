//! Write [Sluice](https://example.invalid/sluice) policies in Rust.
//!
//! A policy is a type that implements [`Policy`], exported with one macro
//! naming the WIT world it targets:
//!
//! ```no_run
//! use sluice_sdk::{Action, Policy, Request};
//!
//! struct Hello;
//!
//! impl Policy for Hello {
//!     fn init(_config: &str) -> Result<Self, String> {
//!         Ok(Hello)
//!     }
//!
//!     fn on_request(&self, req: &Request) -> Action {
//!         if req.path() == "/hello" {
//!             return Action::respond(200, "hello\n");
//!         }
//!         Action::Continue
//!     }
//! }
//!
//! sluice_sdk::export_request_policy!(Hello);
//! ```
//!
//! Build it as a `cdylib` with `cargo build --release --target wasm32-wasip2`:
//! the `.wasm` file is a component the gateway loads (`sdk/README.md` has the
//! whole recipe).
//!
//! | macro                        | world            | hooks the gateway calls                    |
//! |------------------------------|------------------|--------------------------------------------|
//! | [`export_request_policy!`]   | `request-policy` | `init`, `on_request`                       |
//! | [`export_rewrite_policy!`]   | `rewrite-policy` | `init`, `on_request`, `on_response`        |
//! | [`export_guard!`]            | `guard`          | `init`, `on_request`, `on_outcome`         |
//! | [`export_filter!`]           | `filter`         | `init`, `on_request`, `on_response`, `on_outcome` |
//! | [`export_balancer!`]         | `balancer`       | `init`, `pick`                             |
//! | [`export_tracking_balancer!`] | `tracking-balancer` | `init`, `pick`, `on_response`, `on_outcome` |
//!
//! Use one export macro per crate. Instances are pooled and interchangeable:
//! keep configuration in the policy value, and anything that must outlive one
//! call in the host ([`state`]).
#![warn(missing_docs)]

// Lets the generated bindings name this crate as `::sluice_sdk` both here and
// inside the export macros, which expand in a policy's crate.
extern crate self as sluice_sdk;

/// Bindings generated from `wit/` for the `gateway` world (every export), so
/// that the types and imports exist once and each export macro picks the
/// hooks of its world. With `pub_export_macro` the library's own
/// `component-type` section lists only imports; the export macros add the
/// world's full description to the policy's binary.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "gateway",
        pub_export_macro: true,
        export_macro_name: "__sluice_export_gateway",
        default_bindings_module: "::sluice_sdk::bindings",
        runtime_path: "::sluice_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

use bindings::sluice::policy as wit;

pub use wit::geo::Location;
pub use wit::types::{
    Action, Candidate, Candidates, ErrorKind, Outcome, Reply, Request, Response, Upstream,
};

pub mod balance;
pub mod config;
pub mod net;
pub mod text;

/// A policy: configured once per instance by [`init`](Policy::init), then
/// called for each request through the hooks its world exports.
///
/// Only `init` is required; the other hooks default to doing nothing
/// (`on_request` continues, `pick` declines). The export macro decides which
/// hooks the gateway can call.
pub trait Policy: Sized + 'static {
    /// Called once per instance with the plugin's config as JSON ("{}" when none).
    ///
    /// An `Err` refuses the plugin: `sluice check` and the admin API show the
    /// message, so name the offending key.
    fn init(config: &str) -> Result<Self, String>;

    /// Decides what happens to a request: [`Action::Continue`], answer it
    /// ([`Action::respond`]) or steer it to another upstream ([`Action::steer`]).
    /// May rewrite the request's headers on the way.
    fn on_request(&self, req: &Request) -> Action {
        let _ = req;
        Action::Continue
    }

    /// Sees the upstream's response head (and the request as forwarded); may
    /// rewrite the response's headers.
    fn on_response(&self, req: &Request, resp: &Response) {
        let _ = (req, resp);
    }

    /// Learns what happened to a forwarded request.
    fn on_outcome(&self, outcome: &Outcome) {
        let _ = outcome;
    }

    /// Picks an endpoint for `upstream`: the position in `candidates` of the
    /// one to use, or `None` to decline (the client gets 503). The
    /// [`balance`] module has the usual algorithms.
    fn pick(&self, req: &Request, upstream: &Upstream, candidates: &Candidates) -> Option<u32> {
        let _ = (req, upstream, candidates);
        None
    }
}

impl Action {
    /// Answers the request with `status` and `body`, and no extra headers.
    ///
    /// ```
    /// # use sluice_sdk::Action;
    /// let deny = Action::respond(403, "blocked\n");
    /// ```
    pub fn respond(status: u16, body: impl Into<Vec<u8>>) -> Action {
        Action::Respond(Reply::new(status).with_body(body))
    }

    /// Forwards the request to the upstream named `upstream`.
    pub fn steer(upstream: impl Into<String>) -> Action {
        Action::Steer(upstream.into())
    }
}

impl Reply {
    /// A reply with `status`, no headers and an empty body.
    ///
    /// ```
    /// # use sluice_sdk::{Action, Reply};
    /// let action: Action = Reply::new(429)
    ///     .with_header("retry-after", "1")
    ///     .with_body("slow down\n")
    ///     .into();
    /// ```
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// Adds a header (after any already added).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the body.
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }
}

impl From<Reply> for Action {
    fn from(reply: Reply) -> Action {
        Action::Respond(reply)
    }
}

/// Shared state kept by the host, scoped to the plugin: atomic counters,
/// compare-and-swap values with an optional TTL, and GCRA rate limits
/// ([`throttle`](state::throttle)). Every instance and every gateway worker
/// sees the same values.
pub mod state {
    pub use crate::wit::state::{
        ThrottleResult, compare_and_swap, counter_add, get, remove, throttle,
    };
}

/// Time, as the host sees it.
pub mod clock {
    pub use crate::wit::clock::{monotonic_ns, unix_ms};
}

/// Fast, non-cryptographic randomness from the host.
pub mod random {
    pub use crate::wit::random::next_u64;
}

/// Messages into the gateway's JSON log, tagged with the plugin's name.
pub mod log {
    pub use crate::wit::log::{Level, write};

    /// Logs `message` at [`Level::Trace`].
    pub fn trace(message: &str) {
        write(Level::Trace, message);
    }

    /// Logs `message` at [`Level::Debug`].
    pub fn debug(message: &str) {
        write(Level::Debug, message);
    }

    /// Logs `message` at [`Level::Info`].
    pub fn info(message: &str) {
        write(Level::Info, message);
    }

    /// Logs `message` at [`Level::Warn`].
    pub fn warn(message: &str) {
        write(Level::Warn, message);
    }

    /// Logs `message` at [`Level::Error`].
    pub fn error(message: &str) {
        write(Level::Error, message);
    }
}

/// Metrics the gateway exports with a `plugin` label.
pub mod metrics {
    pub use crate::wit::metrics::{counter_add, gauge_set};
}

/// The endpoints of the upstream a hook is about: eject one (outlier
/// detection), readmit it, and report a circuit breaker's state for
/// `GET /upstreams`; and how many endpoints of any upstream are healthy
/// ([`healthy`](health::healthy)), for failover between upstreams.
pub mod health {
    pub use crate::wit::health::{Circuit, eject, healthy, readmit, report};
}

/// What a policy tells the gateway about itself from `init`.
pub mod hooks {
    pub use crate::wit::hooks::Hook;

    /// Tells the gateway that, with this config, `hook` does nothing, so it
    /// is never called: one Wasm call less per request. Call it from
    /// `init` (later calls are ignored), e.g. a rate limiter that sends no
    /// quota headers skips [`Hook::OnResponse`]. Outside WebAssembly (a
    /// policy's native unit tests) there is no gateway and it does nothing.
    pub fn skip(hook: Hook) {
        #[cfg(target_arch = "wasm32")]
        crate::wit::hooks::skip(hook);
        #[cfg(not(target_arch = "wasm32"))]
        let _ = hook;
    }
}

/// Country and continent of an IP address, from the gateway's geo database.
pub mod geo {
    pub use crate::wit::geo::{Location, lookup};
}

/// Exports `$ty` (a [`Policy`]) as a component of world `request-policy`:
/// `init` and `on_request`.
///
/// ```no_run
/// struct Allow;
/// impl sluice_sdk::Policy for Allow {
///     fn init(_config: &str) -> Result<Self, String> { Ok(Allow) }
/// }
/// sluice_sdk::export_request_policy!(Allow);
/// ```
#[macro_export]
macro_rules! export_request_policy {
    ($ty:ty) => {
        $crate::__export_policy!(
            $ty,
            REQUEST_POLICY,
            "component-type:sluice-sdk:request-policy",
            request_hook
        );
    };
}

/// Exports `$ty` (a [`Policy`]) as a component of world `rewrite-policy`:
/// `init`, `on_request` and `on_response`.
#[macro_export]
macro_rules! export_rewrite_policy {
    ($ty:ty) => {
        $crate::__export_policy!(
            $ty,
            REWRITE_POLICY,
            "component-type:sluice-sdk:rewrite-policy",
            request_hook,
            response_hook
        );
    };
}

/// Exports `$ty` (a [`Policy`]) as a component of world `guard`:
/// `init`, `on_request` and `on_outcome`.
#[macro_export]
macro_rules! export_guard {
    ($ty:ty) => {
        $crate::__export_policy!(
            $ty,
            GUARD,
            "component-type:sluice-sdk:guard",
            request_hook,
            outcome_hook
        );
    };
}

/// Exports `$ty` (a [`Policy`]) as a component of world `filter`:
/// `init`, `on_request`, `on_response` and `on_outcome`.
#[macro_export]
macro_rules! export_filter {
    ($ty:ty) => {
        $crate::__export_policy!(
            $ty,
            FILTER,
            "component-type:sluice-sdk:filter",
            request_hook,
            response_hook,
            outcome_hook
        );
    };
}

/// Exports `$ty` (a [`Policy`]) as a component of world `balancer`:
/// `init` and `pick`.
#[macro_export]
macro_rules! export_balancer {
    ($ty:ty) => {
        $crate::__export_policy!($ty, BALANCER, "component-type:sluice-sdk:balancer", balance);
    };
}

/// Exports `$ty` (a [`Policy`]) as a component of world
/// `tracking-balancer`: `init`, `pick`, and `on_response` / `on_outcome` for
/// the requests it picked for.
#[macro_export]
macro_rules! export_tracking_balancer {
    ($ty:ty) => {
        $crate::__export_policy!(
            $ty,
            TRACKING_BALANCER,
            "component-type:sluice-sdk:tracking-balancer",
            balance,
            response_hook,
            outcome_hook
        );
    };
}

/// Defines and exports a balancer that runs one [`balance::Algorithm`] and
/// takes no configuration: `pub struct $name`, its [`Policy`] (`init`
/// accepts only `{}`, naming any key it is given; `pick` runs the
/// algorithm), and the `balancer` world's exports. The first-party
/// `round-robin`, `weighted`, `least-request`, `p2c-ewma` and `random`
/// plugins are each this one line.
///
/// ```no_run
/// sluice_sdk::export_algorithm!(Weighted, sluice_sdk::balance::Algorithm::Weighted);
/// ```
#[macro_export]
macro_rules! export_algorithm {
    ($name:ident, $algorithm:expr) => {
        #[doc = concat!("The `", stringify!($name), "` balancer: one algorithm, no configuration.")]
        pub struct $name($crate::balance::Balancer);

        impl $crate::Policy for $name {
            fn init(config: &str) -> ::std::result::Result<Self, ::std::string::String> {
                let algorithm: $crate::balance::Algorithm = $algorithm;
                $crate::balance::no_config(config, algorithm.name())?;
                Ok($name($crate::balance::Balancer::new(algorithm)))
            }

            fn pick(
                &self,
                _req: &$crate::Request,
                upstream: &$crate::Upstream,
                candidates: &$crate::Candidates,
            ) -> ::std::option::Option<u32> {
                self.0.pick(upstream, candidates)
            }
        }

        $crate::export_balancer!($name);
    };
}

/// The body of every export macro: the instance's policy value, the glue
/// implementing the generated traits, the C ABI exports and the world's
/// `component-type` section.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_policy {
    ($ty:ty, $world:ident, $section:literal $(, $hook:ident)*) => {
        // Natively (workspace builds, tests, clippy) only check that `$ty` is
        // a policy: the C ABI exports are wasm symbol names, which native
        // linkers refuse.
        #[cfg(not(target_arch = "wasm32"))]
        const _: fn(&str) -> ::std::result::Result<$ty, ::std::string::String> =
            <$ty as $crate::Policy>::init;

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                // The value `init` returned; one per instance.
                static POLICY: ::std::cell::OnceCell<$ty> = const { ::std::cell::OnceCell::new() };
            }

            struct SluiceGlue;

            fn with_policy<R>(hook: &str, f: impl FnOnce(&$ty) -> R) -> R {
                POLICY.with(|slot| match slot.get() {
                    Some(policy) => f(policy),
                    None => $crate::__private::not_initialized(hook),
                })
            }

            impl $crate::__private::configure::Guest for SluiceGlue {
                fn init(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    POLICY.with(|slot| {
                        if slot.get().is_some() {
                            return Err($crate::__private::init_twice());
                        }
                        let policy = <$ty as $crate::Policy>::init(&config)?;
                        slot.set(policy).map_err(|_| $crate::__private::init_twice())
                    })
                }
            }
            $crate::__export_sluice_policy_configure_0_1_0_cabi!(
                SluiceGlue with_types_in $crate::__private::configure
            );

            $($crate::__export_hook!($hook, $ty, SluiceGlue, with_policy);)*

            #[used]
            #[unsafe(link_section = $section)]
            static COMPONENT_TYPE: [u8; $crate::__private::worlds::$world.len()] =
                $crate::__private::worlds::$world;
        };
    };
}

/// One hook of [`__export_policy!`]: the trait impl forwarding to the policy
/// and the C ABI export.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_hook {
    (request_hook, $ty:ty, $glue:ident, $with:ident) => {
        impl $crate::__private::request_hook::Guest for $glue {
            fn on_request(req: &$crate::Request) -> $crate::Action {
                $with("on-request", |policy| <$ty as $crate::Policy>::on_request(policy, req))
            }
        }
        $crate::__export_sluice_policy_request_hook_0_1_0_cabi!(
            $glue with_types_in $crate::__private::request_hook
        );
    };
    (response_hook, $ty:ty, $glue:ident, $with:ident) => {
        impl $crate::__private::response_hook::Guest for $glue {
            fn on_response(req: &$crate::Request, resp: &$crate::Response) {
                $with("on-response", |policy| <$ty as $crate::Policy>::on_response(policy, req, resp))
            }
        }
        $crate::__export_sluice_policy_response_hook_0_1_0_cabi!(
            $glue with_types_in $crate::__private::response_hook
        );
    };
    (outcome_hook, $ty:ty, $glue:ident, $with:ident) => {
        impl $crate::__private::outcome_hook::Guest for $glue {
            fn on_outcome(outcome: $crate::Outcome) {
                $with("on-outcome", |policy| <$ty as $crate::Policy>::on_outcome(policy, &outcome))
            }
        }
        $crate::__export_sluice_policy_outcome_hook_0_1_0_cabi!(
            $glue with_types_in $crate::__private::outcome_hook
        );
    };
    (balance, $ty:ty, $glue:ident, $with:ident) => {
        impl $crate::__private::balance::Guest for $glue {
            fn pick(
                req: &$crate::Request,
                upstream: &$crate::Upstream,
                candidates: &$crate::Candidates,
            ) -> ::std::option::Option<u32> {
                $with("pick", |policy| <$ty as $crate::Policy>::pick(policy, req, upstream, candidates))
            }
        }
        $crate::__export_sluice_policy_balance_0_1_0_cabi!(
            $glue with_types_in $crate::__private::balance
        );
    };
}

/// Support for the export macros; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::bindings::exports::sluice::policy::{
        balance, configure, outcome_hook, request_hook, response_hook,
    };
    pub use wit_bindgen;

    /// Each world's `component-type` section (written by `build.rs`).
    pub mod worlds {
        include!(concat!(env!("OUT_DIR"), "/worlds.rs"));
    }

    /// Traps: `hook` ran on an instance whose `init` did not succeed.
    #[cold]
    pub fn not_initialized(hook: &str) -> ! {
        let message = format!("sluice-sdk: `{hook}` called before a successful `init`");
        crate::log::error(&message);
        panic!("{message}");
    }

    /// The error of a second `init` on one instance.
    #[cold]
    pub fn init_twice() -> String {
        "sluice-sdk: `init` called twice on one instance".to_string()
    }
}
