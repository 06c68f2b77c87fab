//! The client side of the `moorline` command: `sessions list|new|get|rm|restart` over REST and
//! `attach`, a websocat for moorline that is usable in pipes. Both speak to a server's TCP port
//! (`http://`, `https://`) or to its Unix socket (`unix:/run/moorline/moorline.sock`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::config::{Secret, read_token_file};

/// Exit code when the server cannot be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: i32 = 69;

/// A failed client command, with the exit code it should produce.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach moorline at {url}: {reason}")]
    Unreachable {
        /// Where we tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{status}: {body}")]
    Http {
        /// HTTP status.
        status: u16,
        /// Response body.
        body: String,
    },
    /// The WebSocket closed abnormally or with an error code.
    #[error("connection closed: {0}")]
    Closed(String),
    /// Anything else (bad arguments, local I/O).
    #[error("{0}")]
    Other(String),
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Unreachable { .. } => EXIT_UNAVAILABLE,
            _ => 1,
        }
    }
}

/// A REST client for one server.
#[derive(Debug, Clone)]
pub struct Client {
    /// The HTTP base of request URLs (`http://localhost` for a Unix socket).
    base: String,
    /// The server's address as the user gave it, for messages.
    shown: String,
    /// The server's Unix socket, when it is reached through one.
    unix: Option<PathBuf>,
    token: Option<Secret>,
    http: reqwest::Client,
    tls: Arc<rustls::ClientConfig>,
}

/// Makes ring the process's default TLS crypto provider (once; later calls do nothing), for
/// HTTP clients built without an explicit TLS configuration (reqwest refuses to build one
/// otherwise, even for `http://` use).
pub fn install_tls_provider() {
    // An error only means a provider is already installed, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// TLS for `https://` URLs, such as a server on another machine behind `tailscale serve`:
/// certificates are checked against the system's trusted roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` are honoured).
fn tls_config() -> Result<rustls::ClientConfig, ClientError> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map(|b| b.with_no_client_auth())
        .map_err(|e| ClientError::Other(format!("cannot set up TLS: {e}")))
}

impl Client {
    /// A client for the server at `base` (`http://127.0.0.1:8341`, or
    /// `unix:/run/moorline/moorline.sock` for its Unix socket), with the bearer token read from
    /// `token_file` if given.
    pub fn new(base: &str, token_file: Option<&Path>) -> Result<Self, ClientError> {
        let token = token_file
            .map(|path| {
                read_token_file(path).map_err(|e| ClientError::Other(format!("token file: {e}")))
            })
            .transpose()?;
        let tls = tls_config()?;
        let unix = base.strip_prefix("unix:").map(|path| {
            // `unix:///run/x.sock` and `unix:/run/x.sock` name the same socket.
            let path = path.strip_prefix("//").unwrap_or(path);
            PathBuf::from(path)
        });
        if let Some(path) = &unix
            && !path.is_absolute()
        {
            return Err(ClientError::Other(format!(
                "{base}: a unix: URL needs an absolute socket path (unix:/run/moorline/moorline.sock)"
            )));
        }
        let mut builder = reqwest::Client::builder().tls_backend_preconfigured(tls.clone());
        if let Some(path) = &unix {
            builder = builder.unix_socket(path.as_path());
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Other(e.to_string()))?;
        Ok(Self {
            base: if unix.is_some() {
                // Any name the server accepts in Host; loopback names always are.
                "http://localhost".to_owned()
            } else {
                base.trim_end_matches('/').to_owned()
            },
            shown: base.to_owned(),
            unix,
            token,
            http,
            tls: Arc::new(tls),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Option<Value>, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.shown.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?;
        if !status.is_success() {
            return Err(ClientError::Http {
                status: status.as_u16(),
                body: text.trim_end().to_owned(),
            });
        }
        if text.is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClientError::Other(format!("unexpected response: {e}")))
    }

    /// `GET /sessions`.
    pub async fn list(&self) -> Result<Value, ClientError> {
        Ok(self
            .call(reqwest::Method::GET, "/sessions", None)
            .await?
            .unwrap_or(Value::Null))
    }

    /// `POST /sessions`.
    pub async fn create(
        &self,
        instance: Option<String>,
        name: Option<String>,
        cwd: Option<String>,
        env: BTreeMap<String, String>,
    ) -> Result<Value, ClientError> {
        let mut body = serde_json::Map::new();
        if let Some(i) = instance {
            body.insert("instanceId".into(), i.into());
        }
        if let Some(n) = name {
            body.insert("name".into(), n.into());
        }
        if let Some(c) = cwd {
            body.insert("cwd".into(), c.into());
        }
        if !env.is_empty() {
            body.insert("env".into(), serde_json::to_value(env).unwrap_or_default());
        }
        Ok(self
            .call(
                reqwest::Method::POST,
                "/sessions",
                Some(Value::Object(body)),
            )
            .await?
            .unwrap_or(Value::Null))
    }

    /// `GET /sessions/{id}`.
    pub async fn get(&self, id: &str) -> Result<Value, ClientError> {
        Ok(self
            .call(reqwest::Method::GET, &format!("/sessions/{id}"), None)
            .await?
            .unwrap_or(Value::Null))
    }

    /// `DELETE /sessions/{id}`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.call(reqwest::Method::DELETE, &format!("/sessions/{id}"), None)
            .await?;
        Ok(())
    }

