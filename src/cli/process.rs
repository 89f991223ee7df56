//! What every long-running command does with its process: wait for the signal that stops it,
//! and raise the open-file limit so connection budgets, not the descriptor table, decide.

/// Set by `rampart up` in the environment of the `rampart` processes it starts: their stdin
/// is a pipe whose other end only `up` holds.
pub(crate) const LIFELINE_ENV: &str = "RAMPART_UP_LIFELINE";

/// Resolves on SIGTERM or SIGINT (Ctrl-C), logging which; on a platform without SIGTERM
/// handlers, on Ctrl-C alone. A process started by `rampart up` also stops when `up` is gone
/// however it ended (`kill -9` included): the kernel closes `up`'s end of the stdin pipe, and
/// the end of stdin stops this process as SIGTERM would.
pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let lifeline = async {
        lifeline().await;
        tracing::warn!("rampart up, which started this process, is gone; stopping");
    };
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            () = lifeline => {}
        }
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        () = lifeline => {}
    }
}

/// Resolves when `rampart up`, which started this process, is gone: the lifeline pipe on
/// stdin has ended. Never resolves for a process without one. Only a pipe is a lifeline: with
/// the variable inherited by mistake and stdin at /dev/null or a terminal, the process must
/// not stop at once.
pub(crate) async fn lifeline() {
    let piped = || {
        use std::os::unix::fs::FileTypeExt as _;
        std::fs::metadata("/proc/self/fd/0").is_ok_and(|m| m.file_type().is_fifo())
    };
    if std::env::var_os(LIFELINE_ENV).is_some_and(|v| v == "stdin") && piped() {
        lifeline_closed().await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// Resolves when stdin ends (or fails). Read on a thread of its own: tokio's stdin is a
/// blocking read too, and this one is never cancelled.
async fn lifeline_closed() {
    use std::io::Read as _;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let reader = std::thread::Builder::new()
        .name("up-lifeline".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(());
        });
    match reader {
        Ok(_) => {
            let _ = rx.await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch rampart up's lifeline; this process outlives a killed up");
            std::future::pending::<()>().await;
        }
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
