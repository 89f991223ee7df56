//! `rampart secrets`: what an SDS server serves (like `istioctl proxy-config secret`),
//! including the CRLs a `ROOTCA` validation context carries.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rampart_node_agent::{DEFAULT_SDS_SOCKET, SecretKind, ServedSecret, fetch_secrets};

#[derive(Debug, clap::Args)]
pub(crate) struct SecretsArgs {
    /// The SDS socket to ask.
    #[arg(long, default_value = DEFAULT_SDS_SOCKET)]
    sds_socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// How long to wait for an answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

impl SecretsArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        // `exists()` says false for a socket in a directory we may not search: name why.
        if let Err(e) = std::fs::metadata(&self.sds_socket) {
            let why = if e.kind() == std::io::ErrorKind::NotFound {
                "no such socket".to_string()
            } else {
                e.to_string()
            };
            return Err(super::bad_input(format!(
                "--sds-socket {}: {why}",
                self.sds_socket.display()
            )));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let secrets = rt.block_on(fetch_secrets(&self.sds_socket, self.timeout))?;
        let now = SystemTime::now();
        if self.json {
            let items: Vec<serde_json::Value> = secrets
                .iter()
                .map(|s| {
                    serde_json::json!({
                        "name": s.name,
                        "type": match s.kind { SecretKind::CertChain => "Cert Chain", SecretKind::Ca => "CA" },
                        "version": s.version_info,
                        "has_private_key": s.has_key,
                        "certificates": s.certs.iter().map(|c| serde_json::json!({
                            "spiffe_ids": c.uri_sans,
                            "subject": c.subject,
                            "serial": c.serial_hex,
                            "not_before": rampart_certs::timestamp::rfc3339(c.not_before),
                            "not_after": rampart_certs::timestamp::rfc3339(c.not_after),
                            "valid": c.not_before <= now && now < c.not_after,
                            "sha256_fingerprint": c.sha256_fingerprint,
                        })).collect::<Vec<_>>(),
                        "crls": crls_json(s, now),
                        "crls_error": crls(s).err(),
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&items)?);
            return Ok(exit_code(&secrets));
        }
        println!(
            "{:<9} {:<11} {:<7} {:<50} {:<34} {:<21} {:<21} SHA256 FINGERPRINT",
            "RESOURCE", "TYPE", "VALID", "SPIFFE ID / SUBJECT", "SERIAL", "NOT BEFORE", "NOT AFTER"
        );
        for s in &secrets {
            let kind = match s.kind {
                SecretKind::CertChain => "Cert Chain",
                SecretKind::Ca => "CA",
            };
            // For a chain the leaf is what matters; for a bundle, every root.
            let shown: &[_] = match s.kind {
                SecretKind::CertChain => &s.certs[..s.certs.len().min(1)],
                SecretKind::Ca => &s.certs,
            };
            for c in shown {
                let who = c
                    .uri_sans
                    .first()
                    .cloned()
                    .unwrap_or_else(|| c.subject.clone());
                println!(
                    "{:<9} {:<11} {:<7} {:<50} {:<34} {:<21} {:<21} {}",
                    s.name,
                    kind,
                    c.not_before <= now && now < c.not_after,
                    who,
                    c.serial_hex,
                    rampart_certs::timestamp::rfc3339(c.not_before),
                    rampart_certs::timestamp::rfc3339(c.not_after),
                    c.sha256_fingerprint
                );
            }
        }
        // The CRLs the validation contexts carry, in a table of their own (a long issuer
        // name last, so that it does not shift the other columns).
        let mut header = false;
        for s in &secrets {
            let parsed = match crls(s) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("rampart: {}: unreadable CRL: {e}", s.name);
                    continue;
                }
            };
            for crl in &parsed {
                if !header {
                    println!(
                        "\n{:<9} {:<7} {:<18} {:<21} {:<21} {:<8} {:<7} ISSUER",
                        "RESOURCE",
                        "VALID",
                        "CRL NUMBER",
                        "THIS UPDATE",
                        "NEXT UPDATE",
                        "REVOKED",
                        "CHECKS"
                    );
                    header = true;
                }
                println!(
                    "{:<9} {:<7} {:<18} {:<21} {:<21} {:<8} {:<7} {}",
                    s.name,
                    crl.this_update() <= now && !crl.is_expired(now),
                    crl.crl_number_hex().unwrap_or("-"),
                    rampart_certs::timestamp::rfc3339(crl.this_update()),
                    rampart_certs::timestamp::rfc3339(crl.next_update()),
                    crl.revoked_certs().count(),
                    if s.crl_leaf_only { "leaf" } else { "chain" },
                    crl.issuer(),
                );
            }
        }
        Ok(exit_code(&secrets))
    }
}

/// The CRLs `s` carries (none when it has none), or why they cannot be read.
fn crls(s: &ServedSecret) -> Result<Vec<rampart_certs::Crl>, String> {
    match s.crl_pem.as_deref() {
        None => Ok(Vec::new()),
        Some(pem) => rampart_certs::parse_crls_pem(pem).map_err(|e| e.to_string()),
    }
}

/// Failure when a served CRL cannot be read: a script asking "is this serial revoked?" must
/// not take an unreadable list for an empty one.
fn exit_code(secrets: &[ServedSecret]) -> ExitCode {
    if secrets.iter().any(|s| crls(s).is_err()) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The CRLs `s` carries, for `--json`: always a list (empty when it has none or when they
/// cannot be read; `crls_error` then says why).
fn crls_json(s: &ServedSecret, now: SystemTime) -> serde_json::Value {
    crls(s)
        .unwrap_or_default()
        .iter()
        .map(|crl| {
            serde_json::json!({
                "issuer": crl.issuer(),
                "crl_number": crl.crl_number_hex(),
                "this_update": rampart_certs::timestamp::rfc3339(crl.this_update()),
                "next_update": rampart_certs::timestamp::rfc3339(crl.next_update()),
                "valid": crl.this_update() <= now && !crl.is_expired(now),
                "leaf_only": s.crl_leaf_only,
                "revoked": crl.revoked_certs().map(|r| serde_json::json!({
                    "serial": r.serial_hex,
                    "revoked_at": rampart_certs::timestamp::rfc3339(r.revoked_at),
                    "reason": r.reason.map(|r| r.name()),
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}
