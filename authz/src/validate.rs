//! Istio's validation of `security.istio.io` resources: the istiod admission webhook
//! (`pkg/config/validation`, `pkg/config/security`) and the CRD schema / CEL rules the
//! Kubernetes apiserver enforces, so that what Istio refuses is refused here too, with Istio's
//! wording where it has one. Shape errors (unknown fields, wrong types, bad enum values) are
//! caught earlier, when the YAML is read into the model.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::{
    Action, AuthorizationPolicy, Condition, DRY_RUN_ANNOTATION, JwtRule, ObjectMeta, Operation,
    PeerAuthentication, PolicyTargetReference, RequestAuthentication, Resource, Source,
    WorkloadSelector, parse_duration, parse_go_bool,
};

/// One finding of validation: a field path (relative to the object, e.g. `spec.rules[0]`) and
/// a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Dotted field path.
    pub field_path: String,
    /// Reason, close to Istio's wording.
    pub reason: String,
}

/// The outcome of validating one resource: errors refuse it; warnings are what Istio also
/// accepts with a warning.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationReport {
    /// Reasons to refuse the resource.
    pub errors: Vec<Finding>,
    /// Accepted, but suspicious.
    pub warnings: Vec<Finding>,
}

impl ValidationReport {
    fn error(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.errors.push(Finding {
            field_path: path.into(),
            reason: reason.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.warnings.push(Finding {
            field_path: path.into(),
            reason: reason.into(),
        });
    }
}

const ALWAYS_REJECT_ANNOTATION: &str = "internal.istio.io/webhook-always-reject";
const INTERNAL_PARENT_NAMESPACE: &str = "internal.istio.io/parent-namespace";
const INTERNAL_PARENTS: &str = "internal.istio.io/parents";

/// Validates one resource as Istio would.
pub fn validate(resource: &Resource) -> ValidationReport {
    let mut report = ValidationReport::default();
    validate_metadata(resource, &mut report);
    match resource {
        Resource::PeerAuthentication(pa) => validate_peer_authentication(pa, &mut report),
        Resource::RequestAuthentication(ra) => validate_request_authentication(ra, &mut report),
        Resource::AuthorizationPolicy(ap) => validate_authorization_policy(ap, &mut report),
    }
    report
}

// ------------------------------------------------------------------------------------------
// metadata

fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns1123_label)
}

fn validate_metadata(resource: &Resource, report: &mut ValidationReport) {
    let meta: &ObjectMeta = resource.metadata();
    match meta.name.as_deref() {
        None | Some("") => report.error("metadata.name", "Required value: name is required"),
        Some(name) if !is_dns1123_subdomain(name) => report.error(
            "metadata.name",
            format!(
                "Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
            ),
        ),
        Some(_) => {}
    }
    if let Some(ns) = meta.namespace.as_deref()
        && !ns.is_empty()
        && !is_dns1123_label(ns)
    {
        report.error(
            "metadata.namespace",
            format!(
                "Invalid value: {ns:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
            ),
        );
    }
    if let Some(ts) = meta.creation_timestamp.as_deref()
        && meta.creation_time().is_none()
    {
        report.error(
            "metadata.creationTimestamp",
            format!("Invalid value: {ts:?}: must be an RFC 3339 date-time"),
        );
    }

    let full_name = format!("{}/{}", resource.namespace(), resource.name());
    let annotations = &meta.annotations;
    if let Some(value) = annotations.get(DRY_RUN_ANNOTATION) {
        let path = format!("metadata.annotations[{DRY_RUN_ANNOTATION:?}]");
        match resource {
            Resource::AuthorizationPolicy(ap) => match ap.spec.action() {
                Action::Allow | Action::Deny => {
                    if parse_go_bool(value).is_none() {
                        report.error(
                            path,
                            format!(
                                "{full_name} has annotation {DRY_RUN_ANNOTATION} with invalid value ({value}): strconv.ParseBool: parsing {value:?}: invalid syntax"
                            ),
                        );
                    }
                }
                other => report.error(
                    path,
                    format!(
                        "the annotation {DRY_RUN_ANNOTATION} currently only supports action ALLOW/DENY, found action {other} in {full_name}"
                    ),
                ),
            },
            _ => report.error(
                path,
                format!(
                    "{full_name} has unsupported annotation {DRY_RUN_ANNOTATION}, please remove the annotation"
                ),
            ),
        }
    }
    if annotations.contains_key(ALWAYS_REJECT_ANNOTATION) {
        report.error(
            format!("metadata.annotations[{ALWAYS_REJECT_ANNOTATION:?}]"),
            format!("{ALWAYS_REJECT_ANNOTATION:?} annotation found, rejecting"),
        );
    }
    for internal in [INTERNAL_PARENT_NAMESPACE, INTERNAL_PARENTS] {
        if annotations.contains_key(internal) {
            report.error(
                format!("metadata.annotations[{internal:?}]"),
                format!("{internal:?} annotation found, this may not be set by users"),
            );
        }
    }
}

// ------------------------------------------------------------------------------------------
// selector and target references

fn validate_selector(selector: Option<&WorkloadSelector>, report: &mut ValidationReport) {
    let Some(selector) = selector else { return };
    let labels: &BTreeMap<String, String> = &selector.match_labels;
    if labels.len() > 4096 {
        report.error(
            "spec.selector.matchLabels",
            "Too many: must have at most 4096 items",
        );
    }
    for (k, v) in labels {
        let path = format!("spec.selector.matchLabels[{k:?}]");
        if k.is_empty() {
            report.error(
                &path,
                format!(
                    "empty key is not supported in selector: {:?}",
                    format!("{k}={v}")
                ),
            );
        }
        if k.contains('*') || v.contains('*') {
            report.error(
                &path,
                format!(
                    "wildcard is not supported in selector: {:?}",
                    format!("{k}={v}")
                ),
            );
        }
        if v.chars().count() > 63 {
            report.error(
                &path,
                format!("Too long: may not be longer than 63 (label value must have at most 63 characters, found {})", v.chars().count()),
            );
        }
    }
    if labels.is_empty() {
        report.warn(
            "spec.selector",
            "workload selector specified without labels",
        );
    }
}

