//! `rampart probe URL`: an HTTP GET that exits 0 on a 2xx answer, for Kubernetes exec probes
//! of endpoints bound to loopback (the sidecar proxy's admin `/ready`), in images without a
//! shell or curl.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub(crate) struct ProbeArgs {
    /// `http://IP:PORT/PATH` (plain HTTP/1.1, an IP address, no name lookup).
    #[arg(value_name = "URL")]
    url: String,
    /// How long to wait for the answer.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// `http://IP:PORT/PATH` split into the address and the path.
fn parse_url(url: &str) -> Result<(SocketAddr, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let addr = authority
        .parse()
        .map_err(|_| format!("{url:?}: expected http://IP:PORT/PATH"))?;
    Ok((addr, path))
}

impl ProbeArgs {
    pub(crate) fn run(self) -> anyhow::Result<ExitCode> {
        let (addr, path) = parse_url(&self.url).map_err(super::bad_input)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start tokio runtime")?;
        match rt.block_on(super::admin_http::get(addr, &path, self.timeout)) {
            Ok((status, _)) if (200..300).contains(&status) => Ok(ExitCode::SUCCESS),
            Ok((status, body)) => {
                eprintln!(
                    "GET {}: status {status}: {}",
                    self.url,
                    String::from_utf8_lossy(&body[..body.len().min(200)]).trim()
                );
                Ok(ExitCode::FAILURE)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (a, p) = parse_url("http://127.0.0.1:15000/ready").unwrap();
        assert_eq!(a, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(p, "/ready");
        assert_eq!(parse_url("http://[::1]:1").unwrap().1, "/");
        assert!(parse_url("https://127.0.0.1:1/").is_err());
        assert!(parse_url("http://localhost:15000/ready").is_err());
    }
}
