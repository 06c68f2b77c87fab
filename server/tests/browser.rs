//! The web app in a real browser: Debian's Chromium, driven through WebDriver
//! (chromium-driver) with fantoccini, against a real server and a real agent (pi, run against
//! the scripted model API of `fixtures`). Waits are WebDriver waits for elements; nothing
//! sleeps. When chromium-driver or pi is missing, a test prints `SKIPPED:` and why.
//!
//! Identities come from a stand-in for `tailscale serve`: a proxy on loopback that stamps
//! each request with its user's tailnet login and passes it to the server's Unix socket, as
//! tailscaled does.
//!
//! `cargo test -p moorline --test browser -- --ignored screenshots` rewrites the screenshots
//! in docs/.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::{TestServer, WAIT};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------
// Chromium through chromium-driver.

use common::find_in_path as find;

/// A chromedriver on a port of its choosing, killed when dropped.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Option<Self> {
        let Some(driver) = find("chromedriver") else {
            eprintln!(
                "SKIPPED: chromedriver is not installed (apt-get install chromium chromium-driver)"
            );
            return None;
        };
        let mut child = tokio::process::Command::new(driver)
            .arg("--port=0")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let port = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("chromedriver output") {
                // "ChromeDriver was started successfully on port 35541."
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().expect("port");
                }
            }
            panic!("chromedriver exited before it listened");
        })
        .await
        .expect("chromedriver started in time");
        // Keep reading its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Some(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    /// A new browser (its own profile: a separate "browser context") whose viewport is
    /// `width` × `height` CSS pixels; `phone` emulates a touch phone.
    async fn browser(&self, width: u32, height: u32, phone: bool) -> Client {
        let mut options = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--no-first-run",
                "--no-default-browser-check",
                "--metrics-recording-only",
                "--disable-features=Translate,MediaRouter,OptimizationHints",
                "--hide-scrollbars",
                format!("--window-size={width},{height}"),
            ],
        });
        if let Some(chromium) = find("chromium") {
            options["binary"] = json!(chromium);
        }
        if phone {
            options["mobileEmulation"] = json!({
                "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2, "touch": true},
                "userAgent": "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/148.0 Mobile Safari/537.36",
            });
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), options);
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session");
        if !phone {
            // The window size includes no browser chrome in headless mode; make it exact.
            let _ = client.set_window_size(width, height).await;
        }
        client
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Resolves once `n` elements (or, for `null`, at least one) match `css` and contain `text`
/// (or any text, for `null`), with the first of them: a MutationObserver in the page waits
/// for the change, so the test reacts to the page's own events instead of polling or sleeping.
const WAIT_SCRIPT: &str = r#"
const [css, text, n, done] = arguments;
const hits = () => [...document.querySelectorAll(css)].filter(
  (e) => text === null || e.textContent.includes(text));
const ok = () => { const h = hits(); return (n === null ? h.length > 0 : h.length === n) ? h : null; };
let h = ok();
if (h) { done(h[0] ?? true); } else {
  const obs = new MutationObserver(() => {
    const h = ok();
    if (h) { obs.disconnect(); done(h[0] ?? true); }
  });
  obs.observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
}
"#;

/// WebDriver's element key in JSON.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

async fn wait_n(b: &Client, css: &str, text: Option<&str>, n: Option<usize>) -> Value {
    b.update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
        Some(WAIT),
        None,
        None,
    ))
    .await
    .expect("script timeout");
    match b
        .execute_async(WAIT_SCRIPT, vec![json!(css), json!(text), json!(n)])
        .await
    {
        Ok(v) => v,
        Err(e) => panic!(
            "waited {WAIT:?} for {} of {css} containing {text:?} ({e}); the page shows:\n{}",
            n.map_or("one".to_owned(), |n| n.to_string()),
            page_text(b).await
        ),
    }
}

/// Opens session `id`'s page from `base` and waits until its WebSocket is live.
async fn open_session(b: &Client, base: &str, id: &str) {
    b.goto(&format!("{base}#/s/{id}")).await.expect("open");
    wait_for(b, ".link-state.live", None).await;
}

