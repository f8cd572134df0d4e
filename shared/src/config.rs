//! Layered configuration: built-in `default.toml` → optional TOML file → `SMSFLOW_*`
//! environment variables (and `SMSFLOW_*_FILE` for secrets kept in files).
//!
//! Each service extracts its own settings tree from the same layers; sections it does not
//! read are ignored, so one file can configure both services.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use figment::{Figment, Metadata, Provider};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::redact;

pub const ENV_PREFIX: &str = "SMSFLOW_";
/// Environment variable naming a TOML file, used when `--config` is not given.
pub const CONFIG_FILE_ENV: &str = "SMSFLOW_CONFIG";
const FILE_SUFFIX: &str = "_FILE";
/// The commented defaults; also the configuration reference (README points here).
pub const DEFAULTS_TOML: &str = include_str!("../config/default.toml");

/// A configuration problem, reported as one line that names the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

/// Checks a settings tree beyond what its types express.
pub trait Validate {
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads settings from the process environment and the optional file.
pub fn load<T: DeserializeOwned + Validate>(file: Option<&Path>) -> Result<T, ConfigError> {
    let file = file.map(Path::to_path_buf).or_else(|| std::env::var_os(CONFIG_FILE_ENV).map(PathBuf::from));
    load_with_env(file.as_deref(), std::env::vars())
}

/// Loads settings from explicit environment variables (tests pass their own).
pub fn load_with_env<T: DeserializeOwned + Validate>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let env: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    let mut figment = Figment::new().merge(Toml::string(DEFAULTS_TOML));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::new("--config", format!("{} is not a readable file", path.display())));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    for (name, value) in &env {
        if name == CONFIG_FILE_ENV {
            continue;
        }
        let var = match name.strip_suffix(FILE_SUFFIX) {
            Some(target) => {
                let key = env_name_to_key(target);
                let contents = std::fs::read_to_string(value)
                    .map_err(|e| ConfigError::new(key.clone(), format!("cannot read {name}={value}: {e}")))?;
                let contents =
                    contents.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&contents);
                // A secret read from a file stays a string, whatever it looks like.
                EnvVar { source: format!("file named by {name}"), key, value: Value::from(contents.to_owned()) }
            }
            None => EnvVar {
                source: format!("environment variable {name}"),
                key: env_name_to_key(name),
                value: typed_env_value(value),
            },
        };
        figment = figment.merge(var);
    }
    let settings: T = figment.extract().map_err(describe_figment_error)?;
    settings.validate()?;
    Ok(settings)
}

/// One `SMSFLOW_*` variable as a provider, so errors name the variable it came from.
/// Values are typed like figment's own `Env` does (`500` is a number, `[a, b]` a list).
struct EnvVar {
    source: String,
    key: String,
    value: Value,
}

impl Provider for EnvVar {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.clone())
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Serialized::default(&self.key, &self.value).data()
    }
}

/// Types an environment value as figment would (`500` a number, `true` a bool, `[a, b]` a list),
/// except text whose number form would lose characters: `+14155550100` (a phone number) and
/// `0042` (leading zeros) stay strings, exactly as written.
fn typed_env_value(raw: &str) -> Value {
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    let keeps_text =
        raw.starts_with('+') || (digits.len() > 1 && digits.starts_with('0') && digits.as_bytes()[1].is_ascii_digit());
    if keeps_text {
        return Value::from(raw.to_owned());
    }
    raw.parse().unwrap_or_else(|_| Value::from(raw.to_owned()))
}

/// `SMSFLOW_PLIVO__AUTH_TOKEN` → `plivo.auth_token`.
pub fn env_name_to_key(name: &str) -> String {
    name.strip_prefix(ENV_PREFIX).unwrap_or(name).to_ascii_lowercase().replace("__", ".")
}

/// `plivo.auth_token` → `SMSFLOW_PLIVO__AUTH_TOKEN`.
pub fn key_to_env_name(key: &str) -> String {
    format!("{ENV_PREFIX}{}", key.to_ascii_uppercase().replace('.', "__"))
}

fn describe_figment_error(err: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let mut key = err.path.join(".");
    let source = err.metadata.as_ref().map(|m| match &m.source {
        Some(source) => format!("{} {source}", m.name),
        None => m.name.to_string(),
    });
    let message = match &err.kind {
        Kind::MissingField(field) => {
            key = if key.is_empty() { field.to_string() } else { format!("{key}.{field}") };
            format!(
                "is required but not set (set {} or {}_FILE, or `{key}` in the config file)",
                key_to_env_name(&key),
                key_to_env_name(&key)
            )
        }
        other => {
            let from = source.map(|s| format!(" (from {s})")).unwrap_or_default();
            format!("{other}{from}")
        }
    };
    // Parse errors span several lines (with a caret diagram); the contract is one line.
    let message = message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with('|')
                && !l.trim_start_matches(|c: char| c.is_ascii_digit()).starts_with(" |")
        })
        .collect::<Vec<_>>()
        .join(" ");
    ConfigError::new(if key.is_empty() { "configuration".into() } else { key }, message)
}

