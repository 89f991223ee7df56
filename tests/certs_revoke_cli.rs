//! `rampart certs revoke` / `rampart certs crl` end to end: the CRLs we write are accepted
//! by `openssl crl -verify` (and refused against the wrong CA), `openssl verify -crl_check`
//! refuses the revoked leaf and accepts another; revoking is idempotent and CRL numbers
//! only go up; bad input exits 2 with one line.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn rampart(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run rampart")
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = rampart(dir, args);
    assert!(
        out.status.success(),
        "rampart {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(dir: &Path, args: &[&str], reason: &str) {
    let out = rampart(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "rampart {args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(reason),
        "rampart {args:?}: {stderr:?} lacks {reason:?}"
    );
}

fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A root, an intermediate `c1` and two leaves `l1`, `l2` of it in `d`; returns the leaves'
/// serials as `openssl x509 -serial` prints them.
fn pki(d: &Path) -> (String, String) {
    ok(d, &["certs", "root", "--out", "root"]);
    ok(
        d,
        &[
            "certs",
            "intermediate",
            "--root",
            "root",
            "--name",
            "c1",
            "--out",
            "c1",
        ],
    );
    let mut serials = Vec::new();
    for (leaf, sa) in [("l1", "one"), ("l2", "two")] {
        let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        ok(
            d,
            &[
                "certs",
                "leaf",
                "--ca",
                "c1",
                "--spiffe-id",
                &id,
                "--out",
                leaf,
            ],
        );
        let (good, out) = openssl(
            d,
            &[
                "x509",
                "-in",
                &format!("{leaf}/cert-chain.pem"),
                "-noout",
                "-serial",
            ],
        );
        assert!(good, "{out}");
        serials.push(out.trim().to_owned());
    }
    (serials.remove(0), serials.remove(0))
}

fn verify_leaf(d: &Path, leaf: &str) -> (bool, String) {
    openssl(
        d,
        &[
            "verify",
            "-crl_check_all",
            "-CRLfile",
            "c1/ca-crl.pem",
            "-CAfile",
            "root/root-cert.pem",
            "-untrusted",
            "c1/ca-cert.pem",
            &format!("{leaf}/cert-chain.pem"),
        ],
    )
}

fn crl_number(d: &Path, file: &str) -> u128 {
    let (good, out) = openssl(d, &["crl", "-in", file, "-noout", "-crlnumber"]);
    assert!(good, "{out}");
    let hex = out
        .trim()
        .trim_start_matches("crlNumber=")
        .trim_start_matches("0x");
    u128::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{out}: {e}"))
}

#[test]
fn revoke_writes_a_crl_that_openssl_verifies_and_enforces() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (s1, _s2) = pki(d);
    ok(d, &["certs", "crl", "--ca", "root"]);
    let out = ok(
        d,
        &[
            "certs",
            "revoke",
            "--ca",
            "c1",
            "--serial",
            &s1,
            "--reason",
            "keyCompromise",
            "--chain-crl",
            "root/ca-crl.pem",
        ],
    );
    assert!(
        out.contains("revoked serial") && out.contains("keyCompromise"),
        "{out}"
    );
    let crl = d.join("c1/ca-crl.pem");
    assert_eq!(
        std::fs::metadata(&crl).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // Our CRL verifies with its CA, and not with another one (the root did not sign it).
    let (good, out) = openssl(
        d,
        &[
            "crl",
            "-in",
            "c1/ca-crl.pem",
            "-noout",
            "-verify",
            "-CAfile",
            "c1/ca-cert.pem",
        ],
    );
    assert!(good && out.contains("verify OK"), "{out}");
    let (good, out) = openssl(
        d,
        &[
            "crl",
            "-in",
            "c1/ca-crl.pem",
            "-noout",
            "-verify",
            "-CAfile",
            "root/root-cert.pem",
        ],
    );
    assert!(!good || !out.contains("verify OK"), "{out}");
    let (good, out) = openssl(
        d,
        &[
            "crl",
            "-in",
            "root/ca-crl.pem",
            "-noout",
            "-verify",
            "-CAfile",
            "root/root-cert.pem",
        ],
    );
    assert!(good && out.contains("verify OK"), "{out}");
    let (_, text) = openssl(d, &["crl", "-in", "c1/ca-crl.pem", "-noout", "-text"]);
    assert!(text.contains("Key Compromise"), "{text}");

    // Leaf-only CRL check with just the intermediate's CRL: the revoked leaf is refused, the
    // other one accepted.
    for (leaf, want) in [("l1", false), ("l2", true)] {
        let (good, out) = openssl(
            d,
            &[
                "verify",
                "-crl_check",
                "-CRLfile",
                "c1/ca-crl.pem",
                "-CAfile",
                "root/root-cert.pem",
                "-untrusted",
                "c1/ca-cert.pem",
                &format!("{leaf}/cert-chain.pem"),
            ],
        );
        assert_eq!(good, want, "{leaf}: {out}");
        if !want {
            assert!(out.contains("certificate revoked"), "{out}");
        }
    }

    // The revoked leaf is refused, the other one accepted (full-chain CRL check).
    let (good, out) = verify_leaf(d, "l1");
    assert!(!good && out.contains("certificate revoked"), "{out}");
    let (good, out) = verify_leaf(d, "l2");
    assert!(good, "{out}");
}

