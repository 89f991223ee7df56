//! Watching a [`FolderSource`]: a stream of validated snapshots and refusals (feature
//! `watch`; the model types above need no runtime).
//!
//! The folder is re-read when a file notification arrives (debounced) or, where
//! notifications are unavailable or lost, on a poll; a snapshot is sent only when the
//! folder's fingerprint (names, sizes, times and contents of its files) changed. The
//! fingerprint is taken before the snapshot it describes, so an edit racing a load is
//! seen again on the next round rather than lost.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::{ConfigSource, FolderSource, MeshFolder, Problem};

/// One update of a watched source: the whole new snapshot, or why the edit was refused
/// (the consumer keeps its last good snapshot).
pub type Update = Result<MeshFolder, Vec<Problem>>;

/// How often the folder is polled besides file notifications.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// How long a changed folder must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(100);

/// The updates of one source, in order: what a consumer of any source reads. Dropping it
/// stops the source's task.
#[derive(Debug)]
pub struct Updates {
    rx: mpsc::Receiver<Update>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Updates {
    /// A channel of updates fed by hand (tests, or a source with its own task).
    pub fn channel(capacity: usize) -> (mpsc::Sender<Update>, Updates) {
        let (tx, rx) = mpsc::channel(capacity);
        (tx, Updates { rx, task: None })
    }

    /// The next update; `None` once the source has stopped.
    pub async fn next(&mut self) -> Option<Update> {
        self.rx.recv().await
    }
}

impl Drop for Updates {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

/// Take the folder's first snapshot (returned) and watch it for changes after that.
pub async fn watch_folder(source: FolderSource, poll: Duration) -> (Update, Updates) {
    let src = source.clone();
    let first = tokio::task::spawn_blocking(move || {
        let fp = MeshFolder::fingerprint(src.dir());
        (fp, src.snapshot())
    })
    .await;
    let (fp, first) = match first {
        Ok(x) => x,
        Err(e) => (
            0,
            Err(vec![Problem {
                file: source.dir().display().to_string(),
                field: String::new(),
                reason: format!("loading failed: {e}"),
            }]),
        ),
    };
    let (tx, rx) = mpsc::channel(4);
    let task = tokio::spawn(watch_loop(source, poll, fp, tx));
    (
        first,
        Updates {
            rx,
            task: Some(task),
        },
    )
}

async fn watch_loop(source: FolderSource, poll: Duration, mut last: u64, tx: mpsc::Sender<Update>) {
    use notify::Watcher as _;
    let (ev_tx, mut ev_rx) = mpsc::channel::<()>(16);
    let watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = ev_tx.try_send(());
    })
    .and_then(|mut w| {
        w.watch(source.dir(), notify::RecursiveMode::Recursive)
            .map(|()| w)
    });
    let _watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, every = ?poll, "file notifications unavailable; polling the mesh folder");
            None
        }
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ev_rx.recv() => {
                // Editors write in several steps: let them finish.
                tokio::time::sleep(Duration::from_millis(150)).await;
                while ev_rx.try_recv().is_ok() {}
            }
            _ = tick.tick() => {}
            () = tx.closed() => return,
        }
        let src = source.clone();
        let round = tokio::task::spawn_blocking(move || {
            let fp = MeshFolder::fingerprint(src.dir());
            if fp == last {
                return (fp, None);
            }
            // A changed folder is read only once it stayed the same for SETTLE: a file
            // rewritten in place (`cat new.yaml > workloads.yaml`) is empty between the
            // truncation and the write, and that empty registry must not be served.
            std::thread::sleep(SETTLE);
            if MeshFolder::fingerprint(src.dir()) != fp {
                return (last, None);
            }
            (fp, Some(src.snapshot()))
        })
        .await;
        match round {
            Ok((fp, Some(update))) => {
                last = fp;
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            Ok((_, None)) => {}
            Err(e) => {
                tracing::error!(error = %e, "loading the mesh folder failed; trying again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MESH_FILE, WORKLOADS_FILE};

    const REG: &str = "workloads:\n- {name: a, namespace: ns1, ports: [{port: 80, app: '127.0.0.1:9000', inbound: '127.0.0.1:9001'}]}\n";

    /// First snapshot, then one update per change: a valid edit is a snapshot, a broken one a
    /// refusal naming file and field, and an unchanged folder sends nothing.
    #[tokio::test]
    async fn snapshots_then_refusals_then_snapshots() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MESH_FILE), "trustDomain: example.org\n").unwrap();
        std::fs::write(d.path().join(WORKLOADS_FILE), REG).unwrap();
        let poll = Duration::from_millis(50);
        let (first, mut w) = watch_folder(FolderSource::new(d.path()), poll).await;
        assert_eq!(first.unwrap().registry.workloads.len(), 1);
        // Nothing changed: no update within several polls.
        let quiet = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
        assert!(quiet.is_err(), "an unchanged folder sent {quiet:?}");

        std::fs::write(
            d.path().join(WORKLOADS_FILE),
            "workloads:\n- {name: a, namespace: ns1, ports: [{port: 70000}]}\n",
        )
        .unwrap();
        let refused = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap_err();
        assert!(
            refused
                .iter()
                .any(|p| p.file.contains(WORKLOADS_FILE) && p.field.contains("ports[0].port")),
            "{refused:?}"
        );

        let two = format!(
            "{REG}- {{name: b, namespace: ns1, ports: [{{port: 80, app: '127.0.0.1:9002', inbound: '127.0.0.1:9003'}}]}}\n"
        );
        std::fs::write(d.path().join(WORKLOADS_FILE), two).unwrap();
        let snap = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(snap.registry.workloads.len(), 2);
    }

    /// A file rewritten in place is empty for a moment between its truncation and the
    /// write; a watcher that read it then would serve an empty registry. It is read only
    /// once it stayed the same for a while: the update is the new content, never the gap.
    #[tokio::test]
    async fn a_file_rewritten_in_place_is_not_read_half_written() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(MESH_FILE), "trustDomain: example.org\n").unwrap();
        std::fs::write(d.path().join(WORKLOADS_FILE), REG).unwrap();
        let poll = Duration::from_millis(10);
        let (first, mut w) = watch_folder(FolderSource::new(d.path()), poll).await;
        assert_eq!(first.unwrap().registry.workloads.len(), 1);
        let two = format!(
            "{REG}- {{name: b, namespace: ns1, ports: [{{port: 80, app: '127.0.0.1:9002', inbound: '127.0.0.1:9003'}}]}}\n"
        );
        let path = d.path().join(WORKLOADS_FILE);
        let writer = tokio::task::spawn_blocking(move || {
            // `cat new.yaml > workloads.yaml` from a slow writer: truncated, then written
            // after several polls.
            let mut f = std::fs::File::create(&path).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            f.write_all(two.as_bytes()).unwrap();
        });
        let next = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        assert_eq!(
            next.registry.workloads.len(),
            2,
            "served the half-written file"
        );
    }
}
