//! The REST control plane: the route table, its handlers, and the one error type that maps
//! every failure to amarre's status codes and bodies.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::projects::{NewProject, ProjectError};
use crate::security::{self, AccessPolicy, Identity, Via};
use crate::session::{ConversationRequest, CreateRequest, SessionError, SessionManager};
use crate::ws;

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The sessions.
    pub sessions: Arc<SessionManager>,
    /// Limits (client counts, frame sizes).
    pub limits: Arc<Limits>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server shuts down; WebSocket tasks watch it.
    pub shutdown: CancellationToken,
    /// Tracks WebSocket tasks, which axum's graceful shutdown does not wait for.
    pub tracker: TaskTracker,
}

/// The whole HTTP surface, for the listener `via`.
pub fn router(state: AppState, policy: Arc<AccessPolicy>, via: Via) -> Router {
    Router::new()
        .route("/", any(upgrade_required))
        .route("/healthz", get(healthz).fallback(not_found))
        .route("/me", get(me).fallback(not_found))
        .route("/metrics", get(metrics).fallback(not_found))
        .route("/instances", get(list_instances).fallback(not_found))
        .route(
            "/sessions",
            get(list_sessions).post(create_session).fallback(not_found),
        )
        .route("/sessions/{id}", any(session_route))
        .route(
            "/sessions/{id}/restart",
            post(restart_session).fallback(not_found),
        )
        .route(
            "/projects",
            get(list_projects).post(add_project).fallback(not_found),
        )
        .route(
            "/projects/{id}",
            axum::routing::delete(remove_project).fallback(not_found),
        )
        .route("/sessions/{id}/diff", get(session_diff).fallback(not_found))
        .route(
            "/sessions/{id}/files",
            get(session_files).fallback(not_found),
        )
        .route("/push/tokens", any(push_disabled))
        .route("/push/tokens/{*token}", any(push_disabled))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            security::Gate { policy, via },
            security::guard,
        ))
        .with_state(state)
}

/// The status and body of a project error.
fn project_error(e: &ProjectError) -> (StatusCode, Value) {
    let message = e.to_string();
    match e {
        ProjectError::NotFound(id) => (
            StatusCode::NOT_FOUND,
            json!({"error": "unknown_project", "project": id, "message": message}),
        ),
        ProjectError::Exists(id) => (
            StatusCode::CONFLICT,
            json!({"error": "project_exists", "project": id, "message": message}),
        ),
        ProjectError::Invalid { field, message } => (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_request", "field": field, "message": message}),
        ),
        ProjectError::BranchInUse(branch) => (
            StatusCode::CONFLICT,
            json!({"error": "branch_in_use", "branch": branch, "message": message}),
        ),
        ProjectError::Git(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "git_failed", "message": message}),
        ),
        ProjectError::Io(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "internal", "message": message}),
        ),
    }
}

