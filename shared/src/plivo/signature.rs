//! Plivo webhook signatures (docs/plivo.md §1): V3 exactly as Plivo's reference SDKs compute it,
//! and the deprecated V2 behind a setting. Pure functions, no I/O.
//!
//! The URL is split textually, never normalised by a URL library: host case, an explicit
//! default port, a trailing slash and raw percent-escapes in the path are all signed as written.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::form::{FormError, parse_pairs};

pub const V3_HEADER: &str = "x-plivo-signature-v3";
pub const MA_V3_HEADER: &str = "x-plivo-signature-ma-v3";
pub const V3_NONCE_HEADER: &str = "x-plivo-signature-v3-nonce";
pub const V2_HEADER: &str = "x-plivo-signature-v2";
pub const MA_V2_HEADER: &str = "x-plivo-signature-ma-v2";
pub const V2_NONCE_HEADER: &str = "x-plivo-signature-v2-nonce";

/// A request as Plivo sent it, in the terms the signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// `GET` or `POST` (any other method is signed like POST, as the reference SDK does).
    pub method: &'a str,
    /// The full public URL Plivo called, including its query string.
    pub url: &'a str,
    /// The decoded form body (POST); ignored for GET.
    pub body: &'a [(String, String)],
    /// The nonce header's value, as an opaque string.
    pub nonce: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("URL has no scheme (expected http:// or https://)")]
    NoScheme,
    #[error(transparent)]
    Form(#[from] FormError),
}

/// The URL split as the signature needs it.
struct SplitUrl<'a> {
    /// `scheme://authority/path`, verbatim.
    base: &'a str,
    query: &'a str,
}

fn split_url(url: &str) -> Result<SplitUrl<'_>, UrlError> {
    let url = url.split_once('#').map_or(url, |(before, _)| before);
    let scheme_end = url.find("://").ok_or(UrlError::NoScheme)?;
    let after_scheme = scheme_end + 3;
    let base_end = url[after_scheme..].find('?').map_or(url.len(), |i| after_scheme + i);
    let query = url.get(base_end + 1..).unwrap_or("");
    Ok(SplitUrl { base: &url[..base_end], query })
}

fn sorted<'a>(mut pairs: Vec<(&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
    // Sorting (key, value) tuples byte-wise groups by key and orders each key's values.
    pairs.sort_unstable();
    pairs
}

