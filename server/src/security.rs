//! Who may talk to the server: `Host` and `Origin` checks, the optional bearer token, and the
//! identity of each request.
//!
//! moorline listens on loopback (and/or a Unix socket), but loopback is reachable by every local
//! process and, through DNS rebinding, by any web page the user opens. So every request must
//! name an allowed host; a browser request must come from an allowed (or the same) origin,
//! whatever its content type (a form POST needs no preflight); and when a token is configured,
//! every request but `GET /healthz` must carry it. The Host check applies on the Unix socket
//! too: `tailscale serve` forwards browsers' requests there, and a rebinding page reached
//! through it would come with its victim's tailnet identity.
//!
//! # Identity
//!
//! Every request gets an [`Identity`] (a request extension, read with the [`Identity`]
//! extractor):
//! - the tailnet login in `Tailscale-User-Login`, when the header can be believed: on the Unix
//!   socket, where only tailscaled and the server's own user can connect (and tailscaled
//!   replaces any such header a client sent), or on TCP with `trust_tailscale_headers_on_tcp`;
//! - else `token`, when the request carried the configured bearer token;
//! - else `anonymous`, when it says it was forwarded by a proxy (`X-Forwarded-For`, or
//!   `Tailscale-Funnel-Request`): tailscale serve leaves the login out for Funnel (the public
//!   internet) and tagged devices, and such a request is not a local one;
//! - else `local`.
//!
//! A login is not believed when the request was forwarded from one of this machine's own
//! addresses (see [`forwarded_from_this_machine`]): it is then `anonymous` (or `token`).
//!
//! With `allowed_users` set, a request is let in only if its identity is listed (logins compare
//! without regard to case), or it carried the bearer token: the token is an operator credential.
//! `local` and `anonymous` are let in only if listed. An instance's own `allowed_users` applies
//! the same rule to its sessions.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::config::{Config, Secret};
use crate::error::ApiError;

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// The TCP port.
    Tcp,
    /// The Unix socket.
    Unix,
}

impl Via {
    /// `tcp` or `unix`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Via::Tcp => "tcp",
            Via::Unix => "unix",
        }
    }
}

/// Where an [`Identity`] comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// A believed `Tailscale-User-Login` header.
    Tailnet,
    /// The bearer token.
    Token,
    /// Nothing: a local process.
    Local,
    /// Nothing, from behind a proxy (tailscale serve for Funnel or tagged devices).
    Anonymous,
}

impl Source {
    /// The name used in `/me`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Source::Tailnet => "tailnet",
            Source::Token => "token",
            Source::Local => "local",
            Source::Anonymous => "anonymous",
        }
    }
}

/// Who a request comes from (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// The tailnet login, or `token`, `local` or `anonymous`.
    pub user: Arc<str>,
    /// The display name from `Tailscale-User-Name`, with a tailnet login.
    pub name: Option<String>,
    /// The listener it came in on.
    pub via: Via,
    /// What the identity rests on.
    pub source: Source,
}

impl Identity {
    /// Whether this identity may act where `allowed` applies (empty: no restriction).
    pub(crate) fn allowed_by(&self, allowed: &[String]) -> bool {
        allowed.is_empty()
            || self.source == Source::Token
            || allowed.iter().any(|a| a.eq_ignore_ascii_case(&self.user))
    }

