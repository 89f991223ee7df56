//! The CA's keys in Kubernetes, as istiod keeps them:
//!
//! - Secret `cacerts` in the CA's namespace, when present: plug-in material in either layout
//!   istiod reads, with the same refusal rules as the plug-in folder (it is written there and
//!   loaded by citadel's own loader, which refuses what it refuses from a folder):
//!   - Istio's (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`, `root-cert.pem`), or
//!   - `kubernetes.io/tls`, as cert-manager writes it for a `Certificate` with `isCA: true` and
//!     `secretName: cacerts` (`tls.crt`: the signing certificate and optionally its issuer
//!     chain; `tls.key`; `ca.crt`: the trust anchors). A `tls.crt` selects this layout, as in
//!     istiod; Istio-layout keys beside it are written but ignored (with a warning).
//!
//!   An optional `ca-crl.pem` applies to both. The Secret's type is not looked at
//!   (`kubernetes.io/tls` and `Opaque` alike); its keys are.
//! - Otherwise Secret `istio-ca-secret` (`ca-cert.pem`, `ca-key.pem`): the self-signed root,
//!   created once by whichever replica gets there first (create; on 409 AlreadyExists the
//!   winner's root is loaded), so every replica signs under one root. Its key is never
//!   changed; when the root is renewed (same key and subject, a new certificate) the Lease
//!   holder writes the new certificate back ([`sync_self_signed_root`], optimistic
//!   concurrency) and the other replicas follow the Secret and load it ([`follow_ca_secret`]).
//!   The keys are istiod's, so a cluster moving from istiod's self-signed CA keeps its root.
//!
//! The Secret's content is written into the directories the CA already reads (the plug-in
//! folder, the state folder), keys 0600 and atomically; the CA then starts as in standalone
//! mode. [`follow_cacerts`] watches `cacerts` afterwards and writes valid changes into the
//! plug-in folder, which the CA hot-reloads; a deleted `cacerts` is logged as an error and
//! the CA keeps its last material.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use rampart_certs::TrustDomain;
use rampart_citadel::{
    CA_CERT, CA_KEY, CERT_CHAIN, PluginFiles, ROOT_CERT, SELF_SIGNED_CERT, SELF_SIGNED_KEY, TLS_CA,
    TLS_CRT, TLS_KEY, load_or_create_self_signed, load_plugin,
};
use zeroize::Zeroizing;

use crate::K8sError;

/// The plug-in Secret (istiod's name).
pub const CACERTS_SECRET: &str = "cacerts";
/// The self-signed root's Secret (istiod's name).
pub const CA_SECRET: &str = "istio-ca-secret";
/// The optional CRL file of plug-in material.
const CA_CRL: &str = "ca-crl.pem";
/// Every file of plug-in material the CA reads, both layouts. Written in this order and
/// removed in the reverse one, so that `tls.crt` (which selects the `kubernetes.io/tls`
/// layout) appears only after `tls.key` and `ca.crt` and goes before them: a switch between
/// layouts never shows the CA's reload an incomplete `kubernetes.io/tls` layout on the way.
const PLUGIN_FILES: &[&str] = &[
    CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, CA_CRL, TLS_KEY, TLS_CA, TLS_CRT,
];
/// The files of [`PLUGIN_FILES`] that hold a private key (written 0600).
const KEY_FILES: &[&str] = &[CA_KEY, TLS_KEY];

/// Where the CA's material came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Secret `cacerts` (plug-in material).
    Plugin,
    /// Secret `istio-ca-secret`: created by this replica (`true`) or loaded (`false`).
    SelfSigned {
        /// Whether this replica created the Secret.
        created: bool,
    },
}

