//! The sidecar injection webhook: what `rampart inject` does to a manifest, done by the API
//! server to every Pod created in a namespace that asks for it, as istiod's injector does.
//!
//! The API server POSTs an `admission.k8s.io/v1` `AdmissionReview` to `https://.../inject`
//! (a `MutatingWebhookConfiguration`, deploy/kubernetes/70-injector.yaml); the answer carries a
//! JSON Patch from the Pod as sent to the Pod as [`crate::inject::inject_pod_object`] leaves
//! it. What each Pod gets:
//!
//! - a Pod `CREATE` that can be injected: allowed, with the patch;
//! - a Pod that opted out (`sidecar.istio.io/inject: "false"`), is already injected, or uses
//!   the host's network: allowed unchanged;
//! - a Pod that asks for the mesh but cannot be injected (a container or volume already has a
//!   name the sidecar needs, a malformed spec): **refused**, with the reason as the message
//!   `kubectl` shows. Letting it start without its sidecar would put a workload into a mesh
//!   namespace with no identity and no policy in front of it (istiod refuses it too);
//! - anything else (another kind, another operation, a subresource): allowed unchanged.
//!
//! The webhook has no side effects and reads nothing but the request: a caller that is not
//! the API server learns what the injector would add to a Pod it sends, which
//! `rampart inject` prints to anyone anyway (docs/THREAT_MODEL.md).

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::{Map, Value, json};

use crate::inject::{Options, PodOutcome, inject_pod_object};

/// The path the API server calls (istiod's).
pub const INJECT_PATH: &str = "/inject";
/// Largest AdmissionReview read. Pods are far smaller (etcd refuses objects over 1.5 MiB;
/// a Pod of a few KiB is usual); a review over this is answered 413, which refuses that Pod.
pub const MAX_REVIEW_BYTES: usize = 1 << 20;

/// What the webhook decided for one review (the `outcome` label of
/// `rampart_injector_reviews_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: Outcome,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, prometheus_client::encoding::EncodeLabelValue,
)]
#[allow(non_camel_case_types)]
enum Outcome {
    injected,
    skipped,
    refused,
    ignored,
    bad_request,
}

/// The webhook's counters, for the CA's `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct InjectorStats {
    reviews: Family<OutcomeLabel, Counter>,
}

impl InjectorStats {
    /// Registers `rampart_injector_reviews_total{outcome}` in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "rampart_injector_reviews",
            "Admission reviews answered by the sidecar injection webhook, by outcome \
             (injected, skipped: opted out or already injected, refused: the Pod could not \
             be injected, ignored: not a Pod CREATE, bad_request: not an AdmissionReview)",
            self.reviews.clone(),
        );
    }

    fn count(&self, outcome: Outcome) {
        self.reviews.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// Reviews answered with `outcome` (`injected`, `skipped`, `refused`, `ignored`,
    /// `bad_request`), for tests.
    pub fn reviews(&self, outcome: &str) -> u64 {
        let o = match outcome {
            "injected" => Outcome::injected,
            "skipped" => Outcome::skipped,
            "refused" => Outcome::refused,
            "ignored" => Outcome::ignored,
            _ => Outcome::bad_request,
        };
        self.reviews
            .get_or_create(&OutcomeLabel { outcome: o })
            .get()
    }
}

/// Answers one `AdmissionReview` (the request body). `Err` is a body that is not a review
/// (the caller answers 400 with it).
pub fn review(body: &[u8], opts: &Options, stats: &InjectorStats) -> Result<Value, String> {
    let (answer, outcome) = match decide(body, opts) {
        Ok(d) => d,
        Err(e) => {
            stats.count(Outcome::bad_request);
            return Err(e);
        }
    };
    stats.count(outcome);
    Ok(answer)
}

