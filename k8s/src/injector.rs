//! The sidecar injection webhook's trust: the API server calls the webhook over TLS and
//! checks the CA's serving certificate against the `caBundle` of each webhook in the
//! `MutatingWebhookConfiguration`. That bundle must be the CA's roots, and follow them when
//! they rotate: the replica holding the publisher's Lease keeps it so (as istiod patches its
//! injector's configuration), with the same roots it writes into `istio-ca-root-cert`.
//!
//! - It sets `caBundle` with a JSON Patch (a `test` of the `resourceVersion` it read, then one
//!   `add` per webhook whose bundle differs): nothing else of the object is sent back, so
//!   fields this client does not know survive, and a concurrent change makes the patch fail
//!   (retried at the next look) instead of landing on the wrong webhook.
//! - When the CA's roots change (a new `cacerts` root), the bundle is the union of the old
//!   and the new roots for [`ROTATION_OVERLAP`]: replicas switch their serving certificates
//!   to the new chain at their own pace, and the API server must trust both meanwhile. Then
//!   the new roots alone. (A renewed self-signed root keeps its key and subject, so either
//!   certificate verifies a chain.)
//! - It looks at the roots every [`CA_BUNDLE_CHECK`] and writes at once when they changed;
//!   it reads the object every [`CA_BUNDLE_REPAIR`] anyway, to set back a bundle someone
//!   else changed. A missing object is logged once (the webhook is then simply not called).
//!
//! Between a replica's switch to a new chain and the holder's next look (up to
//! [`CA_BUNDLE_CHECK`]) the API server cannot verify that replica: Pods in labelled
//! namespaces may be refused for those seconds (failurePolicy Fail), as with istiod.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};

use crate::K8sError;

/// The configuration's name in deploy/kubernetes/70-injector.yaml.
pub const WEBHOOK_CONFIG: &str = "rampart-sidecar-injector";
/// How often the Lease holder compares the CA's roots with what it last wrote.
pub const CA_BUNDLE_CHECK: Duration = Duration::from_secs(2);
/// How often it reads the configuration even when the roots did not change.
pub const CA_BUNDLE_REPAIR: Duration = Duration::from_secs(30);
/// How long the previous roots stay in the bundle after the CA's roots changed.
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(10 * 60);

/// What one look did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSync {
    /// Every webhook already trusts the roots.
    Unchanged,
    /// This many webhooks got the roots as their bundle.
    Updated(usize),
    /// No such MutatingWebhookConfiguration.
    Missing,
}

/// Makes every webhook of MutatingWebhookConfiguration `name` trust exactly `bundle_pem`
/// once (a JSON Patch of their `caBundle` only, guarded by the read `resourceVersion`).
pub async fn sync_ca_bundle(
    client: &kube::Client,
    name: &str,
    bundle_pem: &str,
) -> Result<BundleSync, K8sError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(config) = api.get_opt(name).await? else {
        return Ok(BundleSync::Missing);
    };
    let want = k8s_openapi::ByteString(bundle_pem.as_bytes().to_vec());
    let want_json = serde_json::to_value(&want).map_err(|e| K8sError::Material(e.to_string()))?;
    let mut ops = vec![serde_json::json!({
        "op": "test",
        "path": "/metadata/resourceVersion",
        "value": config.metadata.resource_version,
    })];
    for (i, webhook) in config.webhooks.iter().flatten().enumerate() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&want) {
            ops.push(serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": want_json,
            }));
        }
    }
    let updated = ops.len() - 1;
    if updated == 0 {
        return Ok(BundleSync::Unchanged);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))
        .map_err(|e| K8sError::Material(e.to_string()))?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(BundleSync::Updated(updated))
}

