//! The status API against a fresh database: every route, filter and pagination edge, the
//! error answers, and that the database being down never touches callback ingestion.

use secrecy::SecretString;
use serde_json::{Value, json};
use shared::testing::database_url;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app_with, status_params};

const TOKEN: &str = "status-api-token-012345";
const FULL_TOKEN: &str = "status-full-token-012345";

async fn app_on(pool: &PgPool) -> TestApp {
    let url = database_url(pool);
    let app = spawn_app_with(|s| {
        s.api.tokens = vec![SecretString::from(TOKEN)];
        s.api.full_read_tokens = vec![SecretString::from(FULL_TOKEN)];
        s.database.url = SecretString::from(url);
        // These tests are about answers, not timeouts: a CI machine busy with the whole suite
        // must not turn a slow database write into a 408.
        s.http.request_timeout_ms = 30_000;
        s.database.acquire_timeout_ms = 30_000;
    })
    .await;
    app.wait_ready().await;
    app
}

async fn get(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    let response = app.client.get(app.url(path)).bearer_auth(token).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Three messages an hour apart (m1 oldest), with m1's three events.
async fn fixtures(pool: &PgPool) -> [Uuid; 3] {
    let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
    let rows = [
        (ids[0], "plivo-1", "delivered", None::<i32>, "+14155552671", json!({"order": "1"}), 3),
        (ids[1], "plivo-2", "undelivered", Some(30), "+14155552672", json!({"order": "2"}), 2),
        (ids[2], "plivo-3", "sent", None, "+14155552671", json!({}), 1),
    ];
    for (id, uuid, status, error, to, metadata, hours) in rows {
        sqlx::query(
            "INSERT INTO messages (id, message_uuid, sender, recipient, body, status, error_code, metadata, created_at, accepted_at)
             VALUES ($1, $2, '+14155559999', $3, 'text', $4, $5, $6, now() - make_interval(hours => $7), now())",
        )
        .bind(id)
        .bind(uuid)
        .bind(to)
        .bind(status)
        .bind(error)
        .bind(metadata)
        .bind(hours)
        .execute(pool)
        .await
        .unwrap();
    }
    for (seq, status) in [(1, "queued"), (2, "sent"), (3, "delivered")] {
        sqlx::query(
            "INSERT INTO message_events (dedupe_key, message_id, message_uuid, status, sequence, params, received_at)
             VALUES (sha256($1::bytea), $2, 'plivo-1', $3, $4, $5, now() - make_interval(mins => (10 - $4)::int))",
        )
        .bind(format!("k{seq}").into_bytes())
        .bind(ids[0])
        .bind(status)
        .bind(seq as i64)
        .bind(json!({"Status": status, "To": "14155552671"}))
        .execute(pool)
        .await
        .unwrap();
    }
    ids
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_message_is_found_by_our_id_or_plivos_with_its_history(pool: PgPool) {
    let ids = fixtures(&pool).await;
    let app = app_on(&pool).await;

    let (status, by_id) = get(&app, &format!("/v1/messages/{}", ids[0]), TOKEN).await;
    assert_eq!(status, 200);
    assert_eq!(by_id["status"], "delivered");
    assert_eq!(by_id["recipient"], "***2671", "masked without full-read scope");
    let events: Vec<&str> = by_id["events"].as_array().unwrap().iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(events, ["queued", "sent", "delivered"]);
    assert!(by_id["events"][0].get("params").is_none(), "raw parameters only with full-read scope");

    let (_, full) = get(&app, &format!("/v1/messages/{}", ids[1]), FULL_TOKEN).await;
    assert_eq!(full["recipient"], "+14155552672");
    assert_eq!(full["error"]["code"], 30);
    assert_eq!(full["error"]["retryability"], "permanent");

    // Plivo's MessageUUIDs are UUIDs too.
    let plivo_uuid = Uuid::new_v4();
    sqlx::query("UPDATE messages SET message_uuid = $1 WHERE id = $2")
        .bind(plivo_uuid.to_string())
        .bind(ids[2])
        .execute(&pool)
        .await
        .unwrap();
    let (status, by_plivo) = get(&app, &format!("/v1/messages/{plivo_uuid}"), TOKEN).await;
    assert_eq!((status, by_plivo["id"].as_str()), (200, Some(ids[2].to_string().as_str())));
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn unknown_malformed_and_unauthenticated_lookups_are_refused(pool: PgPool) {
    let app = app_on(&pool).await;
    assert_eq!(get(&app, &format!("/v1/messages/{}", Uuid::new_v4()), TOKEN).await.0, 404);
    assert_eq!(get(&app, "/v1/messages/not-a-uuid", TOKEN).await.0, 400);
    assert_eq!(app.client.get(app.url("/v1/messages")).send().await.unwrap().status(), 401);
    assert_eq!(get(&app, "/v1/messages", "wrong-token-xxxxxxxxxxxx").await.0, 403);
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn the_list_filters_by_status_recipient_time_and_metadata(pool: PgPool) {
    let ids = fixtures(&pool).await;
    let app = app_on(&pool).await;
    let listed = |body: &Value| -> Vec<String> {
        body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
    };
    let id = |i: usize| ids[i].to_string();

    let (_, all) = get(&app, "/v1/messages", TOKEN).await;
    assert_eq!(listed(&all), [id(2), id(1), id(0)], "newest first");
    let (_, delivered) = get(&app, "/v1/messages?status=delivered", TOKEN).await;
    assert_eq!(listed(&delivered), [id(0)]);
    let (_, to) = get(&app, "/v1/messages?recipient=%2B14155552671", TOKEN).await;
    assert_eq!(listed(&to), [id(2), id(0)]);
    let since = (time::OffsetDateTime::now_utc() - time::Duration::minutes(150))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let (_, recent) = get(&app, &format!("/v1/messages?since={}", since.replace('+', "%2B")), TOKEN).await;
    assert_eq!(listed(&recent), [id(2), id(1)]);
    let (_, tagged) = get(&app, "/v1/messages?metadata_key=order&metadata_value=2", TOKEN).await;
    assert_eq!(listed(&tagged), [id(1)]);

    for (query, what) in [
        ("status=lost", "status"),
        ("recipient=4155552671", "recipient"),
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=201", "limit"),
        ("cursor=%%%", "cursor"),
        ("colour=blue", "unknown parameter"),
        ("metadata_key=order", "metadata"),
    ] {
        let (status, body) = get(&app, &format!("/v1/messages?{query}"), TOKEN).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(what.split(' ').next().unwrap()),
            "{query}: {body}"
        );
    }
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn keyset_pagination_visits_every_row_once(pool: PgPool) {
    let app = app_on(&pool).await;
    let (_, empty) = get(&app, "/v1/messages", TOKEN).await;
    assert_eq!((empty["data"].as_array().unwrap().len(), &empty["next_cursor"]), (0, &Value::Null), "empty");

    let ids = fixtures(&pool).await;
    let (_, one_page) = get(&app, "/v1/messages?limit=3", TOKEN).await;
    assert_eq!(one_page["data"].as_array().unwrap().len(), 3);
    assert_eq!(one_page["next_cursor"], Value::Null, "exactly one page: no cursor");

    let mut seen = Vec::new();
    let mut path = "/v1/messages?limit=2".to_owned();
    loop {
        let (status, page) = get(&app, &path, TOKEN).await;
        assert_eq!(status, 200);
        seen.extend(page["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/messages?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let expected: Vec<String> = ids.iter().rev().map(Uuid::to_string).collect();
    assert_eq!(seen, expected);

    // A cursor past the end (the oldest row's position) yields an empty page.
    let (_, last_page) = get(&app, "/v1/messages?limit=2", TOKEN).await;
    let cursor = last_page["next_cursor"].as_str().unwrap().to_owned();
    let (_, rest) = get(&app, &format!("/v1/messages?limit=2&cursor={cursor}"), TOKEN).await;
    let tail = rest["data"].as_array().unwrap()[0]["id"].as_str().unwrap().to_owned();
    sqlx::query("DELETE FROM message_events").execute(&pool).await.unwrap();
    sqlx::query("DELETE FROM messages WHERE id = $1")
        .bind(Uuid::parse_str(&tail).unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let (status, past) = get(&app, &format!("/v1/messages?limit=2&cursor={cursor}"), TOKEN).await;
    assert_eq!((status, past["data"].as_array().unwrap().len(), &past["next_cursor"]), (200, 0, &Value::Null));
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn list_filters_are_served_from_indexes(pool: PgPool) {
    use ingress::storage::{MessageFilter, list_query};
    let now = time::OffsetDateTime::now_utc();
    let filters = [
        MessageFilter { limit: 50, ..Default::default() },
        MessageFilter { status: Some("delivered".into()), limit: 50, ..Default::default() },
        MessageFilter { recipient: Some("+14155552671".into()), limit: 50, ..Default::default() },
        MessageFilter { since: Some(now - time::Duration::days(1)), until: Some(now), limit: 50, ..Default::default() },
        MessageFilter { metadata: Some(("order".into(), "1".into())), limit: 50, ..Default::default() },
        MessageFilter {
            status: Some("sent".into()),
            after: Some((now, Uuid::now_v7())),
            limit: 50,
            ..Default::default()
        },
    ];
    for filter in &filters {
        let mut tx = pool.begin().await.unwrap();
        // With sequential scans priced out, a plan still scanning `messages` has no usable index.
        sqlx::query("SET LOCAL enable_seqscan = off").execute(&mut *tx).await.unwrap();
        let plan: Vec<(String,)> = list_query("EXPLAIN ", filter).build_query_as().fetch_all(&mut *tx).await.unwrap();
        let plan: String = plan.into_iter().map(|(line,)| line).collect::<Vec<_>>().join("\n");
        assert!(!plan.contains("Seq Scan on messages"), "{filter:?}\n{plan}");
    }
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn stats_count_by_status_and_error_code_with_the_delivery_rate(pool: PgPool) {
    fixtures(&pool).await;
    let app = app_on(&pool).await;
    let (status, by_status) = get(&app, "/v1/stats", TOKEN).await;
    assert_eq!(status, 200);
    assert_eq!(by_status["total"], 3);
    assert_eq!(by_status["delivery_rate"], 0.5, "1 delivered of 2 terminal");
    let (_, by_code) = get(&app, "/v1/stats?group_by=error_code", TOKEN).await;
    assert!(by_code["groups"].as_array().unwrap().iter().any(|g| g["key"] == "30" && g["count"] == 1), "{by_code}");
    let (_, by_hour) = get(&app, "/v1/stats?group_by=hour", TOKEN).await;
    assert_eq!(by_hour["groups"].as_array().unwrap().len(), 3);
    assert_eq!(get(&app, "/v1/stats?group_by=day", TOKEN).await.0, 400);
    assert_eq!(get(&app, "/v1/stats?from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", TOKEN).await.0, 400);
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn operators_manage_opt_outs_and_read_inbound_messages(pool: PgPool) {
    sqlx::query(
        "INSERT INTO inbound_messages (message_uuid, sender, recipient, body, params, received_at)
         VALUES ('in-1', '+14155552671', '+14155559999', 'STOP', '{}', now())",
    )
    .execute(&pool)
    .await
    .unwrap();
    let app = app_on(&pool).await;
    let number = "/v1/opt-outs/%2B14155552671";

    assert_eq!(get(&app, number, TOKEN).await.0, 404);
    let put = |body: Value| app.client.put(app.url(number)).bearer_auth(TOKEN).json(&body).send();
    assert_eq!(put(json!({})).await.unwrap().status(), 201);
    assert_eq!(put(json!({})).await.unwrap().status(), 200, "idempotent");
    assert_eq!(put(Value::Null).await.unwrap().status(), 200, "a null body is no body: all senders, again");
    assert_eq!(put(json!({"sender": "+14155559999"})).await.unwrap().status(), 201);
    assert_eq!(put(json!({"sender": "not valid!"})).await.unwrap().status(), 422);
    let (_, list) = get(&app, number, TOKEN).await;
    let senders: Vec<&str> =
        list["opt_outs"].as_array().unwrap().iter().map(|o| o["sender"].as_str().unwrap()).collect();
    assert_eq!(senders, ["*", "+14155559999"]);
    let delete = app.client.delete(app.url(&format!("{number}?sender=*"))).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(delete.status(), 204);
    assert_eq!(app.client.delete(app.url(number)).bearer_auth(TOKEN).send().await.unwrap().status(), 204);
    assert_eq!(get(&app, number, TOKEN).await.0, 404);
    assert_eq!(get(&app, "/v1/opt-outs/12345", TOKEN).await.0, 400);

    let (status, inbound) = get(&app, "/v1/inbound?sender=%2B14155552671", TOKEN).await;
    assert_eq!(status, 200);
    assert_eq!(inbound["data"][0]["sender"], "***2671");
    assert_eq!(inbound["data"][0]["text"], Value::Null, "text only with full-read scope");
    let (_, full) = get(&app, "/v1/inbound", FULL_TOKEN).await;
    assert_eq!(full["data"][0]["text"], "STOP");
}

#[tokio::test]
async fn with_the_database_down_the_api_answers_503_and_callbacks_are_still_accepted() {
    let app = spawn_app_with(|s| {
        s.api.tokens = vec![SecretString::from(TOKEN)];
        s.database.url = SecretString::from("postgres://postgres@127.0.0.1:1/none");
        s.database.acquire_timeout_ms = 500;
    })
    .await;
    app.wait_ready().await;
    assert_eq!(
        app.client.get(app.url("/readyz")).send().await.unwrap().status(),
        200,
        "readiness ignores the database"
    );
    let (status, body) = get(&app, &format!("/v1/messages/{}", Uuid::new_v4()), TOKEN).await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("database_unavailable")));
    assert_eq!(get(&app, "/v1/messages", TOKEN).await.0, 503);
    assert_eq!(app.post_signed("/plivo/callback", &status_params("db-down", "sent")).await.status(), 200);
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn an_opt_out_body_is_not_read_before_the_caller_is_known(pool: PgPool) {
    let app = app_on(&pool).await;
    let number = "/v1/opt-outs/%2B14155552671";
    // 8 MiB from a stranger: refused for the missing token, not read into memory first.
    let big = vec![b' '; 8 << 20];
    let anonymous = app.client.put(app.url(number)).header("content-type", "application/json").body(big.clone());
    assert_eq!(anonymous.send().await.unwrap().status(), 401);
    // A known caller's body is capped at what an opt-out needs.
    let known = app.client.put(app.url(number)).bearer_auth(TOKEN).header("content-type", "application/json");
    let response = known.body(big).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let none: i64 = sqlx::query_scalar("SELECT count(*) FROM opt_outs").fetch_one(&pool).await.unwrap();
    assert_eq!(none, 0);
}

#[sqlx::test(migrator = "shared::MIGRATOR")]
async fn a_clients_request_id_is_kept_only_when_short_and_plain(pool: PgPool) {
    let app = app_on(&pool).await;
    let answered_id = |id: &'static str| {
        let request = app.client.get(app.url("/healthz")).header("x-request-id", id);
        async move { request.send().await.unwrap().headers()["x-request-id"].to_str().unwrap().to_owned() }
    };
    assert_eq!(answered_id("trace-42.a_b").await, "trace-42.a_b");
    const TOO_LONG: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";
    assert_eq!(TOO_LONG.len(), 65);
    for unsafe_id in ["has space", "quote\"d", "+14155552671 STOP", TOO_LONG] {
        let answered = answered_id(unsafe_id).await;
        assert_ne!(answered, unsafe_id);
        assert!(uuid::Uuid::parse_str(&answered).is_ok(), "replaced with a fresh id: {answered}");
    }
}
