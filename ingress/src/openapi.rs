//! The HTTP API's OpenAPI 3.1 document, generated from the handlers' annotations and the types
//! they read and answer. `GET /openapi.json` serves it; `docs/openapi.json` is the same text,
//! committed, and a test fails when the two differ (`SMSFLOW_WRITE_OPENAPI=1` rewrites it).

use std::sync::LazyLock;

use utoipa::OpenApi;
use utoipa::openapi::path::{HttpMethod, Operation, PathItem};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};

use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "smsflow ingress",
        version = "1.0.0",
        description = "Plivo webhooks, the send API and the status API. Errors are JSON \
                       {\"error\": {\"code\", \"message\", \"field\"?}}."
    ),
    servers((url = "http://localhost:8080")),
    security(("bearer" = [])),
    modifiers(&BearerToken, &Aliases),
    paths(
        routes::plivo::status_callback,
        routes::plivo::inbound_message,
        routes::send::create_message,
        routes::messages::list_messages,
        routes::messages::get_message,
        routes::stats::stats,
        routes::inbound::list_inbound,
        routes::opt_outs::get_opt_outs,
        routes::opt_outs::put_opt_out,
        routes::opt_outs::delete_opt_outs,
        routes::health::healthz,
        routes::health::readyz,
        routes::health::openapi,
    )
)]
pub struct ApiDoc;

/// The document as served and committed: pretty JSON with a final newline.
pub fn document() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let mut text = ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes");
        text.push('\n');
        text
    });
    &DOCUMENT
}

/// The API's tokens: `Authorization: Bearer <token>`.
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Operations that one handler serves under a second method or path, derived from the first:
/// Plivo's webhooks also come as GET (fields in the query, no body), and `POST /send-sms`
/// (the Express guide's route) is `POST /v1/messages`.
struct Aliases;

impl utoipa::Modify for Aliases {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let paths = &mut openapi.paths.paths;
        for webhook in ["/plivo/callback", "/plivo/inbound"] {
            if let Some(item) = paths.get_mut(webhook)
                && let Some(post) = item.post.clone()
            {
                item.get = Some(as_get(post));
            }
        }
        if let Some(mut send) = paths.get("/v1/messages").and_then(|item| item.post.clone()) {
            send.summary = Some("Send one SMS (the Express guide's route; alias of POST /v1/messages)".into());
            send.operation_id = Some("create_message_send_sms".into());
            paths.insert("/send-sms".into(), PathItem::new(HttpMethod::Post, send));
        }
    }
}

/// A webhook's GET twin: the fields come in the query, so no body's media type is checked (a
/// body is still read, and one over the limit still gets 413).
fn as_get(mut operation: Operation) -> Operation {
    operation.request_body = None;
    operation.responses.responses.remove("415");
    operation.summary = operation.summary.map(|s| format!("{s} (method=GET: parameters in the query)"));
    operation.operation_id = operation.operation_id.map(|id| format!("{id}_get"));
    operation
}
