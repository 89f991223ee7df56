//! Istio PeerAuthentication, RequestAuthentication and AuthorizationPolicy: loading,
//! validation, resolution and explainable decisions. Pure: no sockets, no async runtime.
#![warn(missing_docs)]
