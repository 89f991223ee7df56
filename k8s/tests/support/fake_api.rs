//! A FAKE Kubernetes API server, in process: NO real cluster is involved in the tests that use
//! it. It is a `tower` service answering the REST paths rampart-k8s uses, under a real
//! `kube::Client`:
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: tokens registered with
//!   [`FakeApi::add_token`] review as a real API server would (status.audiences is the
//!   intersection of the requested and the token's audiences; none in common is
//!   unauthenticated); [`FakeApi::add_token_status`] answers a fixed status instead;
//!   unknown tokens are unauthenticated.
//! - Namespaced and cluster-scoped objects under `/api/v1/...` and `/apis/<group>/<version>/...`:
//!   GET (404 NotFound), list and watch (with `fieldSelector=spec.nodeName=X`,
//!   `metadata.name=X` and `metadata.namespace=X`), POST create (409 AlreadyExists when the name is taken), PUT replace
//!   (409 Conflict on a stale `metadata.resourceVersion`), PATCH with a JSON Patch (a failed
//!   `test` operation is 422), DELETE. Every write bumps one
//!   global resourceVersion, as etcd's revision.
//! - [`FakeApi::hold_gets`] makes the next N GETs of one object wait for each other, so two
//!   callers both see "not found" before either creates it (the create race).
//! - Lists and watches as kube-runtime's watchers use them: a list of all namespaces
//!   (`/api/v1/pods`) gathers every namespace's objects; `?watch=true&resourceVersion=N`
//!   streams newline-delimited JSON WatchEvents (`ADDED`, `MODIFIED`, `DELETED`) of every
//!   write after revision N, then a `BOOKMARK` (when `allowWatchBookmarks=true`) at the
//!   current revision, and stays open for later writes until `timeoutSeconds`.
//!   [`FakeApi::alias_version`] serves one group version as another (as the API server
//!   serves one `security.istio.io` object at v1 and v1beta1).
//!   [`FakeApi::fail_watches`] cuts a collection's open watches and answers its watches and
//!   lists with 500s (an API outage), to test that a source keeps its last snapshot.
//!
//! Every request is logged ([`FakeApi::calls`]) so tests can assert what was (not) asked.
//! [`FakeApi::serve_http`] serves the same fake over plain HTTP on loopback, for tests that
//! run the `rampart` binary with a kubeconfig (tests/ca_kubernetes_e2e.rs).

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde_json::{Value, json};

/// One registered token: what the fake API server knows about it.
#[derive(Debug, Clone)]
pub struct FakeToken {
    /// `system:serviceaccount:<ns>:<sa>` (or anything, to test refusals).
    pub username: String,
    /// The audiences the token was issued for.
    pub audiences: Vec<String>,
    /// `user.extra` (pod-name, pod-uid, node-name claims).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl FakeToken {
    /// A service-account token for `audiences`, bound to nothing.
    pub fn service_account(ns: &str, sa: &str, audiences: &[&str]) -> Self {
        FakeToken {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
            extra: BTreeMap::new(),
        }
    }

    /// Bound to a Pod (name and UID claims).
    pub fn bound_to_pod(mut self, pod: &str, uid: &str) -> Self {
        self.extra.insert(
            "authentication.kubernetes.io/pod-name".into(),
            vec![pod.into()],
        );
        self.extra.insert(
            "authentication.kubernetes.io/pod-uid".into(),
            vec![uid.into()],
        );
        self
    }

    /// With the node-name claim (Kubernetes 1.32+ bound tokens).
    pub fn on_node(mut self, node: &str) -> Self {
        self.extra.insert(
            "authentication.kubernetes.io/node-name".into(),
            vec![node.into()],
        );
        self
    }
}

