//! The client side of the `moorline` command: `sessions list|new|get|rm|restart`, `projects` and
//! `instances` over REST; `approve`/`deny`, which answer a pending approval over the session's
//! WebSocket in its dialect; and `attach`, a websocat for moorline that is usable in pipes, with
//! a human mode for pi RPC sessions on a terminal. Both speak to a server's TCP port
//! (`http://`, `https://`) or to its Unix socket (`unix:/run/moorline/moorline.sock`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::config::{Secret, read_token_file};
use crate::wire::{
    Activity, ApprovalResolved, ConversationRequest, CreateSession, Decision, DeletedKeptWorktree,
    InstanceSummary, NewProject, Project, Restart, SessionEvent, SessionSummary,
};
use moorline_adapters::pipeline::{answer_request, request_tool};

/// For programs that use this client (the load generator, the tests): ring as the process's
/// TLS provider, which the HTTP client needs even for `http://`.
pub use crate::tls::install_provider as install_tls_provider;

/// No request body (`call` with nothing to send).
const NO_BODY: Option<&()> = None;

/// How long `approve`/`deny` wait for the server to confirm an answer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);

/// A byte stream a WebSocket can run over (TCP or a Unix socket).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One line about a pending approval request: its id, its tool and what it asks.
pub fn describe_request(request: &Value) -> String {
    let id = answer_request(request, Decision::Deny, "").map_or_else(|| "?".into(), |(id, _)| id);
    let tool = request_tool(request).unwrap_or_else(|| "?".into());
    // What the agent wants to do: pi's dialog text, Claude's tool input, Codex's command.
    let what = [
        &request["message"],
        &request["request"]["input"]["command"],
        &request["params"]["command"],
        &request["request"]["input"],
    ]
    .into_iter()
    .find(|v| !v.is_null())
    .map(|v| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
    .unwrap_or_default();
    let what: String = what.chars().take(120).collect();
    format!("{id}\t{tool}\t{what}")
}

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
        // For `https://` URLs, such as a server on another machine behind `tailscale serve`.
        let tls = crate::tls::client_config()
            .map_err(|e| ClientError::Other(format!("cannot set up TLS: {e}")))?;
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

    /// Sends a request with an optional JSON body; returns the response body (empty for 204).
    async fn call<B: serde::Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(b) = body {
            req = req.json(b);
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
        Ok(text)
    }

    /// [`Self::call`], its body read as a `T`.
    async fn call_json<T: serde::de::DeserializeOwned, B: serde::Serialize + ?Sized>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let text = self.call(method, path, body).await?;
        serde_json::from_str(&text)
            .map_err(|e| ClientError::Other(format!("unexpected response: {e}")))
    }

    /// `GET path`, its body read as a `T`.
    async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call_json(reqwest::Method::GET, path, NO_BODY).await
    }

    /// `GET /sessions`.
    pub async fn list(&self) -> Result<Vec<SessionSummary>, ClientError> {
        self.get_json("/sessions").await
    }

    /// `POST /sessions`.
    pub async fn create(&self, body: &CreateSession) -> Result<SessionSummary, ClientError> {
        self.call_json(reqwest::Method::POST, "/sessions", Some(body))
            .await
    }

    /// Opens `GET /events` (server-sent events), resuming after `last_id` if given; the
    /// response streams until the server ends it. See [`crate::watch`].
    pub async fn events(&self, last_id: Option<&str>) -> Result<reqwest::Response, ClientError> {
        let mut req = self
            .http
            .get(format!("{}/events", self.base))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.expose());
        }
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.map_err(|e| ClientError::Unreachable {
            url: self.shown.clone(),
            reason: error_chain(&e),
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(ClientError::Http {
                status: status.as_u16(),
                body: body.trim_end().to_owned(),
            });
        }
        Ok(resp)
    }

    /// `GET /instances`.
    pub async fn instances(&self) -> Result<Vec<InstanceSummary>, ClientError> {
        self.get_json("/instances").await
    }

    /// Answers a pending approval request of session `id`: `request` names it (its id), or,
    /// when `None`, the only one pending. The answer is sent over the session's WebSocket in
    /// the session's dialect; returns the server's `amarre.approval_resolved` for it (which
    /// says who settled it: another client may have been first).
    pub async fn answer(
        &self,
        id: &str,
        request: Option<&str>,
        decision: Decision,
        message: Option<&str>,
    ) -> Result<ApprovalResolved, ClientError> {
        let pending = self.get(id).await?.pending_approvals;
        let described = |list: &[Value]| {
            list.iter()
                .map(describe_request)
                .collect::<Vec<_>>()
                .join("\n")
        };
        let chosen = match request {
            Some(want) => pending
                .iter()
                .find(|r| {
                    answer_request(r, decision, "")
                        .is_some_and(|(rid, _)| rid == want || rid.trim_matches('"') == want)
                })
                .ok_or_else(|| {
                    ClientError::Other(if pending.is_empty() {
                        format!("session {id} has no pending approval")
                    } else {
                        format!(
                            "session {id} has no pending approval {want:?}; pending:\n{}",
                            described(&pending)
                        )
                    })
                })?,
            None => match pending.as_slice() {
                [one] => one,
                [] => {
                    return Err(ClientError::Other(format!(
                        "session {id} has no pending approval"
                    )));
                }
                many => {
                    return Err(ClientError::Other(format!(
                        "session {id} has {} pending approvals; name one:\n{}",
                        many.len(),
                        described(many)
                    )));
                }
            },
        };
        let reason = message.unwrap_or("denied by a person (moorline deny)");
        let Some((request_id, line)) = answer_request(chosen, decision, reason) else {
            return Err(ClientError::Other(format!(
                "not an approval request: {chosen}"
            )));
        };
        let mut socket = self.connect(id, "", None).await?;
        socket
            .send(Message::text(line.to_string()))
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        // The server settles the first answer and tells every client how: wait for that.
        let resolved = tokio::time::timeout(ANSWER_WAIT, async {
            while let Some(frame) = socket.next().await {
                match frame {
                    Ok(Message::Text(t)) => {
                        let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                            continue;
                        };
                        if v["type"] != ApprovalResolved::TYPE || v["id"] != request_id.as_str() {
                            continue;
                        }
                        return serde_json::from_value::<ApprovalResolved>(v).map_err(|e| {
                            ClientError::Other(format!("unexpected approval_resolved frame: {e}"))
                        });
                    }
                    Ok(Message::Close(frame)) => {
                        let code = frame.map_or(1005, |f| u16::from(f.code));
                        return Err(ClientError::Closed(format!(
                            "{code} before the answer was settled"
                        )));
                    }
                    Ok(_) => {}
                    Err(e) => return Err(ClientError::Closed(e.to_string())),
                }
            }
            Err(ClientError::Closed("connection lost".into()))
        })
        .await
        .map_err(|_| {
            ClientError::Other(format!(
                "the server did not confirm the answer to {request_id} within {}s",
                ANSWER_WAIT.as_secs()
            ))
        })??;
        let _ = socket.send(Message::Close(None)).await;
        Ok(resolved)
    }

    /// Opens the WebSocket of session `id` with `query` (`since=N&hello=1`, or empty), over
    /// TCP, TLS or the Unix socket as the URL says. A refused upgrade is the server's answer,
    /// as for REST.
    async fn connect(
        &self,
        id: &str,
        query: &str,
        config: Option<WebSocketConfig>,
    ) -> Result<WebSocketStream<tokio_tungstenite::MaybeTlsStream<Box<dyn Stream>>>, ClientError>
    {
        let mut url = format!(
            "{}/sessions/{id}",
            self.base
                .replacen("http://", "ws://", 1)
                .replacen("https://", "wss://", 1)
        );
        if !query.is_empty() {
            url = format!("{url}?{query}");
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
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.shown.clone(),
            reason,
        };
        let stream: Box<dyn Stream> = match &self.unix {
            Some(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?,
            ),
            None => {
                let uri = request.uri();
                let host = uri.host().unwrap_or("localhost").trim_matches(['[', ']']);
                let port = uri
                    .port_u16()
                    .unwrap_or(if uri.scheme_str() == Some("wss") {
                        443
                    } else {
                        80
                    });
                Box::new(
                    tokio::net::TcpStream::connect((host, port))
                        .await
                        .map_err(|e| unreachable(e.to_string()))?,
                )
            }
        };
        let (socket, _) = tokio_tungstenite::client_async_tls_with_config(
            request,
            stream,
            config,
            Some(tokio_tungstenite::Connector::Rustls(self.tls.clone())),
        )
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(resp) => ClientError::Http {
                status: resp.status().as_u16(),
                body: resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).trim_end().to_owned())
                    .unwrap_or_default(),
            },
            other => unreachable(other.to_string()),
        })?;
        Ok(socket)
    }

    /// `GET /sessions/{id}`.
    pub async fn get(&self, id: &str) -> Result<SessionSummary, ClientError> {
        self.get_json(&format!("/sessions/{id}")).await
    }

    /// `DELETE /sessions/{id}`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.delete_with(id, false).await.map(drop)
    }

    /// `DELETE /sessions/{id}` (`force`: `?force=1`, its worktree goes even with work in it);
    /// the server's answer when it kept the session's worktree.
    pub async fn delete_with(
        &self,
        id: &str,
        force: bool,
    ) -> Result<Option<DeletedKeptWorktree>, ClientError> {
        let query = if force { "?force=1" } else { "" };
        let text = self
            .call(
                reqwest::Method::DELETE,
                &format!("/sessions/{id}{query}"),
                NO_BODY,
            )
            .await?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClientError::Other(format!("unexpected response: {e}")))
    }

    /// `GET /projects`.
    pub async fn projects(&self) -> Result<Vec<Project>, ClientError> {
        self.get_json("/projects").await
    }

    /// `POST /projects`.
    pub async fn add_project(&self, body: &NewProject) -> Result<Project, ClientError> {
        self.call_json(reqwest::Method::POST, "/projects", Some(body))
            .await
    }

    /// `DELETE /projects/{id}`.
    pub async fn remove_project(&self, id: &str) -> Result<(), ClientError> {
        self.call(reqwest::Method::DELETE, &format!("/projects/{id}"), NO_BODY)
            .await
            .map(drop)
    }

    /// `POST /sessions/{id}/restart`, continuing the agent's conversation unless
    /// `new_conversation`.
    pub async fn restart(
        &self,
        id: &str,
        new_conversation: bool,
    ) -> Result<SessionSummary, ClientError> {
        let body = Restart {
            conversation: Some(if new_conversation {
                ConversationRequest::New
            } else {
                ConversationRequest::Resume
            }),
        };
        self.call_json(
            reqwest::Method::POST,
            &format!("/sessions/{id}/restart"),
            Some(&body),
        )
        .await
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
        render: bool,
    ) -> Result<(), ClientError> {
        let render = render && self.renders(id).await?;
        let mut query = Vec::new();
        if let Some(s) = since {
            query.push(format!("since={s}"));
        }
        if hello {
            query.push("hello=1".to_owned());
        }
        // Frames as long as the agent's lines: the server bounds them.
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let socket = self.connect(id, &query.join("&"), Some(config)).await?;
        if render {
            // Human mode for the pi RPC dialect: streamed text joined, tool calls and results
            // summarised, approvals asked inline (y/n), typed lines sent as prompts.
            pipe(socket, linger, &mut Renderer::default()).await
        } else {
            pipe(socket, linger, &mut Raw).await
        }
    }
}

