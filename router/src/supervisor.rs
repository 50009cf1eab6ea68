//! The process supervisor behind `shardseek up`: starts the processes of a local cluster, waits
//! until each says it is ready, restarts a child that dies (when its [`Restart`] policy says so,
//! with exponential backoff, as a kubelet restarts a crashed container) while the others keep
//! serving, and stops all of them on Ctrl-C/SIGTERM or when asked, so that no process outlives
//! the cluster.
//!
//! Readiness is a line `READY <addr>` on the child's stdout (what `shardseek worker` and
//! `shardseek router` print once they listen); the rest of its stdout is relayed to ours with a
//! `[name]` prefix, and the supervisor's own events (start with pid, exit, restart) are lines
//! prefixed `[supervisor]`. Each child runs in its own process group (so the terminal's Ctrl-C
//! reaches only the supervisor, which then stops children in order, and so a stop reaches the
//! child's own children too), and asks the kernel for `SIGKILL` when its parent dies
//! (`PR_SET_PDEATHSIG`), so even a supervisor killed with `SIGKILL` leaves no orphans. (The
//! kernel sends that signal when the *thread* that forked exits: children are spawned from the
//! async context — a runtime worker thread that lives as long as the runtime — never from
//! `spawn_blocking`, whose idle threads exit.) A restarted child keeps its arguments, so it
//! comes back on the same address and its clients reconnect to it.
//!
//! Restarts are counted in `shardseek_supervisor_restarts_total{child}` in
//! [`Supervisor::registry`], which `shardseek up` serves on its own `/metrics`.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{Error, Result};

/// The line prefix a child prints on stdout once it serves.
pub const READY_PREFIX: &str = "READY ";
/// Prefix of the supervisor's own event lines on stdout.
pub const EVENT_PREFIX: &str = "[supervisor] ";
/// Loading a large model's shard from disk can take minutes; the tiny model takes a second.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Time between SIGTERM and SIGKILL: a worker drains in-flight requests in well under this.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);
/// First restart delay: long enough that a child crashing at start does not spin a core, short
/// enough that a shard killed once is back within a second (its clients' reconnect back-off is
/// 200 ms too).
pub const DEFAULT_RESTART_BACKOFF: Duration = Duration::from_millis(200);
/// The delay doubles per consecutive crash up to this cap (the kubelet's cap is 5 minutes; a
/// local cluster wants its parts back sooner).
pub const DEFAULT_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// A child that ran this long before dying is considered to have been healthy: its next
/// restart starts again from the first delay.
pub const DEFAULT_STABLE_AFTER: Duration = Duration::from_secs(30);

/// What happens when a child exits on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    /// It stays down; with [`SupervisorConfig::stop_on_child_exit`] the cluster stops.
    Never,
    /// It is started again with the same arguments after a backoff (kubelet `Always`).
    Always,
}

/// A child process, as data.
#[derive(Clone, Debug)]
pub struct ChildSpec {
    /// Short name for logs and errors, e.g. `expert-2`.
    pub name: String,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Wait for a `READY <addr>` line before starting the next child.
    pub wait_ready: bool,
    pub restart: Restart,
}

impl ChildSpec {
    pub fn new(name: impl Into<String>, program: impl Into<String>, args: &[&str]) -> Self {
        ChildSpec {
            name: name.into(),
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            wait_ready: true,
            restart: Restart::Never,
        }
    }

    /// The same child with restart policy `restart`.
    pub fn restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }
}

/// Settings of a [`Supervisor`].
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub ready_timeout: Duration,
    pub grace: Duration,
    /// Stop everything when a child with [`Restart::Never`] exits on its own.
    pub stop_on_child_exit: bool,
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    pub stable_after: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            ready_timeout: DEFAULT_READY_TIMEOUT,
            grace: DEFAULT_GRACE,
            stop_on_child_exit: true,
            restart_backoff: DEFAULT_RESTART_BACKOFF,
            restart_backoff_max: DEFAULT_RESTART_BACKOFF_MAX,
            stable_after: DEFAULT_STABLE_AFTER,
        }
    }
}

