//! Notifications: telling the person when an agent needs them, on their phone or desktop.
//!
//! The notifier follows the session event bus ([`crate::events`]), decides with `rules`
//! when something is worth a notification (the same for every channel), and hands each one to
//! a bounded queue. A dispatcher delivers it through every channel: amarre's Expo push
//! (`expo`), Web Push for the web app (`webpush`) and a generic webhook (`webhook`), each
//! delivery retried with backoff, none ever waited on by a session. What was sent is kept on
//! disk ([`store`]), so a restarted server never sends it again.
//!
//! With tailnet identity, a token or subscription belongs to the user who registered it, and a
//! notification goes to the users allowed on the session's instance; without identity, every
//! registration is `local` and gets everything.

pub(crate) mod message;
mod rules;
pub(crate) mod store;

mod expo;
mod webhook;
mod webpush;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now_ms;
use crate::config::{Config, NotifyConfig};
use crate::events::Event;
use crate::metrics::Metrics;
use crate::session::{SessionManager, SessionSummary, Status};
pub(crate) use message::{Notification, Trigger};
use rules::{Armed, Decision, Rules};
use store::{ExpoToken, Paths, Sent, Vapid, WebKeys, WebSubscription};

/// Deliveries in flight at once, across channels.
const CONCURRENCY: usize = 8;

/// A notifier error: its files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotifyError {
    /// A file holds something else than expected.
    #[error("{}: {message}", path.display())]
    Store {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl NotifyError {
    fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Why a delivery failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Worth another try (no answer, 429, 5xx).
    Retry(String),
    /// Not worth another try.
    Fail(String),
    /// The target no longer exists: forget it.
    Gone(String),
}

/// Who registers or lists: the caller's user, and whether it sees only its own registrations
/// (a tailnet identity) or all of them (`local`, the bearer token).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller<'a> {
    /// A tailnet login, `token`, `local` or `anonymous`.
    pub user: &'a str,
    /// Only the caller's own registrations are visible to it.
    pub own_only: bool,
}

impl Caller<'_> {
    fn sees(&self, owner: &str) -> bool {
        !self.own_only || owner.eq_ignore_ascii_case(self.user)
    }
}

/// What `POST /push/tokens` was given, already shaped as amarre shapes it.
#[derive(Debug, Clone, Default)]
pub(crate) struct TokenRequest {
    /// The Expo token.
    pub token: String,
    /// The device's name (cut to 64 characters).
    pub device_name: Option<String>,
    /// `ios`, `android` or `web`; anything else is dropped.
    pub platform: Option<String>,
}

#[derive(Debug)]
struct WebPush {
    vapid: Vapid,
    subscriptions: Mutex<Vec<WebSubscription>>,
}

