//! The web portal in a real browser: Debian's Chromium, headless, driven through
//! chromedriver (WebDriver, with fantoccini) against a real site with a memory
//! agent. A person signs in, requests a VM and watches the job end, runs a
//! command and reads its output, releases the VM; a second user does not see the
//! first one's VMs; the admin sees agents and users; a bad token is refused; the
//! token never reaches a URL, a cookie or localStorage; the page's security
//! headers are set; lists longer than a page are paged along the API's cursors.
//! Screenshots of the main pages are written to `docs/portal/`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use gve::site::model::SiteVm;
use serde_json::{json, Value};

use crate::site::{env, ADMIN};

/// A chromedriver process, ended (by its pid) when dropped.
struct Driver {
    child: std::process::Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts chromedriver on a free loopback port and waits until it answers.
async fn driver() -> Driver {
    let port = free_port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromedriver (Debian package chromium-driver; scripts/setup.sh installs it)");
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < end,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Driver { child, port }
}

/// A headless Chromium session with its own profile directory.
async fn browser(d: &Driver, profile: &std::path::Path) -> Browser {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", d.port))
        .await
        .expect("a Chromium session")
}

async fn css(b: &Browser, selector: &str) -> fantoccini::elements::Element {
    b.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
}

async fn sign_in(b: &Browser, base: &str, token: &str) {
    b.goto(&format!("{base}/portal/")).await.unwrap();
    let field = css(b, "#token").await;
    field.send_keys(token).await.unwrap();
    css(b, "#sign-in").await.click().await.unwrap();
}

async fn sign_out(b: &Browser) {
    css(b, "#sign-out").await.click().await.unwrap();
    css(b, "#token").await;
}

fn shot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/portal")
}

async fn screenshot(b: &Browser, name: &str) {
    let png = b.screenshot().await.unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{name}: not a PNG");
    std::fs::create_dir_all(shot_dir()).unwrap();
    std::fs::write(shot_dir().join(format!("{name}.png")), png).unwrap();
}