/// What `attach` makes of typed lines and of the frames it receives: the lines themselves
/// (raw JSON, one per line) or, for people, [`Renderer`]'s view of the pi RPC dialect.
trait View {
    /// For a typed line: what to send (if anything) and a note to print.
    fn typed(&mut self, line: &str) -> (Option<String>, Option<String>);
    /// What to print for a received text frame (empty: nothing).
    fn received(&mut self, text: &str) -> String;
    /// What to print when the connection closes, and whether to say on stderr that it closed.
    fn closing(&self) -> (&'static str, bool);
}

/// Frames and typed lines as they are, for pipes and scripts.
struct Raw;

impl View for Raw {
    fn typed(&mut self, line: &str) -> (Option<String>, Option<String>) {
        (Some(line.to_owned()), None)
    }

    fn received(&mut self, text: &str) -> String {
        format!("{text}\n")
    }

    fn closing(&self) -> (&'static str, bool) {
        ("", true)
    }
}

impl View for Renderer {
    fn typed(&mut self, line: &str) -> (Option<String>, Option<String>) {
        Renderer::typed(self, line)
    }

    fn received(&mut self, text: &str) -> String {
        serde_json::from_str::<Value>(text).map_or_else(|_| String::new(), |v| self.frame(&v))
    }

    fn closing(&self) -> (&'static str, bool) {
        (if self.in_text { "\n" } else { "" }, false)
    }
}

/// Pipes stdin lines to `socket` and its frames to stdout through `view` (see
/// [`Client::attach`]). The end of input ends the connection, like websocat (the server's
/// close answers ours), unless `linger` asks to wait that long for more output.
async fn pipe<S: AsyncRead + AsyncWrite + Unpin>(
    socket: WebSocketStream<S>,
    linger: Option<Duration>,
    view: &mut dyn View,
) -> Result<(), ClientError> {
    let (mut sink, mut stream) = socket.split();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    let mut stdin_open = true;
    let out_err = |e: std::io::Error| ClientError::Other(e.to_string());
    let closed = |e: tungstenite::Error| ClientError::Closed(e.to_string());
    loop {
        let idle = async {
            match (stdin_open, linger) {
                (false, Some(d)) => tokio::time::sleep(d).await,
                _ => std::future::pending().await,
            }
        };
        let print = tokio::select! {
            line = stdin.next_line(), if stdin_open => match line {
                Ok(Some(line)) => {
                    let (send, note) = view.typed(&line);
                    if let Some(note) = note {
                        stdout.write_all(note.as_bytes()).await.map_err(out_err)?;
                        stdout.flush().await.map_err(out_err)?;
                    }
                    if let Some(send) = send {
                        sink.send(Message::text(send)).await.map_err(closed)?;
                    }
                    String::new()
                }
                Ok(None) | Err(_) => {
                    stdin_open = false;
                    if linger.is_none() {
                        let _ = sink.send(normal_close()).await;
                    }
                    String::new()
                }
            },
            frame = stream.next() => match frame {
                Some(Ok(Message::Text(t))) => view.received(t.as_str()),
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map_or((1005, String::new()), |f| {
                        (u16::from(f.code), f.reason.to_string())
                    });
                    let (last, announce) = view.closing();
                    let _ = stdout.write_all(last.as_bytes()).await;
                    // An error close is reported once, by the caller that prints the error.
                    if code != 1000 {
                        return Err(ClientError::Closed(format!("{code} {reason}")));
                    }
                    if announce {
                        eprintln!("moorline: connection closed: {code} {reason}");
                    }
                    return Ok(());
                }
                Some(Ok(_)) => String::new(),
                Some(Err(e)) => return Err(closed(e)),
                None => return Err(ClientError::Closed("connection lost".into())),
            },
            () = idle => {
                let _ = sink.send(Message::Close(None)).await;
                return Ok(());
            }
        };
        if !print.is_empty() {
            stdout.write_all(print.as_bytes()).await.map_err(out_err)?;
            stdout.flush().await.map_err(out_err)?;
        }
    }
}