/// The certificates of `a` then those of `b` not already in `a`, as PEM (text that does not
/// parse is kept as it is: the roots come from the CA's own bundle).
fn union(a: &str, b: &str) -> String {
    match (
        rampart_certs::parse_certs_pem(a),
        rampart_certs::parse_certs_pem(b),
    ) {
        (Ok(mut first), Ok(second)) => {
            for c in second {
                if !first.contains(&c) {
                    first.push(c);
                }
            }
            rampart_certs::certs_to_pem(&first)
        }
        _ => format!("{a}{b}"),
    }
}

/// Keeps the bundle of MutatingWebhookConfiguration `name` equal to the CA's roots
/// (`roots()`, plus the previous roots for [`ROTATION_OVERLAP`] after they change) while
/// `holder()` (this replica holds the publisher's Lease), until the task is dropped.
/// `report` sees each write attempt's result (tests); changes and errors are logged, an
/// error or a missing object once while it stays the same.
pub async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    timing: KeeperTiming,
    roots: impl Fn() -> String + Send,
    holder: impl Fn() -> bool + Send,
    mut report: impl FnMut(&Result<BundleSync, String>) + Send,
) {
    let mut last_problem: Option<String> = None;
    // The roots as last seen, and the ones they replaced with when that happened.
    let mut current: Option<String> = None;
    let mut retired: Option<(String, tokio::time::Instant)> = None;
    // What this replica last made the object hold, and when it last read it.
    let mut written: Option<String> = None;
    let mut last_read: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        let now_roots = roots();
        if let Some(old) = current.as_ref().filter(|c| **c != now_roots) {
            retired = Some((old.clone(), now));
        }
        current = Some(now_roots.clone());
        if retired
            .as_ref()
            .is_some_and(|(_, since)| now.duration_since(*since) >= timing.overlap)
        {
            retired = None;
        }
        let want = match &retired {
            Some((old, _)) => union(&now_roots, old),
            None => now_roots,
        };
        let due = written.as_deref() != Some(want.as_str())
            || last_read.is_none_or(|t| now.duration_since(t) >= timing.repair);
        if holder() && due {
            last_read = Some(now);
            let result = sync_ca_bundle(&client, &name, &want)
                .await
                .map_err(|e| e.to_string());
            written = match &result {
                Ok(BundleSync::Updated(_) | BundleSync::Unchanged) => Some(want),
                _ => None,
            };
            let problem = match &result {
                Ok(BundleSync::Updated(n)) => {
                    tracing::info!(config = %name, webhooks = n, overlap = retired.is_some(), "injection webhook: caBundle set to the CA's roots");
                    None
                }
                Ok(BundleSync::Unchanged) => None,
                Ok(BundleSync::Missing) => Some(format!(
                    "MutatingWebhookConfiguration {name} not found: the API server does not call \
                     the injection webhook (apply deploy/kubernetes/70-injector.yaml)"
                )),
                Err(e) => Some(format!(
                    "MutatingWebhookConfiguration {name}: cannot set its caBundle: {e}"
                )),
            };
            if problem != last_problem {
                if let Some(p) = &problem {
                    tracing::warn!("{p}");
                }
                last_problem = problem;
            }
            report(&result);
        } else if !holder() {
            // Another replica may change it meanwhile: read it again once this one holds.
            written = None;
        }
        tokio::time::sleep(timing.check).await;
    }
}

/// How often [`keep_ca_bundle`] looks, reads, and how long it keeps retired roots.
#[derive(Debug, Clone, Copy)]
pub struct KeeperTiming {
    /// [`CA_BUNDLE_CHECK`].
    pub check: Duration,
    /// [`CA_BUNDLE_REPAIR`].
    pub repair: Duration,
    /// [`ROTATION_OVERLAP`].
    pub overlap: Duration,
}

impl Default for KeeperTiming {
    fn default() -> Self {
        KeeperTiming {
            check: CA_BUNDLE_CHECK,
            repair: CA_BUNDLE_REPAIR,
            overlap: ROTATION_OVERLAP,
        }
    }
}