    /// `POST /sessions/{id}/restart`.
    pub async fn restart(&self, id: &str) -> Result<Value, ClientError> {
        Ok(self
            .call(
                reqwest::Method::POST,
                &format!("/sessions/{id}/restart"),
                None,
            )
            .await?
            .unwrap_or(Value::Null))
    }

    /// Connects to a session's WebSocket and pipes stdin lines to it and its frames to stdout,
    /// one per line, until the server closes the connection (or, with `linger`, until no frame
    /// arrived for that long after stdin ended).
    pub async fn attach(
        &self,
        id: &str,
        since: Option<u64>,
        hello: bool,
        linger: Option<Duration>,
    ) -> Result<(), ClientError> {
        let ws_base = self
            .base
            .replacen("http://", "ws://", 1)
            .replacen("https://", "wss://", 1);
        let mut query = Vec::new();
        if let Some(s) = since {
            query.push(format!("since={s}"));
        }
        if hello {
            query.push("hello=1".to_owned());
        }
        let mut url = format!("{ws_base}/sessions/{id}");
        if !query.is_empty() {
            url = format!("{url}?{}", query.join("&"));
        }
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| ClientError::Other(format!("bad URL {url}: {e}")))?;
        if let Some(t) = &self.token {
            let value = format!("Bearer {}", t.expose())
                .parse()
                .map_err(|_| ClientError::Other("token is not a valid header value".into()))?;
            request.headers_mut().insert("authorization", value);
        }
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let refused = |e: tungstenite::Error| match e {
            tungstenite::Error::Http(resp) => ClientError::Http {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim_end().to_owned())
                    .unwrap_or_default(),
            },
            other => ClientError::Unreachable {
                url: self.shown.clone(),
                reason: other.to_string(),
            },
        };
        match &self.unix {
            Some(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(|e| {
                    ClientError::Unreachable {
                        url: self.shown.clone(),
                        reason: e.to_string(),
                    }
                })?;
                let (socket, _) =
                    tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                        .await
                        .map_err(refused)?;
                pipe_stdio(socket, linger).await
            }
            None => {
                let (socket, _) = tokio_tungstenite::connect_async_tls_with_config(
                    request,
                    Some(config),
                    false,
                    Some(tokio_tungstenite::Connector::Rustls(self.tls.clone())),
                )
                .await
                .map_err(refused)?;
                pipe_stdio(socket, linger).await
            }
        }
    }
}

/// Pipes stdin lines to `socket` and its frames to stdout, one per line (see
/// [`Client::attach`]).
async fn pipe_stdio<S: AsyncRead + AsyncWrite + Unpin>(
    socket: WebSocketStream<S>,
    linger: Option<Duration>,
) -> Result<(), ClientError> {
    let (mut sink, mut stream) = socket.split();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut stdin_open = true;
    loop {
        let idle = async {
            match (stdin_open, linger) {
                (false, Some(d)) => tokio::time::sleep(d).await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    sink.send(Message::text(line)).await.map_err(|e| ClientError::Closed(e.to_string()))?;
                }
                Ok(None) | Err(_) => stdin_open = false,
            },
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(t))) => {
                    let mut out = t.as_bytes().to_vec();
                    out.push(b'\n');
                    stdout.write_all(&out).await.map_err(|e| ClientError::Other(e.to_string()))?;
                    stdout.flush().await.map_err(|e| ClientError::Other(e.to_string()))?;
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                    // An error close is reported once, by the caller that prints the error.
                    if code != 1000 {
                        return Err(ClientError::Closed(format!("{code} {reason}")));
                    }
                    eprintln!("moorline: connection closed: {code} {reason}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(ClientError::Closed(e.to_string())),
                None => return Err(ClientError::Closed("connection lost".into())),
            },
            () = idle => {
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
        }
    }
}

/// Formats an error with its causes (reqwest hides the useful part in `source`).
/// An error and its causes, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

/// Renders the session list as a table.
pub fn format_table(list: &Value) -> String {
    let mut out = String::from(
        "ID            NAME              INSTANCE      STATUS    AGENT         CLIENTS  SEQ\n",
    );
    for s in list.as_array().into_iter().flatten() {
        let field = |k: &str| match &s[k] {
            Value::String(v) => v.clone(),
            Value::Null => "-".into(),
            v => v.to_string(),
        };
        out.push_str(&format!(
            "{:<13} {:<17} {:<13} {:<9} {:<13} {:<8} {}\n",
            field("id"),
            field("name"),
            field("instanceId"),
            field("status"),
            field("agent"),
            field("clients"),
            field("lastSeq"),
        ));
    }
    out
}