/// The notifier. Cheap to share; its tasks stop when the server does.
#[derive(Debug)]
pub(crate) struct Notifier {
    config: NotifyConfig,
    paths: Paths,
    /// `None`: amarre's push API is off (or its store could not be read).
    expo: Option<Mutex<Vec<ExpoToken>>>,
    /// `None`: Web Push is off (or its key could not be read).
    web: Option<WebPush>,
    webhook: Option<webhook::Webhook>,
    sent: Mutex<Sent>,
    /// `None`: TLS could not be set up; deliveries fail (and are counted).
    http: Option<reqwest::Client>,
    metrics: Arc<Metrics>,
    sessions: Arc<SessionManager>,
    queue: mpsc::Sender<Arc<Notification>>,
    /// The server is stopping: no new notification is taken.
    cancel: CancellationToken,
    /// `notify.shutdown_grace_ms` after `cancel`: deliveries still running are given up.
    give_up: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Notifier {
    /// Opens the notifier's stores and starts following `sessions`' events. A store that cannot
    /// be read turns its channel off (logged), as amarre does; the server still starts.
    pub(crate) fn start(
        config: &Config,
        sessions: Arc<SessionManager>,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        cancel: CancellationToken,
    ) -> Arc<Self> {
        let nc = config.notify.clone();
        let paths = Paths::new(&config.state_dir, nc.expo_tokens_path.as_deref());
        let expo = nc
            .expo_enabled()
            .then(|| match store::load::<Vec<ExpoToken>>(&paths.expo_tokens) {
                Ok(tokens) => Some(Mutex::new(tokens)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the Expo token store: push is off");
                    None
                }
            })
            .flatten();
        let web = nc
            .web_push
            .then(|| {
                let vapid = Vapid::load_or_create(&paths.vapid_key)
                    .inspect_err(|e| tracing::error!(error = %e, "cannot read the VAPID key: Web Push is off"))
                    .ok()?;
                let subs = store::load::<Vec<WebSubscription>>(&paths.web_subscriptions)
                    .inspect_err(|e| tracing::error!(error = %e, "cannot read the Web Push subscriptions: Web Push is off"))
                    .ok()?;
                Some(WebPush {
                    vapid,
                    subscriptions: Mutex::new(subs),
                })
            })
            .flatten();
        let webhook = nc.webhook_url.clone().and_then(|url| {
            let token = match &nc.webhook_token_file {
                Some(path) => match crate::config::read_token_file(path) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read notify.webhook_token_file: the webhook is off");
                        return None;
                    }
                },
                None => None,
            };
            Some(webhook::Webhook::new(
                url,
                nc.webhook_format,
                token,
                nc.public_url.clone(),
            ))
        });
        let sent = Sent::load(&paths.sent).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read which notifications were sent; starting afresh");
            Sent::default()
        });
        let http = http_client()
            .inspect_err(|e| tracing::error!(error = %e, "cannot set up HTTPS: no notification can be delivered"))
            .ok();
        let (queue, rx) = mpsc::channel(nc.queue);
        let give_up = CancellationToken::new();
        // Not tracked: a server with nothing left to deliver stops without waiting for it.
        tokio::spawn({
            let (cancel, give_up) = (cancel.clone(), give_up.clone());
            let grace = Duration::from_millis(nc.shutdown_grace_ms);
            async move {
                cancel.cancelled().await;
                tokio::time::sleep(grace).await;
                give_up.cancel();
            }
        });
        let notifier = Arc::new(Self {
            paths,
            expo,
            web,
            webhook,
            sent: Mutex::new(sent),
            http,
            metrics,
            sessions,
            queue,
            cancel,
            give_up,
            config: nc,
        });
        tracing::info!(
            expo = notifier.expo.is_some(),
            web_push = notifier.web.is_some(),
            webhook = notifier.webhook.is_some(),
            grace_ms = notifier.config.grace_ms,
            "notifications"
        );
        let events = notifier.sessions.events().subscribe();
        tracker.spawn(notifier.clone().follow(events));
        tracker.spawn(notifier.clone().dispatch(rx, tracker.clone()));
        notifier
    }

    // ----- the REST surface -----

    /// Whether amarre's push API is on.
    pub(crate) fn expo_enabled(&self) -> bool {
        self.expo.is_some()
    }

    /// The Expo tokens `caller` may see, in registration order. `None`: push is off.
    pub(crate) fn expo_tokens(&self, caller: Caller<'_>) -> Option<Vec<ExpoToken>> {
        let tokens = lock(self.expo.as_ref()?);
        Some(
            tokens
                .iter()
                .filter(|t| caller.sees(&t.user))
                .cloned()
                .collect(),
        )
    }

    /// Registers an Expo token; the first registration wins (later ones get it back, with
    /// `false`). `None`: push is off. `Some(Err)`: not an Expo token.
    pub(crate) fn register_expo(
        &self,
        caller: Caller<'_>,
        req: TokenRequest,
    ) -> Option<Result<(ExpoToken, bool), ()>> {
        let store = self.expo.as_ref()?;
        if !store::is_expo_token(&req.token) {
            return Some(Err(()));
        }
        let mut tokens = lock(store);
        if let Some(existing) = tokens.iter().find(|t| t.token == req.token) {
            return Some(Ok((existing.clone(), false)));
        }
        let entry = ExpoToken {
            token: req.token,
            device_name: req.device_name.map(|n| n.chars().take(64).collect()),
            platform: req
                .platform
                .filter(|p| matches!(p.as_str(), "ios" | "android" | "web")),
            registered_at: now_ms(),
            user: caller.user.to_owned(),
        };
        tokens.push(entry.clone());
        self.save_expo(&tokens);
        Some(Ok((entry, true)))
    }

    /// Forgets an Expo token (if `caller` may see it). `None`: push is off.
    pub(crate) fn unregister_expo(&self, caller: Caller<'_>, token: &str) -> Option<()> {
        let mut tokens = lock(self.expo.as_ref()?);
        let before = tokens.len();
        tokens.retain(|t| !(t.token == token && caller.sees(&t.user)));
        if tokens.len() != before {
            self.save_expo(&tokens);
        }
        Some(())
    }

    fn save_expo(&self, tokens: &[ExpoToken]) {
        if let Err(e) = store::save(&self.paths.expo_tokens, &tokens) {
            tracing::error!(error = %e, "cannot save the Expo token store");
        }
    }

    /// The VAPID public key browsers subscribe with. `None`: Web Push is off.
    pub(crate) fn web_public_key(&self) -> Option<&str> {
        self.web.as_ref().map(|w| w.vapid.public.as_str())
    }

    /// Adds (or, for the same endpoint, replaces) a browser's subscription. `None`: Web Push is
    /// off; `Some(Err)`: the subscription is unusable, with why; `Some(Ok(true))`: new.
    pub(crate) fn subscribe_web(
        &self,
        caller: Caller<'_>,
        endpoint: String,
        keys: WebKeys,
    ) -> Option<Result<bool, String>> {
        let web = self.web.as_ref()?;
        if let Err(e) = webpush::check_endpoint(&endpoint).and_then(|_| webpush::check_keys(&keys))
        {
            return Some(Err(e));
        }
        let mut subs = lock(&web.subscriptions);
        let existed = subs.iter().any(|s| s.endpoint == endpoint);
        subs.retain(|s| s.endpoint != endpoint);
        subs.push(WebSubscription {
            endpoint,
            keys,
            user: caller.user.to_owned(),
            created_at: now_ms(),
        });
        self.save_web(&subs);
        Some(Ok(!existed))
    }

    /// Removes a browser's subscription (if `caller` may see it). `None`: Web Push is off.
    pub(crate) fn unsubscribe_web(&self, caller: Caller<'_>, endpoint: &str) -> Option<()> {
        let web = self.web.as_ref()?;
        let mut subs = lock(&web.subscriptions);
        let before = subs.len();
        subs.retain(|s| !(s.endpoint == endpoint && caller.sees(&s.user)));
        if subs.len() != before {
            self.save_web(&subs);
        }
        Some(())
    }

    fn save_web(&self, subs: &[WebSubscription]) {
        if let Err(e) = store::save(&self.paths.web_subscriptions, &subs) {
            tracing::error!(error = %e, "cannot save the Web Push subscriptions");
        }
    }

    // ----- deciding -----

    fn count(&self, trigger: Trigger, outcome: &'static str) {
        self.metrics
            .notifications
            .get_or_create(&[("trigger", trigger.as_str()), ("outcome", outcome)])
            .inc();
    }

    fn count_delivery(&self, channel: &'static str, result: &'static str) {
        self.metrics
            .notification_deliveries
            .get_or_create(&[("channel", channel), ("result", result)])
            .inc();
    }

    /// Follows the event bus until the server stops.
    async fn follow(self: Arc<Self>, mut events: broadcast::Receiver<Arc<Event>>) {
        let mut rules = Rules::new(&self.config);
        self.resync(&mut rules);
        loop {
            let sleep = rules
                .next_due()
                .map(|due| tokio::time::sleep(Duration::from_millis(due.saturating_sub(now_ms()))));
            tokio::select! {
                event = events.recv() => match event {
                    Ok(event) => {
                        // A stopping server stops agents: that is no crash to report.
                        if self.cancel.is_cancelled() {
                            return;
                        }
                        let decisions = {
                            let sent = lock(&self.sent);
                            rules.on_event(&event, |k| sent.contains(k))
                        };
                        for d in decisions {
                            self.decided(d);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "the notifier fell behind the event bus; resynchronising");
                        self.resync(&mut rules);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                () = async { if let Some(s) = sleep { s.await } }, if rules.next_due().is_some() => {
                    for armed in rules.take_due(now_ms()) {
                        self.due(armed);
                    }
                }
                () = self.cancel.cancelled() => return,
            }
        }
    }

    /// Arms what waits now and forgets what no longer does: at startup (requests a previous
    /// run of the server saw are armed again, unless they were notified), and after missing
    /// events.
    fn resync(&self, rules: &mut Rules) {
        let now = now_ms();
        let mut waiting = Vec::new();
        for session in self.sessions.all() {
            if session.status() != Status::Running {
                continue;
            }
            for request in session.pending_approvals() {
                let sent = lock(&self.sent);
                let armed = rules.arm(session.id(), &request, now, session.input_seq(), &|k| {
                    sent.contains(k)
                });
                if armed == rules::Armament::Sent {
                    self.count(Trigger::AwaitingInput, "duplicate");
                }
                waiting.push(rules::request_key(
                    session.id(),
                    &request_id(&request).unwrap_or_default(),
                ));
            }
        }
        rules.retain(|a| waiting.contains(&a.key()));
    }

    fn decided(&self, decision: Decision) {
        match decision {
            Decision::Skip { trigger, outcome } => self.count(trigger, outcome),
            Decision::Notify {
                trigger,
                key,
                summary,
            } => self.notify(trigger, key, &summary, None),
        }
    }

    /// An armed request's grace period is over: notify, unless it was answered or a client
    /// was active on its session meanwhile.
    fn due(&self, armed: Armed) {
        let trigger = Trigger::AwaitingInput;
        let Some(session) = self.sessions.get(&armed.session_id) else {
            return self.count(trigger, "gone");
        };
        let still = session
            .pending_approvals()
            .iter()
            .any(|r| request_id(r).as_deref() == Some(&armed.request_id));
        if !still {
            return self.count(trigger, "answered");
        }
        if session.input_seq() > armed.inputs {
            return self.count(trigger, "client_active");
        }
        let summary = session.summary();
        self.notify(trigger, armed.key(), &summary, Some(&armed.request));
    }

    /// Builds the notification and queues it, once per key ever.
    fn notify(
        &self,
        trigger: Trigger,
        key: String,
        summary: &SessionSummary,
        request: Option<&Value>,
    ) {
        {
            let mut sent = lock(&self.sent);
            if !sent.insert(&key) {
                return self.count(trigger, "duplicate");
            }
            if let Err(e) = store::save(&self.paths.sent, &*sent) {
                tracing::error!(error = %e, "cannot save which notifications were sent");
            }
        }
        let session = self.sessions.get(&summary.id);
        let env: Vec<String> = session
            .as_ref()
            .map(|s| s.env_values().map(str::to_owned).collect())
            .unwrap_or_default();
        let allowed_users = session
            .as_ref()
            .and_then(|s| s.instance())
            .map(|i| i.config.allowed_users.clone())
            .unwrap_or_default();
        let tool = request.and_then(moorline_adapters::pipeline::request_tool);
        let text = match (trigger, request) {
            (Trigger::AwaitingInput, Some(r)) => message::awaiting(summary, r, tool.as_deref()),
            (Trigger::TurnFinished, _) => message::turn_finished(summary),
            _ => message::ended(summary),
        };
        let ended = matches!(trigger, Trigger::Exited | Trigger::Crashed);
        let n = Notification {
            key,
            trigger,
            session_id: summary.id.clone(),
            session_name: summary.name.clone(),
            instance_id: summary.instance_id.clone(),
            allowed_users,
            body: message::clean(
                &text,
                env.iter().map(String::as_str),
                self.config.max_text_chars,
            ),
            request_id: request.and_then(request_id),
            method: request.map(|r| r["method"].as_str().unwrap_or("confirm").to_owned()),
            tool,
            exit_code: summary.exit_code.filter(|_| ended),
            signal: summary.signal.clone().filter(|_| ended),
            at: now_ms(),
        };
        match self.queue.try_send(Arc::new(n)) {
            Ok(()) => self.count(trigger, "queued"),
            Err(_) => {
                tracing::warn!(trigger = trigger.as_str(), session = %summary.id, "the notification queue is full; dropping a notification");
                self.count(trigger, "dropped");
            }
        }
    }

    // ----- delivering -----

    /// Delivers queued notifications through every channel, a bounded number at once.
    async fn dispatch(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Arc<Notification>>,
        tracker: TaskTracker,
    ) {
        let slots = Arc::new(Semaphore::new(CONCURRENCY));
        loop {
            let n = tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => n,
                    None => return,
                },
                () = self.cancel.cancelled() => {
                    // What was queued before the stop still goes out, within the grace.
                    rx.close();
                    match rx.try_recv() {
                        Ok(n) => n,
                        Err(_) => return,
                    }
                }
            };
            if self.http.is_none() {
                self.count_delivery("all", "failed");
                continue;
            }
            if let Some(tokens) = self.expo_targets(&n) {
                self.spawn_delivery(&tracker, &slots, {
                    let this = self.clone();
                    let n = n.clone();
                    async move { this.deliver_expo(&n, tokens).await }
                })
                .await;
            }
            if let Some(web) = &self.web {
                let subs: Vec<WebSubscription> = lock(&web.subscriptions)
                    .iter()
                    .filter(|s| n.for_user(&s.user))
                    .cloned()
                    .collect();
                for sub in subs {
                    let this = self.clone();
                    let n = n.clone();
                    self.spawn_delivery(&tracker, &slots, async move {
                        this.deliver_web(&n, &sub).await;
                    })
                    .await;
                }
            }
            if self.webhook.is_some() {
                let this = self.clone();
                let n = n.clone();
                self.spawn_delivery(&tracker, &slots, async move {
                    if let Some(hook) = &this.webhook {
                        let timeout = this.timeout();
                        if let Some(http) = &this.http {
                            let _ = this
                                .retrying("webhook", || hook.send(http, &n, timeout))
                                .await;
                        }
                    }
                })
                .await;
            }
        }
    }

    async fn spawn_delivery(
        &self,
        tracker: &TaskTracker,
        slots: &Arc<Semaphore>,
        delivery: impl Future<Output = ()> + Send + 'static,
    ) {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            () = self.give_up.cancelled() => return,
        };
        let Ok(permit) = permit else { return };
        let give_up = self.give_up.clone();
        tracker.spawn(async move {
            // A stopping server waits for a slow push service only as long as the grace.
            tokio::select! {
                () = delivery => {}
                () = give_up.cancelled() => {}
            }
            drop(permit);
        });
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.timeout_ms)
    }

    /// Runs `attempt` until it succeeds, fails for good, or `notify.attempts` are used up,
    /// waiting `retry_base_ms` (doubling) between tries. Every outcome is logged and counted.
    async fn retrying<T, F, Fut>(&self, channel: &'static str, mut attempt: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut wait = Duration::from_millis(self.config.retry_base_ms);
        let attempts = self.config.attempts.max(1);
        for n in 1..=attempts {
            match attempt().await {
                Ok(v) => {
                    self.count_delivery(channel, "sent");
                    return Ok(v);
                }
                Err(Failure::Retry(why)) if n < attempts => {
                    tracing::warn!(channel, attempt = n, error = %why, retry_in_ms = wait.as_millis() as u64, "notification delivery failed; retrying");
                    self.count_delivery(channel, "retried");
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.give_up.cancelled() => return Err(Failure::Fail("server stopping".into())),
                    }
                    wait = wait.saturating_mul(2);
                }
                Err(e) => {
                    let (result, why) = match &e {
                        Failure::Gone(why) => ("gone", why),
                        Failure::Retry(why) | Failure::Fail(why) => ("failed", why),
                    };
                    tracing::warn!(channel, attempt = n, error = %why, "notification not delivered");
                    self.count_delivery(channel, result);
                    return Err(e);
                }
            }
        }
        Err(Failure::Fail("no attempt made".into()))
    }

    fn expo_targets(&self, n: &Notification) -> Option<Vec<String>> {
        let tokens: Vec<String> = lock(self.expo.as_ref()?)
            .iter()
            .filter(|t| n.for_user(&t.user))
            .map(|t| t.token.clone())
            .collect();
        (!tokens.is_empty()).then_some(tokens)
    }

    /// Sends `n` to `tokens` in chunks of 100, prunes the tokens Expo no longer knows, and
    /// tells the session's clients (`amarre.push_sent`) when at least one ticket was ok.
    async fn deliver_expo(&self, n: &Notification, tokens: Vec<String>) {
        let Some(http) = &self.http else { return };
        let url = self.config.expo_url.clone();
        let timeout = self.timeout();
        let mut ok = 0;
        let mut gone = Vec::new();
        for chunk in tokens.chunks(expo::CHUNK) {
            if let Ok(tickets) = self
                .retrying("expo", || expo::send_chunk(http, &url, chunk, n, timeout))
                .await
            {
                ok += tickets.ok;
                gone.extend(tickets.unregistered);
            }
        }
        if !gone.is_empty()
            && let Some(store) = &self.expo
        {
            let mut tokens = lock(store);
            tokens.retain(|t| !gone.contains(&t.token));
            self.save_expo(&tokens);
            tracing::info!(
                pruned = gone.len(),
                "Expo tokens no longer registered were removed"
            );
            for _ in &gone {
                self.count_delivery("expo", "pruned");
            }
        }
        if ok > 0
            && let Some(session) = self.sessions.get(&n.session_id)
        {
            let mut frame =
                json!({"type": "amarre.push_sent", "trigger": n.trigger.as_str(), "tokens": ok});
            if let Some(id) = &n.request_id {
                frame["requestId"] = id.clone().into();
            }
            session.notify_clients(frame.to_string());
        }
    }

    async fn deliver_web(&self, n: &Notification, sub: &WebSubscription) {
        let (Some(web), Some(http)) = (&self.web, &self.http) else {
            return;
        };
        let timeout = self.timeout();
        let subject = self.config.vapid_subject.clone();
        let sent = self
            .retrying("web_push", || {
                webpush::send(http, &web.vapid, &subject, sub, n, timeout)
            })
            .await;
        if let Err(Failure::Gone(_)) = sent {
            let mut subs = lock(&web.subscriptions);
            subs.retain(|s| s.endpoint != sub.endpoint);
            self.save_web(&subs);
            tracing::info!("a Web Push subscription is gone; removed it");
        }
    }
}

