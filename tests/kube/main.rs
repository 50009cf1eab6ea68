//! The operator end to end with real pods: the kube-runtime controller (`run_controller`) against
//! the in-process fake API server (operator/tests/operator/fake_api.rs), plus a StatefulSet and
//! Deployment controller and a "kubelet" written here that run every Pod the operator's
//! workloads describe as a real `shardseek` process, with the Pod's args and env and the
//! ConfigMap's files.
//!
//! How the kubelet stands in for a node:
//! - each pod gets its own IP (127.0.0.N; the downward-API `status.podIP` env var makes the
//!   process listen on it), so every pod uses the ports of cluster.json as in a cluster;
//! - each pod runs in its own mount namespace (`unshare`) where /etc/hosts is this test's hosts
//!   file, which the kubelet keeps as cluster DNS would: one line per ready attention pod for
//!   the attention headless Service, and the stable per-shard names of the expert Service
//!   (publishNotReadyAddresses);
//! - the ConfigMaps' keys are written to a directory per pod and the pod's volume mount paths
//!   (/etc/shardseek, and /etc/shardseek-placement for the optional placement ConfigMap, written
//!   again before each restart as a kubelet keeps ConfigMap volumes current) are translated to
//!   it in args and env;
//! - every pod is published as a Pod object (labels of its template plus the pod-index label of
//!   StatefulSet pods, `status.podIP`, the Ready condition, container restarts), which the
//!   operator's rebalancer reads to find the pods;
//! - readiness is the pod's readinessProbe (`GET /ready` on the metrics port); a pod being
//!   deleted leaves the DNS answer at once and gets SIGTERM (the process drains), SIGKILL after
//!   the grace period; a process that exits is restarted, as `restartPolicy: Always` does;
//! - StatefulSets: pods created and deleted by ordinal (Parallel), template changes rolled one
//!   pod at a time from the highest ordinal, each waiting for the previous to be ready;
//!   Deployments: surge one new pod, remove an old one once it is ready (maxUnavailable 0).
//!
//! Needs root for the mount namespaces: without it the test says it is skipped, unless
//! SHARDSEEK_REQUIRE_NAMESPACES=1 (CI) makes that a failure.

#[path = "../common/mod.rs"]
mod common;

#[allow(dead_code)]
#[path = "../../operator/tests/operator/fake_api.rs"]
mod fake_api;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_api::FakeApi;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shardseek_operator::crd::DeepSeekDeployment;
use shardseek_operator::metrics::Metrics;
use shardseek_operator::{Context, ControllerSettings, run_controller};

const NS: &str = "llm";
const NAME: &str = "t";
const STS: &str = "apps/v1/statefulsets";
const DEPLOY: &str = "apps/v1/deployments";
const CM: &str = "/v1/configmaps";
/// How long the kubelet waits after SIGTERM before SIGKILL (the pods' grace period is 60 s;
/// the tiny model drains in well under a second).
const GRACE: Duration = Duration::from_secs(10);
/// Upper bound of every wait in this test.
const WAIT: Duration = Duration::from_secs(120);
/// The tests of this binary run one at a time: each starts several processes and the rollout
/// test counts failures that CPU starvation by a neighbour would cause.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The kubelet's and the controllers' loop period.
const TICK: Duration = Duration::from_millis(100);

/// One pod: a `shardseek` process in its own mount namespace.
struct PodProc {
    name: String,
    owner: String,
    ordinal: usize,
    ip: String,
    /// The pod template the pod was created from (compared whole, as a revision).
    template: Value,
    /// Whether a StatefulSet owns it (it carries the pod-index label).
    stateful: bool,
    /// The local directory of the placement ConfigMap volume, if the pod mounts it.
    placement_dir: Option<PathBuf>,
    child: Child,
    dir: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    ready: bool,
    /// Since when the pod has been ready (for the workload's minReadySeconds).
    ready_since: Option<Instant>,
    terminating: Option<Instant>,
    starts: u32,
}

impl PodProc {
    fn metrics_url(&self) -> String {
        format!("{}:9090", self.ip)
    }
}

/// The node: every pod process, the hosts file, and how often each pod name was started.
struct Kubelet {
    fake: Arc<FakeApi>,
    root: PathBuf,
    hosts: PathBuf,
    pods: Mutex<Vec<PodProc>>,
    next_ip: AtomicU32,
    /// Process starts per pod name (creations and restarts).
    starts: Mutex<BTreeMap<String, u32>>,
    /// The Pod objects published in the API.
    published: Mutex<Vec<String>>,
    stop: AtomicBool,
}

