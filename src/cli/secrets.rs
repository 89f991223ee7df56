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
        if !self.sds_socket.exists() {
            return Err(super::bad_input(format!(
                "--sds-socket {}: no such socket",
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
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&items)?);
            return Ok(ExitCode::SUCCESS);
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
            // The CRLs of a validation context: one row each (issuer, number, validity, how
            // many serials it revokes; `--json` lists them).
            match s.crl_pem.as_deref().map(rampart_certs::parse_crls_pem) {
                None => {}
                Some(Ok(crls)) => {
                    for crl in &crls {
                        println!(
                            "{:<9} {:<11} {:<7} {:<50} {:<34} {:<21} {:<21} {} revoked{}",
                            s.name,
                            "CRL",
                            !crl.is_expired(now),
                            crl.issuer(),
                            format!("#{}", crl.crl_number_hex().unwrap_or("-")),
                            rampart_certs::timestamp::rfc3339(crl.this_update()),
                            rampart_certs::timestamp::rfc3339(crl.next_update()),
                            crl.revoked_certs().count(),
                            if s.crl_leaf_only { ", leaf only" } else { "" },
                        );
                    }
                }
                Some(Err(e)) => println!("{:<9} {:<11} unreadable CRL: {e}", s.name, "CRL"),
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// The CRLs `s` carries, for `--json`: an empty list when it has none, an error object when
/// they cannot be read.
fn crls_json(s: &ServedSecret, now: SystemTime) -> serde_json::Value {
    let Some(pem) = s.crl_pem.as_deref() else {
        return serde_json::json!([]);
    };
    match rampart_certs::parse_crls_pem(pem) {
        Ok(crls) => crls
            .iter()
            .map(|crl| {
                serde_json::json!({
                    "issuer": crl.issuer(),
                    "crl_number": crl.crl_number_hex(),
                    "this_update": rampart_certs::timestamp::rfc3339(crl.this_update()),
                    "next_update": rampart_certs::timestamp::rfc3339(crl.next_update()),
                    "expired": crl.is_expired(now),
                    "leaf_only": s.crl_leaf_only,
                    "revoked": crl.revoked_certs().map(|r| serde_json::json!({
                        "serial": r.serial_hex,
                        "revoked_at": rampart_certs::timestamp::rfc3339(r.revoked_at),
                        "reason": r.reason.map(|r| r.name()),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}