impl SupervisorConfig {
    /// The delay before restart number `crashes` (0-based) of a run of consecutive crashes.
    pub fn backoff(&self, crashes: u32) -> Duration {
        let factor = 1u32.checked_shl(crashes.min(16)).unwrap_or(u32::MAX);
        self.restart_backoff
            .saturating_mul(factor)
            .min(self.restart_backoff_max)
    }
}

/// Why [`Supervisor::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// SIGINT (Ctrl-C) or SIGTERM.
    Signal(&'static str),
    /// A child exited by itself; its name and status.
    ChildExited { name: String, status: String },
}

struct Running {
    spec: ChildSpec,
    pid: i32,
    ready_addr: Option<String>,
    exited: Option<ExitStatus>,
    /// Its current process has not been reaped yet (`exited` stays `None` when waiting failed).
    alive: bool,
    /// When the current process was started.
    started: Instant,
    /// Consecutive crashes without a stable run in between (drives the backoff).
    crashes: u32,
    /// When a restart is due, while the child is down.
    restart_at: Option<Instant>,
}

type ExitTx = mpsc::UnboundedSender<(usize, std::io::Result<ExitStatus>)>;

/// Running children and the channel their exits arrive on.
pub struct Supervisor {
    children: Vec<Running>,
    exits: mpsc::UnboundedReceiver<(usize, std::io::Result<ExitStatus>)>,
    exit_tx: ExitTx,
    config: SupervisorConfig,
    registry: Registry,
    restarts: IntCounterVec,
}

impl Supervisor {
    /// Starts `specs` in order, each waiting for readiness when asked. If one fails to start or
    /// to become ready, everything started so far is stopped and the error names the child
    /// (a cluster that cannot start is a configuration error, not a crash to retry).
    pub async fn start(specs: Vec<ChildSpec>, config: SupervisorConfig) -> Result<Self> {
        let (exit_tx, exits) = mpsc::unbounded_channel();
        let registry = Registry::new();
        let restarts = IntCounterVec::new(
            Opts::new(
                "shardseek_supervisor_restarts_total",
                "Restarts of a child process of `shardseek up` after it died",
            ),
            &["child"],
        )
        .and_then(|c| registry.register(Box::new(c.clone())).map(|()| c))
        .map_err(|e| Error::Process {
            name: "supervisor".into(),
            reason: format!("registering metrics: {e}"),
        })?;
        let mut sup = Supervisor {
            children: Vec::new(),
            exits,
            exit_tx,
            config,
            registry,
            restarts,
        };
        for spec in specs {
            if let Err(e) = sup.spawn(spec).await {
                sup.stop().await;
                return Err(e);
            }
        }
        Ok(sup)
    }