fn signal(pid: u32, sig: &str) {
    // The pod's process group: unshare, the shell it forks and the exec'd shardseek.
    let _ = Command::new("kill")
        .args([sig, "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

impl Kubelet {
    fn new(fake: Arc<FakeApi>, root: &Path) -> Arc<Self> {
        let hosts = root.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        Arc::new(Self {
            fake,
            root: root.to_path_buf(),
            hosts,
            pods: Mutex::new(Vec::new()),
            next_ip: AtomicU32::new(10),
            starts: Mutex::new(BTreeMap::new()),
            published: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        })
    }

    fn starts_of(&self, name: &str) -> u32 {
        self.starts.lock().unwrap().get(name).copied().unwrap_or(0)
    }

    /// Pod names with their IP and readiness, for assertions.
    fn pods(&self) -> Vec<(String, String, bool, bool)> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.ip.clone(),
                    p.ready,
                    p.terminating.is_some(),
                )
            })
            .collect()
    }

    /// The last `n` lines of the logs of the pods whose name starts with `prefix`.
    fn log_tail(&self, prefix: &str, n: usize) -> String {
        let pods = self.pods.lock().unwrap();
        let mut out = String::new();
        for p in pods.iter().filter(|p| p.name.starts_with(prefix)) {
            let text = std::fs::read_to_string(p.dir.join("log")).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("== {} ({})\n", p.name, p.ip));
            for l in &lines[lines.len().saturating_sub(n)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn ready_ip(&self, prefix: &str) -> Option<String> {
        self.pods
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.name.starts_with(prefix) && p.ready && p.terminating.is_none())
            .map(|p| p.ip.clone())
    }

    /// The ConfigMap's files, the volume mount translated: returns the mount's local dir.
    fn write_config(&self, dir: &Path) -> PathBuf {
        let cm = self
            .fake
            .get(CM, NS, &format!("{NAME}-config"))
            .expect("the operator applied the ConfigMap before the workloads");
        let local = dir.join("etc-shardseek");
        std::fs::create_dir_all(&local).unwrap();
        for (k, v) in cm["data"].as_object().unwrap() {
            std::fs::write(local.join(k), v.as_str().unwrap()).unwrap();
        }
        local
    }

    /// The placement ConfigMap's files (none while it does not exist) in `local`, replacing
    /// what was there: what a pod starting now finds in its optional volume.
    fn write_placement(&self, local: &Path) {
        let _ = std::fs::remove_dir_all(local);
        std::fs::create_dir_all(local).unwrap();
        if let Some(cm) = self.fake.get(CM, NS, &format!("{NAME}-placement")) {
            for (k, v) in cm["data"].as_object().into_iter().flatten() {
                std::fs::write(local.join(k), v.as_str().unwrap()).unwrap();
            }
        }
    }

    fn start_pod(
        &self,
        owner: &str,
        ordinal: usize,
        name: String,
        template: &Value,
        stateful: bool,
    ) -> PodProc {
        let ip = format!("127.0.0.{}", self.next_ip.fetch_add(1, Ordering::Relaxed));
        let dir = self.root.join(&name).join(ip.replace('.', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        let config_dir = self.write_config(&dir);
        let container = &template["spec"]["containers"][0];
        // Volume mounts this kubelet can provide: the ConfigMaps' directories.
        let mut placement_dir = None;
        let mounts: Vec<(String, PathBuf)> = container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| {
                let local = match m["name"].as_str() {
                    Some("config") => config_dir.clone(),
                    Some("placement") => {
                        let local = dir.join("etc-placement");
                        self.write_placement(&local);
                        placement_dir = Some(local.clone());
                        local
                    }
                    _ => return None,
                };
                Some((m["mountPath"].as_str().unwrap().to_string(), local))
            })
            .collect();
        // A mount path is replaced where it is a whole path prefix (`/etc/shardseek` is not the
        // prefix of `/etc/shardseek-placement/...`).
        let translate = |s: &str| {
            for (mount, local) in &mounts {
                if let Some(rest) = s.strip_prefix(mount.as_str())
                    && (rest.is_empty() || rest.starts_with('/'))
                {
                    return format!("{}{rest}", local.display());
                }
            }
            s.to_string()
        };
        let args: Vec<String> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| translate(a.as_str().unwrap()))
            .collect();
        let env: Vec<(String, String)> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let var = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    translate(v)
                } else {
                    match e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap() {
                        "metadata.name" => name.clone(),
                        "status.podIP" => ip.clone(),
                        "metadata.labels['apps.kubernetes.io/pod-index']" => ordinal.to_string(),
                        other => panic!("the kubelet does not know fieldRef {other}"),
                    }
                };
                (var, value)
            })
            .collect();
        let child = self.spawn(&dir, &args, &env);
        *self.starts.lock().unwrap().entry(name.clone()).or_default() += 1;
        PodProc {
            name,
            owner: owner.to_string(),
            ordinal,
            ip,
            template: template.clone(),
            stateful,
            placement_dir,
            child,
            dir,
            args,
            env,
            ready: false,
            ready_since: None,
            terminating: None,
            starts: 1,
        }
    }

    fn spawn(&self, dir: &Path, args: &[String], env: &[(String, String)]) -> Child {
        use std::os::unix::process::CommandExt as _;
        let log = std::fs::File::create(dir.join("log")).unwrap();
        Command::new("unshare")
            .args(["--mount", "--fork", "--", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(&self.hosts)
            .arg(common::bin())
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SHARDSEEK_TERMINATION_LOG", dir.join("termination-log"))
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn a pod process")
    }

    /// The hosts file as cluster DNS would answer: ready attention pods under the attention
    /// Service's name, every expert shard under its stable name.
    fn write_hosts(&self) {
        let mut text = String::from("127.0.0.1 localhost\n");
        for p in self.pods.lock().unwrap().iter() {
            if p.terminating.is_some() {
                continue;
            }
            if p.owner == format!("{NAME}-attention") && p.ready {
                text.push_str(&format!("{} {NAME}-attention.{NS}.svc\n", p.ip));
            }
            if p.owner == format!("{NAME}-experts") {
                text.push_str(&format!(
                    "{} {NAME}-experts-{}.{NAME}-experts.{NS}.svc\n",
                    p.ip, p.ordinal
                ));
            }
        }
        // In place: the pods' bind mounts follow the inode.
        if std::fs::read_to_string(&self.hosts).ok().as_deref() != Some(text.as_str()) {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&self.hosts)
                .unwrap();
            f.write_all(text.as_bytes()).unwrap();
        }
    }

    /// One pass of the kubelet and the two workload controllers.
    fn tick(&self) {
        let mut pods = self.pods.lock().unwrap();
        // Kubelet: probes, restarts, termination.
        for p in pods.iter_mut() {
            if let Some(since) = p.terminating {
                if since.elapsed() > GRACE {
                    signal(p.child.id(), "-KILL");
                }
                continue;
            }
            if let Ok(Some(_)) = p.child.try_wait() {
                // restartPolicy: Always.
                p.ready = false;
                p.ready_since = None;
                if let Some(local) = &p.placement_dir {
                    self.write_placement(local);
                }
                p.child = self.spawn(&p.dir, &p.args, &p.env);
                p.starts += 1;
                *self
                    .starts
                    .lock()
                    .unwrap()
                    .entry(p.name.clone())
                    .or_default() += 1;
                continue;
            }
            p.ready = http_get(&p.metrics_url(), "/ready").is_ok_and(|(code, _)| code == 200);
            p.ready_since = match (p.ready, p.ready_since) {
                (true, None) => Some(Instant::now()),
                (true, since) => since,
                (false, _) => None,
            };
        }
        pods.retain_mut(|p| {
            if p.terminating.is_some() {
                !matches!(p.child.try_wait(), Ok(Some(_)))
            } else {
                true
            }
        });
        let terminate = |p: &mut PodProc| {
            if p.terminating.is_none() {
                p.terminating = Some(Instant::now());
                p.ready = false;
                signal(p.child.id(), "-TERM");
            }
        };

        // StatefulSet controller.
        for sts in self.fake.objects(STS) {
            let name = sts["metadata"]["name"].as_str().unwrap().to_string();
            let replicas = sts["spec"]["replicas"].as_u64().unwrap() as usize;
            let template = sts["spec"]["template"].clone();
            let min_ready =
                Duration::from_secs(sts["spec"]["minReadySeconds"].as_u64().unwrap_or(0));
            let available = |p: &PodProc| p.ready_since.is_some_and(|t| t.elapsed() >= min_ready);
            for p in pods.iter_mut() {
                if p.owner == name && p.ordinal >= replicas {
                    terminate(p);
                }
            }
            for ordinal in 0..replicas {
                let pod_name = format!("{name}-{ordinal}");
                if !pods.iter().any(|p| p.name == pod_name) {
                    let pod = self.start_pod(&name, ordinal, pod_name, &template, true);
                    pods.push(pod);
                }
            }
            let mine: Vec<&PodProc> = pods
                .iter()
                .filter(|p| p.owner == name && p.terminating.is_none())
                .collect();
            // A rolling update moves on only when every pod is available (ready for
            // minReadySeconds).
            let all_ready = mine.iter().all(|p| available(p));
            let outdated = mine
                .iter()
                .filter(|p| p.template != template)
                .map(|p| p.ordinal)
                .max();
            if let (true, Some(ordinal)) = (all_ready, outdated)
                && let Some(p) = pods
                    .iter_mut()
                    .find(|p| p.owner == name && p.ordinal == ordinal)
            {
                terminate(p);
            }
            let current: Vec<&PodProc> = pods
                .iter()
                .filter(|p| p.owner == name && p.terminating.is_none())
                .collect();
            let updated = current.iter().filter(|p| p.template == template).count();
            let revision = revision_of(&template);
            let current_revision = if updated == current.len() && current.len() == replicas {
                revision.clone()
            } else {
                "old".to_string()
            };
            self.set_status(
                STS,
                &name,
                json!({
                    "observedGeneration": sts["metadata"]["generation"],
                    "replicas": current.len(),
                    "readyReplicas": current.iter().filter(|p| p.ready).count(),
                    "availableReplicas": current.iter().filter(|p| available(p)).count(),
                    "updatedReplicas": updated,
                    "currentReplicas": updated,
                    "currentRevision": current_revision,
                    "updateRevision": revision,
                }),
                &sts,
            );
        }

        // Deployment controller: maxSurge 1, maxUnavailable 0.
        for deploy in self.fake.objects(DEPLOY) {
            let name = deploy["metadata"]["name"].as_str().unwrap().to_string();
            let replicas = deploy["spec"]["replicas"].as_u64().unwrap() as usize;
            let template = deploy["spec"]["template"].clone();
            let revision = revision_of(&template);
            let live = |pods: &Vec<PodProc>| -> (usize, usize, usize) {
                let new: Vec<&PodProc> = pods
                    .iter()
                    .filter(|p| {
                        p.owner == name && p.terminating.is_none() && p.template == template
                    })
                    .collect();
                let old = pods
                    .iter()
                    .filter(|p| {
                        p.owner == name && p.terminating.is_none() && p.template != template
                    })
                    .count();
                (new.len(), new.iter().filter(|p| p.ready).count(), old)
            };
            let (new, new_ready, old) = live(&pods);
            if new < replicas && new + old < replicas + 1 {
                let n = pods.iter().filter(|p| p.owner == name).count();
                let pod_name = format!("{name}-{}-{n}", &revision[..8]);
                let pod = self.start_pod(&name, n, pod_name, &template, false);
                pods.push(pod);
            } else if old > 0 && new_ready > 0 && new + old > replicas {
                if let Some(p) = pods
                    .iter_mut()
                    .find(|p| p.owner == name && p.terminating.is_none() && p.template != template)
                {
                    terminate(p);
                }
            } else if new > replicas
                && let Some(p) = pods
                    .iter_mut()
                    .rev()
                    .find(|p| p.owner == name && p.terminating.is_none() && p.template == template)
            {
                terminate(p);
            }
            let (new, new_ready, old) = live(&pods);
            let ready_total = pods
                .iter()
                .filter(|p| p.owner == name && p.terminating.is_none() && p.ready)
                .count();
            self.set_status(
                DEPLOY,
                &name,
                json!({
                    "observedGeneration": deploy["metadata"]["generation"],
                    "replicas": new + old,
                    "readyReplicas": ready_total,
                    "availableReplicas": ready_total,
                    "updatedReplicas": new,
                    "unavailableReplicas": (new + old).saturating_sub(ready_total),
                    "conditions": [{"type": "Available", "status": if new_ready >= replicas { "True" } else { "False" }}],
                }),
                &deploy,
            );
        }
        self.publish_pods(&pods);
        drop(pods);
        self.write_hosts();
    }

    /// The Pod objects as a kubelet reports them: one per pod process, gone with it.
    fn publish_pods(&self, pods: &[PodProc]) {
        let mut published = self.published.lock().unwrap();
        let names: Vec<String> = pods.iter().map(|p| p.name.clone()).collect();
        for gone in published.iter().filter(|n| !names.contains(n)) {
            self.fake.remove("/v1/pods", NS, gone);
        }
        for p in pods {
            let mut labels = p.template["metadata"]["labels"].clone();
            if p.stateful {
                labels["apps.kubernetes.io/pod-index"] = json!(p.ordinal.to_string());
            }
            let container = &p.template["spec"]["containers"][0];
            let pod = json!({
                "metadata": {"name": p.name, "namespace": NS, "labels": labels},
                "status": {
                    "phase": "Running",
                    "podIP": p.ip,
                    "conditions": [{"type": "Ready", "status": if p.ready { "True" } else { "False" }}],
                    "containerStatuses": [{
                        "name": container["name"], "image": container["image"], "imageID": "",
                        "ready": p.ready, "restartCount": p.starts - 1, "state": {"running": {}},
                    }],
                },
            });
            // A terminating pod is published not ready (this fake keeps deletionTimestamp for
            // objects with finalizers only).
            let current = self.fake.get("/v1/pods", NS, &p.name);
            let same = current.as_ref().is_some_and(|c| {
                c["metadata"]["labels"] == pod["metadata"]["labels"] && c["status"] == pod["status"]
            });
            if !same {
                self.fake.put("/v1/pods", NS, pod);
            }
        }
        *published = names;
    }

    fn set_status(&self, collection: &str, name: &str, status: Value, object: &Value) {
        if object["status"] != status {
            self.fake.set_status(collection, NS, name, status);
        }
    }

    fn run(self: Arc<Self>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            while !self.stop.load(Ordering::Relaxed) {
                self.tick();
                std::thread::sleep(TICK);
            }
            let mut pods = self.pods.lock().unwrap();
            for p in pods.iter_mut() {
                signal(p.child.id(), "-KILL");
                let _ = p.child.wait();
            }
        })
    }
}

