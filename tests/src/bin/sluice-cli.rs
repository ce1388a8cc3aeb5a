//! The `sluice` command, built inside the test package so integration tests
//! can run it as a process (see tests/Cargo.toml).

fn main() -> std::process::ExitCode {
    sluice::cli::main()
}
