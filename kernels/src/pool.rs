//! Threads for the kernels, sized by the CPU limit the process actually has (cgroup quota), so
//! several workers sharing a machine do not oversubscribe it.
//!
//! Two ways to run work in parallel, one size:
//! - [`parallel_for`], the hot path of decode: a team of `threads − 1` workers plus the calling
//!   thread. A job is a task count and a closure; every member claims task indices from one
//!   atomic counter. Idle workers spin briefly for the next job and then park, so the tens of
//!   short kernels of one decode step start in well under a microsecond, where waking a sleeping
//!   rayon worker took tens of microseconds — as long as a whole medium-shape GEMV
//!   (`shardseek bench kernels`: 0.43 of the read ceiling through rayon, 1.0 with the team).
//! - rayon's global pool, for everything else (bulk data preparation, MLA).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// CPUs this process may use: the cgroup v2/v1 CPU quota, capped by the affinity mask.
pub fn cpu_limit() -> usize {
    let avail = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let quota = cgroup_quota().map(|q| q.ceil().max(1.0) as usize);
    quota.map_or(avail, |q| q.min(avail))
}

fn cgroup_quota() -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        return parse_cpu_max(&s);
    }
    let q = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").ok()?;
    let p = std::fs::read_to_string("/sys/fs/cgroup/cpu/cpu.cfs_period_us").ok()?;
    parse_cfs(&q, &p)
}

/// cgroup v2 `cpu.max`: "`quota period`" or "`max period`" (no limit).
pub fn parse_cpu_max(s: &str) -> Option<f64> {
    let mut it = s.split_whitespace();
    let (q, p) = (it.next()?, it.next()?);
    if q == "max" {
        return None;
    }
    let (q, p) = (q.parse::<f64>().ok()?, p.parse::<f64>().ok()?);
    (q > 0.0 && p > 0.0).then(|| q / p)
}

/// cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` (quota -1: no limit).
pub fn parse_cfs(quota: &str, period: &str) -> Option<f64> {
    let q: f64 = quota.trim().parse().ok()?;
    let p: f64 = period.trim().parse().ok()?;
    (q > 0.0 && p > 0.0).then(|| q / p)
}

static THREADS: OnceLock<usize> = OnceLock::new();

/// Builds rayon's global pool once with `threads` (default: [`cpu_limit`]). Later calls are
/// no-ops and return the size in force. The [`parallel_for`] team takes the same size.
pub fn init(threads: Option<usize>) -> usize {
    *THREADS.get_or_init(|| {
        let n = threads.unwrap_or_else(cpu_limit).max(1);
        // Fails only if the global pool was already built (then it has its own size).
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
        rayon::current_num_threads()
    })
}

/// Threads the kernels run on (the calling thread included in [`parallel_for`]).
pub fn threads() -> usize {
    init(None)
}

/// How long an idle team worker polls for the next job before it parks. Back-to-back kernels
/// (a decode step's projections, the phases of the grouped MoE) are microseconds apart; a
/// longer gap (MLA on rayon's workers, sampling between steps) ends in a park, so the worker
/// neither competes with those threads nor burns the pod's CPU quota, and stays a sleeper in
/// the scheduler's eyes (on the shared development machine, with 200 µs of polling, the worker
/// did about 40% of `bench kernels`' work instead of half: `perf report --sort comm`).
const SPIN: Duration = Duration::from_micros(50);
/// Pure busy-polling before the worker starts yielding between polls (so another runnable
/// thread on its core, a rayon worker or the server, is not starved).
const HOT_SPIN: Duration = Duration::from_micros(20);

/// `gate` layout: job id in the high 32 bits, [`OPEN`] while workers may join, the number of
/// workers inside the job in the low bits.
const OPEN: u64 = 1 << 31;
const ACTIVE: u64 = OPEN - 1;

/// Most task ranges ("homes") a job is cut into; members beyond share homes.
const HOMES: usize = 16;

/// One job: `tasks` calls of `f`. The indices are cut into `homes` contiguous ranges, one per
/// team member; a member claims its own range's indices in order (`next[h]`), then those left
/// in the others'. So each member walks through memory contiguously — a decode GEMV's tasks
/// are consecutive blocks of weight rows, and a thread that goes on to the next block keeps the
/// hardware prefetcher's stream, where tasks dealt out one by one across threads broke every
/// stream at every task — while a member that is late or slow still has its work taken over.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    homes: usize,
    next: [AtomicUsize; HOMES],
}

