//! Loading `security.istio.io` YAML: multi-document files and folders, strict typing,
//! Istio's validation, one problem per refused document field.
//!
//! A file is split into YAML documents first (on `---` / `...` marker lines, as the YAML spec
//! defines them), so a document that does not even parse is refused alone and the others still
//! load. Each document is parsed into a generic tree, dispatched on `apiVersion`/`kind`, read
//! into the typed model (unknown fields and wrong types are errors with the field path), then
//! validated as Istio's webhook and CRD schema would.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Problem};
use crate::model::{
    ApiVersion, AuthorizationPolicy, AuthorizationPolicySpec, IGNORED_METADATA_FIELDS, Kind,
    Object, ObjectMeta, Origin, PeerAuthentication, PeerAuthenticationSpec, RequestAuthentication,
    RequestAuthenticationSpec, Resource,
};

/// The Kubernetes API group of the kinds this crate loads.
pub const SECURITY_GROUP: &str = "security.istio.io";

/// A document that was not a `security.istio.io` object (a Deployment, a Namespace ...):
/// skipped, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// Where it was found.
    pub origin: Origin,
    /// Its `apiVersion` as written.
    pub api_version: String,
    /// Its `kind` as written.
    pub kind: String,
    /// Its `metadata.name`, if it has one.
    pub name: Option<String>,
}

/// Everything one load produced: the valid resources, the problems of the refused documents,
/// the documents skipped as other kinds, and warnings Istio would also print (accepted input).
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// Valid resources, in file order (files in sorted path order).
    pub resources: Vec<Resource>,
    /// Problems; a document with any problem is not in `resources`.
    pub problems: Vec<Problem>,
    /// Documents of other API groups, skipped.
    pub skipped: Vec<Skipped>,
    /// Warnings about accepted resources (e.g. a selector without labels).
    pub warnings: Vec<Problem>,
    /// How many files (or strings given to [`load_str`]) were read.
    pub files: usize,
}

impl LoadResult {
    /// The loaded PeerAuthentications, in load order.
    pub fn peer_authentications(&self) -> impl Iterator<Item = &PeerAuthentication> {
        self.resources
            .iter()
            .filter_map(Resource::as_peer_authentication)
    }

    /// The loaded RequestAuthentications, in load order.
    pub fn request_authentications(&self) -> impl Iterator<Item = &RequestAuthentication> {
        self.resources
            .iter()
            .filter_map(Resource::as_request_authentication)
    }

    /// The loaded AuthorizationPolicies, in load order.
    pub fn authorization_policies(&self) -> impl Iterator<Item = &AuthorizationPolicy> {
        self.resources
            .iter()
            .filter_map(Resource::as_authorization_policy)
    }

    /// True when nothing was refused.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Adds everything from `other` (keeps order), refusing duplicates of an already loaded
    /// kind/namespace/name.
    pub fn merge(&mut self, other: LoadResult) {
        for resource in other.resources {
            self.push_resource(resource);
        }
        self.problems.extend(other.problems);
        self.skipped.extend(other.skipped);
        self.warnings.extend(other.warnings);
        self.files += other.files;
    }

    /// Turns the result into the resources, or [`Error::InvalidConfig`] listing every problem.
    pub fn into_resources(self) -> Result<Vec<Resource>, Error> {
        if self.problems.is_empty() {
            Ok(self.resources)
        } else {
            Err(Error::InvalidConfig(self.problems))
        }
    }

    fn push_resource(&mut self, resource: Resource) {
        let dup = self.resources.iter().find(|r| {
            r.kind() == resource.kind()
                && r.namespace() == resource.namespace()
                && r.name() == resource.name()
        });
        if let Some(first) = dup {
            let origin = resource.origin();
            self.problems.push(Problem {
                file: origin.file.clone(),
                doc_index: origin.doc_index,
                field_path: "metadata.name".into(),
                reason: format!(
                    "duplicate {} {}/{}: already defined at {}",
                    resource.kind(),
                    resource.namespace(),
                    resource.name(),
                    first.origin()
                ),
            });
        } else {
            self.resources.push(resource);
        }
    }
}

/// Loads every document of `text`; `source_name` is used as the file name in origins and
/// problems. Never fails as a whole: refused documents are listed in
/// [`LoadResult::problems`].
pub fn load_str(source_name: &str, text: &str) -> LoadResult {
    let mut result = LoadResult {
        files: 1,
        ..LoadResult::default()
    };
    for doc in split_documents(text) {
        load_document(source_name, &doc, &mut result);
    }
    result
}