/// Stops the kubelet and kills its pods when dropped (also when the test fails).
struct NodeGuard(Arc<Kubelet>, Option<std::thread::JoinHandle<()>>);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.1.take() {
            let _ = t.join();
        }
    }
}

fn revision_of(template: &Value) -> String {
    template["metadata"]["annotations"]["shardseek.io/config-hash"]
        .as_str()
        .unwrap_or("0000000000000000")
        .to_string()
}

/// A plain HTTP/1.1 request; returns (status code, body).
fn http(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, String)> {
    let sock: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, payload) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, payload.to_string()))
}

fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http(addr, "GET", path, None)
}

fn chat(router: &str, content: &str) -> std::io::Result<(u16, String)> {
    http(
        router,
        "POST",
        "/v1/chat/completions",
        Some(&json!({
            "model": "tiny-moe",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "temperature": 0
        })),
    )
}

/// `shardseek_generation_tokens_total` of the pod whose metrics are at `addr`.
fn generated_tokens(addr: &str) -> f64 {
    let (_, text) = http_get(addr, "/metrics").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("shardseek_generation_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn namespaces_available() -> bool {
    Command::new("unshare")
        .args(["--mount", "--fork", "--", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The operator against the fake API server, with a kubelet running its pods as processes, on
/// a generated tiny model. Dropping it stops the node (every pod process killed) and the
/// controller, however the test ends.
struct OperatorE2e {
    model_path: String,
    rt: tokio::runtime::Runtime,
    fake: Arc<FakeApi>,
    ctx: Arc<Context>,
    metrics: Arc<Metrics>,
    kubelet: Arc<Kubelet>,
    node: Option<NodeGuard>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    controller: Option<tokio::task::JoinHandle<()>>,
    _model: tempfile::TempDir,
    _root: tempfile::TempDir,
}

impl OperatorE2e {
    /// None (the test skips) where mount namespaces are missing and not required.
    fn start() -> Option<Self> {
        if !namespaces_available() {
            assert!(
                std::env::var_os("SHARDSEEK_REQUIRE_NAMESPACES").is_none(),
                "this test needs mount namespaces (root) and SHARDSEEK_REQUIRE_NAMESPACES is set"
            );
            eprintln!(
                "skipped: mount namespaces (root) are needed to give each pod its /etc/hosts"
            );
            return None;
        }
        let model = common::tiny("fp8");
        let model_path = model.path().to_string_lossy().to_string();
        let root = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        // kube's Client spawns its buffer task on the current runtime.
        let runtime = rt.enter();
        let fake = Arc::new(rt.block_on(FakeApi::start()));
        let settings = ControllerSettings {
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(5),
            resync: Duration::from_secs(2),
            reporter_instance: Some("e2e".into()),
        };
        let metrics = Arc::new(Metrics::new().unwrap());
        let ctx = Context::new(fake.client(), metrics.clone(), settings);
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        let controller = rt.spawn(run_controller(ctx.clone(), Some(NS.into()), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        let kubelet = Kubelet::new(fake.clone(), root.path());
        let node = NodeGuard(kubelet.clone(), Some(kubelet.clone().run()));
        drop(runtime);
        Some(OperatorE2e {
            model_path,
            rt,
            fake,
            ctx,
            metrics,
            kubelet,
            node: Some(node),
            stop_tx,
            controller: Some(controller),
            _model: model,
            _root: root,
        })
    }

    /// Creates the DeepSeekDeployment `NAME` of the tiny model with `experts` as its experts
    /// spec, and waits until the operator reports it Available.
    fn create_tiny(&self, experts: Value) {
        let _runtime = self.rt.enter();
        let api: Api<DeepSeekDeployment> = Api::namespaced(self.fake.client(), NS);
        let path = &self.model_path;
        let dsd: DeepSeekDeployment = serde_json::from_value(json!({
            "apiVersion": "shardseek.io/v1alpha1",
            "kind": "DeepSeekDeployment",
            "metadata": {"name": NAME, "namespace": NS},
            "spec": {
                "image": "ghcr.io/shardseek/shardseek:0.1.0",
                "model": {"servedName": "tiny-moe", "path": path, "volume": {"hostPath": {"path": path}}},
                "attention": {"replicas": 1, "maxBatchTokens": 512, "maxSeqLen": 1024},
                "experts": experts,
                "router": {"replicas": 1}
            }
        }))
        .unwrap();
        self.rt
            .block_on(api.create(&PostParams::default(), &dsd))
            .expect("create");
        wait_for("the deployment to be Available", || {
            self.fake
                .get("shardseek.io/v1alpha1/deepseekdeployments", NS, NAME)
                .and_then(|d| d.pointer("/status/phase").cloned())
                == Some(json!("Available"))
        });
    }
}

impl Drop for OperatorE2e {
    fn drop(&mut self) {
        drop(self.node.take());
        let _ = self.stop_tx.send(true);
        if let Some(controller) = self.controller.take() {
            self.rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(20), controller).await;
            });
        }
    }
}

#[test]
fn operator_pods_run_as_processes() {
    let _serial = serial();
    let Some(e2e) = OperatorE2e::start() else {
        return;
    };
    let (rt, fake, kubelet) = (&e2e.rt, &e2e.fake, &e2e.kubelet);
    // kube's Client spawns its buffer task on the current runtime.
    let _runtime = rt.enter();

    // 1. Apply a DeepSeekDeployment; 2. pods start and the operator reports Available.
    let api: Api<DeepSeekDeployment> = Api::namespaced(fake.client(), NS);
    e2e.create_tiny(json!({"shards": 2}));
    let available = || {
        fake.get("shardseek.io/v1alpha1/deepseekdeployments", NS, NAME)
            .and_then(|d| d.pointer("/status/phase").cloned())
            == Some(json!("Available"))
    };
    let router = format!(
        "{}:8080",
        kubelet
            .ready_ip(&format!("{NAME}-router"))
            .expect("a ready router")
    );

    // 3. The router answers a chat request.
    let (code, body) = chat(&router, "Hello!").expect("chat");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("chat.completion"), "{body}");

    // 4. Scale attention 1 → 2: no shard or router restarts, and the router uses the new pod.
    let before: Vec<(String, u32)> = ["experts-0", "experts-1"]
        .iter()
        .map(|s| format!("{NAME}-{s}"))
        .map(|n| (n.clone(), kubelet.starts_of(&n)))
        .collect();
    let routers_before: Vec<String> = kubelet
        .pods()
        .into_iter()
        .filter(|p| p.0.starts_with(&format!("{NAME}-router")))
        .map(|p| p.0)
        .collect();
    rt.block_on(api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"attention": {"replicas": 2}}})),
    ))
    .expect("scale");
    let new_pod = format!("{NAME}-attention-1");
    wait_for("the second attention pod to be ready", || {
        kubelet.pods().iter().any(|p| p.0 == new_pod && p.2)
    });
    let new_metrics = format!("{}:9090", kubelet.ready_ip(&new_pod).unwrap());
    // Within the router's discovery interval (5 s) it sends to the new pod.
    let deadline = Instant::now() + Duration::from_secs(30);
    while generated_tokens(&new_metrics) == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the router never used {new_pod}; pods {:?}; router log:\n{}",
            kubelet.pods(),
            kubelet.log_tail(&format!("{NAME}-router"), 30)
        );
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let router = router.clone();
                std::thread::spawn(move || chat(&router, &format!("request {i}")))
            })
            .collect();
        for h in handles {
            let (code, body) = h.join().unwrap().expect("chat");
            assert_eq!(code, 200, "{body}");
        }
    }
    for (name, starts) in &before {
        assert_eq!(
            kubelet.starts_of(name),
            *starts,
            "{name} restarted on scale"
        );
    }
    let routers_after: Vec<String> = kubelet
        .pods()
        .into_iter()
        .filter(|p| p.0.starts_with(&format!("{NAME}-router")))
        .map(|p| p.0)
        .collect();
    assert_eq!(routers_before, routers_after, "no router pod was replaced");
    wait_for("Available after scaling", available);

    // 5. A spec change while a load generator runs: maxBatchTokens rolls the attention pods
    //    (one at a time); shards and router stay. Every request must succeed: a pod being
    //    replaced leaves the DNS answer and drains, and the router retries a request that had
    //    not started on another pod.
    let stop_load = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let load: Vec<_> = (0..3)
        .map(|i| {
            let (router, stop, ok, failed, failures) = (
                router.clone(),
                stop_load.clone(),
                ok.clone(),
                failed.clone(),
                failures.clone(),
            );
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match chat(&router, &format!("load {i} {n}")) {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            let mut f = failures.lock().unwrap();
                            if f.len() < 5 {
                                f.push(format!("{other:?}"));
                            }
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let attention_starts = |k: &Kubelet| {
        (0..2)
            .map(|i| k.starts_of(&format!("{NAME}-attention-{i}")))
            .sum::<u32>()
    };
    let attention_before = attention_starts(kubelet);
    let started = Instant::now();
    rt.block_on(api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"attention": {"maxBatchTokens": 256}}})),
    ))
    .expect("spec change");
    let rolled = || {
        let sts = fake.get(STS, NS, &format!("{NAME}-attention")).unwrap();
        sts["status"]["updatedReplicas"] == 2
            && sts["status"]["readyReplicas"] == 2
            && sts["status"]["currentRevision"] == sts["status"]["updateRevision"]
    };
    wait_for("the attention pods to roll", || {
        attention_starts(kubelet) >= attention_before + 2 && rolled()
    });
    wait_for("Available after the rollout", available);
    let rollout = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    stop_load.store(true, Ordering::Relaxed);
    for h in load {
        h.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "rolling 2 attention pods under load took {:.1} s: {ok} requests succeeded, {failed} failed {:?}",
        rollout.as_secs_f64(),
        failures.lock().unwrap()
    );
    assert!(ok > 0, "the load generator ran");
    assert_eq!(
        failed,
        0,
        "requests failed during the rollout; starts {:?}; logs:\n{}{}",
        kubelet.starts.lock().unwrap(),
        kubelet.log_tail(&format!("{NAME}-router"), 20),
        kubelet.log_tail(&format!("{NAME}-attention"), 8)
    );
    for (name, starts) in &before {
        assert_eq!(
            kubelet.starts_of(name),
            *starts,
            "{name} restarted by the rollout"
        );
    }
}

