//! The one error type of the HTTP edge and its one mapping to a status and an
//! [`ErrorBody`]: REST handlers, the access guard and the WebSocket upgrade all refuse through
//! [`ApiError`], so the same failure gets the same answer on every route. Two answers stay
//! amarre's plain text: an unknown route, and `/` (which asks for `/sessions/<id>`).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::projects::ProjectError;
use crate::projects::files::FileError;
use crate::session::SessionError;
use crate::wire::{BodyError, ErrorBody, Status};

/// Every way a request can fail, with amarre's status codes and bodies.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiError {
    /// A session operation failed.
    #[error(transparent)]
    Session(#[from] SessionError),
    /// A project operation failed.
    #[error(transparent)]
    Project(#[from] ProjectError),
    /// A diff of a session that does not work in a project's worktree.
    #[error("the session does not work in a project's worktree")]
    NotInProject,
    /// Files of a session whose working directory is no workspace.
    #[error(
        "the session's working directory is neither a project's worktree nor inside a workspace root"
    )]
    NoWorkspace,
    /// A diff over `limits.max_file_bytes`.
    #[error("{size} bytes exceeds limits.max_file_bytes ({limit})")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A path of a session's workspace could not be read.
    #[error("{error}")]
    File {
        /// The path asked for.
        path: String,
        /// Why not.
        error: FileError,
    },
    /// The request body is not valid JSON.
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// A field of the body or the query has the wrong type or value.
    #[error("{field}: {message}")]
    InvalidField {
        /// Which field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A WebSocket to a session whose agent does not run (and no replay was asked for).
    #[error("Session {}; restart it first", .0.as_str())]
    NotRunning(Status),
    /// `limits.max_clients_per_session` clients are already connected to the session.
    #[error("{limit} clients are already connected")]
    MaxClients {
        /// The limit.
        limit: usize,
    },
    /// `limits.max_event_streams` streams of events are already open.
    #[error("{limit} event streams are already open")]
    MaxEventStreams {
        /// The limit.
        limit: usize,
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
    /// Push notifications are not offered (amarre's answer when push is off).
    #[error("push notifications are disabled")]
    PushDisabled,
    /// Not an Expo push token (amarre's 400).
    #[error("not an Expo push token")]
    InvalidToken,
    /// A Web Push subscription that cannot be used.
    #[error("{0}")]
    InvalidSubscription(String),
    /// No such route, or not with this method: text `Not found`, as amarre answers.
    #[error("Not found")]
    NoRoute,
    /// `/`, amarre v0.2's single-session WebSocket URL: text, pointing to `/sessions/<id>`.
    #[error("Use /sessions/<id>; see docs/PROTOCOL.md")]
    UpgradeRequired,
}

fn forbidden_user_message(user: &str, instance: Option<&str>) -> String {
    match instance {
        Some(i) => format!("{user} is not allowed to use instance {i:?} (see its allowed_users)"),
        None => format!("{user} is not allowed to use this server (see allowed_users)"),
    }
}

/// The status and body of a project error (on its own or as a session's).
fn project_answer(e: &ProjectError) -> (StatusCode, ErrorBody) {
    let message = e.to_string();
    match e {
        ProjectError::NotFound(id) => (
            StatusCode::NOT_FOUND,
            ErrorBody::UnknownProject {
                project: id.clone(),
                message,
            },
        ),
        ProjectError::Exists(id) => (
            StatusCode::CONFLICT,
            ErrorBody::ProjectExists {
                project: id.clone(),
                message,
            },
        ),
        ProjectError::Invalid { field, message } => (
            StatusCode::BAD_REQUEST,
            ErrorBody::InvalidRequest {
                field: (*field).to_owned(),
                message: message.clone(),
            },
        ),
        ProjectError::BranchInUse(branch) => (
            StatusCode::CONFLICT,
            ErrorBody::BranchInUse {
                branch: branch.clone(),
                message,
            },
        ),
        ProjectError::Git(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::GitFailed { message },
        ),
        ProjectError::Io(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::Internal { message },
        ),
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Json(m) => ApiError::InvalidJson(m),
            BodyError::Field { field, message } => ApiError::InvalidField {
                field,
                message: message.to_owned(),
            },
        }
    }
}

