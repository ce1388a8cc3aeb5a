//! The fuzz targets' kept inputs, on stable, as part of `cargo test
//! --workspace`: every file in `fuzz/regressions/<target>/` (inputs that
//! crashed a fuzzer once, and hand-picked nasty ones) and the seed corpora
//! `fuzz/corpus/<target>/seed-*`, run through the same entry points as the
//! `cargo fuzz` targets (`sluice::fuzzing`). See README, "Fuzzing".

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// Runs `entry` on every kept input of fuzz target `target`; fails naming
/// each input that panicked (the panic messages are printed above).
fn replay(target: &str, entry: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let regressions = files(&fuzz.join("regressions").join(target), |_| true);
    assert!(
        !regressions.is_empty(),
        "no inputs in fuzz/regressions/{target}/"
    );
    let seeds = files(&fuzz.join("corpus").join(target), |name| {
        name.starts_with("seed-")
    });
    let mut failed = Vec::new();
    for path in regressions.iter().chain(&seeds) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| entry(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "fuzz target {target}: these inputs fail:\n{}",
        failed.join("\n")
    );
}

/// The files in `dir` whose names pass `keep`, sorted.
fn files(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .filter(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
        .collect();
    files.sort();
    files
}

#[test]
fn manifest_inputs() {
    replay("manifest", sluice::fuzzing::manifest);
}

#[test]
fn route_match_inputs() {
    replay("route_match", sluice::fuzzing::route_match);
}

#[test]
fn headers_inputs() {
    replay("headers", sluice::fuzzing::request_headers);
}
