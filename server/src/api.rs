//! The REST control plane: the route table and its handlers. Bodies are the typed structs of
//! [`crate::wire`]; every failure is an [`ApiError`], which maps to amarre's status codes and
//! bodies in one place.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::projects::Removal;
use crate::security::{self, AccessPolicy, Identity, Via};
use crate::session::{CreateRequest, SessionError, SessionManager};
use crate::wire::{
    CreateSession, DeletedKeptWorktree, InstanceSummary, Listing, Me, NewProject, NewPushToken,
    Project, PushToken, Restart, WebPushKey, WebSubscribed, WebSubscription, WorktreeFate,
};
use crate::ws;
use serde_json::Value;

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    /// Notifications and their registrations.
    pub notifier: Arc<crate::notifier::Notifier>,
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
pub(crate) fn router(state: AppState, policy: Arc<AccessPolicy>, via: Via) -> Router {
    Router::new()
        .route("/", any(crate::web::root))
        .route(
            "/app/{*path}",
            get(crate::web::app_file).fallback(not_found),
        )
        .route(
            "/sw.js",
            get(crate::web::service_worker).fallback(not_found),
        )
        .route("/healthz", get(healthz).fallback(not_found))
        .route("/me", get(me).fallback(not_found))
        .route("/metrics", get(metrics).fallback(not_found))
        .route("/instances", get(list_instances).fallback(not_found))
        .route("/events", get(crate::stream::events).fallback(not_found))
        .route(
            "/sessions",
            get(list_sessions)
                .post(create_session)
                .fallback(not_found)
                // Bodies are read only up to the limit: a larger one is refused unread.
                .layer(DefaultBodyLimit::max(state.limits.max_request_bytes)),
        )
        .route("/sessions/{id}", any(session_route))
        .route(
            "/sessions/{id}/stderr",
            get(crate::web::session_stderr).fallback(not_found),
        )
        .route(
            "/sessions/{id}/restart",
            post(restart_session)
                .fallback(not_found)
                .layer(DefaultBodyLimit::max(state.limits.max_request_bytes)),
        )
        .route(
            "/projects",
            get(list_projects)
                .post(add_project)
                .fallback(not_found)
                .layer(DefaultBodyLimit::max(state.limits.max_request_bytes)),
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
        .route("/push/tokens", any(push_tokens))
        .route("/push/tokens/{*token}", any(push_token))
        .route("/push/web/key", get(web_push_key).fallback(not_found))
        .route(
            "/push/web/subscriptions",
            post(web_subscribe)
                .delete(web_unsubscribe)
                .fallback(not_found),
        )
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            security::Gate { policy, via },
            security::guard,
        ))
        .with_state(state)
}

/// An unknown route (or method): amarre's text `Not found`.
async fn not_found() -> ApiError {
    ApiError::NoRoute
}

async fn healthz() -> Response {
    ([(header::CONTENT_TYPE, "text/plain;charset=utf-8")], "ok\n").into_response()
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
async fn me(identity: Identity) -> Json<Me> {
    Json(Me {
        user: identity.user.to_string(),
        name: identity.name,
        via: identity.via.as_str().to_owned(),
        source: identity.source.as_str().to_owned(),
    })
}

/// The `{id}` of a session route. axum's own rejection (an id that is not UTF-8 once
/// percent-decoded) would be a text 400; this one speaks the API's format.
struct SessionId(String);

impl<S: Send + Sync> FromRequestParts<S> for SessionId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) => Ok(Self(id)),
            Err(e) => Err(ApiError::InvalidField {
                field: "id".into(),
                message: e.body_text(),
            }),
        }
    }
}

/// Whether `identity` may see and drive sessions of `session`'s instance (a session whose
/// instance is gone falls under the server's rule alone).
fn may_use(identity: &Identity, session: &crate::session::Session) -> Result<(), ApiError> {
    match session.instance() {
        Some(instance) => identity.check_instance(instance),
        None => Ok(()),
    }
}

