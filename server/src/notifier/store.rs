//! What the notifier keeps on disk: Expo tokens (amarre's file format), Web Push subscriptions,
//! the VAPID key, and which notifications were already sent. Every file is written whole,
//! atomically and private (0600), so a crash never leaves half a file and a restart never
//! sends a notification twice.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::NotifyError;

/// Reads a JSON file; a missing one is `T::default()` (its directory is created, private).
pub(crate) fn load<T: DeserializeOwned + Default>(path: &Path) -> Result<T, NotifyError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| NotifyError::Store {
            path: path.to_owned(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                create_private_dir(dir).map_err(|e| NotifyError::io(dir, e))?;
            }
            Ok(T::default())
        }
        Err(e) => Err(NotifyError::io(path, e)),
    }
}

/// Writes `value` as pretty JSON (what amarre writes), atomically and private.
pub(crate) fn save<T: Serialize>(path: &Path, value: &T) -> Result<(), NotifyError> {
    let mut body = serde_json::to_vec_pretty(value).map_err(|e| NotifyError::Store {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    body.push(b'\n');
    crate::keeper::fsio::write_private(path, &body).map_err(|e| NotifyError::io(path, e))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// One Expo push token, as amarre stores and lists it; `user` (who registered it) is
/// moorline's and never listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ExpoToken {
    /// `ExponentPushToken[…]` or `ExpoPushToken[…]`.
    pub token: String,
    /// The device's name, at most 64 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_name: Option<String>,
    /// `ios`, `android` or `web`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// When it was registered, ms since the epoch.
    pub registered_at: u64,
    /// Who registered it: a tailnet login, `token` or `local` (files written by amarre have
    /// none: `local`).
    #[serde(default = "local", skip_serializing_if = "is_local")]
    pub user: String,
}

impl ExpoToken {
    /// The entry as amarre lists it (without its owner).
    pub(crate) fn public(&self) -> crate::wire::PushToken {
        crate::wire::PushToken {
            token: self.token.clone(),
            device_name: self.device_name.clone(),
            platform: self.platform.clone(),
            registered_at: self.registered_at,
        }
    }
}

fn local() -> String {
    "local".into()
}

fn is_local(user: &str) -> bool {
    user == "local"
}

/// amarre's token check: `ExponentPushToken[…]` or `ExpoPushToken[…]`, at most 200 characters.
pub(crate) fn is_expo_token(token: &str) -> bool {
    token.len() <= 200
        && (token.starts_with("ExponentPushToken[") || token.starts_with("ExpoPushToken["))
        && token.ends_with(']')
}

/// A browser's Web Push subscription (what `PushManager.subscribe()` returns), with its owner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WebSubscription {
    /// The push service URL to POST to.
    pub endpoint: String,
    /// The browser's keys.
    pub keys: WebKeys,
    /// Who subscribed: a tailnet login, `token` or `local`.
    pub user: String,
    /// When, ms since the epoch.
    pub created_at: u64,
}

/// The keys of a [`WebSubscription`], base64url as browsers give them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WebKeys {
    /// The browser's P-256 public key (65 bytes, uncompressed).
    pub p256dh: String,
    /// The shared authentication secret (16 bytes).
    pub auth: String,
}

impl From<crate::wire::WebPushKeys> for WebKeys {
    fn from(keys: crate::wire::WebPushKeys) -> Self {
        Self {
            p256dh: keys.p256dh,
            auth: keys.auth,
        }
    }
}

/// Keys of notifications already sent, oldest first, bounded: enough to outlast any request
/// or run a restart could bring back.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Sent {
    sent: VecDeque<String>,
    #[serde(skip)]
    index: HashSet<String>,
}

/// How many sent keys are remembered.
const SENT_KEPT: usize = 4096;

impl Sent {
    pub(crate) fn load(path: &Path) -> Result<Self, NotifyError> {
        let mut sent: Sent = load(path)?;
        sent.index = sent.sent.iter().cloned().collect();
        Ok(sent)
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.index.contains(key)
    }

    /// Remembers `key`; false if it already was.
    pub(crate) fn insert(&mut self, key: &str) -> bool {
        if !self.index.insert(key.to_owned()) {
            return false;
        }
        self.sent.push_back(key.to_owned());
        while self.sent.len() > SENT_KEPT {
            if let Some(old) = self.sent.pop_front() {
                self.index.remove(&old);
            }
        }
        true
    }
}

