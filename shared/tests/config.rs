//! Configuration layering (defaults → file → environment), error messages, and redaction.

use std::io::Write as _;

use secrecy::ExposeSecret as _;
use shared::config::{ConfigError, IngressSettings, WorkerSettings, load_with_env, render};

const TOKEN: &str = "s3cr3t-T0KEN-value-that-must-never-print";

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn with_token(extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = env(&[("SMSFLOW_PLIVO__AUTH_TOKEN", TOKEN)]);
    vars.extend(env(extra));
    vars
}

fn temp_file(contents: &str) -> tempfile_lite::TempFile {
    tempfile_lite::TempFile::with(contents)
}

#[test]
fn defaults_apply_when_nothing_else_is_set() {
    let s: IngressSettings = load_with_env(None, with_token(&[])).unwrap();
    assert_eq!(s.http.listen.port(), 8080);
    assert_eq!(s.amqp.prefix, "smsflow");
    assert_eq!(s.amqp.confirm_timeout_ms, 2000);
    assert_eq!(s.http.body_limit_bytes, 65536);
    assert!(!s.plivo.accept_v2_signatures);
    assert_eq!(s.plivo.auth_token.expose_secret(), TOKEN);
}

#[test]
fn a_file_overrides_defaults_and_the_environment_overrides_the_file() {
    let file = temp_file("[amqp]\nprefix = \"from-file\"\nprefetch = 300\n[http]\nbody_limit_bytes = 1000\n");
    let s: IngressSettings =
        load_with_env(Some(file.path()), with_token(&[("SMSFLOW_AMQP__PREFETCH", "700")])).unwrap();
    assert_eq!(s.amqp.prefix, "from-file");
    assert_eq!(s.amqp.prefetch, 700);
    assert_eq!(s.http.body_limit_bytes, 1000);
}

#[test]
fn a_missing_required_secret_names_the_key_and_how_to_set_it() {
    let err = load_with_env::<WorkerSettings>(None, env(&[])).unwrap_err();
    assert_eq!(err.key, "plivo.auth_token");
    assert!(err.message.contains("SMSFLOW_PLIVO__AUTH_TOKEN"), "{err}");
    assert!(!err.to_string().contains('\n'), "one line: {err}");
}

#[test]
fn the_worker_refuses_to_start_without_the_plivo_account_id() {
    let err = load_with_env::<WorkerSettings>(None, with_token(&[])).unwrap_err();
    assert_eq!(err.key, "plivo.auth_id");
    assert!(err.message.contains("SMSFLOW_PLIVO__AUTH_ID"), "{err}");
    assert!(!err.to_string().contains('\n'), "one line: {err}");
    let blank = load_with_env::<WorkerSettings>(None, with_token(&[("SMSFLOW_PLIVO__AUTH_ID", "  ")])).unwrap_err();
    assert_eq!(blank.key, "plivo.auth_id");
    // The ingress does not call Plivo's API and does not need it.
    assert!(load_with_env::<IngressSettings>(None, with_token(&[])).is_ok());
    assert!(load_with_env::<WorkerSettings>(None, with_token(&[("SMSFLOW_PLIVO__AUTH_ID", "MA0123")])).is_ok());
}

#[test]
fn numeric_looking_values_still_work_for_string_and_secret_fields() {
    let vars = env(&[
        ("SMSFLOW_PLIVO__AUTH_TOKEN", "0012345"),
        ("SMSFLOW_PLIVO__AUTH_ID", "123456"),
        ("SMSFLOW_PLIVO__DEFAULT_SENDER", "+14155550100"),
        ("SMSFLOW_AMQP__PREFIX", "42"),
        ("SMSFLOW_AMQP__PREFETCH", "500"),
        ("SMSFLOW_TELEMETRY__SAMPLE_RATIO", "0.5"),
    ]);
    let s: IngressSettings = load_with_env(None, vars).unwrap();
    assert_eq!(s.plivo.auth_id, "123456");
    assert_eq!(s.plivo.default_sender, "+14155550100", "a phone number keeps its +");
    assert_eq!(s.plivo.auth_token.expose_secret(), "0012345", "leading zeros are kept");
    assert_eq!(s.amqp.prefix, "42");
    assert_eq!(s.amqp.prefetch, 500);
    assert_eq!(s.telemetry.sample_ratio, 0.5);
    // Quoting still works, as figment documents it.
    let quoted: IngressSettings = load_with_env(None, env(&[("SMSFLOW_PLIVO__AUTH_TOKEN", "\"0012345\"")])).unwrap();
    assert_eq!(quoted.plivo.auth_token.expose_secret(), "0012345");
}

