//! HTTP/1.1 wire pieces shared by the two places that read and write raw heads: the front end
//! (`server::front`, client side) and the upstream client ([`super::h1`]).

/// `name: value\r\n`.
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The comma-separated elements of one header value (`Connection`, `Transfer-Encoding`),
/// trimmed.
pub fn list_tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// The decimal digits of `n`, written into `space` (no `format!` on the request path).
pub fn decimal(mut n: u64, space: &mut [u8; 20]) -> &[u8] {
    let mut at = space.len();
    loop {
        at -= 1;
        space[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &space[at..];
        }
    }
}

/// `Content-Length` as hyper reads it: ASCII digits only, no overflow.
pub fn parse_digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_and_tokens() {
        assert_eq!(decimal(0, &mut [0; 20]), b"0");
        assert_eq!(decimal(1234567, &mut [0; 20]), b"1234567");
        assert_eq!(decimal(u64::MAX, &mut [0; 20]), u64::MAX.to_string().as_bytes());
        let tokens: Vec<&[u8]> = list_tokens(b" close ,Upgrade,, x").collect();
        assert_eq!(tokens, [&b"close"[..], b"Upgrade", b"", b"x"]);
    }
}
