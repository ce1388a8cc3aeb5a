//! Policies written in Python and JavaScript, built into components with the
//! real tools, for tests that load them into the gateway.
//!
//! - [`python_component`]: an `app.py` built with componentize-py 0.25.1
//!   (`pip install componentize-py==0.25.1`).
//! - [`js_component`]: a policy module built with componentize-js 0.23.0
//!   through `sdk/js/componentize.mjs` (`npm ci --prefix sdk/js`).
//!
//! Building takes seconds and makes a 12–18 MB file, so each component is
//! cached under `target/guest-cache/`, named by a SHA-256 of everything that
//! shapes it: the sources, the WIT, the world and the tool's version. Builds
//! write a temporary file and rename it, so test processes building the same
//! guest at once never see half a file.
//!
//! When a tool is missing these return `Ok(None)` and print why to stderr, so
//! `cargo test` works on a machine without Python or Node; under `CI=true` a
//! missing tool is an error instead, so CI cannot skip these tests silently.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read as _, Seek as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sha2::{Digest as _, Sha256};

/// The first 8 bytes of every WebAssembly component (magic, then the
/// component-model version and layer).
pub const COMPONENT_MAGIC: [u8; 8] = *b"\0asm\x0d\x00\x01\x00";

/// How long one build may take before its process is killed.
pub const BUILD_LIMIT: Duration = Duration::from_secs(5 * 60);

/// Builds the Python policy in `app_dir` (module `app`, in `app.py`) for
/// `world` of `sluice:policy` (`request-policy`, `filter`, ...) and returns
/// the path of the component, cached under `target/guest-cache/`.
///
/// `Ok(None)` means componentize-py is not installed and `CI` is not `true`:
/// the caller should skip its test. Every `.py` file under `app_dir` is part
/// of the cache key.
pub fn python_component(app_dir: &Path, world: &str) -> anyhow::Result<Option<PathBuf>> {
    let app = app_dir.join("app.py");
    if !app.is_file() {
        bail!(
            "{} does not exist: a Python policy is an app.py",
            app.display()
        );
    }
    // Absolute, because the tool runs in `app_dir`.
    let app_dir = &app_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", app_dir.display()))?;
    let Some(version) = python_tool_version() else {
        return missing("componentize-py", "pip install componentize-py==0.25.1");
    };
    let mut key = CacheKey::new("python", world, &version)?;
    key.add_dir(app_dir, Depth::Tree, |path| {
        path.extension() == Some(OsStr::new("py"))
    })?;
    let mut command = Command::new("componentize-py");
    command
        .arg("-d")
        .arg(wit_dir())
        .arg("-w")
        .arg(format!("sluice:policy/{world}"))
        .arg("componentize")
        .arg("-p")
        .arg(app_dir)
        .arg("app")
        .arg("-o");
    // componentize-py also searches the current directory for modules. Its
    // errors are Python tracebacks; a Rust backtrace on top only buries them.
    command.current_dir(app_dir).env("RUST_BACKTRACE", "0");
    build(key, command, &app).map(Some)
}

/// Builds the JavaScript policy module `source` for `world` of
/// `sluice:policy` (`request-policy`, `filter`, ...) with
/// `sdk/js/componentize.mjs` and returns the path of the component, cached
/// under `target/guest-cache/`.
///
/// `Ok(None)` means Node or `sdk/js/node_modules` (`npm ci --prefix sdk/js`)
/// is missing and `CI` is not `true`: the caller should skip its test. The
/// `.js` and `.mjs` files next to `source` are part of the cache key, so a
/// policy may import its siblings.
pub fn js_component(source: &Path, world: &str) -> anyhow::Result<Option<PathBuf>> {
    if !source.is_file() {
        bail!("{} does not exist", source.display());
    }
    let source = &source
        .canonicalize()
        .with_context(|| format!("resolving {}", source.display()))?;
    let sdk = repo_root().join("sdk/js");
    let Some(version) = js_tool_version(&sdk) else {
        return missing(
            "componentize-js (node and sdk/js/node_modules)",
            "npm ci --prefix sdk/js",
        );
    };
    let mut key = CacheKey::new("js", world, &version)?;
    // The script's options and the exact dependency tree shape the output.
    key.add_file(&sdk.join("componentize.mjs"))?;
    key.add_file(&sdk.join("package-lock.json"))?;
    key.add_file(source)?;
    if let Some(dir) = source.parent() {
        key.add_dir(dir, Depth::Files, |path| {
            let script = matches!(path.extension().and_then(OsStr::to_str), Some("js" | "mjs"));
            script && path != source
        })?;
    }
    let mut command = Command::new("node");
    command
        .arg(sdk.join("componentize.mjs"))
        .arg(source)
        .arg(world);
    build(key, command, source).map(Some)
}

