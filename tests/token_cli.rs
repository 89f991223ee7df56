//! `rampart token` against an implementation we did not write: PyJWT (with `cryptography`).
//!
//! Tokens we mint verify in PyJWT with the JWKS we print (and fail there for the wrong
//! audience or a flipped bit); tokens PyJWT mints with every algorithm Istio accepts verify
//! with `rampart token verify`, and the ones that must not (expired, foreign key, `none`,
//! HS256) are refused.

mod support;
use support::python;

use std::process::{Command, Output};

use serde_json::Value;

fn rampart() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rampart"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

const ISSUER: &str = "https://token-cli.test";

/// Verify with PyJWT; print the claims and what PyJWT says about the negative twins.
const PY_VERIFY: &str = r#"
import base64, hashlib, json, sys, jwt
jwks_path, token_path, issuer = sys.argv[1:4]
jwks = json.load(open(jwks_path))
token = open(token_path).read().strip()
kid = jwt.get_unverified_header(token)["kid"]
key = next(k for k in jwt.PyJWKSet.from_dict(jwks).keys if k.key_id == kid)
alg = jwt.get_unverified_header(token)["alg"]
claims = jwt.decode(token, key.key, algorithms=[alg], audience="istio-ca", issuer=issuer)
def refused(**kw):
    try:
        jwt.decode(kw.pop("token", token), key.key, algorithms=[alg], **kw)
        return "accepted"
    except jwt.PyJWTError as e:
        return type(e).__name__
head, sig = token.rsplit(".", 1)
raw = bytearray(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)))
raw[5] ^= 1
flipped = head + "." + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
jwk = jwks["keys"][0]
members = {"RSA": ["e", "kty", "n"], "EC": ["crv", "kty", "x", "y"], "OKP": ["crv", "kty", "x"]}
canonical = json.dumps({m: jwk[m] for m in members[jwk["kty"]]}, separators=(",", ":"), sort_keys=True)
thumbprint = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).decode().rstrip("=")
print(json.dumps({
    "alg": alg,
    "claims": claims,
    "wrong_audience": refused(audience="other", issuer=issuer),
    "wrong_issuer": refused(audience="istio-ca", issuer="https://other"),
    "flipped_bit": refused(token=flipped, audience="istio-ca"),
    "thumbprint": thumbprint,
    "kid": kid,
}))
"#;

#[test]
fn tokens_we_issue_verify_in_pyjwt_for_every_key_type() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    for (algorithm, jws_alg) in [
        ("ec-p256", "ES256"),
        ("ec-p384", "ES384"),
        ("ed25519", "EdDSA"),
        ("rsa-2048", "RS256"),
    ] {
        let key = dir.path().join(format!("{algorithm}.pem"));
        run(rampart()
            .args(["token", "keygen", "--algorithm", algorithm, "--out"])
            .arg(&key));
        let token = stdout(&run(rampart()
            .args(["token", "issue", "--key"])
            .arg(&key)
            .args([
                "--issuer", ISSUER, "--ns", "ns1", "--sa", "sa1", "--ttl", "5m",
            ])));
        let jwks = stdout(&run(rampart().args(["token", "jwks", "--key"]).arg(&key)));
        let token_path = dir.path().join(format!("{algorithm}.jwt"));
        let jwks_path = dir.path().join(format!("{algorithm}.jwks.json"));
        std::fs::write(&token_path, &token).unwrap();
        std::fs::write(&jwks_path, &jwks).unwrap();

        let out = run(Command::new(&py)
            .args(["-c", PY_VERIFY])
            .arg(&jwks_path)
            .arg(&token_path)
            .arg(ISSUER));
        let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
        let claims = &report["claims"];
        assert_eq!(report["alg"], jws_alg, "{algorithm}");
        assert_eq!(claims["sub"], "system:serviceaccount:ns1:sa1");
        assert_eq!(claims["iss"], ISSUER);
        assert_eq!(claims["aud"], "istio-ca");
        assert_eq!(claims["kubernetes.io"]["namespace"], "ns1");
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "sa1");
        assert_eq!(
            claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
            300
        );
        // The default kid is the RFC 7638 thumbprint, as Python computes it.
        assert_eq!(report["kid"], report["thumbprint"], "{algorithm}");
        // Negative twins, judged by PyJWT.
        assert_eq!(report["wrong_audience"], "InvalidAudienceError");
        assert_eq!(report["wrong_issuer"], "InvalidIssuerError");
        assert_eq!(report["flipped_bit"], "InvalidSignatureError");

        // And our own verifier agrees.
        run(rampart()
            .args([
                "token",
                "verify",
                "--workload",
                "--aud",
                "istio-ca",
                "--issuer",
                ISSUER,
            ])
            .arg("--jwks")
            .arg(&jwks_path)
            .arg("--token")
            .arg(&token_path));
    }
}

