//! Host bindings generated from `wit/` (world `gateway`: every export the
//! host understands; a component may export any subset of them).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "gateway",
    // Shared state may live in Redis: its imports are async. Everything else
    // answers from memory and stays a plain call.
    imports: {
        "sluice:policy/state": async | trappable,
        default: trappable,
    },
    exports: { default: async },
    with: {
        "sluice:policy/types.request": super::host::RequestHandle,
        "sluice:policy/types.response": super::host::ResponseHandle,
        "sluice:policy/types.upstream": super::host::UpstreamHandle,
        "sluice:policy/types.candidates": super::host::CandidatesHandle,
    },
});