impl Client {
    /// Whether session `id` speaks the pi RPC dialect, the one `--render` knows (says so on
    /// stderr when it does not).
    async fn renders(&self, id: &str) -> Result<bool, ClientError> {
        let summary = self.get(id).await?;
        let instances = self.instances().await?;
        let dialect = instances
            .into_iter()
            .find(|i| i.id == summary.instance_id)
            .map_or_else(|| "pi-rpc".to_owned(), |i| i.dialect);
        if dialect != "pi-rpc" {
            eprintln!("moorline: the session speaks the {dialect} dialect; showing raw JSON");
        }
        Ok(dialect == "pi-rpc")
    }
}

/// A close with code 1000, which the server answers in kind (a close without a code would be
/// answered with 1005, taken for an error).
fn normal_close() -> Message {
    Message::Close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "".into(),
    }))
}

/// What the human mode shows of pi RPC frames, and what it makes of typed lines.
#[derive(Debug, Default)]
pub struct Renderer {
    /// Streamed text is being printed: the line is not finished.
    in_text: bool,
    /// A turn is running (typed lines are queued as follow-ups, which every agent accepts).
    turn_open: bool,
    /// Confirmations asked and not yet settled, oldest first: `y`/`n` answers the first.
    asks: std::collections::VecDeque<Value>,
}