/// One write, as a watch replays it.
struct Change {
    revision: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    /// Every write, in revision order (watches replay from here).
    log: Vec<Change>,
    /// (served prefix, stored prefix): `/apis/g/v1beta1` read from `/apis/g/v1`.
    aliases: Vec<(String, String)>,
    /// Collections whose lists and watches fail (500).
    failing: Vec<String>,
    /// Collections whose creates, replaces and deletes are forbidden (403, as without RBAC).
    refused_writes: Vec<String>,
    /// (collection path, name) -> object
    objects: BTreeMap<(String, String), Value>,
    revision: u64,
    tokens: HashMap<String, FakeToken>,
    fixed_status: HashMap<String, Value>,
    calls: Vec<String>,
    /// (collection, name) -> (GETs still to hold, barrier)
    gates: HashMap<(String, String), (usize, Arc<tokio::sync::Barrier>)>,
}

/// The fake API server. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// The current revision, for watches waiting for writes.
    revision: tokio::sync::watch::Sender<u64>,
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi {
            state: Arc::default(),
            revision: tokio::sync::watch::Sender::new(0),
        }
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serve `served` (e.g. `/apis/security.istio.io/v1beta1`) from the objects stored
    /// under `stored` (`/apis/security.istio.io/v1`): one object at two versions.
    pub fn alias_version(&self, served: &str, stored: &str) {
        self.lock()
            .aliases
            .push((served.to_owned(), stored.to_owned()));
    }

    /// Lists and watches of `collection` (e.g. `/api/v1/pods`) fail with 500 while `on`;
    /// open watches of it end.
    pub fn fail_watches(&self, collection: &str, on: bool) {
        let mut st = self.lock();
        st.failing.retain(|c| c != collection);
        if on {
            st.failing.push(collection.to_owned());
        }
        // Wake open watches so they see the outage.
        self.revision.send_replace(st.revision);
    }

    /// Creates, replaces and deletes in `collection` (e.g.
    /// `/api/v1/namespaces/istio-system/configmaps`) answer 403 Forbidden while `on`, as when
    /// the caller's Role lacks the verb.
    pub fn refuse_writes(&self, collection: &str, on: bool) {
        let mut st = self.lock();
        st.refused_writes.retain(|c| c != collection);
        if on {
            st.refused_writes.push(collection.to_owned());
        }
    }

    /// Every stored object of `collection` (a namespaced one, or all namespaces).
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        let st = self.lock();
        st.objects
            .iter()
            .filter(|((c, _), _)| in_collection(c, collection))
            .map(|(_, o)| o.clone())
            .collect()
    }

    fn record(&self, st: &mut State, collection: &str, kind: &'static str, object: Value) {
        st.log.push(Change {
            revision: st.revision,
            collection: collection.to_owned(),
            kind,
            object,
        });
        self.revision.send_replace(st.revision);
    }

    /// A real `kube::Client` whose every request this fake answers.
    pub fn client(&self) -> kube::Client {
        let fake = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, Infallible>(fake.handle(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add_token(&self, token: &str, t: FakeToken) {
        self.lock().tokens.insert(token.into(), t);
    }

    /// Forgets `token` (as when its Pod is deleted): its reviews become unauthenticated.
    pub fn remove_token(&self, token: &str) {
        self.lock().tokens.remove(token);
    }

    /// The TokenReview of `token` answers exactly `status` (to test a misbehaving server).
    pub fn add_token_status(&self, token: &str, status: Value) {
        self.lock().fixed_status.insert(token.into(), status);
    }

    /// Stores `obj` in `collection` (e.g. `/api/v1/namespaces/ns1/pods`) as if created.
    pub fn put(&self, collection: &str, mut obj: Value) {
        let mut st = self.lock();
        st.revision += 1;
        let rv = st.revision.to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_owned();
        obj["metadata"]["resourceVersion"] = json!(rv);
        let key = (collection.to_owned(), name);
        let kind = match st.objects.get(&key) {
            Some(old) => {
                if obj["metadata"]["uid"].is_null() {
                    obj["metadata"]["uid"] = old["metadata"]["uid"].clone();
                }
                "MODIFIED"
            }
            None => "ADDED",
        };
        if obj["metadata"]["uid"].is_null() {
            obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
        }
        st.objects.insert(key, obj.clone());
        self.record(&mut st, collection, kind, obj);
    }

    /// A Pod `ns/name` of service account `sa` scheduled on `node`.
    pub fn add_pod(&self, ns: &str, name: &str, sa: &str, node: &str, uid: &str) {
        self.put(
            &format!("/api/v1/namespaces/{ns}/pods"),
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "uid": uid},
                "spec": {"serviceAccountName": sa, "nodeName": node, "containers": [{"name": "app"}]},
                "status": {"phase": "Running"}
            }),
        );
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(collection.to_owned(), name.to_owned()))
            .cloned()
    }

    pub fn delete(&self, collection: &str, name: &str) -> Option<Value> {
        let mut st = self.lock();
        st.revision += 1;
        let mut gone = st
            .objects
            .remove(&(collection.to_owned(), name.to_owned()))?;
        gone["metadata"]["resourceVersion"] = json!(st.revision.to_string());
        self.record(&mut st, collection, "DELETED", gone.clone());
        Some(gone)
    }

    /// Every request so far, as `METHOD /path?query`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// How many requests so far start with `prefix` (e.g. `POST /apis/authentication`).
    pub fn count(&self, prefix: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.starts_with(prefix))
            .count()
    }

    /// The next `n` GETs of `collection`/`name` each wait until all `n` have arrived.
    pub fn hold_gets(&self, collection: &str, name: &str, n: usize) {
        self.lock().gates.insert(
            (collection.to_owned(), name.to_owned()),
            (n, Arc::new(tokio::sync::Barrier::new(n))),
        );
    }

    /// Serves this fake over plain HTTP on a loopback port (for a `rampart` process given a
    /// kubeconfig pointing at it). The task ends when the runtime does.
    pub async fn serve_http(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let fake = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = fake.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.handle(req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        addr
    }

    async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body,
        B::Error: std::fmt::Display,
    {
        let query = req.uri().query().unwrap_or("").to_owned();
        if req.method() == Method::GET && query.split('&').any(|p| p == "watch=true") {
            let path = req.uri().path().to_owned();
            self.lock().calls.push(format!("GET {path}?{query}"));
            return self.watch(&path, &query);
        }
        self.handle_plain(req).await.map(BodyExt::boxed_unsync)
    }

    /// A watch: the writes after `resourceVersion`, then a bookmark, then writes as they
    /// happen, as newline-delimited JSON WatchEvents.
    fn watch(&self, path: &str, query: &str) -> Response<Body> {
        let param = |k: &str| {
            query
                .split('&')
                .find_map(|p| p.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
                .map(percent_decode)
        };
        let Some((collection, None)) = split(path) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route {path}"),
            )
            .map(BodyExt::boxed_unsync);
        };
        if self.lock().failing.contains(&collection) {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcd is down",
            )
            .map(BodyExt::boxed_unsync);
        }
        let from: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bookmarks = param("allowWatchBookmarks").as_deref() == Some("true");
        let timeout = param("timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290u64);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
        let (stored, version) = self.served(&collection);
        let selectors = field_selectors(query);
        let fake = self.clone();
        let rx = self.revision.subscribe();
        struct W {
            fake: FakeApi,
            rx: tokio::sync::watch::Receiver<u64>,
            next: u64,
            bookmark: bool,
        }
        let w = W {
            fake,
            rx,
            next: from,
            bookmark: bookmarks,
        };
        let stream = futures::stream::unfold(w, move |mut w| {
            let stored = stored.clone();
            let selectors = selectors.clone();
            let version = version.clone();
            let requested = collection.clone();
            async move {
                loop {
                    let (lines, current) = {
                        let st = w.fake.lock();
                        // An outage cuts open watches too.
                        if st.failing.contains(&requested) {
                            return None;
                        }
                        let lines: Vec<String> = st
                            .log
                            .iter()
                            .filter(|c| {
                                c.revision > w.next
                                    && in_collection(&c.collection, &stored)
                                    && selected(&c.object, &selectors)
                            })
                            .map(|c| {
                                let mut o = c.object.clone();
                                if let Some(v) = &version {
                                    o["apiVersion"] = json!(v);
                                }
                                json!({"type": c.kind, "object": o}).to_string()
                            })
                            .collect();
                        (lines, st.revision)
                    };
                    w.next = w.next.max(current);
                    let mut text = String::new();
                    for l in lines {
                        text.push_str(&l);
                        text.push('\n');
                    }
                    if w.bookmark {
                        w.bookmark = false;
                        let (api_version, kind) = type_of(&stored, version.as_deref());
                        text.push_str(
                            &json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                                "metadata": {"resourceVersion": current.to_string()}}})
                            .to_string(),
                        );
                        text.push('\n');
                    }
                    if !text.is_empty() {
                        return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(text))), w));
                    }
                    tokio::select! {
                        r = w.rx.changed() => if r.is_err() { return None },
                        () = tokio::time::sleep_until(deadline) => return None,
                    }
                }
            }
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("response")
    }

    /// The stored collection a served one reads, and the apiVersion to rewrite objects
    /// to when it is an alias.
    fn served(&self, collection: &str) -> (String, Option<String>) {
        let st = self.lock();
        for (served, stored) in &st.aliases {
            if let Some(rest) = collection.strip_prefix(served.as_str()) {
                let version = served.trim_start_matches("/apis/").to_owned();
                return (format!("{stored}{rest}"), Some(version));
            }
        }
        (collection.to_owned(), None)
    }

    async fn handle_plain<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        self.lock().calls.push(format!(
            "{} {}{}{}",
            parts.method,
            path,
            if query.is_empty() { "" } else { "?" },
            query
        ));
        if path == "/apis/authentication.k8s.io/v1/tokenreviews" && parts.method == Method::POST {
            return self.token_review(&body);
        }
        let Some((collection, name)) = split(&path) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no route {path}"),
            );
        };
        if parts.method != Method::GET && self.lock().refused_writes.contains(&collection) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "{collection} is forbidden: {} refused by the test's RBAC",
                    parts.method
                ),
            );
        }
        match (parts.method.clone(), name) {
            (Method::GET, Some(name)) => {
                let gate = {
                    let mut st = self.lock();
                    match st.gates.get_mut(&(collection.clone(), name.clone())) {
                        Some((left, barrier)) if *left > 0 => {
                            *left -= 1;
                            Some(barrier.clone())
                        }
                        _ => None,
                    }
                };
                // Read on arrival, answer after the others arrived: every held GET sees
                // the object as it was before any of them could act on the answer.
                let found = self.get(&collection, &name);
                if let Some(b) = gate {
                    b.wait().await;
                }
                match found {
                    Some(obj) => ok(StatusCode::OK, &obj),
                    None => not_found(&collection, &name),
                }
            }
            (Method::GET, None) => self.list(&collection, &query),
            (Method::POST, None) => {
                let mut obj: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
                };
                let Some(name) = obj["metadata"]["name"].as_str().map(str::to_owned) else {
                    return status(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        "metadata.name: Required value",
                    );
                };
                let mut st = self.lock();
                let key = (collection.clone(), name.clone());
                if st.objects.contains_key(&key) {
                    return status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        &format!("{collection} \"{name}\" already exists"),
                    );
                }
                st.revision += 1;
                let rv = st.revision.to_string();
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                if let Some(ns) = namespace_of(&collection) {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                st.objects.insert(key, obj.clone());
                self.record(&mut st, &collection, "ADDED", obj.clone());
                ok(StatusCode::CREATED, &obj)
            }
            (Method::PUT, Some(name)) => {
                let mut obj: Value = match serde_json::from_slice(&body) {
                    Ok(v) => v,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
                };
                let mut st = self.lock();
                let key = (collection.clone(), name.clone());
                let Some(current) = st.objects.get(&key) else {
                    return not_found(&collection, &name);
                };
                let sent = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !sent.is_empty()
                    && sent
                        != current["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap_or("")
                {
                    return status(
                        StatusCode::CONFLICT,
                        "Conflict",
                        &format!(
                            "Operation cannot be fulfilled on {collection} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let uid = current["metadata"]["uid"].clone();
                st.revision += 1;
                obj["metadata"]["resourceVersion"] = json!(st.revision.to_string());
                obj["metadata"]["uid"] = uid;
                st.objects.insert(key, obj.clone());
                self.record(&mut st, &collection, "MODIFIED", obj.clone());
                ok(StatusCode::OK, &obj)
            }
            (Method::PATCH, Some(name)) => {
                // JSON Patch only (application/json-patch+json), as rampart-k8s sends it; a
                // failed `test` operation is 422 Invalid, as on a real API server.
                let ctype = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ctype != "application/json-patch+json" {
                    return status(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        &format!("the fake applies JSON Patch only, not {ctype}"),
                    );
                }
                let patch: json_patch::Patch = match serde_json::from_slice(&body) {
                    Ok(p) => p,
                    Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
                };
                let mut st = self.lock();
                let key = (collection.clone(), name.clone());
                let Some(current) = st.objects.get(&key) else {
                    return not_found(&collection, &name);
                };
                let mut obj = current.clone();
                if let Err(e) = json_patch::patch(&mut obj, &patch) {
                    return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &e.to_string());
                }
                st.revision += 1;
                obj["metadata"]["resourceVersion"] = json!(st.revision.to_string());
                st.objects.insert(key, obj.clone());
                self.record(&mut st, &collection, "MODIFIED", obj.clone());
                ok(StatusCode::OK, &obj)
            }
            (Method::DELETE, Some(name)) => match self.delete(&collection, &name) {
                Some(_) => ok(
                    StatusCode::OK,
                    &json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}),
                ),
                None => not_found(&collection, &name),
            },
            (m, _) => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!("{m} {path}"),
            ),
        }
    }

    fn list(&self, collection: &str, query: &str) -> Response<Full<Bytes>> {
        let selectors = field_selectors(query);
        let (stored, version) = self.served(collection);
        let st = self.lock();
        if st.failing.iter().any(|c| c == collection) {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "etcd is down",
            );
        }
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((c, _), _)| in_collection(c, &stored))
            .map(|(_, o)| {
                let mut o = o.clone();
                if let Some(v) = &version {
                    o["apiVersion"] = json!(v);
                }
                o
            })
            .filter(|o| selected(o, &selectors))
            .collect();
        ok(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": st.revision.to_string()}, "items": items}),
        )
    }

    fn token_review(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let req: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        };
        let token = req["spec"]["token"].as_str().unwrap_or("").to_owned();
        let wanted: Vec<String> = req["spec"]["audiences"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect();
        let st = self.lock();
        let status_v = if let Some(fixed) = st.fixed_status.get(&token) {
            fixed.clone()
        } else if let Some(t) = st.tokens.get(&token) {
            let common: Vec<&String> = wanted.iter().filter(|a| t.audiences.contains(a)).collect();
            if !wanted.is_empty() && common.is_empty() {
                json!({"authenticated": false, "error": "[invalid bearer token, token audiences are invalid for the target audiences]"})
            } else {
                json!({
                    "authenticated": true,
                    "audiences": if wanted.is_empty() { t.audiences.iter().collect::<Vec<_>>() } else { common },
                    "user": {"username": t.username, "uid": "u-1", "groups": ["system:serviceaccounts"], "extra": t.extra}
                })
            }
        } else {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        };
        let mut answer = req.clone();
        answer["status"] = status_v;
        ok(StatusCode::CREATED, &answer)
    }
}

