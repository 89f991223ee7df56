//! The mesh-wide settings policy evaluation depends on (a subset of Istio's MeshConfig).

use serde::Deserialize;

use crate::normalize::PathNormalization;

/// Default root namespace (MeshConfig `rootNamespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// Default trust domain (MeshConfig `trustDomain`).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Mesh-wide settings: root namespace, trust domain and aliases, path normalization and the
/// extension providers CUSTOM policies may name.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshConfig {
    /// Policies in this namespace apply mesh-wide (default `istio-system`).
    pub root_namespace: String,
    /// The local trust domain (default `cluster.local`).
    pub trust_domain: String,
    /// Trust domains treated as local for policy matching (`trustDomainAliases`).
    pub trust_domain_aliases: Vec<String>,
    /// Path normalization before matching (default `BASE`).
    pub path_normalization: PathNormalization,
    /// Configured extension providers (`extensionProviders[]`), in file order.
    pub extension_providers: Vec<MeshExtensionProvider>,
}

/// One `extensionProviders[]` entry: its name, the document as written (kept whole, so a
/// snapshot re-serializes it unchanged), and what CUSTOM policies can use of it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshExtensionProvider {
    /// `name`.
    pub name: String,
    /// The entry as written.
    pub raw: serde_json::Value,
    /// The external authorization service it configures, or why it configures none a CUSTOM
    /// policy can use (another kind of provider, or a field Istio's validation refuses).
    pub authz: Result<ExtAuthzProvider, String>,
}

/// An external authorization service (`envoyExtAuthzHttp` or `envoyExtAuthzGrpc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzProvider {
    /// Host of the service (`service`, without Istio's optional `<namespace>/` prefix).
    pub host: String,
    /// `port`.
    pub port: u16,
    /// How long a check may take (`timeout`, default 600 s as Istio's).
    pub timeout: std::time::Duration,
    /// Allow the request when the service cannot be asked (`failOpen`).
    pub fail_open: bool,
    /// The status a request gets when the service cannot be asked and `failOpen` is false
    /// (`statusOnError`, default 403).
    pub status_on_error: u16,
    /// HTTP or gRPC, with their own settings.
    pub kind: ExtAuthzKind,
    /// Send the request body too (`includeRequestBodyInCheck`), or only the head.
    pub body: Option<ExtAuthzBody>,
}

/// How much of the request body goes to the service (`includeRequestBodyInCheck`, Envoy's
/// `with_request_body`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtAuthzBody {
    /// The most bytes held back and sent (`maxRequestBytes`, at least 1).
    pub max_bytes: u32,
    /// A longer body is sent cut, marked `x-envoy-auth-partial-body: true`
    /// (`allowPartialMessage`); without it a longer body is refused with 413.
    pub allow_partial: bool,
    /// gRPC: the body goes as bytes (`raw_body`) instead of text (`body`) (`packAsBytes`).
    pub pack_as_bytes: bool,
}

/// The protocol of an external authorization service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtAuthzKind {
    /// `envoyExtAuthzHttp`: the request's method, `pathPrefix` + its path and chosen headers
    /// go to the service; 200 allows.
    Http(ExtAuthzHttp),
    /// `envoyExtAuthzGrpc`: `envoy.service.auth.v3.Authorization/Check`.
    Grpc,
}

/// The settings only `envoyExtAuthzHttp` has. Header lists hold Istio's patterns: a name,
/// `prefix*` or `*suffix`, matched without regard to case.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExtAuthzHttp {
    /// `pathPrefix`.
    pub path_prefix: String,
    /// `includeRequestHeadersInCheck` (Host, Method, Path, Content-Length and Authorization
    /// always go).
    pub request_headers: Vec<String>,
    /// `includeAdditionalHeadersInCheck`: fixed headers added to every check.
    pub additional_headers: Vec<(String, String)>,
    /// `headersToUpstreamOnAllow`: headers of an allowing answer that go to the app.
    pub upstream_on_allow: Vec<String>,
    /// `headersToDownstreamOnDeny`: headers of a denying answer that go to the client (all but
    /// the hop and pseudo headers when empty).
    pub downstream_on_deny: Vec<String>,
    /// `headersToDownstreamOnAllow`: headers of an allowing answer added to the app's response.
    pub downstream_on_allow: Vec<String>,
}

impl MeshExtensionProvider {
    fn parse(raw: serde_json::Value) -> Result<MeshExtensionProvider, MeshConfigError> {
        let name = raw
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            return Err(MeshConfigError(
                "extensionProviders[].name must not be empty".into(),
            ));
        }
        let authz = parse_ext_authz(&raw).map_err(|e| format!("extensionProviders[{name}]: {e}"));
        Ok(MeshExtensionProvider { name, raw, authz })
    }
}

