//! File output for applications that read certificates from disk (Istio `OUTPUT_CERTS`).

use std::path::Path;

use crate::Error;
use crate::state::{Bundle, ServedCrls, Svid};

/// File names, as Istio writes them.
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";
/// Private key file (mode 0600).
pub const KEY_FILE: &str = "key.pem";
/// Trust bundle file.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The validated CRLs the CA serves, PEM (as Istio names the file in `cacerts`).
pub const CA_CRL_FILE: &str = "ca-crl.pem";

fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let path = dir.join(name);
    rampart_certs::write_file_atomic(&path, bytes, mode)
        .map_err(|source| Error::WriteFile { path, source })
}

/// Write the SVID and bundle, each file atomically (temp file + rename). The key is written
/// before the chain so a reader that sees a new chain also finds its key.
///
/// The directory is made 0755 if missing and judged first as a socket's directory is
/// ([`crate::uds::prepare_output_dir`]): nobody but the agent's user (or root) may own,
/// write or rename it (unless `trusted`: `--trust-output-dir`), or a directory above it.
pub(crate) fn write_outputs(
    dir: &Path,
    trusted: bool,
    svid: &Svid,
    bundle: Option<&Bundle>,
) -> Result<(), Error> {
    crate::uds::prepare_output_dir(dir, trusted)?;
    write(dir, KEY_FILE, svid.key_pem.as_bytes(), 0o600)?;
    write(dir, CERT_CHAIN_FILE, svid.chain_pem.as_bytes(), 0o644)?;
    if let Some(b) = bundle {
        write(dir, ROOT_CERT_FILE, b.pem.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Write `ca-crl.pem` (atomically, 0644) beside `root-cert.pem`, or remove it when no CRL is
/// served (so a reader never enforces a list the CA no longer serves).
pub(crate) fn write_crls(
    dir: &Path,
    trusted: bool,
    crls: Option<&ServedCrls>,
) -> Result<(), Error> {
    match crls.filter(|c| !c.set().is_empty()) {
        Some(c) => {
            crate::uds::prepare_output_dir(dir, trusted)?;
            write(dir, CA_CRL_FILE, c.pem().as_bytes(), 0o644)
        }
        None => match std::fs::remove_file(dir.join(CA_CRL_FILE)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::WriteFile {
                path: dir.join(CA_CRL_FILE),
                source: e,
            }),
            _ => Ok(()),
        },
    }
}

/// Remove the chain and key (the certificate expired: fail closed for file readers too).
pub(crate) fn remove_svid(dir: &Path) {
    for f in [CERT_CHAIN_FILE, KEY_FILE] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}
