//! First-party plugins, compiled from `plugins/` to `wasm32-wasip2` by the
//! build script and embedded in the binary: `source = "builtin:NAME"`.

use super::PluginError;

include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));

/// The component bytes of builtin `name`.
pub(crate) fn bytes(name: &str) -> Result<&'static [u8], PluginError> {
    BUILTIN_PLUGINS
        .iter()
        .find(|(builtin, _)| *builtin == name)
        .map(|(_, bytes)| *bytes)
        .ok_or_else(|| PluginError::UnknownBuiltin {
            name: name.to_string(),
            available: names().join(", "),
        })
}

/// Every builtin's name.
pub(crate) fn names() -> Vec<&'static str> {
    BUILTIN_PLUGINS.iter().map(|(name, _)| *name).collect()
}
