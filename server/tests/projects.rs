//! Projects and a git worktree per session, with the real `git`: sessions of one project work
//! on their own branches without touching each other, the summary shows their state, and a
//! delete keeps a worktree that holds work unless forced.

mod common;

use std::path::{Path, PathBuf};

use common::{TestServer, edit, git, repository};
use serde_json::{Value, json};

async fn summary(server: &TestServer, id: &str) -> Value {
    server.get_json(&format!("/sessions/{id}")).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_a_project_work_in_worktrees_of_their_own() {
    let (root, repo) = repository();
    let server = TestServer::start().await;

    // Registering: only repositories inside the instance's workspace roots.
    let (status, body) = server
        .post(
            "/projects",
            &json!({"path": "/etc", "id": "etc"}).to_string(),
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("path")),
        "{body}"
    );
    let (status, body) = server
        .post(
            "/projects",
            &json!({"path": root.path(), "id": "notrepo"}).to_string(),
        )
        .await;
    assert_eq!(status, 400, "not a repository: {body}");
    let (status, project) = server
        .post("/projects", &json!({"path": repo, "id": "app"}).to_string())
        .await;
    assert_eq!(status, 201, "{project}");
    assert_eq!(project["defaultBranch"], "main");
    let worktrees = PathBuf::from(project["worktreesDir"].as_str().expect("worktreesDir"));
    let (status, _) = server
        .post("/projects", &json!({"path": repo, "id": "app"}).to_string())
        .await;
    assert_eq!(status, 409);
    let (_, list) = server.get_json("/projects").await;
    assert_eq!(list[0]["id"], "app");

    // Two sessions, two worktrees on two new branches.
    let create = |branch: Option<&str>| {
        let mut body = json!({"instanceId": "fixture", "project": "app"});
        if let Some(b) = branch {
            body["branch"] = b.into();
        }
        body.to_string()
    };
    let (status, a) = server.post("/sessions", &create(None)).await;
    assert_eq!(status, 201, "{a}");
    let (status, b) = server.post("/sessions", &create(Some("feature/b"))).await;
    assert_eq!(status, 201, "{b}");
    let (a_id, b_id) = (a["id"].as_str().expect("id"), b["id"].as_str().expect("id"));
    assert_eq!(a["project"], "app");
    assert_eq!(a["branch"], format!("moorline/{a_id}"));
    assert_eq!(b["branch"], "feature/b");
    assert_eq!(
        (a["dirty"].as_bool(), a["ahead"].as_u64()),
        (Some(false), Some(0))
    );
    let (a_dir, b_dir) = (worktrees.join(a_id), worktrees.join(b_id));
    assert_eq!(a["cwd"], a_dir.to_str().expect("utf-8"));
    assert_eq!(
        git(&a_dir, &["branch", "--show-current"]).trim(),
        format!("moorline/{a_id}")
    );

    // The agent of each works there (its cwd is its worktree).
    let mut ws = server.ws(a_id).await;
    ws.send(r#"{"_emit":"cwd"}"#).await;
    let reply = ws.json().await;
    assert_eq!(reply["cwd"], a_dir.to_str().expect("utf-8"), "{reply}");

    // A branch checked out elsewhere is refused.
    let (status, body) = server.post("/sessions", &create(Some("feature/b"))).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("branch_in_use")),
        "{body}"
    );
    let (status, body) = server.post("/sessions", &create(Some("main"))).await;
    assert_eq!(status, 409, "main is the repository's own: {body}");

    // The same file, edited in both: neither sees the other's change, the repository neither.
    edit(&a_dir, "story.txt", "once upon a time\n");
    edit(&b_dir, "story.txt", "twice\n");
    let s = summary(&server, a_id).await;
    assert_eq!(
        (s["dirty"].as_bool(), s["ahead"].as_u64()),
        (Some(true), Some(0)),
        "{s}"
    );
    git(&a_dir, &["commit", "-q", "-am", "a's story"]);
    let s = summary(&server, a_id).await;
    assert_eq!(
        (s["dirty"].as_bool(), s["ahead"].as_u64()),
        (Some(false), Some(1)),
        "{s}"
    );
    assert_eq!(
        std::fs::read_to_string(b_dir.join("story.txt")).expect("b"),
        "twice\n"
    );
    assert_eq!(
        std::fs::read_to_string(repo.join("story.txt")).expect("repo"),
        "once\n"
    );
    assert_eq!(
        git(&repo, &["show", &format!("moorline/{a_id}:story.txt")]),
        "once upon a time\n"
    );

    // A project in use cannot be forgotten.
    assert_eq!(server.delete("/projects/app").await.0, 400);

    // Delete: work is kept and said so; a clean worktree goes with its branch; force removes.
    let (status, body) = server.delete(&format!("/sessions/{a_id}")).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["worktree"], "kept", "{body}");
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("1 commit"),
        "{body}"
    );
    assert!(a_dir.exists(), "a's committed work is kept");
    let (status, body) = server.delete(&format!("/sessions/{b_id}?force=1")).await;
    assert_eq!(status, 204, "{body}");
    assert!(!b_dir.exists(), "forced: b's uncommitted change is gone");
    let (_, c) = server.post("/sessions", &create(None)).await;
    let c_id = c["id"].as_str().expect("id");
    // The typed client (`moorline sessions rm`, `projects list`) reads the same answers.
    let client = moorline::client::Client::new(&server.url(""), None).expect("client");
    let projects = client.projects().await.expect("projects");
    assert_eq!(
        projects
            .iter()
            .map(|p| (p.id.as_str(), p.default_branch.as_str()))
            .collect::<Vec<_>>(),
        [("app", "main")]
    );
    assert!(
        client
            .delete_with(c_id, false)
            .await
            .expect("delete")
            .is_none(),
        "a clean worktree: nothing kept to report"
    );
    assert!(
        !worktrees.join(c_id).exists(),
        "a clean worktree is removed"
    );
    assert!(
        !git(&repo, &["branch", "--list"]).contains(c_id),
        "its branch too"
    );
    assert_eq!(server.delete("/projects/app").await.0, 204);
    assert_eq!(server.delete("/projects/app").await.0, 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_diff_shows_the_work_and_files_stay_inside_the_workspace() {
    let (_root, repo) = repository();
    let server = TestServer::start_with(|c| {
        // An instance whose sessions start in a directory the operator chose, outside every
        // workspace root (whatever directory the tests run from).
        let mut outside = common::instance("outside", "fixture");
        outside.agent_path = Some(common::fixture_agent());
        outside.cwd = Some("/usr".into());
        c.instances.push(outside);
    })
    .await;
    let (status, _) = server
        .post("/projects", &json!({"path": repo, "id": "app"}).to_string())
        .await;
    assert_eq!(status, 201);
    let (_, s) = server
        .post(
            "/sessions",
            &json!({"instanceId": "fixture", "project": "app"}).to_string(),
        )
        .await;
    let id = s["id"].as_str().expect("id").to_owned();
    let dir = PathBuf::from(s["cwd"].as_str().expect("cwd"));

    // Uncommitted: a change and a new file.
    edit(&dir, "story.txt", "once upon a time\n");
    edit(&dir, "new.txt", "fresh\n");
    let (status, diff) = server
        .get(&format!("/sessions/{id}/diff?uncommitted=1"))
        .await;
    assert_eq!(status, 200, "{diff}");
    assert!(diff.contains("-once\n+once upon a time"), "{diff}");
    assert!(
        diff.contains("+++ b/new.txt") && diff.contains("+fresh"),
        "{diff}"
    );
    // Committed: the diff against the base still has it, the uncommitted one is empty.
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "work"]);
    let (_, diff) = server.get(&format!("/sessions/{id}/diff")).await;
    assert!(
        diff.contains("+once upon a time") && diff.contains("+fresh"),
        "{diff}"
    );
    let (_, diff) = server
        .get(&format!("/sessions/{id}/diff?uncommitted=1"))
        .await;
    assert_eq!(diff, "", "nothing uncommitted");

    // Files: listing and reading inside; nothing outside, whatever the path says.
    let (status, listing) = server.get_json(&format!("/sessions/{id}/files")).await;
    assert_eq!(status, 200, "{listing}");
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        names.contains(&"story.txt") && names.contains(&"new.txt"),
        "{listing}"
    );
    let (status, text) = server
        .get(&format!("/sessions/{id}/files?path=story.txt"))
        .await;
    assert_eq!((status, text.as_str()), (200, "once upon a time\n"));
    std::os::unix::fs::symlink("/etc", dir.join("etc-link")).expect("symlink");
    for path in [
        "../app/story.txt",
        "/etc/passwd",
        "etc-link/passwd",
        "etc-link",
        "a/../../x",
    ] {
        let (status, body) = server
            .get_json(&format!("/sessions/{id}/files?path={path}"))
            .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("path_outside_workspace")),
            "{path}: {body}"
        );
    }
    let (status, body) = server
        .get_json(&format!("/sessions/{id}/files?path=missing.txt"))
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("no_such_file"))
    );

    // A session outside projects has no diff.
    let other = server.session("outside").await;
    let (status, body) = server.get_json(&format!("/sessions/{other}/diff")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("not_in_project"))
    );
    // Nor files, when it works outside the workspace roots (the instance's own directory).
    let (status, body) = server.get_json(&format!("/sessions/{other}/files")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("no_workspace")),
        "{body}"
    );
    let (status, _) = server.delete(&format!("/sessions/{id}?force=1")).await;
    assert_eq!(status, 204);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_can_be_cloned_but_never_with_a_clients_credentials() {
    let (root, repo) = repository();
    // The server's own credentials (a store file), used by every clone; file:// needs none,
    // but the clone goes through them.
    let secrets = tempfile::tempdir().expect("secrets");
    let store = secrets.path().join("git-credentials");
    std::fs::write(&store, "https://moorline:token@example.com\n").expect("store");
    let store_for_config = store.clone();
    let server =
        TestServer::start_with(move |c| c.git_credentials_file = Some(store_for_config)).await;
    let target = root.path().join("copy");
    let clone =
        |url: String, path: &Path| json!({"url": url, "path": path, "id": "copy"}).to_string();
    for (url, why) in [
        (
            "https://user:secret@example.com/x.git".to_owned(),
            "credentials",
        ),
        ("ext::sh -c touch% /tmp/pwned".to_owned(), "URL"),
        ("file:///etc".to_owned(), "workspace roots"),
    ] {
        let (status, body) = server.post("/projects", &clone(url.clone(), &target)).await;
        assert_eq!(
            (status, body["field"].as_str()),
            (400, Some("url")),
            "{url}: {body}"
        );
        assert!(
            body["message"].as_str().expect("message").contains(why),
            "{body}"
        );
    }
    let (status, body) = server
        .post(
            "/projects",
            &clone(format!("file://{}", repo.display()), &repo),
        )
        .await;
    assert_eq!(
        (status, body["field"].as_str()),
        (400, Some("path")),
        "{body}"
    );
    assert!(!target.exists(), "nothing was cloned");

    let (status, project) = server
        .post(
            "/projects",
            &clone(format!("file://{}", repo.display()), &target),
        )
        .await;
    assert_eq!(status, 201, "{project}");
    assert_eq!(project["defaultBranch"], "main");
    assert_eq!(
        std::fs::read_to_string(target.join("story.txt")).expect("cloned"),
        "once\n"
    );
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(target.join(".git/HEAD"))
            .expect("meta")
            .uid();
        assert_eq!(
            owner,
            common::TEST_UID,
            "the clone belongs to the workspace's owner"
        );
    }
    assert!(
        !std::fs::read_to_string(target.join(".git/config"))
            .expect("config")
            .contains("token"),
        "no credentials in the clone"
    );
    let (status, s) = server
        .post(
            "/sessions",
            &json!({"instanceId": "fixture", "project": "copy"}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().expect("id");
    assert_eq!(server.delete(&format!("/sessions/{id}")).await.0, 204);
    server.stop().await;
}
