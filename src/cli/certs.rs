//! `rampart certs`: root, intermediate and leaf material, like Istio's `tools/certs`.
//!
//! - `root` writes `root-cert.pem` and `root-key.pem`.
//! - `intermediate` writes Istio's plug-in ("cacerts") layout: `ca-cert.pem`, `ca-key.pem`,
//!   `cert-chain.pem` (intermediate, then root) and `root-cert.pem` (the root or roots).
//! - `leaf` writes `cert-chain.pem` (leaf first, root last), `key.pem`, `root-cert.pem`.
//! - `revoke` adds a serial to the CA directory's revocation list (`ca-crl-state.json`) and
//!   writes a fresh CRL; `crl` only re-signs it (run it before the CRL's nextUpdate). The
//!   CRL goes to `ca-crl.pem` in the CA directory (0644, atomic): this CA's own CRL first,
//!   then its issuers' CRLs (`--chain-crl`, or those already in the file), which is the file
//!   Istio's plug-in layout (and `rampart ca --cacerts`) reads.
//!
//! Bad input (an invalid SPIFFE ID, a missing or mismatched key or certificate, an output
//! directory that already holds key material without `--force`) exits 2 with one line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use rampart_certs::{
    CertInfo, CertificateAuthority, CertificateDer, IntermediateParams, KeyAlgorithm, PrivateKey,
    RootParams, SpiffeId, certs_to_pem, parse_certs_pem, write_file_atomic,
};

use super::bad_input;

