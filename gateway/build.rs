//! Compiles the first-party plugins (`plugins/*`, packages `sluice-plugin-<dir>`)
//! to `wasm32-wasip2` components and writes `$OUT_DIR/builtin_plugins.rs`,
//! which `src/plugin/builtin.rs` includes to embed them in the binary.
//!
//! `tests/build.rs` reuses [`build_guests`] and the helpers below (it includes
//! this file as a module), so both build scripts share one inner target
//! directory and its compiled dependencies.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The target every guest is compiled for.
pub const GUEST_TARGET: &str = "wasm32-wasip2";

#[allow(dead_code)] // unused when `tests/build.rs` includes this file
fn main() {
    let root = workspace_root();
    let plugins_dir = root.join("plugins");
    let entries = std::fs::read_dir(&plugins_dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", plugins_dir.display()));
    let mut plugins = Vec::new();
    for entry in entries {
        let dir = entry
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", plugins_dir.display()))
            .path();
        if !dir.join("Cargo.toml").is_file() {
            continue;
        }
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_else(|| panic!("{}: a plugin directory needs a UTF-8 name", dir.display()))
            .to_string();
        plugins.push((name, dir));
    }
    plugins.sort();

    let guests: Vec<Guest> = plugins
        .iter()
        .map(|(name, dir)| Guest {
            package: format!("sluice-plugin-{name}"),
            dir: dir.clone(),
        })
        .collect();
    let wasm = build_guests(&guests);

    let mut code = String::from(
        "/// First-party plugins, compiled to wasm32-wasip2: (name, component bytes).\n\
         pub(crate) const BUILTIN_PLUGINS: &[(&str, &[u8])] = &[",
    );
    for (i, ((name, _), path)) in plugins.iter().zip(&wasm).enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        let path = path
            .to_str()
            .unwrap_or_else(|| panic!("{}: not a UTF-8 path", path.display()));
        write!(code, "{sep}({name:?}, include_bytes!({path:?}))").expect("write to a String");
    }
    code.push_str("];\n");
    write_if_changed(&out_dir().join("builtin_plugins.rs"), code.as_bytes());
}

/// A workspace package to build as a component.
pub struct Guest {
    /// The package name (`sluice-plugin-headers`); its `cdylib` is
    /// `<name with - as _>.wasm`.
    pub package: String,
    /// Its directory: `src/` and `Cargo.toml` there are watched.
    pub dir: PathBuf,
}

