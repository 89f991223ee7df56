//! `rampart certs` end to end: run the built binary in temp dirs and check its output with
//! the real `openssl` (a peer we did not write).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

const SLEEP: &str = "spiffe://cluster.local/ns/default/sa/sleep";

fn rampart(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run rampart")
}

fn ok(dir: &Path, args: &[&str]) {
    let out = rampart(dir, args);
    assert!(
        out.status.success(),
        "rampart {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs rampart expecting exit code 2 and a one-line reason containing `reason`.
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

fn openssl(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed (.ci/test installs it)")
}

fn openssl_ok(dir: &Path, args: &[&str]) -> String {
    let out = openssl(dir, args);
    assert!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `rampart certs intermediate --root root --name NAME --out NAME` in `d`.
fn intermediate(d: &Path, name: &str) {
    ok(
        d,
        &[
            "certs",
            "intermediate",
            "--root",
            "root",
            "--name",
            name,
            "--out",
            name,
        ],
    );
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// Root, intermediate (Istio plug-in layout) and a leaf; openssl verifies all of it.
#[test]
fn root_intermediate_leaf_verify_with_openssl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["certs", "root", "--out", "root"]);
    intermediate(d, "cluster1");
    ok(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "cluster1",
            "--spiffe-id",
            SLEEP,
            "--out",
            "leaf",
            "--ttl",
            "24h",
        ],
    );

    for f in ["root/root-cert.pem", "root/root-key.pem"] {
        assert!(d.join(f).is_file(), "{f}");
    }
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert!(d.join("cluster1").join(f).is_file(), "cluster1/{f}");
    }
    for f in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        assert!(d.join("leaf").join(f).is_file(), "leaf/{f}");
    }
    // Key files 0600.
    for f in ["root/root-key.pem", "cluster1/ca-key.pem", "leaf/key.pem"] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }

    // Plug-in layout: cert-chain.pem is intermediate then root; root-cert.pem is the root.
    let root_pem = std::fs::read_to_string(d.join("root/root-cert.pem")).unwrap();
    let chain_pem = std::fs::read_to_string(d.join("cluster1/cert-chain.pem")).unwrap();
    let ca_pem = std::fs::read_to_string(d.join("cluster1/ca-cert.pem")).unwrap();
    assert_eq!(chain_pem, format!("{ca_pem}{root_pem}"));
    assert_eq!(
        std::fs::read_to_string(d.join("cluster1/root-cert.pem")).unwrap(),
        root_pem
    );

    // openssl accepts the intermediate...
    let c = d.join("cluster1");
    let out = openssl_ok(
        &c,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "ca-cert.pem",
        ],
    );
    assert!(out.contains("ca-cert.pem: OK"), "{out}");
    // ...and the leaf, using the intermediate layout's files.
    std::fs::copy(d.join("leaf/cert-chain.pem"), c.join("leaf-chain.pem")).unwrap();
    let out = openssl_ok(
        &c,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "leaf-chain.pem",
        ],
    );
    assert!(out.contains("leaf-chain.pem: OK"), "{out}");
    // ...and the leaf with the leaf directory's own files.
    let l = d.join("leaf");
    let out = openssl_ok(
        &l,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "cert-chain.pem",
        ],
    );
    assert!(out.contains("OK"), "{out}");
    // Negative twin: another root does not verify the leaf.
    ok(d, &["certs", "root", "--out", "other-root"]);
    let out = openssl(
        &l,
        &[
            "verify",
            "-CAfile",
            "../other-root/root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "cert-chain.pem",
        ],
    );
    assert!(
        !out.status.success(),
        "a foreign root must not verify the leaf"
    );

    // The leaf: exactly one URI SAN, the SPIFFE ID; the DESIGN §1 profile.
    let text = openssl_ok(&l, &["x509", "-in", "cert-chain.pem", "-noout", "-text"]);
    assert_eq!(count(&text, "URI:"), 1, "{text}");
    assert!(text.contains(&format!("URI:{SLEEP}")), "{text}");
    assert!(!text.contains("DNS:"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert!(text.contains("Digital Signature"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("Subject Key Identifier") && text.contains("Authority Key Identifier"));
    assert!(
        text.contains("ASN1 OID: prime256v1"),
        "ECDSA P-256 by default: {text}"
    );
    // The intermediate: a CA limited to path length 0.
    let text = openssl_ok(&c, &["x509", "-in", "ca-cert.pem", "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("Certificate Sign"), "{text}");

    // The leaf's key belongs to the leaf's certificate.
    let key_pub = openssl_ok(&l, &["pkey", "-in", "key.pem", "-pubout"]);
    let cert_pub = openssl_ok(&l, &["x509", "-in", "cert-chain.pem", "-noout", "-pubkey"]);
    assert_eq!(key_pub, cert_pub);
}

/// `rampart certs leaf` straight from a root directory, and an RSA-4096 root.
#[test]
fn leaf_from_an_rsa_root_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(
        d,
        &[
            "certs",
            "root",
            "--out",
            "root",
            "--key-type",
            "rsa-4096",
            "--days",
            "30",
            "--org",
            "Example",
        ],
    );
    let text = openssl_ok(d, &["x509", "-in", "root/root-cert.pem", "-noout", "-text"]);
    assert!(text.contains("Public-Key: (4096 bit)"), "{text}");
    assert!(text.contains("O = Example"), "{text}");
    assert_eq!(mode(&d.join("root/root-key.pem")), 0o600);
    ok(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "root",
            "--spiffe-id",
            SLEEP,
            "--out",
            "leaf",
            "--ttl",
            "90d",
        ],
    );
    let l = d.join("leaf");
    openssl_ok(
        &l,
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "cert-chain.pem",
        ],
    );
    let text = openssl_ok(&l, &["x509", "-in", "cert-chain.pem", "-noout", "-text"]);
    assert_eq!(count(&text, "URI:"), 1, "{text}");
}

#[test]
fn refusals_exit_2_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ok(d, &["certs", "root", "--out", "root"]);
    intermediate(d, "c1");

    // Invalid SPIFFE IDs.
    for bad in [
        "spiffe://Cluster.local/ns/a/sa/b",
        "https://cluster.local/x",
        "spiffe://cluster.local/a/",
        "spiffe://td/a?b",
    ] {
        refused(
            d,
            &[
                "certs",
                "leaf",
                "--ca",
                "c1",
                "--spiffe-id",
                bad,
                "--out",
                "l",
            ],
            "invalid SPIFFE ID",
        );
    }
    assert!(!d.join("l").exists(), "nothing written on refusal");

    // Missing key or certificate.
    refused(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "nowhere",
            "--spiffe-id",
            SLEEP,
            "--out",
            "l",
        ],
        "no CA material",
    );
    std::fs::create_dir(d.join("half")).unwrap();
    std::fs::copy(d.join("c1/ca-cert.pem"), d.join("half/ca-cert.pem")).unwrap();
    std::fs::copy(d.join("c1/root-cert.pem"), d.join("half/root-cert.pem")).unwrap();
    refused(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "half",
            "--spiffe-id",
            SLEEP,
            "--out",
            "l",
        ],
        "ca-key.pem",
    );
    refused(
        d,
        &[
            "certs",
            "intermediate",
            "--root",
            "nowhere",
            "--name",
            "x",
            "--out",
            "x",
        ],
        "root-cert.pem",
    );

    // Mismatched key and certificate.
    ok(d, &["certs", "root", "--out", "root2"]);
    std::fs::create_dir(d.join("mixed")).unwrap();
    std::fs::copy(d.join("root/root-cert.pem"), d.join("mixed/root-cert.pem")).unwrap();
    std::fs::copy(d.join("root2/root-key.pem"), d.join("mixed/root-key.pem")).unwrap();
    refused(
        d,
        &[
            "certs",
            "intermediate",
            "--root",
            "mixed",
            "--name",
            "x",
            "--out",
            "x",
        ],
        "matches this key",
    );
    refused(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "mixed",
            "--spiffe-id",
            SLEEP,
            "--out",
            "l",
        ],
        "matches this key",
    );
    std::fs::copy(d.join("root2/root-key.pem"), d.join("half/ca-key.pem")).unwrap();
    refused(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "half",
            "--spiffe-id",
            SLEEP,
            "--out",
            "l",
        ],
        "does not match",
    );

    // Output directory already holding key material, unless --force.
    refused(
        d,
        &["certs", "root", "--out", "root"],
        "already holds key material",
    );
    refused(
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
        "already holds key material",
    );
    std::fs::create_dir(d.join("stash")).unwrap();
    std::fs::write(
        d.join("stash/mine.pem"),
        "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    refused(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "c1",
            "--spiffe-id",
            SLEEP,
            "--out",
            "stash",
        ],
        "already holds key material",
    );
    // twin: --force overwrites, and the new material verifies.
    let before = std::fs::read(d.join("c1/ca-key.pem")).unwrap();
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
            "--force",
        ],
    );
    assert_ne!(std::fs::read(d.join("c1/ca-key.pem")).unwrap(), before);
    assert_eq!(mode(&d.join("c1/ca-key.pem")), 0o600);
    openssl_ok(
        &d.join("c1"),
        &[
            "verify",
            "-CAfile",
            "root-cert.pem",
            "-untrusted",
            "cert-chain.pem",
            "ca-cert.pem",
        ],
    );
    // A directory without keys is fine without --force.
    std::fs::create_dir(d.join("empty")).unwrap();
    ok(
        d,
        &[
            "certs",
            "leaf",
            "--ca",
            "c1",
            "--spiffe-id",
            SLEEP,
            "--out",
            "empty",
        ],
    );

    // Lifetimes: above 90 days, zero, or nonsense.
    for ttl in ["91d", "0s", "soon"] {
        refused(
            d,
            &[
                "certs",
                "leaf",
                "--ca",
                "c1",
                "--spiffe-id",
                SLEEP,
                "--out",
                "t",
                "--ttl",
                ttl,
            ],
            "",
        );
    }
    // Unknown key type.
    refused(
        d,
        &["certs", "root", "--out", "r3", "--key-type", "dsa"],
        "key type",
    );
}