#[test]
fn a_root_revokes_an_intermediate_and_every_leaf_below_it_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    pki(d);
    let (_, inter_serial) = openssl(d, &["x509", "-in", "c1/ca-cert.pem", "-noout", "-serial"]);
    // Before: both CRLs empty, the leaf verifies.
    ok(d, &["certs", "crl", "--ca", "root"]);
    ok(
        d,
        &[
            "certs",
            "crl",
            "--ca",
            "c1",
            "--chain-crl",
            "root/ca-crl.pem",
        ],
    );
    assert!(verify_leaf(d, "l2").0);
    ok(
        d,
        &[
            "certs",
            "revoke",
            "--ca",
            "root",
            "--serial",
            inter_serial.trim(),
            "--reason",
            "cACompromise",
        ],
    );
    ok(
        d,
        &[
            "certs",
            "crl",
            "--ca",
            "c1",
            "--chain-crl",
            "root/ca-crl.pem",
        ],
    );
    let (good, out) = verify_leaf(d, "l2");
    assert!(!good && out.contains("certificate revoked"), "{out}");
}

#[test]
fn revoking_twice_is_idempotent_and_crl_numbers_increase() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (s1, _) = pki(d);
    ok(d, &["certs", "crl", "--ca", "root"]);
    ok(
        d,
        &[
            "certs",
            "revoke",
            "--ca",
            "c1",
            "--serial",
            &s1,
            "--chain-crl",
            "root/ca-crl.pem",
        ],
    );
    let n1 = crl_number(d, "c1/ca-crl.pem");
    let out = ok(
        d,
        &[
            "certs",
            "revoke",
            "--ca",
            "c1",
            "--serial",
            &s1.to_lowercase(),
        ],
    );
    assert!(out.contains("already revoked"), "{out}");
    let n2 = crl_number(d, "c1/ca-crl.pem");
    ok(d, &["certs", "crl", "--ca", "c1", "--valid", "1h"]);
    let n3 = crl_number(d, "c1/ca-crl.pem");
    assert!(n1 < n2 && n2 < n3, "{n1} {n2} {n3}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("c1/ca-crl-state.json")).unwrap())
            .unwrap();
    assert_eq!(state["revoked"].as_array().unwrap().len(), 1, "{state}");
    // The root's CRL was carried over by the runs without --chain-crl.
    let pem = std::fs::read_to_string(d.join("c1/ca-crl.pem")).unwrap();
    assert_eq!(pem.matches("BEGIN X509 CRL").count(), 2, "{pem}");
    assert!(!verify_leaf(d, "l1").0);
    assert!(verify_leaf(d, "l2").0);
}

#[test]
fn bad_input_is_refused_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (s1, _) = pki(d);
    refused(
        d,
        &["certs", "revoke", "--ca", "c1", "--serial", "xyz"],
        "--serial",
    );
    refused(
        d,
        &[
            "certs", "revoke", "--ca", "c1", "--serial", &s1, "--reason", "stolen",
        ],
        "unknown revocation reason",
    );
    std::fs::create_dir(d.join("empty")).unwrap();
    refused(d, &["certs", "crl", "--ca", "empty"], "no CA material");
    // Another hierarchy's CRL is not an issuer CRL of c1.
    ok(d, &["certs", "root", "--out", "other"]);
    ok(d, &["certs", "crl", "--ca", "other"]);
    refused(
        d,
        &[
            "certs",
            "crl",
            "--ca",
            "c1",
            "--chain-crl",
            "other/ca-crl.pem",
        ],
        "not a current CRL of an issuer",
    );
    // Twin: the right root's CRL is accepted.
    ok(d, &["certs", "crl", "--ca", "root"]);
    ok(
        d,
        &[
            "certs",
            "crl",
            "--ca",
            "c1",
            "--chain-crl",
            "root/ca-crl.pem",
        ],
    );
}