/// Loads the CA material from Secrets in `namespace` into `cacerts_dir` (plug-in) or
/// `state_dir` (self-signed), creating `istio-ca-secret` if neither Secret exists.
pub async fn sync_ca_material(
    client: &kube::Client,
    namespace: &str,
    cacerts_dir: &Path,
    state_dir: &Path,
    trust_domain: &TrustDomain,
    self_signed_ttl: Duration,
) -> Result<Origin, K8sError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    if let Some(cacerts) = secrets.get_opt(CACERTS_SECRET).await? {
        if let Err(e) = write_plugin(namespace, &cacerts, cacerts_dir, trust_domain) {
            // The replica will not start: say why where `kubectl describe secret` looks.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                post_refusal(
                    client.clone(),
                    namespace,
                    &cacerts,
                    &format!("this CA replica does not start: {e}"),
                ),
            )
            .await;
            return Err(e);
        }
        tracing::info!(secret = %format!("{namespace}/{CACERTS_SECRET}"), "CA material: plug-in Secret");
        return Ok(Origin::Plugin);
    }
    if let Some(existing) = secrets.get_opt(CA_SECRET).await? {
        write_self_signed(namespace, &existing, state_dir)?;
        tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "CA material: loaded the self-signed root");
        return Ok(Origin::SelfSigned { created: false });
    }
    // Neither: make a root in a scratch folder and offer it. Another replica may do the
    // same at the same time; the API server lets exactly one create win.
    let fresh = fresh_root(state_dir, trust_domain, self_signed_ttl)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            ..Default::default()
        },
        type_: Some("istio.io/ca-root".into()),
        data: Some(BTreeMap::from([
            (
                CA_CERT.to_owned(),
                ByteString(fresh.cert.as_bytes().to_vec()),
            ),
            (CA_KEY.to_owned(), ByteString(fresh.key.as_bytes().to_vec())),
            (CERT_CHAIN.to_owned(), ByteString(Vec::new())),
            (
                ROOT_CERT.to_owned(),
                ByteString(fresh.cert.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            write_self_signed(namespace, &created, state_dir)?;
            tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "CA material: created the self-signed root");
            Ok(Origin::SelfSigned { created: true })
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // Lost the race: the winner's root is the root. Ours is dropped.
            let winner = secrets.get(CA_SECRET).await?;
            write_self_signed(namespace, &winner, state_dir)?;
            tracing::info!(secret = %format!("{namespace}/{CA_SECRET}"), "CA material: another replica created the self-signed root first; loaded it");
            Ok(Origin::SelfSigned { created: false })
        }
        Err(e) => Err(e.into()),
    }
}

struct FreshRoot {
    cert: String,
    key: Zeroizing<String>,
}

fn fresh_root(
    state_dir: &Path,
    trust_domain: &TrustDomain,
    ttl: Duration,
) -> Result<FreshRoot, K8sError> {
    let material = |e: String| K8sError::Material(e);
    private_dir(state_dir)?;
    let scratch = tempfile::Builder::new()
        .prefix(".new-root-")
        .tempdir_in(state_dir)
        .map_err(|e| material(format!("scratch folder in {}: {e}", state_dir.display())))?;
    load_or_create_self_signed(scratch.path(), trust_domain, ttl, SystemTime::now())
        .map_err(|e| material(e.to_string()))?;
    let read = |name: &str| {
        std::fs::read_to_string(scratch.path().join(name))
            .map_err(|e| material(format!("{name}: {e}")))
    };
    let cert = read(SELF_SIGNED_CERT)?;
    let key = Zeroizing::new(read(SELF_SIGNED_KEY)?);
    Ok(FreshRoot { cert, key })
}

fn field(
    namespace: &str,
    secret: &Secret,
    name: &str,
    key: &str,
) -> Result<Option<Zeroizing<String>>, K8sError> {
    let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) else {
        return Ok(None);
    };
    let text = String::from_utf8(bytes.0.clone()).map_err(|_| {
        K8sError::Material(format!("Secret {namespace}/{name}: {key} is not UTF-8 PEM"))
    })?;
    Ok(Some(Zeroizing::new(text)))
}

