//! An in-process stand-in for the Kubernetes API server, enough for the operator's calls.
//!
//! It speaks the real wire protocol over HTTP on 127.0.0.1:0, so the operator runs unchanged:
//! kube's `Client`, the kube-runtime `Controller` with its watchers, `finalizer()`, the events
//! `Recorder`, and the Lease calls of leader election. What it implements:
//! - get, list (with equality label selectors), watch (newline-delimited events resumed from a
//!   `resourceVersion`), create, replace and patch (optimistic concurrency on a
//!   `metadata.resourceVersion` the body carries: 409 when it is not the stored one), delete
//!   (finalizers defer it: `deletionTimestamp` is set and the object goes when the last
//!   finalizer does);
//! - patch: JSON patch (test/add/remove/replace), merge patch, and server-side apply modelled per
//!   field manager: the applied fields are merged in, and fields this manager applied before but
//!   no longer sends are removed, so other writers' fields (finalizers, status) survive;
//! - the `/status` subresource: main-resource writes keep the stored status, status writes touch
//!   only the status;
//! - `resourceVersion` from one global counter, bumped only when a write changes the object
//!   (so a no-op apply is visible as such), and `metadata.generation` bumped when anything
//!   outside metadata and status changes;
//! - API discovery of `monitoring.coreos.com/v1` (404 unless enabled);
//! - injected faults: the next N requests matching a method and path fail with a given code.
//!
//! What it does not do, and so what the tests do not cover: admission, schema validation and
//! defaulting (CEL rules are checked separately with kube-cel), the garbage collector (owner
//! references are checked on the objects, not acted on), the StatefulSet/Deployment controllers
//! and kubelets (tests write workload status themselves), RBAC, and field-level ownership
//! conflicts between managers.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// Identifies one collection: `group/version/resource` (`group` empty for core).
pub type Collection = String;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub collection: Collection,
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug)]
struct WatchEvent {
    rv: u64,
    collection: Collection,
    namespace: String,
    kind: &'static str,
    object: Value,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    pub method: Method,
    pub path: String,
    pub at: Instant,
    /// The response status code.
    pub code: u16,
    /// Whether the request changed stored state.
    pub changed: bool,
}

struct Fault {
    method: Method,
    path_contains: String,
    remaining: u32,
    code: u16,
}

#[derive(Default)]
struct Store {
    rv: u64,
    uid: u64,
    objects: BTreeMap<Key, Value>,
    events: Vec<WatchEvent>,
    /// Last applied configuration per (object, field manager, subresource).
    applied: HashMap<(Key, String, bool), Value>,
    faults: Vec<Fault>,
    log: Vec<Logged>,
    monitoring: bool,
}

/// A running fake API server; stops when dropped.
pub struct FakeApi {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    notify: broadcast::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone)]
struct AppState {
    store: Arc<Mutex<Store>>,
    notify: broadcast::Sender<()>,
}

/// The kind of the objects of a resource (plural), for list responses and created objects.
fn kind_of(resource: &str) -> &'static str {
    match resource {
        "deepseekdeployments" => "DeepSeekDeployment",
        "statefulsets" => "StatefulSet",
        "deployments" => "Deployment",
        "services" => "Service",
        "configmaps" => "ConfigMap",
        "poddisruptionbudgets" => "PodDisruptionBudget",
        "pods" => "Pod",
        "events" => "Event",
        "leases" => "Lease",
        "servicemonitors" => "ServiceMonitor",
        _ => "Unknown",
    }
}

struct Target {
    group_version: String,
    collection: Collection,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

/// Parses `/api/v1/...` and `/apis/GROUP/VERSION/...`; `Err(gv)` for a bare discovery path.
fn parse_path(path: &str) -> Option<Result<Target, String>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, name, status) = match rest {
        [] => return Some(Err(group_version)),
        [resource] => (*resource, None, false),
        [resource, name] => (*resource, Some(name.to_string()), false),
        [resource, name, "status"] => (*resource, Some(name.to_string()), true),
        _ => return None,
    };
    Some(Ok(Target {
        collection: format!("{group}/{version}/{resource}"),
        group_version,
        resource: resource.to_string(),
        namespace,
        name,
        status,
    }))
}