/// Waits until the followed job's final state is shown; returns it.
async fn job_end(b: &Browser) -> String {
    css(b, "#job-state").await.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_uses_the_portal_in_a_real_browser() {
    let e = env(1, |_| {}).await;
    let base = e.admin.base().trim_end_matches('/').to_string();
    let token_of = |name: &'static str| {
        let admin = e.admin.clone();
        async move {
            let u: Value = admin
                .call(
                    hyper::Method::POST,
                    "/v1/users",
                    Some(&json!({ "name": name })),
                )
                .await
                .unwrap();
            u["token"].as_str().unwrap().to_string()
        }
    };
    let alice_token = token_of("alice").await;
    let bob_token = token_of("bob").await;
    let alice = gve::api::client::Client::new(&base, Some(alice_token.clone())).unwrap();

    // The page's security headers.
    let resp = headers_of(&format!("{base}/portal/")).await;
    let csp = resp.get("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(
        resp.get("x-frame-options").map(String::as_str),
        Some("DENY")
    );

    let d = driver().await;
    let profile = tempfile::tempdir().unwrap();
    let b = browser(&d, profile.path()).await;

    // A wrong token is refused with a message.
    sign_in(&b, &base, "gve_not-a-token-at-all").await;
    let msg = css(&b, "#sign-in-error").await.text().await.unwrap();
    assert!(msg.contains("not valid"), "{msg}");

    // Alice signs in, requests a VM and watches its job end.
    b.goto(&format!("{base}/portal/")).await.unwrap();
    sign_in(&b, &base, &alice_token).await;
    css(&b, "#quota").await;
    let page = css(&b, "#app").await.text().await.unwrap();
    assert!(
        !page.contains("Loading the gve portal"),
        "the loading line stayed"
    );
    css(&b, "#request-template option[value='debian-12']")
        .await
        .click()
        .await
        .unwrap();
    let mem = css(&b, "#request-memory").await;
    mem.clear().await.unwrap();
    mem.send_keys("256").await.unwrap();
    css(&b, "#request-submit").await.click().await.unwrap();
    assert_eq!(job_end(&b).await, "succeeded");
    // The job's end refreshes the list at once (not at the next 2 s poll): the
    // VM it started shows as running.
    let running = b
        .wait()
        .at_most(Duration::from_millis(1500))
        .for_element(Locator::Css("tr[data-vm] td.state-running"))
        .await;
    assert!(
        running.is_ok(),
        "the VM list did not show the job's outcome"
    );
    let row = css(&b, "tr[data-vm]").await;
    let vm_id = row.attr("data-vm").await.unwrap().unwrap();
    let vm: SiteVm = alice.get(&format!("/v1/vms/{vm_id}")).await.unwrap();
    assert_eq!(vm.owner.as_deref(), Some("alice"));
    screenshot(&b, "vms").await;

    // A command, its output on the page.
    css(
        &b,
        &format!("tr[data-vm='{vm_id}'] button[data-action='exec']"),
    )
    .await
    .click()
    .await
    .unwrap();
    let argv = css(&b, "#exec-argv").await;
    argv.clear().await.unwrap();
    argv.send_keys("echo hello from the portal").await.unwrap();
    css(&b, "#exec-run").await.click().await.unwrap();
    let out = css(&b, "#exec-output pre").await.text().await.unwrap();
    assert_eq!(out.trim(), "hello from the portal");
    screenshot(&b, "exec").await;

    // The token is in this tab's sessionStorage only: not in the URL, a cookie or
    // localStorage.
    let url = b.current_url().await.unwrap();
    assert!(!url.as_str().contains(&alice_token), "{url}");
    let stored = b
        .execute(
            "return [document.cookie, JSON.stringify(localStorage), sessionStorage.getItem('gve-token')]",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(stored[0], "");
    assert!(!stored[1].as_str().unwrap().contains(&alice_token));
    assert_eq!(stored[2], alice_token.as_str());

    // Jobs tab.
    css(&b, "#tab-jobs").await.click().await.unwrap();
    css(&b, "tr[data-job]").await;
    screenshot(&b, "jobs").await;
    css(&b, "#tab-vms").await.click().await.unwrap();

    // Bob sees none of alice's VMs.
    sign_out(&b).await;
    sign_in(&b, &base, &bob_token).await;
    // Once bob's list has loaded (not while it says "Loading…").
    let empty = css(&b, "#vms p.muted").await;
    let end = std::time::Instant::now() + Duration::from_secs(30);
    while empty.text().await.unwrap() != "No VMs yet." {
        assert!(std::time::Instant::now() < end, "bob's list never loaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let html = b.source().await.unwrap();
    assert!(!html.contains(&vm_id), "bob's page shows alice's VM");
    sign_out(&b).await;

    // The admin sees agents and users.
    sign_in(&b, &base, ADMIN).await;
    css(&b, "#tab-admin").await.click().await.unwrap();
    let agent = css(&b, "tr[data-agent='a-0']").await.text().await.unwrap();
    assert!(agent.contains("up"), "{agent}");
    css(&b, "tr[data-user='alice']").await;
    screenshot(&b, "admin").await;
    sign_out(&b).await;

    // Alice releases her VM; its row goes.
    sign_in(&b, &base, &alice_token).await;
    css(
        &b,
        &format!("tr[data-vm='{vm_id}'] button[data-action='release']"),
    )
    .await
    .click()
    .await
    .unwrap();
    assert_eq!(job_end(&b).await, "succeeded");
    let vms: Vec<SiteVm> = alice.get("/v1/vms").await.unwrap();
    assert!(vms.is_empty(), "{vms:?}");
    b.close().await.unwrap();
}

/// The `attr` of every element matching `selector` now, in page order.
async fn rows(b: &Browser, selector: &str, attr: &str) -> Vec<String> {
    let v = b
        .execute(
            "return [...document.querySelectorAll(arguments[0])].map((e) => e.getAttribute(arguments[1]))",
            vec![json!(selector), json!(attr)],
        )
        .await
        .unwrap();
    serde_json::from_value(v).unwrap()
}

/// Waits (up to 30 s) until `selector` matches `n` elements other than `not`;
/// returns their `attr`s.
async fn page_of(b: &Browser, selector: &str, attr: &str, n: usize, not: &[String]) -> Vec<String> {
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = rows(b, selector, attr).await;
        if r.len() == n && r.iter().all(|x| !not.contains(x)) {
            return r;
        }
        assert!(
            std::time::Instant::now() < end,
            "{selector}: {} rows, wanted {n}: {r:?}",
            r.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clicks `pager`'s next (or back) button.
async fn turn(b: &Browser, pager: &str, button: &str) {
    css(b, &format!("{pager} .{button}"))
        .await
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_pages_through_lists_longer_than_a_page() {
    const N: usize = 26; // one more than a page of VMs (25); jobs page at 20
    let e = env(1, |_| {}).await;
    let base = e.admin.base().trim_end_matches('/').to_string();
    let quota = json!({ "vms": 40, "logical-cpus": 40, "main-memory-mib": 40_000 });
    let (alice, alice_token) = e.user_with_token("alice", Some(quota)).await;
    let mut jobs = Vec::new();
    for _ in 0..N {
        let j = crate::site::job(
            &alice,
            "/v1/vms",
            json!({ "template": "debian-12", "main-memory-mib": 64 }),
        )
        .await;
        assert_eq!(j.state, gve::site::model::JobState::Succeeded, "{j:?}");
        jobs.push(j.id);
    }
    let all: Vec<SiteVm> = alice.get_pages("/v1/vms", usize::MAX).await.unwrap();
    let mut all: Vec<String> = all.into_iter().map(|v| v.id).collect();
    all.sort();
    assert_eq!(all.len(), N);

    let d = driver().await;
    let profile = tempfile::tempdir().unwrap();
    let b = browser(&d, profile.path()).await;
    sign_in(&b, &base, &alice_token).await;

    // VMs: a full first page, the one left on the next, and back to the first.
    let first = page_of(&b, "#vms tr[data-vm]", "data-vm", 25, &[]).await;
    let back = css(&b, "#vms-pager .page-back").await;
    assert!(
        back.attr("disabled").await.unwrap().is_some(),
        "back on page 1"
    );
    turn(&b, "#vms-pager", "page-next").await;
    let second = page_of(&b, "#vms tr[data-vm]", "data-vm", 1, &first).await;
    let next = css(&b, "#vms-pager .page-next").await;
    assert!(
        next.attr("disabled").await.unwrap().is_some(),
        "next on the last page"
    );
    let mut seen: Vec<String> = first.iter().chain(&second).cloned().collect();
    seen.sort();
    assert_eq!(seen, all, "the pages together are every VM, each once");
    // The page shown is read again while it is shown: a VM released elsewhere goes.
    let gone = second[0].clone();
    crate::site::job(&alice, &format!("/v1/vms/{gone}/release"), json!({})).await;
    page_of(&b, "#vms tr[data-vm]", "data-vm", 0, &[]).await;
    css(&b, "#vms-pager").await;
    turn(&b, "#vms-pager", "page-back").await;
    assert_eq!(
        page_of(&b, "#vms tr[data-vm]", "data-vm", 25, &[]).await,
        first
    );

    // Jobs: newest first, 20 to a page; the next page holds the older ones.
    css(&b, "#tab-jobs").await.click().await.unwrap();
    let newer = page_of(&b, "#jobs tr[data-job]", "data-job", 20, &[]).await;
    turn(&b, "#jobs-pager", "page-next").await;
    let older = page_of(&b, "#jobs tr[data-job]", "data-job", N + 1 - 20, &newer).await;
    let mut listed: Vec<&String> = newer.iter().chain(&older).collect();
    let mut want: Vec<String> = jobs.clone();
    let released: Vec<gve::site::model::Job> = alice.get("/v1/jobs?limit=1").await.unwrap();
    want.push(released[0].id.clone());
    assert_eq!(newer[0], released[0].id, "the newest job is first");
    assert_eq!(older.last(), Some(&jobs[0]), "the oldest job is last");
    listed.sort();
    want.sort();
    assert_eq!(listed, want.iter().collect::<Vec<_>>());
    sign_out(&b).await;

    // The admin pages through every VM, with its owner, and through the users (50
    // to a page: admin, alice and 49 more).
    for i in 0..49 {
        e.user(&format!("u-{i:02}"), None).await;
    }
    sign_in(&b, &base, ADMIN).await;
    css(&b, "#tab-admin").await.click().await.unwrap();
    let users = page_of(&b, "#users tr[data-user]", "data-user", 50, &[]).await;
    turn(&b, "#users-pager", "page-next").await;
    let last = page_of(&b, "#users tr[data-user]", "data-user", 1, &users).await;
    let mut names: Vec<String> = users.into_iter().chain(last).collect();
    names.sort();
    let mut want: Vec<String> = (0..49).map(|i| format!("u-{i:02}")).collect();
    want.extend(["admin".to_string(), "alice".to_string()]);
    want.sort();
    assert_eq!(names, want);
    let first = page_of(&b, "#all-vms tr[data-any-vm]", "data-any-vm", 25, &[]).await;
    let row = css(&b, &format!("tr[data-any-vm='{}']", first[0])).await;
    assert!(row.text().await.unwrap().contains("alice"));
    // Alice's 25 and the clean VM that replaced the released one in the pool.
    let every: Vec<SiteVm> = e
        .admin
        .get_pages("/v1/vms?all=true", usize::MAX)
        .await
        .unwrap();
    let mut every: Vec<String> = every.into_iter().map(|v| v.id).collect();
    every.sort();
    assert_eq!(every.len(), N, "{every:?}");
    turn(&b, "#all-vms-pager", "page-next").await;
    let rest = page_of(&b, "#all-vms tr[data-any-vm]", "data-any-vm", 1, &first).await;
    let mut seen: Vec<String> = first.into_iter().chain(rest).collect();
    seen.sort();
    assert_eq!(seen, every, "the admin's pages hold every VM once");
    sign_out(&b).await;

    // A monitor's token opens no lists: the page says what it is for.
    let m: Value = e
        .admin
        .call(
            hyper::Method::POST,
            "/v1/users",
            Some(&json!({ "name": "prom", "role": "monitor" })),
        )
        .await
        .unwrap();
    sign_in(&b, &base, m["token"].as_str().unwrap()).await;
    let text = css(&b, "#monitor").await.text().await.unwrap();
    assert!(text.contains("/metrics"), "{text}");
    // Signing out and in again as another person starts on their VMs, not on the
    // tab the last one left open.
    sign_out(&b).await;
    sign_in(&b, &base, ADMIN).await;
    css(&b, "#tab-admin").await.click().await.unwrap();
    css(&b, "#users").await;
    sign_out(&b).await;
    css(&b, "#token")
        .await
        .send_keys(&alice_token)
        .await
        .unwrap();
    css(&b, "#sign-in").await.click().await.unwrap();
    css(&b, "#quota").await;
    assert!(
        rows(&b, "#users", "id").await.is_empty(),
        "alice was shown the admin tab"
    );
    b.close().await.unwrap();
}

/// The headers of `GET url` (a plain hyper request).
async fn headers_of(url: &str) -> std::collections::HashMap<String, String> {
    let c = gve::api::client::Client::new(url.trim_end_matches("/portal/"), None).unwrap();
    let resp = c.get_stream("/portal/").await.unwrap();
    resp.headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect()
}