/// Creates `dir` (and parents) 0700 if missing: it will hold a private key.
fn private_dir(dir: &Path) -> Result<(), K8sError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| K8sError::Material(format!("{}: {e}", dir.display())))
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), K8sError> {
    rampart_certs::write_file_atomic(path, text.as_bytes(), mode)
        .map_err(|e| K8sError::Material(format!("{}: {e}", path.display())))
}

/// Checks the Secret's plug-in material with the folder's own loader in a scratch folder,
/// then writes the files that differ into `dir` (and removes those the Secret lacks).
/// Broken material is refused before `dir` is touched. `Ok(true)` when a file changed.
fn write_plugin(
    namespace: &str,
    secret: &Secret,
    dir: &Path,
    trust_domain: &TrustDomain,
) -> Result<bool, K8sError> {
    let name = CACERTS_SECRET;
    let refused = |e: String| K8sError::Material(format!("Secret {namespace}/{name}: {e}"));
    private_dir(dir)?;
    let mut wanted = Vec::new();
    for file in PLUGIN_FILES {
        wanted.push((*file, field(namespace, secret, name, file)?));
    }
    let scratch = tempfile::Builder::new()
        .prefix(".check-")
        .tempdir_in(dir)
        .map_err(|e| K8sError::Material(format!("scratch folder in {}: {e}", dir.display())))?;
    for (file, text) in &wanted {
        if let Some(text) = text {
            write(&scratch.path().join(file), text, 0o600)?;
        }
    }
    // Messages name the Secret's key, not the scratch folder it was checked in.
    let scratch_prefix = format!("{}/", scratch.path().display());
    let refused = |e: String| refused(e.replace(&scratch_prefix, ""));
    let files = PluginFiles::read(scratch.path()).map_err(|e| refused(e.to_string()))?;
    if !files.is_plugin() {
        return Err(refused(format!(
            "neither {TLS_CRT} (kubernetes.io/tls layout) nor {CA_CERT} (Istio layout)"
        )));
    }
    load_plugin(scratch.path(), &files, trust_domain, SystemTime::now())
        .map_err(|e| refused(e.to_string()))?;
    drop(scratch);
    let mut changed = false;
    // Writes first (in PLUGIN_FILES order), then removals of what the Secret no longer has
    // (reverse order): a file the Secret lacks must not linger from an earlier version.
    for (file, text) in &wanted {
        let Some(text) = text else { continue };
        let path = dir.join(file);
        let current = std::fs::read_to_string(&path).ok().map(Zeroizing::new);
        if current.as_deref().map(String::as_str) != Some(text.as_str()) {
            let mode = if KEY_FILES.contains(file) {
                0o600
            } else {
                0o644
            };
            write(&path, text, mode)?;
            changed = true;
        }
    }
    for (file, text) in wanted.iter().rev() {
        let path = dir.join(file);
        if text.is_none() && std::fs::symlink_metadata(&path).is_ok() {
            std::fs::remove_file(&path)
                .map_err(|e| K8sError::Material(format!("{}: {e}", path.display())))?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Looks at Secret `cacerts` once: valid changed material is written into `cacerts_dir`,
/// where the CA's reload (the folder's watcher and poll) picks it up with the folder's
/// refusal rules; broken material is refused here and the files stay as they were.
/// `Ok(true)` when files changed; a missing Secret changes nothing.
pub async fn refresh_cacerts(
    client: &kube::Client,
    namespace: &str,
    cacerts_dir: &Path,
    trust_domain: &TrustDomain,
) -> Result<bool, K8sError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.get_opt(CACERTS_SECRET).await? {
        Some(secret) => write_plugin(namespace, &secret, cacerts_dir, trust_domain),
        None => Ok(false),
    }
}

/// How often Secret `cacerts` is read with a GET while its watch is failing (an API outage,
/// or RBAC without `list`/`watch` on it); never while the watch works.
pub const CACERTS_RESYNC: Duration = Duration::from_secs(30);

/// What following Secret `cacerts` did with one watch event or resync (logged; tests watch
/// it through [`follow_cacerts_reporting`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacertsEvent {
    /// Valid material; `changed` when files were written into the plug-in folder.
    Written {
        /// Whether a file changed.
        changed: bool,
    },
    /// Broken material refused; the folder (and so the CA) keeps the last good material.
    Refused(String),
    /// The Secret was deleted; the CA keeps serving the last material it loaded.
    Deleted,
    /// The watch failed; it retries with backoff and a GET every resync meanwhile.
    WatchFailed(String),
}

/// Follows Secret `cacerts` until the task is dropped: a kube-runtime watcher on that one
/// Secret (`fieldSelector=metadata.name=cacerts`) in `namespace`. Each version is checked
/// and valid changes written into `cacerts_dir` as [`refresh_cacerts`] does; a refusal is
/// logged once while it stays the same. A deletion is logged as an error and changes
/// nothing: the CA keeps the last material. While the watch fails, the Secret is read with
/// a GET every `resync`.
pub async fn follow_cacerts(
    client: kube::Client,
    namespace: String,
    cacerts_dir: std::path::PathBuf,
    trust_domain: TrustDomain,
    resync: Duration,
) {
    follow_cacerts_reporting(client, namespace, cacerts_dir, trust_domain, resync, |_| {}).await;
}

/// [`follow_cacerts`], telling `report` what each event did.
pub async fn follow_cacerts_reporting(
    client: kube::Client,
    namespace: String,
    cacerts_dir: std::path::PathBuf,
    trust_domain: TrustDomain,
    resync: Duration,
    mut report: impl FnMut(&CacertsEvent) + Send,
) {
    use futures::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher::{self, Event};

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={CACERTS_SECRET}"));
    let mut stream = std::pin::pin!(watcher::watcher(secrets.clone(), config).default_backoff());
    let secret_name = format!("{namespace}/{CACERTS_SECRET}");
    let mut follower = Follower {
        client: client.clone(),
        namespace: &namespace,
        secret_name: &secret_name,
        dir: &cacerts_dir,
        trust_domain: &trust_domain,
        last_error: None,
        present: false,
    };
    // Whether the watch works (no resync GETs then), and whether a re-list saw the Secret.
    let mut watching = false;
    let mut in_relist = false;
    let mut next_resync = tokio::time::Instant::now() + resync;
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { return };
                let ours = |s: &Secret| s.metadata.name.as_deref() == Some(CACERTS_SECRET);
                match event {
                    Ok(Event::Apply(s) | Event::InitApply(s)) if ours(&s) => {
                        watching = true;
                        in_relist = true;
                        report(&follower.apply(&s));
                    }
                    Ok(Event::Delete(s)) if ours(&s) => {
                        watching = true;
                        report(&follower.deleted());
                    }
                    Ok(Event::Init) => in_relist = false,
                    Ok(Event::InitDone) => {
                        watching = true;
                        // A deletion during a watch outage shows as absence from the re-list.
                        if follower.present && !in_relist {
                            report(&follower.deleted());
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if watching {
                            tracing::warn!(secret = %secret_name, error = %e, "watch of the plug-in Secret failed; retrying with backoff, reading it every {resync:?} meanwhile");
                        }
                        watching = false;
                        report(&CacertsEvent::WatchFailed(e.to_string()));
                    }
                }
            }
            () = tokio::time::sleep_until(next_resync) => {
                next_resync = tokio::time::Instant::now() + resync;
                if watching {
                    continue;
                }
                match secrets.get_opt(CACERTS_SECRET).await {
                    Ok(Some(s)) => report(&follower.apply(&s)),
                    Ok(None) if follower.present => report(&follower.deleted()),
                    Ok(None) => {}
                    Err(e) => tracing::debug!(secret = %secret_name, error = %e, "resync of the plug-in Secret failed"),
                }
            }
        }
    }
}

