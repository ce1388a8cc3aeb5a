//! Policy plugins: the wasmtime engine, component cache, instance pools, host imports and chains.
#![allow(missing_docs)]
mod bindings;
mod host {
    pub struct RequestHandle;
    pub struct ResponseHandle;
    pub struct UpstreamHandle;
}
