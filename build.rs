//! Link settings for the `smallest-proxy` binary.
//!
//! On glibc Linux the binary is linked with packed relative relocations (`DT_RELR`). A Rust
//! position-independent executable carries one 24-byte relocation entry per pointer in its
//! read-only data (vtables, string tables): ~450 KB here, all of it read by the dynamic loader
//! at every start, so all of it resident. Packed, the same relocations take a few KB. The
//! binary stays position-independent (ASLR is unchanged).
//!
//! Only where the C library can load such a binary: glibc 2.36 or later, which marks that with
//! the `GLIBC_ABI_DT_RELR` version (the linker then records a dependency on it, so the binary
//! refuses to start on an older glibc instead of crashing). The build machine's libc is looked
//! at; without the marker the option is left out. Not for musl: its static-PIE start-up code
//! in Debian 12 (musl 1.2.3) does not read `DT_RELR`.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if os == "linux" && env == "gnu" && glibc_loads_relr(&arch) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// Whether the target's libc.so.6 on this machine defines `GLIBC_ABI_DT_RELR`.
fn glibc_loads_relr(arch: &str) -> bool {
    let multiarch = format!("/lib/{arch}-linux-gnu");
    let usr_multiarch = format!("/usr/lib/{arch}-linux-gnu");
    [multiarch.as_str(), usr_multiarch.as_str(), "/lib64", "/usr/lib64"]
        .iter()
        .map(|dir| Path::new(dir).join("libc.so.6"))
        .find_map(|path| std::fs::read(path).ok())
        .is_some_and(|libc| libc.windows(17).any(|w| w == b"GLIBC_ABI_DT_RELR"))
}
