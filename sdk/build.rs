//! Encodes each policy world of `../wit` as a `component-type` custom section.
//!
//! The generated bindings in `src/lib.rs` describe only the imports (so that
//! linking the SDK never forces an export on a policy). Each `export_*!`
//! macro then places the full description of its world — imports and
//! exports — in the policy's own binary, from the bytes written here, and
//! `wasm-component-ld` turns that into the component's type.

use std::fmt::Write as _;
use std::path::PathBuf;

/// The worlds a policy can target, with the name of the const holding each.
const WORLDS: &[(&str, &str)] = &[
    ("request-policy", "REQUEST_POLICY"),
    ("rewrite-policy", "REWRITE_POLICY"),
    ("guard", "GUARD"),
    ("filter", "FILTER"),
    ("balancer", "BALANCER"),
    ("tracking-balancer", "TRACKING_BALANCER"),
];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let wit = manifest_dir.join("../wit");
    println!("cargo:rerun-if-changed={}", wit.display());

    let mut resolve = wit_parser::Resolve::default();
    let (package, sources) = resolve
        .push_path(&wit)
        .unwrap_or_else(|e| panic!("cannot parse the WIT in {}: {e:?}", wit.display()));
    for path in sources.paths() {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let mut consts = String::new();
    for (world, name) in WORLDS {
        let id = resolve
            .select_world(&[package], Some(world))
            .unwrap_or_else(|e| panic!("world `{world}` missing from {}: {e:?}", wit.display()));
        let bytes = wit_component::metadata::encode(
            &resolve,
            id,
            wit_component::StringEncoding::UTF8,
            None,
        )
        .unwrap_or_else(|e| panic!("cannot encode world `{world}`: {e:?}"));
        let file = out_dir.join(format!("{world}.component-type"));
        std::fs::write(&file, &bytes)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        writeln!(
            consts,
            "/// World `{world}`, encoded as a `component-type` custom section.\n\
             pub const {name}: [u8; {len}] = *include_bytes!({file:?});",
            len = bytes.len(),
        )
        .expect("write to a String");
    }
    let file = out_dir.join("worlds.rs");
    std::fs::write(&file, consts)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
}