/// Every way a request can fail, with amarre's status codes and bodies.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A project operation failed.
    #[error(transparent)]
    Project(#[from] ProjectError),
    /// A session operation failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// The request body is not valid JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// A field has the wrong type or value.
    #[error("{field}: {message}")]
    InvalidField {
        /// Which field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The `Host` header names a host this server does not answer to.
    #[error("host {0:?} is not allowed")]
    ForbiddenHost(String),
    /// The `Origin` header names an origin that is not allowed.
    #[error("origin {0:?} is not allowed")]
    ForbiddenOrigin(String),
    /// A token is required and was missing or wrong.
    #[error("missing or invalid bearer token")]
    Unauthorized,
    /// `allowed_users` (the server's, or an instance's) does not list this identity.
    #[error("{}", forbidden_user_message(user, instance.as_deref()))]
    ForbiddenUser {
        /// The identity refused.
        user: String,
        /// The instance whose `allowed_users` refused it; `None`: the server's.
        instance: Option<String>,
    },
}

fn forbidden_user_message(user: &str, instance: Option<&str>) -> String {
    match instance {
        Some(i) => format!("{user} is not allowed to use instance {i:?} (see its allowed_users)"),
        None => format!("{user} is not allowed to use this server (see allowed_users)"),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            ApiError::Session(e) => match e {
                SessionError::NotFound => (StatusCode::NOT_FOUND, json!({"error": "not_found"})),
                SessionError::UnknownInstance { id, known } => (
                    StatusCode::NOT_FOUND,
                    json!({
                        "error": "unknown_instance",
                        "instanceId": id,
                        "instances": known,
                        "message": e.to_string(),
                    }),
                ),
                SessionError::Credentials { instance, source } => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({
                        "error": "credentials_unavailable",
                        "instanceId": instance,
                        "path": source.path(),
                        "message": e.to_string(),
                    }),
                ),
                SessionError::MaxSessions { limit } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    json!({"error": "max_sessions_reached", "limit": limit}),
                ),
                SessionError::AlreadyRunning => {
                    (StatusCode::CONFLICT, json!({"error": "already_running"}))
                }
                SessionError::InstanceGone(id) => (
                    StatusCode::GONE,
                    json!({"error": "instance_gone", "instanceId": id}),
                ),
                SessionError::EnvNotAllowed { key, reason } => (
                    StatusCode::BAD_REQUEST,
                    json!({"error": "env_not_allowed", "key": key, "message": reason}),
                ),
                SessionError::InvalidCwd { path, reason } => (
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_cwd", "cwd": path, "message": reason}),
                ),
                SessionError::Adapter(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "spawn_failed", "message": e.to_string()}),
                ),
                SessionError::Spawn(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "spawn_failed", "message": e.to_string()}),
                ),
                SessionError::Io(_) | SessionError::StateDirInUse(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "internal", "message": e.to_string()}),
                ),
                SessionError::Project(e) => project_error(e),
            },
            ApiError::Project(e) => project_error(e),
            ApiError::InvalidJson(m) => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_json", "message": m}),
            ),
            ApiError::InvalidField { field, message } => (
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_request", "field": field, "message": message}),
            ),
            ApiError::ForbiddenHost(h) => (
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden_host", "host": h}),
            ),
            ApiError::ForbiddenOrigin(o) => (
                StatusCode::FORBIDDEN,
                json!({"error": "forbidden_origin", "origin": o}),
            ),
            ApiError::ForbiddenUser { user, instance } => {
                let mut body = json!({
                    "error": "forbidden_user",
                    "user": user,
                    "message": forbidden_user_message(user, instance.as_deref()),
                });
                if let Some(i) = instance {
                    body["instanceId"] = i.clone().into();
                }
                (StatusCode::FORBIDDEN, body)
            }
            ApiError::Unauthorized => {
                let mut resp = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "unauthorized"})),
                )
                    .into_response();
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return resp;
            }
        };
        (status, Json(body)).into_response()
    }
}

/// `Not found\n`, as amarre answers unknown routes.
pub async fn not_found() -> Response {
    text(StatusCode::NOT_FOUND, "Not found\n")
}

/// A plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain;charset=utf-8")],
        body,
    )
        .into_response()
}

