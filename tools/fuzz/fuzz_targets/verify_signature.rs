//! The verifier never panics on any input, accepts a request it signed itself, and refuses that
//! request once any byte of its URL, body or nonce changes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use shared::plivo::form::parse_body;
use shared::plivo::signature::{SignatureHeaders, SignedRequest, Verifier, sign_v3};

const TOKEN: &str = "MzRmNzU0ZTc1ZDFiNWNlZmE3YjRlYjU2ZTk4ZDBk";

fuzz_target!(|data: &[u8]| {
    // Split the input into a URL path, a body and a nonce.
    let mut parts = data.splitn(3, |b| *b == 0);
    let (Some(path), Some(body), Some(nonce)) = (parts.next(), parts.next(), parts.next()) else { return };
    let (Ok(path), Ok(nonce)) = (std::str::from_utf8(path), std::str::from_utf8(nonce)) else { return };
    let url = format!("https://hooks.example.com/{path}");
    let verifier = Verifier::new(vec![SecretString::from(TOKEN)], None, true);

    // Arbitrary headers never panic.
    let garbage = SignatureHeaders { v3: Some(nonce), v3_nonce: Some(nonce), v2: Some(path), ..Default::default() };
    let Ok(params) = parse_body(body) else { return };
    let _ = verifier.verify(&garbage, "POST", &url, &params);

    let Ok(signature) = sign_v3(TOKEN, &SignedRequest { method: "POST", url: &url, body: &params, nonce }) else { return };
    let headers = SignatureHeaders { v3: Some(&signature), v3_nonce: Some(nonce), ..Default::default() };
    assert!(verifier.verify(&headers, "POST", &url, &params).is_ok(), "its own signature verifies");

    let changed_nonce = format!("{nonce}0");
    let tampered = SignatureHeaders { v3: Some(&signature), v3_nonce: Some(&changed_nonce), ..Default::default() };
    assert!(verifier.verify(&tampered, "POST", &url, &params).is_err(), "another nonce is refused");
    // Changed before any `#`: the fragment is not signed (docs/plivo.md §1).
    let other_url = format!("https://hooks.example.com/x{path}");
    assert!(verifier.verify(&headers, "POST", &other_url, &params).is_err(), "another URL is refused");
    let mut more = params.clone();
    more.push(("Injected".into(), "1".into()));
    assert!(verifier.verify(&headers, "POST", &url, &more).is_err(), "another body is refused");
});