fn validate_one_of_selector(
    selector: bool,
    target_ref: bool,
    target_refs: bool,
    report: &mut ValidationReport,
) {
    if u8::from(selector) + u8::from(target_ref) + u8::from(target_refs) > 1 {
        report.error(
            "spec",
            "only one of targetRefs or workloadSelector can be set (only one of targetRefs or selector can be set)",
        );
    }
}

fn is_group_pattern(g: &str) -> bool {
    g.is_empty() || is_dns1123_subdomain(g)
}

fn is_kind_pattern(k: &str) -> bool {
    let b = k.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// The (group, kind) pairs Istio lets a policy target: Service, ServiceEntry, Gateway,
/// GatewayClass.
const ALLOWED_TARGETS: &[(&str, &str)] = &[
    ("", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

fn validate_target_ref(path: &str, r: &PolicyTargetReference, report: &mut ValidationReport) {
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("");
    let name = r.name.as_deref().unwrap_or("");
    if name.is_empty() {
        report.error(
            format!("{path}.name"),
            "targetRef name must be set (Required value)",
        );
    } else if name.len() > 253 {
        report.error(
            format!("{path}.name"),
            "Too long: may not be longer than 253",
        );
    }
    if r.namespace.as_deref().is_some_and(|ns| !ns.is_empty()) {
        report.error(
            format!("{path}.namespace"),
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        );
    }
    if group.len() > 253 || !is_group_pattern(group) {
        report.error(
            format!("{path}.group"),
            format!(
                "Invalid value: {group:?}: {path}.group in body should match '^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$'"
            ),
        );
    }
    if kind.is_empty() {
        report.error(format!("{path}.kind"), "Required value: kind is required");
    } else if kind.len() > 63 || !is_kind_pattern(kind) {
        report.error(
            format!("{path}.kind"),
            format!(
                "Invalid value: {kind:?}: {path}.kind in body should match '^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$'"
            ),
        );
    }
    let canonical = if group.is_empty() { "" } else { group };
    if !ALLOWED_TARGETS
        .iter()
        .any(|(g, k)| *g == canonical && *k == kind)
    {
        report.error(
            path,
            format!(
                "targetRef must be to one of [Service ServiceEntry Gateway GatewayClass] but was {group}/{kind}"
            ),
        );
    }
}

fn validate_targets(
    target_ref: Option<&PolicyTargetReference>,
    target_refs: Option<&Vec<PolicyTargetReference>>,
    report: &mut ValidationReport,
) {
    if let Some(r) = target_ref {
        validate_target_ref("spec.targetRef", r, report);
    }
    if let Some(refs) = target_refs {
        if refs.len() > 16 {
            report.error("spec.targetRefs", "Too many: must have at most 16 items");
        }
        for (i, r) in refs.iter().enumerate() {
            validate_target_ref(&format!("spec.targetRefs[{i}]"), r, report);
        }
    }
}

// ------------------------------------------------------------------------------------------
// PeerAuthentication

fn validate_peer_authentication(pa: &PeerAuthentication, report: &mut ValidationReport) {
    let spec = &pa.spec;
    let empty_selector = spec
        .selector
        .as_ref()
        .is_none_or(|s| s.match_labels.is_empty());
    if let Some(ports) = &spec.port_level_mtls {
        if empty_selector && !ports.is_empty() {
            report.error(
                "spec.portLevelMtls",
                "mesh/namespace peer authentication cannot have port level mTLS (portLevelMtls requires selector)",
            );
        }
        if ports.is_empty() {
            report.error(
                "spec.portLevelMtls",
                "port level mTLS, if defined, must have at least one element",
            );
        }
        for port in ports.keys() {
            if *port == 0 || *port > 65535 {
                report.error(
                    format!("spec.portLevelMtls[{port}]"),
                    "port must be in range 1..65535",
                );
            }
        }
    }
    validate_selector(spec.selector.as_ref(), report);
}

// ------------------------------------------------------------------------------------------
// RequestAuthentication

fn validate_request_authentication(ra: &RequestAuthentication, report: &mut ValidationReport) {
    let spec = &ra.spec;
    validate_one_of_selector(
        spec.selector.is_some(),
        spec.target_ref.is_some(),
        spec.target_refs.is_some(),
        report,
    );
    validate_selector(spec.selector.as_ref(), report);
    validate_targets(spec.target_ref.as_ref(), spec.target_refs.as_ref(), report);
    let rules = spec.rules();
    if rules.len() > 4096 {
        report.error("spec.jwtRules", "Too many: must have at most 4096 items");
    }
    for (i, rule) in rules.iter().enumerate() {
        validate_jwt_rule(&format!("spec.jwtRules[{i}]"), rule, report);
    }
}

/// Headers a token's claims may not be written to (a Rampart refusal beyond Istio's checks):
/// the ones that frame or route the request (hop-by-hop, length, Host), the token's own
/// header, and the proxy's client-certificate header. A claim there would let whoever mints
/// tokens reshape requests at the app.
fn reserved_output_header(name: &str) -> Option<String> {
    const RESERVED: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "authorization",
        "x-forwarded-client-cert",
    ];
    RESERVED
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r))
        .then(|| {
            format!(
                "header {name} frames, routes or authenticates the request and cannot carry JWT output"
            )
        })
}