/// Loads a file, or every `.yaml`/`.yml` file under a folder (recursively, in sorted path
/// order; entries whose name starts with `.` are skipped, which also keeps Kubernetes
/// ConfigMap mounts from being read twice). A file named explicitly is read whatever its
/// extension. Unreadable paths are reported as problems with `doc_index` 0.
pub fn load_path(path: &Path) -> LoadResult {
    let mut result = LoadResult::default();
    let mut files = Vec::new();
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {
            if let Err(problem) = collect_yaml_files(path, 0, &mut files) {
                result.problems.push(problem);
            }
        }
        Ok(_) => files.push(path.to_path_buf()),
        Err(e) => result.problems.push(io_problem(path, &e)),
    }
    for file in files {
        match std::fs::read(&file) {
            Ok(bytes) => {
                let name = file.display().to_string();
                match String::from_utf8(bytes) {
                    Ok(text) => result.merge(load_str(&name, &text)),
                    Err(_) => result.problems.push(Problem {
                        file: name,
                        doc_index: 0,
                        field_path: String::new(),
                        reason: "file is not valid UTF-8".into(),
                    }),
                }
            }
            Err(e) => result.problems.push(io_problem(&file, &e)),
        }
    }
    result
}

/// Loads several files or folders into one result (duplicates across them are refused).
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> LoadResult {
    let mut result = LoadResult::default();
    for path in paths {
        result.merge(load_path(path.as_ref()));
    }
    result
}

const MAX_DIR_DEPTH: usize = 32;

fn collect_yaml_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), Problem> {
    if depth > MAX_DIR_DEPTH {
        return Err(Problem {
            file: dir.display().to_string(),
            doc_index: 0,
            field_path: String::new(),
            reason: format!("folders nested deeper than {MAX_DIR_DEPTH} levels (symlink loop?)"),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io_problem(dir, &e))?;
    let mut paths: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_problem(dir, &e))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        paths.push(entry.path());
    }
    paths.sort();
    for path in paths {
        let meta = std::fs::metadata(&path).map_err(|e| io_problem(&path, &e))?;
        if meta.is_dir() {
            collect_yaml_files(&path, depth + 1, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"))
        {
            out.push(path);
        }
    }
    Ok(())
}

fn io_problem(path: &Path, e: &std::io::Error) -> Problem {
    Problem {
        file: path.display().to_string(),
        doc_index: 0,
        field_path: String::new(),
        reason: format!("cannot read: {e}"),
    }
}

/// One YAML document cut out of a stream.
#[derive(Debug)]
struct Chunk<'a> {
    /// 1-based document index.
    index: usize,
    /// 1-based line in the file where the chunk's text starts.
    first_line: usize,
    text: &'a str,
    /// False for a document with no content (only markers, comments, blank lines).
    has_content: bool,
}

fn is_marker(line: &str, marker: &str) -> bool {
    line.strip_prefix(marker)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']))
}

fn line_has_content(line: &str) -> bool {
    let mut l = line.trim_start_matches('\u{feff}');
    for marker in ["---", "..."] {
        if is_marker(l, marker) {
            l = &l[3..];
        }
    }
    let t = l.trim();
    !(t.is_empty() || t.starts_with('#') || t.starts_with('%'))
}

/// Splits a YAML stream at document markers (`---` and `...` at the start of a line, which
/// the YAML spec forbids inside any scalar). A leading part without content (comments,
/// directives) is not a document of its own; it is kept with the next one.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    struct Span {
        start: usize,
        end: usize,
        first_line: usize,
        explicit: bool,
    }
    let mut spans: Vec<Span> = Vec::new();
    let mut cur = Span {
        start: 0,
        end: 0,
        first_line: 1,
        explicit: false,
    };
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let line_no = i + 1;
        let bare = line.trim_start_matches('\u{feff}');
        if is_marker(bare, "---") {
            let has_content = text[cur.start..offset].lines().any(line_has_content);
            if cur.explicit || has_content {
                cur.end = offset;
                spans.push(cur);
                cur = Span {
                    start: offset,
                    end: offset,
                    first_line: line_no,
                    explicit: true,
                };
            } else {
                // Preamble (comments, directives): belongs to this document.
                cur.explicit = true;
            }
        } else if is_marker(bare, "...") {
            cur.end = offset + line.len();
            spans.push(cur);
            cur = Span {
                start: offset + line.len(),
                end: offset + line.len(),
                first_line: line_no + 1,
                explicit: false,
            };
        }
        offset += line.len();
    }
    cur.end = text.len();
    spans.push(cur);

    let mut chunks = Vec::new();
    let mut index = 0;
    for span in spans {
        let body = &text[span.start..span.end];
        let has_content = body.lines().any(line_has_content);
        if !span.explicit && !has_content {
            continue;
        }
        index += 1;
        chunks.push(Chunk {
            index,
            first_line: span.first_line,
            text: body,
            has_content,
        });
    }
    chunks
}