#[test]
fn secrets_can_come_from_files_verbatim() {
    let file = temp_file("0042-from-file\n");
    let vars = env(&[("SMSFLOW_PLIVO__AUTH_TOKEN_FILE", file.path().to_str().unwrap())]);
    let s: IngressSettings = load_with_env(None, vars).unwrap();
    assert_eq!(s.plivo.auth_token.expose_secret(), "0042-from-file");

    let missing = env(&[("SMSFLOW_PLIVO__AUTH_TOKEN_FILE", "/nonexistent/token")]);
    let err = load_with_env::<IngressSettings>(None, missing).unwrap_err();
    assert_eq!(err.key, "plivo.auth_token");
    assert!(err.message.contains("SMSFLOW_PLIVO__AUTH_TOKEN_FILE"), "{err}");
}

#[test]
fn a_value_of_the_wrong_type_names_the_key_and_its_source() {
    let err = load_with_env::<IngressSettings>(None, with_token(&[("SMSFLOW_AMQP__PREFETCH", "lots")])).unwrap_err();
    assert_eq!(err.key, "amqp.prefetch");
    assert!(err.message.contains("SMSFLOW_AMQP__PREFETCH"), "{err}");
}

#[test]
fn invalid_values_are_refused_with_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("SMSFLOW_HTTP__PUBLIC_BASE_URL", "https://example.com/", "http.public_base_url"),
        ("SMSFLOW_HTTP__PUBLIC_BASE_URL", "example.com", "http.public_base_url"),
        ("SMSFLOW_AMQP__URL", "http://broker", "amqp.url"),
        ("SMSFLOW_AMQP__PREFIX", "bad prefix", "amqp.prefix"),
        ("SMSFLOW_AMQP__PUBLISH_CHANNELS", "0", "amqp.publish_channels"),
        ("SMSFLOW_TELEMETRY__SAMPLE_RATIO", "1.5", "telemetry.sample_ratio"),
        ("SMSFLOW_TELEMETRY__LOG_FORMAT", "xml", "telemetry.log_format"),
        ("SMSFLOW_HTTP__LISTEN", "not-an-address", "http.listen"),
        // Not shorter than the shutdown grace (10 s): a slow client could outlast the drain.
        ("SMSFLOW_HTTP__HEADER_READ_TIMEOUT_MS", "10000", "http.header_read_timeout_ms"),
        ("SMSFLOW_HTTP__MAX_CONNECTIONS", "0", "http.max_connections"),
    ];
    for (name, value, key) in cases {
        let err: ConfigError = load_with_env::<IngressSettings>(None, with_token(&[(name, value)])).unwrap_err();
        assert_eq!(&err.key, key, "{name}={value}: {err}");
    }
}

#[test]
fn webhook_settings_are_checked_with_the_key() {
    let worker = |extra: &[(&str, &str)]| {
        let mut vars = with_token(&[("SMSFLOW_PLIVO__AUTH_ID", "MA0123")]);
        vars.extend(env(extra));
        load_with_env::<WorkerSettings>(None, vars)
    };
    let cases: &[(&str, &str, &str, &str)] = &[
        ("SMSFLOW_WEBHOOKS__SECRETS", "[\"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]", "webhooks.secrets", "whsec_"),
        ("SMSFLOW_WEBHOOKS__SECRETS", "[\"whsec_c2hvcnQ=\"]", "webhooks.secrets", "24 to 64 bytes"),
        ("SMSFLOW_WEBHOOKS__PER_ENDPOINT_CONCURRENCY", "64", "webhooks.per_endpoint_concurrency", "must not exceed"),
        ("SMSFLOW_WEBHOOKS__TIMEOUT_MS", "0", "webhooks.timeout_ms", "greater than 0"),
    ];
    for (name, value, key, says) in cases {
        let err = worker(&[(name, value)]).unwrap_err();
        assert_eq!((&err.key.as_str(), err.message.contains(says)), (key, true), "{name}={value}: {err}");
    }
    let ok = worker(&[("SMSFLOW_WEBHOOKS__SECRETS", "[\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]")]).unwrap();
    assert_eq!(ok.webhooks.secrets.len(), 1);
    assert!(!render(&ok).contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "the secret is redacted");
}

#[test]
fn a_default_callback_must_name_a_configured_token_and_a_valid_url() {
    let load = |toml: &str| {
        let file = temp_file(toml);
        load_with_env::<IngressSettings>(Some(file.path()), with_token(&[]))
    };
    let tokens = "[api]\ntokens = [\"send-token-0123456789\"]\n";
    let good = load(&format!(
        "{tokens}[[api.default_callbacks]]\ntoken = \"send-token-0123456789\"\nurl = \"https://b.example.com/s\"\n"
    ))
    .unwrap();
    assert_eq!(good.api.default_callbacks[0].url, "https://b.example.com/s");
    assert!(!render(&good).contains("send-token-0123456789"), "the token is redacted");
    let unknown = load(&format!(
        "{tokens}[[api.default_callbacks]]\ntoken = \"another-token-0123456789\"\nurl = \"https://b.example.com/s\"\n"
    ))
    .unwrap_err();
    assert_eq!(unknown.key, "api.default_callbacks[0].token", "{unknown}");
    assert!(!unknown.to_string().contains("another-token"), "the error does not repeat the token: {unknown}");
    let bad_url =
        load(&format!("{tokens}[[api.default_callbacks]]\ntoken = \"send-token-0123456789\"\nurl = \"ftp://b\"\n"))
            .unwrap_err();
    assert_eq!(bad_url.key, "api.default_callbacks[0].url", "{bad_url}");
}