/// The `shardseek_operator_rebalances_total` rounds of every outcome.
fn rounds(metrics: &Metrics) -> u64 {
    ["published", "unchanged", "no_load", "failed"]
        .iter()
        .map(|o| metrics.rebalances.with_label_values(&[o]).get())
        .sum()
}

/// Online EPLB under Kubernetes (issue 14): the operator runs the rebalancer of a deployment
/// that sets `experts.rebalanceIntervalSeconds` against its real pods (found by Pod IP), a
/// skewed workload gets a new placement published with `status.placementVersion` ≥ 2, the
/// ConfigMap `t-placement` holds the table every shard and pod serves, a killed shard comes back
/// on it, removing the field stops the rounds (and rolls no pod), and so does deleting the object.
#[test]
fn operator_rebalances_the_experts_of_running_pods() {
    let _serial = serial();
    let Some(e2e) = OperatorE2e::start() else {
        return;
    };
    use kube::runtime::reflector::ObjectRef;
    use shardseek_proto::v1::expert_client::ExpertClient;
    use shardseek_proto::v1::placement_client::PlacementClient;
    use shardseek_proto::v1::{InfoRequest, LoadRequest};
    use shardseek_router::{KeptTable, Placement};
    const DSD: &str = "shardseek.io/v1alpha1/deepseekdeployments";

    let (rt, fake, kubelet, ctx, metrics) =
        (&e2e.rt, &e2e.fake, &e2e.kubelet, &e2e.ctx, &e2e.metrics);
    let _runtime = rt.enter();
    let api: Api<DeepSeekDeployment> = Api::namespaced(fake.client(), NS);
    e2e.create_tiny(json!({"shards": 2, "rebalanceIntervalSeconds": 10}));
    let object = ObjectRef::<DeepSeekDeployment>::new(NAME).within(NS);
    wait_for("the rebalancer to start", || {
        ctx.rebalancers.is_running(&object)
    });
    let status_version = || {
        fake.get(DSD, NS, NAME).and_then(|d| {
            d.pointer("/status/placementVersion")
                .and_then(Value::as_u64)
        })
    };
    assert_eq!(status_version(), Some(1), "the initial table is version 1");
    let router = format!(
        "{}:8080",
        kubelet
            .ready_ip(&format!("{NAME}-router"))
            .expect("a ready router")
    );

    // 1. A skewed workload (one prompt, so the same experts are chosen) until a round publishes.
    let deadline = Instant::now() + WAIT;
    while status_version() < Some(2) {
        assert!(
            Instant::now() < deadline,
            "no placement was published; rounds {}; operator events {:?}; attention log:\n{}",
            rounds(metrics),
            fake.objects("events.k8s.io/v1/events")
                .iter()
                .map(|e| e["note"].clone())
                .collect::<Vec<_>>(),
            kubelet.log_tail(&format!("{NAME}-attention"), 10)
        );
        let (code, body) = chat(&router, "Tell me about the sea.").expect("chat");
        assert_eq!(code, 200, "{body}");
    }
    assert!(
        metrics.rebalances.with_label_values(&["published"]).get() >= 1,
        "the round is counted"
    );
    let events = fake.objects("events.k8s.io/v1/events");
    let published = events
        .iter()
        .find(|e| e["reason"] == "PlacementPublished")
        .unwrap_or_else(|| panic!("a PlacementPublished event: {events:?}"));
    eprintln!("event: {}", published["note"]);

    // 2. Without load no round publishes: the status, the kept table, every shard and the
    //    attention pod agree on the version in force, and each shard holds its experts.
    let ip_of = |pod: &str| {
        kubelet
            .pods()
            .into_iter()
            .find(|p| p.0 == pod && p.2)
            .map(|p| p.1)
    };
    let agreement = || -> Result<(Placement, u64), String> {
        let cm = fake
            .get(CM, NS, &format!("{NAME}-placement"))
            .ok_or("no placement ConfigMap")?;
        let kept = KeptTable::from_json(cm["data"]["placement.json"].as_str().ok_or("no key")?)
            .map_err(|e| e.to_string())?;
        if let Some(p) = &kept.previous {
            return Err(format!(
                "the publication of version {} (from {}) is still under way",
                kept.current.version(),
                p.version()
            ));
        }
        let table = kept.current;
        let status = status_version().ok_or("no status version")?;
        if status != table.version() {
            return Err(format!("status {status}, kept table {}", table.version()));
        }
        rt.block_on(async {
            for shard in 0..2 {
                let ip = ip_of(&format!("{NAME}-experts-{shard}")).ok_or("shard not ready")?;
                let info = ExpertClient::connect(format!("http://{ip}:50053"))
                    .await
                    .map_err(|e| e.to_string())?
                    .info(InfoRequest {})
                    .await
                    .map_err(|e| format!("{e:?}"))?
                    .into_inner();
                let held: Vec<usize> = info.experts.iter().map(|&e| e as usize).collect();
                if info.accepted_versions != [status] || held != table.experts_of(shard) {
                    return Err(format!(
                        "shard {shard} serves version {} with experts {held:?}; the table {status} gives it {:?}",
                        info.placement_version,
                        table.experts_of(shard)
                    ));
                }
            }
            let ip = ip_of(&format!("{NAME}-attention-0")).ok_or("pod not ready")?;
            let load = PlacementClient::connect(format!("http://{ip}:50052"))
                .await
                .map_err(|e| e.to_string())?
                .load(LoadRequest {})
                .await
                .map_err(|e| format!("{e:?}"))?
                .into_inner();
            if load.placement_version != status {
                return Err(format!(
                    "the attention pod routes with version {}, not {status}",
                    load.placement_version
                ));
            }
            Ok((table, status))
        })
    };
    let mut last = Err(String::new());
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        last = agreement();
        if last.is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (table, version) = last.expect("the processes agree with the kept table");
    assert!(version >= 2);
    eprintln!(
        "placement version {version} in force after {} rounds: shard 0 holds {:?}, shard 1 {:?}",
        rounds(metrics),
        table.experts_of(0),
        table.experts_of(1)
    );

    // 3. A shard that dies comes back on the kept table, and requests succeed. The load counted
    //    just before is not lost with the rebalancer the restart replaces: the attention pod
    //    keeps it until a finished round (the new rebalancer's) has used it.
    for _ in 0..3 {
        let (code, body) = chat(&router, "Tell me about the sea.").expect("chat");
        assert_eq!(code, 200, "{body}");
    }
    let unused = || -> Result<u64, String> {
        let ip = ip_of(&format!("{NAME}-attention-0")).ok_or("pod not ready")?;
        rt.block_on(async {
            let load = PlacementClient::connect(format!("http://{ip}:50052"))
                .await
                .map_err(|e| e.to_string())?
                .load(LoadRequest {})
                .await
                .map_err(|e| format!("{e:?}"))?
                .into_inner();
            Ok(load
                .expert_pairs
                .iter()
                .zip(&load.consumed_pairs)
                .map(|(n, used)| n - used)
                .sum())
        })
    };
    let shard = format!("{NAME}-experts-1");
    let starts = kubelet.starts_of(&shard);
    let pid = kubelet
        .pods
        .lock()
        .unwrap()
        .iter()
        .find(|p| p.name == shard)
        .map(|p| p.child.id())
        .expect("shard process");
    signal(pid, "-KILL");
    wait_for("the shard to restart and be ready", || {
        kubelet.starts_of(&shard) > starts && ip_of(&shard).is_some()
    });
    let log = kubelet.log_tail(&shard, 200);
    assert!(
        log.contains("starting on the kept placement table")
            && log.contains(&format!("\"version\":{version}")),
        "the restarted shard did not start on version {version}:\n{log}"
    );
    // Without redundant slots, requests that route to the shard fail until the attention pod's
    // transport has reconnected to it (it retries with backoff); then they succeed again.
    wait_for("requests to succeed after the shard restart", || {
        chat(&router, "Tell me about the sea.").is_ok_and(|(code, _)| code == 200)
    });
    // (A round may be publishing a version for the load above: agreement is retried.)
    let deadline = Instant::now() + WAIT;
    let mut last = agreement();
    while last.is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        last = agreement();
    }
    let (again, _) = last.expect("the restarted shard serves the table in force");
    assert!(again.version() >= table.version());
    wait_for(
        "the replacing rebalancer to use the load counted before the restart",
        || unused().is_ok_and(|n| n == 0),
    );

    // 4. Removing the field stops the rounds and rolls no pod; the pods keep the table.
    let pod_starts: Vec<(String, u32)> = kubelet
        .pods()
        .into_iter()
        .map(|p| (p.0.clone(), kubelet.starts_of(&p.0)))
        .collect();
    rt.block_on(api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"experts": {"rebalanceIntervalSeconds": null}}})),
    ))
    .expect("remove the interval");
    wait_for("the rebalancer to stop", || {
        !ctx.rebalancers.is_running(&object)
    });
    let counted = rounds(metrics);
    let kept = status_version();
    let quiet_until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < quiet_until {
        let (code, body) = chat(&router, "Count to ten.").expect("chat");
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(
        rounds(metrics),
        counted,
        "a round ran after the field was removed"
    );
    assert_eq!(status_version(), kept, "the version in force stays");
    assert!(
        fake.get(CM, NS, &format!("{NAME}-placement")).is_some(),
        "the kept table stays for restarted pods"
    );
    for (name, n) in &pod_starts {
        assert_eq!(kubelet.starts_of(name), *n, "{name} restarted");
    }

    // 5. Deleting the object stops its rebalancer (the operator sees no reconcile for it: the
    //    rebalancer checks the object before each round).
    rt.block_on(api.patch(
        NAME,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"experts": {"rebalanceIntervalSeconds": 10}}})),
    ))
    .expect("set the interval again");
    wait_for("the rebalancer to start again", || {
        ctx.rebalancers.is_running(&object)
    });
    rt.block_on(api.delete(NAME, &Default::default()))
        .expect("delete");
    wait_for("the rebalancer of the deleted object to stop", || {
        !ctx.rebalancers.is_running(&object)
    });
}