/// The workspace root: the parent of this package (`tests/`).
fn repo_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_path_buf()
}

/// The WIT package every policy is built against.
fn wit_dir() -> PathBuf {
    repo_root().join("wit")
}

/// `target/guest-cache/`, under `CARGO_TARGET_DIR` when that is set.
fn cache_dir() -> PathBuf {
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    };
    target.join("guest-cache")
}

/// Whether `CI=true`: then missing tools fail instead of skipping.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| value == "true")
}

/// Skips (prints why, `Ok(None)`) or, under `CI=true`, fails.
fn missing(tool: &str, install: &str) -> anyhow::Result<Option<PathBuf>> {
    if in_ci() {
        bail!("{tool} is not installed and CI=true requires it; install it with `{install}`");
    }
    eprintln!("skipped: {tool} not installed (install it with `{install}`)");
    Ok(None)
}

/// `componentize-py --version` (`componentize-py 0.25.1`), if it runs.
fn python_tool_version() -> Option<String> {
    let output = Command::new("componentize-py")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// The installed componentize-js's `package.json` (it holds the version), if
/// the package is installed and `node` runs.
fn js_tool_version(sdk: &Path) -> Option<String> {
    let package = sdk.join("node_modules/@bytecodealliance/componentize-js/package.json");
    let manifest = fs::read_to_string(package).ok()?;
    let node = Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    node.status.success().then(|| {
        format!(
            "node {} componentize-js {manifest}",
            String::from_utf8_lossy(&node.stdout).trim()
        )
    })
}

/// A SHA-256 over everything that shapes a component.
struct CacheKey(Sha256);

/// How deep [`CacheKey::add_dir`] looks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Depth {
    /// Only the directory's own files.
    Files,
    /// Every subdirectory too, except hidden ones and [`SKIPPED_DIRS`].
    Tree,
}

/// Directories of generated files, never sources.
const SKIPPED_DIRS: [&str; 2] = ["__pycache__", "node_modules"];

impl CacheKey {
    /// Starts a key with the language, the world, the tool and the WIT.
    fn new(language: &str, world: &str, tool: &str) -> anyhow::Result<CacheKey> {
        let mut key = CacheKey(Sha256::new());
        key.add_bytes(language.as_bytes());
        key.add_bytes(world.as_bytes());
        key.add_bytes(tool.as_bytes());
        key.add_dir(&wit_dir(), Depth::Tree, |path| {
            path.extension() == Some(OsStr::new("wit"))
        })?;
        Ok(key)
    }

    /// Adds a length-prefixed byte string, so adjacent inputs never blur.
    fn add_bytes(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    /// Adds a file's name and contents.
    fn add_file(&mut self, path: &Path) -> anyhow::Result<()> {
        let contents = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        self.add_bytes(path.as_os_str().as_encoded_bytes());
        self.add_bytes(&contents);
        Ok(())
    }

    /// Adds every file in `dir` (and, for [`Depth::Tree`], its
    /// subdirectories) that `include` accepts, in name order.
    fn add_dir(
        &mut self,
        dir: &Path,
        depth: Depth,
        include: impl Fn(&Path) -> bool + Copy,
    ) -> anyhow::Result<()> {
        let mut entries = fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("reading {}", dir.display()))?;
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(OsStr::to_str).unwrap_or("");
            if path.is_dir() {
                if depth == Depth::Tree && !SKIPPED_DIRS.contains(&name) && !name.starts_with('.') {
                    self.add_dir(&path, depth, include)?;
                }
            } else if include(&path) {
                self.add_file(&path)?;
            }
        }
        Ok(())
    }

    /// The cache file this key names.
    fn path(self) -> PathBuf {
        let digest = self.0.finalize();
        let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
        cache_dir().join(format!("{hex}.wasm"))
    }
}