/// Mint tokens with PyJWT from a key it makes; write its own JWKS (no `alg` member, so one
/// RSA key serves every RSA algorithm).
const PY_MINT: &str = r#"
import json, sys, time, jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
out = sys.argv[1]
now = int(time.time())
claims = {"iss": "https://py.test", "sub": "system:serviceaccount:ns2:sa2", "aud": ["x", "istio-ca"],
          "iat": now, "exp": now + 600}
keys = {
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "p256": ec.generate_private_key(ec.SECP256R1()),
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "ed": ed25519.Ed25519PrivateKey.generate(),
}
algs = {"RS256": "rsa", "RS384": "rsa", "RS512": "rsa", "PS256": "rsa", "PS384": "rsa",
        "PS512": "rsa", "ES256": "p256", "ES384": "p384", "EdDSA": "ed"}
jwk_of = {"rsa": jwt.algorithms.RSAAlgorithm, "p256": jwt.algorithms.ECAlgorithm,
          "p384": jwt.algorithms.ECAlgorithm, "ed": jwt.algorithms.OKPAlgorithm}
jwks = {"keys": []}
for name, key in keys.items():
    jwk = json.loads(jwk_of[name].to_jwk(key.public_key()))
    jwk["kid"] = name
    jwks["keys"].append(jwk)
tokens = {alg: jwt.encode(claims, keys[k], algorithm=alg, headers={"kid": k}) for alg, k in algs.items()}
tokens["expired"] = jwt.encode(dict(claims, exp=now - 120), keys["p256"], algorithm="ES256", headers={"kid": "p256"})
stranger = ec.generate_private_key(ec.SECP256R1())
tokens["foreign-key"] = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "p256"})
tokens["hs256"] = jwt.encode(claims, "secret-secret-secret-secret-secret", algorithm="HS256", headers={"kid": "rsa"})
tokens["none"] = jwt.encode(claims, None, algorithm="none")
json.dump({"jwks": jwks, "tokens": tokens}, open(out, "w"))
"#;

#[test]
fn tokens_pyjwt_mints_verify_with_rampart_and_bad_ones_are_refused() {
    let py = python();
    let dir = tempfile::tempdir().unwrap();
    let minted = dir.path().join("minted.json");
    run(Command::new(&py).args(["-c", PY_MINT]).arg(&minted));
    let minted: Value = serde_json::from_str(&std::fs::read_to_string(&minted).unwrap()).unwrap();
    let jwks_path = dir.path().join("py-jwks.json");
    std::fs::write(&jwks_path, minted["jwks"].to_string()).unwrap();

    let verify = |name: &str| {
        let token_path = dir.path().join(format!("{name}.jwt"));
        std::fs::write(&token_path, minted["tokens"][name].as_str().unwrap()).unwrap();
        rampart()
            .args(["token", "verify", "--workload", "--aud", "istio-ca"])
            .args(["--issuer", "https://py.test", "--jwks"])
            .arg(&jwks_path)
            .arg("--token")
            .arg(&token_path)
            .output()
            .unwrap()
    };
    for alg in [
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
    ] {
        let out = verify(alg);
        assert!(
            out.status.success(),
            "{alg}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(claims["sub"], "system:serviceaccount:ns2:sa2", "{alg}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("service account ns2/sa2"));
    }
    for (name, reason) in [
        ("expired", "expired"),
        ("foreign-key", "signature does not verify"),
        ("hs256", "symmetric JWT algorithm"),
        ("none", "unsecured JWT"),
    ] {
        let out = verify(name);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(reason), "{name}: {stderr}");
        assert!(out.stdout.is_empty(), "{name}");
        // The refusal never echoes the token.
        let token = minted["tokens"][name].as_str().unwrap();
        for segment in token.split('.').filter(|s| s.len() > 8) {
            assert!(!stderr.contains(segment), "{name}: {stderr}");
        }
    }
}