fn decide(body: &[u8], opts: &Options) -> Result<(Value, Outcome), String> {
    let mut review: Value =
        serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let api_version = text(&review["apiVersion"]);
    if !matches!(
        api_version.as_str(),
        "admission.k8s.io/v1" | "admission.k8s.io/v1beta1"
    ) || review["kind"] != "AdmissionReview"
    {
        return Err(format!(
            "not an AdmissionReview of admission.k8s.io/v1 (apiVersion {api_version:?})"
        ));
    }
    let request = review
        .get_mut("request")
        .and_then(Value::as_object_mut)
        .ok_or("AdmissionReview without a request")?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or("AdmissionReview request without a uid")?
        .to_owned();
    let kind = &request.get("kind").cloned().unwrap_or_default();
    let is_pod = text(&kind["group"]).is_empty()
        && text(&kind["version"]) == "v1"
        && text(&kind["kind"]) == "Pod";
    let operation = request.get("operation").map(text).unwrap_or_default();
    let sub_resource = request.get("subResource").map(text).unwrap_or_default();
    let namespace = request.get("namespace").map(text).unwrap_or_default();
    // The Pod, taken out of the review rather than copied: one copy is made below, for the
    // diff, whatever the review's size.
    let object = request.remove("object");
    drop(review);
    let answer = |mut response: Value| {
        response["uid"] = uid.as_str().into();
        json!({"apiVersion": api_version, "kind": "AdmissionReview", "response": response})
    };
    if !is_pod || operation != "CREATE" || !sub_resource.is_empty() {
        return Ok((answer(json!({"allowed": true})), Outcome::ignored));
    }
    let Some(Value::Object(original)) = object else {
        return Ok((
            answer(refusal("the review carries no Pod object")),
            Outcome::refused,
        ));
    };
    let name = pod_name(&original);
    let mut pod = original.clone();
    match inject_pod_object(&mut pod, opts) {
        Ok(PodOutcome::Injected(notes)) => {
            let patch = json_patch::diff(&Value::Object(original), &Value::Object(pod));
            let patch = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            tracing::info!(?namespace, pod = ?name, "sidecar injected");
            for n in &notes {
                tracing::debug!(?namespace, note = ?n, "injection note");
            }
            let mut response = json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch),
            });
            // What `rampart inject` prints beside the manifest (a probe left as it was, the
            // port the app must listen on) reaches whoever created the Pod: kubectl prints
            // admission warnings on stderr.
            let warnings = warnings(&notes);
            if !warnings.is_empty() {
                response["warnings"] = warnings.into();
            }
            Ok((answer(response), Outcome::injected))
        }
        Ok(PodOutcome::Skipped(why)) => {
            tracing::info!(?namespace, pod = ?name, reason = ?why, "sidecar not injected");
            Ok((answer(json!({"allowed": true})), Outcome::skipped))
        }
        Err(why) => {
            tracing::warn!(?namespace, pod = ?name, reason = ?why, "Pod refused: it cannot be injected");
            Ok((
                answer(refusal(&format!(
                    "rampart sidecar injection failed: {why} (opt out with the annotation \
                     sidecar.istio.io/inject: \"false\")"
                ))),
                Outcome::refused,
            ))
        }
    }
}

/// At most this many warnings per Pod, each at most [`MAX_WARNING_CHARS`] characters: the
/// API server truncates and drops warnings past a few KiB per response, and a warning is an
/// HTTP header on its way to the client.
const MAX_WARNINGS: usize = 12;
const MAX_WARNING_CHARS: usize = 240;