/// Whether objects stored in `stored` belong to the requested `collection`: the same one,
/// or `collection` is the all-namespaces form (`/api/v1/pods`) of `stored`
/// (`/api/v1/namespaces/<ns>/pods`).
fn in_collection(stored: &str, collection: &str) -> bool {
    if stored == collection {
        return true;
    }
    let Some((prefix, resource)) = collection.rsplit_once('/') else {
        return false;
    };
    stored
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix("/namespaces/"))
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(ns, res)| !ns.is_empty() && res == resource)
}

/// The `fieldSelector` of a list or watch query: `(field, wanted value)` pairs.
fn field_selectors(query: &str) -> Vec<(String, String)> {
    let mut selectors = Vec::new();
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("fieldSelector=") {
            let v = percent_decode(v);
            for sel in v.split(',') {
                if let Some((k, want)) = sel.split_once('=') {
                    selectors.push((k.to_owned(), want.to_owned()));
                }
            }
        }
    }
    selectors
}

/// Whether object `o` has every field `selectors` asks for (the fields the fake knows).
fn selected(o: &Value, selectors: &[(String, String)]) -> bool {
    selectors.iter().all(|(k, want)| {
        let got = match k.as_str() {
            "spec.nodeName" => o["spec"]["nodeName"].as_str(),
            "metadata.name" => o["metadata"]["name"].as_str(),
            "metadata.namespace" => o["metadata"]["namespace"].as_str(),
            _ => None,
        };
        got.unwrap_or("") == want
    })
}