/// The state of [`follow_cacerts_reporting`] between events.
struct Follower<'a> {
    client: kube::Client,
    namespace: &'a str,
    secret_name: &'a str,
    dir: &'a Path,
    trust_domain: &'a TrustDomain,
    /// The refusal last logged (logged once while it stays the same).
    last_error: Option<String>,
    /// Whether the Secret exists, as last seen.
    present: bool,
}

impl Follower<'_> {
    fn apply(&mut self, secret: &Secret) -> CacertsEvent {
        self.present = true;
        match write_plugin(self.namespace, secret, self.dir, self.trust_domain) {
            Ok(changed) => {
                if changed {
                    tracing::info!(secret = %self.secret_name, "plug-in Secret changed; new files written for the CA to reload");
                }
                self.last_error = None;
                CacertsEvent::Written { changed }
            }
            Err(e) => {
                let e = e.to_string();
                if self.last_error.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "plug-in Secret refused; the CA keeps its material");
                    self.last_error = Some(e.clone());
                    tokio::spawn(post_refusal(
                        self.client.clone(),
                        self.namespace,
                        secret,
                        &format!("the CA keeps its last good material: {e}"),
                    ));
                }
                CacertsEvent::Refused(e)
            }
        }
    }

    fn deleted(&mut self) -> CacertsEvent {
        self.present = false;
        self.last_error = None;
        tracing::error!(
            secret = %self.secret_name,
            folder = %self.dir.display(),
            "plug-in Secret DELETED: the CA keeps serving the last material it loaded (the files stay in the plug-in folder); restore the Secret"
        );
        CacertsEvent::Deleted
    }
}

