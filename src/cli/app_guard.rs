//! `rampart app-guard -- PROGRAM [ARGS...]` (hidden): how `rampart up` starts an app that is
//! not `rampart`. It runs the app as its child, in the process group `up` gave it, passes the
//! app's exit status on, and holds `up`'s lifeline: when `up` is gone, however it ended
//! (`kill -9` included), the kernel closes the lifeline pipe and the guard stops the app's
//! process group (SIGTERM, then SIGKILL after a grace period). Without it such an app outlived
//! a killed `up`, kept its port and broke the next `rampart up`.
//!
//! Written by hand: the guard needs the lifeline (a pipe only `up` holds) and the process
//! group `up` already signals on a normal stop; a general supervisor crate would bring
//! restarts and configuration that `up` does itself.

use std::ffi::OsString;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context as _;

/// How long the app gets after SIGTERM once `up` is gone, before SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub(crate) struct AppGuardArgs {
    /// The app and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<OsString>,
}

impl AppGuardArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?;
        rt.block_on(guard(self.command))
    }
}

async fn guard(command: Vec<OsString>) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{SignalKind, signal};
    let (program, args) = command.split_first().context("no program given")?;
    // `up` stops apps by signalling their process group, which holds this guard too: the
    // guard outlives those signals and waits for the app to exit. Installed before the app
    // starts, so that an early Ctrl-C cannot end the guard and leave the app unwatched.
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    // The app's own stdout and stderr are the guard's (`up`'s log pipes); its stdin is
    // nothing, as `up` gives other apps; the lifeline stays with the guard.
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .env_remove(super::process::LIFELINE_ENV)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            say(&format!(
                "rampart up: cannot start {}: {e}",
                program.to_string_lossy()
            ));
            // As a shell says it: 127 not found, 126 found but not runnable.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Ok(ExitCode::from(code));
        }
    };
    let pid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(i32::try_from(p).ok()?));
    let lifeline = super::process::lifeline();
    tokio::pin!(lifeline);
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for the app")?;
                return Ok(exit_code(status));
            }
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
            () = &mut lifeline => break,
        }
    }
    // `up` is gone. SIGTERM to the app itself (in case it left the group) and to the group
    // (whatever it started); then, after the grace period or as soon as it exits, SIGKILL to
    // the group: helpers that ignore SIGTERM or outlive the app go too, and so does the
    // guard, whose status nobody reads any more.
    say("rampart up, which started this app, is gone; stopping it");
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    signal_group(rustix::process::Signal::TERM);
    if tokio::time::timeout(GRACE, child.wait()).await.is_err() {
        say(&format!(
            "the app did not stop within {GRACE:?} of SIGTERM; killing it"
        ));
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    signal_group(rustix::process::Signal::KILL);
    Ok(ExitCode::FAILURE)
}

/// A line on stderr, if anyone still reads it: once `up` is gone its log pipe is closed, and
/// a failed write must not end the guard before it has stopped the app (`eprintln!` panics).
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Signal this process's group: the app and whatever it started (the guard ignores TERM; KILL
/// ends it too).
fn signal_group(sig: rustix::process::Signal) {
    let _ = rustix::process::kill_process_group(rustix::process::getpgrp(), sig);
}

/// The app's exit status as the guard's: its code, or 128 + the signal that ended it, as a
/// shell reports it. A signal is also said in the app's log, since `up` sees only the code.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(s)) => {
            say(&format!("the app was killed by signal {s}"));
            ExitCode::from(u8::try_from(128 + s).unwrap_or(255))
        }
        (None, None) => ExitCode::FAILURE,
    }
}
