//! Upstream response bytes through the proxy's HTTP/1.1 client against hyper's client:
//! libFuzzer's input is the choice string the proptest draws (`tests/differential.rs`),
//! decoded by the same harness into 1xx heads, a final head and a body cut into writes. A
//! divergence from hyper that is not on the harness's allow-list panics with the case and
//! both views.
#![no_main]

#[path = "../../tests/support/differential.rs"]
mod differential;

use differential::ResponseHarness;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// One runtime, proxy and scripted upstream for the whole fuzzing process.
fn harness() -> &'static (tokio::runtime::Runtime, ResponseHarness) {
    static HARNESS: OnceLock<(tokio::runtime::Runtime, ResponseHarness)> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let harness = runtime.block_on(ResponseHarness::start());
        (runtime, harness)
    })
}

fuzz_target!(|choices: &[u8]| {
    let (runtime, harness) = harness();
    let case = harness.case_from_choices(choices);
    if let Err(divergence) = runtime.block_on(harness.check(&case)) {
        panic!("{divergence}");
    }
});
