//! Client bytes through the proxy against hyper's server: the input decodes into a pipeline of
//! requests cut into writes (see `common.rs`).
#![no_main]

#[path = "../../tests/support/differential.rs"]
mod differential;
#[macro_use]
mod common;

differential_target!(differential::RequestHarness);