fn is_strict_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate_jwt_rule(path: &str, rule: &JwtRule, report: &mut ValidationReport) {
    for (i, aud) in rule.audiences.iter().enumerate() {
        if aud.is_empty() {
            report.error(
                format!("{path}.audiences[{i}]"),
                "audience must be non-empty string",
            );
        }
    }
    let issuer = rule.issuer.as_deref().unwrap_or("");
    let jwks_uri = rule.jwks_uri.as_deref().unwrap_or("");
    if rule.issuer.is_some() && issuer.is_empty() {
        report.error(
            format!("{path}.issuer"),
            "issuer in body should be at least 1 chars long",
        );
    }
    if issuer.is_empty() && jwks_uri.is_empty() {
        report.error(path, "issuer or jwksUri must be non-empty string");
    }
    if let Some(uri) = rule.jwks_uri.as_deref() {
        if uri.is_empty() {
            report.error(
                format!("{path}.jwksUri"),
                "jwksUri in body should be at least 1 chars long",
            );
        } else if uri.len() > 2048 {
            report.error(
                format!("{path}.jwksUri"),
                "Too long: may not be longer than 2048",
            );
        } else if let Err(e) = check_jwks_uri(uri) {
            report.error(format!("{path}.jwksUri"), e);
        }
    }
    if rule.jwks.is_some() && rule.jwks_uri.is_some() {
        report.error(path, "only one of jwks or jwksUri can be set");
    }
    if let Some(jwks) = rule.jwks.as_deref()
        && !jwks.is_empty()
    {
        match check_jwks(jwks) {
            Err(e) => report.error(format!("{path}.jwks"), format!("jwks parse error: {e}")),
            Ok(private) => {
                for index in private {
                    report.warn(
                        format!("{path}.jwks"),
                        format!("jwks key at index {index} contains private key material"),
                    );
                }
            }
        }
    }
    for (i, h) in rule.from_headers.iter().flatten().enumerate() {
        if h.name.as_deref().unwrap_or("").is_empty() {
            report.error(
                format!("{path}.fromHeaders[{i}].name"),
                "location header name must be non-empty string",
            );
        }
    }
    for (i, p) in rule.from_params.iter().flatten().enumerate() {
        if p.is_empty() {
            report.error(
                format!("{path}.fromParams[{i}]"),
                "location query must be non-empty string",
            );
        }
    }
    for (i, c) in rule.from_cookies.iter().flatten().enumerate() {
        if c.is_empty() {
            report.error(
                format!("{path}.fromCookies[{i}]"),
                "cookie name must be non-empty string",
            );
        }
    }
    if let Some(h) = rule
        .output_payload_to_header
        .as_deref()
        .filter(|h| !h.is_empty())
    {
        let p = format!("{path}.outputPayloadToHeader");
        if !is_strict_header_name(h) {
            report.error(p, format!("header name {h} is not a valid header name"));
        } else if let Some(why) = reserved_output_header(h) {
            report.error(p, why);
        }
    }
    let mut seen_headers: Vec<String> = Vec::new();
    for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
        let header = c.header.as_deref().unwrap_or("");
        let claim = c.claim.as_deref().unwrap_or("");
        let p = format!("{path}.outputClaimToHeaders[{i}]");
        if header.is_empty() || claim.is_empty() {
            report.error(
                p,
                "outputClaimToHeaders header and claim value must be non-empty string",
            );
            continue;
        }
        if !is_strict_header_name(header) {
            report.error(
                format!("{p}.header"),
                format!("header name {header} is not a valid header name"),
            );
        } else if let Some(why) = reserved_output_header(header) {
            report.error(format!("{p}.header"), why);
        }
        let lower = header.to_ascii_lowercase();
        if seen_headers.contains(&lower) {
            report.error(
                format!("{p}.header"),
                format!("header {header} is listed more than once in outputClaimToHeaders"),
            );
        }
        seen_headers.push(lower);
    }
    if let Some(timeout) = rule.timeout_text.as_deref() {
        match parse_duration(timeout) {
            Err(e) => report.error(
                format!("{path}.timeout"),
                format!("{e}: must be a valid duration greater than 1ms"),
            ),
            Ok(d) if d < std::time::Duration::from_millis(1) => report.error(
                format!("{path}.timeout"),
                "duration must be greater than 1ms",
            ),
            Ok(d) if d.subsec_nanos() % 1_000_000 != 0 => report.error(
                format!("{path}.timeout"),
                "only durations to ms precision are supported",
            ),
            Ok(_) => {}
        }
    }
    if rule.space_delimited_claims.len() > 64 {
        report.error(
            format!("{path}.spaceDelimitedClaims"),
            "Too many: must have at most 64 items",
        );
    }
    for (i, c) in rule.space_delimited_claims.iter().enumerate() {
        if c.is_empty() {
            report.error(
                format!("{path}.spaceDelimitedClaims[{i}]"),
                format!("spaceDelimitedClaims[{i}] must be non-empty string"),
            );
        }
    }
}

/// Checks a `jwksUri` as Istio's `ParseJwksURI` does (Go `net/url` parsing, then scheme
/// `http`/`https`, then a numeric port if one is given).
fn check_jwks_uri(uri: &str) -> Result<(), String> {
    if uri.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(format!(
            "parse {uri:?}: net/url: invalid control character in URL (url must have scheme http:// or https://)"
        ));
    }
    // Scheme, as Go's getScheme: letters, then letters/digits/+-. up to ':'.
    let mut scheme = "";
    let mut rest = uri;
    for (i, c) in uri.char_indices() {
        match c {
            'a'..='z' | 'A'..='Z' => {}
            '0'..='9' | '+' | '-' | '.' if i > 0 => {}
            ':' => {
                if i == 0 {
                    return Err(format!("parse {uri:?}: missing protocol scheme"));
                }
                scheme = &uri[..i];
                rest = &uri[i + 1..];
                break;
            }
            _ => break,
        }
    }
    let scheme_lower = scheme.to_ascii_lowercase();
    // Authority: host[:port], checked before the scheme as url.Parse does.
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find(['/', '?', '#']).unwrap_or(after.len());
        let authority = &after[..end];
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let port = if let Some(v6) = host_port.strip_prefix('[') {
            match v6.split_once(']') {
                Some((_, tail)) => tail.strip_prefix(':'),
                None => return Err(format!("parse {uri:?}: missing ']' in host")),
            }
        } else {
            host_port.rsplit_once(':').map(|(_, p)| p)
        };
        if let Some(port) = port
            && !port.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(format!(
                "parse {uri:?}: invalid port \":{port}\" after host"
            ));
        }
        let host = host_port.split(':').next().unwrap_or("");
        if host.bytes().any(|b| {
            b == b' '
                || b == b'"'
                || b == b'<'
                || b == b'>'
                || b == b'\\'
                || b == b'^'
                || b == b'`'
                || b == b'{'
                || b == b'|'
                || b == b'}'
        }) {
            return Err(format!("parse {uri:?}: invalid character in host name"));
        }
    }
    match scheme_lower.as_str() {
        "http" | "https" => Ok(()),
        _ => Err(format!(
            "URI scheme {scheme_lower:?} is not supported (url must have scheme http:// or https://)"
        )),
    }
}

