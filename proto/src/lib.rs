//! Wire definitions: Istio CA, Envoy SDS, SPIFFE Workload API.
