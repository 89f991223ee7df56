//! A STAND-IN SDS server for benchmarks and manual runs while the real node agent
//! (`rampart agent`) is not available: one process serving, per Unix socket, a workload
//! certificate for one SPIFFE ID issued from a CA directory written by `rampart certs root`,
//! plus that root as `ROOTCA`. With `--rotate-every` it issues a fresh certificate (new key,
//! new serial) for every socket at that interval, to exercise rotation under load.
//!
//! ```text
//! cargo run --release -p rampart-proxy --example sds_standin -- \
//!     --ca DIR --serve /tmp/a.sock=spiffe://cluster.local/ns/x/sa/y [--serve ...] [--rotate-every 20]
//! ```

#[path = "../tests/support/sds_standin.rs"]
mod sds_standin;

use std::path::PathBuf;
use std::time::Duration;

fn main() {
    let mut ca = None;
    let mut serve = Vec::new();
    let mut rotate = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ca" => ca = args.next().map(PathBuf::from),
            "--serve" => {
                let v = args.next().expect("--serve SOCKET=SPIFFE_ID");
                let (s, id) = v.split_once('=').expect("--serve SOCKET=SPIFFE_ID");
                serve.push((PathBuf::from(s), id.to_string()));
            }
            "--rotate-every" => {
                rotate = args
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(Duration::from_secs)
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let ca = sds_standin::TestCa::from_dir(&ca.expect("--ca DIR"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut servers = Vec::new();
        for (sock, id) in &serve {
            servers.push((
                sds_standin::start(sock, Some(ca.secrets(id, 1))),
                id.clone(),
            ));
            eprintln!("sds stand-in: {} serves {id}", sock.display());
        }
        let mut version = 1;
        loop {
            match rotate {
                Some(every) => {
                    tokio::time::sleep(every).await;
                    version += 1;
                    for (s, id) in &servers {
                        let _ = s.tx.send(Some(ca.secrets(id, version)));
                    }
                    eprintln!("sds stand-in: rotated to version {version}");
                }
                None => tokio::time::sleep(Duration::from_secs(3600)).await,
            }
        }
    });
}
