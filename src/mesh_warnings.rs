//! Every warning a mesh folder yields when it loads: what `rampart validate` prints for it
//! and what `rampart up` says at startup and on each edit, so that a policy that loads but
//! can never do what it says is named before traffic finds out.

use std::collections::BTreeSet;

use rampart_authz::Engine;
use rampart_mesh::MeshFolder;

/// The warnings of an accepted snapshot, deduplicated, in this order:
///
/// 1. policy-load warnings, as `rampart validate <policy dir>` prints them (a selector
///    without labels, a DENY with HTTP-only fields that will deny all TCP, a principal
///    written with `spiffe://`, ...): `file: document N: field: Kind ns/name: reason`;
/// 2. the authorization engine's translation warnings, as each proxy logs them (`policy
///    translation`): a CUSTOM provider missing from `mesh.yaml` or unusable, values dropped;
/// 3. per workload of the registry: what makes policy deny for it alone (several CUSTOM
///    providers), prefixed `workload ns/name: `.
///
/// None of these refuses the folder: the proxies serve it, and requests the affected rules
/// match are denied (fail closed). Pure: reads only the snapshot.
pub fn mesh_warnings(mesh: &MeshFolder) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut push = |w: String| {
        if seen.insert(w.clone()) {
            out.push(w);
        }
    };
    for r in &mesh.resources {
        for w in rampart_authz::resource_warnings(r) {
            push(w.to_string());
        }
    }
    let engine = Engine::new(mesh.resources.iter().cloned(), mesh.mesh.clone());
    for w in engine.warnings() {
        push(w.clone());
    }
    for wl in &mesh.registry.workloads {
        for w in engine.workload_warnings(&wl.authz_workload()) {
            push(format!("workload {}: {w}", wl.key()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKLOADS: &str = "workloads:\n- name: backend\n  namespace: api\n  labels: {app: backend}\n  ports:\n  - {port: 8080, protocol: http, app: 127.0.0.1:18080, inbound: 127.0.0.1:15081}\n  proxy: {outbound: 127.0.0.1:15001, admin: 127.0.0.1:15000}\n";

    fn custom(name: &str, provider: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: api}}\nspec:\n  selector: {{matchLabels: {{app: backend}}}}\n  action: CUSTOM\n  provider: {{name: {provider}}}\n  rules: [{{to: [{{operation: {{paths: ['/admin*']}}}}]}}]\n"
        )
    }

    fn folder(mesh: &str, policies: &[(&str, &str)]) -> (tempfile::TempDir, MeshFolder) {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("mesh.yaml"), mesh).unwrap();
        std::fs::write(d.path().join("workloads.yaml"), WORKLOADS).unwrap();
        for (name, text) in policies {
            std::fs::write(d.path().join(name), text).unwrap();
        }
        let m = MeshFolder::load(d.path()).unwrap();
        (d, m)
    }

    const OPA: &str =
        "extensionProviders:\n- name: opa\n  envoyExtAuthzGrpc: {service: 127.0.0.1, port: 9191}\n";

    #[test]
    fn a_missing_or_unusable_provider_is_named_with_its_file() {
        let (_d, m) = folder("", &[("opa.yaml", &custom("ext", "opa"))]);
        let w = mesh_warnings(&m);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].starts_with("opa.yaml: document 1: AuthorizationPolicy api/ext: ")
                && w[0].contains("\"opa\" is not defined"),
            "{w:?}"
        );
        for (provider, why) in [
            (
                "envoyExtAuthzGrpc: {service: ext-authz, port: 9191}",
                "fully qualified",
            ),
            (
                "envoyExtAuthzHttp: {service: 127.0.0.1, port: 9191, pathPrefix: oauth2}",
                "pathPrefix",
            ),
            (
                "envoyExtAuthzHttp: {service: 127.0.0.1, port: 9191, statusOnError: \"abc\"}",
                "statusOnError",
            ),
        ] {
            let mesh = format!("extensionProviders:\n- name: opa\n  {provider}\n");
            let (_d, m) = folder(&mesh, &[("opa.yaml", &custom("ext", "opa"))]);
            let w = mesh_warnings(&m);
            assert_eq!(w.len(), 1, "{provider}: {w:?}");
            assert!(
                w[0].contains("cannot be used") && w[0].contains(why),
                "{provider}: {w:?}"
            );
        }
        // Twin: a usable provider gives no warning.
        let (_d, m) = folder(OPA, &[("opa.yaml", &custom("ext", "opa"))]);
        assert_eq!(mesh_warnings(&m), Vec::<String>::new());
    }

    #[test]
    fn load_warnings_and_per_workload_ones_are_kept_once() {
        let no_labels = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: all, namespace: api}\nspec: {selector: {}}\n";
        let two = format!("{}---\n{}", custom("a", "opa"), custom("b", "oauth"));
        let mesh = format!(
            "{OPA}- name: oauth\n  envoyExtAuthzGrpc: {{service: 127.0.0.1, port: 9192}}\n"
        );
        let (_d, m) = folder(&mesh, &[("all.yaml", no_labels), ("two.yaml", &two)]);
        let w = mesh_warnings(&m);
        assert!(
            w.iter().any(|w| w
                .starts_with("all.yaml: document 1: spec.selector: AuthorizationPolicy api/all: ")
                && w.contains("without labels")),
            "{w:?}"
        );
        let several: Vec<&String> = w.iter().filter(|w| w.contains("several CUSTOM")).collect();
        assert_eq!(several.len(), 1, "{w:?}");
        assert!(
            several[0].starts_with("workload api/backend: ")
                && several[0].contains("oauth, opa")
                && several[0].contains("api/a, api/b"),
            "{w:?}"
        );
        // Twin: one provider for both policies: no per-workload warning, and the selector
        // warning alone.
        let one = two.replace("name: oauth", "name: opa");
        let (_d, m) = folder(&mesh, &[("all.yaml", no_labels), ("two.yaml", &one)]);
        let w = mesh_warnings(&m);
        assert_eq!(w.len(), 1, "{w:?}");
    }
}