async fn list_instances(
    State(app): State<AppState>,
    identity: Identity,
) -> Json<Vec<InstanceSummary>> {
    let list = app
        .sessions
        .instances()
        .filter(|i| identity.allowed_by(&i.config.allowed_users))
        .map(|i| {
            let unusable = i.usable().err();
            InstanceSummary {
                id: i.config.id.clone(),
                agent: i.adapter.name().to_owned(),
                runtime: i.runtime.name().to_owned(),
                dialect: dialect_name(i.adapter.dialect()).to_owned(),
                workspace_roots: i.config.workspace_roots.clone(),
                available: unusable.is_none(),
                reason: unusable.map(|why| why.to_string()),
            }
        })
        .collect();
    Json(list)
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
    let mut list = match tokio::task::spawn_blocking(move || sessions.fresh_list()).await {
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
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Like amarre, a full server says so before looking at the body.
    app.sessions.check_capacity()?;
    let limits = &app.limits;
    let body = CreateSession::from_body(&request_body(body, limits)?)?;
    if let Some(name) = &body.name
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
    match app.sessions.instance_for(body.instance_id.as_deref()) {
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
                id: body.instance_id.unwrap_or_else(|| "default".into()),
                known,
            }
            .into());
        }
    }
    let req = CreateRequest {
        instance_id: body.instance_id,
        name: body.name,
        cwd: body.cwd.map(PathBuf::from),
        env: body.env,
        created_by: Some(identity.user.to_string()),
        project: body.project,
        branch: body.branch,
    };
    let summary = app.sessions.create(req).await?;
    crate::audit::session("create", &identity.user, &summary.id, &summary.instance_id);
    Ok((StatusCode::CREATED, Json(summary)).into_response())
}

/// `/sessions/{id}`: summary, WebSocket, or delete. An unknown id is a JSON `not_found` for
/// every method; a known id with another method is a plain `Not found` (amarre's behaviour).
async fn session_route(
    State(app): State<AppState>,
    identity: Identity,
    SessionId(id): SessionId,
    method: Method,
    uri: Uri,
    options: Result<ws::Options, ApiError>,
    upgrade: Result<ws::Upgrade, ws::NotUpgrade>,
) -> Result<Response, ApiError> {
    if let Ok(upgrade) = upgrade {
        if let Some(session) = app.sessions.get(&id) {
            may_use(&identity, &session)?;
        }
        return ws::connect(app, &id, options?, upgrade, identity);
    }
    let session = app.sessions.get(&id).ok_or(SessionError::NotFound)?;
    may_use(&identity, &session)?;
    match method {
        Method::GET | Method::HEAD => {
            let summary = match session.worktree() {
                // git is asked about the worktree: off the async workers.
                Some(_) => {
                    let session = session.clone();
                    let projects = app.sessions.projects().clone();
                    blocking(move || session.fresh_summary(&projects)).await?
                }
                None => session.summary(),
            };
            Ok(Json(summary).into_response())
        }
        Method::DELETE => {
            let Query(DeleteQuery { force }) = Query::from_uri(&uri)?;
            let removal = app.sessions.delete_with(&id, force.is_set()).await?;
            crate::audit::session("delete", &identity.user, &id, session.instance_id());
            Ok(match removal {
                Removal::Removed => StatusCode::NO_CONTENT.into_response(),
                Removal::Kept(message) => Json(DeletedKeptWorktree {
                    deleted: true,
                    worktree: WorktreeFate::Kept,
                    message,
                })
                .into_response(),
            })
        }
        _ => Err(ApiError::NoRoute),
    }
}

async fn restart_session(
    State(app): State<AppState>,
    identity: Identity,
    SessionId(id): SessionId,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if let Some(session) = app.sessions.get(&id) {
        may_use(&identity, &session)?;
    }
    let body = Restart::from_body(&request_body(body, &app.limits)?)?;
    let conversation = body.conversation.unwrap_or_default();
    let summary = app.sessions.restart(&id, conversation).await?;
    crate::audit::session("restart", &identity.user, &id, &summary.instance_id);
    Ok(Json(summary).into_response())
}

/// A request body read up to `limits.max_request_bytes` (the route's `DefaultBodyLimit`).
fn request_body(body: Result<Bytes, BytesRejection>, limits: &Limits) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError::InvalidField {
        field: "body".into(),
        message: if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request exceeds the limit of {} bytes (limits.max_request_bytes)",
                limits.max_request_bytes
            )
        } else {
            e.body_text()
        },
    })
}

/// A typed query string whose rejection speaks the API's error format (axum's own is text).
struct Query<T>(T);

impl<T: serde::de::DeserializeOwned> Query<T> {
    fn from_uri(uri: &Uri) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::try_from_uri(uri)
            .map(|q| Self(q.0))
            .map_err(|e| ApiError::InvalidField {
                field: "query".into(),
                message: e.body_text(),
            })
    }
}

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        Self::from_uri(&parts.uri)
    }
}

/// A yes/no query parameter: `1` and `true` are yes; absent and anything else no.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(transparent)]
struct Flag(Option<String>);