async fn upgrade_required() -> Response {
    let mut resp = text(
        StatusCode::UPGRADE_REQUIRED,
        "Use /sessions/<id>; see docs/PROTOCOL.md\n",
    );
    let headers = resp.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    resp
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn metrics(State(app): State<AppState>) -> Response {
    // Every status, zeros included, each set once.
    for (status, n) in app.sessions.count_by_status() {
        app.metrics
            .sessions
            .get_or_create(&[("status", status)])
            .set(n as i64);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `GET /me`: who the server thinks the caller is.
async fn me(identity: Identity) -> Json<Value> {
    Json(json!({
        "user": &*identity.user,
        "name": identity.name,
        "via": identity.via.as_str(),
        "source": identity.source.as_str(),
    }))
}

/// Whether `identity` may see and drive sessions of `session`'s instance (a session whose
/// instance is gone falls under the server's rule alone).
fn may_use(identity: &Identity, session: &crate::session::Session) -> Result<(), ApiError> {
    match session.instance() {
        Some(instance) => identity.check_instance(instance),
        None => Ok(()),
    }
}

async fn list_instances(State(app): State<AppState>, identity: Identity) -> Json<Value> {
    let list: Vec<Value> = app
        .sessions
        .instances()
        .filter(|i| identity.allowed_by(&i.config.allowed_users))
        .map(|i| {
            let mut entry = json!({
                "id": i.config.id,
                "agent": i.adapter.name(),
                "runtime": i.runtime.name(),
                "dialect": dialect_name(i.adapter.dialect()),
                "workspaceRoots": i.config.workspace_roots,
                "available": true,
            });
            if let Err(why) = i.usable() {
                entry["available"] = false.into();
                entry["reason"] = why.to_string().into();
            }
            entry
        })
        .collect();
    Json(Value::Array(list))
}

/// The name of a dialect, as in the instance key `dialect`.
fn dialect_name(dialect: moorline_adapters::pipeline::Dialect) -> &'static str {
    use moorline_adapters::pipeline::Dialect;
    match dialect {
        Dialect::PiRpc => "pi-rpc",
        Dialect::ClaudeNative | Dialect::CodexNative => "native",
    }
}

async fn list_sessions(State(app): State<AppState>, identity: Identity) -> Response {
    // Summaries of sessions in projects ask git about their worktrees: off the async workers.
    let sessions = app.sessions.clone();
    let mut list = match tokio::task::spawn_blocking(move || sessions.list()).await {
        Ok(list) => list,
        Err(_) => app.sessions.list(),
    };
    list.retain(|s| {
        app.sessions
            .get(&s.id)
            .is_none_or(|session| may_use(&identity, &session).is_ok())
    });
    Json(list).into_response()
}

async fn create_session(
    State(app): State<AppState>,
    identity: Identity,
    body: Bytes,
) -> Result<Response, ApiError> {
    // Like amarre, a full server says so before looking at the body.
    app.sessions.check_capacity()?;
    let limits = &app.limits;
    if body.len() > limits.max_request_bytes {
        return Err(ApiError::InvalidField {
            field: "body".into(),
            message: format!(
                "request of {} bytes exceeds the limit of {} bytes (limits.max_request_bytes)",
                body.len(),
                limits.max_request_bytes
            ),
        });
    }
    let mut req = parse_create(&body)?;
    if let Some(name) = &req.name
        && name.len() > limits.max_name_bytes
    {
        return Err(ApiError::InvalidField {
            field: "name".into(),
            message: format!(
                "a name of {} bytes exceeds the limit of {} bytes (limits.max_name_bytes)",
                name.len(),
                limits.max_name_bytes
            ),
        });
    }
    match app.sessions.instance_for(req.instance_id.as_deref()) {
        Some(instance) => identity.check_instance(instance)?,
        None => {
            // Name the instances this client may use, and only those.
            let known = app
                .sessions
                .instances()
                .filter(|i| identity.allowed_by(&i.config.allowed_users))
                .map(|i| i.config.id.clone())
                .collect();
            return Err(SessionError::UnknownInstance {
                id: req.instance_id.unwrap_or_else(|| "default".into()),
                known,
            }
            .into());
        }
    }
    req.created_by = Some(identity.user.to_string());
    let summary = app.sessions.create(req).await?;
    crate::audit::session("create", &identity.user, &summary.id, &summary.instance_id);
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

/// Parses a `POST /sessions` body. Any content type is accepted (`curl -d '{}'` sends a form
/// type); an empty body means `{}`.
/// A restart's body: nothing, or `{"conversation": "resume" | "new"}`.
fn parse_restart(body: &[u8], max_bytes: usize) -> Result<ConversationRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(ConversationRequest::default());
    }
    if body.len() > max_bytes {
        return Err(ApiError::InvalidField {
            field: "body".into(),
            message: format!(
                "request of {} bytes exceeds the limit of {max_bytes} bytes (limits.max_request_bytes)",
                body.len()
            ),
        });
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::InvalidField {
            field: "body".into(),
            message: "must be a JSON object".into(),
        });
    };
    match obj.get("conversation") {
        None | Some(Value::Null) => Ok(ConversationRequest::default()),
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| ApiError::InvalidField {
            field: "conversation".into(),
            message: "must be \"resume\" or \"new\"".into(),
        }),
    }
}

fn parse_create(body: &[u8]) -> Result<CreateRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(CreateRequest::default());
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::InvalidField {
            field: "body".into(),
            message: "must be a JSON object".into(),
        });
    };
    let string = |key: &str| -> Result<Option<String>, ApiError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(ApiError::InvalidField {
                field: key.into(),
                message: "must be a string".into(),
            }),
        }
    };
    let mut env = BTreeMap::new();
    match obj.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let Value::String(v) = v else {
                    return Err(ApiError::InvalidField {
                        field: format!("env.{k}"),
                        message: "environment values must be strings".into(),
                    });
                };
                env.insert(k.clone(), v.clone());
            }
        }
        Some(_) => {
            return Err(ApiError::InvalidField {
                field: "env".into(),
                message: "must be an object of strings".into(),
            });
        }
    }
    Ok(CreateRequest {
        instance_id: string("instanceId")?,
        name: string("name")?,
        cwd: string("cwd")?.map(PathBuf::from),
        env,
        created_by: None,
        project: string("project")?,
        branch: string("branch")?,
    })
}

