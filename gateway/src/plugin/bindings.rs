//! Host bindings generated from `wit/` (world `gateway`: every export the host understands).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "gateway",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "sluice:policy/types.request": super::host::RequestHandle,
        "sluice:policy/types.response": super::host::ResponseHandle,
        "sluice:policy/types.upstream": super::host::UpstreamHandle,
    },
});