#[test]
fn bad_input_exits_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    run(rampart().args(["token", "keygen", "--out"]).arg(&key));
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["keygen".into(), "--out".into(), key.display().to_string()],
            "file exists",
        ),
        (
            vec![
                "keygen".into(),
                "--algorithm".into(),
                "dsa".into(),
                "--out".into(),
                dir.path().join("x.pem").display().to_string(),
            ],
            "--algorithm",
        ),
        (
            vec![
                "issue".into(),
                "--key".into(),
                dir.path().join("missing.pem").display().to_string(),
                "--issuer".into(),
                "i".into(),
                "--ns".into(),
                "n".into(),
                "--sa".into(),
                "s".into(),
            ],
            "missing.pem",
        ),
        (
            vec![
                "issue".into(),
                "--key".into(),
                key.display().to_string(),
                "--issuer".into(),
                "i".into(),
                "--ns".into(),
                "Bad_NS".into(),
                "--sa".into(),
                "s".into(),
            ],
            "--ns/--sa",
        ),
        (
            vec![
                "issue".into(),
                "--key".into(),
                key.display().to_string(),
                "--issuer".into(),
                "i".into(),
                "--ns".into(),
                "n".into(),
                "--sa".into(),
                "s".into(),
                "--ttl".into(),
                "0s".into(),
            ],
            "--ttl",
        ),
        (
            vec!["verify".into(), "--jwks".into(), key.display().to_string()],
            "--jwks",
        ),
    ];
    for (args, reason) in cases {
        let out = rampart().arg("token").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
    }

    // --kid is honoured in both the token and the JWKS.
    let token = stdout(&run(rampart()
        .args(["token", "issue", "--kid", "my-kid", "--key"])
        .arg(&key)
        .args(["--issuer", "i", "--ns", "n", "--sa", "s"])));
    let jwks: Value = serde_json::from_str(&stdout(&run(rampart()
        .args(["token", "jwks", "--kid", "my-kid", "--key"])
        .arg(&key))))
    .unwrap();
    assert_eq!(jwks["keys"][0]["kid"], "my-kid");
    let header = token.split('.').next().unwrap();
    use base64::Engine as _;
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], "my-kid");
}

/// `issue --out FILE`: the token alone (no trailing newline), mode 0600 even when an older,
/// world-readable token file is replaced, and it verifies like the printed one.
#[test]
fn issue_out_writes_the_token_0600_without_a_newline() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    run(rampart().args(["token", "keygen", "--out"]).arg(&key));
    let jwks = dir.path().join("jwks.json");
    std::fs::write(
        &jwks,
        stdout(&run(rampart().args(["token", "jwks", "--key"]).arg(&key))),
    )
    .unwrap();
    let token_file = dir.path().join("token.jwt");
    std::fs::write(&token_file, "old\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let issue = |out: Option<&std::path::Path>| {
        let mut c = rampart();
        c.args(["token", "issue", "--key"])
            .arg(&key)
            .args(["--issuer", ISSUER, "--ns", "default", "--sa", "web"]);
        if let Some(o) = out {
            c.arg("--out").arg(o);
        }
        run(&mut c)
    };
    let out = issue(Some(&token_file));
    assert!(out.stdout.is_empty(), "nothing on stdout with --out");
    let text = std::fs::read_to_string(&token_file).unwrap();
    assert!(
        !text.ends_with('\n') && text.split('.').count() == 3,
        "{text:?}"
    );
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    run(rampart()
        .args(["token", "verify", "--workload", "--jwks"])
        .arg(&jwks)
        .arg("--token")
        .arg(&token_file)
        .args(["--issuer", ISSUER]));
    // Twin: without --out the token is printed, one line.
    let printed = stdout(&issue(None));
    assert!(printed.ends_with('\n') && printed.trim().split('.').count() == 3);
}
