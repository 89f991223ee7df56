//! The configuration and request shared by `benches/decide.rs` and
//! `examples/decide_cpu.rs`, so both measure the same decision.

use rampart_authz::{Engine, HttpRequest, MeshConfig, Peer, RequestContext, Workload, load_str};

/// `n` policies: 10 per namespace, each selecting one app of that namespace, alternating
/// ALLOW and DENY, with principals, paths, methods and a header condition; plus one
/// mesh-wide DENY in the root namespace.
fn config(n: usize) -> String {
    let mut y = String::from(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: mesh-deny, namespace: istio-system}\nspec: {action: DENY, rules: [{from: [{source: {ipBlocks: [203.0.113.0/24]}}]}]}\n",
    );
    for i in 0..n {
        let ns = i / 10;
        let app = i % 10;
        let action = if i % 2 == 0 { "ALLOW" } else { "DENY" };
        y.push_str(&format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: ns-{ns}}}\nspec:\n  selector: {{matchLabels: {{app: app-{app}}}}}\n  action: {action}\n  rules:\n  - from: [{{source: {{principals: [cluster.local/ns/ns-{ns}/sa/client-{app}, 'cluster.local/ns/shared/*']}}}}]\n    to: [{{operation: {{methods: [GET, HEAD], paths: ['/api/v{app}/*', /healthz]}}}}]\n  - from: [{{source: {{namespaces: [admin-{ns}]}}}}]\n    to: [{{operation: {{paths: ['/admin/{{**}}']}}}}]\n    when: [{{key: 'request.headers[x-debug]', values: ['{i}']}}]\n"
        ));
    }
    y
}

fn request() -> RequestContext {
    RequestContext {
        source: Peer {
            principal: Some("spiffe://cluster.local/ns/ns-0/sa/client-4".into()),
            ip: Some("10.0.1.1".parse().unwrap()),
            remote_ip: None,
        },
        destination_ip: Some("10.0.0.10".parse().unwrap()),
        destination_port: 8080,
        sni: None,
        http: Some(
            HttpRequest::new(
                "GET",
                "/api/v4/items/42?x=1",
                "app-4.ns-0.svc.cluster.local",
            )
            .with_header("user-agent", "bench")
            .with_header("accept", "*/*"),
        ),
        jwt: None,
    }
}

/// The engine for `n` policies, the workload and the request, checked to be allowed (by
/// rule 0 of `ns-0/p4`, after the mesh-wide DENY is checked).
pub(crate) fn setup(n: usize) -> (Engine, Workload, RequestContext) {
    let loaded = load_str("bench.yaml", &config(n));
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems.first());
    let engine = Engine::new(loaded.resources, MeshConfig::default());
    let w = Workload::new("ns-0", [("app", "app-4"), ("version", "v1")]);
    let ctx = request();
    let d = engine.authorize(&w, &ctx);
    assert!(d.is_allowed(), "{}", d.summary());
    (engine, w, ctx)
}