fn status_response(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(body),
    )
        .into_response()
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    uri.query().map(url_decode_pairs).unwrap_or_default()
}

fn url_decode_pairs(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn matches_selector(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = object.pointer("/metadata/labels");
    selector.split(',').all(|term| {
        let Some((k, v)) = term.split_once('=') else {
            return false;
        };
        let v = v.trim_start_matches('=');
        labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v)
    })
}

/// Deep merge for server-side apply: fields in `previous` (this manager's last apply) missing
/// from `applied` are removed; maps merge recursively; lists and scalars replace.
fn apply_merge(target: &mut Value, previous: Option<&Value>, applied: &Value) {
    match (target.as_object_mut(), applied.as_object()) {
        (Some(target), Some(applied)) => {
            if let Some(previous) = previous.and_then(Value::as_object) {
                for key in previous.keys() {
                    if !applied.contains_key(key) {
                        target.remove(key);
                    }
                }
            }
            for (key, value) in applied {
                let previous_child = previous.and_then(|p| p.get(key));
                match target.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        apply_merge(existing, previous_child, value)
                    }
                    _ => {
                        target.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        _ => *target = applied.clone(),
    }
}

/// RFC 7386 merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(map) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn pointer_parts(path: &str) -> Vec<String> {
    path.split('/')
        .skip(1)
        .map(|p| p.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// RFC 6902 JSON patch (the operations kube's finalizer helper uses, plus replace).
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    for op in ops.as_array().ok_or("json patch must be a list")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let parts = pointer_parts(path);
        let (last, parents) = parts.split_last().ok_or("empty path")?;
        let parent_path: String = parents.iter().map(|p| format!("/{p}")).collect();
        match op["op"].as_str() {
            Some("test") => {
                let current = target.pointer(path).cloned().unwrap_or(Value::Null);
                if current != op["value"] {
                    return Err(format!("test failed at {path}"));
                }
            }
            Some("add") | Some("replace") => {
                let parent = target
                    .pointer_mut(&parent_path)
                    .ok_or(format!("no parent for {path}"))?;
                match parent {
                    Value::Object(map) => {
                        map.insert(last.clone(), op["value"].clone());
                    }
                    Value::Array(list) => {
                        if last == "-" {
                            list.push(op["value"].clone());
                        } else {
                            let i: usize = last.parse().map_err(|_| format!("bad index {last}"))?;
                            if op["op"] == "add" {
                                if i > list.len() {
                                    return Err(format!("index {i} out of range"));
                                }
                                list.insert(i, op["value"].clone());
                            } else {
                                *list.get_mut(i).ok_or(format!("index {i} out of range"))? =
                                    op["value"].clone();
                            }
                        }
                    }
                    _ => return Err(format!("parent of {path} is not a container")),
                }
            }
            Some("remove") => {
                let parent = target
                    .pointer_mut(&parent_path)
                    .ok_or(format!("no parent for {path}"))?;
                match parent {
                    Value::Object(map) => {
                        map.remove(last).ok_or(format!("nothing at {path}"))?;
                    }
                    Value::Array(list) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index {last}"))?;
                        if i >= list.len() {
                            return Err(format!("index {i} out of range"));
                        }
                        list.remove(i);
                    }
                    _ => return Err(format!("parent of {path} is not a container")),
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    Ok(())
}

fn without_meta_and_status(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
        map.remove("apiVersion");
        map.remove("kind");
    }
    copy
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, key: &Key, kind: &'static str, object: Value, rv: u64) {
        self.events.push(WatchEvent {
            rv,
            collection: key.collection.clone(),
            namespace: key.namespace.clone(),
            kind,
            object,
        });
    }

    /// Stores `new` as the next version of `key` (created when `old` is `None`) if it differs.
    /// Returns the stored object and whether anything changed.
    fn commit(
        &mut self,
        key: &Key,
        old: Option<&Value>,
        mut new: Value,
        group_version: &str,
        resource: &str,
    ) -> (Value, bool) {
        if let Some(map) = new.as_object_mut() {
            map.insert("apiVersion".into(), json!(group_version));
            map.insert("kind".into(), json!(kind_of(resource)));
        }
        let Some(old) = old else {
            self.uid += 1;
            let rv = self.next_rv();
            let uid = format!("uid-{}", self.uid);
            let meta = new
                .as_object_mut()
                .map(|m| m.entry("metadata").or_insert_with(|| json!({})));
            if let Some(Value::Object(meta)) = meta {
                meta.insert("uid".into(), json!(uid));
                meta.insert("resourceVersion".into(), json!(rv.to_string()));
                meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
                meta.insert("generation".into(), json!(1));
                if !key.namespace.is_empty() {
                    meta.insert("namespace".into(), json!(key.namespace));
                }
            }
            self.objects.insert(key.clone(), new.clone());
            self.record(key, "ADDED", new.clone(), rv);
            return (new, true);
        };
        // System metadata is the server's.
        for field in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
        ] {
            let pointer = format!("/metadata/{field}");
            match (old.pointer(&pointer), new.pointer_mut("/metadata")) {
                (Some(value), Some(Value::Object(meta))) => {
                    meta.insert(field.into(), value.clone());
                }
                (None, Some(Value::Object(meta))) => {
                    meta.remove(field);
                }
                _ => {}
            }
        }
        if new == *old {
            return (new, false);
        }
        let rv = self.next_rv();
        let spec_changed = without_meta_and_status(&new) != without_meta_and_status(old);
        if let Some(Value::Object(meta)) = new.pointer_mut("/metadata") {
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            if spec_changed {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    + 1;
                meta.insert("generation".into(), json!(generation));
            }
        }
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        let finalizers_left = new
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            self.objects.remove(key);
            self.record(key, "DELETED", new.clone(), rv);
        } else {
            self.objects.insert(key.clone(), new.clone());
            self.record(key, "MODIFIED", new.clone(), rv);
        }
        (new, true)
    }
}