fn load_document(file: &str, doc: &Chunk<'_>, result: &mut LoadResult) {
    if !doc.has_content {
        return;
    }
    let problem = |field_path: &str, reason: String| Problem {
        file: file.to_string(),
        doc_index: doc.index,
        field_path: field_path.to_string(),
        reason,
    };
    let value: serde_json::Value =
        match serde_saphyr::from_str_with_options::<Tree>(doc.text, parser_options()) {
            Ok(v) => v.0,
            Err(e) => {
                result
                    .problems
                    .push(problem("", yaml_error_reason(&e, doc.first_line)));
                return;
            }
        };
    let mut map = match value {
        serde_json::Value::Null => return,
        serde_json::Value::Object(map) => map,
        other => {
            result.problems.push(problem(
                "",
                format!(
                    "document is a {}, not a Kubernetes object (mapping)",
                    json_type(&other)
                ),
            ));
            return;
        }
    };
    let api_version = match map.get("apiVersion") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            result.problems.push(problem(
                "apiVersion",
                format!("must be a string, found {}", json_type(other)),
            ));
            return;
        }
        None => {
            result
                .problems
                .push(problem("apiVersion", "required field is missing".into()));
            return;
        }
    };
    let kind = match map.get("kind") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => {
            result.problems.push(problem(
                "kind",
                format!("must be a string, found {}", json_type(other)),
            ));
            return;
        }
        None => {
            result
                .problems
                .push(problem("kind", "required field is missing".into()));
            return;
        }
    };
    let origin = Origin {
        file: file.to_string(),
        doc_index: doc.index,
    };
    let group = api_version
        .split_once('/')
        .map_or(api_version.as_str(), |(g, _)| g);
    if group != SECURITY_GROUP && Kind::parse(&kind).is_some() && group.contains("istio") {
        // Fail closed on a mistyped group: skipping a DENY policy silently would open access.
        result.problems.push(problem(
            "apiVersion",
            format!(
                "{kind} belongs to API group {SECURITY_GROUP:?}, found apiVersion {api_version:?}"
            ),
        ));
        return;
    }
    if group != SECURITY_GROUP {
        let name = map
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .map(str::to_string);
        result.skipped.push(Skipped {
            origin,
            api_version,
            kind,
            name,
        });
        return;
    }
    let Some(version) = ApiVersion::parse(&api_version) else {
        result.problems.push(problem(
            "apiVersion",
            format!(
                "unsupported version {api_version:?}: supported are \"security.istio.io/v1\" and \"security.istio.io/v1beta1\""
            ),
        ));
        return;
    };
    let Some(kind_enum) = Kind::parse(&kind) else {
        result.problems.push(problem(
            "kind",
            format!(
                "unsupported kind {kind:?} in {api_version}: supported are PeerAuthentication, RequestAuthentication, AuthorizationPolicy"
            ),
        ));
        return;
    };
    // Standard metadata fields of exported objects are accepted and ignored.
    if let Some(serde_json::Value::Object(meta)) = map.get_mut("metadata") {
        for field in IGNORED_METADATA_FIELDS {
            meta.remove(*field);
        }
    }
    let value = serde_json::Value::Object(map);
    let resource = match kind_enum {
        Kind::PeerAuthentication => typed::<PeerAuthenticationSpec>(&value, version, &origin)
            .map(Resource::PeerAuthentication),
        Kind::RequestAuthentication => typed::<RequestAuthenticationSpec>(&value, version, &origin)
            .map(Resource::RequestAuthentication),
        Kind::AuthorizationPolicy => typed::<AuthorizationPolicySpec>(&value, version, &origin)
            .map(Resource::AuthorizationPolicy),
    };
    let resource = match resource {
        Ok(r) => r,
        Err((path, reason)) => {
            result.problems.push(problem(&path, reason));
            return;
        }
    };
    let report = crate::validate::validate(&resource);
    result
        .warnings
        .extend(warning_problems(&resource, report.warnings));
    if report.errors.is_empty() {
        result.push_resource(resource);
    } else {
        for e in report.errors {
            result.problems.push(problem(&e.field_path, e.reason));
        }
    }
}