impl Renderer {
    /// The text to print for `frame` (empty: nothing).
    pub fn frame(&mut self, v: &Value) -> String {
        let kind = v["type"].as_str().unwrap_or("");
        let event = &v["assistantMessageEvent"];
        if kind == "message_update" {
            if event["type"] == "text_delta" {
                self.in_text = true;
                return event["delta"].as_str().unwrap_or("").to_owned();
            }
            return String::new();
        }
        let line = match kind {
            "agent_start" => {
                self.turn_open = true;
                return String::new();
            }
            "agent_end" => {
                self.turn_open = false;
                if v["error"].is_string() {
                    format!("! {}", v["error"].as_str().unwrap_or(""))
                } else {
                    return self.end_text();
                }
            }
            "message_end" => return self.end_text(),
            "tool_execution_start" => format!(
                "> {} {}",
                v["toolName"].as_str().unwrap_or("tool"),
                short(&summary_of_args(&v["args"]), 100)
            ),
            "tool_execution_end" => {
                let text = result_text(&v["result"]);
                let lines = text.lines().count();
                let mark = if v["isError"] == true {
                    "failed"
                } else {
                    "done"
                };
                format!(
                    "  {} {mark}: {} ({lines} line{})",
                    v["toolName"].as_str().unwrap_or("tool"),
                    short(text.lines().next().unwrap_or(""), 80),
                    if lines == 1 { "" } else { "s" }
                )
            }
            "extension_ui_request" => match v["method"].as_str() {
                Some("confirm") => {
                    self.asks.push_back(v.clone());
                    format!(
                        "? {} {} [y/n]",
                        v["title"].as_str().unwrap_or("Allow?"),
                        v["message"].as_str().unwrap_or("")
                    )
                }
                Some("notify") => format!("· {}", v["message"].as_str().unwrap_or("")),
                Some("select" | "input" | "editor") => format!(
                    "? {} (answer with an extension_ui_response JSON line)",
                    v["title"].as_str().unwrap_or("")
                ),
                _ => return String::new(),
            },
            ApprovalResolved::TYPE => {
                let Ok(r) = ApprovalResolved::deserialize(v) else {
                    return String::new();
                };
                self.asks.retain(|a| {
                    answer_request(a, Decision::Deny, "").is_none_or(|(q, _)| q != r.id)
                });
                let who = r.user.as_deref().unwrap_or(&r.by);
                format!("  {} {} ({who})", r.decision.as_str(), r.id)
            }
            "auto_retry_start" => format!(
                "… retrying ({}/{}): {}",
                v["attempt"],
                v["maxAttempts"],
                v["errorMessage"].as_str().unwrap_or("")
            ),
            "amarre.auth_failed" | "amarre.input_rejected" => format!(
                "! {}",
                v["message"]
                    .as_str()
                    .or(v["error"].as_str())
                    .or(v["reason"].as_str())
                    .unwrap_or(kind)
            ),
            "response" if v["success"] == false => format!(
                "! {}: {}",
                v["command"].as_str().unwrap_or("command"),
                v["error"].as_str().unwrap_or("failed")
            ),
            "amarre.line_dropped" => format!(
                "! an output line was dropped ({})",
                v["reason"].as_str().unwrap_or("?")
            ),
            "amarre.session_event" => match SessionEvent::deserialize(v) {
                Ok(e) => format!(
                    "[agent {}{}]",
                    e.event,
                    e.exit_code
                        .map(|c| format!(", exit code {c}"))
                        .or_else(|| e.signal.map(|s| format!(", {s}")))
                        .unwrap_or_default()
                ),
                Err(_) => "[agent ended]".to_owned(),
            },
            _ => return String::new(),
        };
        let mut out = self.end_text();
        out.push_str(&line);
        out.push('\n');
        out
    }