/// Renders settings as TOML with every secret replaced by `[REDACTED]`.
pub fn render<T: Serialize>(settings: &T) -> String {
    toml::to_string_pretty(settings).unwrap_or_else(|e| format!("# cannot render settings: {e}\n"))
}

// ---------------------------------------------------------------------------------------------
// Settings sections shared by the services.

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    #[serde(deserialize_with = "de::string")]
    pub public_base_url: String,
    pub body_limit_bytes: usize,
    pub request_timeout_ms: u64,
    pub shutdown_grace_ms: u64,
    pub retry_after_secs: u32,
    pub unverified_per_second: u32,
    pub unverified_burst: u32,
    pub header_read_timeout_ms: u64,
    pub max_connections: usize,
    /// The ingress's admin listener (/metrics, /healthz), off the public port.
    pub admin_listen: SocketAddr,
}

/// What the worker reads of `[http]`: the ingress's public URL, which its Plivo requests name
/// as the callback address. The rest of `[http]` is the ingress's own.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CallbackUrlSettings {
    #[serde(deserialize_with = "de::string")]
    pub public_base_url: String,
}

impl CallbackUrlSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        validate_base_url("http.public_base_url", &self.public_base_url)
    }
}

impl HttpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        validate_base_url("http.public_base_url", &self.public_base_url)?;
        positive("http.body_limit_bytes", self.body_limit_bytes as u64)?;
        positive("http.request_timeout_ms", self.request_timeout_ms)?;
        positive("http.unverified_per_second", self.unverified_per_second.into())?;
        positive("http.header_read_timeout_ms", self.header_read_timeout_ms)?;
        // A connection still sending its headers at SIGTERM holds the drain up to this long.
        if self.header_read_timeout_ms >= self.shutdown_grace_ms {
            return Err(ConfigError::new(
                "http.header_read_timeout_ms",
                "must be shorter than http.shutdown_grace_ms, or a slow client could outlast the shutdown grace",
            ));
        }
        positive("http.max_connections", self.max_connections as u64)?;
        positive("http.unverified_burst", self.unverified_burst.into())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AmqpSettings {
    #[serde(deserialize_with = "de::secret", serialize_with = "redact::secret")]
    pub url: SecretString,
    #[serde(deserialize_with = "de::string")]
    pub prefix: String,
    pub publish_channels: usize,
    pub confirm_timeout_ms: u64,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub retry_delays_ms: Vec<u64>,
    pub connect_timeout_ms: u64,
    pub reconnect_give_up_ms: u64,
    /// 0: queues live until deleted. Otherwise RabbitMQ deletes a queue left unused this long.
    pub idle_queue_expiry_ms: u64,
    /// The ingress publishes at most this many status callbacks as one message (1: each alone).
    pub callback_batch_max: usize,
    /// How long callbacks gather for a message at most when every publish slot of the ingress
    /// is busy (with a free slot a callback is published at once; a batch also goes as soon as
    /// a publish ends, or once every open connection has its callback in it or in flight).
    pub callback_batch_window_us: u64,
    /// Publishes of status callbacks the ingress keeps in flight before callbacks gather
    /// for company (fewer: bigger batches under load).
    pub callback_batch_slots: usize,
}

/// Status callbacks in one message at most (`amqp.callback_batch_max`): 256 callbacks of at most
/// `http.body_limit_bytes` each stay far below RabbitMQ's message size limit.
pub const MAX_CALLBACK_BATCH: usize = 256;