/// What an error is answered with: JSON, or amarre's plain text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Body {
    /// `{"error": code, …}`.
    Json(ErrorBody),
    /// Plain text (an unknown route, `/`).
    Text(&'static str),
}

impl ApiError {
    /// The status and body this error is answered with.
    pub(crate) fn answer(&self) -> (StatusCode, Body) {
        let message = || self.to_string();
        let (status, body) = match self {
            ApiError::Session(e) => match e {
                SessionError::NotFound => (StatusCode::NOT_FOUND, ErrorBody::NotFound),
                SessionError::UnknownInstance { id, known } => (
                    StatusCode::NOT_FOUND,
                    ErrorBody::UnknownInstance {
                        instance_id: id.clone(),
                        instances: known.clone(),
                        message: message(),
                    },
                ),
                SessionError::Credentials { instance, source } => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorBody::CredentialsUnavailable {
                        instance_id: instance.clone(),
                        path: source.path().to_owned(),
                        message: message(),
                    },
                ),
                SessionError::MaxSessions { limit } => (
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorBody::MaxSessionsReached { limit: *limit },
                ),
                SessionError::AlreadyRunning => (StatusCode::CONFLICT, ErrorBody::AlreadyRunning),
                SessionError::InstanceGone(id) => (
                    StatusCode::GONE,
                    ErrorBody::InstanceGone {
                        instance_id: id.clone(),
                    },
                ),
                SessionError::EnvNotAllowed { key, reason } => (
                    StatusCode::BAD_REQUEST,
                    ErrorBody::EnvNotAllowed {
                        key: key.clone(),
                        message: reason.clone(),
                    },
                ),
                SessionError::InvalidCwd { path, reason } => (
                    StatusCode::BAD_REQUEST,
                    ErrorBody::InvalidCwd {
                        cwd: path.clone(),
                        message: reason.clone(),
                    },
                ),
                SessionError::Adapter(_) | SessionError::Spawn(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorBody::SpawnFailed { message: message() },
                ),
                SessionError::Io(_) | SessionError::StateDirInUse(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorBody::Internal { message: message() },
                ),
                SessionError::Project(e) => project_answer(e),
            },
            ApiError::Project(e) => project_answer(e),
            ApiError::NotInProject => (
                StatusCode::CONFLICT,
                ErrorBody::NotInProject { message: message() },
            ),
            ApiError::NoWorkspace => (
                StatusCode::CONFLICT,
                ErrorBody::NoWorkspace { message: message() },
            ),
            ApiError::TooLarge { size, limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorBody::TooLarge {
                    size: *size,
                    limit: *limit,
                    message: message(),
                },
            ),
            ApiError::File { path, error } => match error {
                FileError::Escapes(_) => (
                    StatusCode::BAD_REQUEST,
                    ErrorBody::PathOutsideWorkspace {
                        path: path.clone(),
                        message: message(),
                    },
                ),
                FileError::NotFound(_) => (
                    StatusCode::NOT_FOUND,
                    ErrorBody::NoSuchFile {
                        path: path.clone(),
                        message: message(),
                    },
                ),
                FileError::TooLarge { size, limit, .. } => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorBody::TooLarge {
                        size: *size,
                        limit: *limit,
                        message: message(),
                    },
                ),
                FileError::Io(_) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorBody::Internal { message: message() },
                ),
            },
            ApiError::InvalidJson(m) => (
                StatusCode::BAD_REQUEST,
                ErrorBody::InvalidJson { message: m.clone() },
            ),
            ApiError::InvalidField { field, message } => (
                StatusCode::BAD_REQUEST,
                ErrorBody::InvalidRequest {
                    field: field.clone(),
                    message: message.clone(),
                },
            ),
            ApiError::NotRunning(status) => (
                StatusCode::CONFLICT,
                ErrorBody::NotRunning {
                    status: *status,
                    message: message(),
                },
            ),
            ApiError::MaxClients { limit } => (
                StatusCode::TOO_MANY_REQUESTS,
                ErrorBody::MaxClientsReached { limit: *limit },
            ),
            ApiError::MaxEventStreams { limit } => (
                StatusCode::TOO_MANY_REQUESTS,
                ErrorBody::MaxEventStreamsReached { limit: *limit },
            ),
            ApiError::ForbiddenHost(h) => (
                StatusCode::FORBIDDEN,
                ErrorBody::ForbiddenHost { host: h.clone() },
            ),
            ApiError::ForbiddenOrigin(o) => (
                StatusCode::FORBIDDEN,
                ErrorBody::ForbiddenOrigin { origin: o.clone() },
            ),
            ApiError::ForbiddenUser { user, instance } => (
                StatusCode::FORBIDDEN,
                ErrorBody::ForbiddenUser {
                    user: user.clone(),
                    message: message(),
                    instance_id: instance.clone(),
                },
            ),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, ErrorBody::Unauthorized),
            ApiError::PushDisabled => (StatusCode::SERVICE_UNAVAILABLE, ErrorBody::PushDisabled),
            ApiError::InvalidToken => (StatusCode::BAD_REQUEST, ErrorBody::InvalidToken),
            ApiError::InvalidSubscription(m) => (
                StatusCode::BAD_REQUEST,
                ErrorBody::InvalidSubscription { message: m.clone() },
            ),
            ApiError::NoRoute => return (StatusCode::NOT_FOUND, Body::Text("Not found\n")),
            ApiError::UpgradeRequired => {
                return (
                    StatusCode::UPGRADE_REQUIRED,
                    Body::Text("Use /sessions/<id>; see docs/PROTOCOL.md\n"),
                );
            }
        };
        (status, Body::Json(body))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.answer();
        let mut resp = match body {
            Body::Json(body) => (status, Json(body)).into_response(),
            Body::Text(text) => (
                status,
                [(header::CONTENT_TYPE, "text/plain;charset=utf-8")],
                text,
            )
                .into_response(),
        };
        let headers = resp.headers_mut();
        match status {
            StatusCode::UNAUTHORIZED => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::UPGRADE_REQUIRED => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_errors_keep_amarres_statuses() {
        let cases = [
            (ApiError::from(SessionError::NotFound), 404, "not_found"),
            (
                SessionError::MaxSessions { limit: 1 }.into(),
                429,
                "max_sessions_reached",
            ),
            (SessionError::AlreadyRunning.into(), 409, "already_running"),
            (ApiError::NotRunning(Status::Crashed), 409, "not_running"),
            (
                ApiError::MaxClients { limit: 2 },
                429,
                "max_clients_reached",
            ),
            (ApiError::Unauthorized, 401, "unauthorized"),
            (ApiError::PushDisabled, 503, "push_disabled"),
            (ApiError::InvalidToken, 400, "invalid_token"),
            (
                ApiError::InvalidSubscription("endpoint: missing".into()),
                400,
                "invalid_subscription",
            ),
            (
                ProjectError::NotFound("p".into()).into(),
                404,
                "unknown_project",
            ),
            (
                SessionError::Project(ProjectError::BranchInUse("b".into())).into(),
                409,
                "branch_in_use",
            ),
            (ApiError::NotInProject, 409, "not_in_project"),
            (ApiError::NoWorkspace, 409, "no_workspace"),
            (ApiError::TooLarge { size: 9, limit: 8 }, 413, "too_large"),
            (
                ApiError::File {
                    path: "../x".into(),
                    error: FileError::Escapes("../x".into()),
                },
                400,
                "path_outside_workspace",
            ),
        ];
        for (err, status, code) in cases {
            let (s, Body::Json(body)) = err.answer() else {
                panic!("{err:?} is answered with text");
            };
            let json = serde_json::to_value(&body).expect("json");
            assert_eq!((s.as_u16(), json["error"].as_str()), (status, Some(code)));
        }
        let (_, Body::Json(body)) = ApiError::NotRunning(Status::Crashed).answer() else {
            panic!("text");
        };
        assert_eq!(
            serde_json::to_value(&body).expect("json"),
            serde_json::json!({
                "error": "not_running",
                "status": "crashed",
                "message": "Session crashed; restart it first"
            })
        );
        assert_eq!(
            ApiError::NoRoute.answer(),
            (StatusCode::NOT_FOUND, Body::Text("Not found\n"))
        );
    }
}