/// Waits for an element `css` (containing `text`, if given) and returns it.
async fn wait_for(b: &Client, css: &str, text: Option<&str>) -> fantoccini::elements::Element {
    let found = wait_n(b, css, text, None).await;
    let id = found[ELEMENT_KEY].as_str().expect("an element").to_owned();
    fantoccini::elements::Element::from_element_id(b.clone(), id.into())
}

/// Waits until exactly `n` elements `css` contain `text`.
async fn wait_until_count(b: &Client, css: &str, text: &str, n: usize) {
    wait_n(b, css, Some(text), Some(n)).await;
}

/// What the page's Content-Security-Policy blocked so far (the browser's own reports).
async fn csp_violations(b: &Client) -> Vec<String> {
    let reports = b
        .execute(
            "const o = new ReportingObserver(() => {}, {types: ['csp-violation'], buffered: true}); \
             o.observe(); const r = o.takeRecords(); o.disconnect(); \
             return r.map((x) => `${x.body.effectiveDirective} ${x.body.blockedURL}`);",
            vec![],
        )
        .await
        .expect("reports");
    serde_json::from_value(reports).expect("strings")
}

async fn page_text(b: &Client) -> String {
    match b.find(Locator::Css("body")).await {
        Ok(body) => body.text().await.unwrap_or_default(),
        Err(e) => format!("(no page: {e})"),
    }
}

async fn count(b: &Client, css: &str, text: &str) -> usize {
    let n = b
        .execute(
            "const [css, text] = arguments; return [...document.querySelectorAll(css)].filter((e) => e.textContent.includes(text)).length;",
            vec![json!(css), json!(text)],
        )
        .await
        .expect("count");
    n.as_u64().expect("a number") as usize
}

async fn click(b: &Client, css: &str, text: Option<&str>) {
    wait_for(b, css, text).await.click().await.expect("click");
}

/// Types `text` into the field `css`, once it is there.
async fn type_into(b: &Client, css: &str, text: &str) {
    let field = wait_for(b, css, None).await;
    field
        .send_keys(text)
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
}

/// Picks `value` in the select `css`, once it is there.
async fn choose(b: &Client, css: &str, value: &str) {
    let select = wait_for(b, css, None).await;
    select
        .select_by_value(value)
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"));
}

/// Types `text` into the composer and sends it.
async fn say(b: &Client, text: &str) {
    type_into(b, ".composer textarea", text).await;
    click(b, ".composer button.send", None).await;
}

// ---------------------------------------------------------------------------------------
// The agent: pi against the scripted model API.

/// Everything a browser test needs: the driver, a server with a `pi` instance (and the
/// fixture ones), the model API, and a workspace for the agent.
struct Rig {
    driver: Driver,
    server: TestServer,
    _mock: common::MockModel,
    work: PathBuf,
    /// tailscale serve stand-ins, one per user: (login, base URL).
    users: Vec<(String, String)>,
}

async fn rig(users: &[&str]) -> Option<Rig> {
    let driver = Driver::start().await?;
    if find("pi").is_none() {
        eprintln!("SKIPPED: pi is not installed (see .ci/run for the pinned npm packages)");
        return None;
    }
    let mock = common::MockModel::start();
    let server = TestServer::start_unix(|c| {
        common::pass_env(c, &["PATH", "HOME"]);
        let mut pi = common::instance("pi", "pi");
        pi.base_url = Some(format!("http://{}", mock.addr));
        pi.provider = Some("anthropic".into());
        pi.env
            .insert("ANTHROPIC_API_KEY".into(), "sk-ant-fake".into());
        // Beside the fixture's: away from the socket's directory.
        pi.workspace_roots = c.instances[0].workspace_roots.clone();
        pi.create_cwd = true;
        c.instances.insert(0, pi);
    })
    .await;
    let root = server.state.path().join("work");
    std::fs::create_dir_all(&root).expect("workspace root");
    let work = root.join("project");
    std::fs::create_dir_all(&work).expect("workspace");
    if nix::unistd::geteuid().is_root() {
        for dir in [&root, &work] {
            std::os::unix::fs::chown(dir, Some(common::TEST_UID), Some(common::TEST_UID))
                .expect("chown");
        }
    }
    let socket = server.socket.clone().expect("socket");
    let mut bases = Vec::new();
    for user in users {
        bases.push((user.to_string(), serve_as(&socket, user).await));
    }
    Some(Rig {
        driver,
        server,
        _mock: mock,
        work,
        users: bases,
    })
}