/// Returns the cached component for `key`, or runs `command` with the output
/// path appended, checks what it wrote and moves it into the cache.
fn build(key: CacheKey, mut command: Command, source: &Path) -> anyhow::Result<PathBuf> {
    let cached = key.path();
    if starts_with_magic(&cached) {
        return Ok(cached);
    }
    let dir = cache_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Unique per build, so concurrent builds never write the same file.
    let out = tempfile::Builder::new()
        .prefix(".building-")
        .suffix(".wasm")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    let mut log = tempfile::tempfile().context("creating a build log")?;
    command
        .arg(out.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone().context("sharing the build log")?)
        .stderr(log.try_clone().context("sharing the build log")?);
    let started = Instant::now();
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {program} to build {}", source.display()))?;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for the build")? {
            break Some(status);
        }
        if started.elapsed() > BUILD_LIMIT {
            // Only the process this function started; it is ours to end.
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut output = Vec::new();
    log.rewind().context("reading the build log")?;
    let _ = log.read_to_end(&mut output);
    let output = String::from_utf8_lossy(&output);
    match status {
        None => bail!(
            "building {} with {program} took longer than {BUILD_LIMIT:?}; killed it. Output:\n{output}",
            source.display()
        ),
        Some(status) if !status.success() => bail!(
            "building {} with {program} failed ({status}):\n{output}",
            source.display()
        ),
        Some(_) => {}
    }
    if !starts_with_magic(out.path()) {
        bail!(
            "building {} with {program} wrote no component to {}. Output:\n{output}",
            source.display(),
            out.path().display()
        );
    }
    out.persist(&cached)
        .with_context(|| format!("moving the component to {}", cached.display()))?;
    Ok(cached)
}

/// Whether `path` is a file that starts with [`COMPONENT_MAGIC`].
fn starts_with_magic(path: &Path) -> bool {
    let mut head = [0u8; 8];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut head))
        .is_ok_and(|()| head == COMPONENT_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes when the build was skipped or made a component.
    fn assert_component(built: Option<PathBuf>) {
        if let Some(path) = built {
            assert!(
                starts_with_magic(&path),
                "{} is not a component",
                path.display()
            );
        }
    }

    #[test]
    fn python_example_builds_into_a_component() {
        let dir = repo_root().join("examples/policies/block-python");
        assert_component(python_component(&dir, "request-policy").unwrap());
    }

    #[test]
    fn js_example_builds_into_a_component() {
        let source = repo_root().join("examples/policies/block-js/policy.js");
        assert_component(js_component(&source, "request-policy").unwrap());
    }

    #[test]
    fn python_template_builds_into_a_component() {
        let dir = repo_root().join("sdk/python/template");
        assert_component(python_component(&dir, "request-policy").unwrap());
    }

    #[test]
    fn js_template_builds_into_a_component() {
        let source = repo_root().join("sdk/js/template/policy.js");
        assert_component(js_component(&source, "request-policy").unwrap());
    }

    #[test]
    fn a_broken_python_policy_fails_with_the_tool_output() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("app.py"), "def broken(:\n").unwrap();
        match python_component(dir.path(), "request-policy") {
            Ok(None) => {}
            Ok(Some(path)) => panic!("built {} from broken source", path.display()),
            Err(e) => assert!(format!("{e:#}").contains("SyntaxError"), "{e:#}"),
        }
    }
}
