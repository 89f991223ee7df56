//! The node agent: SDS and SPIFFE Workload API server, CA client and rotation.