impl Rig {
    fn base(&self, user: &str) -> String {
        self.users
            .iter()
            .find(|(u, _)| u == user)
            .map(|(_, b)| b.clone())
            .unwrap_or_else(|| self.server.url("/"))
    }

    /// Creates a pi session over REST (as `local`).
    async fn session(&self, name: &str) -> String {
        let (status, body) = self
            .server
            .post(
                "/sessions",
                &json!({"instanceId": "pi", "cwd": self.work, "name": name}).to_string(),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }
}

// ---------------------------------------------------------------------------------------
// A stand-in for `tailscale serve`: HTTP on 127.0.0.1:0 to the server's Unix socket, every
// request stamped with the user's tailnet login (client-sent copies removed), as tailscaled
// does for a tailnet user's browser. WebSocket upgrades pass through.

async fn serve_as(socket: &Path, login: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let socket = socket.to_owned();
    let name = login.split('@').next().unwrap_or(login).to_owned();
    let stamp = format!(
        "Tailscale-User-Login: {login}\r\nTailscale-User-Name: {name}\r\nX-Forwarded-For: 100.101.102.103\r\n"
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let socket = socket.clone();
            let stamp = stamp.clone();
            tokio::spawn(async move {
                let Ok(unix) = tokio::net::UnixStream::connect(&socket).await else {
                    return;
                };
                let (mut from_client, mut to_client) = tcp.into_split();
                let (mut from_server, mut to_server) = unix.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                    let _ = to_client.shutdown().await;
                });
                let _ = forward_requests(&mut from_client, &mut to_server, &stamp).await;
            });
        }
    });
    format!("http://{addr}/")
}

