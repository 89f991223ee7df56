//! `rampart token`: workload tokens (JWT) for standalone CA callers, and their JWKS.
//!
//! `issue` mints what a Kubernetes projected service-account token carries (`iss`, `sub:
//! system:serviceaccount:<ns>:<sa>`, `aud`, `iat`, `nbf`, `exp`, `kubernetes.io`), signed with
//! a local key; `jwks` prints the key set the CA is given (`rampart ca --jwks`); `keygen`
//! makes a signing key; `verify` checks a token the way the CA does.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use rampart_certs::jwt::{self, Jwks, JwtSigner, ServiceAccount, Validation};
use rampart_certs::{KeyAlgorithm, PrivateKey};
use serde_json::{Value, json};

/// The audience Istio's CA expects in caller tokens.
const ISTIO_CA_AUDIENCE: &str = "istio-ca";

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Mint a workload token for a service account, signed with KEY.
    Issue(IssueArgs),
    /// Print the JWK set that verifies tokens signed with KEY.
    Jwks(JwksArgs),
    /// Make a signing key (PKCS#8 PEM, mode 0600).
    Keygen(KeygenArgs),
    /// Verify a token against a JWK set (as the CA does) and print its claims.
    Verify(VerifyArgs),
}

#[derive(Debug, Args)]
pub(crate) struct IssueArgs {
    /// Private key file (PEM: PKCS#8, SEC1 or PKCS#1). EC P-256 signs ES256, P-384 ES384,
    /// Ed25519 EdDSA, RSA RS256.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Issuer (`iss`); the CA's `--jwt-issuer` must match it exactly.
    #[arg(long, value_name = "ISS")]
    issuer: String,
    /// Namespace of the service account.
    #[arg(long, value_name = "NS")]
    ns: String,
    /// Service account name.
    #[arg(long, value_name = "SA")]
    sa: String,
    /// Audience (`aud`); repeat for several.
    #[arg(long, value_name = "AUD", default_value = ISTIO_CA_AUDIENCE)]
    aud: Vec<String>,
    /// Lifetime, e.g. `1h`, `10m`, `30s`.
    #[arg(long, value_name = "DUR", default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Key id; default: the RFC 7638 thumbprint of the public key (what `jwks` prints).
    #[arg(long, value_name = "K")]
    kid: Option<String>,
    /// Write the token to FILE (mode 0600, atomically: a reader never sees half a token;
    /// no trailing newline) instead of printing it. An existing file is replaced, as a
    /// rotated projected token is.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct JwksArgs {
    /// Private key file whose public half to publish.
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Key id; default: the RFC 7638 thumbprint of the public key.
    #[arg(long, value_name = "K")]
    kid: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct KeygenArgs {
    /// Where to write the key (PKCS#8 PEM, mode 0600, written atomically).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Key algorithm: ec-p256, ec-p384, ed25519, rsa-2048, rsa-3072, rsa-4096.
    #[arg(long, value_name = "ALG", default_value = "ec-p256")]
    algorithm: String,
    /// Replace an existing file.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    /// JWK set file (JSON set, single JWK, or PEM public keys).
    #[arg(long, value_name = "FILE")]
    jwks: PathBuf,
    /// File holding the token, or `-` for stdin.
    #[arg(long, value_name = "FILE", default_value = "-")]
    token: String,
    /// Required issuer.
    #[arg(long, value_name = "ISS")]
    issuer: Option<String>,
    /// Accepted audience; repeat for several. None given: any audience.
    #[arg(long, value_name = "AUD")]
    aud: Vec<String>,
    /// Allowed clock skew on exp/nbf.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = humantime::parse_duration)]
    leeway: Duration,
    /// Also require a service account (sub `system:serviceaccount:<ns>:<sa>` or
    /// `kubernetes.io` claims) and an `exp`, as the CA does.
    #[arg(long)]
    workload: bool,
}

impl TokenCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            TokenCommand::Issue(args) => issue(args),
            TokenCommand::Jwks(args) => jwks(args),
            TokenCommand::Keygen(args) => keygen(args),
            TokenCommand::Verify(args) => verify(args),
        }
    }
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKey> {
    PrivateKey::read_pem_file(path)
        .map_err(|e| super::bad_input(format!("--key {}: {e}", path.display())))
}

fn signer(key: &PrivateKey, kid: Option<String>) -> anyhow::Result<JwtSigner> {
    let signer = match kid {
        Some(kid) if kid.is_empty() => return Err(super::bad_input("--kid must not be empty")),
        Some(kid) => JwtSigner::new(key, kid),
        None => JwtSigner::with_thumbprint_kid(key),
    };
    signer.map_err(|e| super::bad_input(format!("--key: {e}")))
}