    /// A newline if streamed text is open.
    fn end_text(&mut self) -> String {
        if std::mem::take(&mut self.in_text) {
            "\n".into()
        } else {
            String::new()
        }
    }

    /// What to send for a typed line, and a note to print.
    pub fn typed(&mut self, line: &str) -> (Option<String>, Option<String>) {
        let text = line.trim();
        if text.is_empty() {
            return (None, None);
        }
        if let Some(ask) = self.asks.front() {
            let decision = match text.to_ascii_lowercase().as_str() {
                "y" | "yes" => Decision::Allow,
                "n" | "no" => Decision::Deny,
                _ => {
                    return (None, Some("answer the question first: y or n\n".into()));
                }
            };
            let answer = answer_request(ask, decision, "denied from moorline attach");
            self.asks.pop_front();
            return (answer.map(|(_, a)| a.to_string()), None);
        }
        if text.starts_with('{') {
            return (Some(text.to_owned()), None);
        }
        let message = if text == "/abort" {
            json!({"type": "abort"})
        } else if self.turn_open {
            json!({"type": "follow_up", "message": text})
        } else {
            json!({"type": "prompt", "message": text})
        };
        (Some(message.to_string()), None)
    }
}

/// The gist of a tool call's arguments: its command or path, else its JSON.
fn summary_of_args(args: &Value) -> String {
    ["command", "path", "file_path", "pattern", "url"]
        .iter()
        .find_map(|k| args[k].as_str())
        .map_or_else(|| args.to_string(), str::to_owned)
}