/// Parses an inline JWKS (a key set `{"keys": [...]}` or a single key) the way Istio's JWK
/// library does, checking that each key has the members its `kty` needs. Returns the indexes of
/// keys that carry private or symmetric material (Istio warns about those).
fn check_jwks(text: &str) -> Result<Vec<usize>, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("failed to parse JSON: {e}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "expected a JSON object (a JWK or a JWK set)".to_string())?;
    let keys: Vec<&serde_json::Value> = match obj.get("keys") {
        Some(serde_json::Value::Array(keys)) => keys.iter().collect(),
        Some(_) => return Err("\"keys\" must be an array".into()),
        None => vec![&value],
    };
    let mut private = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let key = key
            .as_object()
            .ok_or_else(|| format!("key at index {i} is not a JSON object"))?;
        let kty = key
            .get("kty")
            .and_then(|k| k.as_str())
            .ok_or_else(|| format!("key at index {i}: missing \"kty\""))?;
        let needed: &[&str] = match kty {
            "RSA" => &["n", "e"],
            "EC" => &["crv", "x", "y"],
            "OKP" => &["crv", "x"],
            "oct" => &["k"],
            other => return Err(format!("key at index {i}: invalid key type {other:?}")),
        };
        for member in needed {
            match key.get(*member) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => {}
                _ => {
                    return Err(format!(
                        "key at index {i}: {kty} key is missing required member {member:?}"
                    ));
                }
            }
        }
        if kty == "oct" || key.contains_key("d") {
            private.push(i);
        }
    }
    Ok(private)
}

// ------------------------------------------------------------------------------------------
// AuthorizationPolicy

