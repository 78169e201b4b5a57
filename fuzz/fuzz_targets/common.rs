//! What both fuzz targets share: one runtime and one harness (proxy and upstream) for the
//! whole fuzzing process, and a case per input decoded from the same choice string the
//! proptest draws. A divergence from hyper that is not on the harness's allow-list panics with
//! the case and both views.

/// A fuzz target for one harness type (`RequestHarness` or `ResponseHarness`).
macro_rules! differential_target {
    ($harness:ty) => {
        fn harness() -> &'static (tokio::runtime::Runtime, $harness) {
            static HARNESS: std::sync::OnceLock<(tokio::runtime::Runtime, $harness)> = std::sync::OnceLock::new();
            HARNESS.get_or_init(|| {
                // A write to a connection the other side has closed must be an error, as in
                // any Rust program (whose start-up ignores SIGPIPE), not the end of the process:
                // libFuzzer's own `main` leaves the signal at its default.
                // SAFETY: setting a signal's disposition to SIG_IGN, once, before any thread
                // of the harness exists.
                unsafe {
                    libc::signal(libc::SIGPIPE, libc::SIG_IGN);
                }
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                let harness = runtime.block_on(<$harness>::start());
                (runtime, harness)
            })
        }

        libfuzzer_sys::fuzz_target!(|choices: &[u8]| {
            let (runtime, harness) = harness();
            let case = harness.case_from_choices(choices);
            if let Err(divergence) = runtime.block_on(harness.check(&case)) {
                panic!("{divergence}");
            }
        });
    };
}
