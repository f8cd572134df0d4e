//! Every answer code of the webhook routes, and that none of the refused requests queued anything.

use shared::amqp::Stream;
use shared::plivo::signature::{SignedRequest, hmac_base64, sign_v3, v2_signed_string};
use shared::testing::{TEST_AUTH_TOKEN, TEST_PUBLIC_BASE_URL};

use crate::helpers::{TestApp, pairs, spawn_app_with, status_params};

const NONCE: &str = "98765432109876543210";

fn sign_raw(path: &str, body: &[(String, String)]) -> String {
    let url = format!("{TEST_PUBLIC_BASE_URL}{path}");
    sign_v3(TEST_AUTH_TOKEN, &SignedRequest { method: "POST", url: &url, body, nonce: NONCE }).unwrap()
}

fn raw(app: &TestApp, path: &str, content_type: &str, body: Vec<u8>) -> reqwest::RequestBuilder {
    app.client.post(app.url(path)).header("content-type", content_type).body(body)
}

#[tokio::test]
async fn bad_input_gets_a_clear_answer_and_queues_nothing() {
    let app = spawn_app_with(|s| s.http.body_limit_bytes = 4096).await;
    app.wait_ready().await;
    let form = "application/x-www-form-urlencoded";
    let params = status_params("bad-input-0001", "sent");
    let good_sig = sign_raw("/plivo/callback", &params);
    let v2_sig = hmac_base64(
        TEST_AUTH_TOKEN,
        &v2_signed_string(&format!("{TEST_PUBLIC_BASE_URL}/plivo/callback"), NONCE).unwrap(),
    );
    let encoded = shared::testing::form_encode(&params).into_bytes();

    type Case<'a> = (&'a str, reqwest::RequestBuilder, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no signature headers", raw(&app, "/plivo/callback", form, encoded.clone()), 401, "missing_signature"),
        (
            "V3 signature without its nonce",
            raw(&app, "/plivo/callback", form, encoded.clone()).header("x-plivo-signature-v3", &good_sig),
            401,
            "missing_signature",
        ),
        (
            "only a V2 signature while V2 is disabled",
            raw(&app, "/plivo/callback", form, encoded.clone())
                .header("x-plivo-signature-v2", &v2_sig)
                .header("x-plivo-signature-v2-nonce", NONCE),
            401,
            "missing_signature",
        ),
        (
            "garbage signature",
            raw(&app, "/plivo/callback", form, encoded.clone())
                .header("x-plivo-signature-v3", "not base64 at all")
                .header("x-plivo-signature-v3-nonce", NONCE),
            403,
            "invalid_signature",
        ),
        (
            "non-ASCII signature header bytes",
            raw(&app, "/plivo/callback", form, encoded.clone())
                .header("x-plivo-signature-v3", reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap())
                .header("x-plivo-signature-v3-nonce", NONCE),
            403,
            "invalid_signature",
        ),
        (
            "empty signature header",
            raw(&app, "/plivo/callback", form, encoded.clone())
                .header("x-plivo-signature-v3", "")
                .header("x-plivo-signature-v3-nonce", NONCE),
            403,
            "invalid_signature",
        ),
        (
            "signature for another nonce",
            raw(&app, "/plivo/callback", form, encoded.clone())
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", "00000000000000000000"),
            403,
            "invalid_signature",
        ),
        (
            "signed for another path",
            raw(&app, "/plivo/inbound", form, encoded.clone())
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", NONCE),
            403,
            "invalid_signature",
        ),
        (
            "JSON instead of a form",
            raw(&app, "/plivo/callback", "application/json", br#"{"Status":"sent"}"#.to_vec())
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", NONCE),
            415,
            "unsupported_media_type",
        ),
        (
            "percent-encoded bytes that are not UTF-8",
            raw(&app, "/plivo/callback", form, b"Text=%FF%FE&Status=sent".to_vec())
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", NONCE),
            400,
            "bad_request",
        ),
        (
            "raw bytes that are not UTF-8",
            raw(&app, "/plivo/callback", form, b"Text=\xff\xfe".to_vec())
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", NONCE),
            400,
            "bad_request",
        ),
        (
            "query string that is not UTF-8",
            raw(&app, "/plivo/callback?ref=%C3%28", form, encoded.clone())
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", NONCE),
            400,
            "bad_request",
        ),
        (
            "body over the limit (declared length)",
            raw(&app, "/plivo/callback", form, vec![b'a'; 5000])
                .header("x-plivo-signature-v3", &good_sig)
                .header("x-plivo-signature-v3-nonce", NONCE),
            413,
            "payload_too_large",
        ),
    ];

    for (description, request, status, code) in cases {
        let response = request.send().await.unwrap_or_else(|e| panic!("{description}: {e}"));
        assert_eq!(response.status().as_u16(), status, "{description}");
        let body: serde_json::Value = response.json().await.unwrap_or_else(|e| panic!("{description}: JSON body: {e}"));
        assert_eq!(body["error"]["code"], code, "{description}: {body}");
        assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{description}: message");
        assert!(!body.to_string().contains("14155550199"), "{description}: no phone number in the error body");
    }
    assert_eq!(app.broker.len(&app.broker.topology.queue(Stream::Status)).await, 0, "nothing refused was queued");
    assert_eq!(app.broker.len(&app.broker.topology.queue(Stream::Inbound)).await, 0, "nothing refused was queued");
}