/// The server's VAPID key pair (RFC 8292): the private key never leaves `path`.
#[derive(Debug)]
pub(crate) struct Vapid {
    pub(crate) key: p256::ecdsa::SigningKey,
    /// The public key, uncompressed, base64url: what browsers subscribe with.
    pub(crate) public: String,
}

impl Vapid {
    /// Reads the key at `path`, or generates one there (0600) the first time.
    pub(crate) fn load_or_create(path: &Path) -> Result<Self, NotifyError> {
        let bad = |message: String| NotifyError::Store {
            path: path.to_owned(),
            message,
        };
        let key = match std::fs::read_to_string(path) {
            Ok(text) => {
                let raw = B64
                    .decode(text.trim())
                    .map_err(|e| bad(format!("not base64url: {e}")))?;
                p256::ecdsa::SigningKey::from_slice(&raw)
                    .map_err(|_| bad("not a P-256 private key".into()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = generate_key().map_err(|e| NotifyError::io(path, e))?;
                if let Some(dir) = path.parent() {
                    create_private_dir(dir).map_err(|e| NotifyError::io(dir, e))?;
                }
                let text = format!("{}\n", B64.encode(key.to_bytes()));
                crate::keeper::fsio::write_private(path, text.as_bytes())
                    .map_err(|e| NotifyError::io(path, e))?;
                tracing::info!(path = %path.display(), "generated the Web Push (VAPID) key");
                key
            }
            Err(e) => return Err(NotifyError::io(path, e)),
        };
        let public = B64.encode(key.verifying_key().to_encoded_point(false).as_bytes());
        Ok(Self { key, public })
    }
}

/// A fresh P-256 key from the OS's randomness.
fn generate_key() -> std::io::Result<p256::ecdsa::SigningKey> {
    for _ in 0..16 {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Out of range (or zero) with probability ~2^-32: draw again.
        if let Ok(key) = p256::ecdsa::SigningKey::from_slice(&raw) {
            return Ok(key);
        }
    }
    Err(std::io::Error::other("cannot draw a P-256 key"))
}

/// Where the notifier's files live.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub(crate) expo_tokens: PathBuf,
    pub(crate) web_subscriptions: PathBuf,
    pub(crate) vapid_key: PathBuf,
    pub(crate) sent: PathBuf,
}

impl Paths {
    pub(crate) fn new(state_dir: &Path, expo_tokens: Option<&Path>) -> Self {
        let dir = state_dir.join("notify");
        Self {
            expo_tokens: expo_tokens.map_or_else(|| dir.join("expo-tokens.json"), Path::to_owned),
            web_subscriptions: dir.join("web-subscriptions.json"),
            vapid_key: dir.join("vapid.key"),
            sent: dir.join("sent.json"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expo_tokens_are_checked_like_amarre() {
        assert!(is_expo_token("ExponentPushToken[abcdef0123456789ABCDEF]"));
        assert!(is_expo_token("ExpoPushToken[x]"));
        assert!(!is_expo_token("ExponentPushToken[abc"));
        assert!(!is_expo_token("garbage"));
        assert!(!is_expo_token(""));
        assert!(!is_expo_token(&format!(
            "ExpoPushToken[{}]",
            "a".repeat(200)
        )));
    }

    #[test]
    fn sent_keys_survive_a_reload_and_stay_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("notify/sent.json");
        let mut sent = Sent::load(&path).expect("empty");
        assert!(sent.insert("a/request/1"));
        assert!(!sent.insert("a/request/1"));
        save(&path, &sent).expect("save");
        let again = Sent::load(&path).expect("reload");
        assert!(again.contains("a/request/1"));
        let mut many = Sent::default();
        for i in 0..SENT_KEPT + 10 {
            many.insert(&i.to_string());
        }
        assert!(!many.contains("0") && many.contains(&(SENT_KEPT + 9).to_string()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_vapid_key_is_made_once_and_kept_private() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("notify/vapid.key");
        let first = Vapid::load_or_create(&path).expect("create");
        let second = Vapid::load_or_create(&path).expect("load");
        assert_eq!(first.public, second.public);
        assert_eq!(B64.decode(&first.public).expect("b64").len(), 65);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "nonsense").expect("write");
        assert!(Vapid::load_or_create(&path).is_err());
    }
}