fn parse_ext_authz(raw: &serde_json::Value) -> Result<ExtAuthzProvider, String> {
    use serde_json::Value;
    let (field, spec, grpc) = match (raw.get("envoyExtAuthzHttp"), raw.get("envoyExtAuthzGrpc")) {
        (Some(h), None) => ("envoyExtAuthzHttp", h, false),
        (None, Some(g)) => ("envoyExtAuthzGrpc", g, true),
        (Some(_), Some(_)) => {
            return Err("sets both envoyExtAuthzHttp and envoyExtAuthzGrpc".into());
        }
        (None, None) => {
            return Err(
                "is not an external authorization provider (envoyExtAuthzHttp or envoyExtAuthzGrpc)"
                    .into(),
            );
        }
    };
    let Value::Object(spec) = spec else {
        return Err(format!("{field}: not a mapping"));
    };
    let string = |k: &str| -> Result<String, String> {
        match spec.get(k) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{field}.{k}: not a string")),
        }
    };
    let boolean = |v: Option<&Value>, k: &str| -> Result<bool, String> {
        match v {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(format!("{field}.{k}: not true or false")),
        }
    };
    let list = |k: &str| -> Result<Vec<String>, String> {
        match spec.get(k) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .ok_or_else(|| format!("{field}.{k}: every entry must be a header name"))
                })
                .collect(),
            Some(_) => Err(format!("{field}.{k}: not a list")),
        }
    };
    // `service` is `[<namespace>/]<host>`; the host is what is dialed.
    let service = string("service")?;
    let host = service
        .rsplit_once('/')
        .map_or(service.as_str(), |(_, h)| h)
        .to_string();
    if host.is_empty() {
        return Err(format!("{field}.service is required"));
    }
    // A bare name would be completed by the resolver's search path, in whatever namespace
    // the proxy runs: a Service of that name there would receive the checks (and answer
    // them). Istio takes only names in its registry, which are fully qualified.
    if !host.contains('.') && host != "localhost" && !host.contains(':') {
        return Err(format!(
            "{field}.service {service:?}: the host must be fully qualified (ext-authz.foo.svc.cluster.local), an IP address or localhost"
        ));
    }
    let port = match spec.get("port") {
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0),
        _ => None,
    }
    .ok_or_else(|| format!("{field}.port must be a number from 1 to 65535"))?;
    let timeout = match string("timeout")? {
        t if t.is_empty() => std::time::Duration::from_secs(600),
        t => crate::model::parse_duration(&t)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("{field}.timeout {t:?} is not a positive duration"))?,
    };
    let status_on_error = match string("statusOnError")? {
        s if s.is_empty() => 403,
        s => s
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .ok_or_else(|| format!("{field}.statusOnError {s:?} is not an HTTP status code"))?,
    };
    let body = match spec.get("includeRequestBodyInCheck") {
        None | Some(Value::Null) => None,
        Some(Value::Object(b)) => {
            let f = format!("{field}.includeRequestBodyInCheck");
            // Envoy refuses `max_request_bytes: 0` (the listener would not load): a provider
            // that cannot be configured is unusable, never one that sends no body.
            let max_bytes = match b.get("maxRequestBytes") {
                Some(Value::Number(n)) => n.as_u64().and_then(|v| u32::try_from(v).ok()),
                None | Some(Value::Null) => Some(0),
                Some(_) => None,
            }
            .filter(|m| *m > 0)
            .ok_or_else(|| format!("{f}.maxRequestBytes must be a number from 1 to 4294967295"))?;
            Some(ExtAuthzBody {
                max_bytes,
                allow_partial: boolean(
                    b.get("allowPartialMessage"),
                    "includeRequestBodyInCheck.allowPartialMessage",
                )?,
                pack_as_bytes: boolean(
                    b.get("packAsBytes"),
                    "includeRequestBodyInCheck.packAsBytes",
                )?,
            })
        }
        Some(_) => return Err(format!("{field}.includeRequestBodyInCheck: not a mapping")),
    };
    let kind = if grpc {
        ExtAuthzKind::Grpc
    } else {
        let path_prefix = string("pathPrefix")?;
        if !path_prefix.is_empty() && !path_prefix.starts_with('/') {
            return Err(format!(
                "{field}.pathPrefix {path_prefix:?} must begin with '/'"
            ));
        }
        // The deprecated `includeHeadersInCheck` is read where the new field is absent.
        let mut request_headers = list("includeRequestHeadersInCheck")?;
        if request_headers.is_empty() {
            request_headers = list("includeHeadersInCheck")?;
        }
        let additional_headers = match spec.get("includeAdditionalHeadersInCheck") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(format!(
                        "{field}.includeAdditionalHeadersInCheck.{k}: not a string"
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(format!(
                    "{field}.includeAdditionalHeadersInCheck: not a mapping"
                ));
            }
        };
        ExtAuthzKind::Http(ExtAuthzHttp {
            path_prefix,
            request_headers,
            additional_headers,
            upstream_on_allow: list("headersToUpstreamOnAllow")?,
            downstream_on_deny: list("headersToDownstreamOnDeny")?,
            downstream_on_allow: list("headersToDownstreamOnAllow")?,
        })
    };
    Ok(ExtAuthzProvider {
        host,
        port,
        timeout,
        fail_open: boolean(spec.get("failOpen"), "failOpen")?,
        status_on_error,
        kind,
        body,
    })
}

