//! SPIFFE trust domains and IDs, validated as the SPIFFE ID specification says
//! (`standards/SPIFFE-ID.md` §2): scheme `spiffe`, a lowercase trust domain of
//! `[a-z0-9.-_]`, an optional path of `/`-separated segments of `[a-zA-Z0-9.-_]` with no
//! empty, `.` or `..` segment and no trailing slash. Nothing else is allowed, which rules
//! out ports, userinfo, queries, fragments and percent-encoding. IDs are at most 2048
//! bytes, trust domains at most 255.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, truncate};

/// The URI prefix every SPIFFE ID starts with.
const SCHEME_PREFIX: &str = "spiffe://";
/// Longest SPIFFE ID we accept, in bytes (SPIFFE-ID §2.3).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name we accept, in bytes (a DNS-compatible host name).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A SPIFFE trust domain name, such as `cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A SPIFFE ID: `spiffe://<trust-domain><path>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Empty, or starting with `/`.
    path: String,
}

fn td_err(input: &str, reason: &'static str) -> Error {
    Error::InvalidTrustDomain {
        input: truncate(input),
        reason,
    }
}

fn id_err(input: &str, reason: &'static str) -> Error {
    Error::InvalidSpiffeId {
        input: truncate(input),
        reason,
    }
}

fn is_td_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

fn is_path_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_')
}

/// Checks a trust domain name; returns the reason it is invalid.
fn check_td(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("trust domain is empty");
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("trust domain is longer than 255 bytes");
    }
    for b in name.bytes() {
        if is_td_char(b) {
            continue;
        }
        return Err(match b {
            b':' => "trust domain must not contain a port (':')",
            b'@' => "trust domain must not contain userinfo ('@')",
            b'A'..=b'Z' => "trust domain must be lowercase",
            b'%' => "trust domain must not be percent-encoded",
            _ => "trust domain characters are limited to a-z, 0-9, '.', '-' and '_'",
        });
    }
    Ok(())
}

/// Checks one path segment (without slashes); returns the reason it is invalid.
fn check_segment(seg: &str) -> Result<(), &'static str> {
    if seg.is_empty() {
        return Err("path has an empty segment");
    }
    if seg == "." || seg == ".." {
        return Err("path segments must not be '.' or '..'");
    }
    for b in seg.bytes() {
        if is_path_char(b) {
            continue;
        }
        return Err(match b {
            b'?' => "SPIFFE IDs must not have a query",
            b'#' => "SPIFFE IDs must not have a fragment",
            b'%' => "path must not be percent-encoded",
            _ => "path characters are limited to a-z, A-Z, 0-9, '.', '-' and '_'",
        });
    }
    Ok(())
}

/// Checks a path (empty, or `/seg(/seg)*`); returns the reason it is invalid.
fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err("path must start with '/'");
    };
    if rest.is_empty() || rest.ends_with('/') {
        return Err("path must not end with '/'");
    }
    rest.split('/').try_for_each(check_segment)
}

// === impl TrustDomain ===

impl TrustDomain {
    /// Parses a trust domain name. Also accepts the trust domain's own SPIFFE ID
    /// (`spiffe://example.org`, no path), as go-spiffe does.
    pub fn new(name: &str) -> Result<Self, Error> {
        let bare = match name.strip_prefix(SCHEME_PREFIX) {
            Some(rest) => {
                if rest.contains('/') {
                    return Err(td_err(name, "a trust domain has no path"));
                }
                rest
            }
            None => name,
        };
        check_td(bare).map_err(|reason| td_err(name, reason))?;
        Ok(Self(bare.to_owned()))
    }

    /// The name, e.g. `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID (`spiffe://<name>`), as used in bundles.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            trust_domain: self.clone(),
            path: String::new(),
        }
    }
}

impl FromStr for TrustDomain {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for TrustDomain {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

// === impl SpiffeId ===

impl SpiffeId {
    /// Parses a SPIFFE ID, following every rule of the SPIFFE ID specification.
    pub fn parse(input: &str) -> Result<Self, Error> {
        if input.is_empty() {
            return Err(id_err(input, "SPIFFE ID is empty"));
        }
        if input.len() > MAX_SPIFFE_ID_LEN {
            return Err(id_err(input, "SPIFFE ID is longer than 2048 bytes"));
        }
        let Some(rest) = input.strip_prefix(SCHEME_PREFIX) else {
            return Err(id_err(input, "scheme must be 'spiffe://' (lowercase)"));
        };
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        // Query and fragment markers may appear in either part; name them before the
        // character rules give a vaguer reason.
        if rest.contains('?') {
            return Err(id_err(input, "SPIFFE IDs must not have a query"));
        }
        if rest.contains('#') {
            return Err(id_err(input, "SPIFFE IDs must not have a fragment"));
        }
        check_td(td).map_err(|reason| id_err(input, reason))?;
        check_path(path).map_err(|reason| id_err(input, reason))?;
        Ok(Self {
            trust_domain: TrustDomain(td.to_owned()),
            path: path.to_owned(),
        })
    }

    /// Builds a SPIFFE ID from a trust domain and a path (empty, or `/seg(/seg)*`).
    pub fn from_parts(trust_domain: &TrustDomain, path: &str) -> Result<Self, Error> {
        let id = Self {
            trust_domain: trust_domain.clone(),
            path: path.to_owned(),
        };
        check_path(path).map_err(|reason| id_err(&id.to_string(), reason))?;
        if id.uri_len() > MAX_SPIFFE_ID_LEN {
            return Err(id_err(
                &id.to_string(),
                "SPIFFE ID is longer than 2048 bytes",
            ));
        }
        Ok(id)
    }

    /// The Istio workload identity `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn istio(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, Error> {
        let shown = format!("{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}");
        check_segment(namespace).map_err(|reason| id_err(&shown, reason))?;
        check_segment(service_account).map_err(|reason| id_err(&shown, reason))?;
        Self::from_parts(
            trust_domain,
            &format!("/ns/{namespace}/sa/{service_account}"),
        )
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The path: empty for a trust domain's own ID, otherwise starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether the path has the Istio form `/ns/<namespace>/sa/<service-account>`.
    pub fn is_istio(&self) -> bool {
        self.istio_parts().is_some()
    }

    /// `(namespace, service account)` of an Istio-form ID (`/ns/<ns>/sa/<sa>`, exactly
    /// four segments); `None` for other paths. The one parser of that form.
    pub fn istio_parts(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The namespace of an Istio-form ID (`/ns/<ns>/sa/<sa>`); `None` for other paths.
    pub fn namespace(&self) -> Option<&str> {
        self.istio_parts().map(|(ns, _)| ns)
    }

    /// The service account of an Istio-form ID; `None` for other paths.
    pub fn service_account(&self) -> Option<&str> {
        self.istio_parts().map(|(_, sa)| sa)
    }

    /// The same path in another trust domain (for alias matching).
    pub fn with_trust_domain(&self, trust_domain: &TrustDomain) -> Result<SpiffeId, Error> {
        Self::from_parts(trust_domain, &self.path)
    }

    fn uri_len(&self) -> usize {
        SCHEME_PREFIX.len() + self.trust_domain.0.len() + self.path.len()
    }
}

impl FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME_PREFIX}{}{}", self.trust_domain.0, self.path)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests;
