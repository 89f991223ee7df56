//! Shared test support for rampart-k8s. The Kubernetes API server here is FAKED
//! ([`fake_api::FakeApi`]): no cluster is involved.

pub mod fake_api;
