//! Who may talk to the server: `Host` and `Origin` checks and the optional bearer token.
//!
//! moorline listens on loopback, but loopback is reachable by every local process and, through
//! DNS rebinding, by any web page the user opens. So every request must name an allowed host;
//! a browser request must come from an allowed (or the same) origin, whatever its content type
//! (a form POST needs no preflight); and when a token is configured, every request but
//! `GET /healthz` must carry it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::api::ApiError;
use crate::config::{Config, Secret};

/// The access rules of one server.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    hosts: HashSet<String>,
    origins: HashSet<String>,
    token: Option<Secret>,
}

impl AccessPolicy {
    /// Rules from the configuration. `bound` is the address actually listened on; `names` are
    /// this machine's names (hostname, tailnet names).
    pub fn new(
        config: &Config,
        token: Option<Secret>,
        bound: SocketAddr,
        names: Vec<String>,
    ) -> Self {
        let mut hosts: HashSet<String> = ["localhost".to_owned()].into_iter().collect();
        hosts.insert(bound.ip().to_string());
        hosts.extend(names.into_iter().map(|n| normalize_host(&n)));
        hosts.extend(config.allowed_hosts.iter().map(|n| normalize_host(n)));
        let origins = config
            .allowed_origins
            .iter()
            .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
            .collect();
        Self {
            hosts,
            origins,
            token,
        }
    }

    /// Whether a token is required.
    pub fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// Checks one request's headers.
    pub fn check(&self, path: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or(ApiError::ForbiddenHost(String::new()))?;
        if !self.host_allowed(host) {
            return Err(ApiError::ForbiddenHost(host.to_owned()));
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !self.origin_allowed(origin, host) {
                return Err(ApiError::ForbiddenOrigin(origin.to_owned()));
            }
        }
        if path == "/healthz" {
            return Ok(());
        }
        if let Some(expected) = &self.token {
            // The scheme name is case-insensitive (RFC 9110 §11.1).
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|h| h.to_str().ok())
                .and_then(|h| h.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            let ok =
                given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(expected.expose().as_bytes())));
            if !ok {
                return Err(ApiError::Unauthorized);
            }
        }
        Ok(())
    }

    fn host_allowed(&self, host_header: &str) -> bool {
        let host = normalize_host(strip_port(host_header));
        if let Ok(ip) = host.parse::<IpAddr>()
            && ip.is_loopback()
        {
            return true;
        }
        self.hosts.contains(&host)
    }

    fn origin_allowed(&self, origin: &str, host_header: &str) -> bool {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.contains(&origin) {
            return true;
        }
        // Same origin: a page served from this very host (e.g. through `tailscale serve`).
        let Some((scheme, authority)) = origin.split_once("://") else {
            return false;
        };
        matches!(scheme, "http" | "https") && authority.eq_ignore_ascii_case(host_header)
    }
}

/// Lowercases a host name, drops a trailing dot and IPv6 brackets.
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.')
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase()
}

/// `host:port` → `host`; `[::1]:8341` → `[::1]`.
fn strip_port(host: &str) -> &str {
    if let Some(end) = host.find(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Middleware applying the policy to every request.
pub async fn guard(
    State(policy): State<std::sync::Arc<AccessPolicy>>,
    req: Request,
    next: Next,
) -> Response {
    if let Err(e) = policy.check(req.uri().path(), req.headers()) {
        tracing::warn!(path = %req.uri().path(), reason = %e, "request refused");
        return e.into_response();
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn policy(token: Option<&str>) -> AccessPolicy {
        let config = Config {
            allowed_hosts: vec!["Box.Tail1234.ts.net.".into()],
            allowed_origins: vec!["https://app.example/".into()],
            ..Config::default()
        };
        AccessPolicy::new(
            &config,
            token.map(Secret::new),
            "127.0.0.1:8341".parse().expect("addr"),
            vec!["myhost".into()],
        )
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn hosts() {
        let p = policy(None);
        for ok in [
            "127.0.0.1:8341",
            "localhost",
            "[::1]:8341",
            "127.1.2.3",
            "box.tail1234.ts.net",
            "MYHOST:80",
        ] {
            assert!(
                p.check("/sessions", &headers(&[("host", ok)])).is_ok(),
                "{ok}"
            );
        }
        for bad in ["evil.example", "evil.example:8341", "10.0.0.1", ""] {
            assert!(
                p.check("/sessions", &headers(&[("host", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(p.check("/sessions", &HeaderMap::new()).is_err());
    }

    #[test]
    fn origins() {
        let p = policy(None);
        let check = |origin: &str, host: &str| {
            p.check("/", &headers(&[("host", host), ("origin", origin)]))
                .is_ok()
        };
        assert!(check("https://app.example", "127.0.0.1:8341"));
        assert!(
            check("http://127.0.0.1:8341", "127.0.0.1:8341"),
            "same origin"
        );
        assert!(
            check("https://box.tail1234.ts.net", "box.tail1234.ts.net"),
            "same origin via tailscale serve"
        );
        assert!(!check("http://evil.example", "127.0.0.1:8341"));
        assert!(!check("null", "127.0.0.1:8341"));
        assert!(
            !check("http://127.0.0.1:9999", "127.0.0.1:8341"),
            "other port is another origin"
        );
    }

    #[test]
    fn token() {
        let p = policy(Some("s3cret"));
        let h = |auth: &str| headers(&[("host", "localhost"), ("authorization", auth)]);
        assert!(p.check("/sessions", &h("Bearer s3cret")).is_ok());
        assert!(
            p.check("/sessions", &h("bearer s3cret")).is_ok(),
            "any case"
        );
        assert!(!format!("{p:?}").contains("s3cret"), "kept out of logs");
        assert!(p.check("/sessions", &h("Bearer nope")).is_err());
        assert!(p.check("/sessions", &h("s3cret")).is_err());
        assert!(
            p.check("/sessions", &headers(&[("host", "localhost")]))
                .is_err()
        );
        assert!(
            p.check("/healthz", &headers(&[("host", "localhost")]))
                .is_ok()
        );
    }
}
