//! The relay's files at rest: the data directory is reachable by the
//! relay's user only (0700) and the database readable by it only (0600),
//! whether the relay creates them or finds them with looser modes.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use securechat_common::protocol::{Request, Response};
use securechat_testkit::relay::test_config;
use securechat_testkit::TestRelay;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn a_new_data_directory_and_database_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    let relay = TestRelay::start(test_config(&data, None)).await.unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("relay.redb")), 0o600);
    relay.stop().await.unwrap();
}

#[tokio::test]
async fn an_existing_data_directory_and_database_are_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("relay-data");
    // A first start makes the database; then someone loosens the modes
    // (a restore from backup, a umask, a chmod -R).
    let first = TestRelay::start(test_config(&data, None)).await.unwrap();
    let fingerprint = first.fingerprint();
    first.stop().await.unwrap();
    set_mode(&data, 0o755);
    set_mode(&data.join("relay.redb"), 0o644);

    let relay = TestRelay::start(test_config(&data, None)).await.unwrap();
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("relay.redb")), 0o600);
    // Same directory, same identity; and it serves.
    assert_eq!(relay.fingerprint(), fingerprint);
    let c = relay.connect().await.unwrap();
    assert!(matches!(
        c.call(&Request::Challenge).await,
        Ok(Response::Challenge { .. })
    ));
    relay.stop().await.unwrap();
}