impl AmqpSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose_secret();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(ConfigError::new("amqp.url", "must start with amqp:// or amqps://"));
        }
        if self.prefix.is_empty() || !self.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(ConfigError::new(
                "amqp.prefix",
                "must be non-empty and use only letters, digits, '-', '_' and '.'",
            ));
        }
        positive("amqp.publish_channels", self.publish_channels as u64)?;
        positive("amqp.confirm_timeout_ms", self.confirm_timeout_ms)?;
        positive("amqp.prefetch", self.prefetch.into())?;
        positive("amqp.delivery_limit", self.delivery_limit.into())?;
        positive("amqp.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("amqp.callback_batch_max", self.callback_batch_max as u64)?;
        if self.callback_batch_max > MAX_CALLBACK_BATCH {
            return Err(ConfigError::new("amqp.callback_batch_max", format!("must be at most {MAX_CALLBACK_BATCH}")));
        }
        positive("amqp.callback_batch_slots", self.callback_batch_slots as u64)?;
        if self.callback_batch_window_us > 100_000 {
            return Err(ConfigError::new("amqp.callback_batch_window_us", "must be at most 100000 (0.1 s)"));
        }
        if self.retry_delays_ms.contains(&0) {
            return Err(ConfigError::new("amqp.retry_delays_ms", "every delay must be > 0"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DatabaseSettings {
    #[serde(deserialize_with = "de::secret", serialize_with = "redact::secret")]
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

impl DatabaseSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        let url = self.url.expose_secret();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(ConfigError::new("database.url", "must start with postgres:// or postgresql://"));
        }
        positive("database.max_connections", self.max_connections.into())?;
        positive("database.acquire_timeout_ms", self.acquire_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PlivoSettings {
    #[serde(deserialize_with = "de::string")]
    pub auth_id: String,
    #[serde(deserialize_with = "de::secret", serialize_with = "redact::secret")]
    pub auth_token: SecretString,
    #[serde(default, deserialize_with = "de::secret_list", serialize_with = "redact::secret_list")]
    pub additional_auth_tokens: Vec<SecretString>,
    #[serde(
        default,
        deserialize_with = "de::opt_secret",
        serialize_with = "redact::opt_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub main_auth_token: Option<SecretString>,
    pub accept_v2_signatures: bool,
    #[serde(deserialize_with = "de::string")]
    pub api_base_url: String,
    #[serde(deserialize_with = "de::string")]
    pub default_sender: String,
    pub connect_timeout_ms: u64,
    pub request_timeout_ms: u64,
}

impl PlivoSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.auth_token.expose_secret().is_empty() {
            return Err(ConfigError::new("plivo.auth_token", "must not be empty"));
        }
        if self.additional_auth_tokens.iter().any(|t| t.expose_secret().is_empty()) {
            return Err(ConfigError::new("plivo.additional_auth_tokens", "must not contain empty tokens"));
        }
        if self.main_auth_token.as_ref().is_some_and(|t| t.expose_secret().is_empty()) {
            return Err(ConfigError::new("plivo.main_auth_token", "must not be empty when set"));
        }
        validate_base_url("plivo.api_base_url", &self.api_base_url)?;
        positive("plivo.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("plivo.request_timeout_ms", self.request_timeout_ms)
    }

    /// Tokens whose signatures `X-Plivo-Signature-V3` may carry (current first).
    pub fn account_tokens(&self) -> Vec<SecretString> {
        std::iter::once(self.auth_token.clone()).chain(self.additional_auth_tokens.iter().cloned()).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TelemetrySettings {
    pub log_format: LogFormat,
    #[serde(deserialize_with = "de::string")]
    pub log_filter: String,
    #[serde(deserialize_with = "de::string")]
    pub otlp_endpoint: String,
    pub sample_ratio: f64,
}

impl TelemetrySettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::new("telemetry.sample_ratio", "must be between 0.0 and 1.0"));
        }
        if !self.otlp_endpoint.is_empty() {
            validate_base_url("telemetry.otlp_endpoint", &self.otlp_endpoint)?;
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_filter)
            .map(|_| ())
            .map_err(|e| ConfigError::new("telemetry.log_filter", format!("is not a valid filter: {e}")))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerTuning {
    pub batch_size: usize,
    pub batch_wait_ms: u64,
    /// Status batches one worker writes at once, each from a consumer of its own (its own
    /// channel, so one's multiple-ack never covers the other's deliveries).
    pub status_consumers: usize,
    pub in_process_retries: usize,
    pub admin_listen: SocketAddr,
    pub shutdown_grace_ms: u64,
    /// Events the relay reads from the outbox and publishes per round.
    pub event_batch_size: u32,
    /// How often an idle relay looks at the outbox without being notified, and a standby
    /// worker tries to take over the relay.
    pub event_poll_interval_ms: u64,
}

impl WorkerTuning {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("worker.batch_size", self.batch_size as u64)?;
        positive("worker.batch_wait_ms", self.batch_wait_ms)?;
        positive("worker.status_consumers", self.status_consumers as u64)?;
        if self.status_consumers > 16 {
            return Err(ConfigError::new("worker.status_consumers", "must be at most 16"));
        }
        positive("worker.event_batch_size", self.event_batch_size.into())?;
        positive("worker.event_poll_interval_ms", self.event_poll_interval_ms)
    }
}

/// Signed webhooks to send jobs' callback URLs.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WebhookSettings {
    /// `whsec_…` secrets; every webhook is signed with each (first the newest), so a receiver
    /// keeps verifying while a secret is rotated. None: callbacks are not delivered (each
    /// is dead-lettered with that reason, and the worker warns at start).
    #[serde(default, deserialize_with = "de::secret_list", serialize_with = "redact::secret_list")]
    pub secrets: Vec<SecretString>,
    /// One attempt's whole time (connect, TLS, request, answer).
    pub timeout_ms: u64,
    /// Webhooks in flight at once in one worker (also its prefetch on the webhook queue).
    pub concurrency: u16,
    /// Of those, at most this many to one endpoint (scheme, host and port): a slow receiver
    /// cannot take every slot. Past it a webhook waits a short while, then goes round the
    /// first rung of the retry ladder without using an attempt.
    pub per_endpoint_concurrency: u16,
    /// Whether callback URLs may reach loopback, private, link-local and other non-public
    /// addresses (checked on every address a name resolves to).
    pub allow_private_addresses: bool,
}

impl WebhookSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        for secret in &self.secrets {
            crate::webhook::SigningKey::parse(secret.expose_secret())
                .map_err(|e| ConfigError::new("webhooks.secrets", format!("every secret {e}")))?;
        }
        positive("webhooks.timeout_ms", self.timeout_ms)?;
        positive("webhooks.concurrency", self.concurrency.into())?;
        positive("webhooks.per_endpoint_concurrency", self.per_endpoint_concurrency.into())?;
        if self.per_endpoint_concurrency > self.concurrency {
            return Err(ConfigError::new("webhooks.per_endpoint_concurrency", "must not exceed webhooks.concurrency"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ApiSettings {
    #[serde(default, deserialize_with = "de::secret_list", serialize_with = "redact::secret_list")]
    pub tokens: Vec<SecretString>,
    /// Tokens that may also read full phone numbers (others see them masked).
    #[serde(default, deserialize_with = "de::secret_list", serialize_with = "redact::secret_list")]
    pub full_read_tokens: Vec<SecretString>,
    pub rate_per_second: u32,
    pub burst: u32,
    /// A callback URL for the send requests of one token that name none.
    #[serde(default)]
    pub default_callbacks: Vec<DefaultCallback>,
}

/// `[[api.default_callbacks]]`: the callback URL of a token's send requests without one.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DefaultCallback {
    /// One of `api.tokens` or `api.full_read_tokens`.
    #[serde(deserialize_with = "de::secret", serialize_with = "redact::secret")]
    pub token: SecretString,
    #[serde(deserialize_with = "de::string")]
    pub url: String,
}

impl ApiSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.tokens.iter().any(|t| t.expose_secret().len() < 16) {
            return Err(ConfigError::new("api.tokens", "every token must be at least 16 characters"));
        }
        if self.full_read_tokens.iter().any(|t| t.expose_secret().len() < 16) {
            return Err(ConfigError::new("api.full_read_tokens", "every token must be at least 16 characters"));
        }
        positive("api.rate_per_second", self.rate_per_second.into())?;
        positive("api.burst", self.burst.into())?;
        let known = |token: &SecretString| {
            self.tokens.iter().chain(&self.full_read_tokens).any(|t| t.expose_secret() == token.expose_secret())
        };
        for (i, default) in self.default_callbacks.iter().enumerate() {
            let key = format!("api.default_callbacks[{i}]");
            if !known(&default.token) {
                return Err(ConfigError::new(
                    format!("{key}.token"),
                    "must be one of api.tokens or api.full_read_tokens",
                ));
            }
            crate::domain::send::check_callback(&default.url)
                .map_err(|e| ConfigError::new(format!("{key}.url"), e.message))?;
        }
        let mut tokens: Vec<&str> = self.default_callbacks.iter().map(|d| d.token.expose_secret()).collect();
        tokens.sort_unstable();
        if tokens.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::new("api.default_callbacks", "names a token twice"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryGuarantee {
    AtMostOnce,
    AtLeastOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SendingSettings {
    pub sender_rate_per_second: f64,
    pub sender_burst: u32,
    pub concurrency: u16,
    pub in_process_retries: usize,
    pub retry_statuses: Vec<u16>,
    pub delivery: DeliveryGuarantee,
}

impl SendingSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.sender_rate_per_second.is_nan() || self.sender_rate_per_second <= 0.0 {
            return Err(ConfigError::new("sending.sender_rate_per_second", "must be greater than 0"));
        }
        positive("sending.sender_burst", self.sender_burst.into())?;
        positive("sending.concurrency", self.concurrency.into())?;
        if let Some(code) = self.retry_statuses.iter().find(|c| !(*c == &429 || (500..=599).contains(*c))) {
            return Err(ConfigError::new(
                "sending.retry_statuses",
                format!("{code} cannot be retried safely: only 429 and 5xx are allowed"),
            ));
        }
        Ok(())
    }
}

/// The ingress's settings tree.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IngressSettings {
    pub http: HttpSettings,
    pub api: ApiSettings,
    pub amqp: AmqpSettings,
    /// The status API's reads and the operator's opt-out changes; callbacks never wait on it.
    pub database: DatabaseSettings,
    pub plivo: PlivoSettings,
    pub telemetry: TelemetrySettings,
}

impl Validate for IngressSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.http.validate()?;
        self.api.validate()?;
        self.amqp.validate()?;
        self.database.validate()?;
        self.plivo.validate()?;
        self.telemetry.validate()
    }
}

/// The worker's settings tree.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerSettings {
    pub worker: WorkerTuning,
    pub sending: SendingSettings,
    pub webhooks: WebhookSettings,
    pub http: CallbackUrlSettings,
    pub amqp: AmqpSettings,
    pub database: DatabaseSettings,
    pub plivo: PlivoSettings,
    pub telemetry: TelemetrySettings,
}