impl Flag {
    fn is_set(&self) -> bool {
        matches!(self.0.as_deref(), Some("1" | "true"))
    }
}

/// `DELETE /sessions/{id}?force=1`: remove the session's worktree even when it holds work.
#[derive(Debug, serde::Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    force: Flag,
}

/// `GET /sessions/{id}/diff?uncommitted=1`: only what is not committed.
#[derive(Debug, serde::Deserialize)]
struct DiffQuery {
    #[serde(default)]
    uncommitted: Flag,
}

/// `GET /sessions/{id}/files?path=P`: relative to the session's working directory.
#[derive(Debug, serde::Deserialize)]
struct FilesQuery {
    #[serde(default)]
    path: String,
}

/// The projects whose instance the caller may use: a project names paths on this machine, so a
/// user an instance's `allowed_users` leaves out does not see its projects either.
async fn list_projects(State(app): State<AppState>, identity: Identity) -> Json<Vec<Project>> {
    let mut list = app.sessions.projects().list();
    list.retain(|p| may_use_project(&app, &identity, p).is_ok());
    Json(list)
}

/// Whether `identity` may use `project`: judged by the instance its sessions run by default.
fn may_use_project(app: &AppState, identity: &Identity, project: &Project) -> Result<(), ApiError> {
    match app
        .sessions
        .instance_for(project.default_instance.as_deref())
    {
        Some(instance) => identity.check_instance(instance),
        None => Ok(()),
    }
}

/// Registers a repository inside the workspace roots of the project's default instance (or
/// the server's default instance), cloning it first when the body has a `url`.
async fn add_project(
    State(app): State<AppState>,
    identity: Identity,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = request_body(body, &app.limits)?;
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
    let project = blocking(move || projects.add(req, &roots)).await??;
    crate::audit::project("add", &identity.user, &project.id);
    Ok((StatusCode::CREATED, Json(project)).into_response())
}

async fn remove_project(
    State(app): State<AppState>,
    identity: Identity,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if let Some(project) = app
        .sessions
        .projects()
        .list()
        .into_iter()
        .find(|p| p.id == id)
    {
        may_use_project(&app, &identity, &project)?;
    }
    app.sessions.remove_project(&id)?;
    crate::audit::project("remove", &identity.user, &id);
    Ok(StatusCode::NO_CONTENT)
}

/// Runs git or file work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| SessionError::Io(std::io::Error::other(e)).into())
}

