//! The OpenAPI document is served and every operation it documents is routed.

use crate::helpers::spawn_app;

#[tokio::test]
async fn every_documented_operation_is_routed_and_the_document_is_served() {
    let app = spawn_app().await;
    let served: serde_json::Value =
        app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
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
