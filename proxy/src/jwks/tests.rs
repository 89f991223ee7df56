//! The HTTP fetcher against a tiny in-test server whose answers each test chooses.

use std::time::{Duration, SystemTime};

use rampart_authz::JwksCache;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::backoff;
use crate::jwks_http::HttpFetcher;

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

/// Serve one canned `response` (raw bytes) per connection; `None` never answers.
async fn server(response: Option<Vec<u8>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                match response {
                    Some(r) => {
                        let _ = s.write_all(&r).await;
                        let _ = s.shutdown().await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    format!("http://{addr}/keys")
}

fn http(status: &str, headers: &str, body: &str) -> Option<Vec<u8>> {
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\n{headers}\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn fetcher() -> HttpFetcher {
    HttpFetcher::only(Vec::new())
}

const T: Duration = Duration::from_secs(5);

#[tokio::test]
async fn fetches_a_jwks() {
    let uri = server(http("200 OK", "content-type: application/json\r\n", JWKS)).await;
    let body = fetcher().fetch(&uri, T).await.unwrap();
    assert_eq!(body, JWKS);
    let mut cache = JwksCache::default();
    cache.record(&uri, Ok(body), SystemTime::now());
    let st = cache.status(&uri).unwrap();
    assert_eq!(
        (st.keys, st.kids, st.last_error),
        (1, vec!["k1".into()], None)
    );
}

#[tokio::test]
async fn times_out() {
    let uri = server(None).await;
    let started = std::time::Instant::now();
    let err = fetcher()
        .fetch(&uri, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.contains("no complete response within 300ms"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn refuses_oversize_bodies() {
    let mut f = fetcher();
    f.max_body = 100;
    // Declared too large.
    let big = "x".repeat(101);
    let uri = server(http("200 OK", "", &big)).await;
    let err = f.fetch(&uri, T).await.unwrap_err();
    assert!(err.contains("body larger than 100 bytes"), "{err}");
    // Chunked, no length: cut while reading.
    let chunked = format!(
        "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n40\r\n{}\r\n40\r\n{}\r\n0\r\n\r\n",
        "a".repeat(64),
        "b".repeat(64)
    );
    let uri = server(Some(chunked.into_bytes())).await;
    let err = f.fetch(&uri, T).await.unwrap_err();
    assert!(err.contains("body larger than 100 bytes"), "{err}");
    // At the limit: fine.
    let uri = server(http("200 OK", "", &"y".repeat(100))).await;
    assert_eq!(f.fetch(&uri, T).await.unwrap().len(), 100);
}

#[tokio::test]
async fn refuses_non_200_and_redirects() {
    let uri = server(http("404 Not Found", "", "nope")).await;
    let err = fetcher().fetch(&uri, T).await.unwrap_err();
    assert!(err.contains("HTTP 404 Not Found (want 200)"), "{err}");
    let uri = server(http("503 Service Unavailable", "", JWKS)).await;
    let err = fetcher().fetch(&uri, T).await.unwrap_err();
    assert!(err.contains("HTTP 503"), "{err}");
    let uri = server(http(
        "302 Found",
        "location: https://elsewhere.example/keys\r\n",
        "",
    ))
    .await;
    let err = fetcher().fetch(&uri, T).await.unwrap_err();
    assert!(
        err.contains("redirect to https://elsewhere.example/keys is not followed"),
        "{err}"
    );
}

#[tokio::test]
async fn bad_json_is_a_failed_fetch_and_keeps_the_last_good_set() {
    let good = server(http("200 OK", "", JWKS)).await;
    let bad = server(http("200 OK", "", "<html>login</html>")).await;
    let empty = server(http("200 OK", "", r#"{"keys":[]}"#)).await;
    let f = fetcher();
    let mut cache = JwksCache::default();
    let uri = "https://idp.example/keys";
    let now = SystemTime::now();
    cache.record(uri, f.fetch(&bad, T).await, now);
    let st = cache.status(uri).unwrap();
    assert!(
        st.last_error
            .as_deref()
            .unwrap()
            .contains("not a usable JWKS"),
        "{st:?}"
    );
    assert_eq!(st.keys, 0);
    // Fail closed: no set at all, not an empty one.
    assert!(rampart_authz::JwksSource::jwks(&cache, uri).is_err());
    cache.record(uri, f.fetch(&good, T).await, now);
    assert!(rampart_authz::JwksSource::jwks(&cache, uri).is_ok());
    cache.record(uri, f.fetch(&empty, T).await, now);
    let st = cache.status(uri).unwrap();
    assert!(
        st.last_error.as_deref().unwrap().contains("no usable key"),
        "{st:?}"
    );
    assert_eq!(st.keys, 1, "the last good set keeps serving");
    assert!(rampart_authz::JwksSource::jwks(&cache, uri).is_ok());
}

#[tokio::test]
async fn connection_and_scheme_errors_say_why() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = fetcher()
        .fetch(&format!("http://127.0.0.1:{port}/k"), T)
        .await
        .unwrap_err();
    assert!(
        err.contains(&format!("connecting to 127.0.0.1:{port}")),
        "{err}"
    );
    let err = fetcher().fetch("ftp://idp/k", T).await.unwrap_err();
    assert!(err.contains("only http:// and https://"), "{err}");
    // https with no trusted roots at all: refused, with the fix named.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let err = fetcher()
        .fetch(&format!("https://{addr}/k"), T)
        .await
        .unwrap_err();
    assert!(err.contains("rampart.jwksCaFile"), "{err}");
}

#[test]
fn retries_back_off_and_never_exceed_the_refresh() {
    let r = Duration::from_secs(1200);
    let got: Vec<u64> = (1..=12).map(|n| backoff(n, r).as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    assert_eq!(backoff(5, Duration::from_secs(3)), Duration::from_secs(3));
    assert_eq!(backoff(u32::MAX, r), Duration::from_secs(300));
}

const REG: &str = r#"workloads:
- name: backend
  namespace: api
  ports:
  - {port: 8080, protocol: http, app: "127.0.0.1:18080", inbound: "127.0.0.1:15081"}
"#;

fn folder(
    mesh_yaml: &str,
) -> (
    tempfile::TempDir,
    Result<rampart_mesh::MeshFolder, Vec<rampart_mesh::Problem>>,
) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("mesh.yaml"), mesh_yaml).unwrap();
    std::fs::write(d.path().join("workloads.yaml"), REG).unwrap();
    let f = rampart_mesh::MeshFolder::load(d.path());
    (d, f)
}

#[test]
fn mesh_yaml_settings_are_checked() {
    use crate::jwks_http::{DEFAULT_REFRESH, RemoteSettings};
    let (_d, f) = folder("trustDomain: cluster.local\n");
    let s = RemoteSettings::load(&f.unwrap()).unwrap();
    assert_eq!((s.refresh, s.ca_file), (DEFAULT_REFRESH, None));
    assert!(s.fetcher.extra.is_empty() && s.fetcher.system_roots);

    let (_d, f) = folder("rampart: {jwksRefresh: 1.5s}\n");
    let s = RemoteSettings::load(&f.unwrap()).unwrap();
    assert_eq!(s.refresh, Duration::from_millis(1500));
    for bad in ["soon", "10ms", "-1s"] {
        let (_d, f) = folder(&format!("rampart: {{jwksRefresh: {bad}}}\n"));
        let p = f.unwrap_err();
        assert!(
            p.iter()
                .any(|p| p.file == "mesh.yaml" && p.field == "rampart.jwksRefresh"),
            "{bad}: {p:?}"
        );
    }

    // The CA file: missing, not PEM, and a real root.
    let (_d, f) = folder("rampart: {jwksCaFile: idp-ca.pem}\n");
    let p = RemoteSettings::load(&f.unwrap()).unwrap_err();
    assert_eq!(p.field, "rampart.jwksCaFile");
    assert!(p.reason.contains("idp-ca.pem"), "{p}");
    let (d, _) = folder("");
    std::fs::write(d.path().join("idp-ca.pem"), "not a certificate\n").unwrap();
    std::fs::write(
        d.path().join("mesh.yaml"),
        "rampart: {jwksCaFile: idp-ca.pem}\n",
    )
    .unwrap();
    let f = rampart_mesh::MeshFolder::load(d.path()).unwrap();
    let p = RemoteSettings::load(&f).unwrap_err();
    assert!(p.reason.contains("idp-ca.pem"), "{p}");
    let ca = rampart_certs::CertificateAuthority::self_signed_root(
        &rampart_certs::RootParams::default(),
        rampart_certs::PrivateKey::generate(rampart_certs::KeyAlgorithm::EcdsaP256).unwrap(),
        SystemTime::now(),
    )
    .unwrap();
    std::fs::write(
        d.path().join("idp-ca.pem"),
        rampart_certs::certs_to_pem(&[ca.root().clone()]),
    )
    .unwrap();
    // The snapshot carries the file as read when it was taken: take a new one.
    let f = rampart_mesh::MeshFolder::load(d.path()).unwrap();
    let s = RemoteSettings::load(&f).unwrap();
    assert_eq!(s.fetcher.extra.len(), 1);
    assert_eq!(s.ca_file, Some(d.path().join("idp-ca.pem")));
    // Same CA certificates on the next load: the same fetcher (TLS configuration reused).
    let again = RemoteSettings::load(&f).unwrap();
    assert!(std::sync::Arc::ptr_eq(&s.fetcher, &again.fetcher));
}

/// Serve `make(own address)` to every connection (a document that names its own URL).
async fn server_naming_itself(make: impl FnOnce(String) -> Option<Vec<u8>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", l.local_addr().unwrap());
    let response = make(base.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                if let Some(r) = response {
                    let _ = s.write_all(&r).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    base
}

/// OpenID discovery: the issuer's configuration names the key set, which is fetched; a
/// configuration of another issuer, without `jwks_uri`, or sending an https document's key
/// fetch to plain http is refused, each naming why.
#[tokio::test]
async fn openid_discovery_finds_the_key_set_and_refuses_bad_configurations() {
    use crate::jwks_http::discovered_jwks_uri;
    let keys = server(http("200 OK", "", JWKS)).await;
    let issuer = {
        let keys = keys.clone();
        server_naming_itself(move |base| {
            http(
                "200 OK",
                "content-type: application/json\r\n",
                &format!(r#"{{"issuer": "{base}/", "jwks_uri": "{keys}"}}"#),
            )
        })
        .await
    };
    let doc = rampart_authz::openid_discovery_uri(&issuer).unwrap();
    let (found, body) = fetcher().fetch_discovered(&doc, T).await.unwrap();
    assert_eq!((found.as_str(), body.as_str()), (keys.as_str(), JWKS));

    // Another issuer's configuration (a mix-up), and one without keys.
    let other = server_naming_itself(move |_| {
        http(
            "200 OK",
            "",
            r#"{"issuer": "https://elsewhere.example", "jwks_uri": "https://elsewhere.example/k"}"#,
        )
    })
    .await;
    let err = fetcher()
        .fetch_discovered(&rampart_authz::openid_discovery_uri(&other).unwrap(), T)
        .await
        .unwrap_err();
    assert!(
        err.contains("OpenID configuration") && err.contains("elsewhere.example"),
        "{err}"
    );
    let d = "https://idp.example/.well-known/openid-configuration";
    for (body, why) in [
        (r#"{"issuer": "https://idp.example"}"#, "no \"jwks_uri\""),
        (r#"{"jwks_uri": "https://idp.example/k"}"#, "no \"issuer\""),
        (
            r#"{"issuer": "https://idp.example", "jwks_uri": "http://idp.example/k"}"#,
            "plain http",
        ),
        (
            r#"{"issuer": "https://idp.example", "jwks_uri": "file:///etc/passwd"}"#,
            "not an http(s) URL",
        ),
        ("<html>", "not a JSON document"),
    ] {
        let err = discovered_jwks_uri(d, body).unwrap_err();
        assert!(err.contains(why), "{body}: {err}");
    }
    assert_eq!(
        discovered_jwks_uri(
            d,
            r#"{"issuer": "https://idp.example/", "jwks_uri": "https://keys.idp.example/k"}"#
        )
        .as_deref(),
        Ok("https://keys.idp.example/k")
    );
    // A failing key fetch names the jwks_uri it came from.
    let dead = server(None).await;
    let issuer = server_naming_itself(move |base| {
        http(
            "200 OK",
            "",
            &format!(r#"{{"issuer": "{base}", "jwks_uri": "{dead}"}}"#),
        )
    })
    .await;
    let err = fetcher()
        .fetch_discovered(
            &rampart_authz::openid_discovery_uri(&issuer).unwrap(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    assert!(
        err.contains("jwks_uri http://") && err.contains("no complete response"),
        "{err}"
    );
}
