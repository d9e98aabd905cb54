//! Debian packages the tests need (haproxy, Chromium and its driver): installed by the harness when missing, so a
//! fresh machine runs the whole suite with the README's one test command.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;

/// The first of `candidates` that exists, after `apt-get install`ing `packages` if none does.
pub fn installed(packages: &[&str], candidates: &[&str]) -> PathBuf {
    // One install at a time: apt holds a lock, and tests start in parallel.
    static APT: Mutex<()> = Mutex::new(());
    let find = || {
        candidates
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
    };
    if let Some(found) = find() {
        return found;
    }
    let _one_at_a_time = APT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(found) = find() {
        return found;
    }
    let install = || {
        std::process::Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // The package lists of a fresh machine may be missing or stale.
        let _ = std::process::Command::new("apt-get")
            .args(["update", "-qq"])
            .status();
        assert!(
            install(),
            "{packages:?} not installed and `apt-get install` failed"
        );
    }
    find().unwrap_or_else(|| panic!("{packages:?} installed, but none of {candidates:?} exists"))
}