#[tokio::test]
async fn a_body_over_the_limit_without_a_declared_length_gets_413() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let app = spawn_app_with(|s| s.http.body_limit_bytes = 1024).await;
    app.wait_ready().await;
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    // A forgery shaped like a signature gets past the header check: its body is read, to the limit.
    let head = "POST /plivo/callback HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\n\
         x-plivo-signature-v3: BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\r\nx-plivo-signature-v3-nonce: 1\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'a'; 800];
    for _ in 0..3 {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
}

#[tokio::test]
async fn valid_edge_cases_are_accepted() {
    let app = spawn_app_with(|_| {}).await;
    app.wait_ready().await;
    let cases: Vec<(&str, Vec<(String, String)>)> = vec![
        ("duplicate keys", pairs(&[("Media", "b"), ("Media", "a"), ("MessageUUID", "dup")])),
        ("empty values", pairs(&[("ErrorCode", ""), ("PowerpackUUID", ""), ("MessageUUID", "empty")])),
        ("key without value", pairs(&[("Flag", "")])),
    ];
    for (description, params) in &cases {
        let response = app.post_signed("/plivo/callback", params).await;
        assert_eq!(response.status(), 200, "{description}");
    }
    assert_eq!(app.drain(Stream::Status).await.len(), cases.len());
}

