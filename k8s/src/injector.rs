//! The sidecar injection webhook's trust: the API server calls the webhook over TLS and
//! checks the CA's serving certificate against the `caBundle` of each webhook in the
//! `MutatingWebhookConfiguration`. That bundle must be the CA's roots, and follow them when
//! they rotate: the replica holding the publisher's Lease keeps it so (as istiod patches its
//! injector's configuration), with the same roots it writes into `istio-ca-root-cert`.
//!
//! It reads the object every [`CA_BUNDLE_CHECK`] and replaces it (with the read
//! `resourceVersion`; a conflict is retried at the next look) only when a webhook's bundle
//! differs. A missing object is logged once (the webhook is then simply not called); nothing
//! else of the object is touched.

use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, PostParams};

use crate::K8sError;

/// The configuration's name in deploy/kubernetes/70-injector.yaml.
pub const WEBHOOK_CONFIG: &str = "rampart-sidecar-injector";
/// How often the Lease holder looks at the configuration's bundle.
pub const CA_BUNDLE_CHECK: Duration = Duration::from_secs(10);

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

/// Makes every webhook of MutatingWebhookConfiguration `name` trust `bundle_pem` (the CA's
/// roots, PEM) once.
pub async fn sync_ca_bundle(
    client: &kube::Client,
    name: &str,
    bundle_pem: &str,
) -> Result<BundleSync, K8sError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut config) = api.get_opt(name).await? else {
        return Ok(BundleSync::Missing);
    };
    let want = ByteString(bundle_pem.as_bytes().to_vec());
    let mut updated = 0;
    for webhook in config.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&want) {
            webhook.client_config.ca_bundle = Some(want.clone());
            updated += 1;
        }
    }
    if updated == 0 {
        return Ok(BundleSync::Unchanged);
    }
    api.replace(name, &PostParams::default(), &config).await?;
    Ok(BundleSync::Updated(updated))
}

/// Keeps the bundle of MutatingWebhookConfiguration `name` equal to `bundle()` while
/// `holder()` (this replica holds the publisher's Lease), looking every `interval`, until the
/// task is dropped. `report` sees each look's result (tests); changes and errors are logged,
/// an error or a missing object once while it stays the same.
pub async fn keep_ca_bundle(
    client: kube::Client,
    name: String,
    interval: Duration,
    bundle: impl Fn() -> String + Send,
    holder: impl Fn() -> bool + Send,
    mut report: impl FnMut(&Result<BundleSync, String>) + Send,
) {
    let mut last_problem: Option<String> = None;
    loop {
        if holder() {
            let result = sync_ca_bundle(&client, &name, &bundle())
                .await
                .map_err(|e| e.to_string());
            let problem = match &result {
                Ok(BundleSync::Updated(n)) => {
                    tracing::info!(config = %name, webhooks = n, "injection webhook: caBundle set to the CA's roots");
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
        }
        tokio::time::sleep(interval).await;
    }
}