/// DESIGN.md §5: a pod sizes its KV cache so that one max-length sequence fits. On a model with
/// v3-slice's attention shape (3 layers of DeepSeek-V3's MLA, a 163840-token context), at default
/// settings, a chat request without `max_tokens` (which asks for the rest of the context) is
/// admitted and streams; the fixed 1 GiB f32 cache of before held 155k tokens and refused it.
/// The routed experts are shrunk (8 experts of width 256, one group) so the checkpoint is 1.6 GB
/// instead of 4.7 GB; the KV cache does not depend on them.
#[test]
fn chat_without_max_tokens_on_v3_slice_at_default_settings() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::bin())
        .args(["model", "gen", "--preset", "v3-slice", "--out"])
        .arg(dir.path())
        .args([
            "--set",
            "n_routed_experts=8",
            "--set",
            "n_group=1",
            "--set",
            "topk_group=1",
            "--set",
            "moe_intermediate_size=256",
            "--set",
            "intermediate_size=2048",
        ])
        .output()
        .expect("model gen");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["max_position_embeddings"], 163_840);
    assert_eq!(config["num_hidden_layers"], 3);
    assert_eq!(config["kv_lora_rank"], 512);
    let (_up, addr) = common::up(dir.path(), 0, &[]);
    let model = dir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello! Who are you?"}],
        "stream": true
    })
    .to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // The answer may run to the end of the context: read until a few tokens have streamed, then
    // hang up (the router frees the request).
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("\"content\":\"").count() < 4 {
        let n = s.read(&mut buf).expect("read the stream");
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(seen.contains("chat.completion.chunk"), "{seen}");
}

/// One max-length sequence that does not fit the KV cache: `refuse` (the default) exits with the
/// numbers, written where the kubelet reads the termination message; `cap` starts with the
/// longest length that fits and warns.
#[test]
fn kv_cache_that_cannot_hold_one_sequence_refuses_or_caps() {
    let _serial = serial();
    let model = common::tiny("fp8");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("termination-log");
    let m = model.path().to_string_lossy().to_string();
    let args = [
        "worker",
        "--role",
        "attention",
        "--model",
        &m,
        "--max-seq-len",
        "4096",
        "--kv-cache-memory",
        "1Mi",
    ];
    let out = Command::new(common::bin())
        .args(args)
        .env("SHARDSEEK_TERMINATION_LOG", &log)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "a refused KV cache must fail the worker"
    );
    let message = std::fs::read_to_string(&log).expect("termination message written");
    assert!(
        message.contains("max_seq_len 4096") && message.contains("1048576 bytes"),
        "{message}"
    );
    assert!(message.contains("--kv-cache-memory"), "{message}");

    let capped = common::spawn(&[&args[..], &["--kv-cache-on-overflow", "cap"]].concat());
    common::wait_line(&capped, "READY", Duration::from_secs(60));
}
