//! Routes and a request through validation and the route table, checked
//! against a model of the routing rules; see `sluice::fuzzing::route_match`
//! for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzzing::route_match(data));