    /// The supervisor's metrics (restart counts), for a `/metrics` endpoint.
    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Starts the process of `spec` into slot `index` (a new child, or a restart of one that
    /// exited). Returns a receiver of its `READY` address.
    fn launch(&mut self, index: usize, spec: &ChildSpec) -> Result<mpsc::Receiver<String>> {
        let process_err = |reason: String| Error::Process {
            name: spec.name.clone(),
            reason,
        };
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid, setpgid, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl: then nobody would kill us.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| process_err(format!("cannot start `{}`: {e}", spec.program)))?;
        let pid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| process_err("exited before it could be watched".into()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| process_err("no stdout pipe".into()))?;
        let running = Running {
            spec: spec.clone(),
            pid,
            ready_addr: None,
            exited: None,
            alive: true,
            started: Instant::now(),
            crashes: 0,
            restart_at: None,
        };
        if let Some(slot) = self.children.get_mut(index) {
            slot.pid = pid;
            slot.exited = None;
            slot.alive = true;
            slot.started = running.started;
            slot.restart_at = None;
        } else {
            self.children.push(running);
        }
        println!("{EVENT_PREFIX}started {} pid {pid}", spec.name);
        let exit_tx = self.exit_tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exit_tx.send((index, status));
        });

        let (ready_tx, ready_rx) = mpsc::channel::<String>(1);
        let name = spec.name.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut ready_tx = Some(ready_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                // Forward first, then signal readiness: whoever waits for it prints after this
                // line, so the output reads in order.
                println!("[{name}] {line}");
                if let Some(addr) = line.strip_prefix(READY_PREFIX)
                    && let Some(tx) = ready_tx.take()
                {
                    let _ = tx.send(addr.trim().to_string()).await;
                }
            }
        });
        Ok(ready_rx)
    }

    async fn spawn(&mut self, spec: ChildSpec) -> Result<()> {
        let process_err = |reason: String| Error::Process {
            name: spec.name.clone(),
            reason,
        };
        let index = self.children.len();
        let mut ready_rx = self.launch(index, &spec)?;
        if !spec.wait_ready {
            return Ok(());
        }
        let timeout = self.config.ready_timeout;
        let wait = async {
            let mut stdout_open = true;
            loop {
                tokio::select! {
                    addr = ready_rx.recv(), if stdout_open => match addr {
                        Some(addr) => return Ok(addr),
                        // Usually the child is exiting: wait for its status to say how.
                        None => stdout_open = false,
                    },
                    _ = tokio::time::sleep(Duration::from_secs(1)), if !stdout_open => {
                        return Err("closed stdout before printing READY".to_string());
                    }
                    exit = self.exits.recv() => {
                        if let Some((i, status)) = exit {
                            let text = status_text(&status);
                            if let Some(c) = self.children.get_mut(i) {
                                c.exited = status.ok();
                                c.alive = false;
                            }
                            if i == index {
                                return Err(format!("exited ({text}) before it was ready"));
                            }
                            return Err(format!("`{}` exited ({text}) while this one was starting",
                                self.children.get(i).map_or("?", |c| c.spec.name.as_str())));
                        }
                    }
                }
            }
        };
        let addr = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| process_err(format!("not ready within {timeout:?}")))?
            .map_err(process_err)?;
        if let Some(c) = self.children.get_mut(index) {
            c.ready_addr = Some(addr);
        }
        Ok(())
    }

    /// The address child `name` reported in its `READY` line.
    pub fn ready_addr(&self, name: &str) -> Option<&str> {
        self.children
            .iter()
            .find(|c| c.spec.name == name)
            .and_then(|c| c.ready_addr.as_deref())
    }

    /// Process ids of the children, in start order (a restarted child's current pid).
    pub fn pids(&self) -> Vec<i32> {
        self.children.iter().map(|c| c.pid).collect()
    }

    /// Waits for Ctrl-C or SIGTERM, restarting children that exit when their policy says so;
    /// a [`Restart::Never`] child's exit ends the run when so configured. Then stops every child.
    pub async fn run(mut self) -> Result<StopReason> {
        let io = |op: &str| {
            let op = op.to_string();
            move |source| Error::Io { op, source }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io("installing the SIGTERM handler"))?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(io("installing the SIGINT handler"))?;
        let reason = loop {
            let due = self.children.iter().filter_map(|c| c.restart_at).min();
            tokio::select! {
                _ = term.recv() => break StopReason::Signal("SIGTERM"),
                _ = int.recv() => break StopReason::Signal("SIGINT"),
                _ = sleep_until_opt(due), if due.is_some() => self.restart_due(),
                exit = self.exits.recv() => {
                    let Some((i, status)) = exit else {
                        break StopReason::Signal("no children left");
                    };
                    if let Some(stop) = self.on_exit(i, status) {
                        break stop;
                    }
                }
            }
        };
        self.stop().await;
        Ok(reason)
    }

    /// Records child `i`'s exit; schedules its restart, or says why the run must end.
    fn on_exit(&mut self, i: usize, status: std::io::Result<ExitStatus>) -> Option<StopReason> {
        let text = status_text(&status);
        let config = self.config.clone();
        let c = self.children.get_mut(i)?;
        c.exited = status.ok();
        c.alive = false;
        c.ready_addr = None;
        let name = c.spec.name.clone();
        tracing::warn!(child = %name, status = %text, "child exited");
        match c.spec.restart {
            Restart::Always => {
                if c.started.elapsed() >= config.stable_after {
                    c.crashes = 0;
                }
                let delay = config.backoff(c.crashes);
                c.crashes = c.crashes.saturating_add(1);
                c.restart_at = Some(Instant::now() + delay);
                println!("{EVENT_PREFIX}{name} exited ({text}); restarting in {delay:?}");
                None
            }
            Restart::Never => {
                println!("{EVENT_PREFIX}{name} exited ({text})");
                config
                    .stop_on_child_exit
                    .then_some(StopReason::ChildExited { name, status: text })
            }
        }
    }

    /// Starts every child whose restart is due. One that cannot even be spawned is retried
    /// after the next backoff.
    fn restart_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.children.len())
            .filter(|&i| self.children[i].restart_at.is_some_and(|t| t <= now))
            .collect();
        for i in due {
            let spec = self.children[i].spec.clone();
            self.restarts.with_label_values(&[&spec.name]).inc();
            match self.launch(i, &spec) {
                Ok(mut ready_rx) => {
                    let name = spec.name.clone();
                    // Readiness of a restarted child is only reported: the others keep serving
                    // meanwhile, and its clients find it by reconnecting.
                    tokio::spawn(async move {
                        if let Some(addr) = ready_rx.recv().await {
                            println!("{EVENT_PREFIX}{name} is ready again at {addr}");
                        }
                    });
                }
                Err(e) => {
                    let c = &mut self.children[i];
                    let delay = self.config.backoff(c.crashes);
                    c.crashes = c.crashes.saturating_add(1);
                    c.restart_at = Some(Instant::now() + delay);
                    println!("{EVENT_PREFIX}{e}; retrying in {delay:?}");
                }
            }
        }
    }

    /// Stops every child still running: SIGTERM to its process group, SIGKILL after the grace
    /// period. Pending restarts are cancelled. Returns each child's name and exit status.
    pub async fn stop(&mut self) -> Vec<(String, Option<ExitStatus>)> {
        for c in self.children.iter_mut() {
            c.restart_at = None;
        }
        for c in self.children.iter().filter(|c| c.alive) {
            signal_group(c.pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + self.config.grace;
        while self.children.iter().any(|c| c.alive) {
            match tokio::time::timeout_at(deadline, self.exits.recv()).await {
                Ok(Some((i, status))) => {
                    if let Some(c) = self.children.get_mut(i) {
                        c.exited = status.ok();
                        c.alive = false;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    for c in self.children.iter().filter(|c| c.alive) {
                        tracing::warn!(child = %c.spec.name, "no exit after SIGTERM; sending SIGKILL");
                        signal_group(c.pid, libc::SIGKILL);
                    }
                    // SIGKILL cannot be ignored; the exits arrive promptly.
                    while self.children.iter().any(|c| c.alive) {
                        match self.exits.recv().await {
                            Some((i, status)) => {
                                if let Some(c) = self.children.get_mut(i) {
                                    c.exited = status.ok();
                                    c.alive = false;
                                }
                            }
                            None => break,
                        }
                    }
                    break;
                }
            }
        }
        self.children
            .iter()
            .map(|c| (c.spec.name.clone(), c.exited))
            .collect()
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Sends `sig` to the process group led by `pid` (and to `pid` itself, should it have left it).
fn signal_group(pid: i32, sig: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid yields ESRCH, ignored.
    unsafe {
        libc::kill(-pid, sig);
        libc::kill(pid, sig);
    }
}

fn status_text(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => format!("wait failed: {e}"),
    }
}
