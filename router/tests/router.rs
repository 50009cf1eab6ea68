//! Public behaviour of the router crate that needs no expert server: the process supervisor
//! with small shell children.

use std::time::{Duration, Instant};

use shardseek_router::supervisor::{ChildSpec, Restart, StopReason, Supervisor, SupervisorConfig};

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn sh(name: &str, script: &str) -> ChildSpec {
    ChildSpec::new(name, "sh", &["-c", script])
}

fn quick() -> SupervisorConfig {
    SupervisorConfig {
        ready_timeout: Duration::from_secs(5),
        grace: Duration::from_millis(500),
        stop_on_child_exit: true,
        ..SupervisorConfig::default()
    }
}

/// Waits (bounded) until `pid` is gone: the exit of a stopped child is reaped asynchronously.
async fn gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn children_report_ready_and_stop_on_request() {
    let mut sup = Supervisor::start(
        vec![
            sh(
                "a",
                "echo starting; echo READY 127.0.0.1:1111; exec sleep 30",
            ),
            sh("b", "echo READY 127.0.0.1:2222; exec sleep 30"),
        ],
        quick(),
    )
    .await
    .expect("both ready");
    assert_eq!(sup.ready_addr("a"), Some("127.0.0.1:1111"));
    assert_eq!(sup.ready_addr("b"), Some("127.0.0.1:2222"));
    let pids = sup.pids();
    assert!(pids.iter().all(|&p| alive(p)));
    let start = Instant::now();
    let statuses = sup.stop().await;
    assert!(
        start.elapsed() < Duration::from_millis(450),
        "SIGTERM suffices: {:?}",
        start.elapsed()
    );
    assert_eq!(statuses.len(), 2);
    assert!(statuses.iter().all(|(_, s)| s.is_some()));
    for p in pids {
        assert!(gone(p).await, "pid {p} still alive");
    }
}

#[tokio::test]
async fn a_child_ignoring_sigterm_is_killed_after_the_grace_period() {
    // The shell ignores TERM and so does its `sleep` child (same process group).
    let mut sup = Supervisor::start(
        vec![sh(
            "stubborn",
            "trap '' TERM; echo READY x; sleep 30; sleep 30",
        )],
        quick(),
    )
    .await
    .expect("ready");
    let pid = sup.pids()[0];
    let start = Instant::now();
    sup.stop().await;
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(gone(pid).await);
}

#[tokio::test]
async fn an_unexpected_exit_stops_the_others() {
    let sup = Supervisor::start(
        vec![
            sh("steady", "echo READY s; exec sleep 30"),
            sh("crashy", "echo READY c; sleep 0.3; exit 3"),
        ],
        quick(),
    )
    .await
    .expect("ready");
    let pids = sup.pids();
    let reason = tokio::time::timeout(Duration::from_secs(5), sup.run())
        .await
        .expect("run returns")
        .expect("no signal error");
    match reason {
        StopReason::ChildExited { name, status } => {
            assert_eq!(name, "crashy");
            assert!(status.contains('3'), "{status}");
        }
        other => panic!("unexpected {other:?}"),
    }
    for p in pids {
        assert!(gone(p).await, "pid {p} still alive");
    }
}

#[tokio::test]
async fn a_child_that_never_gets_ready_fails_start_and_stops_the_rest() {
    let err = Supervisor::start(
        vec![
            sh("first", "echo READY f; exec sleep 30"),
            sh("broken", "echo oops >&2; exit 7"),
        ],
        quick(),
    )
    .await
    .err()
    .expect("start fails");
    let text = err.to_string();
    assert!(
        text.contains("broken") && text.contains("before it was ready"),
        "{text}"
    );

    let err = Supervisor::start(
        vec![sh("slow", "exec sleep 30")],
        SupervisorConfig {
            ready_timeout: Duration::from_millis(300),
            ..quick()
        },
    )
    .await
    .err()
    .expect("times out");
    assert!(err.to_string().contains("not ready within"), "{err}");
}