fn validate_authorization_policy(ap: &AuthorizationPolicy, report: &mut ValidationReport) {
    let spec = &ap.spec;
    validate_one_of_selector(
        spec.selector.is_some(),
        spec.target_ref.is_some(),
        spec.target_refs.is_some(),
        report,
    );
    validate_selector(spec.selector.as_ref(), report);
    validate_targets(spec.target_ref.as_ref(), spec.target_refs.as_ref(), report);

    let action = spec.action();
    let no_rules = spec.rules.as_ref().is_none_or(|r| r.is_empty());
    if action == Action::Custom {
        if no_rules {
            report.error(
                "spec.rules",
                "CUSTOM action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
            );
        } else if spec
            .provider
            .as_ref()
            .is_none_or(|p| p.name.as_deref().unwrap_or("").is_empty())
        {
            report.error("spec.provider.name", "`provider.name` must not be empty");
        }
        for (i, rule) in spec.rules().iter().enumerate() {
            for (j, from) in rule.from.iter().flatten().enumerate() {
                let Some(src) = &from.source else { continue };
                for (field, values) in src.fields() {
                    let identity = !matches!(
                        field,
                        "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks"
                    );
                    if identity && !values.is_empty() {
                        report.error(
                            format!("spec.rules[{i}].from[{j}].source.{field}"),
                            format!(
                                "From.{} is currently not supported with CUSTOM action",
                                go_field_name(field)
                            ),
                        );
                    }
                }
            }
            for (j, cond) in rule.when.iter().enumerate() {
                let key = cond.key();
                if matches!(
                    key,
                    "source.namespace"
                        | "source.serviceAccount"
                        | "source.principal"
                        | "source.trustDomain"
                ) || key.starts_with("request.auth.")
                {
                    report.error(
                        format!("spec.rules[{i}].when[{j}].key"),
                        format!("{key} is currently not supported with CUSTOM action"),
                    );
                }
            }
        }
    }
    if spec.provider.is_some() && action != Action::Custom {
        report.error(
            "spec.provider",
            format!("`provider` must not be with non CUSTOM action, found {action}"),
        );
    }
    if action == Action::Deny && no_rules {
        report.error(
            "spec.rules",
            "DENY action without `rules` is meaningless as it will never be triggered, add an empty rule `{}` if you want it be triggered for every request",
        );
    }

    let rules = spec.rules();
    if rules.len() > 512 {
        report.error("spec.rules", "Too many: must have at most 512 items");
    }
    for (i, rule) in rules.iter().enumerate() {
        let rp = format!("spec.rules[{i}]");
        let mut from_exists = false;
        let mut to_exists = false;
        let mut tcp_in_from = false;
        let mut tcp_in_to = false;
        if let Some(from) = &rule.from {
            if from.is_empty() {
                report.error(
                    format!("{rp}.from"),
                    format!("`from` must not be empty, found at rule {i}"),
                );
            }
            if from.len() > 512 {
                report.error(
                    format!("{rp}.from"),
                    "Too many: must have at most 512 items",
                );
            }
            for (j, f) in from.iter().enumerate() {
                let fp = format!("{rp}.from[{j}]");
                match &f.source {
                    None => report.error(
                        &fp,
                        format!("`from.source` must not be nil, found at rule {i}"),
                    ),
                    Some(src) => {
                        from_exists = true;
                        if validate_source(&format!("{fp}.source"), i, src, report) {
                            tcp_in_from = true;
                        }
                    }
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                report.error(
                    format!("{rp}.to"),
                    format!("`to` must not be empty, found at rule {i}"),
                );
            }
            for (j, t) in to.iter().enumerate() {
                let tp = format!("{rp}.to[{j}]");
                match &t.operation {
                    None => report.error(
                        &tp,
                        format!("`to.operation` must not be nil, found at rule {i}"),
                    ),
                    Some(op) => {
                        to_exists = true;
                        if validate_operation(&format!("{tp}.operation"), i, op, report) {
                            tcp_in_to = true;
                        }
                    }
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            validate_condition(&format!("{rp}.when[{j}]"), cond, report);
        }
        warn_forwarded_for_claims(&rp, action, rule, report);
        warn_never_matching(&rp, rule, report);
        if action == Action::Deny
            && ((from_exists && !to_exists && !tcp_in_from) || (to_exists && !tcp_in_to))
        {
            report.warn(
                rp,
                "configured AuthorizationPolicy will deny all traffic to TCP ports under its scope due to the use of only HTTP attributes in a DENY rule; it is recommended to explicitly specify the port",
            );
        }
    }
}

/// Rampart's own warning (Istio prints none): `remoteIpBlocks` and `remote.ip` match the
/// last `X-Forwarded-For` entry, which any HTTP client writes. An ALLOW on them admits
/// whoever claims a matching address, and a DENY's negated forms let a client out by
/// claiming an address in the list; a DENY on `remoteIpBlocks` itself only means something
/// behind a gateway that appends the address it saw (docs/AUTHZ.md).
fn warn_forwarded_for_claims(
    rp: &str,
    action: Action,
    rule: &crate::model::Rule,
    report: &mut ValidationReport,
) {
    let (positive, negative) = match action {
        Action::Allow => (true, true),
        Action::Deny => (false, true),
        _ => return,
    };
    let what = if action == Action::Allow {
        "this ALLOW admits whoever claims a matching address"
    } else {
        "a client escapes this DENY by claiming an address in the list"
    };
    let warn = |report: &mut ValidationReport, path: String| {
        report.warn(
            path,
            format!(
                "remote addresses are the last X-Forwarded-For entry, which any HTTP client \
                 writes: {what}; ipBlocks/source.ip is the connecting peer"
            ),
        );
    };
    for (j, f) in rule.from.iter().flatten().enumerate() {
        let Some(src) = &f.source else { continue };
        if positive && !src.remote_ip_blocks.is_empty() {
            warn(report, format!("{rp}.from[{j}].source.remoteIpBlocks"));
        }
        if negative && !src.not_remote_ip_blocks.is_empty() {
            warn(report, format!("{rp}.from[{j}].source.notRemoteIpBlocks"));
        }
    }
    for (j, c) in rule.when.iter().enumerate() {
        if c.key() == "remote.ip"
            && ((positive && !c.values.is_empty()) || (negative && !c.not_values.is_empty()))
        {
            warn(report, format!("{rp}.when[{j}]"));
        }
    }
}

/// The standard methods the proxy refuses (400) when spelled in another case (`get`), as
/// Envoy 1.40 does: a policy value so spelled never meets a request.
const STANDARD_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Rampart's own warnings (Istio accepts these values silently, docs/AUTHZ.md §3): values
/// written so that they can never match what the proxy compares them with, so the rule
/// allows nothing (ALLOW) or denies nothing (DENY). Accepted, as Istio accepts them.
fn warn_never_matching(rp: &str, rule: &crate::model::Rule, report: &mut ValidationReport) {
    for (j, f) in rule.from.iter().flatten().enumerate() {
        let Some(src) = &f.source else { continue };
        let sp = format!("{rp}.from[{j}].source");
        for (field, values) in [
            ("principals", &src.principals),
            ("notPrincipals", &src.not_principals),
        ] {
            for (k, v) in values.iter().enumerate() {
                if let Some(why) = spiffe_scheme_principal(v) {
                    report.warn(format!("{sp}.{field}[{k}]"), why);
                }
            }
        }
        for (field, values) in [
            ("requestPrincipals", &src.request_principals),
            ("notRequestPrincipals", &src.not_request_principals),
        ] {
            for (k, v) in values.iter().enumerate() {
                if let Some(why) = request_principal_without_slash(v) {
                    report.warn(format!("{sp}.{field}[{k}]"), why);
                }
            }
        }
    }
    for (j, t) in rule.to.iter().flatten().enumerate() {
        let Some(op) = &t.operation else { continue };
        let op_path = format!("{rp}.to[{j}].operation");
        for (field, values) in [("methods", &op.methods), ("notMethods", &op.not_methods)] {
            for (k, v) in values.iter().enumerate() {
                if let Some(why) = method_case(v) {
                    report.warn(format!("{op_path}.{field}[{k}]"), why);
                }
            }
        }
        for (field, values) in [("paths", &op.paths), ("notPaths", &op.not_paths)] {
            for (k, v) in values.iter().enumerate() {
                if let Some(why) = inner_star_path(v) {
                    report.warn(format!("{op_path}.{field}[{k}]"), why);
                }
            }
        }
    }
    for (j, c) in rule.when.iter().enumerate() {
        let check: fn(&str) -> Option<String> = match c.key() {
            "source.principal" => spiffe_scheme_principal,
            "request.auth.principal" => request_principal_without_slash,
            _ => continue,
        };
        for (field, values) in [("values", &c.values), ("notValues", &c.not_values)] {
            for (k, v) in values.iter().enumerate() {
                if let Some(why) = check(v) {
                    report.warn(format!("{rp}.when[{j}].{field}[{k}]"), why);
                }
            }
        }
    }
}

/// `spiffe://td/ns/a/sa/b` as a principal: Istio adds `spiffe://` itself, so the value is
/// compared with `spiffe://spiffe://...` and never matches.
fn spiffe_scheme_principal(v: &str) -> Option<String> {
    let rest = v.strip_prefix("spiffe://")?;
    Some(format!(
        "{v:?} never matches: principals are written without \"spiffe://\" (Istio adds it, so \
         this value is compared as \"spiffe://{v}\"); write {rest:?}"
    ))
}

/// A request principal is `<iss>/<sub>`: a value without `/` (and without `*`) names an
/// issuer with an empty `sub`, which no real token has.
fn request_principal_without_slash(v: &str) -> Option<String> {
    if v.contains('/') || v.contains('*') {
        return None;
    }
    Some(format!(
        "{v:?} matches no token with a subject: request principals are \"<iss>/<sub>\" (e.g. \
         \"{v}/<sub>\", or \"{v}/*\" for any subject of that issuer); without '/' the value \
         is an issuer with an empty sub"
    ))
}

/// Methods compare case-sensitively, as Envoy; the proxy refuses lowercase standard
/// methods with 400 before any policy, so `get` in a policy meets no request.
fn method_case(v: &str) -> Option<String> {
    if !v.bytes().any(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let upper = v.to_ascii_uppercase();
    if STANDARD_METHODS.contains(&upper.trim_matches('*')) {
        Some(format!(
            "{v:?} never matches: methods compare case-sensitively and the proxy answers 400 \
             to a standard method not in upper case, before any policy; write {upper:?}"
        ))
    } else {
        Some(format!(
            "{v:?} matches only a request whose method is spelled exactly so (methods compare \
             case-sensitively); did you mean {upper:?}?"
        ))
    }
}

/// A `*` inside a path (`/api/*/items`) is a literal character: only a leading or trailing
/// `*` is a wildcard (Istio accepts the value and matches it exactly).
fn inner_star_path(v: &str) -> Option<String> {
    if is_path_template(v) {
        return None;
    }
    // As Istio (and `StrMatch::istio`): a leading '*' makes a suffix match of the rest, else
    // a trailing one a prefix match; never both, so in "*/admin/*" the last '*' is literal.
    let inner = match v.strip_prefix('*') {
        Some(rest) => rest,
        None => v.strip_suffix('*').unwrap_or(v),
    };
    if !inner.contains('*') {
        return None;
    }
    if v.starts_with('*') && v.ends_with('*') && v.len() > 1 {
        return Some(format!(
            "{v:?}: '*' matches as a prefix or as a suffix, not both: this matches only paths ending in the literal {inner:?}; no single value means \"contains\": list the paths, or use a template such as \"/{{*}}/admin/{{**}}\""
        ));
    }
    let template = v.replace('*', "{*}");
    let hint = if check_path_templates("paths", std::slice::from_ref(&template)).is_ok() {
        format!("write {template:?} for any one segment")
    } else {
        "for any one segment write a {*} template (\"/api/{*}/items\")".to_string()
    };
    Some(format!(
        "{v:?}: a '*' inside a path is a literal character, not a wildcard ('*' matches only \
         as a prefix or suffix); {hint}"
    ))
}

/// Istio's Go field name for a YAML field (`notIpBlocks` -> `NotIpBlocks`).
fn go_field_name(field: &str) -> String {
    let mut chars = field.chars();
    match chars.next() {
        Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
        None => String::new(),
    }
}

/// Validates a Source; returns true when it holds an L4 (TCP-usable) field.
fn validate_source(path: &str, rule: usize, src: &Source, report: &mut ValidationReport) -> bool {
    let identity_count = src.principals.len()
        + src.not_principals.len()
        + src.namespaces.len()
        + src.not_namespaces.len();
    if identity_count > 0
        && !(src.service_accounts.is_empty() && src.not_service_accounts.is_empty())
    {
        report.error(
            path,
            format!(
                "cannot set serviceAccounts with namespaces or principals, found at rule {rule}"
            ),
        );
    }
    if src.is_empty() {
        report.error(
            path,
            format!("`from.source` must not be empty, found at rule {rule}"),
        );
    }
    for (field, values) in src.fields() {
        let fp = format!("{path}.{field}");
        let go = go_field_name(field);
        match field {
            "serviceAccounts" | "notServiceAccounts" => {
                if let Err(e) = check_service_accounts(&go, values) {
                    report.error(fp, e);
                }
            }
            "trustDomains" | "notTrustDomains" => {
                if let Err(e) = check_trust_domains(&go, values) {
                    report.error(fp, e);
                }
            }
            _ => {
                if let Err(e) = check_empty_values(&go, values) {
                    report.error(&fp, e);
                }
                if matches!(
                    field,
                    "ipBlocks" | "notIpBlocks" | "remoteIpBlocks" | "notRemoteIpBlocks"
                ) {
                    for e in check_ips(values) {
                        report.error(&fp, e);
                    }
                }
            }
        }
    }
    // Every Source field but requestPrincipals is usable on TCP.
    src.fields()
        .iter()
        .any(|(f, v)| !matches!(*f, "requestPrincipals" | "notRequestPrincipals") && !v.is_empty())
}

/// Validates an Operation; returns true when it holds `ports`/`notPorts`.
fn validate_operation(
    path: &str,
    rule: usize,
    op: &Operation,
    report: &mut ValidationReport,
) -> bool {
    if op.is_empty() {
        report.error(
            path,
            format!("`to.operation` must not be empty, found at rule {rule}"),
        );
    }
    for (field, values) in op.fields() {
        let fp = format!("{path}.{field}");
        let go = go_field_name(field);
        if let Err(e) = check_empty_values(&go, values) {
            report.error(&fp, e);
        }
        match field {
            "ports" | "notPorts" => {
                for e in check_ports(values) {
                    report.error(&fp, e);
                }
            }
            "paths" | "notPaths" => {
                if let Err(e) = check_path_templates(&go, values) {
                    report.error(&fp, e);
                }
            }
            _ => {}
        }
    }
    !op.ports.is_empty() || !op.not_ports.is_empty()
}

/// Why a `when` key `experimental.envoy.filters.*` is refused (a deliberate difference from
/// Istio, which accepts it): the condition reads Envoy dynamic metadata, which Rampart never
/// has, so it could never match. A DENY using it would silently never deny (or, with
/// `notValues`, always deny) and an ALLOW using it would never allow.
pub const ENVOY_METADATA_UNSUPPORTED: &str =
    "experimental.envoy.filters.* needs Envoy dynamic metadata, which Rampart does not have";

fn validate_condition(path: &str, cond: &Condition, report: &mut ValidationReport) {
    let key = cond.key();
    if key.is_empty() {
        report.error(
            format!("{path}.key"),
            "`key` must not be empty (Required value)",
        );
        return;
    }
    if key.starts_with("experimental.envoy.filters.") {
        report.error(format!("{path}.key"), ENVOY_METADATA_UNSUPPORTED);
        return;
    }
    // The key alone first (no values to check): a bad key is one problem, at `.key`, not
    // one per value list.
    if let Err(e) = validate_attribute(key, &[]) {
        let hint = match similar_when_key(key) {
            Some(k) => format!(" (did you mean {k}?)"),
            None => String::new(),
        };
        report.error(format!("{path}.key"), format!("{e}{hint}"));
        return;
    }
    if cond.values.is_empty() && cond.not_values.is_empty() {
        report.error(
            path,
            format!("at least one of `values` or `notValues` must be set for key {key}"),
        );
        return;
    }
    for (field, what, values) in [
        ("values", "value", &cond.values),
        ("notValues", "notValue", &cond.not_values),
    ] {
        if values.is_empty() {
            continue;
        }
        if let Err(e) = validate_attribute(key, values) {
            report.error(
                format!("{path}.{field}"),
                format!("invalid `{what}` for `key` {key}: {e}"),
            );
        }
    }
}

/// The `when` keys Istio knows, map keys (`a[b]`) by their `a`.
const WHEN_KEYS: [&str; 14] = [
    "request.headers[]",
    "request.auth.claims[]",
    "source.ip",
    "remote.ip",
    "destination.ip",
    "destination.port",
    "source.namespace",
    "source.principal",
    "source.serviceAccount",
    "source.trustDomain",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
];

/// A known `when` key close to `key` (a typo, another case, a missing `s`), written with
/// `key`'s own `[...]` part: `request.header[x-user]` -> `request.headers[x-user]`.
fn similar_when_key(key: &str) -> Option<String> {
    let (head, index) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    // Known keys are short: a long unknown one (policy is untrusted input in Kubernetes
    // mode) gets no hint rather than a quadratic comparison.
    if head.len() > 64 {
        return None;
    }
    let head_lc = head.to_ascii_lowercase();
    WHEN_KEYS
        .iter()
        .filter_map(|known| {
            let (k, is_map) = match known.strip_suffix("[]") {
                Some(k) => (k, true),
                None => (*known, false),
            };
            // A map key needs its `[...]`; a plain key has none.
            if is_map == index.is_empty() || head.len().abs_diff(k.len()) > 2 {
                return None;
            }
            let d = edit_distance(&head_lc, &k.to_ascii_lowercase());
            (d <= 2 && head != k).then(|| (d, format!("{k}{index}")))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance over bytes (keys are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Checks a `when` key and its values as Istio's `ValidateAttribute` does.
fn validate_attribute(key: &str, values: &[String]) -> Result<(), String> {
    check_empty_values(key, values)?;
    let ip_errors = |values: &[String]| {
        let errs = check_ips(values);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    };
    if key.starts_with("request.headers") {
        return validate_map_key(key);
    }
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => ip_errors(values),
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(()),
        "source.serviceAccount" => check_service_accounts(key, values),
        "source.trustDomain" => check_trust_domains(key, values),
        "destination.port" => {
            let errs = check_ports(values);
            if errs.is_empty() {
                Ok(())
            } else {
                Err(errs.join("; "))
            }
        }
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ if key.starts_with("request.auth.claims") => validate_map_key(key),
        _ if key.starts_with("experimental.envoy.filters.") => validate_map_key(key),
        _ if key.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        _ => Err(format!("unknown attribute: {key}")),
    }
}

/// `a[b]` with non-empty `a` and `b`, as Istio's `validateMapKey`.
fn validate_map_key(key: &str) -> Result<(), String> {
    match key.find('[') {
        Some(open) if key.ends_with(']') && open > 0 && open < key.len() - 2 => Ok(()),
        _ => Err(format!("bad key ({key}): should have format a[b]")),
    }
}

fn check_empty_values(key: &str, values: &[String]) -> Result<(), String> {
    if values.iter().any(|v| v.is_empty()) {
        Err(format!("empty value not allowed, found in {key}"))
    } else {
        Ok(())
    }
}

fn check_service_accounts(key: &str, values: &[String]) -> Result<(), String> {
    const EXPECTED: &str = "expected format 'serviceAccount' or 'namespace/serviceAccount'";
    if values.len() > 16 {
        return Err(format!(
            "may not have more than 16 values, found {} in {key}",
            values.len()
        ));
    }
    for value in values {
        if value.is_empty() {
            return Err(format!("empty value not allowed, found in {key}"));
        }
        if value.contains('*') {
            return Err(format!("wildcard not allowed, found in {key}"));
        }
        let slashes = value.matches('/').count();
        if slashes > 1 {
            return Err(format!("{EXPECTED}, found {value:?} in {key}"));
        }
        if value.len() > 320 {
            return Err(format!(
                "value cannot exceed 320 characters, found {value:?} in {key}"
            ));
        }
        if let Some((ns, sa)) = value.split_once('/') {
            if ns.is_empty() {
                return Err(format!(
                    "{EXPECTED}, found empty namespace {value:?} in {key}"
                ));
            }
            if sa.is_empty() {
                return Err(format!(
                    "{EXPECTED}, found empty serviceAccount {value:?} in {key}"
                ));
            }
        }
    }
    Ok(())
}

fn check_trust_domains(key: &str, values: &[String]) -> Result<(), String> {
    for value in values {
        if value.is_empty() {
            return Err(format!("empty value not allowed, found in {key}"));
        }
        if value.contains('/') {
            return Err(format!(
                "trust domain must not contain '/', found in {key}: {value:?}"
            ));
        }
        let stars = value.matches('*').count();
        if stars > 1 {
            return Err(format!(
                "at most one wildcard is allowed, found in {key}: {value:?}"
            ));
        }
        if stars == 1 && !(value.starts_with('*') || value.ends_with('*')) {
            return Err(format!(
                "wildcard is only allowed at the start or end, found in {key}: {value:?}"
            ));
        }
    }
    Ok(())
}

/// IPs and CIDRs as Go's `netip.ParseAddr` / `netip.ParsePrefix` accept them.
fn check_ips(values: &[String]) -> Vec<String> {
    let mut errs = Vec::new();
    for v in values {
        if let Some((addr, bits)) = v.split_once('/') {
            let ok = addr.parse::<IpAddr>().ok().and_then(|ip| {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                let canonical_bits = !bits.is_empty()
                    && bits.bytes().all(|b| b.is_ascii_digit())
                    && (bits == "0" || !bits.starts_with('0'));
                bits.parse::<u8>()
                    .ok()
                    .filter(|b| canonical_bits && *b <= max)
            });
            if ok.is_none() || addr.contains('%') {
                errs.push(format!(
                    "bad CIDR range ({v}): netip.ParsePrefix({v:?}): invalid prefix"
                ));
            }
        } else if v.parse::<IpAddr>().is_err() {
            errs.push(format!("bad IP address ({v})"));
        }
    }
    errs
}

/// Ports as Istio's `ValidatePorts`: decimal, 0..65535.
fn check_ports(values: &[String]) -> Vec<String> {
    let mut errs = Vec::new();
    for p in values {
        let parsed = if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            p.parse::<u64>().ok()
        } else {
            None
        };
        match parsed {
            Some(n) if n <= 65535 => {}
            Some(_) => errs.push(format!("bad port ({p}): port must be in range 0..65535")),
            None => errs.push(format!(
                "bad port ({p}): strconv.ParseUint: parsing {p:?}: invalid syntax"
            )),
        }
    }
    errs
}

/// Characters allowed in a literal segment of a templated path (RFC 3986 pchar).
fn is_valid_literal(segment: &str) -> bool {
    !segment.is_empty()
        && segment.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'+'
                        | b','
                        | b';'
                        | b':'
                        | b'@'
                        | b'='
                )
        })
}

/// True when a path value is an Envoy URI template (contains `{*}` or `{**}`).
pub fn is_path_template(path: &str) -> bool {
    path.contains("{*}") || path.contains("{**}")
}

/// Istio's `CheckValidPathTemplate`, applied to every path value.
fn check_path_templates(key: &str, paths: &[String]) -> Result<(), String> {
    for original in paths {
        let template = is_path_template(original);
        let trimmed = original.trim_matches('/');
        let mut found_any = false;
        for segment in trimmed.split('/') {
            match segment {
                "{*}" if !found_any => continue,
                "{**}" if !found_any => {
                    found_any = true;
                    continue;
                }
                "{*}" | "{**}" => {
                    return Err(format!(
                        "invalid or unsupported path {trimmed}, found in {key}. {{**}} is not the last operator"
                    ));
                }
                _ => {}
            }
            if segment.contains(['{', '}']) {
                return Err(format!(
                    "invalid or unsupported path {trimmed}, found in {key}. Contains '{{' or '}}' beyond a supported path template"
                ));
            }
            if template && !is_valid_literal(segment) {
                return Err(format!(
                    "invalid or unsupported path {trimmed}, found in {key}. Contains segment {segment} with invalid string literal"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn path_templates_follow_istio() {
        for ok in [
            "/exact",
            "/prefix/*",
            "*/suffix",
            "*",
            "/a*b",
            "/path/template/{*}",
            "/{**}/path/template",
            "/foo/{*}/bar/{**}",
            "/store/{**}/cart",
        ] {
            assert_eq!(check_path_templates("Paths", &s(&[ok])), Ok(()), "{ok}");
        }
        let cases = [
            ("/{**}/foo/{*}", "{**} is not the last operator"),
            ("/{**}/{**}", "{**} is not the last operator"),
            ("/foo/{buzz}/bar", "beyond a supported path template"),
            ("/foo/{buzz=*}/bar", "beyond a supported path template"),
            ("/foo/{}/bar", "beyond a supported path template"),
            ("/{*}.txt", "beyond a supported path template"),
            ("/{**}bar", "beyond a supported path template"),
            ("/foo/{", "beyond a supported path template"),
            (
                "/foo/{*}/bar/*",
                "Contains segment * with invalid string literal",
            ),
            (
                "/{*}/foo/?abc",
                "Contains segment ?abc with invalid string literal",
            ),
            ("/api/{*}/user profile", "with invalid string literal"),
        ];
        for (path, want) in cases {
            let err = check_path_templates("Paths", &s(&[path])).unwrap_err();
            assert!(err.contains(want), "{path}: {err}");
        }
    }

    #[test]
    fn ips_follow_go_netip() {
        assert!(
            check_ips(&s(&[
                "1.2.3.4",
                "5.6.0.0/16",
                "::1",
                "2001:db8::/32",
                "0.0.0.0/0"
            ]))
            .is_empty()
        );
        for bad in [
            "ip1",
            "10.0.0.0/33",
            "1.2.3.4/",
            "1.2.3.4/08",
            "1.2.3",
            "::1/129",
            "a.b.c.d",
        ] {
            assert_eq!(check_ips(&s(&[bad])).len(), 1, "{bad}");
        }
    }

    #[test]
    fn ports_follow_istio() {
        assert!(check_ports(&s(&["0", "80", "65535"])).is_empty());
        for bad in ["65536", "port1", "-1", "", " 80", "+80"] {
            assert_eq!(check_ports(&s(&[bad])).len(), 1, "{bad:?}");
        }
    }

    #[test]
    fn when_keys_follow_istio() {
        let v = s(&["x"]);
        for ok in [
            "request.headers[x-foo]",
            "source.namespace",
            "source.principal",
            "request.auth.principal",
            "request.auth.audiences",
            "request.auth.presenter",
            "request.auth.claims[iss]",
            "request.auth.claims[a][b]",
            "connection.sni",
            "experimental.envoy.filters.a.b[c]",
            "source.serviceAccount",
            "source.trustDomain",
        ] {
            assert_eq!(validate_attribute(ok, &v), Ok(()), "{ok}");
        }
        for bad in [
            "request.headers[]",
            "request.headers",
            "request.auth.claims[]",
            "experimental.envoy.filters.a.b.x",
            "key1",
            "source.user",
            "destination.labels[app]",
            "destination.namespace",
            "destination.name",
            "destination.user",
        ] {
            assert!(validate_attribute(bad, &v).is_err(), "{bad}");
        }
        assert!(validate_attribute("source.ip", &s(&["a.b.c.d"])).is_err());
        assert!(validate_attribute("destination.port", &s(&["x"])).is_err());
    }

    #[test]
    fn jwks_uris_follow_go_url() {
        for ok in [
            "https://foo.com/jwks",
            "http://127.0.0.1:8080/x",
            "HTTPS://x",
            "https://[::1]:443/",
        ] {
            assert_eq!(check_jwks_uri(ok), Ok(()), "{ok}");
        }
        for (bad, want) in [
            ("foo.com", "URI scheme \"\" is not supported"),
            ("tcp://foo.com", "URI scheme \"tcp\" is not supported"),
            (
                "https://foo.com:not-a-number",
                "invalid port \":not-a-number\" after host",
            ),
            ("hTPp\\\u{8}lah", "invalid control character"),
            ("://x", "missing protocol scheme"),
        ] {
            let err = check_jwks_uri(bad).unwrap_err();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn jwks_parsing_and_private_material() {
        assert_eq!(check_jwks(r#"{"keys":[]}"#), Ok(vec![]));
        assert_eq!(
            check_jwks(
                r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"},{"kty":"EC","crv":"P-256","x":"a","y":"b","d":"c"}]}"#
            ),
            Ok(vec![1])
        );
        assert!(check_jwks("foo").is_err());
        assert!(check_jwks(r#"{"keys":[{"kty":"RSA","n":"AQAB"}]}"#).is_err());
        assert!(check_jwks(r#"{"keys":[{"kty":"XYZ"}]}"#).is_err());
    }

    #[test]
    fn go_bools() {
        for t in ["true", "1", "T", "TRUE", "True", "t"] {
            assert_eq!(parse_go_bool(t), Some(true));
        }
        for f in ["false", "0", "F", "FALSE", "False", "f"] {
            assert_eq!(parse_go_bool(f), Some(false));
        }
        for x in ["foo", "yes", "", "tRUE"] {
            assert_eq!(parse_go_bool(x), None);
        }
    }
}