/// Forwards requests one by one, each head stamped; after an upgrade, bytes as they come.
async fn forward_requests(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    stamp: &str,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default();
        let mut out = format!("{request_line}\r\n{stamp}");
        let mut length = 0usize;
        let mut upgrade = false;
        for line in lines.filter(|l| !l.is_empty()) {
            let lower = line.to_ascii_lowercase();
            if lower.starts_with("tailscale-") || lower.starts_with("x-forwarded-for:") {
                continue;
            }
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            assert!(
                !lower.starts_with("transfer-encoding:"),
                "the proxy does not do chunked request bodies"
            );
            if lower.starts_with("upgrade:") {
                upgrade = true;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        to.write_all(out.as_bytes()).await?;
        if upgrade {
            to.write_all(&buf).await?;
            tokio::io::copy(from, to).await?;
            return Ok(());
        }
        while buf.len() < length {
            let n = from.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        to.write_all(&buf[..length]).await?;
        buf.drain(..length);
    }
}

// ---------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_url_is_the_app_for_browsers_and_amarres_426_for_other_clients() {
    let server = TestServer::start().await;
    // Non-browser clients (amarre's, curl) keep the 426.
    let resp = server
        .http
        .get(server.url("/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(resp.status(), 426);
    assert_eq!(resp.headers()["upgrade"], "websocket");

    // A browser gets the page, with a strict policy and a validator.
    let page = server
        .http
        .get(server.url("/"))
        .header("accept", "text/html,application/xhtml+xml")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .expect("GET / as a browser");
    assert_eq!(page.status(), 200);
    let h = page.headers().clone();
    assert!(
        h["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/html")
    );
    assert_eq!(h["content-encoding"], "gzip", "precompressed");
    let csp = h["content-security-policy"].to_str().expect("csp");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("default-src 'none'"),
        "{csp}"
    );
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
        "{csp}"
    );
    let etag = h["etag"].to_str().expect("etag").to_owned();
    let again = server
        .http
        .get(server.url("/app/app.js"))
        .send()
        .await
        .expect("app.js");
    assert_eq!(again.status(), 200);
    let js_etag = again.headers()["etag"].to_str().expect("etag").to_owned();
    let cached = server
        .http
        .get(server.url("/app/app.js"))
        .header("if-none-match", &js_etag)
        .send()
        .await
        .expect("app.js again");
    assert_eq!(cached.status(), 304, "unchanged files are not sent again");
    assert_ne!(etag, js_etag);
    // The page never inlines script or style (the policy would block it).
    let html = server
        .http
        .get(server.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(
        !html.contains("<script>") && !html.contains("style="),
        "{html}"
    );
    for path in [
        "/app/manifest.webmanifest",
        "/sw.js",
        "/app/icon-192.png",
        "/app/icon.svg",
    ] {
        let (status, _) = server.get(path).await;
        assert_eq!(status, 200, "{path}");
    }
    let (status, _) = server.get("/app/index.html").await;
    assert_eq!(status, 404, "the page is only ever /");
    let (status, _) = server.get("/app/nothing.js").await;
    assert_eq!(status, 404);

    // And a real browser runs it: the session list, live.
    let Some(driver) = Driver::start().await else {
        return server.stop().await;
    };
    let b = driver.browser(1280, 800, false).await;
    b.goto(&server.url("/")).await.expect("open /");
    wait_for(&b, "h2#sessions-h", Some("Sessions")).await;
    wait_for(&b, ".conn.live", None).await;
    wait_for(&b, ".empty", Some("No sessions yet")).await;
    // A session created elsewhere appears without a reload.
    let id = server.session("echo").await;
    wait_for(
        &b,
        &format!(".session-row[data-id='{id}']"),
        Some("running"),
    )
    .await;

    assert_eq!(csp_violations(&b).await, Vec::<String>::new());

    // Installable: the service worker takes the app shell, so the app opens with the server
    // gone (and says it cannot reach it).
    let script = b
        .execute_async(
            "const done = arguments[0]; navigator.serviceWorker.ready.then((r) => done(r.active.scriptURL));",
            vec![],
        )
        .await
        .expect("a service worker");
    assert_eq!(script, json!(server.url("/sw.js")));
    let url = server.url("/");
    server.stop().await;
    b.goto(&url).await.expect("open offline");
    wait_for(&b, "h2#sessions-h", Some("Sessions")).await;
    wait_for(&b, ".conn.off", None).await;
    b.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_made_in_the_browser_streams_replies_and_runs_only_approved_tools() {
    let Some(rig) = rig(&["alice@example.com"]).await else {
        return;
    };
    let b = rig.driver.browser(1280, 900, false).await;
    b.goto(&rig.base("alice@example.com")).await.expect("open");
    wait_for(&b, ".me", Some("alice")).await;

    // New session: pick the instance, a working directory inside its workspace root, a name.
    click(&b, "a.button.primary", Some("New session")).await;
    choose(&b, "select#instance", "pi").await;
    wait_for(&b, "#instance-hint", Some("pi agent")).await;
    type_into(&b, "input#cwd", &rig.work.display().to_string()).await;
    type_into(&b, "input#name", "browser demo").await;
    click(&b, "form.new-session button[type=submit]", None).await;
    wait_for(&b, ".session-title h2", Some("browser demo")).await;
    wait_for(&b, ".link-state.live", None).await;
    let url = b.current_url().await.expect("url");
    let id = url
        .fragment()
        .and_then(|f| f.strip_prefix("/s/"))
        .expect("session id")
        .to_owned();
    let (_, summary) = rig.server.get_json(&format!("/sessions/{id}")).await;
    assert_eq!(summary["createdBy"], "alice@example.com", "{summary}");
    assert_eq!(summary["cwd"], json!(rig.work));

    // A prompt, and the reply streamed into the conversation.
    say(&b, "hello from the browser").await;
    wait_for(&b, ".msg.user", Some("hello from the browser")).await;
    wait_for(
        &b,
        ".msg.assistant",
        Some("MOCK reply to: hello from the browser"),
    )
    .await;

    // A tool call, allowed: it runs in the workspace.
    say(&b, "RUNBASH: touch approved.txt").await;
    let card = wait_for(&b, ".approval[data-state=pending]", Some("approved.txt")).await;
    card.find(Locator::Css("button.allow"))
        .await
        .expect("allow button")
        .click()
        .await
        .expect("allow");
    wait_for(
        &b,
        ".approval[data-state=allow] .resolution",
        Some("Allowed by alice@example.com"),
    )
    .await;
    wait_for(&b, ".msg.assistant", Some("MOCK saw tool_result")).await;
    assert!(
        rig.work.join("approved.txt").exists(),
        "the allowed command ran"
    );

    // Another, denied: it does not run, and the agent is told.
    say(&b, "RUNBASH: touch denied.txt").await;
    let card = wait_for(&b, ".approval[data-state=pending]", Some("denied.txt")).await;
    card.find(Locator::Css("button.deny"))
        .await
        .expect("deny button")
        .click()
        .await
        .expect("deny");
    wait_for(
        &b,
        ".approval[data-state=deny] .resolution",
        Some("Denied by alice@example.com"),
    )
    .await;
    wait_for(&b, ".tool.failed", None).await;
    wait_until_count(&b, ".msg.assistant", "MOCK saw tool_result", 2).await;
    assert!(
        !rig.work.join("denied.txt").exists(),
        "the denied command did not run"
    );
    // The whole conversation rendered within the page's strict policy.
    assert_eq!(csp_violations(&b).await, Vec::<String>::new());
    b.close().await.expect("close");
    rig.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_see_one_card_and_who_answered_it_and_the_list_says_waiting_for_you() {
    let Some(rig) = rig(&["alice@example.com", "bob@example.com"]).await else {
        return;
    };
    let id = rig.session("shared").await;
    let alice = rig.driver.browser(390, 844, true).await;
    let bob = rig.driver.browser(1280, 900, false).await;
    alice
        .goto(&rig.base("alice@example.com"))
        .await
        .expect("alice");
    let row = format!(".session-row[data-id='{id}']");
    wait_for(&alice, &row, Some("idle")).await;
    open_session(&bob, &rig.base("bob@example.com"), &id).await;

    say(&bob, "RUNBASH: touch shared.txt").await;
    wait_for(&bob, ".approval[data-state=pending]", Some("shared.txt")).await;
    // Alice, on the list, sees the session waiting for her, and the request first.
    wait_for(&alice, &format!("{row}.waiting"), Some("waiting for you")).await;
    wait_for(
        &alice,
        ".needs-you .approval[data-state=pending]",
        Some("shared.txt"),
    )
    .await;
    // She opens it: the same card.
    click(&alice, &format!("{row} a"), None).await;
    wait_for(
        &alice,
        ".conversation .approval[data-state=pending]",
        Some("shared.txt"),
    )
    .await;

    // Bob allows; both see it resolved, with his name.
    click(&bob, ".approval[data-state=pending] button.allow", None).await;
    for b in [&alice, &bob] {
        wait_for(
            b,
            ".approval[data-state=allow] .resolution",
            Some("Allowed by bob@example.com"),
        )
        .await;
        wait_for(b, ".msg.assistant", Some("MOCK saw tool_result")).await;
    }
    assert!(rig.work.join("shared.txt").exists());
    // And the list no longer says waiting.
    alice
        .goto(&rig.base("alice@example.com"))
        .await
        .expect("list");
    wait_for(&alice, &row, Some("running")).await;
    assert_eq!(count(&alice, &row, "waiting for you").await, 0);

    // The next request is answered from the list itself: alice denies it there.
    say(&bob, "RUNBASH: touch from-the-list.txt").await;
    let card = wait_for(
        &alice,
        ".needs-you .approval[data-state=pending]",
        Some("from-the-list.txt"),
    )
    .await;
    card.find(Locator::Css("button.deny"))
        .await
        .expect("deny button")
        .click()
        .await
        .expect("deny");
    wait_for(
        &bob,
        ".approval[data-state=deny] .resolution",
        Some("Denied by alice@example.com"),
    )
    .await;
    wait_until_count(&bob, ".msg.assistant", "MOCK saw tool_result", 2).await;
    assert!(!rig.work.join("from-the-list.txt").exists());
    // Answered, it leaves the list.
    wait_until_count(&alice, ".needs-you", "", 0).await;
    for b in [alice, bob] {
        b.close().await.expect("close");
    }
    rig.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_in_the_middle_of_a_turn_shows_the_whole_conversation_once() {
    let Some(rig) = rig(&[]).await else {
        return;
    };
    let id = rig.session("reload").await;
    let b = rig.driver.browser(1280, 900, false).await;
    open_session(&b, &rig.server.url("/"), &id).await;
    say(&b, "first question").await;
    wait_for(&b, ".msg.assistant", Some("MOCK reply to: first question")).await;
    // The turn stops at its approval: the agent is mid-turn.
    say(&b, "RUNBASH: touch reload.txt").await;
    wait_for(&b, ".approval[data-state=pending]", Some("reload.txt")).await;
    wait_for(&b, ".working", None).await;

    b.refresh().await.expect("reload");
    wait_for(&b, ".approval[data-state=pending]", Some("reload.txt")).await;
    wait_for(&b, ".working", Some("Working")).await;
    assert_eq!(count(&b, ".msg.user", "first question").await, 1);
    assert_eq!(count(&b, ".msg.user", "RUNBASH").await, 1);
    assert_eq!(
        count(&b, ".msg.assistant", "MOCK reply to: first question").await,
        1
    );
    assert_eq!(count(&b, ".approval", "reload.txt").await, 1);
    assert_eq!(count(&b, ".turn-end", "").await, 1, "one turn ended so far");

    // The turn goes on in the reloaded page.
    click(&b, ".approval[data-state=pending] button.allow", None).await;
    wait_for(&b, ".msg.assistant", Some("MOCK saw tool_result")).await;
    wait_until_count(&b, ".turn-end", "", 2).await;
    assert_eq!(count(&b, ".msg.user", "").await, 2);
    assert_eq!(count(&b, ".approval", "").await, 1);
    assert!(rig.work.join("reload.txt").exists());
    b.close().await.expect("close");
    rig.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_reconnects_after_a_server_restart_without_losing_or_repeating_a_line() {
    require_durable!();
    let Some(driver) = Driver::start().await else {
        return;
    };
    // A durable agent (tmux), so it outlives the server; the socket stays at one path, so the
    // page's tailscale serve stand-in reaches the next server there.
    let sandbox = common::Sandbox::new();
    let socket_dir = tempfile::tempdir().expect("socket dir");
    let socket = socket_dir.path().join("moorline.sock");
    let config = |state: &Path| {
        let mut c = common::test_config(state.to_owned());
        sandbox.apply(&mut c);
        c.instances[0].workspace_roots = vec![state.join("work")];
        let mut tmux = common::instance("tmux", "fixture");
        tmux.agent_path = Some(common::fixture_agent());
        tmux.runtime = moorline::config::RuntimeKind::Tmux;
        c.instances.insert(0, tmux);
        c.unix_socket = Some(socket.clone());
        c
    };
    let state = tempfile::tempdir().expect("state");
    let first = config(state.path());
    let server = TestServer::start_in(state, first).await;
    let base = serve_as(&socket, "alice@example.com").await;
    let id = server.session("tmux").await;
    let b = driver.browser(1280, 900, false).await;
    open_session(&b, &base, &id).await;
    click(&b, ".session-actions button", Some("Raw JSONL")).await;
    say(&b, r#"{"id":"before-restart"}"#).await;
    wait_for(&b, ".raw li", Some("before-restart")).await;

    let state = server.stop_keep_state().await;
    wait_for(&b, ".link-state.reconnecting", None).await;
    let again = config(state.path());
    let server = TestServer::start_in(state, again).await;
    // The page finds the new server by itself and asks for what it has not seen.
    wait_for(&b, ".link-state.live", None).await;
    say(&b, r#"{"id":"after-restart"}"#).await;
    wait_for(&b, ".raw li", Some("after-restart")).await;
    assert_eq!(count(&b, ".raw li", "before-restart").await, 1);
    assert_eq!(count(&b, ".raw li", "after-restart").await, 1);
    // Sequence numbers run on without a gap or a repeat.
    let seqs = b
        .execute(
            "return [...document.querySelectorAll('.raw .seq')].map((e) => Number(e.textContent));",
            vec![],
        )
        .await
        .expect("seqs");
    let seqs: Vec<u64> = serde_json::from_value(seqs).expect("numbers");
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(seqs, expected);
    b.close().await.expect("close");
    let (status, _) = server.delete(&format!("/sessions/{id}")).await;
    assert_eq!(status, 204);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_session_says_how_it_ended_and_can_be_restarted_and_deleted() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let server = TestServer::start().await;
    let id = server.session("fixture").await;
    let b = driver.browser(390, 844, true).await;
    open_session(&b, &server.url("/"), &id).await;
    // The fixture agent opens in the conversation view; its lines are not pi RPC: raw view.
    click(&b, ".session-actions button", Some("Raw JSONL")).await;
    say(&b, r#"{"_emit":"stderr","text":"disk on fire"}"#).await;
    say(&b, r#"{"_emit":"die","code":3}"#).await;
    wait_for(&b, ".ended", Some("The agent crashed (exit code 3)")).await;
    click(&b, ".ended button.link", None).await;
    wait_for(&b, ".ended pre.stderr", Some("disk on fire")).await;
    wait_for(&b, ".composer.off", Some("not running")).await;

    click(&b, ".session-actions button.primary", Some("Restart")).await;
    wait_for(&b, ".badge.status-running", None).await;
    wait_for(&b, ".link-state.live", None).await;
    say(&b, r#"{"id":"back"}"#).await;
    wait_for(&b, ".raw li", Some(r#""back""#)).await;

    click(&b, ".session-actions button.deny", Some("Delete")).await;
    b.accept_alert().await.expect("confirm the delete");
    wait_for(&b, "h2#sessions-h", None).await;
    // The list drops it as the deletion's event arrives.
    wait_until_count(&b, &format!(".session-row[data-id='{id}']"), "", 0).await;
    let (status, _) = server.get(&format!("/sessions/{id}")).await;
    assert_eq!(status, 404);
    b.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_in_a_project_gets_its_worktree_and_the_page_shows_its_diff() {
    let Some(driver) = Driver::start().await else {
        return;
    };
    let (_root, repo) = common::repository();
    let server = TestServer::start().await;
    let (status, body) = server
        .post("/projects", &json!({"path": repo, "id": "app"}).to_string())
        .await;
    assert_eq!(status, 201, "{body}");
    let b = driver.browser(390, 844, true).await;
    b.goto(&format!("{}#/new", server.url("/")))
        .await
        .expect("open");
    choose(&b, "select#instance", "fixture").await;
    choose(&b, "select#project", "app").await;
    type_into(&b, "input#branch", "story-edit").await;
    click(&b, "form.new-session button[type=submit]", None).await;
    wait_for(&b, ".diff-view", Some("on story-edit")).await;
    let url = b.current_url().await.expect("url");
    let id = url
        .fragment()
        .and_then(|f| f.strip_prefix("/s/"))
        .expect("session page")
        .to_owned();
    // The worktree is the session's own: a change there is not in the repository.
    let summary = server.get_json(&format!("/sessions/{id}")).await.1;
    let worktree = PathBuf::from(summary["cwd"].as_str().expect("cwd"));
    assert_ne!(worktree, repo, "{summary}");
    common::edit(&worktree, "story.txt", "once upon a time\n");
    click(&b, ".diff-view button", Some("Uncommitted")).await;
    wait_for(&b, "pre.diff .add", Some("+once upon a time")).await;
    wait_for(&b, "pre.diff .del", Some("-once")).await;
    assert_eq!(
        std::fs::read_to_string(repo.join("story.txt")).expect("read"),
        "once\n",
        "the main working tree is untouched"
    );
    assert!(csp_violations(&b).await.is_empty());
    b.close().await.expect("close");
    let (status, body) = server.delete(&format!("/sessions/{id}?force=1")).await;
    assert!(matches!(status, 200 | 204), "{status} {body}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_image_goes_to_the_agent_with_the_prompt() {
    let Some(rig) = rig(&[]).await else {
        return;
    };
    let id = rig.session("picture").await;
    let b = rig.driver.browser(390, 844, true).await;
    open_session(&b, &rig.server.url("/"), &id).await;
    let image = Path::new(env!("CARGO_MANIFEST_DIR")).join("web/icon-192.png");
    type_into(
        &b,
        ".composer input[type=file]",
        &image.display().to_string(),
    )
    .await;
    wait_for(&b, ".attachments .chip", Some("icon-192.png")).await;
    say(&b, "what is in this picture").await;
    // pi took the prompt with its image: its user message has both.
    wait_for(&b, ".msg.user", Some("(+1 image)")).await;
    wait_for(
        &b,
        ".msg.assistant",
        Some("MOCK reply to: what is in this picture"),
    )
    .await;
    assert_eq!(
        count(&b, ".attachments", "").await,
        0,
        "sent attachments are cleared"
    );
    b.close().await.expect("close");
    rig.server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Screenshots for the docs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/screenshots: cargo test -p moorline --test browser -- --ignored screenshots"]
async fn screenshots() {
    let Some(rig) = rig(&["alice@example.com"]).await else {
        panic!("screenshots need chromium-driver and pi");
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&out).expect("docs/screenshots");
    let base = rig.base("alice@example.com");
    // Sessions in several states: one mid-conversation, one waiting, one crashed.
    let talk = rig.session("fix the flaky test").await;
    let waiting = rig.session("release notes").await;
    let crashed = {
        let (status, body) = rig
            .server
            .post(
                "/sessions",
                &json!({"instanceId": "fixture", "name": "experiment"}).to_string(),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["id"].as_str().expect("id").to_owned()
    };
    let mut ws = rig.server.ws(&crashed).await;
    ws.send(r#"{"_emit":"die","code":3}"#).await;
    drop(ws);

    for (label, w, h, phone) in [("phone", 390, 844, true), ("desktop", 1280, 800, false)] {
        let b = rig.driver.browser(w, h, phone).await;
        open_session(&b, &base, &talk).await;
        if label == "phone" {
            say(&b, "Summarise what `cargo test` checks in this repo").await;
            wait_for(&b, ".msg.assistant", Some("MOCK reply")).await;
            say(&b, "RUNBASH: ls -la").await;
            wait_for(&b, ".approval[data-state=pending]", None).await;
            click(&b, ".approval[data-state=pending] button.allow", None).await;
            wait_for(&b, ".msg.assistant", Some("MOCK saw tool_result")).await;
            let other = rig.driver.browser(w, h, phone).await;
            open_session(&other, &base, &waiting).await;
            say(&other, "RUNBASH: git tag v0.2.0").await;
            wait_for(&other, ".approval[data-state=pending]", None).await;
            other.close().await.expect("close");
        }
        // The tool call opened, to show its output.
        if let Ok(tool) = b.find(Locator::Css(".tool summary")).await {
            tool.click().await.expect("open tool");
        }
        shot(&b, &out, &format!("session-{label}.png")).await;
        b.goto(&format!("{base}#/")).await.expect("list");
        wait_for(&b, ".needs-you .approval", None).await;
        wait_for(
            &b,
            &format!(".session-row[data-id='{crashed}']"),
            Some("crashed"),
        )
        .await;
        shot(&b, &out, &format!("sessions-{label}.png")).await;
        b.goto(&format!("{base}#/new")).await.expect("new");
        wait_for(&b, "#instance-hint", None).await;
        shot(&b, &out, &format!("new-{label}.png")).await;
        if label == "desktop" {
            b.goto(&format!("{base}#/s/{waiting}")).await.expect("open");
            wait_for(&b, ".approval[data-state=pending]", None).await;
            click(&b, ".top button.icon", None).await; // auto → light
            click(&b, ".top button.icon", None).await; // light → dark
            wait_for(&b, "html[data-theme=dark]", None).await;
            shot(&b, &out, "approval-dark-desktop.png").await;
        }
        b.close().await.expect("close");
    }
    rig.server.stop().await;
}

async fn shot(b: &Client, dir: &Path, name: &str) {
    let png = b.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}
