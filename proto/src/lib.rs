//! Wire definitions: Istio CA, Envoy SDS, SPIFFE Workload API, and Rampart's CRL service
//! (`rampart.ca.v1.Revocation`).
//!
//! The `.proto` files in `proto/` are Rampart's own, written from the published facts
//! (packages, services, messages, field names and numbers) so the wire is identical to Istio's,
//! Envoy's and SPIFFE's. The Rust code in `src/gen/` is generated from them with protox and
//! tonic-prost-build (no system `protoc`) and checked in; `tests/regenerate.rs` regenerates it
//! and fails on any difference (`RAMPART_REGENERATE_PROTO=1` overwrites).
//!
//! Client and server stubs are generated for every service. Types that carry private keys
//! (`DataSource`, `X509svid`) have a hand-written `Debug` that never prints key bytes.

#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

/// Istio's CA service: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
pub mod istio {
    /// `istio.v1`.
    pub mod v1 {
        /// `istio.v1.auth`.
        pub mod auth {
            include!("gen/istio.v1.auth.rs");
        }
    }
}

/// Rampart's own services.
pub mod rampart {
    /// `rampart.ca`.
    pub mod ca {
        /// `rampart.ca.v1`: `Revocation/GetCrls`, the CRLs the CA serves.
        pub mod v1 {
            include!("gen/rampart.ca.v1.rs");
        }
    }
    /// `rampart.config`.
    pub mod config {
        /// `rampart.config.v1`: `ConfigDiscovery/DeltaConfig`, the configuration a control
        /// plane streams to each proxy (its slice of the mesh model, as delta updates).
        pub mod v1 {
            include!("gen/rampart.config.v1.rs");

            /// Type of the `mesh` resource (mesh settings and referenced files).
            pub const MESH_TYPE: &str = "rampart.config.v1.Mesh";
            /// Type of a policy resource (an Istio `security.istio.io` object).
            pub const POLICY_TYPE: &str = "rampart.config.v1.Policy";
            /// Type of a registry item (one `workloads.yaml` entry).
            pub const REGISTRY_TYPE: &str = "rampart.config.v1.RegistryItem";
        }
    }
}

/// Envoy xDS types.
pub mod envoy {
    /// `envoy.config`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`: `Node`, `DataSource`, ...
            pub mod v3 {
                include!("gen/envoy.config.core.v3.rs");
            }
        }
    }
    /// `envoy.service`.
    pub mod service {
        /// `envoy.service.discovery`.
        pub mod discovery {
            /// `envoy.service.discovery.v3`: the xDS request and response messages.
            pub mod v3 {
                include!("gen/envoy.service.discovery.v3.rs");
            }
        }
        /// `envoy.service.auth`.
        pub mod auth {
            /// `envoy.service.auth.v3`: `Authorization` (external authorization, Istio's
            /// CUSTOM action).
            pub mod v3 {
                include!("gen/envoy.service.auth.v3.rs");
            }
        }
        /// `envoy.service.secret`.
        pub mod secret {
            /// `envoy.service.secret.v3`: `SecretDiscoveryService`.
            pub mod v3 {
                include!("gen/envoy.service.secret.v3.rs");
            }
        }
    }
    /// `envoy.extensions`.
    pub mod extensions {
        /// `envoy.extensions.transport_sockets`.
        pub mod transport_sockets {
            /// `envoy.extensions.transport_sockets.tls`.
            pub mod tls {
                /// `envoy.extensions.transport_sockets.tls.v3`: `Secret`, `TlsCertificate`, ...
                pub mod v3 {
                    include!("gen/envoy.extensions.transport_sockets.tls.v3.rs");

                    /// The type URL of an SDS resource (`Secret`), exactly as Envoy names it.
                    pub const SECRET_TYPE_URL: &str =
                        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
                }
            }
        }
    }
}

