//! `application/x-www-form-urlencoded` decoding as Plivo's signature needs it: `+` is a space,
//! `%XX` are UTF-8 bytes, repeated keys and empty values are kept, and bytes that are not UTF-8
//! are an error instead of being replaced (a replaced byte would silently change the data).

/// Why a form or query could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// The offending bytes are not quoted: they may be part of a phone number or a message.
    #[error("form data is not valid UTF-8 after percent-decoding")]
    NotUtf8,
}

/// Decodes one key or value. A `%` not followed by two hex digits is kept as written, as
/// Plivo's reference SDKs do.
pub fn decode_component(raw: &str) -> Result<String, FormError> {
    if !raw.contains(['+', '%']) {
        return Ok(raw.to_owned());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() && hex(bytes[i + 1]).is_some() && hex(bytes[i + 2]).is_some() => {
                out.push(hex(bytes[i + 1]).unwrap_or(0) << 4 | hex(bytes[i + 2]).unwrap_or(0));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Splits `a=1&b=&c` into decoded pairs in wire order; empty pieces are skipped and a piece
/// without `=` has an empty value.
pub fn parse_pairs(raw: &str) -> Result<Vec<(String, String)>, FormError> {
    raw.split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            Ok((decode_component(k)?, decode_component(v)?))
        })
        .collect()
}

/// Feeds `text` to `hasher` length-prefixed, so that no two different sequences of texts feed
/// it the same bytes (`"ab","c"` and `"a","bc"` differ).
pub fn hash_text(hasher: &mut sha2::Sha256, text: &str) {
    use sha2::Digest as _;
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text.as_bytes());
}

/// Feeds a set of form fields to `hasher`: sorted, as the signature orders them, so the order
/// on the wire does not matter, and each key and value through [`hash_text`]. The callbacks'
/// dedupe key and the ingress's replay key are both built on it.
pub fn hash_fields(hasher: &mut sha2::Sha256, fields: &[(String, String)]) {
    let mut sorted: Vec<&(String, String)> = fields.iter().collect();
    sorted.sort_unstable();
    for (key, value) in sorted {
        hash_text(hasher, key);
        hash_text(hasher, value);
    }
}

/// Decodes a request body; the bytes themselves must be ASCII-compatible UTF-8 text.
pub fn parse_body(body: &[u8]) -> Result<Vec<(String, String)>, FormError> {
    let text = std::str::from_utf8(body).map_err(|_| FormError::NotUtf8)?;
    parse_pairs(text)
}

/// Form-encodes pairs the way Plivo does (`+` for spaces, `%XX` for everything but
/// `A–Z a–z 0–9 - _ . *`).
pub fn encode_pairs(pairs: &[(String, String)]) -> String {
    fn encode(s: &str, out: &mut String) {
        for b in s.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' => out.push(b as char),
                b' ' => out.push('+'),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        encode(k, &mut out);
        out.push('=');
        encode(v, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_plus_percent_and_keeps_malformed_escapes() {
        assert_eq!(decode_component("a+b%2Bc%20d").unwrap(), "a b+c d");
        assert_eq!(decode_component("50%").unwrap(), "50%");
        assert_eq!(decode_component("%zz%4").unwrap(), "%zz%4");
        assert_eq!(decode_component("Gr%C3%BC%C3%9Fe").unwrap(), "Grüße");
    }

    #[test]
    fn rejects_percent_encoded_bytes_that_are_not_utf8() {
        assert_eq!(decode_component("%FF%FE"), Err(FormError::NotUtf8));
        assert!(!FormError::NotUtf8.to_string().contains("FF"), "nothing of the input is echoed");
        assert!(parse_body(b"a=\xff").is_err());
    }

    #[test]
    fn encoding_round_trips_through_decoding() {
        let pairs: Vec<(String, String)> = [("a b", "c&d=e+f%"), ("Text", "Grüße 😀"), ("e", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(parse_pairs(&encode_pairs(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn keeps_repeated_keys_empty_values_and_wire_order() {
        let pairs = parse_pairs("b=2&&a=&b=1&c").unwrap();
        let expected: Vec<(String, String)> = [("b", "2"), ("a", ""), ("b", "1"), ("c", "")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, expected);
    }
}