/// `GET /sessions/{id}/diff`: the changes of the session's worktree against the project's
/// default branch, or with `?uncommitted=1` only what is not committed.
async fn session_diff(
    State(app): State<AppState>,
    identity: Identity,
    SessionId(id): SessionId,
    Query(DiffQuery { uncommitted }): Query<DiffQuery>,
) -> Result<Response, ApiError> {
    let session = app.sessions.get(&id).ok_or(SessionError::NotFound)?;
    may_use(&identity, &session)?;
    let worktree = session.worktree().cloned().ok_or(ApiError::NotInProject)?;
    let projects = app.sessions.projects().clone();
    let diff = blocking(move || projects.diff(&worktree, uncommitted.is_set())).await??;
    let limit = app.limits.max_file_bytes as u64;
    if diff.len() as u64 > limit {
        return Err(ApiError::TooLarge {
            size: diff.len() as u64,
            limit,
        });
    }
    Ok(([(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")], diff).into_response())
}

/// `GET /sessions/{id}/files?path=…`: a directory's listing (JSON) or a file's contents,
/// read-only and never outside the session's working directory.
async fn session_files(
    State(app): State<AppState>,
    identity: Identity,
    SessionId(id): SessionId,
    Query(FilesQuery { path }): Query<FilesQuery>,
) -> Result<Response, ApiError> {
    use crate::projects::files::{self, Found};
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
        return Err(ApiError::NoWorkspace);
    }
    let limit = app.limits.max_file_bytes as u64;
    let asked = path.clone();
    let found = blocking(move || files::read(&root, &asked, limit))
        .await?
        .map_err(|error| ApiError::File {
            path: path.clone(),
            error,
        })?;
    Ok(match found {
        Found::Dir(entries) => Json(Listing { path, entries }).into_response(),
        Found::File(body) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response()
        }
    })
}

/// Whose push registrations a caller sees: `local` (no identity) and the bearer token all of
/// them, a tailnet login (or `anonymous`) its own.
fn caller(identity: &Identity) -> crate::notifier::Caller<'_> {
    crate::notifier::Caller {
        user: &identity.user,
        own_only: !matches!(
            identity.source,
            security::Source::Local | security::Source::Token
        ),
    }
}

/// A push request's body as amarre reads it: JSON whatever the content type; anything else
/// (or a body over `limits.max_request_bytes`) reads as an empty object.
fn lenient_body<T: serde::de::DeserializeOwned + Default>(body: &[u8], limit: usize) -> T {
    if body.len() > limit {
        return T::default();
    }
    // Through a `Value`, so a key given twice counts once (the last), as amarre's parser has it.
    match serde_json::from_slice(body) {
        Ok(value @ Value::Object(_)) => serde_json::from_value(value).unwrap_or_default(),
        _ => T::default(),
    }
}

/// `/push/tokens`: amarre's Expo token list (GET) and registration (POST).
async fn push_tokens(
    State(app): State<AppState>,
    identity: Identity,
    method: Method,
    body: Bytes,
) -> Result<Response, ApiError> {
    let notifier = &app.notifier;
    if !notifier.expo_enabled() {
        return Err(ApiError::PushDisabled);
    }
    match method {
        Method::GET | Method::HEAD => {
            let tokens = notifier
                .expo_tokens(caller(&identity))
                .ok_or(ApiError::PushDisabled)?;
            let list: Vec<PushToken> = tokens.iter().map(|t| t.public()).collect();
            Ok(Json(list).into_response())
        }
        Method::POST => {
            let new: NewPushToken = lenient_body(&body, app.limits.max_request_bytes);
            let req = crate::notifier::TokenRequest {
                token: new.token.unwrap_or_default(),
                device_name: new.device_name,
                platform: new.platform,
            };
            let (token, created) = notifier
                .register_expo(caller(&identity), req)
                .ok_or(ApiError::PushDisabled)?
                .map_err(|()| ApiError::InvalidToken)?;
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok((status, Json(token.public())).into_response())
        }
        _ => Err(ApiError::NoRoute),
    }
}

/// `DELETE /push/tokens/<urlencoded token>`: 204 whether or not it was registered.
async fn push_token(
    State(app): State<AppState>,
    identity: Identity,
    method: Method,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    if !app.notifier.expo_enabled() {
        return Err(ApiError::PushDisabled);
    }
    if method != Method::DELETE {
        return Err(ApiError::NoRoute);
    }
    app.notifier
        .unregister_expo(caller(&identity), &token)
        .ok_or(ApiError::PushDisabled)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /push/web/key`: the VAPID public key browsers subscribe with.
async fn web_push_key(State(app): State<AppState>) -> Result<Json<WebPushKey>, ApiError> {
    let key = app
        .notifier
        .web_public_key()
        .ok_or(ApiError::PushDisabled)?;
    Ok(Json(WebPushKey {
        public_key: key.to_owned(),
    }))
}

/// `POST /push/web/subscriptions`: a browser's `PushSubscription` (its JSON form).
async fn web_subscribe(
    State(app): State<AppState>,
    identity: Identity,
    body: Bytes,
) -> Result<Response, ApiError> {
    if app.notifier.web_public_key().is_none() {
        return Err(ApiError::PushDisabled);
    }
    let subscription: WebSubscription = lenient_body(&body, app.limits.max_request_bytes);
    let endpoint = subscription
        .endpoint
        .ok_or_else(|| ApiError::InvalidSubscription("endpoint: missing".into()))?;
    let keys = subscription
        .keys
        .ok_or_else(|| ApiError::InvalidSubscription("keys: must hold p256dh and auth".into()))?;
    let created = app
        .notifier
        .subscribe_web(caller(&identity), endpoint.clone(), keys.into())
        .ok_or(ApiError::PushDisabled)?
        .map_err(ApiError::InvalidSubscription)?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let answer = WebSubscribed {
        endpoint,
        user: identity.user.to_string(),
    };
    Ok((status, Json(answer)).into_response())
}

/// `DELETE /push/web/subscriptions` with `{"endpoint": …}`: 204 whether or not it existed.
async fn web_unsubscribe(
    State(app): State<AppState>,
    identity: Identity,
    body: Bytes,
) -> Result<Response, ApiError> {
    let subscription: WebSubscription = lenient_body(&body, app.limits.max_request_bytes);
    let endpoint = subscription
        .endpoint
        .ok_or_else(|| ApiError::InvalidSubscription("endpoint: missing".into()))?;
    app.notifier
        .unsubscribe_web(caller(&identity), &endpoint)
        .ok_or(ApiError::PushDisabled)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