/// The exact text V3 feeds to HMAC-SHA256: `S + "." + nonce` (docs/plivo.md §1).
pub fn v3_signed_string(req: &SignedRequest<'_>) -> Result<String, UrlError> {
    let url = split_url(req.url)?;
    let query_pairs = parse_pairs(url.query)?;
    let query = sorted(query_pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect());
    let is_get = req.method.eq_ignore_ascii_case("GET");
    let body =
        if is_get { Vec::new() } else { sorted(req.body.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()) };

    let mut s = String::with_capacity(req.url.len() + 64 * body.len() + req.nonce.len() + 2);
    s.push_str(url.base);
    if !query.is_empty() || !body.is_empty() {
        s.push('?');
    }
    for (i, (k, v)) in query.iter().enumerate() {
        if i > 0 {
            s.push('&');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
    if !query.is_empty() && !body.is_empty() {
        s.push('.');
    }
    for (k, v) in &body {
        s.push_str(k);
        s.push_str(v);
    }
    s.push('.');
    s.push_str(req.nonce);
    Ok(s)
}

/// The text V2 signs: scheme, authority and path followed directly by the nonce.
pub fn v2_signed_string(url: &str, nonce: &str) -> Result<String, UrlError> {
    Ok(format!("{}{nonce}", split_url(url)?.base))
}

/// `base64(HMAC-SHA256(token, message))`.
pub fn hmac_base64(token: &str, message: &str) -> String {
    hmac_sha256_base64(token.as_bytes(), message.as_bytes())
}

/// `base64(HMAC-SHA256(key, message))` over bytes (webhook secrets are binary keys).
pub fn hmac_sha256_base64(key: &[u8], message: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(message);
    BASE64.encode(mac.finalize().into_bytes())
}

/// Computes the V3 signature Plivo would send for `req` (the simulator and load tool sign with it).
pub fn sign_v3(token: &str, req: &SignedRequest<'_>) -> Result<String, UrlError> {
    Ok(hmac_base64(token, &v3_signed_string(req)?))
}

/// A callback as Plivo puts it on the wire: a GET carries its fields in the query, a POST in a
/// form body, and both a V3 signature with its nonce. The simulator, the load generator and the
/// tests build their callbacks here, so there is one way to sign one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCallback {
    /// The URL that was signed, with a GET's fields appended to its query.
    pub url: String,
    /// `X-Plivo-Signature-V3` and `X-Plivo-Signature-V3-Nonce`, with their values.
    pub headers: [(&'static str, String); 2],
    /// A POST's `application/x-www-form-urlencoded` body; `None` for a GET.
    pub form: Option<String>,
}

impl SignedCallback {
    /// Signs `params` sent to `url` with `token`, as Plivo would (`get`: in the query).
    pub fn new(token: &str, get: bool, url: &str, params: &[(String, String)], nonce: &str) -> Result<Self, UrlError> {
        let encoded = super::form::encode_pairs(params);
        let (method, url, body) = if get {
            let separator = if url.contains('?') { '&' } else { '?' };
            ("GET", if params.is_empty() { url.to_owned() } else { format!("{url}{separator}{encoded}") }, &[][..])
        } else {
            ("POST", url.to_owned(), params)
        };
        let signature = sign_v3(token, &SignedRequest { method, url: &url, body, nonce })?;
        Ok(Self {
            url,
            headers: [(V3_HEADER, signature), (V3_NONCE_HEADER, nonce.to_owned())],
            form: (!get).then_some(encoded),
        })
    }

    /// Every header to send: the signature's two, and a POST's content type.
    pub fn wire_headers(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let content_type = self.form.as_ref().map(|_| ("content-type", "application/x-www-form-urlencoded"));
        self.headers.iter().map(|(name, value)| (*name, value.as_str())).chain(content_type)
    }

    /// A fresh nonce of 20 digits, as Plivo's look.
    pub fn nonce() -> String {
        (0..20).map(|_| char::from(b'0' + rand::random_range(0..10u8))).collect()
    }
}

/// True when any comma-separated entry of `header` equals `expected`, compared in constant time.
fn header_matches(header: &str, expected: &str) -> bool {
    header
        .split(',')
        .map(str::trim)
        .fold(false, |found, candidate| found | bool::from(candidate.as_bytes().ct_eq(expected.as_bytes())))
}

/// Whether `value` has the shape of `hmac_base64`'s output (32 bytes in padded standard
/// base64), the only shape that can equal it.
fn signature_shaped(value: &str) -> bool {
    let bytes = value.as_bytes();
    bytes.len() == 44
        && bytes[43] == b'='
        && bytes[..43].iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/'))
}

fn any_token_matches(header: &str, tokens: &[&SecretString], message: &str) -> bool {
    tokens
        .iter()
        .fold(false, |found, token| found | header_matches(header, &hmac_base64(token.expose_secret(), message)))
}

/// The signature headers of one request (values as received).
#[derive(Debug, Clone, Copy, Default)]
pub struct SignatureHeaders<'a> {
    pub v3: Option<&'a str>,
    pub ma_v3: Option<&'a str>,
    pub v3_nonce: Option<&'a str>,
    pub v2: Option<&'a str>,
    pub ma_v2: Option<&'a str>,
    pub v2_nonce: Option<&'a str>,
}

/// Which scheme authenticated a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    V3,
    V2,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::V3 => "v3",
            Scheme::V2 => "v2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// No usable signature headers: answered 401.
    #[error("{0}")]
    Missing(&'static str),
    /// Headers present but no signature matches: answered 403.
    #[error("{0}")]
    Invalid(&'static str),
    /// The URL or query could not be decoded: answered 400.
    #[error("cannot decode request for signature check: {0}")]
    Url(#[from] UrlError),
}

/// Verifies Plivo signatures against the configured tokens.
#[derive(Clone)]
pub struct Verifier {
    account_tokens: Vec<SecretString>,
    main_token: Option<SecretString>,
    accept_v2: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("account_tokens", &self.account_tokens.len())
            .field("main_token", &self.main_token.is_some())
            .field("accept_v2", &self.accept_v2)
            .finish()
    }
}

impl Verifier {
    /// `account_tokens`: the (sub)account's tokens, several while one is rotated.
    /// `main_token`: the main account's token for the `-Ma-` headers; without it those headers
    /// are checked against the account tokens (a main account signs both with the same token).
    pub fn new(account_tokens: Vec<SecretString>, main_token: Option<SecretString>, accept_v2: bool) -> Self {
        Self { account_tokens, main_token, accept_v2 }
    }

    pub fn from_settings(settings: &crate::config::PlivoSettings) -> Self {
        Self::new(settings.account_tokens(), settings.main_auth_token.clone(), settings.accept_v2_signatures)
    }

    fn main_tokens(&self) -> Vec<&SecretString> {
        match &self.main_token {
            Some(token) => vec![token],
            None => self.account_tokens.iter().collect(),
        }
    }

    /// What can be decided from the headers alone, before the body is read: the headers the
    /// scheme needs are present, and at least one value has the shape of a signature (44
    /// characters of standard base64: a forgery of any other shape can never match). `verify`
    /// applies the same rule first, so this refuses exactly what `verify` would, only sooner.
    pub fn precheck(&self, headers: &SignatureHeaders<'_>) -> Result<Scheme, VerifyError> {
        if headers.v3.is_some() || headers.ma_v3.is_some() {
            headers.v3_nonce.ok_or(VerifyError::Missing("missing X-Plivo-Signature-V3-Nonce header"))?;
            let plausible = |h: Option<&str>| h.is_some_and(|h| h.split(',').map(str::trim).any(signature_shaped));
            if !plausible(headers.v3) && !plausible(headers.ma_v3) {
                return Err(VerifyError::Invalid("X-Plivo-Signature-V3 does not match"));
            }
            return Ok(Scheme::V3);
        }
        if headers.v2.is_some() || headers.ma_v2.is_some() {
            if !self.accept_v2 {
                return Err(VerifyError::Missing(
                    "X-Plivo-Signature-V3 header required (V2 signatures are disabled: plivo.accept_v2_signatures)",
                ));
            }
            headers.v2_nonce.ok_or(VerifyError::Missing("missing X-Plivo-Signature-V2-Nonce header"))?;
            if !headers.v2.is_some_and(signature_shaped) && !headers.ma_v2.is_some_and(signature_shaped) {
                return Err(VerifyError::Invalid("X-Plivo-Signature-V2 does not match"));
            }
            return Ok(Scheme::V2);
        }
        Err(VerifyError::Missing("missing X-Plivo-Signature-V3 and X-Plivo-Signature-V3-Nonce headers"))
    }

    /// V3 is authoritative whenever a V3 header is present; V2 is tried only without one, and
    /// only when enabled (it does not cover the body).
    pub fn verify(
        &self,
        headers: &SignatureHeaders<'_>,
        method: &str,
        url: &str,
        body: &[(String, String)],
    ) -> Result<Scheme, VerifyError> {
        let scheme = self.precheck(headers)?;
        if scheme == Scheme::V3 {
            let nonce = headers.v3_nonce.unwrap_or_default();
            let message = v3_signed_string(&SignedRequest { method, url, body, nonce })?;
            let account: Vec<&SecretString> = self.account_tokens.iter().collect();
            let ok = headers.v3.is_some_and(|h| any_token_matches(h, &account, &message))
                | headers.ma_v3.is_some_and(|h| any_token_matches(h, &self.main_tokens(), &message));
            return if ok { Ok(Scheme::V3) } else { Err(VerifyError::Invalid("X-Plivo-Signature-V3 does not match")) };
        }
        let nonce = headers.v2_nonce.unwrap_or_default();
        let message = v2_signed_string(url, nonce)?;
        // V2 headers are never comma lists in the SDKs; an exact match is required.
        let exact = |h: &str, tokens: &[&SecretString]| {
            tokens.iter().fold(false, |found, t| {
                found | bool::from(h.as_bytes().ct_eq(hmac_base64(t.expose_secret(), &message).as_bytes()))
            })
        };
        let account: Vec<&SecretString> = self.account_tokens.iter().collect();
        let ok = headers.v2.is_some_and(|h| exact(h, &account))
            | headers.ma_v2.is_some_and(|h| exact(h, &self.main_tokens()));
        if ok { Ok(Scheme::V2) } else { Err(VerifyError::Invalid("X-Plivo-Signature-V2 does not match")) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_split_keeps_port_case_and_trailing_slash_and_drops_fragment() {
        let u = split_url("https://Hooks.Example.com:443/a/b/?x=1#ct=2").unwrap();
        assert_eq!(u.base, "https://Hooks.Example.com:443/a/b/");
        assert_eq!(u.query, "x=1");
        let u = split_url("https://h.example#frag?no").unwrap();
        assert_eq!((u.base, u.query), ("https://h.example", ""));
        assert_eq!(split_url("hooks.example.com/x").err(), Some(UrlError::NoScheme));
    }

    #[test]
    fn header_lists_are_split_on_commas_and_trimmed() {
        assert!(header_matches("abc, def", "def"));
        assert!(header_matches("def", "def"));
        assert!(!header_matches("abc,de", "def"));
        assert!(!header_matches("", "def"));
    }

    #[test]
    fn only_signature_shaped_values_pass_the_precheck() {
        fn headers(v3: &str) -> SignatureHeaders<'_> {
            SignatureHeaders { v3: Some(v3), v3_nonce: Some("1"), ..Default::default() }
        }
        let verifier = Verifier::new(vec![SecretString::from("token")], None, false);
        let real = hmac_base64("any key", "any message");
        assert!(signature_shaped(&real));
        let long = "A".repeat(4096);
        for forged in ["", "x", "Zm9yZ2Vk", "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=", &long] {
            let refused = verifier.precheck(&headers(forged));
            assert_eq!(refused, Err(VerifyError::Invalid("X-Plivo-Signature-V3 does not match")), "{forged:.50}");
        }
        let listed = format!("junk, {real}");
        assert_eq!(verifier.precheck(&headers(&listed)), Ok(Scheme::V3));
        let no_nonce = SignatureHeaders { v3: Some(&listed), ..Default::default() };
        assert!(matches!(verifier.precheck(&no_nonce), Err(VerifyError::Missing(_))));
    }
}
