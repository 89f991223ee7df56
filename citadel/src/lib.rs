//! Citadel: the certificate authority that issues SPIFFE X.509 identities.