/// (apiVersion, kind) of the objects of a collection, for bookmarks.
fn type_of(collection: &str, version: Option<&str>) -> (String, String) {
    let segs: Vec<&str> = collection.trim_start_matches('/').split('/').collect();
    let api_version = match (version, segs.as_slice()) {
        (Some(v), _) => v.to_owned(),
        (None, ["api", v, ..]) => (*v).to_owned(),
        (None, ["apis", g, v, ..]) => format!("{g}/{v}"),
        _ => String::new(),
    };
    let kind = match segs.last().copied().unwrap_or("") {
        "pods" => "Pod",
        "services" => "Service",
        "namespaces" => "Namespace",
        "events" => "Event",
        "secrets" => "Secret",
        "configmaps" => "ConfigMap",
        "authorizationpolicies" => "AuthorizationPolicy",
        "peerauthentications" => "PeerAuthentication",
        "requestauthentications" => "RequestAuthentication",
        _ => "Unknown",
    };
    (api_version, kind.to_owned())
}

/// `(collection, name)` of an object path.
fn split(path: &str) -> Option<(String, Option<String>)> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prefix_len = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    if segs.len() <= prefix_len {
        return None;
    }
    let rest = &segs[prefix_len..];
    let coll_len = if rest[0] == "namespaces" && rest.len() >= 3 {
        3
    } else {
        1
    };
    if rest.len() > coll_len + 1 {
        return None;
    }
    let collection = format!("/{}", segs[..prefix_len + coll_len].join("/"));
    Some((collection, rest.get(coll_len).map(|s| s.to_string())))
}

fn namespace_of(collection: &str) -> Option<&str> {
    let mut it = collection.split('/');
    while let Some(s) = it.next() {
        if s == "namespaces" {
            return it.next();
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn ok(code: StatusCode, v: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    ok(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn not_found(collection: &str, name: &str) -> Response<Full<Bytes>> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{collection} \"{name}\" not found"),
    )
}

/// An unsigned JWT-shaped token whose payload says `exp` (seconds since the epoch) and
/// `marker` (to make tokens distinct). Only the fake API server "verifies" it, by lookup.
pub fn fake_jwt(exp: u64, marker: &str) -> String {
    use base64::Engine as _;
    let enc = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        enc(&json!({"alg": "RS256", "kid": "k"})),
        enc(&json!({"exp": exp, "sub": marker, "aud": ["istio-ca"]}))
    )
}
