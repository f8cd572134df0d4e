//! The V3/V2 verifier against every vector in `tests/data/signature-vectors.json` (each checked
//! against Plivo's own SDKs), plus properties that must hold for any request.

use std::path::PathBuf;

use proptest::prelude::*;
use secrecy::SecretString;
use serde::Deserialize;
use shared::plivo::form::parse_body;
use shared::plivo::signature::{SignatureHeaders, SignedRequest, Verifier, sign_v3, v3_signed_string};

#[derive(Debug, Deserialize)]
struct VectorFile {
    vectors: Vec<Vector>,
    sdk_disagreements: Vec<Disagreement>,
}

#[derive(Debug, Deserialize)]
struct Vector {
    name: String,
    version: String,
    method: String,
    url: String,
    params: Vec<(String, String)>,
    raw_body: String,
    nonce: String,
    auth_token: String,
    signature_header_name: String,
    signature_header: String,
    expected_valid: bool,
    expected_signed_string: String,
}

#[derive(Debug, Deserialize)]
struct Disagreement {
    name: String,
    method: String,
    url: String,
    raw_body: String,
    nonce: String,
    candidates: Vec<Candidate>,
}

#[derive(Debug, Deserialize)]
struct Candidate {
    rule: String,
    signed_string: String,
}

/// The vectors are test data kept in the repository; SMSFLOW_SIGNATURE_VECTORS overrides.
fn vectors() -> VectorFile {
    let path = std::env::var_os("SMSFLOW_SIGNATURE_VECTORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/signature-vectors.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read signature vectors at {}: {e}", path.display()));
    serde_json::from_str(&text).expect("signature-vectors.json parses")
}

/// The body as the ingress sees it: decoded from the raw urlencoded text.
fn body_of(method: &str, raw_body: &str) -> Vec<(String, String)> {
    if method.eq_ignore_ascii_case("GET") {
        Vec::new()
    } else {
        parse_body(raw_body.as_bytes()).expect("vector body decodes")
    }
}

#[test]
fn every_shared_vector_verifies_as_expected() {
    let file = vectors();
    assert!(file.vectors.len() >= 32, "expected at least 32 vectors, found {}", file.vectors.len());
    let mut failures = Vec::new();
    for v in &file.vectors {
        let body = body_of(&v.method, &v.raw_body);
        if !v.method.eq_ignore_ascii_case("GET") {
            assert_eq!(body, v.params, "{}: raw_body decodes to params", v.name);
        }
        if v.version == "v3" {
            let signed =
                v3_signed_string(&SignedRequest { method: &v.method, url: &v.url, body: &body, nonce: &v.nonce })
                    .unwrap();
            if signed != v.expected_signed_string {
                failures.push(format!(
                    "{}: signed string\n  got      {signed:?}\n  expected {:?}",
                    v.name, v.expected_signed_string
                ));
            }
        }
        let verifier = Verifier::new(vec![SecretString::from(v.auth_token.clone())], None, true);
        let header = Some(v.signature_header.as_str());
        let nonce = Some(v.nonce.as_str());
        let headers = match v.signature_header_name.to_ascii_lowercase().as_str() {
            "x-plivo-signature-v3" => SignatureHeaders { v3: header, v3_nonce: nonce, ..Default::default() },
            "x-plivo-signature-ma-v3" => SignatureHeaders { ma_v3: header, v3_nonce: nonce, ..Default::default() },
            "x-plivo-signature-v2" => SignatureHeaders { v2: header, v2_nonce: nonce, ..Default::default() },
            other => panic!("{}: unexpected header {other}", v.name),
        };
        let valid = verifier.verify(&headers, &v.method, &v.url, &body).is_ok();
        if valid != v.expected_valid {
            failures.push(format!("{}: valid = {valid}, expected {}", v.name, v.expected_valid));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} vectors failed:\n{}",
        failures.len(),
        file.vectors.len(),
        failures.join("\n")
    );
}

#[test]
fn v2_is_refused_unless_enabled() {
    let file = vectors();
    let v = file.vectors.iter().find(|v| v.version == "v2" && v.expected_valid).expect("a valid v2 vector");
    let headers = SignatureHeaders { v2: Some(&v.signature_header), v2_nonce: Some(&v.nonce), ..Default::default() };
    let verifier = Verifier::new(vec![SecretString::from(v.auth_token.clone())], None, false);
    assert!(verifier.verify(&headers, &v.method, &v.url, &body_of(&v.method, &v.raw_body)).is_err());
}