    /// [`Self::allowed_by`] for an instance's sessions, as the API's 403.
    pub(crate) fn check_instance(
        &self,
        instance: &crate::session::Instance,
    ) -> Result<(), ApiError> {
        if self.allowed_by(&instance.config.allowed_users) {
            return Ok(());
        }
        Err(ApiError::ForbiddenUser {
            user: self.user.to_string(),
            instance: Some(instance.config.id.clone()),
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Identity {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // The guard sets it on every request; a route outside the guard has no identity.
        Ok(parts
            .extensions
            .get::<Identity>()
            .cloned()
            .unwrap_or_else(|| Identity {
                user: Arc::from("anonymous"),
                name: None,
                via: Via::Tcp,
                source: Source::Anonymous,
            }))
    }
}

/// The access rules of one server.
#[derive(Debug, Clone)]
pub(crate) struct AccessPolicy {
    hosts: HashSet<String>,
    origins: HashSet<String>,
    token: Option<Secret>,
    trust_tcp: bool,
    allowed_users: Vec<String>,
}

impl AccessPolicy {
    /// Rules from the configuration. `bound` is the TCP address actually listened on, if any;
    /// `names` are this machine's names (hostname, tailnet names).
    pub(crate) fn new(
        config: &Config,
        token: Option<Secret>,
        bound: Option<SocketAddr>,
        names: Vec<String>,
    ) -> Self {
        let mut hosts: HashSet<String> = ["localhost".to_owned()].into_iter().collect();
        hosts.extend(bound.map(|b| b.ip().to_string()));
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
            trust_tcp: config.trust_tailscale_headers_on_tcp,
            allowed_users: config.allowed_users.clone(),
        }
    }

    /// Checks a request that came in `via` a listener and tells who sent it: the tailnet
    /// login, `token`, `anonymous` or `local` (see the module docs), refused with 403 if
    /// `allowed_users` does not let it in.
    pub(crate) fn identify(
        &self,
        via: Via,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<Identity, ApiError> {
        let token = self.check(path, headers)?;
        let trusted = via == Via::Unix || self.trust_tcp;
        let login = trusted
            .then(|| header_text(headers, "tailscale-user-login"))
            .flatten()
            .filter(|login| {
                let Some(from) = forwarded_from_this_machine(headers) else {
                    return true;
                };
                tracing::warn!(
                    %login, from = %from, path, via = via.as_str(),
                    "a request from this machine through tailscale serve was not trusted: \
                     the login tailscaled gave it is this machine's, not its sender's, so it is ignored"
                );
                false
            });
        let identity = match login {
            Some(login) => Identity {
                user: Arc::from(login),
                name: header_text(headers, "tailscale-user-name"),
                via,
                source: Source::Tailnet,
            },
            None => {
                let proxied = headers.contains_key("x-forwarded-for")
                    || headers.contains_key("tailscale-funnel-request");
                let source = if token {
                    Source::Token
                } else if proxied {
                    Source::Anonymous
                } else {
                    Source::Local
                };
                Identity {
                    user: Arc::from(source.as_str()),
                    name: None,
                    via,
                    source,
                }
            }
        };
        if path != "/healthz" && !identity.allowed_by(&self.allowed_users) {
            return Err(ApiError::ForbiddenUser {
                user: identity.user.to_string(),
                instance: None,
            });
        }
        Ok(identity)
    }

    /// Whether a token is required.
    pub(crate) fn requires_token(&self) -> bool {
        self.token.is_some()
    }

    /// Checks one request's headers. True if it carried the (configured) bearer token.
    pub(crate) fn check(&self, path: &str, headers: &HeaderMap) -> Result<bool, ApiError> {
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
            return Ok(false);
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
            return Ok(true);
        }
        Ok(false)
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

/// Where a forwarded request came from, if that is this machine: the client address the proxy
/// put last in `X-Forwarded-For`, when it is a loopback address or an address of any local
/// interface (read afresh with `getifaddrs` on every call, so a changed address counts at once).
/// `None` if the request carries no such header or came from elsewhere.
///
/// Why: `tailscale serve` also answers connections this machine makes to its own tailnet
/// address, and stamps them with this machine's identity, i.e. its owner's login. Agents in
/// `runc` containers cannot reach loopback, but they can reach the host's other addresses, the
/// tailnet one included; without this rule a contained agent would reach the control plane as
/// the owner. Nobody needs tailscale serve to reach moorline from the machine itself (the
/// socket and loopback are right there), so such a request gets no tailnet identity.
///
/// Why the last entry: tailscale serve replaces any `X-Forwarded-For` a client sent with the
/// one address it accepted the connection from; a proxy that appends instead (Go's
/// `ReverseProxy` without `Rewrite`, nginx) puts its own observation last too, and every earlier
/// entry is whatever the client claimed. Fails closed: an unreadable last entry, or interfaces
/// that cannot be listed, count as this machine.
pub(crate) fn forwarded_from_this_machine(headers: &HeaderMap) -> Option<String> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = String::from_utf8_lossy(last.as_bytes());
    let entry = entry.rsplit(',').next().unwrap_or_default().trim();
    let Some(ip) = parse_forwarded_ip(entry) else {
        return Some(format!("unreadable X-Forwarded-For entry {entry:?}"));
    };
    let ip = ip.to_canonical();
    if ip.is_loopback() || ip.is_unspecified() {
        return Some(ip.to_string());
    }
    match local_addresses() {
        Ok(local) if !local.contains(&ip) => None,
        Ok(_) => Some(ip.to_string()),
        Err(e) => Some(format!("{ip} (local addresses unknown: {e})")),
    }
}

/// An `X-Forwarded-For` entry as an address: `1.2.3.4`, `::1`, `fe80::1%eth0`, or with a port
/// (`1.2.3.4:80`, `[::1]:80`) or brackets (`[::1]`).
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    let bare = entry.trim_start_matches('[').trim_end_matches(']');
    let bare = bare.split_once('%').map_or(bare, |(ip, _zone)| ip);
    bare.parse().ok()
}

/// The addresses of every local interface, loopback included.
fn local_addresses() -> nix::Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| {
            let addr = ifa.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| IpAddr::V6(v6.ip()).to_canonical())
            }
        })
        .collect())
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