/// `/sessions/{id}`: summary, WebSocket, or delete. An unknown id is a JSON `not_found` for
/// every method; a known id with another method is a plain `Not found` (amarre's behaviour).
async fn session_route(
    State(app): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    method: Method,
    RawQuery(query): RawQuery,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Result<Response, ApiError> {
    if let Ok(upgrade) = upgrade {
        if let Some(session) = app.sessions.get(&id) {
            may_use(&identity, &session)?;
        }
        return Ok(ws::connect(app, id, query.as_deref(), upgrade, identity));
    }
    let session = app.sessions.get(&id).ok_or(SessionError::NotFound)?;
    may_use(&identity, &session)?;
    match method {
        Method::GET | Method::HEAD => {
            let summary = match session.worktree() {
                // git is asked about the worktree: off the async workers.
                Some(_) => {
                    let session = session.clone();
                    tokio::task::spawn_blocking(move || session.summary())
                        .await
                        .map_err(|e| SessionError::Io(std::io::Error::other(e)))?
                }
                None => session.summary(),
            };
            Ok(Json(summary).into_response())
        }
        Method::DELETE => {
            // `?force=1`: remove the session's worktree even when it holds work.
            let force = query
                .as_deref()
                .is_some_and(|q| q.split('&').any(|kv| kv == "force=1" || kv == "force=true"));
            let removal = app.sessions.delete_with(&id, force).await?;
            crate::audit::session("delete", &identity.user, &id, session.instance_id());
            Ok(match removal {
                crate::projects::Removal::Removed => StatusCode::NO_CONTENT.into_response(),
                crate::projects::Removal::Kept(why) => Json(json!({
                    "deleted": true,
                    "worktree": "kept",
                    "message": why,
                }))
                .into_response(),
            })
        }
        _ => Ok(not_found().await),
    }
}

async fn restart_session(
    State(app): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    if let Some(session) = app.sessions.get(&id) {
        may_use(&identity, &session)?;
    }
    let conversation = parse_restart(&body, app.limits.max_request_bytes)?;
    let summary = app.sessions.restart(&id, conversation).await?;
    crate::audit::session("restart", &identity.user, &id, &summary.instance_id);
    Ok(Json(summary).into_response())
}

async fn list_projects(State(app): State<AppState>, _identity: Identity) -> Response {
    Json(app.sessions.projects().list()).into_response()
}

/// Registers a repository inside the workspace roots of the project's default instance (or
/// the server's default instance).
async fn add_project(
    State(app): State<AppState>,
    identity: Identity,
    body: Bytes,
) -> Result<Response, ApiError> {
    if body.len() > app.limits.max_request_bytes {
        return Err(ApiError::InvalidField {
            field: "body".into(),
            message: format!(
                "request of {} bytes exceeds the limit of {} bytes (limits.max_request_bytes)",
                body.len(),
                app.limits.max_request_bytes
            ),
        });
    }
    let req: NewProject =
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let instance = app
        .sessions
        .instance_for(req.default_instance.as_deref())
        .ok_or_else(|| {
            app.sessions
                .unknown_instance(req.default_instance.as_deref().unwrap_or("default"))
        })?;
    identity.check_instance(instance)?;
    let roots = instance.config.workspace_roots.clone();
    let projects = app.sessions.projects().clone();
    let project = tokio::task::spawn_blocking(move || projects.add(req, &roots))
        .await
        .map_err(|e| ApiError::Session(SessionError::Io(std::io::Error::other(e))))??;
    crate::audit::project("add", &identity.user, &project.id);
    Ok((StatusCode::CREATED, Json(project)).into_response())
}

async fn remove_project(
    State(app): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    app.sessions.remove_project(&id)?;
    crate::audit::project("remove", &identity.user, &id);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The value of `key` in a query string (no decoding beyond `%XX` and `+`).
fn query_value(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /sessions/{id}/diff`: the changes of the session's worktree against the project's
/// default branch, or with `?uncommitted=1` only what is not committed.
async fn session_diff(
    State(app): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let session = app.sessions.get(&id).ok_or(SessionError::NotFound)?;
    may_use(&identity, &session)?;
    let Some(worktree) = session.worktree().cloned() else {
        return Ok((
            StatusCode::CONFLICT,
            Json(json!({"error": "not_in_project", "message": "the session does not work in a project's worktree"})),
        )
            .into_response());
    };
    let uncommitted = matches!(
        query_value(query.as_deref(), "uncommitted").as_deref(),
        Some("1" | "true")
    );
    let diff = tokio::task::spawn_blocking(move || crate::projects::diff(&worktree, uncommitted))
        .await
        .map_err(|e| ApiError::Session(SessionError::Io(std::io::Error::other(e))))??;
    if diff.len() > app.limits.max_file_bytes {
        return Ok(too_large(diff.len() as u64, app.limits.max_file_bytes));
    }
    Ok(([(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")], diff).into_response())
}

fn too_large(size: u64, limit: usize) -> Response {
    (
        StatusCode::PAYLOAD_TOO_LARGE,
        Json(json!({
            "error": "too_large",
            "size": size,
            "limit": limit,
            "message": format!("{size} bytes exceeds limits.max_file_bytes ({limit})"),
        })),
    )
        .into_response()
}

/// `GET /sessions/{id}/files?path=…`: a directory's listing (JSON) or a file's contents,
/// read-only and never outside the session's working directory.
async fn session_files(
    State(app): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    use crate::projects::files::{self, FileError, Found};
    let session = app.sessions.get(&id).ok_or(SessionError::NotFound)?;
    may_use(&identity, &session)?;
    let root = session.cwd().to_owned();
    // A workspace is a project's worktree or a directory inside a workspace root, never a
    // directory the operator chose for an instance (it may be anything, the server's own).
    let in_roots = session.instance().is_some_and(|i| {
        i.config
            .workspace_roots
            .iter()
            .filter_map(|r| std::fs::canonicalize(r).ok())
            .any(|r| root.starts_with(&r))
    });
    if session.worktree().is_none() && !in_roots {
        return Ok((
            StatusCode::CONFLICT,
            Json(json!({"error": "no_workspace", "message": "the session's working directory is neither a project's worktree nor inside a workspace root"})),
        )
            .into_response());
    }
    let path = query_value(query.as_deref(), "path").unwrap_or_default();
    let limit = app.limits.max_file_bytes as u64;
    let asked = path.clone();
    let found = tokio::task::spawn_blocking(move || files::read(&root, &asked, limit))
        .await
        .map_err(|e| ApiError::Session(SessionError::Io(std::io::Error::other(e))))?;
    Ok(match found {
        Ok(Found::Dir(entries)) => Json(json!({"path": path, "entries": entries})).into_response(),
        Ok(Found::File(body)) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
        }
        Err(e @ FileError::Escapes(_)) => (
            StatusCode::BAD_REQUEST,
            Json(
                json!({"error": "path_outside_workspace", "path": path, "message": e.to_string()}),
            ),
        )
            .into_response(),
        Err(e @ FileError::NotFound(_)) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no_such_file", "path": path, "message": e.to_string()})),
        )
            .into_response(),
        Err(FileError::TooLarge { size, .. }) => too_large(size, app.limits.max_file_bytes),
        Err(e @ FileError::Io(_)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "internal", "message": e.to_string()})),
        )
            .into_response(),
    })
}

/// moorline does not send push notifications; amarre answers this when push is off.
async fn push_disabled() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": "push_disabled"})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_bodies() {
        assert!(parse_create(b"").expect("empty").instance_id.is_none());
        assert!(parse_create(b"  \n").is_ok());
        let r = parse_create(
            br#"{"instanceId":"a","name":"n","cwd":"/tmp","env":{"K":"0123"},"extra":1}"#,
        )
        .expect("full");
        assert_eq!(r.instance_id.as_deref(), Some("a"));
        assert_eq!(r.env["K"], "0123");
        assert!(matches!(parse_create(b"{"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(
            parse_create(b"[]"),
            Err(ApiError::InvalidField { .. })
        ));
        assert!(
            matches!(parse_create(br#"{"name":5}"#), Err(ApiError::InvalidField { field, .. }) if field == "name")
        );
        assert!(
            matches!(parse_create(br#"{"env":{"A":1}}"#), Err(ApiError::InvalidField { field, .. }) if field == "env.A")
        );
    }
}