fn write_self_signed(namespace: &str, secret: &Secret, state_dir: &Path) -> Result<(), K8sError> {
    let name = CA_SECRET;
    let need = |key: &str| {
        field(namespace, secret, name, key)?
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| K8sError::Material(format!("Secret {namespace}/{name} has no {key}")))
    };
    let cert = need(CA_CERT)?;
    let key = need(CA_KEY)?;
    rampart_certs::parse_certs_pem(&cert)
        .map_err(|e| K8sError::Material(format!("Secret {namespace}/{name}: {CA_CERT}: {e}")))?;
    rampart_certs::PrivateKey::from_pkcs8_pem(&key)
        .map_err(|e| K8sError::Material(format!("Secret {namespace}/{name}: {CA_KEY}: {e}")))?;
    private_dir(state_dir)?;
    // Key first, then the certificate (as citadel writes them).
    write(&state_dir.join(SELF_SIGNED_KEY), &key, 0o600)?;
    write(&state_dir.join(SELF_SIGNED_CERT), &cert, 0o644)?;
    Ok(())
}

/// What [`sync_self_signed_root`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSync {
    /// The local root is the Secret's.
    Unchanged,
    /// This replica (the Lease holder) wrote its renewed root into `istio-ca-secret`.
    Pushed,
    /// The Secret's renewed root was written into the state folder (reload the CA).
    Pulled,
    /// The roots differ but neither side is a renewal to take (the Secret's root is due and
    /// this replica is not the holder, or neither is renewed yet): nothing done.
    Waiting,
}

/// A self-signed root certificate and its facts.
struct RootCert {
    pem: String,
    der: rampart_certs::CertificateDer<'static>,
    info: rampart_certs::CertInfo,
}

fn root_cert(pem: &str, whose: &str) -> Result<RootCert, K8sError> {
    let der = rampart_certs::parse_certs_pem(pem)
        .map_err(|e| K8sError::Material(format!("{whose}: {e}")))?
        .into_iter()
        .next()
        .ok_or_else(|| K8sError::Material(format!("{whose}: no certificate")))?;
    let info = rampart_certs::CertInfo::parse(&der)
        .map_err(|e| K8sError::Material(format!("{whose}: {e}")))?;
    Ok(RootCert {
        pem: pem.to_owned(),
        der,
        info,
    })
}