/// A header's value as text: RFC 2047 encoded words (tailscaled encodes non-ASCII names that
/// way) decoded, control characters dropped, at most 256 characters. `None` if absent or empty.
fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    let raw = headers.get(name)?.as_bytes();
    let text = decode_words(&String::from_utf8_lossy(raw));
    let clean: String = text.chars().filter(|c| !c.is_control()).take(256).collect();
    let clean = clean.trim();
    (!clean.is_empty()).then(|| clean.to_owned())
}

/// Decodes RFC 2047 `=?charset?Q?...?=` words (UTF-8 or ASCII); anything else is kept as is.
fn decode_words(text: &str) -> String {
    let mut out = String::new();
    let mut last_was_word = false;
    for (i, part) in text.split(' ').enumerate() {
        match decode_word(part) {
            Some(decoded) => {
                // Space between two encoded words is not part of the text.
                if i > 0 && !last_was_word {
                    out.push(' ');
                }
                out.push_str(&decoded);
                last_was_word = true;
            }
            None => {
                if i > 0 {
                    out.push(' ');
                }
                out.push_str(part);
                last_was_word = false;
            }
        }
    }
    out
}

fn decode_word(word: &str) -> Option<String> {
    let inner = word.strip_prefix("=?")?.strip_suffix("?=")?;
    let mut parts = inner.splitn(3, '?');
    let charset = parts.next()?;
    let encoding = parts.next()?;
    let data = parts.next()?;
    if !(charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("us-ascii"))
        || !encoding.eq_ignore_ascii_case("q")
    {
        return None;
    }
    let mut bytes = Vec::with_capacity(data.len());
    let mut it = data.bytes();
    while let Some(b) = it.next() {
        match b {
            b'_' => bytes.push(b' '),
            b'=' => {
                let hex = [it.next()?, it.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
            }
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).ok()
}

/// What the guard of one listener needs.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    /// The rules.
    pub policy: Arc<AccessPolicy>,
    /// The listener the guarded router serves.
    pub via: Via,
}

/// Middleware applying the policy to every request and recording its [`Identity`].
pub(crate) async fn guard(State(gate): State<Gate>, mut req: Request, next: Next) -> Response {
    match gate
        .policy
        .identify(gate.via, req.uri().path(), req.headers())
    {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        Err(e) => {
            tracing::warn!(path = %req.uri().path(), via = gate.via.as_str(), reason = %e, "request refused");
            e.into_response()
        }
    }
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
            Some("127.0.0.1:8341".parse().expect("addr")),
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

    fn users(allowed: &[&str], token: Option<&str>, trust_tcp: bool) -> AccessPolicy {
        let config = Config {
            allowed_users: allowed.iter().map(|s| (*s).to_owned()).collect(),
            trust_tailscale_headers_on_tcp: trust_tcp,
            ..Config::default()
        };
        AccessPolicy::new(&config, token.map(Secret::new), None, Vec::new())
    }

    fn who(p: &AccessPolicy, via: Via, pairs: &[(&'static str, &str)]) -> Result<String, String> {
        let mut all = vec![("host", "localhost")];
        all.extend_from_slice(pairs);
        p.identify(via, "/sessions", &headers(&all))
            .map(|i| i.user.to_string())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn tailnet_headers_are_believed_on_the_socket_only() {
        let p = users(&[], None, false);
        let alice = [("tailscale-user-login", "alice@example.com")];
        assert_eq!(
            who(&p, Via::Unix, &alice).as_deref(),
            Ok("alice@example.com")
        );
        assert_eq!(
            who(&p, Via::Tcp, &alice).as_deref(),
            Ok("local"),
            "forged on TCP"
        );
        let p = users(&[], None, true);
        assert_eq!(
            who(&p, Via::Tcp, &alice).as_deref(),
            Ok("alice@example.com"),
            "opt-in"
        );
        let p = users(&[], Some("s3cret"), false);
        let with_token = [
            ("tailscale-user-login", "alice@example.com"),
            ("authorization", "Bearer s3cret"),
        ];
        assert_eq!(who(&p, Via::Tcp, &with_token).as_deref(), Ok("token"));
        assert_eq!(
            who(&p, Via::Unix, &with_token).as_deref(),
            Ok("alice@example.com")
        );
        let p = users(&[], None, false);
        for proxied in [
            ("x-forwarded-for", "100.64.0.1"),
            ("tailscale-funnel-request", "?1"),
        ] {
            assert_eq!(who(&p, Via::Unix, &[proxied]).as_deref(), Ok("anonymous"));
        }
    }

    #[test]
    fn allowed_users_let_in_listed_logins_and_the_token() {
        let p = users(&["Alice@Example.com", "local"], None, false);
        let login = |l: &'static str| [("tailscale-user-login", l)];
        assert!(who(&p, Via::Unix, &login("alice@example.com")).is_ok());
        let e = who(&p, Via::Unix, &login("mallory@example.com")).expect_err("refused");
        assert!(e.contains("mallory@example.com"), "{e}");
        assert_eq!(
            who(&p, Via::Tcp, &login("mallory@example.com")).as_deref(),
            Ok("local")
        );
        assert!(who(&p, Via::Unix, &[("x-forwarded-for", "1.2.3.4")]).is_err());
        let p = users(&["alice@example.com"], Some("s3cret"), false);
        assert!(who(&p, Via::Tcp, &[]).is_err(), "no token: refused");
        let bearer = [("authorization", "Bearer s3cret")];
        assert_eq!(who(&p, Via::Tcp, &bearer).as_deref(), Ok("token"));
        let p = users(&["alice@example.com"], None, false);
        assert!(who(&p, Via::Tcp, &[]).is_err(), "local is not listed");
        assert!(
            p.identify(Via::Tcp, "/healthz", &headers(&[("host", "localhost")]))
                .is_ok(),
            "health checks stay open"
        );
    }

    /// An address of a local interface other than loopback, if this machine has one (else a
    /// loopback one): what a contained agent's connection to the host comes from.
    fn an_interface_address() -> IpAddr {
        let local = local_addresses().expect("getifaddrs");
        local
            .iter()
            .copied()
            .find(|ip| !ip.is_loopback())
            .or_else(|| local.first().copied())
            .expect("some local address")
    }

    #[test]
    fn requests_tailscale_serve_forwarded_from_this_machine_get_no_login() {
        let here = an_interface_address().to_string();
        let remote = "100.64.0.9";
        assert!(
            !local_addresses()
                .expect("getifaddrs")
                .contains(&remote.parse().expect("ip")),
            "{remote} must not be this machine's for this test"
        );
        let alice = ("tailscale-user-login", "alice@example.com");
        let p = users(&[], None, false);
        for local in ["127.0.0.1", "127.0.0.53", "::1", "::ffff:127.0.0.1", &here] {
            let from = [alice, ("x-forwarded-for", local)];
            assert_eq!(
                who(&p, Via::Unix, &from).as_deref(),
                Ok("anonymous"),
                "{local}"
            );
        }
        assert_eq!(
            who(&p, Via::Unix, &[alice, ("x-forwarded-for", remote)]).as_deref(),
            Ok("alice@example.com"),
            "another tailnet device"
        );
        assert_eq!(
            who(&p, Via::Unix, &[alice]).as_deref(),
            Ok("alice@example.com"),
            "not forwarded"
        );
        // Only the entry the proxy added counts: earlier ones are the client's claims.
        let claimed = format!("{remote}, {here}");
        let appended = [alice, ("x-forwarded-for", claimed.as_str())];
        assert_eq!(who(&p, Via::Unix, &appended).as_deref(), Ok("anonymous"));
        let claimed = format!("{here}, {remote}");
        let appended = [alice, ("x-forwarded-for", claimed.as_str())];
        assert_eq!(
            who(&p, Via::Unix, &appended).as_deref(),
            Ok("alice@example.com")
        );
        let garbage = [alice, ("x-forwarded-for", "not an address")];
        assert_eq!(
            who(&p, Via::Unix, &garbage).as_deref(),
            Ok("anonymous"),
            "fails closed"
        );
        // The same rule with the TCP opt-in; the token still counts as the operator.
        let p = users(&[], Some("s3cret"), true);
        let with_token = [
            alice,
            ("x-forwarded-for", "127.0.0.1"),
            ("authorization", "Bearer s3cret"),
        ];
        assert_eq!(who(&p, Via::Tcp, &with_token).as_deref(), Ok("token"));
        // With `allowed_users`, such a request is refused unless `anonymous` is listed.
        let from_here = [alice, ("x-forwarded-for", here.as_str())];
        let p = users(&["alice@example.com"], None, false);
        let e = who(&p, Via::Unix, &from_here).expect_err("refused");
        assert!(e.contains("anonymous"), "{e}");
        let p = users(&["alice@example.com", "anonymous"], None, false);
        assert_eq!(who(&p, Via::Unix, &from_here).as_deref(), Ok("anonymous"));
    }

    #[test]
    fn forwarded_addresses_are_read_with_ports_brackets_and_zones() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        for (entry, want) in [
            ("1.2.3.4", ip("1.2.3.4")),
            ("1.2.3.4:8080", ip("1.2.3.4")),
            ("::1", ip("::1")),
            ("[::1]", ip("::1")),
            ("[::1]:443", ip("::1")),
            ("fe80::1%eth0", ip("fe80::1")),
        ] {
            assert_eq!(parse_forwarded_ip(entry), Some(want), "{entry}");
        }
        assert_eq!(parse_forwarded_ip("unknown"), None);
        assert_eq!(parse_forwarded_ip(""), None);
        let h = |v: &str| headers(&[("x-forwarded-for", v)]);
        assert!(forwarded_from_this_machine(&HeaderMap::new()).is_none());
        assert!(forwarded_from_this_machine(&h("100.64.0.9")).is_none());
        assert_eq!(
            forwarded_from_this_machine(&h("127.0.0.1")).as_deref(),
            Some("127.0.0.1")
        );
    }

    #[test]
    fn encoded_names_are_decoded() {
        assert_eq!(decode_words("=?utf-8?q?Ren=C3=A9_Dupont?="), "René Dupont");
        assert_eq!(decode_words("=?utf-8?q?a?= =?utf-8?q?b?="), "ab");
        assert_eq!(decode_words("plain name"), "plain name");
        assert_eq!(decode_words("=?utf-8?q?bad=Z?="), "=?utf-8?q?bad=Z?=");
        let h = headers(&[("tailscale-user-name", "=?utf-8?q?Zo=C3=AB?=")]);
        assert_eq!(
            header_text(&h, "tailscale-user-name").as_deref(),
            Some("Zoë")
        );
    }
}
