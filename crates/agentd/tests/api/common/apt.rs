//! Debian packages the tests need (haproxy, Chromium and its driver): installed by the harness when missing, so a
//! fresh machine runs the whole suite with the README's one test command.

use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;

/// The first of `candidates` that exists, after `apt-get install`ing `packages` if none does.
pub fn installed(packages: &[&str], candidates: &[&str]) -> PathBuf {
    // One install at a time, and no test looks for a program while one is under way: tests start in parallel, as
    // threads of one process or as processes of their own, and a program's file exists before apt has finished
    // installing what it needs to run. A lock on a file holds across both.
    let lock = File::create(std::env::temp_dir().join("agentd-tests-apt.lock"))
        .expect("the tests' apt lock file");
    lock.lock().expect("the tests' apt lock");
    let find = || {
        candidates
            .iter()
            .map(PathBuf::from)
            .find(|path| path.exists())
    };
    if let Some(found) = find() {
        return found;
    }
    let install = || {
        std::process::Command::new("apt-get")
            // Another apt on the machine (not these tests) is waited for rather than failed on.
            .args(["-o", "DPkg::Lock::Timeout=300", "install", "-y", "-qq"])
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
