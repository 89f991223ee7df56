//! Path-normalization bypass attempts against a DENY `paths` policy and an ALLOW `notPaths`
//! policy, under each MeshConfig normalization mode. The expectations are Istio's (Envoy's):
//! where a mode does not catch a variant, the test says so, because that is exactly why a
//! stricter mode exists. The path that was matched is also the path forwarded upstream
//! (`Decision::normalized_path`), so the upstream never sees a different path than policy did.

mod common;

use common::*;
use rampart_authz::{MeshConfig, PathNormalization, ReasonCode};

use PathNormalization::{
    Base, DecodeAndMergeSlashes as Decode, MergeSlashes as Merge, None as NoNorm,
};

const MODES: [PathNormalization; 4] = [NoNorm, Base, Merge, Decode];

/// (request path, blocked under [NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES])
const CASES: &[(&str, [bool; 4])] = &[
    ("/admin", [true, true, true, true]),
    ("/admin/users", [true, true, true, true]),
    ("/public", [false, false, false, false]),
    // Dot segments: resolved by every mode but NONE.
    ("/admin/../admin", [true, true, true, true]), // prefix `/admin/` even unnormalized
    ("/public/../admin", [false, true, true, true]),
    ("/./admin", [false, true, true, true]),
    ("/public/%2e%2e/admin", [false, true, true, true]),
    ("/public/%2E%2E/admin/x", [false, true, true, true]),
    // Encoded unreserved characters are decoded by BASE.
    ("/%61dmin", [false, true, true, true]),
    // Duplicate slashes: only merged by MERGE_SLASHES and DECODE_AND_MERGE_SLASHES.
    ("//admin", [false, false, true, true]),
    ("/admin//users", [true, true, true, true]),
    ("///admin///x", [false, false, true, true]),
    // Encoded slash / backslash: only decoded by DECODE_AND_MERGE_SLASHES.
    ("/%2Fadmin", [false, false, false, true]),
    ("/%2fadmin", [false, false, false, true]),
    ("/public%2F..%2Fadmin", [false, false, false, true]),
    ("/%5Cadmin", [false, false, false, true]),
    ("/public%5c..%5cadmin", [false, false, false, true]),
    // A raw backslash is a slash for every mode but NONE.
    ("/public\\..\\admin", [false, true, true, true]),
    // Not relative (no leading `/`): refused before any policy in every mode (400, as
    // Envoy's 404), since an app may still route it as `/admin` (gRPC-Go CVE-2026-33186).
    ("\\admin", [true, true, true, true]),
    ("admin", [true, true, true, true]),
    ("pkg.Admin/Delete", [true, true, true, true]),
    ("public/../admin", [true, true, true, true]),
    // Query strings never take part.
    ("/admin?x=/public", [true, true, true, true]),
    ("/public?x=/admin", [false, false, false, false]),
    // `;` parameters are not stripped (as Envoy): `/admin;x` is not `/admin` nor `/admin/*`.
    ("/admin;jsessionid=1", [false, false, false, false]),
    ("/admin/;x/users", [true, true, true, true]),
    // Matching is case-sensitive.
    ("/ADMIN", [false, false, false, false]),
    ("/Admin/users", [false, false, false, false]),
];

fn mesh(mode: PathNormalization) -> MeshConfig {
    MeshConfig {
        path_normalization: mode,
        ..MeshConfig::default()
    }
}

#[test]
fn deny_paths_under_every_mode() {
    let yaml = policy(
        "no-admin",
        "DENY",
        "[{to: [{operation: {paths: [/admin, /admin/*]}}]}]",
    );
    for (i, mode) in MODES.iter().enumerate() {
        let e = engine_with(&yaml, mesh(*mode));
        for (path, blocked) in CASES {
            let d = e.authorize(&httpbin(), &http("GET", path).0);
            assert_eq!(
                !d.is_allowed(),
                blocked[i],
                "DENY paths, mode {mode:?}, path {path:?} (normalized {:?})",
                d.normalized_path
            );
            if blocked[i] && !path.starts_with('/') {
                assert_eq!((d.reason_code, d.status), (ReasonCode::BadPath, 400));
            } else if blocked[i] {
                assert_eq!(d.reason_code, ReasonCode::DenyMatched);
            }
        }
    }
}

#[test]
fn allow_not_paths_under_every_mode() {
    let yaml = policy(
        "all-but-admin",
        "ALLOW",
        "[{to: [{operation: {notPaths: [/admin, /admin/*]}}]}]",
    );
    for (i, mode) in MODES.iter().enumerate() {
        let e = engine_with(&yaml, mesh(*mode));
        for (path, blocked) in CASES {
            let d = e.authorize(&httpbin(), &http("GET", path).0);
            assert_eq!(
                d.is_allowed(),
                !blocked[i],
                "ALLOW notPaths, mode {mode:?}, path {path:?} (normalized {:?})",
                d.normalized_path
            );
        }
    }
}

#[test]
fn prefix_deny_catches_parameters() {
    // The fix for the `;` variant: a prefix without the slash.
    let yaml = policy(
        "no-admin",
        "DENY",
        "[{to: [{operation: {paths: ['/admin*']}}]}]",
    );
    let e = engine_with(&yaml, mesh(Base));
    assert!(
        !e.authorize(&httpbin(), &http("GET", "/admin;jsessionid=1").0)
            .is_allowed()
    );
}

#[test]
fn template_deny_under_merge() {
    let yaml = policy(
        "no-admin",
        "DENY",
        "[{to: [{operation: {paths: ['/admin/{**}']}}]}]",
    );
    let e = engine_with(&yaml, mesh(Merge));
    assert!(
        !e.authorize(&httpbin(), &http("GET", "//admin//x").0)
            .is_allowed()
    );
    // `/admin/{**}` does not match `/admin` itself.
    assert!(
        e.authorize(&httpbin(), &http("GET", "/admin").0)
            .is_allowed()
    );
}

#[test]
fn forwarded_path_is_the_matched_path() {
    let e = engine_with("", mesh(Merge));
    let d = e.authorize(&httpbin(), &http("GET", "/a//b/../c?q=1").0);
    assert_eq!(d.normalized_path.as_deref(), Some("/a/c"));
}

#[test]
fn nul_is_a_bad_request() {
    for mode in MODES {
        let e = engine_with("", mesh(mode));
        let d = e.authorize(&httpbin(), &http("GET", "/admin%00.html").0);
        assert_eq!(d.status, 400);
        assert_eq!(d.reason_code, ReasonCode::BadPath);
    }
}