/// The SDS contract between a node agent and its proxies (Istio's names): which resources
/// exist and the type URL they travel as.
pub mod sds {
    /// The workload certificate chain and key (Istio's `default`).
    pub const WORKLOAD_RESOURCE: &str = "default";
    /// The trust bundle (Istio's `ROOTCA`).
    pub const ROOT_RESOURCE: &str = "ROOTCA";
    pub use crate::envoy::extensions::transport_sockets::tls::v3::SECRET_TYPE_URL;
}

/// `google.rpc`: the gRPC error model (`Status`).
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        include!("gen/google.rpc.rs");
    }
}

/// The SPIFFE Workload API. The reference `.proto` declares no package, so the gRPC paths are
/// `/SpiffeWorkloadAPI/<Method>`.
pub mod spiffe {
    /// `SpiffeWorkloadAPI` and its messages.
    pub mod workload {
        include!("gen/_.rs");

        /// The metadata header every Workload API call must carry (`workload.spiffe.io: true`).
        pub const SECURITY_HEADER: &str = "workload.spiffe.io";
    }
}

// === impl Debug for secret-bearing types ===

impl std::fmt::Debug for envoy::config::core::v3::DataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataSource")
            .field("specifier", &self.specifier)
            .finish()
    }
}

impl std::fmt::Debug for envoy::config::core::v3::data_source::Specifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use envoy::config::core::v3::data_source::Specifier;
        match self {
            Specifier::Filename(path) => f.debug_tuple("Filename").field(path).finish(),
            Specifier::EnvironmentVariable(name) => {
                f.debug_tuple("EnvironmentVariable").field(name).finish()
            }
            // Inline data may be a private key: print only its length.
            Specifier::InlineBytes(b) => write!(f, "InlineBytes([{} bytes elided])", b.len()),
            Specifier::InlineString(s) => write!(f, "InlineString([{} bytes elided])", s.len()),
        }
    }
}

impl std::fmt::Debug for spiffe::workload::X509svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509svid")
            .field("spiffe_id", &self.spiffe_id)
            .field(
                "x509_svid",
                &format_args!("[{} bytes]", self.x509_svid.len()),
            )
            .field("x509_svid_key", &format_args!("[secret key elided]"))
            .field("bundle", &format_args!("[{} bytes]", self.bundle.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn secret_round_trips_with_envoy_field_numbers() {
        use envoy::config::core::v3::{DataSource, data_source::Specifier};
        use envoy::extensions::transport_sockets::tls::v3::{Secret, TlsCertificate, secret};
        let s = Secret {
            name: "default".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(DataSource {
                    specifier: Some(Specifier::InlineBytes(b"CHAIN".to_vec())),
                }),
                private_key: Some(DataSource {
                    specifier: Some(Specifier::InlineBytes(b"KEY".to_vec())),
                }),
                ..Default::default()
            })),
        };
        let bytes = s.encode_to_vec();
        // name = 1 (tag 0x0a, "default"), tls_certificate = 2 (tag 0x12).
        assert_eq!(&bytes[..9], b"\x0a\x07default");
        assert_eq!(bytes[9], 0x12);
        assert_eq!(Secret::decode(bytes.as_slice()).unwrap(), s);
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("KEY") && dbg.contains("elided"), "{dbg}");
    }

    #[test]
    fn csr_request_uses_istio_field_numbers() {
        let req = istio::v1::auth::IstioCertificateRequest {
            csr: "x".into(),
            validity_duration: 60,
            metadata: None,
        };
        // csr = 1 (0x0a), validity_duration = 3 varint (0x18).
        assert_eq!(req.encode_to_vec(), b"\x0a\x01x\x18\x3c");
    }

    #[test]
    fn svid_debug_elides_key() {
        let svid = spiffe::workload::X509svid {
            spiffe_id: "spiffe://cluster.local/ns/a/sa/b".into(),
            x509_svid_key: b"SECRETKEY".to_vec(),
            ..Default::default()
        };
        let dbg = format!("{svid:?}");
        assert!(
            !dbg.contains("SECRETKEY") && dbg.contains("elided"),
            "{dbg}"
        );
    }
}