/// Builds `guests` to `wasm32-wasip2` components in release mode, copies each
/// into `$OUT_DIR` and returns their paths, in the order of `guests`.
///
/// Registers with `cargo:rerun-if-changed` each guest's `src/` and
/// `Cargo.toml` and what every guest depends on: the WIT, the Rust SDK (not
/// its Python and JavaScript parts), the lock file (which also changes when a
/// workspace member is added) and the workspace manifest. Panics, with
/// cargo's output, when the build fails.
pub fn build_guests(guests: &[Guest]) -> Vec<PathBuf> {
    let root = workspace_root();
    let mut watched = vec![
        root.join("wit"),
        root.join("sdk/src"),
        root.join("sdk/build.rs"),
        root.join("sdk/Cargo.toml"),
        root.join("Cargo.lock"),
        root.join("Cargo.toml"),
    ];
    for guest in guests {
        watched.push(guest.dir.join("src"));
        watched.push(guest.dir.join("Cargo.toml"));
    }
    for path in &watched {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    if guests.is_empty() {
        return Vec::new();
    }
    let packages: Vec<&str> = guests.iter().map(|guest| guest.package.as_str()).collect();

    let target_dir = guest_target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        // Its own target directory: the outer build holds the lock on its own.
        .arg("--target-dir")
        .arg(&target_dir)
        // Small components: no debug info. Function names stay (the wasm
        // name section), so `perf` can name guest code (SLUICE_WASM_PROFILER).
        .arg("--config")
        .arg("profile.release.debug=false")
        .arg("--config")
        .arg("profile.release.strip=\"debuginfo\"")
        .current_dir(&root);
    for package in &packages {
        command.arg("--package").arg(package);
    }
    scrub_env(&mut command, &target_dir);

    let started = Instant::now();
    let output = command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run `{}` to build the wasm guests: {e}",
            cargo.to_string_lossy()
        )
    });
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        let missing_target = stderr.contains(GUEST_TARGET)
            && (stderr.contains("target may not be installed")
                || stderr.contains("can't find crate"));
        let hint = if missing_target {
            format!(
                "\nThe {GUEST_TARGET} target is missing: run `rustup target add {GUEST_TARGET}`."
            )
        } else {
            String::new()
        };
        panic!(
            "building the wasm guests ({}) failed ({}).{hint}\n\
             command: {command:?}\n\
             --- cargo's output ---\n{stderr}",
            packages.join(", "),
            output.status,
        );
    }
    // Shown with `cargo build -vv`, and kept in the build script's output file.
    eprint!("{stderr}");
    eprintln!(
        "built {} in {:.1?} into {}",
        packages.join(", "),
        started.elapsed(),
        target_dir.display()
    );

    let built = target_dir.join(GUEST_TARGET).join("release");
    let out_dir = out_dir();
    packages
        .iter()
        .map(|package| {
            let file = format!("{}.wasm", package.replace('-', "_"));
            let wasm = built.join(&file);
            let bytes = std::fs::read(&wasm)
                .unwrap_or_else(|e| panic!("{package}: cannot read {}: {e}", wasm.display()));
            if !bytes.starts_with(b"\0asm\x0d\x00\x01\x00") {
                panic!(
                    "{package}: {} is not a WebAssembly component",
                    wasm.display()
                );
            }
            let copy = out_dir.join(&file);
            write_if_changed(&copy, &bytes);
            copy
        })
        .collect()
}

/// Removes what the outer build exports to build scripts but must not reach
/// the inner `cargo`: flags for the outer target, wrappers (`cargo clippy`
/// sets `RUSTC_WORKSPACE_WRAPPER`), target and build directories, profile
/// overrides and cargo's internal variables. The jobserver (`CARGO_MAKEFLAGS`)
/// is kept on purpose: the inner build then shares the outer `-j` budget
/// instead of adding as many jobs again (it always has the build script's
/// own token, so it cannot starve).
pub fn scrub_env(command: &mut Command, target_dir: &Path) {
    const REMOVE: &[&str] = &[
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_ENCODED_RUSTDOCFLAGS",
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
        "CARGO_PRIMARY_PACKAGE",
    ];
    for name in REMOVE {
        command.env_remove(name);
    }
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if name.starts_with("CARGO_PROFILE_") || name.starts_with("__CARGO_") {
            command.env_remove(name);
        }
    }
    // A configured `build.build-dir` would otherwise be the outer build's
    // (locked) one.
    command.env("CARGO_BUILD_BUILD_DIR", target_dir);
}

/// `<outer target dir>/wasm-guests`: shared by every build script that
/// builds guests, so they reuse compiled dependencies. The outer target
/// directory is `CARGO_TARGET_DIR` when absolute, else the ancestor of
/// `OUT_DIR` that holds cargo's `CACHEDIR.TAG`.
pub fn guest_target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from)
        && dir.is_absolute()
    {
        return dir.join("wasm-guests");
    }
    let out_dir = out_dir();
    let target = out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out.
        .or_else(|| out_dir.ancestors().nth(4))
        .unwrap_or_else(|| {
            panic!(
                "cannot find the target directory above OUT_DIR {}",
                out_dir.display()
            )
        });
    target.join("wasm-guests")
}

/// The workspace root: the parent of the package being built.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    manifest_dir
        .parent()
        .expect("the package is inside the workspace")
        .to_path_buf()
}

/// `$OUT_DIR`.
pub fn out_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
}

/// Writes `bytes` to `path` unless it already holds them, so an unchanged
/// file keeps its mtime and does not recompile what includes it.
pub fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