/// Whether `name` matches one of Istio's header patterns (`exact`, `prefix*`, `*suffix`, `*`),
/// without regard to case.
pub fn header_pattern_matches(patterns: &[String], name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    patterns.iter().any(|p| {
        let p = p.to_ascii_lowercase();
        if p == "*" {
            true
        } else if let Some(suffix) = p.strip_prefix('*') {
            name.ends_with(suffix)
        } else if let Some(prefix) = p.strip_suffix('*') {
            name.starts_with(prefix)
        } else {
            name == p
        }
    })
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            trust_domain_aliases: Vec::new(),
            path_normalization: PathNormalization::Base,
            extension_providers: Vec::new(),
        }
    }
}

/// `mesh.yaml` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("mesh config: {0}")]
pub struct MeshConfigError(String);

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct RawMesh {
    root_namespace: Option<String>,
    trust_domain: Option<String>,
    trust_domain_aliases: Vec<String>,
    path_normalization: Option<RawNormalization>,
    extension_providers: Vec<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawNormalization {
    normalization: Option<PathNormalization>,
}

impl MeshConfig {
    /// Parse the policy-relevant part of a `mesh.yaml` (Istio MeshConfig field names:
    /// `rootNamespace`, `trustDomain`, `trustDomainAliases`,
    /// `pathNormalization.normalization`, `extensionProviders[].name`). Other keys belong to
    /// other components and are ignored.
    pub fn from_yaml(text: &str) -> Result<MeshConfig, MeshConfigError> {
        let raw: RawMesh = if text.trim().is_empty() {
            RawMesh::default()
        } else {
            serde_saphyr::from_str(text).map_err(|e| MeshConfigError(e.to_string()))?
        };
        let mut m = MeshConfig::default();
        if let Some(r) = raw.root_namespace.filter(|s| !s.is_empty()) {
            m.root_namespace = r;
        }
        if let Some(t) = raw.trust_domain.filter(|s| !s.is_empty()) {
            m.trust_domain = t;
        }
        m.trust_domain_aliases = raw.trust_domain_aliases;
        if let Some(n) = raw.path_normalization.and_then(|p| p.normalization) {
            m.path_normalization = n;
        }
        for p in raw.extension_providers {
            let p = MeshExtensionProvider::parse(p)?;
            if m.provider(&p.name).is_some() {
                return Err(MeshConfigError(format!(
                    "extensionProviders: the name {:?} is used twice",
                    p.name
                )));
            }
            m.extension_providers.push(p);
        }
        Ok(m)
    }

    /// The provider named `name`.
    pub fn provider(&self, name: &str) -> Option<&MeshExtensionProvider> {
        self.extension_providers.iter().find(|p| p.name == name)
    }

    /// The trust domain followed by its aliases (Istio's trust-domain bundle).
    pub(crate) fn trust_domains(&self) -> Vec<String> {
        let mut v = vec![self.trust_domain.clone()];
        for a in &self.trust_domain_aliases {
            if !v.contains(a) {
                v.push(a.clone());
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_subset_and_ignores_others() {
        let m = MeshConfig::from_yaml(
            "trustDomain: td1\ntrustDomainAliases: [old]\nrootNamespace: mesh\npathNormalization:\n  normalization: MERGE_SLASHES\nextensionProviders:\n- name: ext\n  envoyExtAuthzHttp: {service: x.local, port: 9000}\ncaAddress: 127.0.0.1:15012\n",
        )
        .unwrap();
        assert_eq!(m.trust_domain, "td1");
        assert_eq!(m.trust_domain_aliases, vec!["old"]);
        assert_eq!(m.root_namespace, "mesh");
        assert_eq!(m.path_normalization, PathNormalization::MergeSlashes);
        assert_eq!(m.extension_providers.len(), 1);
        assert_eq!(m.extension_providers[0].name, "ext");
        let p = m.extension_providers[0].authz.as_ref().unwrap();
        assert_eq!((p.host.as_str(), p.port), ("x.local", 9000));
        assert_eq!(p.timeout, std::time::Duration::from_secs(600));
        assert_eq!(p.status_on_error, 403);
        assert_eq!(MeshConfig::from_yaml("").unwrap(), MeshConfig::default());
        let d = MeshConfig::from_yaml("pathNormalization: {normalization: DEFAULT}").unwrap();
        assert_eq!(d.path_normalization, PathNormalization::Base);
        assert!(MeshConfig::from_yaml("pathNormalization: {normalization: WEIRD}").is_err());
        // Istio refuses a mesh config naming two providers alike.
        let twice = "extensionProviders:\n- {name: a, envoyExtAuthzGrpc: {service: x.local, port: 1}}\n- {name: a, prometheus: {}}\n";
        assert!(
            MeshConfig::from_yaml(twice)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
    }

    #[test]
    fn ext_authz_providers_parse_as_istio_reads_them() {
        let m = MeshConfig::from_yaml(
            r#"extensionProviders:
- name: http
  envoyExtAuthzHttp:
    service: foo/authz.foo.svc.cluster.local
    port: 9000
    timeout: 2s
    failOpen: true
    statusOnError: "503"
    pathPrefix: /check
    includeRequestHeadersInCheck: [x-custom-id, "x-prefix-*", "*-suffix"]
    includeAdditionalHeadersInCheck: {x-header-1: value-1}
    headersToUpstreamOnAllow: [authorization]
    headersToDownstreamOnDeny: [set-cookie]
- name: grpc
  envoyExtAuthzGrpc: {service: opa.local, port: 9191}
- name: telemetry
  prometheus: {}
- name: bad-port
  envoyExtAuthzHttp: {service: x.local, port: 999999}
- name: bad-prefix
  envoyExtAuthzHttp: {service: x.local, port: 1, pathPrefix: check}
- name: bad-status
  envoyExtAuthzGrpc: {service: x.local, port: 1, statusOnError: "999"}
- name: short
  envoyExtAuthzGrpc: {service: foo/ext-authz, port: 1}
- name: local
  envoyExtAuthzGrpc: {service: localhost, port: 1}
- name: v6
  envoyExtAuthzGrpc: {service: "::1", port: 1}
- name: no-service
  envoyExtAuthzGrpc: {port: 1}
- name: body
  envoyExtAuthzGrpc: {service: x.local, port: 1, includeRequestBodyInCheck: {maxRequestBytes: 10, packAsBytes: true}}
- name: body-zero
  envoyExtAuthzGrpc: {service: x.local, port: 1, includeRequestBodyInCheck: {allowPartialMessage: true}}
"#,
        )
        .unwrap();
        let http = m.provider("http").unwrap().authz.as_ref().unwrap();
        assert_eq!(http.host, "authz.foo.svc.cluster.local");
        assert_eq!(http.timeout, std::time::Duration::from_secs(2));
        assert!(http.fail_open);
        assert_eq!(http.status_on_error, 503);
        let ExtAuthzKind::Http(h) = &http.kind else {
            panic!("http provider")
        };
        assert_eq!(h.path_prefix, "/check");
        assert!(header_pattern_matches(&h.request_headers, "X-Custom-Id"));
        assert!(header_pattern_matches(&h.request_headers, "x-prefix-a"));
        assert!(header_pattern_matches(&h.request_headers, "a-SUFFIX"));
        assert!(!header_pattern_matches(&h.request_headers, "x-custom"));
        assert_eq!(
            h.additional_headers,
            vec![("x-header-1".into(), "value-1".into())]
        );
        let grpc = m.provider("grpc").unwrap().authz.as_ref().unwrap();
        assert_eq!(grpc.kind, ExtAuthzKind::Grpc);
        for (name, why) in [
            ("telemetry", "not an external authorization provider"),
            ("bad-port", "port"),
            ("bad-prefix", "pathPrefix"),
            ("bad-status", "statusOnError"),
            ("no-service", "service is required"),
            ("body-zero", "maxRequestBytes"),
            ("short", "fully qualified"),
        ] {
            let e = m.provider(name).unwrap().authz.as_ref().unwrap_err();
            assert!(e.contains(why) && e.contains(name), "{name}: {e}");
        }
        assert!(m.provider("local").unwrap().authz.is_ok());
        assert_eq!(
            m.provider("body").unwrap().authz.as_ref().unwrap().body,
            Some(ExtAuthzBody {
                max_bytes: 10,
                allow_partial: false,
                pack_as_bytes: true
            })
        );
        assert!(m.provider("v6").unwrap().authz.is_ok());
        // Kept as written, for snapshots.
        assert_eq!(
            m.provider("grpc").unwrap().raw["envoyExtAuthzGrpc"]["port"],
            9191
        );
    }
}
