//! Link settings for the `smallest-proxy` binary.
//!
//! On glibc Linux the binary is linked with packed relative relocations (`DT_RELR`, glibc 2.36
//! and binutils 2.38 or later; older linkers ignore the option with a warning). A Rust
//! position-independent executable carries one 24-byte relocation entry per pointer in its
//! read-only data (vtables, string tables): ~450 KB here, all of it read by the dynamic loader
//! at every start, so all of it resident. Packed, the same relocations take a few KB. The
//! binary stays position-independent (ASLR is unchanged). Not for musl: its static-PIE start-up
//! code in Debian 12 (musl 1.2.3) does not read `DT_RELR`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    if os == "linux" && env == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