#[test]
fn a_missing_config_file_is_an_error_not_silently_ignored() {
    let err =
        load_with_env::<IngressSettings>(Some(std::path::Path::new("/nonexistent.toml")), with_token(&[])).unwrap_err();
    assert_eq!(err.key, "--config");
}

#[test]
fn additional_tokens_accept_a_comma_separated_string() {
    let s: IngressSettings =
        load_with_env(None, with_token(&[("SMSFLOW_PLIVO__ADDITIONAL_AUTH_TOKENS", "old-one, older-two")])).unwrap();
    let tokens: Vec<String> = s.plivo.account_tokens().iter().map(|t| t.expose_secret().to_owned()).collect();
    assert_eq!(tokens, [TOKEN, "old-one", "older-two"]);
}

#[test]
fn secrets_never_appear_in_debug_or_rendered_output() {
    let vars = with_token(&[
        ("SMSFLOW_PLIVO__MAIN_AUTH_TOKEN", "main-secret-token"),
        ("SMSFLOW_PLIVO__ADDITIONAL_AUTH_TOKENS", "rotated-secret-token"),
        ("SMSFLOW_DATABASE__URL", "postgres://app:db-password@db/smsflow"),
        ("SMSFLOW_AMQP__URL", "amqp://app:broker-password@mq:5672/%2f"),
        ("SMSFLOW_PLIVO__AUTH_ID", "MA0123"),
    ]);
    let s: WorkerSettings = load_with_env(None, vars).unwrap();
    let debug = format!("{s:?}");
    let rendered = render(&s);
    for secret in [TOKEN, "main-secret-token", "rotated-secret-token", "db-password", "broker-password"] {
        assert!(!debug.contains(secret), "Debug leaks {secret}");
        assert!(!rendered.contains(secret), "rendered config leaks {secret}");
    }
    assert!(rendered.contains("[REDACTED]"));
    assert!(rendered.contains("prefix = \"smsflow\""), "{rendered}");
}

/// A file removed on drop (no extra dependency for one helper).
mod tempfile_lite {
    use super::*;

    pub struct TempFile(std::path::PathBuf);

    impl TempFile {
        pub fn with(contents: &str) -> Self {
            let path = std::env::temp_dir().join(format!("smsflow-test-{}.toml", uuid::Uuid::new_v4()));
            std::fs::File::create(&path).and_then(|mut f| f.write_all(contents.as_bytes())).unwrap();
            Self(path)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Every key in default.toml (set or commented out) has a row in the README's reference table.
#[test]
fn the_readme_documents_every_configuration_key() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in shared::config::DEFAULTS_TOML.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let line = line.strip_prefix("# ").unwrap_or(line);
        if let Some((key, _)) = line.split_once(" = ")
            && !section.is_empty()
            && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        {
            keys.push(format!("{section}.{key}"));
        }
    }
    assert!(keys.len() > 30, "parsed {} keys", keys.len());
    let missing: Vec<_> = keys.iter().filter(|k| !readme.contains(&format!("| `{k}` |"))).collect();
    assert!(missing.is_empty(), "README configuration table lacks {missing:?}");
}

/// The published JSON Schema of the send job names exactly the fields the code reads.
#[test]
fn the_send_job_schema_matches_the_contract() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/schemas/send-job.v1.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    let job = shared::amqp::contracts::SendJob {
        id: uuid::Uuid::now_v7(),
        to: "+14155552671".into(),
        text: "t".into(),
        from: Some("+14155550100".into()),
        powerpack_uuid: Some("7f8a3d4e-0000-4000-8000-000000000001".into()),
        message_expiry: Some(60),
        metadata: Some(Default::default()),
        callback: Some("https://example.com/cb".into()),
    };
    let serialized = serde_json::to_value(&job).unwrap();
    let mut fields: Vec<&String> = serialized.as_object().unwrap().keys().collect();
    let mut documented: Vec<&String> = schema["properties"].as_object().unwrap().keys().collect();
    fields.sort();
    documented.sort();
    assert_eq!(fields, documented);
    assert_eq!(schema["required"], serde_json::json!(["id", "to", "text"]));
    assert_eq!(schema["additionalProperties"], false);
    assert_eq!(
        (shared::amqp::contracts::SendJob::SCHEMA, shared::amqp::contracts::SendJob::VERSION),
        ("smsflow.send-job", 1),
        "the schema file is version 1"
    );
}
