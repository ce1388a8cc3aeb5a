//! Manifest text through `Config::parse`: TOML, serde, validation, the route
//! table. Inputs whose loading has side effects (files, threads, Wasm) are
//! skipped; see `sluice::fuzzing::manifest`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sluice::fuzzing::manifest(data));