impl FakeApi {
    /// Starts the server on 127.0.0.1:0.
    pub async fn start() -> Self {
        let store = Arc::new(Mutex::new(Store::default()));
        let (notify, _) = broadcast::channel(1024);
        let state = AppState {
            store: store.clone(),
            notify: notify.clone(),
        };
        let app = axum::Router::new().fallback(handle).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            store,
            notify,
            server,
        }
    }

    /// A kube client talking to this server over plain HTTP.
    pub fn client(&self) -> kube::Client {
        let uri: http::Uri = format!("http://{}", self.addr).parse().expect("uri");
        let config = kube::Config::new(uri);
        kube::Client::try_from(config).expect("client")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves `monitoring.coreos.com/v1` discovery with `servicemonitors`.
    pub fn enable_monitoring(&self) {
        self.lock().monitoring = true;
    }

    /// The next `times` requests with `method` whose path contains `path_contains` fail with `code`.
    pub fn fail(&self, method: Method, path_contains: &str, times: u32, code: u16) {
        self.lock().faults.push(Fault {
            method,
            path_contains: path_contains.to_string(),
            remaining: times,
            code,
        });
    }

    /// A stored object.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = Key {
            collection: collection.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        self.lock().objects.get(&key).cloned()
    }

    /// Every stored object's resourceVersion.
    pub fn versions(&self) -> BTreeMap<Key, String> {
        self.lock()
            .objects
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.pointer("/metadata/resourceVersion")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect()
    }

    /// Keys of stored objects in `collection`.
    pub fn names(&self, collection: &str) -> Vec<String> {
        self.lock()
            .objects
            .keys()
            .filter(|k| k.collection == collection)
            .map(|k| k.name.clone())
            .collect()
    }

    /// Every stored object of `collection`.
    pub fn objects(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|(k, _)| k.collection == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The request log.
    pub fn log(&self) -> Vec<Logged> {
        self.lock().log.clone()
    }

    /// Creates or replaces a whole object (spec and status), as a kubelet publishes its Pods.
    pub fn put(&self, collection: &str, namespace: &str, object: Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .expect("metadata.name")
            .to_string();
        let key = Key {
            collection: collection.to_string(),
            namespace: namespace.to_string(),
            name,
        };
        {
            let mut store = self.lock();
            let old = store.objects.get(&key).cloned();
            let (group_version, resource) = split_collection(collection);
            store.commit(&key, old.as_ref(), object, &group_version, &resource);
        }
        let _ = self.notify.send(());
    }

    /// Deletes a stored object if it exists (finalizers aside), as a kubelet removes a Pod.
    pub fn remove(&self, collection: &str, namespace: &str, name: &str) {
        let key = Key {
            collection: collection.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        {
            let mut store = self.lock();
            let Some(old) = store.objects.remove(&key) else {
                return;
            };
            let rv = store.next_rv();
            store.record(&key, "DELETED", old, rv);
        }
        let _ = self.notify.send(());
    }

    /// Replaces the status of a stored object, as a workload controller would.
    pub fn set_status(&self, collection: &str, namespace: &str, name: &str, status: Value) {
        let key = Key {
            collection: collection.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        {
            let mut store = self.lock();
            let old = store
                .objects
                .get(&key)
                .cloned()
                .expect("object to set status on");
            let mut new = old.clone();
            new["status"] = status;
            let (group_version, resource) = split_collection(collection);
            store.commit(&key, Some(&old), new, &group_version, &resource);
        }
        let _ = self.notify.send(());
    }
}

fn split_collection(collection: &str) -> (String, String) {
    let mut parts = collection.splitn(3, '/');
    let group = parts.next().unwrap_or("");
    let version = parts.next().unwrap_or("");
    let resource = parts.next().unwrap_or("");
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    (gv, resource.to_string())
}

async fn handle(
    State(state): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    request: Request,
) -> Response {
    let body = axum::body::to_bytes(request.into_body(), 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let path = uri.path().to_string();
    let query = query_map(&uri);
    // Injected faults first.
    {
        let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        let fault = store
            .faults
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method == method && path.contains(&f.path_contains));
        if let Some(fault) = fault {
            fault.remaining -= 1;
            let code = fault.code;
            store.log.push(Logged {
                method: method.clone(),
                path: path.clone(),
                at: Instant::now(),
                code,
                changed: false,
            });
            return status_response(
                code,
                "InternalError",
                format!("injected fault on {method} {path}"),
            );
        }
    }
    let Some(parsed) = parse_path(&path) else {
        return status_response(404, "NotFound", format!("no route {path}"));
    };
    let target = match parsed {
        Ok(target) => target,
        Err(group_version) => {
            let monitoring = state
                .store
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .monitoring;
            if group_version == "monitoring.coreos.com/v1" && monitoring {
                return axum::Json(json!({
                    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                    "resources": [{"name": "servicemonitors", "singularName": "servicemonitor", "namespaced": true,
                                   "kind": "ServiceMonitor", "verbs": ["get", "list", "watch", "create", "patch", "delete"]}]
                }))
                .into_response();
            }
            return status_response(
                404,
                "NotFound",
                format!("the server could not find {group_version}"),
            );
        }
    };
    if method == Method::GET
        && target.name.is_none()
        && query.get("watch").is_some_and(|w| w == "true" || w == "1")
    {
        return watch(state, target, query).await;
    }
    let (response, code, changed) = {
        let mut store = state.store.lock().unwrap_or_else(|p| p.into_inner());
        let (response, changed) = serve(&mut store, &method, &target, &query, &headers, &body);
        let code = response.status().as_u16();
        store.log.push(Logged {
            method: method.clone(),
            path: path.clone(),
            at: Instant::now(),
            code,
            changed,
        });
        (response, code, changed)
    };
    let _ = code;
    if changed {
        let _ = state.notify.send(());
    }
    response
}

fn serve(
    store: &mut Store,
    method: &Method,
    target: &Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> (Response, bool) {
    let namespace = target.namespace.clone().unwrap_or_default();
    let key = |name: &str| Key {
        collection: target.collection.clone(),
        namespace: namespace.clone(),
        name: name.to_string(),
    };
    // Boxed: a Response is large, and this is only the error path.
    let parse_body = || {
        serde_json::from_slice::<Value>(body)
            .map_err(|e| Box::new(status_response(400, "BadRequest", e.to_string())))
    };
    match (method, &target.name) {
        (&Method::GET, None) => {
            let items: Vec<Value> = store
                .objects
                .iter()
                .filter(|(k, _)| {
                    k.collection == target.collection
                        && (target.namespace.is_none() || k.namespace == namespace)
                })
                .filter(|(_, v)| matches_selector(v, query.get("labelSelector")))
                .map(|(_, v)| v.clone())
                .collect();
            let list = json!({
                "apiVersion": target.group_version, "kind": format!("{}List", kind_of(&target.resource)),
                "metadata": {"resourceVersion": store.rv.to_string()}, "items": items,
            });
            (axum::Json(list).into_response(), false)
        }
        (&Method::GET, Some(name)) => match store.objects.get(&key(name)) {
            Some(object) => (axum::Json(object.clone()).into_response(), false),
            None => (
                status_response(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", target.resource),
                ),
                false,
            ),
        },
        (&Method::POST, None) => {
            let mut object = match parse_body() {
                Ok(v) => v,
                Err(r) => return (*r, false),
            };
            let Some(name) = object
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .map(str::to_string)
            else {
                return (
                    status_response(422, "Invalid", "metadata.name is required".into()),
                    false,
                );
            };
            if store.objects.contains_key(&key(&name)) {
                return (
                    status_response(
                        409,
                        "AlreadyExists",
                        format!("{} \"{name}\" already exists", target.resource),
                    ),
                    false,
                );
            }
            if let Some(map) = object.as_object_mut() {
                map.remove("status");
            }
            let (stored, changed) = store.commit(
                &key(&name),
                None,
                object,
                &target.group_version,
                &target.resource,
            );
            (
                (StatusCode::CREATED, axum::Json(stored)).into_response(),
                changed,
            )
        }
        (&Method::PUT, Some(name)) => {
            let object = match parse_body() {
                Ok(v) => v,
                Err(r) => return (*r, false),
            };
            let Some(old) = store.objects.get(&key(name)).cloned() else {
                return (
                    status_response(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", target.resource),
                    ),
                    false,
                );
            };
            let sent_rv = object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            let stored_rv = old
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str);
            if sent_rv.is_some() && sent_rv != stored_rv {
                return (
                    status_response(
                        409,
                        "Conflict",
                        format!(
                            "the object has been modified; resourceVersion {sent_rv:?} is not {stored_rv:?}"
                        ),
                    ),
                    false,
                );
            }
            let new = if target.status {
                let mut new = old.clone();
                new["status"] = object.get("status").cloned().unwrap_or(Value::Null);
                new
            } else {
                let mut new = object;
                match old.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => {
                        if let Some(map) = new.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                new
            };
            let (stored, changed) = store.commit(
                &key(name),
                Some(&old),
                new,
                &target.group_version,
                &target.resource,
            );
            (axum::Json(stored).into_response(), changed)
        }
        (&Method::PATCH, Some(name)) => {
            let patch = match parse_body() {
                Ok(v) => v,
                Err(r) => return (*r, false),
            };
            let content_type = headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let existing = store.objects.get(&key(name)).cloned();
            // A resourceVersion in the patch is a precondition, as on a real API server.
            if let Some(sent) = patch
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
            {
                let stored = existing
                    .as_ref()
                    .and_then(|o| o.pointer("/metadata/resourceVersion"))
                    .and_then(Value::as_str);
                if stored != Some(sent) {
                    return (
                        status_response(
                            409,
                            "Conflict",
                            format!(
                                "the object has been modified; resourceVersion {sent:?} is not {stored:?}"
                            ),
                        ),
                        false,
                    );
                }
            }
            let mut new = existing
                .clone()
                .unwrap_or_else(|| json!({"metadata": {"name": name}}));
            if content_type.starts_with("application/apply-patch") {
                let manager = query.get("fieldManager").cloned().unwrap_or_default();
                let applied_key = (key(name), manager, target.status);
                let previous = store.applied.get(&applied_key).cloned();
                let applied = if target.status {
                    json!({"status": patch.get("status").cloned().unwrap_or(Value::Null)})
                } else {
                    let mut p = patch.clone();
                    if let Some(map) = p.as_object_mut() {
                        map.remove("status");
                    }
                    p
                };
                apply_merge(&mut new, previous.as_ref(), &applied);
                store.applied.insert(applied_key, applied);
            } else if existing.is_none() {
                return (
                    status_response(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", target.resource),
                    ),
                    false,
                );
            } else if content_type.starts_with("application/json-patch") {
                if let Err(message) = json_patch(&mut new, &patch) {
                    return (status_response(422, "Invalid", message), false);
                }
            } else {
                merge_patch(&mut new, &patch);
            }
            // The status subresource: each endpoint writes only its part.
            match (&existing, target.status) {
                (Some(old), true) => {
                    let status = new.get("status").cloned();
                    new = old.clone();
                    match status {
                        Some(status) => new["status"] = status,
                        None => {
                            if let Some(map) = new.as_object_mut() {
                                map.remove("status");
                            }
                        }
                    }
                }
                (Some(old), false) => match old.get("status") {
                    Some(status) => new["status"] = status.clone(),
                    None => {
                        if let Some(map) = new.as_object_mut() {
                            map.remove("status");
                        }
                    }
                },
                (None, true) => {
                    return (
                        status_response(
                            404,
                            "NotFound",
                            format!("{} \"{name}\" not found", target.resource),
                        ),
                        false,
                    );
                }
                (None, false) => {}
            }
            let (stored, changed) = store.commit(
                &key(name),
                existing.as_ref(),
                new,
                &target.group_version,
                &target.resource,
            );
            (axum::Json(stored).into_response(), changed)
        }
        (&Method::DELETE, Some(name)) => {
            let Some(old) = store.objects.get(&key(name)).cloned() else {
                return (
                    status_response(
                        404,
                        "NotFound",
                        format!("{} \"{name}\" not found", target.resource),
                    ),
                    false,
                );
            };
            let has_finalizers = old
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            if has_finalizers {
                if old.pointer("/metadata/deletionTimestamp").is_some() {
                    return (axum::Json(old).into_response(), false);
                }
                let mut new = old.clone();
                new["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
                // `commit` keeps the old deletionTimestamp (system metadata), so write it here.
                let rv = store.next_rv();
                new["metadata"]["resourceVersion"] = json!(rv.to_string());
                store.objects.insert(key(name), new.clone());
                store.record(&key(name), "MODIFIED", new.clone(), rv);
                (axum::Json(new).into_response(), true)
            } else {
                let rv = store.next_rv();
                store.objects.remove(&key(name));
                store.record(&key(name), "DELETED", old.clone(), rv);
                (axum::Json(old).into_response(), true)
            }
        }
        _ => (
            status_response(
                405,
                "MethodNotAllowed",
                format!("{method} not supported here"),
            ),
            false,
        ),
    }
}

async fn watch(state: AppState, target: Target, query: HashMap<String, String>) -> Response {
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let selector = query.get("labelSelector").cloned();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let mut notified = state.notify.subscribe();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut sent = from;
        loop {
            let since = sent;
            let batch: Vec<String> = {
                let store = state.store.lock().unwrap_or_else(|p| p.into_inner());
                store
                    .events
                    .iter()
                    .filter(|e| e.rv > since && e.collection == target.collection)
                    .filter(|e| {
                        target
                            .namespace
                            .as_ref()
                            .is_none_or(|ns| *ns == e.namespace)
                    })
                    .filter(|e| matches_selector(&e.object, selector.as_ref()))
                    .map(|e| {
                        sent = sent.max(e.rv);
                        format!("{}\n", json!({"type": e.kind, "object": e.object}))
                    })
                    .collect()
            };
            for line in batch {
                if tx.send(Ok(Bytes::from(line))).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = notified.recv() => {}
                () = tokio::time::sleep_until(deadline) => return,
                () = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap_or_else(|_| status_response(500, "InternalError", "building watch response".into()))
}