impl Validate for WorkerSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        self.worker.validate()?;
        self.sending.validate()?;
        self.webhooks.validate()?;
        self.http.validate()?;
        self.amqp.validate()?;
        self.database.validate()?;
        self.plivo.validate()?;
        // Each status consumer holds a connection while it writes, and the event relay keeps one
        // for its notifications: with fewer, batches would wait on the pool.
        let needed = self.worker.status_consumers as u64 + 2;
        if u64::from(self.database.max_connections) < needed {
            return Err(ConfigError::new(
                "database.max_connections",
                format!("must be at least worker.status_consumers + 2 ({needed}) in the worker"),
            ));
        }
        // The worker sends: without the account id every send would go to `/v1/Account//Message/`.
        if self.plivo.auth_id.trim().is_empty() {
            return Err(ConfigError::new(
                "plivo.auth_id",
                "is required by the worker (your Plivo Auth ID, MA… or SA…): set SMSFLOW_PLIVO__AUTH_ID or \
                 SMSFLOW_PLIVO__AUTH_ID_FILE, or `plivo.auth_id` in the config file",
            ));
        }
        self.telemetry.validate()
    }
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 { Err(ConfigError::new(key, "must be greater than 0")) } else { Ok(()) }
}

fn validate_base_url(key: &str, value: &str) -> Result<(), ConfigError> {
    let rest = value
        .strip_prefix("https://")
        .or_else(|| value.strip_prefix("http://"))
        .ok_or_else(|| ConfigError::new(key, format!("must start with http:// or https:// (got {value:?})")))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(ConfigError::new(key, "must name a host"));
    }
    if value.ends_with('/') || value.contains(['?', '#']) {
        return Err(ConfigError::new(key, "must not end with '/' or carry a query or fragment"));
    }
    Ok(())
}

