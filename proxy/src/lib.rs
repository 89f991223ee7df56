//! The mTLS data-plane proxy.