#[tokio::test]
async fn unknown_routes_and_methods_are_refused() {
    let app = spawn_app_with(|_| {}).await;
    assert_eq!(app.client.get(app.url("/nope")).send().await.unwrap().status(), 404);
    let refused = app.client.put(app.url("/plivo/callback")).send().await.unwrap();
    assert_eq!(refused.status(), 405);
    assert!(refused.headers().contains_key("allow"), "the 405 names the methods the path takes");
    let body: serde_json::Value = refused.json().await.expect("a JSON error body");
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn replays_and_method_tricks_are_answered_without_queueing_twice() {
    let app = spawn_app_with(|_| {}).await;
    app.wait_ready().await;
    // The same signed request three times (a captured callback replayed): queued once.
    let params = status_params("replayed-0001", "delivered");
    let captured = app.signed_post("/plivo/callback", &params);
    for _ in 0..3 {
        assert_eq!(captured.try_clone().unwrap().send().await.unwrap().status(), 200);
    }
    // Varying the header's text (an extra entry in the V3 list) still verifies, and is still
    // the same request.
    let url = format!("{TEST_PUBLIC_BASE_URL}/plivo/callback");
    let signature =
        sign_v3(TEST_AUTH_TOKEN, &SignedRequest { method: "POST", url: &url, body: &params, nonce: NONCE }).unwrap();
    for header in [signature.clone(), format!("{signature},AAAA"), format!("junk,{signature}")] {
        let request = raw(
            &app,
            "/plivo/callback",
            "application/x-www-form-urlencoded",
            shared::testing::form_encode(&params).into_bytes(),
        );
        let request = request.header("x-plivo-signature-v3", header).header("x-plivo-signature-v3-nonce", NONCE);
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    // A GET callback's signed query replayed as HEAD, or as a POST with an empty body, verifies
    // (the signed string is the same) but is a shape Plivo never sends.
    let query = shared::testing::form_encode(&params);
    let url = format!("{TEST_PUBLIC_BASE_URL}/plivo/callback?{query}");
    let signature =
        sign_v3(TEST_AUTH_TOKEN, &SignedRequest { method: "GET", url: &url, body: &[], nonce: NONCE }).unwrap();
    let as_head = app.client.head(app.url(&format!("/plivo/callback?{query}")));
    let as_head = as_head.header("x-plivo-signature-v3", &signature).header("x-plivo-signature-v3-nonce", NONCE);
    let refused = as_head.send().await.unwrap();
    assert_eq!(refused.status(), 405);
    assert_eq!(refused.headers()["allow"], "GET, POST", "the 405 names the methods the route takes");
    let empty_post =
        sign_v3(TEST_AUTH_TOKEN, &SignedRequest { method: "POST", url: &url, body: &[], nonce: NONCE }).unwrap();
    let as_post = app.client.post(app.url(&format!("/plivo/callback?{query}")));
    let as_post = as_post.header("x-plivo-signature-v3", &empty_post).header("x-plivo-signature-v3-nonce", NONCE);
    let response = as_post.send().await.unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().contains("form body"), "{body}");

    let queued = app.drain(Stream::Status).await;
    assert_eq!(queued.len(), 2, "one event per distinct signed request (two nonces), none for the tricks");
    assert_eq!(app.broker.len(&app.broker.topology.dead_letter_queue(Stream::Status)).await, 0);
}

/// Reads until the server closes the connection or `within` passes; true if it closed.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Sends `GET /healthz` on `stream` and reads its answer's status line.
async fn healthz_on(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn slow_headers_and_idle_connections_are_cut_off_and_the_connection_cap_holds() {
    use tokio::io::AsyncWriteExt as _;
    let app = spawn_app_with(|s| {
        s.http.header_read_timeout_ms = 1500;
        s.http.max_connections = 20;
    })
    .await;
    app.wait_ready().await;
    // 20 clients trickle a request's first header line and then nothing (slowloris): the cap is
    // reached. A 21st connection gets in all the same: the oldest slow one makes room.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
        stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        slow.push(stream);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await; // in a known order
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut newcomer = tokio::net::TcpStream::connect(app.address).await.unwrap();
    assert_eq!(healthz_on(&mut newcomer).await, "HTTP/1.1 200 OK", "a new client is served at the cap");
    assert!(closed_within(&mut slow[0], std::time::Duration::from_millis(400)).await, "the oldest slow one made room");
    // The header-read timeout closes every other slow one.
    for stream in &mut slow[1..] {
        assert!(closed_within(stream, std::time::Duration::from_secs(3)).await, "a slow client is cut off");
    }
    // 20 connections that have each sent a request are never evicted: a 21st is closed at once.
    drop(newcomer);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut served = Vec::new();
    for _ in 0..20 {
        let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
        assert_eq!(healthz_on(&mut stream).await, "HTTP/1.1 200 OK");
        served.push(stream);
    }
    let mut over_the_cap = tokio::net::TcpStream::connect(app.address).await.unwrap();
    assert!(closed_within(&mut over_the_cap, std::time::Duration::from_millis(400)).await, "the 21st is closed");
    // A client that waits too long between keep-alive requests is cut off too, and its slot is free.
    for stream in &mut served {
        assert!(closed_within(stream, std::time::Duration::from_secs(3)).await, "idle after its answer: closed");
    }
    assert_eq!(app.client.get(app.url("/healthz")).send().await.unwrap().status(), 200);
}