impl Job<'_> {
    fn new(f: &(dyn Fn(usize) + Sync), tasks: usize, members: usize) -> Job<'_> {
        let homes = members.clamp(1, HOMES).min(tasks.max(1));
        let job = Job {
            f,
            tasks,
            homes,
            next: std::array::from_fn(|_| AtomicUsize::new(0)),
        };
        for h in 0..homes {
            job.next[h].store(job.start(h), Ordering::Relaxed);
        }
        job
    }

    /// First index of home `h`.
    fn start(&self, h: usize) -> usize {
        h * self.tasks / self.homes
    }
}

struct Team {
    workers: usize,
    /// Job id, bumped to wake workers; the job itself is published before the bump.
    epoch: AtomicU64,
    job: AtomicUsize,
    gate: AtomicU64,
    parked: AtomicUsize,
    /// A task panicked on a worker during the current job (the caller re-raises it).
    panicked: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
    /// One job at a time; a second caller runs its tasks alone.
    owner: Mutex<()>,
}

thread_local! {
    /// Set on team workers and on a caller while it runs a job: nested calls run inline.
    static IN_TEAM: Cell<bool> = const { Cell::new(false) };
}

fn team() -> &'static Team {
    static TEAM: OnceLock<&'static Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let workers = threads().saturating_sub(1);
        let team: &'static Team = Box::leak(Box::new(Team {
            workers,
            epoch: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            gate: AtomicU64::new(0),
            parked: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            owner: Mutex::new(()),
        }));
        for i in 0..workers {
            // A worker that cannot be spawned only makes the team smaller: jobs still finish,
            // since the caller claims every task nobody else takes.
            let _ = std::thread::Builder::new()
                .name(format!("shardseek-kernels-{i}"))
                .spawn(move || worker(team));
        }
        team
    })
}

/// Runs tasks of `job` as team member `me` (the caller is 0): its home first, then the rest
/// of the others' in turn.
fn run_tasks(job: &Job, me: usize) {
    for d in 0..job.homes {
        let h = (me + d) % job.homes;
        let end = job.start(h + 1);
        loop {
            let i = job.next[h].fetch_add(1, Ordering::Relaxed);
            if i >= end {
                break;
            }
            (job.f)(i);
        }
    }
}

fn worker(team: &'static Team) {
    IN_TEAM.with(|c| c.set(true));
    let mut seen = 0u64;
    loop {
        let id = wait_for_job(team, seen);
        seen = id;
        // Join only while the caller still holds the job open: a worker that wakes after the
        // caller finished must not touch the (stack-allocated) job.
        let mut g = team.gate.load(Ordering::Acquire);
        // The member index is 1 + the workers that joined before (the caller is 0).
        let joined = loop {
            if g >> 32 != id & 0xffff_ffff || g & OPEN == 0 {
                break None;
            }
            match team
                .gate
                .compare_exchange_weak(g, g + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break Some((g & ACTIVE) as usize + 1),
                Err(now) => g = now,
            }
        };
        let Some(me) = joined else {
            continue;
        };
        // SAFETY: the caller keeps the job alive until every joined worker has left (the
        // active count in `gate` is back to zero).
        let job = unsafe { &*(team.job.load(Ordering::Acquire) as *const Job) };
        // A panicking task must not leave the caller waiting: the panic is caught here and
        // raised again on the caller.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(job, me))).is_err() {
            team.panicked.store(true, Ordering::Release);
        }
        team.gate.fetch_sub(1, Ordering::Release);
    }
}

/// Polls for a job id newer than `seen`, then parks.
fn wait_for_job(team: &Team, seen: u64) -> u64 {
    let start = Instant::now();
    let mut polls = 0u32;
    loop {
        let e = team.epoch.load(Ordering::Acquire);
        if e != seen {
            return e;
        }
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(64) {
            let idle = start.elapsed();
            if idle > SPIN {
                let mut guard = team.sleep.lock().unwrap_or_else(|p| p.into_inner());
                team.parked.fetch_add(1, Ordering::SeqCst);
                while team.epoch.load(Ordering::SeqCst) == seen {
                    guard = team.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
                }
                team.parked.fetch_sub(1, Ordering::SeqCst);
                continue;
            }
            if idle > HOT_SPIN {
                std::thread::yield_now();
            }
        }
        std::hint::spin_loop();
    }
}