/// The client deliveries use: rustls with the system's roots, no redirects followed.
fn http_client() -> Result<reqwest::Client, String> {
    let tls = crate::tls::client_config().map_err(|e| e.to_string())?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())
}

/// An approval request's id, as `amarre.approval_resolved` and pending lists name it.
fn request_id(request: &Value) -> Option<String> {
    moorline_adapters::pipeline::answer_request(
        request,
        moorline_adapters::pipeline::Decision::Deny,
        "",
    )
    .map(|(id, _)| id)
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::session::{SessionSummary, Status};

    /// A running session's summary named `name`, id `s1`.
    pub(crate) fn summary(name: &str) -> SessionSummary {
        SessionSummary {
            id: "s1".into(),
            name: Some(name.into()),
            instance_id: "i".into(),
            status: Status::Running,
            agent: "fixture".into(),
            spawned_at: 0,
            clients: 0,
            exit_code: None,
            signal: None,
            reason: None,
            last_seq: 0,
            runtime: "process".into(),
            error: None,
            pending_approvals: Vec::new(),
            created_by: None,
            output_held: false,
            lines_lost: 0,
            auth_failed: false,
            cwd: "/tmp".into(),
            created_at: 0,
            activity: None,
            conversation: Default::default(),
            project: None,
            branch: None,
            dirty: None,
            ahead: None,
        }
    }
}
