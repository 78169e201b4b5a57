//! The direction of dependencies between the source rooms, checked on the source text: the
//! client side (`server`) may use the request path (`proxy`), which may use the upstream side
//! (`upstream`); all three stand on the ground (`config`, `error`, `keys`, `limits`, `metrics`,
//! `timeouts`, `tls`), which uses none of them. `lib.rs`, `main.rs` and `reload.rs` assemble
//! everything and may use anything.

use std::path::{Path, PathBuf};

/// Height of a room: a file may use its own room and rooms of lower height only.
fn height(room: &str) -> Option<u8> {
    match room {
        "config" | "error" | "keys" | "limits" | "metrics" | "timeouts" | "tls" | "usage" => Some(0),
        "upstream" => Some(1),
        "proxy" => Some(2),
        "server" => Some(3),
        _ => None,
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every `crate::<room>` a file names outside comments.
fn rooms_used(text: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                used.push(name);
            }
        }
    }
    used
}

#[test]
fn rooms_only_use_rooms_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut checked = 0;
    let mut upward = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let room = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|c| c.trim_end_matches(".rs"))
            .unwrap_or_default();
        let Some(own) = height(room) else { continue };
        checked += 1;
        let text = std::fs::read_to_string(file).expect("read source");
        for used in rooms_used(&text) {
            if used == room {
                continue;
            }
            let allowed = match height(&used) {
                // The ground: any room may use it, but a ground module only the ground.
                Some(0) => true,
                Some(other) => other < own,
                // The crate root's assembly (`App`, `RunError`, `reload`): only from above.
                None => false,
            };
            if !allowed {
                upward.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert!(checked > 30, "only {checked} files were checked: has src/ moved?");
    assert!(upward.is_empty(), "dependencies pointing up:\n{}", upward.join("\n"));
}

#[test]
fn the_checker_sees_an_upward_import() {
    assert_eq!(
        rooms_used("use crate::proxy::body::ProxyBody; // crate::server"),
        vec!["proxy".to_string()]
    );
}