/// The claims of a workload token, as a Kubernetes projected service-account token has them.
pub(crate) fn workload_claims(
    issuer: &str,
    account: &ServiceAccount,
    audiences: &[String],
    now: SystemTime,
    ttl: Duration,
) -> Value {
    let iat = rampart_certs::timestamp::unix_secs_u64(now);
    let aud = match audiences {
        [one] => json!(one),
        many => json!(many),
    };
    json!({
        "iss": issuer,
        "sub": format!("system:serviceaccount:{}:{}", account.namespace, account.name),
        "aud": aud,
        "iat": iat,
        "nbf": iat,
        "exp": iat + ttl.as_secs(),
        "kubernetes.io": {
            "namespace": account.namespace,
            "serviceaccount": { "name": account.name },
        },
    })
}

fn issue(args: IssueArgs) -> anyhow::Result<ExitCode> {
    if args.issuer.is_empty() {
        return Err(super::bad_input("--issuer must not be empty"));
    }
    if args.aud.iter().any(String::is_empty) {
        return Err(super::bad_input("--aud must not be empty"));
    }
    if args.ttl.as_secs() == 0 {
        return Err(super::bad_input("--ttl must be at least 1s"));
    }
    let account = ServiceAccount::new(&args.ns, &args.sa).map_err(|e| match e {
        jwt::JwtError::MissingServiceAccount { reason } => {
            super::bad_input(format!("--ns/--sa: {reason}"))
        }
        other => super::bad_input(format!("--ns/--sa: {other}")),
    })?;
    let key = read_key(&args.key)?;
    let signer = signer(&key, args.kid)?;
    let claims = workload_claims(
        &args.issuer,
        &account,
        &args.aud,
        SystemTime::now(),
        args.ttl,
    );
    let token = signer.sign(&claims).context("signing the token")?;
    match &args.out {
        Some(path) => {
            rampart_certs::write_file_atomic(path, token.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "wrote a token for {}/{} to {} (expires in {})",
                account.namespace,
                account.name,
                path.display(),
                humantime::format_duration(args.ttl)
            );
        }
        None => println!("{token}"),
    }
    Ok(ExitCode::SUCCESS)
}

fn jwks(args: JwksArgs) -> anyhow::Result<ExitCode> {
    let key = read_key(&args.key)?;
    let set = signer(&key, args.kid)?
        .jwks()
        .context("building the JWK set")?;
    println!("{}", serde_json::to_string_pretty(&set.to_json())?);
    Ok(ExitCode::SUCCESS)
}

fn keygen(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let alg: KeyAlgorithm = args
        .algorithm
        .parse()
        .map_err(|e| super::bad_input(format!("--algorithm: {e}")))?;
    if args.out.exists() && !args.force {
        return Err(super::bad_input(format!(
            "--out {}: file exists (use --force to replace it)",
            args.out.display()
        )));
    }
    let key = PrivateKey::generate(alg).context("generating the key")?;
    key.write_pem_file(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let kid = jwt::key_thumbprint(&key).context("computing the key thumbprint")?;
    eprintln!("wrote {} key to {} (kid {kid})", alg, args.out.display());
    Ok(ExitCode::SUCCESS)
}

fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&args.jwks)
        .map_err(|e| super::bad_input(format!("--jwks {}: {e}", args.jwks.display())))?;
    let set = Jwks::parse(&text)
        .map_err(|e| super::bad_input(format!("--jwks {}: {e}", args.jwks.display())))?;
    for skipped in set.skipped() {
        eprintln!("rampart: warning: --jwks: skipped {skipped}");
    }
    let mut token = String::new();
    if args.token == "-" {
        std::io::stdin()
            .read_to_string(&mut token)
            .context("reading the token from stdin")?;
    } else {
        token = std::fs::read_to_string(&args.token)
            .map_err(|e| super::bad_input(format!("--token {}: {e}", args.token)))?;
    }
    let policy = Validation {
        issuer: args.issuer,
        audiences: args.aud,
        leeway: args.leeway,
        require_expiration: args.workload,
    };
    let verified = match policy.verify(token.trim(), &set, SystemTime::now()) {
        Ok(verified) => verified,
        Err(err) => {
            eprintln!("rampart: token refused: {err}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if args.workload {
        match verified.service_account() {
            Ok(account) => eprintln!("service account {}/{}", account.namespace, account.name),
            Err(err) => {
                eprintln!("rampart: token refused: {err}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&Value::Object(verified.claims().clone()))?
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_claims_match_a_kubernetes_token() {
        let account = ServiceAccount::new("ns1", "sa1").unwrap();
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_000);
        let claims = workload_claims(
            "iss",
            &account,
            &["istio-ca".into()],
            now,
            Duration::from_secs(60),
        );
        assert_eq!(claims["sub"], "system:serviceaccount:ns1:sa1");
        assert_eq!(claims["aud"], "istio-ca");
        assert_eq!(claims["iat"], 1_000);
        assert_eq!(claims["exp"], 1_060);
        assert_eq!(claims["kubernetes.io"]["namespace"], "ns1");
        assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "sa1");
        let two = workload_claims(
            "iss",
            &account,
            &["a".into(), "b".into()],
            now,
            Duration::from_secs(60),
        );
        assert_eq!(two["aud"], json!(["a", "b"]));
    }
}