/// Value of `shardseek_supervisor_restarts_total{child="name"}` in the registry.
fn restarts(registry: &prometheus::Registry, name: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "shardseek_supervisor_restarts_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.value() == name))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test]
async fn a_crashing_child_is_restarted_with_backoff_while_the_others_keep_running() {
    // Each incarnation of `crashy` appends a line to a file, then dies after 0.1 s.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("starts");
    let script = format!(
        "echo start >> {}; echo READY c; sleep 0.1; exit 3",
        log.display()
    );
    let config = SupervisorConfig {
        restart_backoff: Duration::from_millis(100),
        restart_backoff_max: Duration::from_millis(400),
        ..quick()
    };
    let sup = Supervisor::start(
        vec![
            sh("steady", "echo READY s; exec sleep 30").restart(Restart::Always),
            sh("crashy", &script).restart(Restart::Always),
        ],
        config.clone(),
    )
    .await
    .expect("ready");
    let registry = sup.registry();
    let steady = sup.pids()[0];
    let t0 = Instant::now();
    let run = tokio::spawn(sup.run());
    // Backoffs 100, 200, 400, 400 ms (+0.1 s of life each): about 5 starts in 1.6 s.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let starts = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .count();
    let counted = restarts(&registry, "crashy");
    assert!(alive(steady), "the other child kept running");
    assert_eq!(restarts(&registry, "steady"), 0);
    assert!(
        (3..=7).contains(&starts),
        "{starts} starts in {:?}: backoff grows, capped",
        t0.elapsed()
    );
    assert!(
        counted + 1 == starts as u64 || counted == starts as u64,
        "metric {counted} vs {starts} starts"
    );
    assert_eq!(config.backoff(0), Duration::from_millis(100));
    assert_eq!(config.backoff(1), Duration::from_millis(200));
    assert_eq!(config.backoff(5), Duration::from_millis(400));
    run.abort();
    let _ = run.await;
}

/// Set in the helper process of [`children_die_with_their_parent`].
const HELPER_ENV: &str = "SHARDSEEK_SUPERVISOR_HELPER";

#[tokio::test]
async fn children_die_with_their_parent() {
    use tokio::io::AsyncBufReadExt;
    // This test binary re-runs itself as a supervisor (the ignored helper below), reads its
    // child's pid, SIGKILLs the supervisor — no chance to clean up — and expects the child gone.
    let exe = std::env::current_exe().expect("test binary path");
    let mut helper = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "supervisor_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("helper starts");
    let stdout = helper.stdout.take().expect("pipe");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let child_pid = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(pid) = line.strip_prefix("CHILD ") {
                return pid.trim().parse::<i32>().ok();
            }
        }
        None
    })
    .await
    .expect("helper reports in time")
    .expect("helper printed its child's pid");
    assert!(alive(child_pid));
    helper.start_kill().expect("SIGKILL the supervisor");
    let _ = helper.wait().await;
    assert!(
        gone(child_pid).await,
        "child {child_pid} outlived its supervisor"
    );
}

#[tokio::test]
async fn a_restarted_child_dies_with_its_parent_too() {
    use tokio::io::AsyncBufReadExt;
    // The helper supervises a child that crashes once and then stays up; the restarted
    // incarnation is started by the run loop, not by `start`, and must not outlive a SIGKILLed
    // supervisor either.
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary path");
    let mut helper = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "supervisor_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, "restart")
        .env(HELPER_DIR_ENV, dir.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("helper starts");
    let stdout = helper.stdout.take().expect("pipe");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let prefix = "[supervisor] started flaky pid ";
    let reborn = tokio::time::timeout(Duration::from_secs(20), async {
        let mut starts = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            // The first event shares its line with libtest's `test supervisor_helper ... `.
            if let Some(pid) = line.split(prefix).nth(1) {
                starts += 1;
                if starts == 2 {
                    return pid.trim().parse::<i32>().ok();
                }
            }
        }
        None
    })
    .await
    .expect("helper restarts its child in time")
    .expect("the restart's pid");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(alive(reborn), "the restarted child runs");
    helper.start_kill().expect("SIGKILL the supervisor");
    let _ = helper.wait().await;
    assert!(
        gone(reborn).await,
        "restarted child {reborn} outlived its supervisor"
    );
}

/// Where the `restart` helper keeps the flag file of its flaky child.
const HELPER_DIR_ENV: &str = "SHARDSEEK_SUPERVISOR_HELPER_DIR";

#[tokio::test]
#[ignore = "helper process of children_die_with_their_parent"]
async fn supervisor_helper() {
    let Some(mode) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    if mode == "restart" {
        let dir = std::env::var(HELPER_DIR_ENV).expect("helper dir");
        let flag = format!("{dir}/crashed");
        // First run: crash after READY; later runs: stay up.
        let script = format!(
            "if [ -e {flag} ]; then echo READY f; exec sleep 60; else touch {flag}; echo READY f; sleep 0.3; exit 1; fi"
        );
        let config = SupervisorConfig {
            restart_backoff: Duration::from_millis(50),
            ..quick()
        };
        let sup = Supervisor::start(vec![sh("flaky", &script).restart(Restart::Always)], config)
            .await
            .expect("ready");
        let _ = tokio::time::timeout(Duration::from_secs(60), sup.run()).await;
        return;
    }
    let sup = Supervisor::start(
        vec![sh("orphan-candidate", "echo READY p; exec sleep 60")],
        quick(),
    )
    .await
    .expect("ready");
    println!("CHILD {}", sup.pids()[0]);
    tokio::time::sleep(Duration::from_secs(60)).await;
}
