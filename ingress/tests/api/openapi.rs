//! The OpenAPI document: generated from the code, committed as generated, served, and every
//! operation it documents is routed.

use crate::helpers::spawn_app;

#[test]
fn the_committed_document_is_the_generated_one() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let generated = ingress::openapi::document();
    if std::env::var_os("SMSFLOW_WRITE_OPENAPI").is_some() {
        // In CI a stray variable would turn the check into a write.
        assert!(std::env::var_os("CI").is_none(), "SMSFLOW_WRITE_OPENAPI is for tools/openapi, not CI");
        std::fs::write(path, generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(path).expect("read docs/openapi.json");
    assert!(
        committed == generated,
        "docs/openapi.json differs from the document the code generates: run tools/openapi and commit the result"
    );
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_the_document_is_served() {
    let app = spawn_app().await;
    let served = app.client.get(app.url("/openapi.json")).send().await.unwrap().text().await.unwrap();
    assert_eq!(served, ingress::openapi::document());
    let served: serde_json::Value = serde_json::from_str(&served).unwrap();
    assert_eq!(served["openapi"], "3.1.0");
    let mut operations = 0;
    for (path, item) in served["paths"].as_object().unwrap() {
        let concrete = path.replace("{id}", &uuid::Uuid::new_v4().to_string()).replace("{number}", "%2B14155552671");
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let method = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes()).unwrap();
            let response = app.client.request(method.clone(), app.url(&concrete)).send().await.unwrap();
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path} is documented but not routed");
            assert!(
                !(status == 404 && body["error"]["message"] == "no such route"),
                "{method} {path} is documented but not routed"
            );
        }
    }
    assert!(operations >= 15, "{operations} operations documented");
}
