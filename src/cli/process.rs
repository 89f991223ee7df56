//! What every long-running command does with its process: wait for the signal that stops it,
//! and raise the open-file limit so connection budgets, not the descriptor table, decide.

/// Resolves on SIGTERM or SIGINT (Ctrl-C), logging which; on a platform without SIGTERM
/// handlers, on Ctrl-C alone.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("SIGINT received");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Raises the soft open-file limit to the hard one (as Envoy and ztunnel run: a low default
/// soft limit would make `accept` fail with EMFILE long before a connection budget is
/// reached). Returns the soft limit now in force (`None`: unlimited).
pub(crate) fn raise_nofile_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current == lim.maximum {
        return lim.current;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        },
    ) {
        Ok(()) => {
            tracing::debug!(from = ?lim.current, to = ?lim.maximum, "open-file soft limit raised");
            lim.maximum
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            lim.current
        }
    }
}