/// The warnings loading `resource` yields (what [`LoadResult::warnings`] holds for it):
/// accepted values Istio also warns about, or that can never match. Each names the file,
/// document, field and the policy. For a resource already loaded (a mesh snapshot keeps the
/// resources, not the warnings).
pub fn resource_warnings(resource: &Resource) -> Vec<Problem> {
    warning_problems(resource, crate::validate::validate(resource).warnings)
}

fn warning_problems(resource: &Resource, findings: Vec<crate::Finding>) -> Vec<Problem> {
    let origin = resource.origin();
    let named = format!(
        "{} {}/{}",
        resource.kind(),
        resource.namespace(),
        resource.name()
    );
    findings
        .into_iter()
        .map(|w| Problem {
            file: origin.file.clone(),
            doc_index: origin.doc_index,
            field_path: w.field_path,
            // A source already named after the object (Kubernetes mode) is not named twice.
            reason: if origin.file == named {
                w.reason
            } else {
                format!("{named}: {}", w.reason)
            },
        })
        .collect()
}

/// Parser limits for one document: far above any real policy (Istio caps rules at 512 and
/// labels at 4096), low enough that hostile YAML (alias bombs, deep nesting) is refused quickly.
fn parser_options() -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 100_000;
    budget.max_events = 400_000;
    budget.max_aliases = 1_000;
    budget.max_depth = 64;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// A YAML document as a JSON-like tree. Map keys become strings (YAML `80:` and `"80":` are
/// the same key, as Kubernetes sees them); a key given twice, in any spelling, is an error
/// rather than silently keeping one of the values.
struct Tree(serde_json::Value);

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(TreeVisitor).map(Tree)
    }
}

struct TreeVisitor;

impl<'de> serde::de::Visitor<'de> for TreeVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom(format!("number {v} is not finite")))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(serde_json::Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Tree::deserialize(d).map(|t| t.0)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Tree(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(TreeKey(key)) = map.next_key()? {
            let Tree(value) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "duplicate mapping key {key:?}"
                )));
            }
            out.insert(key, value);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// A mapping key as a string: scalars of any type are accepted (`80:` is the key "80").
struct TreeKey(String);

impl<'de> Deserialize<'de> for TreeKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = String;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E>(self, v: &str) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_string<E>(self, v: String) -> Result<String, E> {
                Ok(v)
            }
            fn visit_bool<E>(self, v: bool) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_i64<E>(self, v: i64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_u64<E>(self, v: u64) -> Result<String, E> {
                Ok(v.to_string())
            }
            fn visit_f64<E>(self, v: f64) -> Result<String, E> {
                Ok(v.to_string())
            }
        }
        deserializer.deserialize_str(KeyVisitor).map(TreeKey)
    }
}

/// The top-level object as written (kind and apiVersion already checked).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawObject<S> {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    metadata: Option<ObjectMeta>,
    #[serde(default)]
    spec: Option<S>,
    /// Accepted and ignored (objects exported from a cluster carry it).
    #[serde(default, rename = "status")]
    _status: Option<serde::de::IgnoredAny>,
}

fn typed<S: DeserializeOwned + Default>(
    value: &serde_json::Value,
    api_version: ApiVersion,
    origin: &Origin,
) -> Result<Object<S>, (String, String)> {
    let raw: RawObject<S> = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        explain_serde_error(path, &e.inner().to_string())
    })?;
    Ok(Object {
        api_version,
        metadata: raw.metadata.unwrap_or_default(),
        spec: raw.spec.unwrap_or_default(),
        origin: origin.clone(),
        document: std::sync::Arc::new(value.clone()),
    })
}