/// The injection notes that ask for action (a probe left as it was, a port below 1024, no
/// port declared, ...) as admission warnings: not the note every port of every Pod gets
/// ([`crate::inject::LISTEN_NOTE`], and [`crate::inject::MERGE_NOTE`] every Pod with its
/// own scrape settings gets: kube-controller-manager logs each warning of each Pod its
/// controllers create); printable ASCII only (a warning travels as an HTTP `Warning`
/// header and ends up on terminals: no control, bidi or zero-width characters), without the
/// Pod's location prefix the CLI needs (the client knows which Pod it created), the same
/// note once.
fn warnings(notes: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for note in notes.iter().filter(|n| {
        ![crate::inject::LISTEN_NOTE, crate::inject::MERGE_NOTE]
            .iter()
            .any(|m| n.contains(m))
    }) {
        // "Pod NAME: ..." (a Pod's name has no colon).
        let text = note
            .strip_prefix("Pod ")
            .and_then(|r| r.split_once(": "))
            .map_or(note.as_str(), |(_, rest)| rest);
        let mut w: String = text
            .chars()
            .map(|c| match c {
                ' ' | '!'..='~' => c,
                c if c.is_whitespace() => ' ',
                _ => '?',
            })
            .take(MAX_WARNING_CHARS)
            .collect();
        if text.chars().count() > MAX_WARNING_CHARS {
            w.truncate(MAX_WARNING_CHARS - 3);
            w.push_str("...");
        }
        let w = format!("rampart: {w}");
        if !out.contains(&w) {
            out.push(w);
        }
    }
    if out.len() > MAX_WARNINGS {
        let more = out.len() - (MAX_WARNINGS - 1);
        out.truncate(MAX_WARNINGS - 1);
        out.push(format!(
            "rampart: {more} more injection notes (`rampart inject` prints them all)"
        ));
    }
    out
}

fn refusal(message: &str) -> Value {
    json!({"allowed": false, "status": {"code": 400, "reason": "BadRequest", "message": message}})
}

fn pod_name(pod: &Map<String, Value>) -> String {
    let meta = pod.get("metadata");
    let get = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    match (get("name"), get("generateName")) {
        (Some(n), _) if !n.is_empty() => n.to_owned(),
        (_, Some(g)) => format!("{g}*"),
        _ => "(unnamed)".to_owned(),
    }
}

type Body = Full<Bytes>;

fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Answers one HTTP request to the webhook.
pub async fn handle<B>(req: Request<B>, opts: &Options, stats: &InjectorStats) -> Response<Body>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if req.uri().path() != INJECT_PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("only {INJECT_PATH} is served here"),
        );
    }
    if req.method() != Method::POST {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "POST an AdmissionReview here",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return r;
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !json {
        stats.count(Outcome::bad_request);
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected content-type: application/json",
        );
    }
    let body = match Limited::new(req.into_body(), MAX_REVIEW_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            stats.count(Outcome::bad_request);
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("AdmissionReview larger than {MAX_REVIEW_BYTES} bytes"),
                );
            }
            return text(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
        }
    };
    match review(&body, opts, stats) {
        Ok(answer) => {
            let mut r = Response::new(Full::new(Bytes::from(answer.to_string())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::BAD_REQUEST, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            image: "example/rampart:1".into(),
            ca_address: "rampart-ca.istio-system.svc:15012".into(),
            trust_domain: "cluster.local".into(),
            version: "0.0.0-test".into(),
        }
    }

    fn pod() -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "web-", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]}]}
        })
    }

    fn review_of(object: Value, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop",
                "operation": operation,
                "object": object,
            }
        }))
        .unwrap()
    }

    fn patch_of(answer: &Value) -> Option<json_patch::Patch> {
        let b64 = answer["response"]["patch"].as_str()?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    #[test]
    fn a_pod_create_is_answered_with_the_patch_that_injects_it() {
        let stats = InjectorStats::default();
        let answer = review(&review_of(pod(), "CREATE"), &opts(), &stats).unwrap();
        assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(answer["kind"], "AdmissionReview");
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // The patch, applied as the API server applies it, gives exactly what
        // `rampart inject` makes of the same Pod.
        let mut patched = pod();
        json_patch::patch(&mut patched, &patch_of(&answer).unwrap()).unwrap();
        let mut expected = pod().as_object().unwrap().clone();
        assert!(matches!(
            inject_pod_object(&mut expected, &opts()).unwrap(),
            PodOutcome::Injected(_)
        ));
        assert_eq!(patched, Value::Object(expected));
        let init = patched["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(init[0]["name"], "rampart-agent");
        assert_eq!(init[1]["name"], "rampart-proxy");
        assert!(patched["metadata"]["annotations"][crate::inject::STATUS_ANNOTATION].is_string());
        assert_eq!(stats.reviews("injected"), 1);
    }

    /// The notes `rampart inject` prints come back as admission warnings (kubectl shows
    /// them): a probe that is not rewritten, the port the app must listen on; a Pod without
    /// such notes gets none, and a flood of notes is capped.
    #[test]
    fn injection_notes_are_admission_warnings() {
        let stats = InjectorStats::default();
        let mut p = pod();
        p["spec"]["containers"][0]["livenessProbe"] =
            json!({"grpc": {"port": 8080}, "periodSeconds": 5});
        let answer = review(&review_of(p, "CREATE"), &opts(), &stats).unwrap();
        let got: Vec<&str> = answer["response"]["warnings"]
            .as_array()
            .expect("warnings")
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert!(
            got.iter().any(|w| w
                .starts_with("rampart: container web livenessProbe: not rewritten (a gRPC probe)")),
            "{got:?}"
        );
        // The note every port of every Pod gets is not repeated as a warning.
        assert!(
            !got.iter().any(|w| w.contains("the app must listen on")),
            "{got:?}"
        );
        for w in &got {
            assert!(!w.contains("Pod web-"), "location prefix kept: {w}");
            assert!(w.chars().count() <= MAX_WARNING_CHARS + 10, "{w}");
            assert!(
                w.bytes().all(|b| b == b' ' || b.is_ascii_graphic()),
                "{w:?}"
            );
        }
        // A Pod whose notes need no action (its port's) gets no warnings.
        let answer = review(&review_of(pod(), "CREATE"), &opts(), &stats).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("warnings").is_none(), "{answer}");
        // Scrape settings that are merged need no action (no warning), also without a port
        // when the Pod declares one; settings that name no port among several declared
        // ports cannot be merged and lose the app's metrics under STRICT (a warning).
        let mut merged = pod();
        merged["metadata"]["annotations"] =
            json!({"prometheus.io/scrape": "true", "prometheus.io/port": "9090"});
        let answer = review(&review_of(merged, "CREATE"), &opts(), &stats).unwrap();
        assert!(answer["response"].get("warnings").is_none(), "{answer}");
        let mut portless = pod();
        portless["metadata"]["annotations"] = json!({"prometheus.io/scrape": "true"});
        let answer = review(&review_of(portless.clone(), "CREATE"), &opts(), &stats).unwrap();
        assert!(answer["response"].get("warnings").is_none(), "{answer}");
        portless["spec"]["containers"][0]["ports"] =
            json!([{"containerPort": 8080}, {"containerPort": 9090}]);
        let answer = review(&review_of(portless, "CREATE"), &opts(), &stats).unwrap();
        let warned = answer["response"]["warnings"].to_string();
        assert!(
            warned.contains(
                "annotations are kept (no prometheus.io/port, and the Pod declares 2 ports"
            ),
            "{answer}"
        );
        // Skipped Pods and other kinds carry no warnings.
        let mut opted_out = pod();
        opted_out["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
        let answer = review(&review_of(opted_out, "CREATE"), &opts(), &stats).unwrap();
        assert!(answer["response"].get("warnings").is_none(), "{answer}");
        // Many notes: capped, the last one says how many were left out.
        let notes: Vec<String> = (0..40)
            .map(|i| format!("Pod web-: container c{i} port {i}: note\nwith a newline"))
            .collect();
        let w = warnings(&notes);
        assert_eq!(w.len(), MAX_WARNINGS);
        assert_eq!(w[0], "rampart: container c0 port 0: note with a newline");
        assert!(
            w[MAX_WARNINGS - 1].contains("29 more injection notes"),
            "{w:?}"
        );
        // Printable ASCII only: control, bidi and zero-width characters and other non-ASCII
        // text are replaced; long notes are cut.
        let odd = vec!["Pod x: a\u{202e}b\u{200b}c\td\u{1b}[31m".to_owned()];
        assert_eq!(warnings(&odd), ["rampart: a?b?c d?[31m"]);
        let long = vec![format!("Pod x: {}", "é".repeat(500))];
        let w = warnings(&long);
        assert_eq!(w[0].len(), "rampart: ".len() + MAX_WARNING_CHARS);
        assert!(w[0].ends_with("?..."), "{w:?}");
    }

    /// Pods whose own fields make the diff work: init containers and volumes already there
    /// (the sidecars go first, shifting the app's), keys with `/` and `~` (JSON Pointer
    /// escapes), null labels and annotations. The patch, applied, is exactly the injected Pod.
    #[test]
    fn the_patch_is_exact_for_pods_with_their_own_lists_and_odd_keys() {
        let stats = InjectorStats::default();
        let mut busy = pod();
        busy["metadata"]["labels"] = Value::Null;
        busy["metadata"]["annotations"] = json!({
            "example.com/a~b": "1",
            "x/y/z": "2",
            "prometheus.io/scrape": "true"
        });
        busy["spec"]["initContainers"] = json!([
            {"name": "migrate", "image": "migrate:1"},
            {"name": "warm", "image": "warm:1", "restartPolicy": "Always"}
        ]);
        busy["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        busy["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "side:1", "env": [{"name": "A", "value": "b"}]}));
        for p in [busy, {
            let mut p = pod();
            p["metadata"]["annotations"] = Value::Null;
            p
        }] {
            let answer = review(&review_of(p.clone(), "CREATE"), &opts(), &stats).unwrap();
            let mut patched = p.clone();
            json_patch::patch(&mut patched, &patch_of(&answer).unwrap()).unwrap();
            let mut expected = p.as_object().unwrap().clone();
            inject_pod_object(&mut expected, &opts()).unwrap();
            assert_eq!(patched, Value::Object(expected));
        }
    }

    /// A Pod istiod's injector already gave Envoy (its namespace labelled for both, or its
    /// own `sidecar.istio.io/inject: "true"` label) is let through with Envoy only.
    #[test]
    fn a_pod_istio_already_injected_is_left_to_istio() {
        let stats = InjectorStats::default();
        let mut by_istio = pod();
        by_istio["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "istio-proxy", "image": "proxyv2"}));
        let mut annotated = pod();
        annotated["metadata"]["annotations"] = json!({"sidecar.istio.io/status": "{}"});
        for p in [by_istio, annotated] {
            let answer = review(&review_of(p, "CREATE"), &opts(), &stats).unwrap();
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none(), "{answer}");
        }
        assert_eq!(stats.reviews("skipped"), 2);
    }

    #[test]
    fn opted_out_already_injected_and_host_network_pods_are_allowed_unchanged() {
        let stats = InjectorStats::default();
        let mut opted_out = pod();
        opted_out["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
        let mut host = pod();
        host["spec"]["hostNetwork"] = true.into();
        let mut injected = pod().as_object().unwrap().clone();
        inject_pod_object(&mut injected, &opts()).unwrap();
        for p in [opted_out, host, Value::Object(injected)] {
            let answer = review(&review_of(p, "CREATE"), &opts(), &stats).unwrap();
            assert_eq!(answer["response"]["allowed"], true);
            assert!(answer["response"].get("patch").is_none(), "{answer}");
        }
        assert_eq!(stats.reviews("skipped"), 3);
        assert_eq!(stats.reviews("injected"), 0);
    }

    #[test]
    fn a_pod_that_cannot_be_injected_is_refused_with_the_reason() {
        let stats = InjectorStats::default();
        let mut clash = pod();
        clash["spec"]["containers"][0]["name"] = "rampart-proxy".into();
        let answer = review(&review_of(clash, "CREATE"), &opts(), &stats).unwrap();
        let response = &answer["response"];
        assert_eq!(response["allowed"], false);
        assert!(response.get("patch").is_none());
        let msg = response["status"]["message"].as_str().unwrap();
        assert!(
            msg.contains("already named rampart-proxy") && msg.contains("Pod web-"),
            "{msg}"
        );
        // Its twin: the same Pod with another container name is injected.
        let answer = review(&review_of(pod(), "CREATE"), &opts(), &stats).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert_eq!(stats.reviews("refused"), 1);

        let mut no_containers = pod();
        no_containers["spec"]["containers"] = json!([]);
        let answer = review(&review_of(no_containers, "CREATE"), &opts(), &stats).unwrap();
        assert_eq!(answer["response"]["allowed"], false);
    }

    #[test]
    fn other_operations_kinds_and_subresources_are_allowed_untouched() {
        let stats = InjectorStats::default();
        let answer = review(&review_of(pod(), "UPDATE"), &opts(), &stats).unwrap();
        assert_eq!(
            answer["response"],
            json!({"allowed": true, "uid": "705ab4f5-6393-11e8-b7cc-42010a800002"})
        );
        let mut r: Value = serde_json::from_slice(&review_of(pod(), "CREATE")).unwrap();
        r["request"]["kind"]["kind"] = "Deployment".into();
        r["request"]["kind"]["group"] = "apps".into();
        let answer = review(&serde_json::to_vec(&r).unwrap(), &opts(), &stats).unwrap();
        assert!(answer["response"].get("patch").is_none());
        let mut r: Value = serde_json::from_slice(&review_of(pod(), "CREATE")).unwrap();
        r["request"]["subResource"] = "ephemeralcontainers".into();
        let answer = review(&serde_json::to_vec(&r).unwrap(), &opts(), &stats).unwrap();
        assert!(answer["response"].get("patch").is_none());
        assert_eq!(stats.reviews("ignored"), 3);
    }

    #[test]
    fn what_is_not_an_admission_review_is_a_bad_request() {
        let stats = InjectorStats::default();
        for (body, needle) in [
            (b"not json".to_vec(), "not an AdmissionReview"),
            (
                br#"{"apiVersion":"v1","kind":"Pod"}"#.to_vec(),
                "admission.k8s.io/v1",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(),
                "without a request",
            ),
            (
                br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#
                    .to_vec(),
                "without a uid",
            ),
        ] {
            let e = review(&body, &opts(), &stats).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        assert_eq!(stats.reviews("bad_request"), 4);
    }

    #[tokio::test]
    async fn http_routing_method_type_and_size() {
        let stats = InjectorStats::default();
        let req = |method: Method, path: &str, ctype: Option<&str>, body: Vec<u8>| {
            let mut b = Request::builder().method(method).uri(path);
            if let Some(c) = ctype {
                b = b.header(header::CONTENT_TYPE, c);
            }
            b.body(Full::new(Bytes::from(body))).unwrap()
        };
        let body = review_of(pod(), "CREATE");
        let r = handle(
            req(
                Method::POST,
                "/inject",
                Some("application/json"),
                body.clone(),
            ),
            &opts(),
            &stats,
        )
        .await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = handle(req(Method::GET, "/inject", None, vec![]), &opts(), &stats).await;
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        let r = handle(
            req(
                Method::POST,
                "/metrics",
                Some("application/json"),
                body.clone(),
            ),
            &opts(),
            &stats,
        )
        .await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = handle(
            req(Method::POST, "/inject", Some("text/plain"), body),
            &opts(),
            &stats,
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        let r = handle(
            req(
                Method::POST,
                "/inject",
                Some("application/json"),
                vec![b' '; MAX_REVIEW_BYTES + 1],
            ),
            &opts(),
            &stats,
        )
        .await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