/// The text of a tool result (pi's `content` blocks, or a plain string).
fn result_text(result: &Value) -> String {
    match result {
        Value::String(s) => s.clone(),
        _ => result["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

/// At most `n` characters of `s`, on one line.
fn short(s: &str, n: usize) -> String {
    let one: String = s.replace('\n', " ");
    if one.chars().count() <= n {
        return one;
    }
    let mut cut: String = one.chars().take(n).collect();
    cut.push('…');
    cut
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

/// Renders the session list as a table: what a person needs to pick a session and see what
/// it is doing.
pub fn format_table(list: &[SessionSummary]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let mut rows = vec![
        [
            "ID",
            "NAME",
            "INSTANCE",
            "STATUS",
            "ACTIVITY",
            "APPROVALS",
            "AGE",
            "CWD",
        ]
        .map(str::to_owned),
    ];
    for s in list {
        let activity = match s.activity {
            Some(Activity::Waiting) => "waiting for approval",
            Some(Activity::Working) => "working",
            Some(Activity::Idle) => "idle",
            None => "-",
        };
        let mut status = s.status.as_str().to_owned();
        if s.auth_failed {
            status.push_str(" (credentials wrong)");
        }
        let age = match s.created_at {
            0 => "-".into(),
            t => format_age(now.saturating_sub(t)),
        };
        rows.push([
            s.id.clone(),
            s.name.clone().unwrap_or_else(|| "-".into()),
            s.instance_id.clone(),
            status,
            activity.to_owned(),
            s.pending_approvals.len().to_string(),
            age,
            s.cwd.display().to_string(),
        ]);
    }
    columns(&rows)
}

/// Renders `GET /instances` as a table, with the reason of each unavailable instance below it.
pub fn format_instances(list: &[InstanceSummary]) -> String {
    let mut rows = vec![
        [
            "ID",
            "AGENT",
            "DIALECT",
            "RUNTIME",
            "AVAILABLE",
            "WORKSPACE ROOTS",
        ]
        .map(str::to_owned),
    ];
    let mut reasons = String::new();
    for i in list {
        let roots: Vec<String> = i
            .workspace_roots
            .iter()
            .map(|r| r.display().to_string())
            .collect();
        rows.push([
            i.id.clone(),
            i.agent.clone(),
            i.dialect.clone(),
            i.runtime.clone(),
            if i.available { "yes" } else { "no" }.to_owned(),
            if roots.is_empty() {
                "-".to_owned()
            } else {
                roots.join(",")
            },
        ]);
        if !i.available {
            let reason = i.reason.as_deref().unwrap_or("-");
            reasons.push_str(&format!("{}: {reason}\n", i.id));
        }
    }
    let mut out = columns(&rows);
    if !reasons.is_empty() {
        out.push_str("\nunavailable:\n");
        out.push_str(&reasons);
    }
    out
}

/// Left-aligned columns, two spaces apart, the last one unpadded.
fn columns<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `42s`, `5m`, `3h`, `2d`.
fn format_age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_run_is_one_line_with_its_code_or_signal() {
        let end = |e: &SessionEvent| {
            let v = serde_json::to_value(e).expect("json");
            Renderer::default().frame(&v)
        };
        let mut e = SessionEvent {
            event: "exited".into(),
            exit_code: Some(0),
            signal: None,
            reason: None,
            error: None,
        };
        assert_eq!(end(&e), "[agent exited, exit code 0]\n");
        e.event = "crashed".into();
        e.exit_code = None;
        e.signal = Some("SIGKILL".into());
        assert_eq!(end(&e), "[agent crashed, SIGKILL]\n");
    }
}
