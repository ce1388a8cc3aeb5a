//! The `sluice` command.

/// jemalloc instead of the system allocator. With glibc's, a gateway that
/// held 10,000 connections kept most of that memory after they closed, and
/// each later burst grew it further (261 → 321 → 337 MiB over three c10k
/// rounds); jemalloc hands unused pages back (see [`malloc_conf`]) and stays
/// at the first burst's peak. BENCHMARKS.md has the figures.
///
/// The `system-allocator` feature turns it off, for heap profilers that hook
/// malloc (heaptrack).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: pages freed for a second go back
/// to the OS (the default waits ten seconds, long enough for the next burst
/// to stack on top), with no "muzzy" second stage.
///
/// The name is jemalloc's documented hook (with tikv-jemalloc-sys's `_rjem_`
/// prefix); exporting it is "unsafe" only in that nothing else may export
/// the same symbol, and the string must end in NUL.
#[cfg(not(feature = "system-allocator"))]
#[allow(non_upper_case_globals, unsafe_code)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
