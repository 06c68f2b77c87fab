//! The web app: files embedded at build time (`build.rs` reads `server/web/`), served with
//! their precompressed gzip form, an ETag, and a strict Content-Security-Policy.
//!
//! A browser that opens `/` (it asks for `text/html`) gets the app; any other client keeps
//! amarre's `426` there, so amarre's clients are unaffected. Everything else of the app lives
//! under `/app/`, apart from the service worker, which must sit at `/sw.js` to control `/`.

use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// One embedded file.
#[derive(Debug)]
pub(crate) struct Asset {
    /// Its path below `server/web/`.
    pub(crate) path: &'static str,
    pub(crate) content_type: &'static str,
    pub(crate) body: &'static [u8],
    /// Its gzip form, when that is smaller.
    pub(crate) gzip: Option<&'static [u8]>,
    /// A quoted hash of `body`.
    pub(crate) etag: &'static str,
}

include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));

/// What the app's page may load and do: its own scripts and styles only (no inline script or
/// style, no `eval`), requests to its own origin only (REST, `/events`, the WebSockets), and
/// it cannot be framed.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; manifest-src 'self'; worker-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The embedded file at `path` (below `server/web/`).
pub(crate) fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// Whether the request comes from a browser navigating to a page: it accepts HTML and is no
/// WebSocket handshake.
fn wants_html(headers: &HeaderMap) -> bool {
    let accepts = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    accepts && !headers.contains_key(header::UPGRADE)
}

/// `/`: the app for browsers, amarre's `426` for everyone else.
pub(crate) async fn root(method: Method, headers: HeaderMap) -> Response {
    if matches!(method, Method::GET | Method::HEAD)
        && wants_html(&headers)
        && let Some(index) = asset("index.html")
    {
        return serve(index, &headers, method == Method::HEAD);
    }
    ApiError::UpgradeRequired.into_response()
}

/// `/app/{*path}`.
pub(crate) async fn app_file(
    method: Method,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    match asset(&path) {
        // The page itself is only ever `/`, so its relative URLs mean one thing.
        Some(a) if a.path != "index.html" => serve(a, &headers, method == Method::HEAD),
        _ => ApiError::NoRoute.into_response(),
    }
}

/// `/sw.js`: the service worker, at the root so that it may control `/`.
pub(crate) async fn service_worker(method: Method, headers: HeaderMap) -> Response {
    match asset("sw.js") {
        Some(a) => serve(a, &headers, method == Method::HEAD),
        None => ApiError::NoRoute.into_response(),
    }
}

/// `GET /sessions/{id}/stderr`: the end of the agent's stderr, as text, for the app's
/// crash report. The same access rules as `GET /sessions/{id}`.
pub(crate) async fn session_stderr(
    axum::extract::State(app): axum::extract::State<crate::api::AppState>,
    identity: crate::security::Identity,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let session = app
        .sessions
        .get(&id)
        .ok_or(crate::session::SessionError::NotFound)?;
    if let Some(instance) = session.instance() {
        identity.check_instance(instance)?;
    }
    let tail = tokio::task::spawn_blocking(move || session.stderr_tail())
        .await
        .unwrap_or_default();
    Ok(([(header::CONTENT_TYPE, "text/plain;charset=utf-8")], tail).into_response())
}

/// Answers with `asset`: `304` when the client has this version, else the body, gzipped when
/// the client takes it. Browsers revalidate every time (`no-cache`): one round trip, and a new
/// build is seen at once.
fn serve(asset: &'static Asset, headers: &HeaderMap, head: bool) -> Response {
    let mut resp = if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|tags| tags.split(',').any(|t| t.trim() == asset.etag))
    {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let gzip = asset.gzip.filter(|_| {
            headers
                .get(header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|e| {
                    e.split(',')
                        .any(|c| c.split(';').next().is_some_and(|n| n.trim() == "gzip"))
                })
        });
        let body = gzip.unwrap_or(asset.body);
        let mut resp = if head {
            let mut r = StatusCode::OK.into_response();
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            r
        } else {
            (StatusCode::OK, body).into_response()
        };
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        if gzip.is_some() {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        resp
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(asset.etag));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if asset.path == "index.html" {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            "cross-origin-opener-policy",
            HeaderValue::from_static("same-origin"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_is_embedded_with_its_gzip_forms() {
        for path in ["index.html", "app.js", "sw.js", "manifest.webmanifest"] {
            let a = asset(path).unwrap_or_else(|| panic!("{path} is embedded"));
            assert!(a.gzip.is_some_and(|g| g.len() < a.body.len()), "{path}");
        }
        let sw = std::str::from_utf8(asset("sw.js").expect("sw").body).expect("utf-8");
        // Named after this build, so a new build replaces the offline copy.
        assert!(sw.contains("'moorline-") && !sw.contains("__BUILD__"));
    }

    /// What a browser loads to show the app (docs/WEBAPP.md states the total).
    const FIRST_LOAD: [&str; 10] = [
        "index.html",
        "app.css",
        "app.js",
        "api.js",
        "conversation.js",
        "markdown.js",
        "notify.js",
        "vendor/preact-htm.js",
        "icon.svg",
        "manifest.webmanifest",
    ];

    #[test]
    fn the_first_load_stays_small() {
        let mut gzipped = 0;
        for path in FIRST_LOAD {
            let a = asset(path).unwrap_or_else(|| panic!("{path} is embedded"));
            gzipped += a.gzip.map_or(a.body.len(), <[u8]>::len);
        }
        println!("first load: {gzipped} bytes gzipped");
        assert!(gzipped < 48 * 1024, "first load grew to {gzipped} bytes");
        // Every module the app imports is in the list above.
        for a in ASSETS
            .iter()
            .filter(|a| a.path.ends_with(".js") && !matches!(a.path, "sw.js" | "sw-push.js"))
        {
            assert!(FIRST_LOAD.contains(&a.path), "{} is not counted", a.path);
        }
    }

    #[test]
    fn browsers_get_html_and_other_clients_do_not() {
        let mut h = HeaderMap::new();
        assert!(!wants_html(&h));
        h.insert(header::ACCEPT, HeaderValue::from_static("text/html,*/*"));
        assert!(wants_html(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!wants_html(&h));
    }
}
