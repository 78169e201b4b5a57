//! Request paths in canonical form, and what an upstream that normalises them would make of
//! those that are not. The path decides the limit class, the meter and (on the client side)
//! the policy: a path with dot segments or encoded separators may be read one way here and
//! another way upstream, so the checks that depend on it compare both readings.

/// No `.`/`..`/empty segments, no backslash, no percent-encoded `/`, `\` or `.`.
pub fn is_canonical(path: &str) -> bool {
    // Checked on every request. Most paths hold no dot, percent sign, backslash or `//`, and
    // then one pass over the bytes says so.
    let mut previous = 0;
    let plain = path.bytes().all(|b| {
        let doubled = b == b'/' && previous == b'/';
        previous = b;
        !doubled && !matches!(b, b'.' | b'%' | b'\\')
    });
    plain || is_canonical_thorough(path)
}

fn is_canonical_thorough(path: &str) -> bool {
    let bytes = path.as_bytes();
    if bytes.contains(&b'\\') {
        return false;
    }
    let encoded_separator = bytes
        .windows(3)
        .any(|w| w[0] == b'%' && matches!((w[1], w[2].to_ascii_lowercase()), (b'2', b'f' | b'e') | (b'5', b'c')));
    if encoded_separator {
        return false;
    }
    let mut segments = path.split('/').skip(1).peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// The path a lenient upstream would serve: encoded `.`, `/` and `\` decoded, backslashes read
/// as slashes, empty and `.` segments dropped, `..` taking the segment before it away.
pub fn normalise(path: &str) -> String {
    let mut decoded = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        decoded.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3).map(str::to_ascii_lowercase);
        match code.as_deref() {
            Some("2e") => decoded.push('.'),
            Some("2f") | Some("5c") => decoded.push('/'),
            _ => {
                decoded.push('%');
                rest = &rest[at + 1..];
                continue;
            }
        }
        rest = &rest[at + 3..];
    }
    decoded.push_str(rest);
    let decoded = decoded.replace('\\', "/");
    let trailing = decoded.ends_with('/');
    let mut kept: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = format!("/{}", kept.join("/"));
    if trailing && out.len() > 1 {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_are_told_apart() {
        for ok in ["/", "/waves/v1/tts", "/waves/v1/tts/", "/a%20b"] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in [
            "/a/../b",
            "/./a",
            "//a",
            "/a//b",
            "/a%2fb",
            "/a%2E%2e/b",
            "/a\\b",
            "/a/%5c",
        ] {
            assert!(!is_canonical(bad), "{bad}");
        }
    }

    #[test]
    fn the_quick_pass_agrees_with_the_thorough_check() {
        let alphabet = ['/', '.', 'a', '%', '2', 'e', 'F', '5', 'c', '\\'];
        let mut paths = vec![String::new()];
        for _ in 0..5 {
            paths = paths
                .iter()
                .flat_map(|p| alphabet.iter().map(move |c| format!("{p}{c}")))
                .collect();
            for path in &paths {
                let path = format!("/{path}");
                assert_eq!(is_canonical(&path), is_canonical_thorough(&path), "{path:?}");
            }
        }
    }

    #[test]
    fn normalising_resolves_what_an_upstream_would() {
        assert_eq!(normalise("/x/../waves/v1/tts"), "/waves/v1/tts");
        assert_eq!(normalise("//waves//v1/./tts"), "/waves/v1/tts");
        assert_eq!(normalise("/x/%2e%2E/waves%2fv1%5ctts"), "/waves/v1/tts");
        assert_eq!(normalise("/../../a"), "/a");
        assert_eq!(normalise("/a/b/"), "/a/b/");
        assert_eq!(normalise("/a%20b/%zz"), "/a%20b/%zz");
    }
}
