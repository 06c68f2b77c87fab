//! TLS for moorline's own outgoing HTTPS: the `moorline` client talking to a server on another
//! machine (behind `tailscale serve`) and the notifier posting to push services and webhooks.
//! One crypto provider (ring) and the system's trusted roots, so both trust the same servers.

use std::sync::Arc;

/// Makes ring the process's default TLS crypto provider (once; later calls do nothing), for
/// HTTP clients built without an explicit TLS configuration (reqwest refuses to build one
/// otherwise, even for `http://` use).
pub fn install_provider() {
    // An error only means a provider is already installed, which is just as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client configuration checking certificates against the system's trusted roots
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` are honoured).
pub(crate) fn client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map(|b| b.with_no_client_auth())
}
