//! The relay's status page in a real headless Chromium: with alice's and
//! bob's agents connected it shows two open connections, and the same page
//! (never reopened by the test) shows one after alice's agent stops. The run
//! leaves a screenshot at `target/status-page.png`.
//!
//! Needs Debian's chromium at /usr/bin/chromium; `scripts/test.sh` installs
//! it. Without it the test fails and says so.

mod common;

use std::time::{Duration, Instant};

use securechat_testkit::browser::Browser;

/// How long the page may take to show a change.
const PAGE_WAIT: Duration = Duration::from_secs(15);

const OPEN_CONNECTIONS: &str = "(document.getElementById('open_connections') || {}).textContent";

#[test]
fn status_page_follows_connections_in_chromium() {
    let started = Instant::now();
    let mut w = common::world();
    w.alice.wait_logged_in();
    w.bob.wait_logged_in();

    let mut browser = Browser::launch().unwrap();
    browser.open(&w.relay.status_url).unwrap();
    browser
        .wait_for(OPEN_CONNECTIONS, "2", PAGE_WAIT)
        .expect("the status page shows both agents' connections");
    let shown_two = Instant::now();

    w.alice.stop();
    browser
        .wait_for(OPEN_CONNECTIONS, "1", PAGE_WAIT)
        .expect("the status page shows one connection after alice's agent stopped");
    let shown_one = shown_two.elapsed();

    let png = browser.screenshot_png().unwrap();
    let path = common::bin_dir().parent().unwrap().join("status-page.png");
    std::fs::write(&path, &png).unwrap();
    println!(
        "status page screenshot: {} ({} bytes); the page showed the change after {:.1} s; \
         whole test {:.1} s",
        path.display(),
        png.len(),
        shown_one.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