#[derive(Debug, Subcommand)]
pub(crate) enum CertsCommand {
    /// Write a self-signed root CA (`root-cert.pem`, `root-key.pem`).
    Root(RootArgs),
    /// Write an intermediate CA signed by a root, in Istio's plug-in layout.
    Intermediate(IntermediateArgs),
    /// Write a workload certificate for a SPIFFE ID, signed by a CA directory.
    Leaf(LeafArgs),
    /// Revoke a certificate this CA directory issued and write a fresh `ca-crl.pem`.
    Revoke(RevokeArgs),
    /// Re-sign the CA directory's CRL (`ca-crl.pem`) with a new nextUpdate.
    Crl(CrlArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RevokeArgs {
    /// CA directory made with `rampart certs root` or `rampart certs intermediate`.
    #[arg(long)]
    ca: PathBuf,
    /// Serial number in hex, as `openssl x509 -serial` prints it (`serial=`, colons and
    /// leading zeros allowed).
    #[arg(long)]
    serial: String,
    /// RFC 5280 reason: keyCompromise, cACompromise, affiliationChanged, superseded,
    /// cessationOfOperation, certificateHold, privilegeWithdrawn, aACompromise or
    /// unspecified. None by default.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    crl: CrlOpts,
}

#[derive(Debug, Args)]
pub(crate) struct CrlArgs {
    /// CA directory made with `rampart certs root` or `rampart certs intermediate`.
    #[arg(long)]
    ca: PathBuf,
    #[command(flatten)]
    crl: CrlOpts,
}

#[derive(Debug, Args)]
pub(crate) struct CrlOpts {
    /// How long the CRL is valid (its nextUpdate), e.g. 7d, 12h. Re-run `rampart certs crl`
    /// before it runs out: readers report an expired CRL.
    #[arg(long, default_value = "7d")]
    valid: String,
    /// A CRL file of this CA's issuers (e.g. the root directory's `ca-crl.pem`), put after
    /// this CA's own CRL in `ca-crl.pem` (repeatable): Istio's plug-in layout wants one CRL
    /// per certificate of cert-chain.pem. Each must verify against cert-chain.pem and be
    /// current. Without it, the issuers' CRLs already in `ca-crl.pem` are kept.
    #[arg(long = "chain-crl", value_name = "FILE")]
    chain_crl: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RootArgs {
    /// Directory to write `root-cert.pem` and `root-key.pem` into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Key type: ec-p256, ec-p384, ed25519, rsa-2048, rsa-3072 or rsa-4096.
    #[arg(long, default_value = "ec-p256")]
    key_type: String,
    /// Lifetime in days.
    #[arg(long, default_value_t = 3650)]
    days: u32,
    /// Subject organization.
    #[arg(long, default_value = "Rampart")]
    org: String,
    /// Subject common name.
    #[arg(long, default_value = "Rampart Root CA")]
    cn: String,
    /// Overwrite key material already in the output directory.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct IntermediateArgs {
    /// Directory holding the root (`root-cert.pem`, `root-key.pem`).
    #[arg(long)]
    root: PathBuf,
    /// Name of this intermediate (e.g. the cluster); becomes its common name.
    #[arg(long)]
    name: String,
    /// Directory to write the plug-in layout into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Key type of the intermediate.
    #[arg(long, default_value = "ec-p256")]
    key_type: String,
    /// Lifetime in days (capped at the root's expiry).
    #[arg(long, default_value_t = 730)]
    days: u32,
    /// Subject organization.
    #[arg(long, default_value = "Rampart")]
    org: String,
    /// Overwrite key material already in the output directory.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
pub(crate) struct LeafArgs {
    /// CA directory: Istio's plug-in layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`) or a root directory (`root-cert.pem`, `root-key.pem`).
    #[arg(long)]
    ca: PathBuf,
    /// The workload's SPIFFE ID, e.g. spiffe://cluster.local/ns/default/sa/sleep.
    #[arg(long)]
    spiffe_id: String,
    /// Directory to write `cert-chain.pem`, `key.pem` and `root-cert.pem` into.
    #[arg(long)]
    out: PathBuf,
    /// Lifetime, e.g. 24h, 90d (at most 90d).
    #[arg(long, default_value = "24h")]
    ttl: String,
    /// Key type of the leaf.
    #[arg(long, default_value = "ec-p256")]
    key_type: String,
    /// Overwrite key material already in the output directory.
    #[arg(long)]
    force: bool,
}

impl CertsCommand {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        match self {
            CertsCommand::Root(args) => root(args),
            CertsCommand::Intermediate(args) => intermediate(args),
            CertsCommand::Leaf(args) => leaf(args),
            CertsCommand::Revoke(args) => revoke(args),
            CertsCommand::Crl(args) => crl(args),
        }?;
        Ok(ExitCode::SUCCESS)
    }
}

const DAY: u64 = 24 * 3600;

fn root(args: RootArgs) -> anyhow::Result<()> {
    let alg = key_type(&args.key_type)?;
    let validity = days(args.days)?;
    prepare_out(&args.out, args.force)?;
    let key = PrivateKey::generate(alg).context("generating the root key")?;
    let params = RootParams {
        common_name: args.cn,
        organization: args.org,
        validity,
    };
    let ca = CertificateAuthority::self_signed_root(&params, key.clone_key(), SystemTime::now())
        .context("making the root certificate")?;
    write_key(&args.out.join("root-key.pem"), &key)?;
    write_certs(&args.out.join("root-cert.pem"), &[ca.cert().clone()])?;
    report("root", ca.cert(), &args.out)?;
    Ok(())
}

fn intermediate(args: IntermediateArgs) -> anyhow::Result<()> {
    let alg = key_type(&args.key_type)?;
    let validity = days(args.days)?;
    if args.name.trim().is_empty() {
        return Err(bad_input("--name must not be empty"));
    }
    let roots = read_certs(&args.root.join("root-cert.pem"))?;
    let root_key = read_key(&args.root.join("root-key.pem"))?;
    // root-cert.pem may hold several roots (rotation): sign with the one the key matches.
    let root_ca = roots
        .iter()
        .find_map(|cert| CertificateAuthority::new(cert.clone(), root_key.clone_key(), vec![]).ok())
        .ok_or_else(|| {
            bad_input(format!(
                "{}: no certificate in {} matches this key (or it is not a CA)",
                args.root.join("root-key.pem").display(),
                args.root.join("root-cert.pem").display()
            ))
        })?;
    prepare_out(&args.out, args.force)?;
    let key = PrivateKey::generate(alg).context("generating the intermediate key")?;
    let params = IntermediateParams {
        common_name: args.name,
        organization: args.org,
        validity,
        path_len: Some(0),
    };
    let cert = root_ca
        .issue_intermediate(&params, &key.public_key_spki_der(), SystemTime::now())
        .map_err(|e| bad_input(format!("cannot issue from this root: {e}")))?;
    write_key(&args.out.join("ca-key.pem"), &key)?;
    write_certs(&args.out.join("ca-cert.pem"), std::slice::from_ref(&cert))?;
    write_certs(
        &args.out.join("cert-chain.pem"),
        &[cert.clone(), root_ca.cert().clone()],
    )?;
    write_certs(&args.out.join("root-cert.pem"), &roots)?;
    report("intermediate", &cert, &args.out)?;
    Ok(())
}

fn leaf(args: LeafArgs) -> anyhow::Result<()> {
    let id = SpiffeId::parse(&args.spiffe_id).map_err(|e| bad_input(e.to_string()))?;
    let ttl =
        parse_duration(&args.ttl).map_err(|e| bad_input(format!("--ttl {:?}: {e}", args.ttl)))?;
    let alg = key_type(&args.key_type)?;
    let (ca, roots) = load_ca_dir(&args.ca)?;
    prepare_out(&args.out, args.force)?;
    let key = PrivateKey::generate(alg).context("generating the leaf key")?;
    let cert = ca
        .issue_workload(&key.public_key_spki_der(), &id, ttl, SystemTime::now())
        .map_err(|e| bad_input(format!("cannot issue: {e}")))?;
    let mut chain = vec![cert.clone()];
    chain.extend(ca.chain_to_root());
    write_key(&args.out.join("key.pem"), &key)?;
    write_certs(&args.out.join("cert-chain.pem"), &chain)?;
    write_certs(&args.out.join("root-cert.pem"), &roots)?;
    report("leaf", &cert, &args.out)?;
    Ok(())
}

fn revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let serial = rampart_citadel::normalize_serial(&args.serial)
        .map_err(|e| bad_input(format!("--serial: {e}")))?;
    let reason = args
        .reason
        .as_deref()
        .map(str::parse::<rampart_certs::RevocationReason>)
        .transpose()
        .map_err(|e| bad_input(format!("--reason: {e}")))?;
    write_crl(&args.ca, &args.crl, |state, now| {
        let added = state
            .revoke(&serial, reason, None, None, now)
            .map_err(|e| bad_input(format!("--serial: {e}")))?;
        if added {
            println!(
                "revoked serial {serial}{}",
                reason.map(|r| format!(" ({r})")).unwrap_or_default()
            );
        } else {
            let first = state.find(&serial).map(|r| r.revoked_at.clone());
            println!(
                "serial {serial} was already revoked (at {}); CRL re-signed",
                first.unwrap_or_default()
            );
        }
        Ok(())
    })
}

fn crl(args: CrlArgs) -> anyhow::Result<()> {
    write_crl(&args.ca, &args.crl, |_, _| Ok(()))
}

/// Under a lock file in the CA directory: load the revocation state, apply `change`, sign the
/// next CRL, save the state, then write `ca-crl.pem` (own CRL first, then the issuers').
fn write_crl(
    dir: &Path,
    opts: &CrlOpts,
    change: impl FnOnce(&mut rampart_citadel::RevocationState, SystemTime) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use rampart_certs::{CrlExpiry, CrlSet, parse_crls_pem};

    let valid = parse_duration(&opts.valid)
        .map_err(|e| bad_input(format!("--valid {:?}: {e}", opts.valid)))?;
    if valid.is_zero() {
        return Err(bad_input("--valid must be longer than zero"));
    }
    let (ca, _) = load_ca_dir(dir)?;
    let issuers: Vec<CertificateDer<'static>> = ca.chain_to_root().into_iter().skip(1).collect();
    let now = SystemTime::now();
    // The issuers' CRLs: given, or kept from the current file.
    let crl_path = dir.join(rampart_citadel::CRL_FILE);
    let mut chain_crls = Vec::new();
    if !opts.chain_crl.is_empty() {
        for file in &opts.chain_crl {
            let text = std::fs::read_to_string(file)
                .map_err(|e| bad_input(format!("{}: {e}", file.display())))?;
            let crls =
                parse_crls_pem(&text).map_err(|e| bad_input(format!("{}: {e}", file.display())))?;
            // Only the CRLs of our issuers (a root's ca-crl.pem holds just its own).
            for crl in crls {
                CrlSet::new(vec![crl.clone()], &issuers, now, CrlExpiry::Refuse).map_err(|e| {
                    bad_input(format!(
                        "{}: not a current CRL of an issuer in {}: {e}",
                        file.display(),
                        dir.display()
                    ))
                })?;
                chain_crls.push(crl);
            }
        }
    } else if let Ok(text) = std::fs::read_to_string(&crl_path) {
        match parse_crls_pem(&text) {
            Ok(crls) => {
                for crl in crls {
                    // Our own previous CRL (or one of no issuer of ours) is replaced.
                    let Ok(set) = CrlSet::new(vec![crl.clone()], &issuers, now, CrlExpiry::Keep)
                    else {
                        continue;
                    };
                    if !set.expired(now).is_empty() {
                        eprintln!(
                            "warning: the CRL of {} kept in {} expired at {}; pass a fresh one with --chain-crl",
                            crl.issuer(),
                            crl_path.display(),
                            humantime::format_rfc3339_seconds(crl.next_update())
                        );
                    }
                    chain_crls.push(crl);
                }
            }
            Err(e) => eprintln!(
                "warning: {} unreadable ({e}); issuer CRLs in it are not carried over",
                crl_path.display()
            ),
        }
    }
    // One CRL per issuer.
    CrlSet::new(chain_crls.clone(), &issuers, now, CrlExpiry::Keep)
        .map_err(|e| bad_input(format!("issuer CRLs: {e}")))?;

    let lock_path = dir.join(".ca-crl.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let state_path = dir.join(rampart_citadel::CRL_STATE_FILE);
    let mut state = rampart_citadel::RevocationState::load(&state_path)
        .map_err(|e| bad_input(e.to_string()))?;
    change(&mut state, now)?;
    let own = state
        .sign_next(&ca, now, valid)
        .map_err(|e| bad_input(format!("{}: cannot sign a CRL: {e}", dir.display())))?;
    state.save(&state_path)?;
    let mut all = vec![own.clone()];
    all.extend(chain_crls.iter().cloned());
    write_file_atomic(
        &crl_path,
        rampart_certs::crls_to_pem(&all).as_bytes(),
        0o644,
    )
    .with_context(|| format!("writing {}", crl_path.display()))?;
    drop(lock);
    let subject = CertInfo::parse(ca.cert())?.subject;
    println!(
        "wrote CRL number {} of {subject} ({} revoked, next update {}) to {}{}",
        own.crl_number_hex()
            .and_then(|h| u128::from_str_radix(h, 16).ok())
            .map_or_else(|| "?".to_owned(), |n| n.to_string()),
        own.revoked_certs().count(),
        humantime::format_rfc3339_seconds(own.next_update()),
        crl_path.display(),
        if chain_crls.is_empty() {
            String::new()
        } else {
            format!(" with {} issuer CRL(s)", chain_crls.len())
        }
    );
    Ok(())
}

/// Loads a CA directory: the plug-in layout if `ca-cert.pem` exists, else a root directory.
/// Returns the authority and the root(s) to publish.
fn load_ca_dir(dir: &Path) -> anyhow::Result<(CertificateAuthority, Vec<CertificateDer<'static>>)> {
    let plug_in = dir.join("ca-cert.pem");
    if plug_in.exists() {
        let cert = read_certs(&plug_in)?.remove(0);
        let key = read_key(&dir.join("ca-key.pem"))?;
        let roots = read_certs(&dir.join("root-cert.pem"))?;
        let chain_path = dir.join("cert-chain.pem");
        let mut chain = if chain_path.exists() {
            read_certs(&chain_path)?
        } else {
            Vec::new()
        };
        // Istio's cert-chain.pem starts with ca-cert.pem itself.
        if chain.first() == Some(&cert) {
            chain.remove(0);
        }
        if chain.is_empty() {
            chain = roots.iter().take(1).cloned().collect();
        }
        let ca = CertificateAuthority::new(cert, key, chain)
            .map_err(|e| bad_input(format!("{}: {e}", dir.display())))?;
        Ok((ca, roots))
    } else {
        let cert_path = dir.join("root-cert.pem");
        let key_path = dir.join("root-key.pem");
        if !cert_path.exists() && !key_path.exists() {
            return Err(bad_input(format!(
                "{}: no CA material (expected ca-cert.pem + ca-key.pem, or root-cert.pem + root-key.pem)",
                dir.display()
            )));
        }
        let roots = read_certs(&cert_path)?;
        let key = read_key(&key_path)?;
        let ca = roots
            .iter()
            .find_map(|c| CertificateAuthority::new(c.clone(), key.clone_key(), vec![]).ok())
            .ok_or_else(|| {
                bad_input(format!(
                    "{}: no certificate in {} matches this key (or it is not a CA)",
                    key_path.display(),
                    cert_path.display()
                ))
            })?;
        Ok((ca, roots))
    }
}

fn key_type(s: &str) -> anyhow::Result<KeyAlgorithm> {
    s.parse::<KeyAlgorithm>()
        .map_err(|e| bad_input(format!("--key-type: {e}")))
}

fn days(n: u32) -> anyhow::Result<Duration> {
    if n == 0 {
        return Err(bad_input("--days must be at least 1"));
    }
    Ok(Duration::from_secs(u64::from(n) * DAY))
}

/// Parses a duration such as `24h`, `90d`, `1h30m` (humantime syntax; `d` is days).
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    // A bare number of days ("90d") is the common case; humantime handles the rest.
    if let Some(Ok(n)) = s.strip_suffix('d').map(str::parse::<u64>) {
        return n
            .checked_mul(DAY)
            .map(Duration::from_secs)
            .ok_or_else(|| "too long".to_string());
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| bad_input(format!("{}: {e}", path.display())))?;
    parse_certs_pem(&text).map_err(|e| bad_input(format!("{}: {e}", path.display())))
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKey> {
    PrivateKey::read_pem_file(path).map_err(|e| match e {
        rampart_certs::Error::Io { .. } => bad_input(e.to_string()),
        other => bad_input(format!("{}: {other}", path.display())),
    })
}

/// Creates the output directory, refusing one that already holds a private key unless
/// `force` is set.
fn prepare_out(dir: &Path, force: bool) -> anyhow::Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(bad_input(format!("{}: not a directory", dir.display())));
        }
        if let Some(found) = (!force)
            .then(|| key_material_in(dir))
            .transpose()?
            .flatten()
        {
            return Err(bad_input(format!(
                "{} already holds key material ({}); use --force to overwrite",
                dir.display(),
                found.display()
            )));
        }
    } else {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(())
}

/// The first file in `dir` that is a known key file name or holds a PEM private key.
fn key_material_in(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    const KEY_NAMES: &[&str] = &["root-key.pem", "ca-key.pem", "key.pem"];
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if KEY_NAMES.contains(&name) {
            return Ok(Some(path));
        }
        if path.is_file() && name.ends_with(".pem") {
            let text = std::fs::read(&path).unwrap_or_default();
            if text.windows(11).any(|w| w == b"PRIVATE KEY") {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
}

fn write_key(path: &Path, key: &PrivateKey) -> anyhow::Result<()> {
    key.write_pem_file(path)
        .with_context(|| format!("writing {}", path.display()))
}

fn write_certs(path: &Path, certs: &[CertificateDer<'_>]) -> anyhow::Result<()> {
    write_file_atomic(path, certs_to_pem(certs).as_bytes(), 0o644)
        .with_context(|| format!("writing {}", path.display()))
}

fn report(what: &str, cert: &CertificateDer<'_>, out: &Path) -> anyhow::Result<()> {
    let info = CertInfo::parse(cert)?;
    let name = info
        .uri_sans
        .first()
        .cloned()
        .unwrap_or_else(|| info.subject.clone());
    println!(
        "wrote {what} {name} (serial {}, expires {}) to {}",
        info.serial_hex,
        rampart_certs::timestamp::rfc3339(info.not_after),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(
            parse_duration("90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("2days").unwrap(),
            Duration::from_secs(2 * 86400)
        );
        assert!(parse_duration("").is_err());
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1h").is_err());
    }
}
