//! SPIFFE and X.509 primitives shared by every Rampart component.
#![warn(missing_docs)]