#[test]
fn sdk_disagreements_follow_the_canonical_rule() {
    for d in vectors().sdk_disagreements {
        let canonical = d.candidates.iter().find(|c| c.rule.starts_with("canonical")).expect("a canonical candidate");
        let body = body_of(&d.method, &d.raw_body);
        let signed =
            v3_signed_string(&SignedRequest { method: &d.method, url: &d.url, body: &body, nonce: &d.nonce }).unwrap();
        assert_eq!(signed, canonical.signed_string, "{}", d.name);
    }
}

#[test]
fn main_account_header_verifies_against_the_main_token_and_rotation_accepts_any_token() {
    let body = vec![("Status".to_string(), "sent".to_string())];
    let req = SignedRequest { method: "POST", url: "https://h.example/cb?ref=1", body: &body, nonce: "1" };
    let main = sign_v3("main-token", &req).unwrap();
    let old = sign_v3("old-token", &req).unwrap();
    let tokens = vec![SecretString::from("new-token"), SecretString::from("old-token")];
    let verifier = Verifier::new(tokens, Some(SecretString::from("main-token")), false);
    let ma = SignatureHeaders { ma_v3: Some(&main), v3_nonce: Some("1"), ..Default::default() };
    assert!(verifier.verify(&ma, "POST", req.url, &body).is_ok());
    let rotated = SignatureHeaders { v3: Some(&old), v3_nonce: Some("1"), ..Default::default() };
    assert!(verifier.verify(&rotated, "POST", req.url, &body).is_ok());
    // The main token's signature in the sub-account header is not accepted.
    let swapped = SignatureHeaders { v3: Some(&main), v3_nonce: Some("1"), ..Default::default() };
    assert!(verifier.verify(&swapped, "POST", req.url, &body).is_err());
}

fn pair() -> impl Strategy<Value = (String, String)> {
    ("[A-Za-z_][A-Za-z0-9_]{0,8}", "[ -~äé€😀]{0,12}")
}

fn request() -> impl Strategy<Value = (String, Vec<(String, String)>, String, String)> {
    (
        "https://[a-z]{1,8}\\.example(:[0-9]{2,4})?/[a-z/]{0,10}(\\?ref=[a-z0-9]{1,6})?",
        prop::collection::vec(pair(), 0..8),
        "[0-9]{20}",
        "[A-Za-z0-9]{10,40}",
    )
}

fn verifies(token: &str, method: &str, url: &str, body: &[(String, String)], nonce: &str, signature: &str) -> bool {
    let verifier = Verifier::new(vec![SecretString::from(token.to_owned())], None, false);
    let headers = SignatureHeaders { v3: Some(signature), v3_nonce: Some(nonce), ..Default::default() };
    verifier.verify(&headers, method, url, body).is_ok()
}

/// Replaces one character of `s` at `index` (modulo its length) by a different one.
fn mutate(s: &str, index: usize) -> String {
    let chars: Vec<char> = s.chars().collect();
    let i = index % chars.len();
    let replacement = if chars[i] == 'x' { 'y' } else { 'x' };
    chars.iter().enumerate().map(|(j, c)| if j == i { replacement } else { *c }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn wire_order_of_parameters_never_matters((url, body, nonce, token) in request(), seed in any::<u64>()) {
        let signature = sign_v3(&token, &SignedRequest { method: "POST", url: &url, body: &body, nonce: &nonce }).unwrap();
        let mut shuffled = body.clone();
        let len = shuffled.len().max(1);
        shuffled.rotate_left((seed as usize) % len);
        shuffled.reverse();
        prop_assert!(verifies(&token, "POST", &url, &shuffled, &nonce, &signature));
    }

    #[test]
    fn any_single_change_invalidates_a_valid_request(
        (url, body, nonce, token) in request(),
        which in 0usize..4,
        at in any::<usize>(),
    ) {
        let signature = sign_v3(&token, &SignedRequest { method: "POST", url: &url, body: &body, nonce: &nonce }).unwrap();
        prop_assert!(verifies(&token, "POST", &url, &body, &nonce, &signature));
        let (mut url2, mut body2, mut nonce2, mut token2) = (url.clone(), body.clone(), nonce.clone(), token.clone());
        match which {
            0 => url2 = mutate(&url, at),
            1 if !body.is_empty() => {
                let i = at % body.len();
                let (k, v) = &body[i];
                body2[i] = if v.is_empty() || at % 2 == 0 { (mutate(k, at), v.clone()) } else { (k.clone(), mutate(v, at)) };
            }
            1 => body2.push(("Extra".into(), String::new())),
            2 => nonce2 = mutate(&nonce, at),
            _ => token2 = mutate(&token, at),
        }
        prop_assert!(!verifies(&token2, "POST", &url2, &body2, &nonce2, &signature));
    }
}
