//! Request headers through an in-process gateway to a recording origin,
//! checked against the forwarding rules (hop-by-hop removal,
//! `X-Forwarded-*`, `Via`, `Host`); see `sluice::fuzzing::request_headers`
//! for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzzing::request_headers(data));