/// Rewrites serde's messages into the field path + reason form users see from Istio and
/// kubectl.
fn explain_serde_error(mut path: String, msg: &str) -> (String, String) {
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        if path.rsplit('.').next() != Some(field) {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(field);
        }
        let expected = expected
            .trim_start_matches(", ")
            .replace("expected one of ", "known fields: ")
            .replace("expected ", "known field: ")
            .replace('`', "");
        return (path, format!("unknown field ({expected})"));
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `")
        && let Some((value, expected)) = rest.split_once('`')
    {
        let expected = expected
            .trim_start_matches(", ")
            .trim_start_matches("expected one of ")
            .trim_start_matches("expected ")
            .replace('`', "\"");
        return (
            path,
            format!("Unsupported value: {value:?}: supported values: {expected}"),
        );
    }
    if let Some(rest) = msg.strip_prefix("invalid type: null, expected ") {
        let reason = null_reason(&path)
            .unwrap_or_else(|| format!("must not be null (expected {})", plain_expected(rest)));
        return (path, reason);
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return (path, format!("wrong type: {rest}"));
    }
    if let Some(rest) = msg.strip_prefix("duplicate field `") {
        let field = rest.trim_end_matches('`');
        return (path, format!("field {field:?} is given twice"));
    }
    (path, msg.to_string())
}

/// Istio's own words for a `null` list item where it has them.
fn null_reason(path: &str) -> Option<String> {
    let (head, last) = path.rsplit_once('[')?;
    let index: usize = last.strip_suffix(']')?.parse().ok()?;
    let rule_index = || -> Option<usize> {
        let (_, after) = head.split_once("spec.rules[")?;
        after.split_once(']')?.0.parse().ok()
    };
    if head == "spec.rules" {
        return Some(format!("`rule` must not be nil, found at rule {index}"));
    }
    if head.ends_with(".from") {
        return Some(format!(
            "`from` must not be nil, found at rule {}",
            rule_index()?
        ));
    }
    if head.ends_with(".to") {
        return Some(format!(
            "`to` must not be nil, found at rule {}",
            rule_index()?
        ));
    }
    if head.ends_with(".when") {
        return Some("when field cannot be nil".to_string());
    }
    if head.ends_with(".fromHeaders") {
        return Some("location header name must be non-null".to_string());
    }
    if head.ends_with(".outputClaimToHeaders") {
        return Some("outputClaimToHeaders must not be null (must be of type object)".to_string());
    }
    None
}

/// serde's "struct JwtRule" -> "an object".
fn plain_expected(expected: &str) -> String {
    if expected.starts_with("struct ") {
        "an object".to_string()
    } else {
        expected.to_string()
    }
}

fn yaml_error_reason(e: &serde_saphyr::Error, first_line: usize) -> String {
    let inner = e.without_snippet().to_string();
    let inner = inner.strip_prefix("error: ").unwrap_or(&inner);
    // Drop the parser's own "line L column C: " prefix and " at line L, column C" suffix
    // (both relative to the document): we print one position, relative to the file.
    let msg = match inner.split_once(": ") {
        Some((head, rest)) if head.starts_with("line ") => rest,
        _ => inner,
    };
    let msg = match msg.rsplit_once(" at line ") {
        Some((head, pos))
            if pos.split_once(", column ").is_some_and(|(l, c)| {
                [l, c]
                    .iter()
                    .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            }) =>
        {
            head
        }
        _ => msg,
    };
    match e.location() {
        Some(loc) if loc.line() > 0 => format!(
            "YAML syntax error at line {} column {}: {}",
            loc.line() as usize + first_line - 1,
            loc.column(),
            msg
        ),
        _ => format!("YAML syntax error: {msg}"),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "list",
        serde_json::Value::Object(_) => "mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_counts_like_yaml() {
        let text = "# leading comment\n---\na: 1\n---\n---\n# only a comment\n---\nb: 2\n...\n";
        let chunks = split_documents(text);
        let summary: Vec<(usize, usize, bool)> = chunks
            .iter()
            .map(|c| (c.index, c.first_line, c.has_content))
            .collect();
        assert_eq!(
            summary,
            vec![(1, 1, true), (2, 4, false), (3, 5, false), (4, 7, true)]
        );
        let plain = split_documents("a: 1\n");
        assert_eq!(plain.len(), 1);
        assert!(split_documents("").is_empty());
        assert!(split_documents("# nothing\n").is_empty());
        // A marker with content on the same line starts a document.
        let inline = split_documents("--- {a: 1}\n--- {b: 2}\n");
        assert_eq!(inline.len(), 2);
        assert!(inline.iter().all(|c| c.has_content));
        // `----` or `---x` are not markers.
        assert_eq!(split_documents("a: |\n  ----\n  ---x\n").len(), 1);
    }
}
