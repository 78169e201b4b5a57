//! Upstream response bytes through the proxy's HTTP/1.1 client against hyper's client: the
//! input decodes into 1xx heads, a final head and a body cut into writes (see `common.rs`).
#![no_main]

#[path = "../../tests/support/differential.rs"]
mod differential;
#[macro_use]
mod common;

differential_target!(differential::ResponseHarness);
