//! Compiles the guests the integration tests load — the Rust example policy,
//! the probe and the picker balancer — to `wasm32-wasip2` components, and
//! tells the tests where they are: `env!("SLUICE_EXAMPLE_BLOCK_WASM")`,
//! `env!("SLUICE_TEST_PROBE_WASM")`, `env!("SLUICE_TEST_PICKER_WASM")`.

// The guest-building code is the gateway's build script (one inner target
// directory, one way of building).
#[allow(dead_code)]
#[path = "../gateway/build.rs"]
mod guests;

/// (package, its directory in the workspace, the variable naming its component).
const GUESTS: &[(&str, &str, &str)] = &[
    (
        "sluice-example-block",
        "examples/policies/block-rust",
        "SLUICE_EXAMPLE_BLOCK_WASM",
    ),
    (
        "sluice-test-probe",
        "tests/plugins/probe",
        "SLUICE_TEST_PROBE_WASM",
    ),
    (
        "sluice-test-picker",
        "tests/plugins/picker",
        "SLUICE_TEST_PICKER_WASM",
    ),
];

fn main() {
    let root = guests::workspace_root();
    let guests: Vec<guests::Guest> = GUESTS
        .iter()
        .map(|(package, dir, _)| guests::Guest {
            package: package.to_string(),
            dir: root.join(dir),
        })
        .collect();
    let wasm = guests::build_guests(&guests);
    for ((_, _, var), path) in GUESTS.iter().zip(wasm) {
        println!("cargo:rustc-env={var}={}", path.display());
    }
}
