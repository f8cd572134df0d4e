//! The callbacks' HTTP client: one plain HTTP/1.1 keep-alive connection per simulated Plivo
//! connection, sending requests built before the clock starts.
//!
//! The generator shares the two cores with the system it measures, so its own cost per request
//! is taken from the service: through reqwest it cost 42–55 µs of CPU per request here (pool
//! checkout, URL and header parsing, a timer, redirect handling), wrk ~15 µs. A bare hyper
//! connection sending pre-built requests costs ~27 µs.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use shared::plivo::signature::SignedCallback;
use tokio::net::TcpStream;

/// Longest wait for one answer: a service that stops answering fails the run instead of
/// hanging it.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `--ingress` points: the address to connect to, the `Host` header, and the path prefix.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` (the scheme's port when none is given): where to connect.
    pub address: String,
    /// `host` or `host:port`, as the URL gave it: the `Host` header.
    pub host: String,
    /// The URL's path without its trailing slash ("" for the root).
    pub base_path: String,
    /// `http://`: the only scheme this client speaks (pre-signed files for wrk may be https).
    pub plain_http: bool,
}

impl Target {
    pub fn parse(ingress: &str) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(ingress)?;
        anyhow::ensure!(matches!(url.scheme(), "http" | "https"), "--ingress must be an http:// or https:// URL");
        anyhow::ensure!(url.query().is_none(), "--ingress must not have a query");
        let name = url.host_str().ok_or_else(|| anyhow::anyhow!("--ingress has no host"))?;
        let port = url.port_or_known_default().unwrap_or(80);
        Ok(Self {
            address: format!("{name}:{port}"),
            host: url.port().map_or_else(|| name.to_owned(), |port| format!("{name}:{port}")),
            base_path: url.path().trim_end_matches('/').to_owned(),
            plain_http: url.scheme() == "http",
        })
    }

    /// The status callback route under this target.
    pub fn callback_path(&self) -> String {
        format!("{}/plivo/callback", self.base_path)
    }
}

/// A signed callback as the parts of an HTTP request, shared by every send of it.
pub struct PreparedRequest {
    path: Uri,
    host: HeaderValue,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl PreparedRequest {
    pub fn new(target: &Target, signed: &SignedCallback) -> anyhow::Result<Self> {
        let headers = signed
            .wire_headers()
            .map(|(name, value)| Ok((HeaderName::from_bytes(name.as_bytes())?, HeaderValue::from_str(value)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            path: target.callback_path().parse()?,
            host: HeaderValue::from_str(&target.host)?,
            headers,
            body: Bytes::from(signed.form.clone().unwrap_or_default()),
        })
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let mut request =
            Request::post(self.path.clone()).body(Full::new(self.body.clone())).expect("a request from valid parts");
        let headers = request.headers_mut();
        headers.reserve(self.headers.len() + 1);
        headers.insert(HOST, self.host.clone());
        for (name, value) in &self.headers {
            headers.insert(name.clone(), value.clone());
        }
        request
    }
}

/// One keep-alive connection, opened on first use and again whenever the service closed it.
pub struct Connection {
    address: String,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    pub fn new(target: &Target) -> anyhow::Result<Self> {
        anyhow::ensure!(
            target.plain_http,
            "smsflow-loadgen callbacks speaks plain http:// (point --ingress at the ingress itself, not a TLS terminator)"
        );
        Ok(Self { address: target.address.clone(), sender: None })
    }

    /// Sends `prepared` and reads the whole answer; its status. A request the connection
    /// closed before sending (an idle keep-alive the service had just cut) goes once more on a
    /// new connection, as an HTTP client's pool does; any other failure is the caller's error.
    pub async fn send(&mut self, prepared: &PreparedRequest) -> anyhow::Result<StatusCode> {
        tokio::time::timeout(ANSWER_TIMEOUT, self.send_within(prepared))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {ANSWER_TIMEOUT:?}"))?
    }

    async fn send_within(&mut self, prepared: &PreparedRequest) -> anyhow::Result<StatusCode> {
        let mut request = prepared.request();
        for attempt in 0..2 {
            let sender = match &mut self.sender {
                Some(sender) if !sender.is_closed() => sender,
                _ => self.sender.insert(connect(&self.address).await?),
            };
            if sender.ready().await.is_err() {
                self.sender = None;
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let status = response.status();
                    response.into_body().collect().await?;
                    return Ok(status);
                }
                Err(mut error) => {
                    self.sender = None;
                    match error.take_message() {
                        Some(unsent) if attempt == 0 => request = unsent,
                        _ => return Err(error.into_error().into()),
                    }
                }
            }
        }
        anyhow::bail!("the connection to {} closed twice before the request went", self.address)
    }
}

async fn connect(address: &str) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    // The connection's I/O runs beside the requests; it ends when the sender is dropped or the
    // service closes it (the next send then reconnects).
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
