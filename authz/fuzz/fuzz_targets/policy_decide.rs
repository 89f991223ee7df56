//! YAML → policy → decision: loading, validation, compilation and evaluation never panic on
//! any input, and every decision is explained (a DENY names a reason; a matched rule index
//! is within the policy's rules).
#![no_main]

use libfuzzer_sys::fuzz_target;
use rampart_authz::{
    Engine, HttpRequest, MeshConfig, PathNormalization, Peer, RequestContext, Verdict, Workload,
    load_str,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded = load_str("fuzz.yaml", text);
    let resources = loaded.resources;
    for mode in [
        PathNormalization::Base,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        let mesh = MeshConfig {
            path_normalization: mode,
            ..MeshConfig::default()
        };
        let engine = Engine::new(resources.clone(), mesh);
        let w = Workload::new("foo", [("app", "httpbin")]);
        for (principal, http) in [(true, true), (false, true), (true, false)] {
            let ctx = RequestContext {
                source: Peer {
                    principal: principal.then(|| "spiffe://cluster.local/ns/foo/sa/a".to_string()),
                    ip: Some([10, 0, 0, 1].into()),
                    remote_ip: None,
                },
                destination_ip: Some([10, 0, 0, 2].into()),
                destination_port: 8080,
                sni: None,
                http: http.then(|| {
                    HttpRequest::new("GET", "/a/../admin//x?q=1", "httpbin.foo")
                        .with_header("x-user", "admin")
                }),
                jwt: None,
            };
            let d = engine.authorize(&w, &ctx);
            assert!(!d.reason.is_empty());
            if d.decision == Verdict::Deny {
                assert!(matches!(d.status, 400 | 401 | 403));
            }
            let _ = engine.peer_authentication(&w, 8080);
        }
    }
});