/// Runs `f(0)`, …, `f(tasks − 1)` on the kernel team (the calling thread takes part) and
/// returns when all are done. Tasks may run in any order and concurrently; a task should be
/// several microseconds of work. Called from inside a task, or while another thread's job
/// holds the team, the tasks run here, one after another.
pub fn parallel_for(tasks: usize, f: impl Fn(usize) + Sync) {
    let f: &(dyn Fn(usize) + Sync) = &f;
    if tasks <= 1 || IN_TEAM.with(|c| c.get()) {
        return run_tasks(&Job::new(f, tasks, 1), 0);
    }
    let team = team();
    let Some(_owner) = (team.workers > 0)
        .then(|| team.owner.try_lock().ok())
        .flatten()
    else {
        return run_tasks(&Job::new(f, tasks, 1), 0);
    };
    let job = Job::new(f, tasks, team.workers + 1);
    let id = team.epoch.load(Ordering::Relaxed) + 1;
    team.job
        .store(&job as *const Job as usize, Ordering::Relaxed);
    team.gate
        .store(((id & 0xffff_ffff) << 32) | OPEN, Ordering::Release);
    team.epoch.store(id, Ordering::SeqCst);
    if team.parked.load(Ordering::SeqCst) > 0 {
        let _g = team.sleep.lock().unwrap_or_else(|p| p.into_inner());
        team.wake.notify_all();
    }
    IN_TEAM.with(|c| c.set(true));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(&job, 0)));
    IN_TEAM.with(|c| c.set(false));
    // Close the job to late workers, then wait for those inside to leave.
    team.gate.fetch_and(!OPEN, Ordering::AcqRel);
    let mut polls = 0u32;
    while team.gate.load(Ordering::Acquire) & ACTIVE != 0 {
        polls = polls.wrapping_add(1);
        if polls.is_multiple_of(1024) {
            std::thread::yield_now();
        }
        std::hint::spin_loop();
    }
    if let Err(p) = res {
        team.panicked.store(false, Ordering::Relaxed);
        std::panic::resume_unwind(p);
    }
    if team.panicked.swap(false, Ordering::AcqRel) {
        panic!("a kernel task panicked on a team worker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_formats() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("250000 100000\n"), Some(2.5));
        assert_eq!(parse_cpu_max("garbage"), None);
        assert_eq!(parse_cfs("-1\n", "100000\n"), None);
        assert_eq!(parse_cfs("50000\n", "100000\n"), Some(0.5));
        assert!(cpu_limit() >= 1);
    }

    #[test]
    fn parallel_for_runs_every_task_once_nested_and_concurrently() {
        use std::sync::atomic::AtomicU32;
        let hits: Vec<AtomicU32> = (0..1000).map(|_| AtomicU32::new(0)).collect();
        for _ in 0..50 {
            parallel_for(hits.len(), |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 50));
        // Nested and from several threads at once: inline fallbacks, nothing lost.
        let inner: Vec<AtomicU32> = (0..64).map(|_| AtomicU32::new(0)).collect();
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    parallel_for(8, |_| {
                        parallel_for(inner.len(), |j| {
                            inner[j].fetch_add(1, Ordering::Relaxed);
                        })
                    })
                });
            }
        });
        assert!(inner.iter().all(|h| h.load(Ordering::Relaxed) == 24));
        // After the workers park, a job still completes.
        std::thread::sleep(SPIN * 3);
        let n = AtomicU32::new(0);
        parallel_for(100, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 100);
    }

    /// The caller walks its home from task 0 upward: its tasks are a run 0, 1, 2, … (then
    /// whatever it takes over from other homes, each run ascending), so a GEMV's thread streams
    /// contiguous weight rows.
    #[test]
    fn each_member_walks_its_home_in_order() {
        let caller = std::thread::current().id();
        let order = Mutex::new(Vec::new());
        parallel_for(64, |i| {
            if std::thread::current().id() == caller {
                order.lock().unwrap().push(i);
            }
            std::thread::sleep(Duration::from_micros(20));
        });
        let order = order.into_inner().unwrap();
        assert_eq!(order.first(), Some(&0), "{order:?}");
        // Ascending runs, each starting at a home's next unclaimed task: never a step back
        // inside a run.
        let breaks = order.windows(2).filter(|w| w[1] != w[0] + 1).count();
        assert!(breaks < threads().max(2), "{order:?}");
        let mut sorted = order.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), order.len(), "a task ran twice: {order:?}");
    }

    #[test]
    fn a_panicking_task_reaches_the_caller() {
        let r = std::panic::catch_unwind(|| {
            parallel_for(64, |i| {
                if i == 63 {
                    panic!("task 63");
                }
            })
        });
        assert!(r.is_err());
        // The team still works afterwards.
        let n = std::sync::atomic::AtomicU32::new(0);
        parallel_for(10, |_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
