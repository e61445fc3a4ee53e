//! What livemig tells the user when a migration does not end as planned: a destination lost
//! after the commit, a TLS/plaintext mismatch either way; and how the command line behaves
//! with an empty credential variable or a reader that stops early. KVM tests say SKIPPED
//! without /dev/kvm.
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn source(dir: &Path, workload: &str, memory: &str) -> VmProcess {
    source_vm(dir, workload, memory, 1)
}

fn migrate(api: &Path, to: &str, extra: &[&str]) -> (bool, String, String) {
    let out = migrate_to(api, to, extra);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The destination dies once the VM runs there, before the guest's verdict: `migrate` says
/// the destination was lost after the commit (not "verified: NO") and fails.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_destination_lost_after_the_commit_is_named() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let status = d.path().join("incoming.json");
    let mut cmd = livemig_exe().command(None);
    cmd.args(["receive", "--listen", &to, "--api"])
        .arg(d.path().join("dst.sock"))
        .arg("--console")
        .arg(d.path().join("dst.console"))
        .arg("--status-file")
        .arg(&status);
    let (dst, _log) =
        host::child::spawn_until(&mut cmd, "waiting for a VM", Duration::from_secs(30), None)
            .unwrap();
    let mut dst = KillOnDrop(dst);
    // A large working set: the guest's verify on the destination takes long enough to be cut.
    let src = source(d.path(), "sql,ws=90%", "512M");
    let killer = {
        let status = status.clone();
        let pid = dst.0.id();
        std::thread::spawn(move || {
            wait(Duration::from_secs(120), "the VM running there", || {
                std::fs::read_to_string(&status).is_ok_and(|s| s.contains("\"running\""))
            });
            let pid = libc::pid_t::try_from(pid).unwrap();
            // SAFETY: kill(2) with a pid and a signal number touches no memory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
    };
    let (ok, stdout, stderr) = migrate(&src.api, &to, &[]);
    killer.join().unwrap();
    let _ = dst.0.wait();
    assert!(!ok, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "guest verified on destination: unknown: the destination was lost after the commit"
        ),
        "{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("verified on destination: NO"), "{stdout}");
}

/// A TLS source and a plaintext receiver, and the other way round: each side names the
/// mismatch.
#[test]
#[cfg_attr(no_kvm, ignore = "needs /dev/kvm")]
fn kvm_a_tls_mismatch_is_named_either_way() {
    let d = tempfile::tempdir().unwrap();
    let plain_to = format!("127.0.0.1:{}", free_port());
    let plain = Livemig::new(BIN)
        .insecure()
        .receive(
            None,
            &plain_to,
            &d.path().join("plain.sock"),
            &d.path().join("plain.console"),
            None,
        )
        .unwrap();
    let tls_to = format!("127.0.0.1:{}", free_port());
    let tls = livemig_exe()
        .receive(
            None,
            &tls_to,
            &d.path().join("tls.sock"),
            &d.path().join("tls.console"),
            None,
        )
        .unwrap();
    let src = source(d.path(), "idle", "64M");
    let (ok, _, err) = migrate(&src.api, &plain_to, &[]);
    assert!(!ok);
    assert!(err.contains("does not speak TLS"), "{err}");
    let (ok, _, err) = migrate(&src.api, &tls_to, &["--insecure"]);
    assert!(!ok);
    assert!(err.contains("expects TLS"), "{err}");
    wait(Duration::from_secs(5), "both receivers to log it", || {
        plain
            .stderr
            .text()
            .contains("started TLS with a listener that runs --insecure")
            && tls
                .stderr
                .text()
                .contains("spoke plaintext to a listener that requires mutual TLS")
    });
    // The source runs on, and goes where it is expected.
    let (ok, out, err) = migrate(&src.api, &tls_to, &[]);
    assert!(ok, "{out}\n{err}");
}

/// `LIVEMIG_TLS_CERT=` (set, empty) counts as unset: `receive --insecure` starts.
#[test]
fn an_empty_credential_variable_counts_as_unset() {
    let d = tempfile::tempdir().unwrap();
    let to = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(BIN);
    cmd.args(["receive", "--insecure", "--listen", &to, "--api"])
        .arg(d.path().join("r.sock"))
        .env("LIVEMIG_TLS_CERT", "")
        .env("LIVEMIG_TLS_KEY", "")
        .env("LIVEMIG_TLS_CA", "");
    let (child, log) =
        host::child::spawn_until(&mut cmd, "waiting for a VM", Duration::from_secs(10), None)
            .unwrap_or_else(|e| panic!("receive did not start: {e}"));
    drop(KillOnDrop(child));
    assert!(
        !log.text().contains("a value is required"),
        "{}",
        log.text()
    );
}

/// A reader that stops early (`| true`, `| grep -q`, `| head`): the command exits quietly,
/// status 0, no panic.
#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..10 {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{BIN} tls init --out {} --host h{i} | true; exit ${{PIPESTATUS[0]}}",
                d.path().display()
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "run {i}: {:?}: {err}", out.status);
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{err}"
        );
    }
}