/// Deserializers that accept any scalar where a string is expected: figment types environment
/// values, so `SMSFLOW_PLIVO__AUTH_TOKEN=12345` arrives as a number.
pub mod de {
    use secrecy::SecretString;
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        U(u64),
        I(i64),
        F(f64),
        B(bool),
    }

    impl Scalar {
        fn into_string(self) -> String {
            match self {
                Scalar::S(s) => s,
                Scalar::U(n) => n.to_string(),
                Scalar::I(n) => n.to_string(),
                Scalar::F(n) => n.to_string(),
                Scalar::B(b) => b.to_string(),
            }
        }
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(Scalar::deserialize(d)?.into_string())
    }

    pub fn secret<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
        Ok(SecretString::from(string(d)?))
    }

    pub fn opt_secret<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SecretString>, D::Error> {
        Ok(Option::<Scalar>::deserialize(d)?.map(|s| SecretString::from(s.into_string())))
    }

    /// A list, or one comma-separated string (convenient in an environment variable).
    pub fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum ListOrOne {
            List(Vec<Scalar>),
            One(Scalar),
        }
        let items: Vec<String> = match ListOrOne::deserialize(d)? {
            ListOrOne::List(items) => items.into_iter().map(Scalar::into_string).collect(),
            ListOrOne::One(one) => {
                one.into_string().split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
            }
        };
        Ok(items.into_iter().map(SecretString::from).collect())
    }
}
