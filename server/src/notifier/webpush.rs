//! Web Push (RFC 8030) for the web app: the payload encrypted for the browser (aes128gcm,
//! RFC 8291, by `web-push-native`) and the request signed with the server's VAPID key
//! (RFC 8292: an ES256 JWT for the push service's origin, with the public key beside it).

use std::time::Duration;

use axum::http::Uri;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use p256::ecdsa::signature::Signer as _;
use serde_json::{Value, json};
use web_push_native::{Auth, WebPushBuilder};

use super::Failure;
use super::message::Notification;
use super::store::{Vapid, WebKeys, WebSubscription};

/// How long a push service keeps a message for an offline browser (RFC 8030 `TTL`).
const TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a VAPID token is valid (RFC 8292 allows at most 24 hours).
const TOKEN_LIFE_S: u64 = 12 * 60 * 60;

/// What the service worker receives (decrypted): enough to show the notification and open
/// the session on a click.
pub(crate) fn payload(n: &Notification) -> Value {
    let mut p = json!({
        "title": n.trigger.title(),
        "body": n.body,
        "trigger": n.trigger.as_str(),
        "sessionId": n.session_id,
        "url": n.app_link(),
        "tag": n.key,
    });
    if let Some(id) = &n.request_id {
        p["requestId"] = id.clone().into();
    }
    p
}

/// The origin (`scheme://host[:port]`) of a push endpoint: the VAPID token's audience.
fn origin(endpoint: &Uri) -> Option<String> {
    Some(format!(
        "{}://{}",
        endpoint.scheme_str()?,
        endpoint.authority()?.as_str()
    ))
}

/// `Authorization: vapid t=<JWT>, k=<public key>` for `endpoint`.
pub(crate) fn vapid_header(
    vapid: &Vapid,
    endpoint: &Uri,
    subject: &str,
    now_s: u64,
) -> Option<String> {
    let header = B64.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
    let claims = json!({"aud": origin(endpoint)?, "exp": now_s + TOKEN_LIFE_S, "sub": subject});
    let claims = B64.encode(claims.to_string());
    let signing_input = format!("{header}.{claims}");
    let signature: p256::ecdsa::Signature = vapid.key.sign(signing_input.as_bytes());
    let jwt = format!("{signing_input}.{}", B64.encode(signature.to_bytes()));
    Some(format!("vapid t={jwt}, k={}", vapid.public))
}

/// Checks a browser's subscription keys: a P-256 point and a 16-byte secret.
pub(crate) fn check_keys(keys: &WebKeys) -> Result<(p256::PublicKey, Auth), String> {
    let point = B64
        .decode(keys.p256dh.trim_end_matches('='))
        .map_err(|_| "keys.p256dh: not base64url".to_owned())?;
    let public = p256::PublicKey::from_sec1_bytes(&point)
        .map_err(|_| "keys.p256dh: not a P-256 public key".to_owned())?;
    let auth = B64
        .decode(keys.auth.trim_end_matches('='))
        .map_err(|_| "keys.auth: not base64url".to_owned())?;
    if auth.len() != 16 {
        return Err("keys.auth: must be 16 bytes".into());
    }
    Ok((public, Auth::clone_from_slice(&auth)))
}

/// Checks an endpoint: `https://`, or `http://` to a loopback address (a local push service,
/// or a test's).
pub(crate) fn check_endpoint(endpoint: &str) -> Result<Uri, String> {
    let uri: Uri = endpoint
        .parse()
        .map_err(|_| "endpoint: not a URL".to_owned())?;
    let host = uri.host().unwrap_or("");
    let loopback = host == "localhost"
        || host
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match uri.scheme_str() {
        Some("https") if !host.is_empty() => Ok(uri),
        Some("http") if loopback => Ok(uri),
        _ => Err("endpoint: must be an https:// URL".into()),
    }
}

/// Sends `n` to one subscription.
pub(crate) async fn send(
    http: &reqwest::Client,
    vapid: &Vapid,
    subject: &str,
    sub: &WebSubscription,
    n: &Notification,
    timeout: Duration,
) -> Result<(), Failure> {
    let endpoint = check_endpoint(&sub.endpoint).map_err(Failure::Fail)?;
    let (public, auth) = check_keys(&sub.keys).map_err(Failure::Gone)?;
    let now_s = crate::clock::now_ms() / 1000;
    let authorization = vapid_header(vapid, &endpoint, subject, now_s)
        .ok_or_else(|| Failure::Fail("endpoint has no origin".into()))?;
    let body = payload(n).to_string();
    let mut request = WebPushBuilder::new(endpoint, public, auth)
        .with_valid_duration(TTL)
        .build(body)
        .map_err(|e| Failure::Fail(format!("cannot encrypt: {e}")))?;
    let headers = request.headers_mut();
    let authorization = authorization
        .parse()
        .map_err(|_| Failure::Fail("bad authorization header".into()))?;
    headers.insert("authorization", authorization);
    let urgency = if n.trigger.urgent() { "high" } else { "normal" };
    headers.insert("urgency", axum::http::HeaderValue::from_static(urgency));
    let mut request = reqwest::Request::try_from(request)
        .map_err(|e| Failure::Fail(format!("bad request: {e}")))?;
    *request.timeout_mut() = Some(timeout);
    let resp = http.execute(request).await.map_err(|e| {
        Failure::Retry(format!(
            "cannot reach the push service: {}",
            e.without_url()
        ))
    })?;
    let status = resp.status();
    match status.as_u16() {
        200..=299 => Ok(()),
        // The browser unsubscribed, or the subscription expired (RFC 8030 §7.3).
        404 | 410 => Err(Failure::Gone(format!("the push service answered {status}"))),
        429 | 500..=599 => Err(Failure::Retry(format!(
            "the push service answered {status}"
        ))),
        _ => Err(Failure::Fail(format!("the push service answered {status}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_or_loopback() {
        assert!(check_endpoint("https://fcm.googleapis.com/fcm/send/abc").is_ok());
        assert!(check_endpoint("http://127.0.0.1:4000/push/1").is_ok());
        assert!(check_endpoint("http://[::1]:4000/push/1").is_ok());
        assert!(check_endpoint("http://push.example/1").is_err());
        assert!(check_endpoint("file:///etc/passwd").is_err());
        assert!(check_endpoint("nonsense").is_err());
    }
}