/// Keeps one self-signed root across replicas when it is renewed (citadel renews it in the
/// state folder with 20% of its life left: same key and subject, a new certificate; each
/// replica would make its own).
///
/// Compares the state folder's root with Secret `istio-ca-secret` in `namespace`:
/// - the Secret holds another key: refused (an error; nothing written either way);
/// - the Secret's certificate is not due for renewal and differs from ours: it is the
///   renewal to use: written into `state_dir` (our old certificate kept as the previous
///   root, served until it expires), `Pulled`;
/// - the Secret's certificate is due, ours is a renewal, and `holder` (this replica holds
///   the publisher's Lease): the Secret is replaced with ours, carrying the read
///   `resourceVersion`; a 409 means another replica wrote first: theirs is read and pulled.
pub async fn sync_self_signed_root(
    client: &kube::Client,
    namespace: &str,
    state_dir: &Path,
    holder: bool,
    now: SystemTime,
) -> Result<RootSync, K8sError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut secret = secrets.get(CA_SECRET).await?;
    let mut retried = false;
    loop {
        let local_path = state_dir.join(SELF_SIGNED_CERT);
        let local_pem = std::fs::read_to_string(&local_path)
            .map_err(|e| K8sError::Material(format!("{}: {e}", local_path.display())))?;
        let local = root_cert(&local_pem, &local_path.display().to_string())?;
        let name = format!("Secret {namespace}/{CA_SECRET}");
        let need = |key: &str| {
            field(namespace, &secret, CA_SECRET, key)?
                .filter(|t| !t.trim().is_empty())
                .ok_or_else(|| K8sError::Material(format!("{name} has no {key}")))
        };
        let theirs = root_cert(&need(CA_CERT)?, &name)?;
        if theirs.der == local.der {
            return Ok(RootSync::Unchanged);
        }
        let key_path = state_dir.join(SELF_SIGNED_KEY);
        let local_key = Zeroizing::new(
            std::fs::read_to_string(&key_path)
                .map_err(|e| K8sError::Material(format!("{}: {e}", key_path.display())))?,
        );
        let their_key = need(CA_KEY)?;
        let parse_key = |pem: &str, whose: &str| {
            rampart_certs::PrivateKey::from_pkcs8_pem(pem)
                .map_err(|e| K8sError::Material(format!("{whose}: {CA_KEY}: {e}")))
        };
        // Their key must be our certificate's key (the same root key), and their
        // certificate a CA certificate for our key.
        let their_key = parse_key(&their_key, &name)?;
        rampart_certs::CertificateAuthority::new(local.der.clone(), their_key, Vec::new())
            .map_err(|e| {
                K8sError::Material(format!(
                    "{name} holds another key than this replica's root ({e}); not following it (restart the replica to load it)"
                ))
            })?;
        let key = parse_key(&local_key, &key_path.display().to_string())?;
        rampart_certs::CertificateAuthority::new(theirs.der.clone(), key, Vec::new())
            .map_err(|e| K8sError::Material(format!("{name}: {CA_CERT}: {e}")))?;
        let due = |c: &RootCert| {
            rampart_citadel::self_signed_rotation_due(c.info.not_before, c.info.not_after, now)
        };
        if !due(&theirs) {
            // Pull: theirs is the renewal. Our certificate stays served as the previous
            // root unless an earlier one is already kept there (our own local renewal, made
            // before theirs arrived, is not kept: same key and subject, so whatever it
            // signed verifies under theirs too).
            let previous = state_dir.join(rampart_citadel::SELF_SIGNED_PREVIOUS_CERT);
            if !previous.exists() {
                write(&previous, &local.pem, 0o644)?;
            }
            write(&local_path, &theirs.pem, 0o644)?;
            tracing::info!(
                secret = %format!("{namespace}/{CA_SECRET}"),
                root = %theirs.info.sha256_fingerprint,
                "loaded the renewed self-signed root another replica wrote to the Secret"
            );
            return Ok(RootSync::Pulled);
        }
        if due(&local) || !holder {
            return Ok(RootSync::Waiting);
        }
        // Push ours, with the resourceVersion we read.
        let data = secret.data.get_or_insert_with(BTreeMap::new);
        data.insert(
            CA_CERT.to_owned(),
            ByteString(local.pem.as_bytes().to_vec()),
        );
        data.insert(
            ROOT_CERT.to_owned(),
            ByteString(local.pem.as_bytes().to_vec()),
        );
        match secrets
            .replace(CA_SECRET, &PostParams::default(), &secret)
            .await
        {
            Ok(_) => {
                tracing::info!(
                    secret = %format!("{namespace}/{CA_SECRET}"),
                    root = %local.info.sha256_fingerprint,
                    "wrote the renewed self-signed root to the Secret for the other replicas"
                );
                return Ok(RootSync::Pushed);
            }
            Err(kube::Error::Api(status)) if status.code == 409 && !retried => {
                // Someone else wrote first: read theirs and judge again (a pull, normally).
                retried = true;
                secret = secrets.get(CA_SECRET).await?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Follows Secret `istio-ca-secret` in self-signed mode until the task is dropped: a watch
/// of that one Secret, and a look at the state folder every `interval`, each running
/// [`sync_self_signed_root`] (`holder` says whether this replica holds the publisher's
/// Lease now). `on_pulled` runs after a renewed root was written into the state folder (the
/// CA reloads it). Errors are logged once while they stay the same.
pub async fn follow_ca_secret(
    client: kube::Client,
    namespace: String,
    state_dir: std::path::PathBuf,
    interval: Duration,
    holder: impl Fn() -> bool + Send,
    on_pulled: impl Fn() + Send,
) {
    use futures::StreamExt as _;
    use kube::runtime::WatchStreamExt as _;
    use kube::runtime::watcher;

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={CA_SECRET}"));
    let mut stream = std::pin::pin!(watcher::watcher(secrets, config).default_backoff());
    let mut last_local: Option<String> = None;
    let mut last_error: Option<String> = None;
    let mut next_look = tokio::time::Instant::now() + interval;
    loop {
        let run = tokio::select! {
            event = stream.next() => match event {
                None => return,
                Some(Ok(watcher::Event::Apply(_) | watcher::Event::InitDone)) => true,
                Some(_) => false,
            },
            () = tokio::time::sleep_until(next_look) => {
                next_look = tokio::time::Instant::now() + interval;
                // Only when the local root changed (a renewal) since the last sync, or the
                // last sync did not settle.
                let local = std::fs::read_to_string(state_dir.join(SELF_SIGNED_CERT)).ok();
                local != last_local || last_error.is_some()
            }
        };
        if !run {
            continue;
        }
        match sync_self_signed_root(&client, &namespace, &state_dir, holder(), SystemTime::now())
            .await
        {
            Ok(outcome) => {
                last_error = None;
                if outcome == RootSync::Pulled {
                    on_pulled();
                }
                if outcome != RootSync::Waiting {
                    last_local = std::fs::read_to_string(state_dir.join(SELF_SIGNED_CERT)).ok();
                }
            }
            Err(e) => {
                let e = e.to_string();
                if last_error.as_deref() != Some(e.as_str()) {
                    tracing::error!(error = %e, "following the self-signed root in Secret {namespace}/{CA_SECRET} failed; this replica keeps its root");
                }
                last_error = Some(e);
            }
        }
    }
}

/// A Warning Event on Secret `secret` saying why its CA material was refused (reason
/// [`crate::source::EVENT_REASON_CA_MATERIAL`]; best effort), so that `kubectl describe
/// secret cacerts` and `kubectl get events` show it beside the CA's log.
fn post_refusal(
    client: kube::Client,
    namespace: &str,
    secret: &Secret,
    why: &str,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let r = rampart_mesh::kube::Refused {
        api_version: "v1".into(),
        kind: "Secret".into(),
        namespace: namespace.to_owned(),
        name: secret.metadata.name.clone().unwrap_or_default(),
        uid: secret.metadata.uid.clone().unwrap_or_default(),
        resource_version: secret.metadata.resource_version.clone().unwrap_or_default(),
        field: String::new(),
        reason: format!("CA material not loaded; {why}"),
    };
    crate::source::post_event(client, r)
}
