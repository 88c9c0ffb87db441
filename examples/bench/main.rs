//! Benchmark harness: `scripts/bench <scenario|all>` builds this example in release
//! and runs it once per scenario against a fresh database.
//!
//! Each run starts the devstack stand-ins in-process (no added latency), spawns the release
//! `orchestrator serve` as a child process (so its memory can be read from `/proc/<pid>/status`),
//! waits for `/ready`, runs the scenario, prints a result block and replaces that scenario's
//! section of `BENCHMARKS.md`. The child is always stopped (SIGTERM, then SIGKILL), also on panic.
//!
//! ```text
//! bench <provision|deprovision|ingest|pipeline|fairness|proxy|reconcile|idle|recovery> [--teams N] [--concurrency N]
//!       [--duration SECS] [--connections N] [--senders N] [--rounds N] [--runs N] [--warmup N] [--fractions F,F..] [--rate N]
//!       [--delay-ms N] [--no-write] [--results PATH] [--orchestrator PATH]
//! ```
//!
//! Environment: `DATABASE_URL` (the bench database, required), `BENCH_COMMAND` (the command shown
//! in the results), `BENCH_RUST_LOG` (the orchestrator's `RUST_LOG`, default `warn`), `PGBENCH` (pgbench binary, default `pgbench`), `BENCH_DB_POOL_SIZE` and
//! `BENCH_LOCK_POOL_SIZE` (default 40 each).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use devstack::Devstack;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

mod pipeline;

const ADMIN_TOKEN: &str = "dev-super-admin";
const GITHUB_SECRET: &str = "bench-secret";
/// Base64 of 32 bytes ("bench-only-secrets-key-32-bytes!").
const SECRETS_KEY: &str = "YmVuY2gtb25seS1zZWNyZXRzLWtleS0zMi1ieXRlcyE=";
/// The highest rate limit the configuration accepts (`ORCHESTRATOR_GITHUB_RATE_LIMIT_*` are
/// bounded to 1,000,000): far above anything this machine can send, so nothing is rate limited.
const UNLIMITED_RATE: &str = "1000000";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_PRINTED_ERRORS: usize = 10;

#[tokio::main]
async fn main() -> ExitCode {
    orchestrator::startup::install_crypto_provider();
    // On Ctrl-C or SIGTERM the scenario is dropped, and with it the child (see `Service`'s Drop).
    let outcome = tokio::select! {
        outcome = run() => outcome,
        signal = interrupted() => Err(anyhow!("interrupted by {signal}")),
    };
    match outcome {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail(why)) => {
            eprintln!("[bench] FAILED: {why}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("[bench] error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

enum Verdict {
    Pass,
    /// The scenario ran but something was wrong (errors, lost or duplicated deliveries).
    Fail(String),
}

// ------------------------------------------------------------------------------------------------
// Options

struct Options {
    scenario: String,
    flags: BTreeMap<String, String>,
    write: bool,
    results: PathBuf,
    orchestrator: PathBuf,
    database_url: String,
    command: String,
}

impl Options {
    fn parse() -> Result<Options> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let mut args = std::env::args().skip(1);
        let scenario = args.next().unwrap_or_default();
        if ![
            "provision",
            "deprovision",
            "ingest",
            "proxy",
            "reconcile",
            "idle",
            "recovery",
            "pipeline",
            "fairness",
        ]
        .contains(&scenario.as_str())
        {
            bail!(
                "usage: bench <provision|deprovision|ingest|proxy|reconcile|idle|recovery|pipeline|fairness> [--teams N] [--concurrency N] [--deletions N] [--duration SECS] \
                 [--connections N] [--senders N] [--rounds N] [--runs N] [--warmup N] [--no-write] [--results PATH] [--orchestrator PATH]"
            );
        }
        let mut flags = BTreeMap::new();
        let mut write = true;
        while let Some(arg) = args.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?}");
            };
            if name == "no-write" {
                write = false;
                continue;
            }
            let value = args.next().ok_or_else(|| anyhow!("--{name} needs a value"))?;
            flags.insert(name.to_owned(), value);
        }
        let known = [
            "teams",
            "concurrency",
            "deletions",
            "seconds",
            "kills",
            "duration",
            "connections",
            "senders",
            "runs",
            "rounds",
            "warmup",
            "fractions",
            "rate",
            "delay-ms",
            "results",
            "orchestrator",
        ];
        if let Some(unknown) = flags.keys().find(|k| !known.contains(&k.as_str())) {
            bail!("unknown option --{unknown}");
        }
        let results = flags
            .remove("results")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("BENCHMARKS.md"));
        let orchestrator = flags
            .remove("orchestrator")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target/release/orchestrator"));
        let database_url = std::env::var("DATABASE_URL")
            .context("DATABASE_URL (the bench database) is not set; run scripts/bench, which creates it")?;
        let command = std::env::var("BENCH_COMMAND").unwrap_or_else(|_| {
            let args: Vec<String> = std::env::args().skip(1).collect();
            format!("target/release/examples/bench {}", args.join(" "))
        });
        Ok(Options {
            scenario,
            flags,
            write,
            results,
            orchestrator,
            database_url,
            command,
        })
    }

    /// A comma-separated list of fractions between 0 and 1 (exclusive of 0).
    fn fractions(&self, name: &str, default: &[f64]) -> Result<Vec<f64>> {
        let Some(v) = self.flags.get(name) else {
            return Ok(default.to_vec());
        };
        v.split(',')
            .map(|f| match f.trim().parse::<f64>() {
                Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
                _ => bail!("--{name} takes fractions in (0, 1] separated by commas, got {v:?}"),
            })
            .collect()
    }

    fn optional_number(&self, name: &str) -> Result<Option<u64>> {
        match self.flags.contains_key(name) {
            true => self.number(name, 0).map(Some),
            false => Ok(None),
        }
    }

    fn number(&self, name: &str, default: u64) -> Result<u64> {
        match self.flags.get(name) {
            None => Ok(default),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("--{name} must be a positive whole number, got {v:?}"),
            },
        }
    }
}

async fn run() -> Result<Verdict> {
    let options = Options::parse()?;
    let report = match options.scenario.as_str() {
        "provision" => provision(&options).await?,
        "deprovision" => deprovision(&options).await?,
        "ingest" => ingest(&options).await?,
        "proxy" => proxy(&options).await?,
        "reconcile" => reconcile(&options).await?,
        "idle" => idle(&options).await?,
        "recovery" => recovery(&options).await?,
        "pipeline" => pipeline::pipeline(&options).await?,
        "fairness" => pipeline::fairness(&options).await?,
        other => bail!("unknown scenario {other}"),
    };
    let machine = Machine::detect(&options.database_url).await;
    let text = report.render_text(&machine, &options.command);
    println!("{text}");
    if options.write {
        write_section(&options.results, &report, &machine, &options.command)?;
        println!(
            "[bench] wrote the {} section of {}",
            report.scenario,
            options.results.display()
        );
    }
    Ok(match &report.failure {
        None => Verdict::Pass,
        Some(why) => Verdict::Fail(why.clone()),
    })
}

// ------------------------------------------------------------------------------------------------
// The service under test

/// The stand-ins and the orchestrator child process. Dropping it stops the child.
struct Bench {
    stack: Devstack,
    service: Service,
    base: String,
    startup: Duration,
    idle_rss_kb: u64,
    _scratch: Scratch,
}

/// A temporary directory, removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Bench {
    async fn start(options: &Options) -> Result<Bench> {
        Self::start_with(options, &[]).await
    }

    /// Like `start`, with settings of the scenario's own (they win over the caller's).
    async fn start_with(options: &Options, settings: &[(&str, &str)]) -> Result<Bench> {
        if !options.orchestrator.is_file() {
            bail!(
                "{} does not exist: build it with `cargo build --release --bin orchestrator`",
                options.orchestrator.display()
            );
        }
        let stack = Devstack::start().await.context("starting the devstack stand-ins")?;
        let scratch = Scratch(std::env::temp_dir().join(format!("orchestrator-bench-{}", std::process::id())));
        std::fs::create_dir_all(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
        let kubeconfig = scratch.0.join("kubeconfig.json");
        std::fs::write(&kubeconfig, stack.kubeconfig_json("incidentfox"))
            .with_context(|| format!("writing {}", kubeconfig.display()))?;
        let (service, base, startup) =
            spawn_service(options, &stack, &kubeconfig, settings, options.scenario.as_str()).await?;
        let idle_rss_kb = service.memory().map(|m| m.rss_kb).unwrap_or(0);
        println!(
            "[bench] orchestrator pid {} ready on {base} in {:.0} ms (log: {})",
            service.pid,
            startup.as_secs_f64() * 1000.0,
            service.log.display()
        );
        Ok(Bench {
            stack,
            service,
            base,
            startup,
            idle_rss_kb,
            _scratch: scratch,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The GitHub webhook's URL and socket address (for [`RawClient`]).
    fn github_webhook(&self) -> Result<(reqwest::Url, std::net::SocketAddr)> {
        let url: reqwest::Url = self.url("/webhooks/github").parse().context("the webhook URL")?;
        let address = url
            .socket_addrs(|| None)
            .context("the webhook address")?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("the webhook URL names no address"))?;
        Ok((url, address))
    }

    fn peak_rss_kb(&self) -> u64 {
        self.service.memory().map(|m| m.hwm_kb).unwrap_or(0)
    }

    fn cpu(&self) -> CpuSnapshot {
        CpuSnapshot::take(self.service.pid)
    }

    /// Stops the child and the stand-ins; warns about an unclean exit.
    async fn stop(mut self) {
        let status = self.service.stop().await;
        self.stack.clone().shutdown().await;
        match status {
            Some(s) if s.success() => {}
            Some(s) => eprintln!(
                "[bench] warning: the orchestrator exited with {s} after SIGTERM (log: {})",
                self.service.log.display()
            ),
            None => eprintln!(
                "[bench] warning: the orchestrator did not stop within {STOP_TIMEOUT:?} of SIGTERM and was killed"
            ),
        }
    }
}

/// The orchestrator child. Dropping it (also while unwinding from a panic) stops it.
struct Service {
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

struct Memory {
    rss_kb: u64,
    hwm_kb: u64,
}

impl Service {
    /// SIGKILL, as a node failure or the OOM killer would: no shutdown of any kind.
    fn kill_now(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn memory(&self) -> Option<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let field = |name: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(name))?;
            line[name.len()..].trim().trim_end_matches("kB").trim().parse().ok()
        };
        Some(Memory {
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
        })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !sent {
            eprintln!("[bench] could not send SIGTERM to {}", self.pid);
        }
    }

    /// SIGTERM, then wait (bounded), then SIGKILL. None when it had to be killed.
    async fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        self.terminate();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts `target/release/orchestrator serve` against the stand-ins and waits until it is ready:
/// the service, its base URL and its start-up time.
async fn spawn_service(
    options: &Options,
    stack: &Devstack,
    kubeconfig: &Path,
    settings: &[(&str, &str)],
    log_name: &str,
) -> Result<(Service, String, Duration)> {
    let log_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let log = log_dir.join(format!("orchestrator-{log_name}.log"));

    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let pool = std::env::var("BENCH_DB_POOL_SIZE").unwrap_or_else(|_| "40".into());
    let lock_pool = std::env::var("BENCH_LOCK_POOL_SIZE").unwrap_or_else(|_| "40".into());
    let mut command = Command::new(&options.orchestrator);
    command
        .arg("serve")
        // A clean environment: nothing from the caller's shell (LOG_FORMAT, other ORCHESTRATOR_*
        // variables) changes what is measured.
        .env_clear()
        // ORCHESTRATOR_* from the caller's environment tune the service under test (for example
        // ORCHESTRATOR_DISPATCH_WORKERS); the settings below win where both are set.
        .envs(std::env::vars().filter(|(name, _)| name.starts_with("ORCHESTRATOR_")))
        .env("PATH", std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()))
        .env("DATABASE_URL", &options.database_url)
        .env("ORCHESTRATOR_AUTO_CREATE_TABLES", "1")
        .env("ORCHESTRATOR_LISTEN_ADDR", &listen)
        .envs(stack.env_vars())
        .env("KUBECONFIG", kubeconfig)
        .env("ORCHESTRATOR_INTERNAL_ADMIN_TOKEN", "dev-internal-admin")
        .env("ORCHESTRATOR_SECRETS_KEY", SECRETS_KEY)
        .env("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("NO_COLOR", "1")
        .env("ORCHESTRATOR_GITHUB_RATE_LIMIT_PER_MINUTE", UNLIMITED_RATE)
        .env("ORCHESTRATOR_GITHUB_RATE_LIMIT_BURST", UNLIMITED_RATE)
        .env("ORCHESTRATOR_DB_POOL_SIZE", &pool)
        .env("ORCHESTRATOR_LOCK_POOL_SIZE", &lock_pool)
        .envs(settings.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::from(
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?,
        ))
        .stderr(Stdio::from(std::fs::File::options().append(true).open(&log)?));

    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", options.orchestrator.display()))?;
    let mut service = Service {
        pid: child.id(),
        child: Some(child),
        log,
    };
    let base = format!("http://{listen}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    loop {
        if let Some(status) = service.exited() {
            bail!(
                "the orchestrator exited before it was ready ({status}); its log ({}):\n{}",
                service.log.display(),
                service.log_tail()
            );
        }
        if let Ok(response) = client.get(format!("{base}/ready")).send().await {
            if response.status() == reqwest::StatusCode::OK {
                break;
            }
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!(
                "the orchestrator was not ready within {READY_TIMEOUT:?}; its log ({}):\n{}",
                service.log.display(),
                service.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((service, base, started.elapsed()))
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// User + system CPU time of a process, from /proc/<pid>/stat.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// CPU time used by every local process named `postgres` (the server's backends and helpers; none
/// when the database is elsewhere). A backend that exits takes its time with it, but the service's
/// connections live as long as it does.
fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .filter_map(process_cpu_seconds)
        .sum()
}

/// CPU time used up to one instant: by the whole machine (/proc/stat, steal included), by the
/// orchestrator, by this process (the load generator and the in-process stand-ins) and by Postgres.
struct CpuSnapshot {
    at: Instant,
    machine: f64,
    service: f64,
    own: f64,
    postgres: f64,
}

impl CpuSnapshot {
    fn take(service_pid: u32) -> CpuSnapshot {
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let line = stat.lines().next()?.strip_prefix("cpu ")?.to_owned();
                let ticks: Vec<f64> = line.split_whitespace().filter_map(|v| v.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
                let busy = ticks.iter().take(8).sum::<f64>() - ticks.get(3)? - ticks.get(4)?;
                Some(busy / clock_ticks())
            })
            .unwrap_or(0.0);
        CpuSnapshot {
            at: Instant::now(),
            machine,
            service: process_cpu_seconds(service_pid).unwrap_or(0.0),
            own: process_cpu_seconds(std::process::id()).unwrap_or(0.0),
            postgres: postgres_cpu_seconds(),
        }
    }

    /// CPU time per event since `before`, in microseconds: the orchestrator's, Postgres', and both.
    /// Less noisy than a rate on a shared machine: a neighbour's load slows both revisions' rates
    /// but hardly changes the work each event costs.
    fn per_event_since(&self, before: &CpuSnapshot, events: f64) -> String {
        let micros = |seconds: f64| seconds / events.max(1.0) * 1e6;
        let service = micros(self.service - before.service);
        let postgres = micros(self.postgres - before.postgres);
        format!(
            "orchestrator {service:.0} µs, Postgres {postgres:.0} µs, both {:.0} µs",
            service + postgres
        )
    }

    /// Cores busy on average since `before`, and who used them.
    fn usage_since(&self, before: &CpuSnapshot) -> String {
        let secs = (self.at - before.at).as_secs_f64().max(1e-9);
        let machine = (self.machine - before.machine) / secs;
        let service = (self.service - before.service) / secs;
        let own = (self.own - before.own) / secs;
        let postgres = (self.postgres - before.postgres) / secs;
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
        format!(
            "{machine:.2} of {cores} cores busy: orchestrator {service:.2}, load generator + stand-ins {own:.2}, \
             Postgres {postgres:.2}, everything else (steal included) {:.2}",
            (machine - service - own - postgres).max(0.0)
        )
    }

    fn service_seconds_since(&self, before: &CpuSnapshot) -> f64 {
        self.service - before.service
    }
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

async fn bench_db(options: &Options) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&options.database_url)
        .await
        .context("connecting to the bench database")
}

// ------------------------------------------------------------------------------------------------
// Latencies

struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut samples: Vec<Duration>) -> Latencies {
        samples.sort_unstable();
        Latencies(samples)
    }

    /// Nearest-rank percentile.
    fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    /// "p50 / p95 / max" in milliseconds.
    fn p50_p95_max(&self) -> String {
        self.p50_and_max_with(95.0)
    }

    /// "p50 / p99 / max" in milliseconds.
    fn p50_p99_max(&self) -> String {
        self.p50_and_max_with(99.0)
    }

    fn p50_and_max_with(&self, percentile: f64) -> String {
        format!(
            "{} / {} / {}",
            ms(self.percentile(50.0)),
            ms(self.percentile(percentile)),
            ms(self.max())
        )
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn mb(kb: u64) -> String {
    format!("{:.1} MB", kb as f64 / 1024.0)
}

/// A ratio as a whole percentage, or "-" when there is none.
fn percent(ratio: Option<f64>) -> String {
    ratio.map_or("-".into(), |r| format!("{:.0}%", r * 100.0))
}

fn aim(ok: bool, text: &str) -> String {
    format!("{text} {}", if ok { "✅" } else { "❌" })
}

// ------------------------------------------------------------------------------------------------
// Scenario: provision

/// What `concurrently` measured.
struct Driven {
    wall: Duration,
    latencies: Vec<Duration>,
    errors: Vec<String>,
}

/// Sends `count` requests (`body(i)` to `url`) from `concurrency` clients, each request as soon as
/// the client's previous one was answered; an answer `ok` rejects is an error.
async fn concurrently(
    url: &str,
    count: u64,
    concurrency: u64,
    body: fn(u64) -> Value,
    ok: fn(reqwest::StatusCode, &Value) -> bool,
) -> Result<Driven> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(120))
            .build()?;
        let (next, url) = (next.clone(), url.to_string());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let t = Instant::now();
                let outcome = async {
                    let response = client.post(&url).bearer_auth(ADMIN_TOKEN).json(&body(i)).send().await?;
                    let status = response.status();
                    let text = response.text().await?;
                    Ok::<_, reqwest::Error>((status, text))
                }
                .await;
                latencies.push(t.elapsed());
                match outcome {
                    Ok((status, text)) => {
                        let answer = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
                        if !ok(status, &answer) {
                            errors.push(format!("bench-{i}: {status} {}", snippet(&text)));
                        }
                    }
                    Err(e) => errors.push(format!("bench-{i}: {e}")),
                }
            }
            (latencies, errors)
        }));
    }
    let mut driven = Driven {
        wall: Duration::ZERO,
        latencies: Vec::new(),
        errors: Vec::new(),
    };
    for worker in workers {
        let (l, e) = worker.await.context("a client panicked")?;
        driven.latencies.extend(l);
        driven.errors.extend(e);
    }
    driven.wall = started.elapsed();
    Ok(driven)
}

fn provision_body(i: u64) -> Value {
    json!({
        "org_id": "acme",
        "team_node_id": format!("bench-{i}"),
        "slack_channel_ids": [format!("C{i}")],
        "create_pipeline_schedule": true,
    })
}

/// Provisions `teams` teams before a scenario measures something else (not measured).
async fn provision_setup(bench: &Bench, teams: u64, concurrency: u64, scenario: &str) -> Result<()> {
    let setup = concurrently(
        &bench.url("/api/v1/admin/provision/team"),
        teams,
        concurrency,
        provision_body,
        provisioned,
    )
    .await?;
    if !setup.errors.is_empty() {
        print_errors(&setup.errors);
        bail!(
            "{} teams could not be provisioned for the {scenario} bench",
            setup.errors.len()
        );
    }
    Ok(())
}

fn provisioned(status: reqwest::StatusCode, answer: &Value) -> bool {
    status == reqwest::StatusCode::OK && answer["status"] == "succeeded"
}

/// The rows every run-driving scenario reports: rate, latencies, memory, CPU and work per run.
struct RunFigures {
    noun: &'static str,
    count: u64,
    driven: Driven,
    cpu: String,
    peak: u64,
    startup: Duration,
    idle: u64,
    calls: usize,
    transactions: i64,
    rows_written: i64,
    /// Aims: runs per second and p99 latency (none for a scenario without aims).
    aims: Option<(f64, Duration)>,
}

/// The runs a scenario measures: `count` requests to `path` from `concurrency` clients.
struct Runs {
    noun: &'static str,
    path: &'static str,
    count: u64,
    concurrency: u64,
    body: fn(u64) -> Value,
    ok: fn(reqwest::StatusCode, &Value) -> bool,
    aims: Option<(f64, Duration)>,
}

/// Drives the runs against the service and measures them; `after` reads the stand-ins before the
/// service is stopped. Postgres counters are read once the service is gone (its backends publish
/// them as they exit).
async fn measure_runs<T>(
    options: &Options,
    bench: Bench,
    runs: Runs,
    after: impl FnOnce(&Devstack) -> T,
) -> Result<(RunFigures, T)> {
    let db = bench_db(options).await?;
    let stats_before = pg_activity(&db).await?;
    let calls_before = neighbour_calls(&bench.stack);
    let cpu_before = bench.cpu();
    let driven = concurrently(&bench.url(runs.path), runs.count, runs.concurrency, runs.body, runs.ok).await?;
    let cpu = bench.cpu().usage_since(&cpu_before);
    let peak = bench.peak_rss_kb();
    let (startup, idle) = (bench.startup, bench.idle_rss_kb);
    let calls = neighbour_calls(&bench.stack) - calls_before;
    let seen = after(&bench.stack);
    bench.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats_after = pg_activity(&db).await?;
    db.close().await;
    let figures = RunFigures {
        noun: runs.noun,
        count: runs.count,
        driven,
        cpu,
        peak,
        startup,
        idle,
        calls,
        transactions: stats_after.transactions - stats_before.transactions,
        rows_written: stats_after.rows_written - stats_before.rows_written,
        aims: runs.aims,
    };
    Ok((figures, seen))
}

fn report_runs(report: &mut Report, f: RunFigures) {
    let errors = &f.driven.errors;
    let latencies = Latencies::new(f.driven.latencies.clone());
    let rate = f.count as f64 / f.driven.wall.as_secs_f64();
    let p99 = latencies.percentile(99.0);
    report.row(
        &format!("teams {} (200, `succeeded`)", f.noun),
        (f.count - errors.len() as u64).to_string(),
        "",
    );
    report.row("errors", errors.len().to_string(), "0");
    report.row("wall time", format!("{:.2} s", f.driven.wall.as_secs_f64()), "");
    let (rate_aim, p99_aim) = match f.aims {
        Some((min_rate, max_p99)) => (
            aim(errors.is_empty() && rate >= min_rate, &format!("≥ {min_rate:.0}")),
            aim(
                errors.is_empty() && p99 < max_p99,
                &format!("< {} ms", max_p99.as_millis()),
            ),
        ),
        None => (String::new(), String::new()),
    };
    report.row("runs per second", format!("{rate:.1}"), &rate_aim);
    report.row("latency p50", ms(latencies.percentile(50.0)), "");
    report.row("latency p90", ms(latencies.percentile(90.0)), "");
    report.row("latency p99", ms(p99), &p99_aim);
    report.row("latency max", ms(latencies.max()), "");
    report.row("peak RSS (VmHWM)", mb(f.peak), "");
    report.row("idle RSS after ready (VmRSS)", mb(f.idle), "");
    report.row("start-up to ready (fresh database, migrations)", ms(f.startup), "");
    report.row("CPU during the load", f.cpu, "");
    report.row(
        "work per run",
        format!(
            "{:.1} neighbour calls (config service, AI pipeline, Kubernetes), {:.1} Postgres transactions, \
             {:.1} rows written",
            f.calls as f64 / f.count as f64,
            f.transactions as f64 / f.count as f64,
            f.rows_written as f64 / f.count as f64
        ),
        "",
    );
    report.fail_if(!errors.is_empty(), format!("{} requests failed", errors.len()));
    print_errors(errors);
}

async fn provision(options: &Options) -> Result<Report> {
    let teams = options.number("teams", 1000)?;
    let concurrency = options.number("concurrency", 16)?;
    let bench = Bench::start(options).await?;
    let runs = Runs {
        noun: "provisioned",
        path: "/api/v1/admin/provision/team",
        count: teams,
        concurrency,
        body: provision_body,
        ok: provisioned,
        aims: Some((150.0, Duration::from_millis(200))),
    };
    let (figures, bootstraps) = measure_runs(options, bench, runs, |stack| {
        stack.ai_pipeline.state().bootstraps().len()
    })
    .await?;
    let mut report = Report::new(
        "provision",
        &format!("`provision`: {teams} distinct teams, {concurrency} concurrent clients"),
    );
    report_runs(&mut report, figures);
    report.note(format!(
        "Each request is `POST /api/v1/admin/provision/team` (`create_pipeline_schedule: true`, shared \
         deployment), answered when the run has finished; latency is the full request time. The AI pipeline \
         stand-in recorded {bootstraps} bootstraps."
    ));
    Ok(report)
}

// ------------------------------------------------------------------------------------------------
// Scenario: deprovision

async fn deprovision(options: &Options) -> Result<Report> {
    let teams = options.number("teams", 1000)?;
    let concurrency = options.number("concurrency", 16)?;
    let bench = Bench::start(options).await?;
    // The teams to remove, each with a CronJob, a token and routing (not measured).
    provision_setup(&bench, teams, concurrency, "deprovisioning").await?;
    // An idle backend publishes its counters up to 10 s late (PGSTAT_IDLE_INTERVAL): let the
    // setup's arrive before the measured ones start, or they would be counted as deprovisioning's.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let runs = Runs {
        noun: "deprovisioned",
        path: "/api/v1/admin/deprovision/team",
        count: teams,
        concurrency,
        body: |i| json!({"org_id": "acme", "team_node_id": format!("bench-{i}")}),
        ok: |status, answer| status == reqwest::StatusCode::OK && answer["ok"] == true,
        aims: None,
    };
    let (figures, left) = measure_runs(options, bench, runs, |stack| {
        stack.kubernetes.state().objects("cronjobs").len()
    })
    .await?;
    let mut report = Report::new(
        "deprovision",
        &format!("`deprovision`: {teams} provisioned teams removed, {concurrency} concurrent clients"),
    );
    report_runs(&mut report, figures);
    report.row("CronJobs left afterwards", left.to_string(), "0");
    report.fail_if(left != 0, format!("{left} CronJobs were left behind"));
    report.note(
        "The teams are first provisioned (`create_pipeline_schedule: true`, a Slack channel, a team token; not \
         measured). Each measured request is `POST /api/v1/admin/deprovision/team`, answered when the run has \
         finished: routing cleared, the token revoked, both CronJobs and the dedicated agent looked up and \
         deleted where they exist."
            .to_string(),
    );
    Ok(report)
}

// ------------------------------------------------------------------------------------------------
// Scenario: reconcile

/// The resync interval the scenario runs with: short, so that a resync is measured within a
/// few seconds and the watches-refused detection bound is visible.
const RECONCILE_INTERVAL_SECONDS: u64 = 10;

/// A counter or the sum of a histogram, from the Prometheus text: the series named exactly.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn metrics_text(bench: &Bench) -> Result<String> {
    Ok(reqwest::get(bench.url("/metrics")).await?.text().await?)
}

/// Kubernetes calls by kind since the stand-in's log was last cleared.
struct KubeCalls {
    lists: usize,
    gets: usize,
    writes: usize,
}

fn kube_calls(stack: &Devstack) -> KubeCalls {
    let calls = stack.kubernetes.calls();
    let is_collection = |path: &str| {
        ["/cronjobs", "/deployments", "/services"]
            .iter()
            .any(|r| path.ends_with(r))
    };
    let watching = |query: &Option<String>| query.as_deref().is_some_and(|q| q.contains("watch=true"));
    KubeCalls {
        lists: calls
            .iter()
            .filter(|c| c.method == "GET" && is_collection(&c.path) && !watching(&c.query))
            .count(),
        gets: calls
            .iter()
            .filter(|c| c.method == "GET" && !is_collection(&c.path))
            .count(),
        writes: calls.iter().filter(|c| c.method != "GET").count(),
    }
}

/// Deletes the CronJobs of `teams` behind the service's back, all at once, and waits until each
/// is back (a new object of the same name): the time from each deletion to its repair.
async fn repair_times(stack: &Devstack, teams: &[u64], timeout: Duration) -> Result<Vec<Duration>> {
    let kube = stack.kubernetes.state();
    let name = |team: u64| format!("ai-pipeline-acme-bench-{team}");
    let mut pending: Vec<(String, String, Instant)> = Vec::new();
    for &team in teams {
        let name = name(team);
        let uid = kube
            .get("cronjobs", "incidentfox", &name)
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
            .ok_or_else(|| anyhow!("{name} does not exist before its deletion"))?;
        kube.delete_behind("cronjobs", "incidentfox", &name);
        pending.push((name, uid, Instant::now()));
    }
    let deadline = Instant::now() + timeout;
    let mut times = Vec::new();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "{} deleted CronJobs were not repaired within {timeout:?}",
                pending.len()
            );
        }
        pending.retain(|(name, uid, deleted_at)| {
            let back = kube
                .get("cronjobs", "incidentfox", name)
                .is_some_and(|o| o["metadata"]["uid"].as_str() != Some(uid.as_str()));
            if back {
                times.push(deleted_at.elapsed());
            }
            !back
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(times)
}

const RESYNC_COUNT: &str = r#"reconcile_duration_seconds_count{trigger="resync"}"#;

/// The metrics once the count of resyncs has passed `after`.
async fn next_resync(bench: &Bench, after: f64) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(RECONCILE_INTERVAL_SECONDS * 3);
    loop {
        let text = metrics_text(bench).await?;
        if metric(&text, RESYNC_COUNT) > after {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("no resync within {} s", RECONCILE_INTERVAL_SECONDS * 3);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn reconcile(options: &Options) -> Result<Report> {
    let teams = options.number("teams", 1000)?;
    let deletions = options.number("deletions", 100)?.min(teams);
    let concurrency = options.number("concurrency", 16)?;
    let interval = RECONCILE_INTERVAL_SECONDS.to_string();
    let bench = Bench::start_with(
        options,
        &[
            ("ORCHESTRATOR_RECONCILE_ENABLED", "true"),
            ("ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS", &interval),
        ],
    )
    .await?;
    provision_setup(&bench, teams, concurrency, "reconcile").await?;

    // One full resync of the 1,000 teams, nothing drifted: its time and its Kubernetes calls.
    let resync_count = RESYNC_COUNT;
    let resync_sum = r#"reconcile_duration_seconds_sum{trigger="resync"}"#;
    let before = metrics_text(&bench).await?;
    let seen = metric(&before, resync_count);
    // Let the resync under way (if any) finish, then count the next one alone.
    let settled = next_resync(&bench, seen).await?;
    bench.stack.kubernetes.clear_calls();
    let after = next_resync(&bench, metric(&settled, resync_count)).await?;
    let resyncs = metric(&after, resync_count) - metric(&settled, resync_count);
    let resync_time =
        Duration::from_secs_f64((metric(&after, resync_sum) - metric(&settled, resync_sum)) / resyncs.max(1.0));
    let calls = kube_calls(&bench.stack);
    let objects = bench.stack.kubernetes.state().objects("cronjobs").len();

    // Deletions behind its back, with watches working: time to repair.
    let spread = (teams / deletions).max(1);
    let watched_teams: Vec<u64> = (0..deletions).map(|i| i * spread).collect();
    let mut watched = Vec::new();
    for chunk in watched_teams.chunks(10) {
        watched.extend(repair_times(&bench.stack, chunk, Duration::from_secs(120)).await?);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let watched = Latencies::new(watched);

    // The same with watches refused (the open ones end too): the resync alone finds them.
    bench.stack.kubernetes.state().refuse_watches(true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resync_only_teams: Vec<u64> = (0..10).map(|i| i * spread + 1).collect();
    let resync_only = Latencies::new(
        repair_times(
            &bench.stack,
            &resync_only_teams,
            Duration::from_secs(RECONCILE_INTERVAL_SECONDS * 4),
        )
        .await?,
    );
    let repaired = metric(
        &metrics_text(&bench).await?,
        r#"reconcile_drift_repaired_total{drift="missing",kind="pipeline_cronjob"}"#,
    );
    bench.stop().await;

    let mut report = Report::new(
        "reconcile",
        &format!("`reconcile`: {teams} provisioned teams, one full resync, {deletions} deletions behind its back"),
    );
    report.row("objects listed per resync", objects.to_string(), "");
    report.row("full resync time (nothing drifted)", ms(resync_time), "");
    report.row(
        "Kubernetes calls in that resync",
        format!("{} list, {} get, {} writes", calls.lists, calls.gets, calls.writes),
        "3 list (one per kind), 0 per team",
    );
    let one_list_per_kind = calls.lists == 3 && calls.gets == 0 && calls.writes == 0;
    report.fail_if(
        !one_list_per_kind,
        format!(
            "a resync made {} lists, {} gets and {} writes",
            calls.lists, calls.gets, calls.writes
        ),
    );
    report.row(
        "deletion to repair, watches working: p50 / p99 / max",
        watched.p50_p99_max(),
        "p99 < 60 s",
    );
    report.fail_if(
        watched.percentile(99.0) >= Duration::from_secs(60),
        "p99 time to repair is over 60 s".into(),
    );
    report.row(
        &format!("deletion to repair, watches refused (resync every {RECONCILE_INTERVAL_SECONDS} s): p50 / p99 / max"),
        resync_only.p50_p99_max(),
        &format!("≤ {RECONCILE_INTERVAL_SECONDS} s + a resync"),
    );
    report.row(
        "repairs counted (`reconcile_drift_repaired_total`)",
        format!("{repaired}"),
        "",
    );
    report.note(format!(
        "The teams are provisioned first (`create_pipeline_schedule: true`, not measured); the service runs with \
         `ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS={RECONCILE_INTERVAL_SECONDS}` (default 30). The resync figures come \
         from `reconcile_duration_seconds{{trigger=\"resync\"}}` and the Kubernetes stand-in's request log over one \
         resync. Deletions are made in the stand-in (as an operator's `kubectl delete` would), 10 at a time; the \
         time is from the deletion until a new CronJob of that name exists. With watches refused, the stand-in \
         ends the open watches and answers 403 to new ones, as a revoked permission would."
    ));
    Ok(report)
}

// ------------------------------------------------------------------------------------------------
// Scenario: idle

/// An idle replica's Postgres transactions per second: every background worker at rest (the
/// dispatch poll, the resumer, housekeeping, the reconciler's resync, the agent-run sweep).
async fn idle(options: &Options) -> Result<Report> {
    let seconds = options.number("seconds", 120)?;
    let bench = Bench::start(options).await?;
    let db = bench_db(options).await?;
    // Start-up work (migrations, the first resync, the first housekeeping) settles, and an idle
    // backend publishes its counters up to 10 s late (PGSTAT_IDLE_INTERVAL).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let before = pg_activity(&db).await?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let after = pg_activity(&db).await?;
    let memory = bench.service.memory();
    bench.stop().await;
    // The bench's own reading of the counters is one transaction.
    let transactions = (after.transactions - before.transactions - 1).max(0);
    let per_second = transactions as f64 / seconds as f64;
    let mut report = Report::new("idle", &format!("`idle`: one replica at rest for {seconds} s"));
    report.row("Postgres transactions", transactions.to_string(), "");
    report.row("transactions per second", format!("{per_second:.2}"), "≤ 1");
    report.row(
        "rows written",
        (after.rows_written - before.rows_written).to_string(),
        "",
    );
    if let Some(memory) = memory {
        report.row("resident memory (VmRSS)", mb(memory.rss_kb), "");
    }
    report.fail_if(
        per_second > 1.0,
        format!("an idle replica runs {per_second:.2} transactions a second"),
    );
    report.note(
        "A fresh database, no teams and no traffic, default settings. `pg_stat_database.xact_commit` of the bench \
         database before and after the window (an idle backend publishes its counters up to 10 s late: the window \
         starts 15 s after ready, and both readings lag alike)."
            .to_string(),
    );
    Ok(report)
}

// ------------------------------------------------------------------------------------------------
// Scenario: recovery

/// Sends signed GitHub deliveries numbered `from..to` to `base`, `per_second` of them a second;
/// answers how many were accepted.
async fn deliver_stream(base: &str, from: u64, to: u64, per_second: u64) -> Result<u64> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let pause = Duration::from_secs_f64(1.0 / per_second as f64);
    let mut accepted = 0;
    for n in from..to {
        let body = pull_request_body(n);
        let response = client
            .post(format!("{base}/webhooks/github"))
            .header("Content-Type", "application/json")
            .header("X-GitHub-Event", "pull_request")
            .header("X-GitHub-Delivery", format!("recovery-{n}"))
            .header("X-Hub-Signature-256", github_signature(&body))
            .body(body)
            .send()
            .await;
        if response.is_ok_and(|r| r.status() == reqwest::StatusCode::OK) {
            accepted += 1;
        }
        tokio::time::sleep(pause).await;
    }
    Ok(accepted)
}

/// (delivered, held under a live lease) events of the bench database.
async fn inbox_state(db: &PgPool) -> Result<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'delivered'),
                count(*) FILTER (WHERE status = 'pending' AND lease_until > now())
         FROM orchestrator_webhook_events",
    )
    .fetch_one(db)
    .await?)
}

/// Starts provisioning team `recovery-{round}` on the replica at `base` without waiting for it.
async fn start_provisioning(base: &str, round: u64) -> Result<uuid::Uuid> {
    let response = reqwest::Client::new()
        .post(format!("{base}/api/v1/admin/provision/team"))
        .bearer_auth(ADMIN_TOKEN)
        .header("Prefer", "respond-async")
        .json(&json!({
            "org_id": "acme",
            "team_node_id": format!("recovery-{round}"),
            "slack_channel_ids": [format!("CR{round}")],
            "create_pipeline_schedule": true,
        }))
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    answer["provisioning_run_id"]
        .as_str()
        .and_then(|id| uuid::Uuid::parse_str(id).ok())
        .ok_or_else(|| anyhow!("provisioning answered {status}: {answer}"))
}

/// The steps of `run` that had finished (name and when), while the run is still `running`;
/// `None` once it is not.
async fn finished_steps(db: &PgPool, run: uuid::Uuid) -> Result<Option<Vec<(String, String)>>> {
    let status: String = sqlx::query_scalar("SELECT status FROM orchestrator_provisioning_runs WHERE id = $1")
        .bind(run)
        .fetch_one(db)
        .await?;
    if status != "running" {
        return Ok(None);
    }
    Ok(Some(
        sqlx::query_as(
            "SELECT name, finished_at::text FROM orchestrator_provisioning_steps
             WHERE run_id = $1 AND status = 'succeeded' ORDER BY position",
        )
        .bind(run)
        .fetch_all(db)
        .await?,
    ))
}

/// After a kill: how long until another replica took `run` over (its execution count went up)
/// and until it ended, and how it ended. `None`: it ended in its first execution, the victim's
/// last commit having reached Postgres as it was killed (a run ends about as the stream does).
async fn watch_takeover(db: PgPool, run: uuid::Uuid, killed: Instant) -> Result<Option<(Duration, Duration, String)>> {
    let mut taken_over = None;
    let deadline = killed + Duration::from_secs(60);
    loop {
        let (executions, status): (i32, String) =
            sqlx::query_as("SELECT executions, status FROM orchestrator_provisioning_runs WHERE id = $1")
                .bind(run)
                .fetch_one(&db)
                .await?;
        if executions > 1 && taken_over.is_none() {
            taken_over = Some(killed.elapsed());
        }
        if status != "running" {
            return Ok(taken_over.map(|taken_over| (taken_over, killed.elapsed(), status)));
        }
        if Instant::now() > deadline {
            bail!("provisioning run {run} was still running 60 s after the kill");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills a replica (SIGKILL) in the middle of a stream of deliveries, many times, while another
/// keeps running: how long until everything the dead one held is delivered, whether anything
/// accepted was lost, and how many agent calls were made twice.
async fn recovery(options: &Options) -> Result<Report> {
    let kills = options.number("kills", 10)?;
    let bench = Bench::start(options).await?;
    let db = bench_db(options).await?;
    bench.stack.config_service.state().set_team_config(
        "acme",
        "bench",
        json!({"routing": {"github_repos": ["acme/bench"]}}),
    );
    // Agent runs of 500 ms: the victim holds several at each kill.
    bench.stack.agent.state().set_delay(Duration::from_millis(500));
    // Kubernetes answers in 300 ms: the victim's provisioning run is between steps at each kill.
    bench.stack.kubernetes.faults().set_latency(Duration::from_millis(300));
    let kubeconfig = bench._scratch.0.join("kubeconfig.json");
    let per_kill = 40;
    let mut accepted = 0u64;
    let mut takeovers = Vec::new();
    let mut held_at_kills = 0i64;
    let (mut run_takeovers, mut run_ends) = (Vec::new(), Vec::new());
    let (mut runs_not_succeeded, mut steps_repeated, mut runs_finished_before_kill) = (0u64, 0u64, 0u64);
    for kill in 0..kills {
        let (mut victim, victim_base, _) = spawn_service(
            options,
            &bench.stack,
            &kubeconfig,
            &[],
            &format!("recovery-victim-{kill}"),
        )
        .await?;
        let from = kill * per_kill;
        let run = start_provisioning(&victim_base, kill).await?;
        // Half the stream reaches the victim, then it dies mid-stream (and mid-run); the rest goes
        // to the survivor.
        accepted += deliver_stream(&victim_base, from, from + per_kill / 2, 40).await?;
        let (_, held) = inbox_state(&db).await?;
        held_at_kills += held;
        let mut steps_done = finished_steps(&db, run).await?;
        while steps_done.as_ref().is_some_and(Vec::is_empty) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            steps_done = finished_steps(&db, run).await?;
        }
        victim.kill_now();
        let killed = Instant::now();
        let takeover = match &steps_done {
            Some(_) => Some(tokio::spawn(watch_takeover(db.clone(), run, killed))),
            None => {
                runs_finished_before_kill += 1;
                None
            }
        };
        accepted += deliver_stream(&bench.url(""), from + per_kill / 2, from + per_kill, 40).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (delivered, _) = inbox_state(&db).await?;
            if delivered as u64 >= accepted {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} accepted events were not delivered 60 s after kill {kill}",
                    accepted - delivered as u64
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        takeovers.push(killed.elapsed());
        if let (Some(takeover), Some(steps_done)) = (takeover, steps_done) {
            let Some((taken_over, ended, status)) = takeover.await?? else {
                runs_finished_before_kill += 1;
                continue;
            };
            run_takeovers.push(taken_over);
            run_ends.push(ended);
            runs_not_succeeded += u64::from(status != "succeeded");
            // A step that had finished before the kill and finished again after it ran twice.
            let after: Vec<(String, String)> = sqlx::query_as(
                "SELECT name, finished_at::text FROM orchestrator_provisioning_steps
                 WHERE run_id = $1 AND status = 'succeeded' ORDER BY position",
            )
            .bind(run)
            .fetch_all(&db)
            .await?;
            steps_repeated += steps_done.iter().filter(|step| !after.contains(step)).count() as u64;
        }
    }
    let (delivered, _) = inbox_state(&db).await?;
    let lost = accepted.saturating_sub(delivered as u64);
    // Agent calls per event (its id is the correlation id): any over one is a repeat.
    let mut calls: BTreeMap<String, u64> = BTreeMap::new();
    for call in bench.stack.agent.calls() {
        if let Some(id) = call.headers.get("x-correlation-id") {
            *calls.entry(id.clone()).or_default() += 1;
        }
    }
    let repeated: u64 = calls.values().map(|n| n.saturating_sub(1)).sum();
    bench.stop().await;
    let takeovers = Latencies::new(takeovers);
    let mut report = Report::new(
        "recovery",
        &format!("`recovery`: a replica killed (SIGKILL) mid-stream {kills} times beside a live one"),
    );
    report.row("deliveries accepted", accepted.to_string(), "");
    report.row("lost (accepted, never delivered)", lost.to_string(), "0");
    report.fail_if(lost != 0, format!("{lost} accepted deliveries were lost"));
    report.row(
        "kill → every accepted event delivered: p50 / p99 / max",
        takeovers.p50_p99_max(),
        "take-over p99 ≤ 10 s",
    );
    report.fail_if(
        takeovers.percentile(99.0) > Duration::from_secs(11),
        "the take-over p99 (less one agent run) is over 10 s".into(),
    );
    report.row(
        "agent calls made twice",
        format!("{repeated} (events under a lease at the kills, both replicas: {held_at_kills})"),
        "at most those in flight at the kill",
    );
    report.fail_if(
        repeated as i64 > held_at_kills,
        format!("{repeated} repeated agent calls, more than the {held_at_kills} in flight"),
    );
    let run_takeovers = Latencies::new(run_takeovers);
    let run_ends = Latencies::new(run_ends);
    report.row(
        "provisioning runs killed mid-way",
        format!(
            "{} (finished before the kill, or by its last commit: {runs_finished_before_kill})",
            run_takeovers.0.len()
        ),
        "",
    );
    report.row(
        "kill → run taken over: p50 / p99 / max",
        run_takeovers.p50_p99_max(),
        "take-over p99 ≤ 10 s",
    );
    report.fail_if(
        run_takeovers.0.is_empty() || run_takeovers.percentile(99.0) > Duration::from_secs(10),
        "no provisioning run was killed mid-way, or their take-over p99 is over 10 s".into(),
    );
    report.row("kill → run succeeded: p50 / p99 / max", run_ends.p50_p99_max(), "");
    report.row(
        "runs not succeeded / steps finished twice",
        format!("{runs_not_succeeded} / {steps_repeated}"),
        "0 / 0",
    );
    report.fail_if(
        runs_not_succeeded + steps_repeated != 0,
        format!("{runs_not_succeeded} runs did not succeed, {steps_repeated} steps finished twice"),
    );
    report.note(format!(
        "Default settings (`ORCHESTRATOR_DISPATCH_LEASE_SECONDS=6`). Each round starts a second replica (the \
         victim), sends it {} signed GitHub deliveries at 40 a second while the agent stand-in takes 500 ms a \
         run, kills it with SIGKILL, sends the survivor {} more, and measures from the kill until the database \
         shows every accepted event delivered: the take-over of what the victim held (its leases expire within \
         6 s, then the survivor claims them) plus one agent run. Repeated calls are counted by the agent \
         stand-in per correlation id (the event id). Each round also starts provisioning a team on the victim \
         (Kubernetes stand-in answering in 300 ms) and kills it once a step has finished and the run is still \
         going: the take-over is the survivor counting a new execution (`ORCHESTRATOR_PROVISION_RESUME_INTERVAL_MS` \
         5,000 by default: the resumer's scan finds the run once the dead replica's lock session is gone), and a \
         step finished twice is one whose recorded finish changed after the kill.",
        per_kill / 2,
        per_kill / 2
    ));
    Ok(report)
}

fn snippet(text: &str) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() > 300 {
        format!("{}…", text.chars().take(300).collect::<String>())
    } else {
        text
    }
}

fn print_errors(errors: &[String]) {
    for e in errors.iter().take(MAX_PRINTED_ERRORS) {
        eprintln!("[bench] error: {e}");
    }
    if errors.len() > MAX_PRINTED_ERRORS {
        eprintln!("[bench] … and {} more errors", errors.len() - MAX_PRINTED_ERRORS);
    }
}

// ------------------------------------------------------------------------------------------------
// Scenario: ingest

const PR_PARAGRAPH: &str = "This change tightens the retry budget of the payment gateway client. Until now a \
    slow upstream could make every request retry five times with a fixed two second pause, which \
    multiplied the load on the gateway exactly when it was already struggling and held worker threads for \
    up to ten seconds. The client now retries at most three times with exponential backoff and full jitter, \
    honours Retry-After, and gives up once the caller's deadline has passed. A new histogram, \
    payment_gateway_retry_seconds, records the time spent waiting between attempts, and the existing \
    error counter gains an outcome label so that dashboards can tell retried successes from final \
    failures. The integration tests cover a gateway that answers 503 twice and then 200, a gateway that \
    never answers, and a deadline shorter than the first backoff. Rollout: behind the flag \
    payments.retry_v2, enabled for ten percent of traffic first; the runbook explains how to turn it off. \
    Dashboards and alerts were reviewed with the on-call team, and the load test of last week was repeated \
    with the new client: p99 latency stayed flat while the gateway shed load, and no request exceeded its budget.";

/// The body of pull request `n` of `acme/bench`. Written out once as text with the number spliced in, so the load
/// generator spends its time sending, not building JSON (its CPU comes out of the same two cores).
fn pull_request_body(n: u64) -> Vec<u8> {
    pull_request_body_in("acme", "bench", n)
}

/// The body of pull request `n` of repository `owner/name`.
fn pull_request_body_in(owner: &str, name: &str, n: u64) -> Vec<u8> {
    static PARAGRAPH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let paragraph = PARAGRAPH.get_or_init(|| serde_json::to_string(PR_PARAGRAPH).unwrap_or_default());
    let id = 1_000_000 + n;
    format!(
        r#"{{"action":"opened","number":{n},"pull_request":{{"additions":184,"base":{{"ref":"main","sha":"9049f1265b7d61be4a8904a9a27120d2064dab3b"}},"body":{paragraph},"changed_files":7,"commits":3,"created_at":"2025-01-01T00:00:00Z","deletions":61,"draft":false,"head":{{"ref":"retry-budget-{n}","sha":"6dcb09b5b57875f334f61aebed695e2e4193db5e"}},"html_url":"https://github.com/{owner}/{name}/pull/{n}","id":{id},"labels":[{{"name":"reliability"}},{{"name":"payments"}}],"number":{n},"requested_reviewers":[{{"login":"sre-oncall"}},{{"login":"payments-lead"}}],"state":"open","title":"Tighten the retry budget of the payment gateway client (#{n})","user":{{"id":583231,"login":"octo-dev"}}}},"repository":{{"default_branch":"main","full_name":"{owner}/{name}","html_url":"https://github.com/{owner}/{name}","id":1296269,"name":"{name}","private":true}},"sender":{{"id":583231,"login":"octo-dev","type":"User"}}}}"#
    )
    .into_bytes()
}

fn github_signature(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(GITHUB_SECRET.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One keep-alive HTTP/1.1 connection that writes each request as one buffer and reads the answer
/// by its Content-Length, like wrk: the load generator shares the machine's two cores with the
/// service it measures, and a general-purpose client (reqwest) spent more of them than the
/// requests needed.
struct RawClient {
    stream: tokio::net::TcpStream,
    head: String,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl RawClient {
    async fn connect(address: std::net::SocketAddr, path: &str) -> Result<RawClient> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .with_context(|| format!("connecting to {address}"))?;
        stream.set_nodelay(true)?;
        Ok(RawClient {
            stream,
            head: format!("POST {path} HTTP/1.1\r\nHost: {address}\r\n"),
            request: Vec::with_capacity(4096),
            response: Vec::with_capacity(1024),
        })
    }

    /// The status and body of the answer to one POST.
    async fn post(&mut self, headers: &[(&str, &str)], body: &[u8]) -> Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.request.clear();
        self.request.extend_from_slice(self.head.as_bytes());
        for (name, value) in headers {
            let _ = write!(self.request, "{name}: {value}\r\n");
        }
        let _ = write!(self.request, "Content-Length: {}\r\n\r\n", body.len());
        self.request.extend_from_slice(body);
        self.stream.write_all(&self.request).await?;

        self.response.clear();
        let mut chunk = [0u8; 2048];
        let (head_end, length) = loop {
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("the service closed the connection");
            }
            self.response.extend_from_slice(&chunk[..read]);
            if let Some(end) = self.response.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.response[..end]).context("a response head that is not text")?;
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .ok_or_else(|| anyhow!("a response without Content-Length: {head}"))?;
                break (end + 4, length);
            }
        };
        while self.response.len() < head_end + length {
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("the service closed the connection mid-answer");
            }
            self.response.extend_from_slice(&chunk[..read]);
        }
        let status = std::str::from_utf8(&self.response[..head_end])
            .ok()
            .and_then(|head| head.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("a response without a status line"))?;
        Ok((status, self.response[head_end..head_end + length].to_vec()))
    }
}

/// Why a signed delivery was not acknowledged, and whether its worker must stop.
struct NotAccepted {
    errors: Vec<String>,
    stop: bool,
}

impl RawClient {
    /// Sends one signed GitHub `pull_request` delivery; answers its acknowledgement time when it
    /// was accepted (`200 {"ok":true}`). A broken connection is replaced by a new one.
    async fn deliver(
        &mut self,
        address: std::net::SocketAddr,
        path: &str,
        body: &[u8],
        delivery: &str,
    ) -> Result<Duration, NotAccepted> {
        let signature = github_signature(body);
        let headers = [
            ("X-GitHub-Event", "pull_request"),
            ("X-GitHub-Delivery", delivery),
            ("X-Hub-Signature-256", signature.as_str()),
            ("Content-Type", "application/json"),
        ];
        let t = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(30), self.post(&headers, body)).await;
        let elapsed = t.elapsed();
        let refused = |error: String, stop: bool| NotAccepted {
            errors: vec![error],
            stop,
        };
        match outcome {
            Ok(Ok((200, response))) if response == br#"{"ok":true}"# => Ok(elapsed),
            Ok(Ok((status, response))) => Err(refused(
                format!(
                    "delivery {delivery}: {status} {}",
                    snippet(&String::from_utf8_lossy(&response))
                ),
                false,
            )),
            Ok(Err(e)) => {
                let mut failed = refused(format!("delivery {delivery}: {e:#}"), false);
                // The connection is in an unknown state: start a new one.
                match RawClient::connect(address, path).await {
                    Ok(fresh) => *self = fresh,
                    Err(e) => {
                        failed.errors.push(format!("reconnecting: {e:#}"));
                        failed.stop = true;
                    }
                }
                Err(failed)
            }
            Err(_) => Err(refused(format!("delivery {delivery}: no answer within 30 s"), true)),
        }
    }
}

#[derive(Default)]
struct IngestWorker {
    latencies: Vec<Duration>,
    accepted: u64,
    errors: Vec<String>,
}

/// One round of `ingest`: the pgbench ceiling, the service under load (then drained and stopped),
/// and the ceiling again. The machine's speed drifts by tens of percent within a minute, so the
/// service's rate is compared with the mean of the two ceilings that bracket it.
struct IngestRound {
    accepted: u64,
    errors: Vec<String>,
    rate: f64,
    latencies: Latencies,
    peak_kb: u64,
    peak_after_load_kb: u64,
    idle_kb: u64,
    startup: Duration,
    drain: Duration,
    open: i64,
    statuses: BTreeMap<String, i64>,
    stored: i64,
    delivered: i64,
    duplicates: i64,
    runs_started: usize,
    runs_completed: usize,
    runs_cancelled: usize,
    cpu_during_load: String,
    drain_cpu: f64,
    transactions_per_delivery: f64,
    rows_per_delivery: f64,
    before: Option<Ceiling>,
    after: Option<Ceiling>,
}

impl IngestRound {
    fn ceiling_tps(&self) -> Option<f64> {
        mean_ceiling(&self.before, &self.after)
    }

    fn ratio(&self) -> Option<f64> {
        self.ceiling_tps().map(|ceiling| self.rate / ceiling)
    }

    fn exactly_once(&self) -> bool {
        let accepted = self.accepted as i64;
        self.accepted > 0
            && self.open == 0
            && self.delivered == accepted
            && self.stored == accepted
            && self.runs_completed == self.accepted as usize
            && self.runs_started == self.accepted as usize
            && self.duplicates == 0
    }

    fn ceilings_text(&self) -> String {
        let tps = |c: &Option<Ceiling>| c.as_ref().map_or("failed".into(), |c| format!("{:.0}", c.tps));
        format!("{} before, {} after", tps(&self.before), tps(&self.after))
    }

    fn status_text(&self) -> String {
        self.statuses
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

async fn ingest(options: &Options) -> Result<Report> {
    let duration = Duration::from_secs(options.number("duration", 10)?);
    let connections = options.number("connections", 32)?;
    let rounds = options.number("rounds", 3)?;
    let mut results = Vec::new();
    for round in 1..=rounds {
        println!("[bench] round {round} of {rounds}");
        let result = ingest_round(options, round, duration, connections).await?;
        println!(
            "[bench] round {round}: {:.0}/s against a ceiling of {} tps: {}",
            result.rate,
            result.ceilings_text(),
            percent(result.ratio())
        );
        results.push(result);
    }
    // The round with the median ratio speaks for the run; every round is listed.
    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by(|&a, &b| {
        let ratio = |i: usize| results[i].ratio().unwrap_or(0.0);
        ratio(a).total_cmp(&ratio(b))
    });
    let median = &results[order[order.len() / 2]];
    let ratio = median.ratio();
    let p99 = median.latencies.percentile(99.0);
    let body_size = pull_request_body(1).len();

    let mut report = Report::new(
        "ingest",
        &format!(
            "`ingest`: signed GitHub deliveries, {connections} connections for {} s, {rounds} rounds",
            duration.as_secs()
        ),
    );
    report.row(
        "each round: accepted/s ÷ pgbench ceiling (mean of before and after)",
        results
            .iter()
            .map(|r| {
                format!(
                    "{:.0} ÷ {} = {}",
                    r.rate,
                    r.ceiling_tps().map_or("-".into(), |c| format!("{c:.0}")),
                    percent(r.ratio())
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        "",
    );
    report.row(
        "ratio to the ceiling (median round)",
        percent(ratio),
        &aim(ratio.is_some_and(|r| r >= 0.7), "≥ 70%"),
    );
    report.row(
        "median round: deliveries accepted (200 `{\"ok\":true}`)",
        median.accepted.to_string(),
        "",
    );
    report.row("rejected or failed", median.errors.len().to_string(), "0");
    report.row("delivery body", format!("{body_size} bytes"), "");
    report.row("accepted per second", format!("{:.0}", median.rate), "");
    report.row(
        "pgbench ceiling (same insert, same concurrency)",
        format!("{} tps", median.ceilings_text()),
        "",
    );
    report.row("ack latency p50", ms(median.latencies.percentile(50.0)), "");
    report.row("ack latency p90", ms(median.latencies.percentile(90.0)), "");
    report.row(
        "ack latency p99",
        ms(p99),
        &aim(median.accepted > 0 && p99 < Duration::from_millis(25), "< 25 ms"),
    );
    report.row("ack latency max", ms(median.latencies.max()), "");
    let peak = results.iter().map(|r| r.peak_kb).max().unwrap_or(0);
    report.row(
        "peak RSS (VmHWM), highest of all rounds",
        mb(peak),
        &aim(peak < 100 * 1024, "< 100 MB"),
    );
    report.row("peak RSS at the end of the load", mb(median.peak_after_load_kb), "");
    report.row("idle RSS after ready (VmRSS)", mb(median.idle_kb), "");
    report.row(
        "dispatch drain after the load",
        format!(
            "{:.2} s{}",
            median.drain.as_secs_f64(),
            if median.open > 0 { " (timed out)" } else { "" }
        ),
        "",
    );
    report.row("events by status", median.status_text(), "");
    let all_once = results.iter().all(IngestRound::exactly_once);
    report.row(
        "exactly once, every round: delivered = agent runs = accepted, no duplicate ids",
        format!(
            "{} (median round: delivered {}, stored {}, agent runs started {} / completed {} / cancelled {}, \
             duplicate ids {})",
            if all_once { "yes" } else { "NO" },
            median.delivered,
            median.stored,
            median.runs_started,
            median.runs_completed,
            median.runs_cancelled,
            median.duplicates
        ),
        &aim(all_once, "yes"),
    );
    report.row("CPU during the load", median.cpu_during_load.clone(), "");
    report.row(
        "orchestrator CPU during the drain",
        format!("{:.2} s", median.drain_cpu),
        "",
    );
    report.row(
        "Postgres work per accepted delivery (ingest + dispatch)",
        format!(
            "{:.1} transactions, {:.1} rows written",
            median.transactions_per_delivery, median.rows_per_delivery
        ),
        "",
    );
    report.row("start-up to ready (fresh database, migrations)", ms(median.startup), "");
    report.note(format!(
        "Each delivery is a `pull_request` `opened` event of {body_size} bytes for `acme/bench` (routed to team \
         `acme/bench` by `github_repos`), with a unique `X-GitHub-Delivery` and pull request number, signed with \
         HMAC-SHA256. Each of the {connections} workers holds one keep-alive connection and sends the next \
         delivery when the previous one is acknowledged. Dispatch runs in the same process during the load \
         (default `ORCHESTRATOR_DISPATCH_WORKERS` and `ORCHESTRATOR_DISPATCH_NICE`: its threads run niced by \
         10), to the agent stand-in with no delay."
    ));
    if let Some(ceiling) = median.before.as_ref().or(median.after.as_ref()) {
        report.note(format!(
            "Each round: `{}` into empty copies of the two tables (`CREATE TABLE … (LIKE … INCLUDING ALL)`, same \
             indexes and storage parameters), with the service started but idle; then the service under load, \
             drained and stopped; then the same pgbench again. One delivery per transaction, its id and its event \
             inserted by one CTE statement like the service's (same columns and body), prepared like sqlx prepares \
             it (median round, before: {} transactions, {:.2} ms average latency). The machine's speed drifts \
             within a minute, so each round's rate is compared with the mean of the two ceilings around it, and \
             the round with the median ratio is reported.",
            ceiling.command, ceiling.transactions, ceiling.latency_ms
        ));
    }
    report.note(
        "The load generator, the stand-ins and dispatch share the machine's cores with the orchestrator and \
         Postgres during the service's run; pgbench competes only with Postgres."
            .to_string(),
    );
    for (i, round) in results.iter().enumerate() {
        report.fail_if(
            !round.errors.is_empty(),
            format!("round {}: {} deliveries were not accepted", i + 1, round.errors.len()),
        );
        report.fail_if(
            !round.exactly_once(),
            format!(
                "round {}: exactly-once check failed: {}; agent runs completed {}, duplicate ids {}, accepted {}",
                i + 1,
                round.status_text(),
                round.runs_completed,
                round.duplicates,
                round.accepted
            ),
        );
        report.fail_if(
            round.ceiling_tps().is_none(),
            format!("round {}: the pgbench ceiling could not be measured", i + 1),
        );
        print_errors(&round.errors);
    }
    Ok(report)
}

async fn ingest_round(options: &Options, round: u64, duration: Duration, connections: u64) -> Result<IngestRound> {
    let pgbench = std::env::var("PGBENCH").unwrap_or_else(|_| "pgbench".into());
    let db = bench_db(options).await?;
    if round > 1 {
        // Every round starts from an empty inbox (the tables exist since the first round's migrations).
        sqlx::query("TRUNCATE orchestrator_webhook_events, orchestrator_webhook_deliveries")
            .execute(&db)
            .await
            .context("emptying the inbox between rounds")?;
    }
    let bench = Bench::start(options).await?;
    bench.stack.config_service.state().set_team_config(
        "acme",
        "bench",
        json!({"routing": {"github_repos": ["acme/bench"]}}),
    );
    let ceiling = |when: &'static str| {
        let (db, pgbench) = (&db, &pgbench);
        async move {
            pgbench_ceiling(db, pgbench, connections, duration, options)
                .await
                .map_err(|e| eprintln!("[bench] error: the pgbench ceiling {when}: {e:#}"))
                .ok()
        }
    };
    let before = ceiling("before the load").await;

    let (url, address) = bench.github_webhook()?;
    let next = Arc::new(AtomicU64::new(1));
    let stats_before = pg_activity(&db).await?;
    let cpu_before = bench.cpu();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut workers = Vec::new();
    for _ in 0..connections {
        let mut client = RawClient::connect(address, url.path()).await?;
        let (next, path) = (next.clone(), url.path().to_owned());
        workers.push(tokio::spawn(async move {
            let mut stats = IngestWorker::default();
            while tokio::time::Instant::now() < deadline {
                // A distinct pull request per delivery: no two deliveries share an ordering key.
                let n = next.fetch_add(1, Ordering::Relaxed);
                let body = pull_request_body(n);
                let delivery = uuid::Uuid::new_v4().to_string();
                match client.deliver(address, &path, &body, &delivery).await {
                    Ok(elapsed) => {
                        stats.accepted += 1;
                        stats.latencies.push(elapsed);
                    }
                    Err(failed) => {
                        stats.errors.extend(failed.errors);
                        if failed.stop {
                            break;
                        }
                    }
                }
            }
            stats
        }));
    }
    let mut samples = Vec::new();
    let mut accepted = 0u64;
    let mut errors = Vec::new();
    for worker in workers {
        let stats = worker.await.context("an ingest client panicked")?;
        samples.extend(stats.latencies);
        accepted += stats.accepted;
        errors.extend(stats.errors);
    }
    let load_time = started.elapsed();
    let cpu_after_load = bench.cpu();
    let peak_after_load_kb = bench.peak_rss_kb();
    let rate = accepted as f64 / load_time.as_secs_f64();
    println!(
        "[bench] {accepted} deliveries accepted in {:.2} s ({rate:.0}/s), {} rejected or failed; waiting for dispatch",
        load_time.as_secs_f64(),
        errors.len()
    );

    // Drain: every stored event leaves pending/processing.
    let drain_started = Instant::now();
    let mut statuses: BTreeMap<String, i64>;
    loop {
        statuses = sqlx::query_as::<_, (String, i64)>(
            "SELECT status, count(*) FROM orchestrator_webhook_events GROUP BY status",
        )
        .fetch_all(&db)
        .await
        .context("reading orchestrator_webhook_events")?
        .into_iter()
        .collect();
        let open = statuses.get("pending").copied().unwrap_or(0) + statuses.get("processing").copied().unwrap_or(0);
        if open == 0 || drain_started.elapsed() > DRAIN_TIMEOUT {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain = drain_started.elapsed();
    let drain_cpu = bench.cpu().service_seconds_since(&cpu_after_load);
    let open = statuses.get("pending").copied().unwrap_or(0) + statuses.get("processing").copied().unwrap_or(0);
    let stored: i64 = statuses.values().sum();
    let delivered = statuses.get("delivered").copied().unwrap_or(0);
    let duplicates: i64 =
        sqlx::query_scalar("SELECT count(*) - count(DISTINCT delivery_id) FROM orchestrator_webhook_events")
            .fetch_one(&db)
            .await
            .context("counting duplicate delivery ids")?;
    let agent = bench.stack.agent.state();
    let (runs_started, runs_completed, runs_cancelled) =
        (agent.runs_started(), agent.runs_completed(), agent.runs_cancelled());
    let peak_kb = bench.peak_rss_kb();
    let (startup, idle_kb) = (bench.startup, bench.idle_rss_kb);
    bench.stop().await;
    // Backends report their statistics when they exit; give them a moment after the child is gone.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats_after = pg_activity(&db).await?;
    let after = ceiling("after the load").await;
    db.close().await;

    let per = |n: i64| n as f64 / accepted.max(1) as f64;
    Ok(IngestRound {
        accepted,
        errors,
        rate,
        latencies: Latencies::new(samples),
        peak_kb,
        peak_after_load_kb,
        idle_kb,
        startup,
        drain,
        open,
        statuses,
        stored,
        delivered,
        duplicates,
        runs_started,
        runs_completed,
        runs_cancelled,
        cpu_during_load: cpu_after_load.usage_since(&cpu_before),
        drain_cpu,
        transactions_per_delivery: per(stats_after.transactions - stats_before.transactions),
        rows_per_delivery: per(stats_after.rows_written - stats_before.rows_written),
        before,
        after,
    })
}

/// Requests recorded by the config service, AI pipeline and Kubernetes stand-ins.
fn neighbour_calls(stack: &Devstack) -> usize {
    stack.config_service.calls().len() + stack.ai_pipeline.calls().len() + stack.kubernetes.calls().len()
}

/// Cumulative work of the bench database (pg_stat_database).
struct PgActivity {
    /// Committed transactions, read-only ones included (xact_commit).
    transactions: i64,
    rows_written: i64,
}

async fn pg_activity(db: &PgPool) -> Result<PgActivity> {
    let (transactions, rows_written): (i64, i64) = sqlx::query_as(
        "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(db)
    .await
    .context("reading pg_stat_database")?;
    Ok(PgActivity {
        transactions,
        rows_written,
    })
}

/// The mean of the ceilings measured before and after a load; None if neither could be.
fn mean_ceiling(before: &Option<Ceiling>, after: &Option<Ceiling>) -> Option<f64> {
    let measured: Vec<f64> = [before, after].into_iter().flatten().map(|c| c.tps).collect();
    (!measured.is_empty()).then(|| measured.iter().sum::<f64>() / measured.len() as f64)
}

struct Ceiling {
    tps: f64,
    latency_ms: f64,
    transactions: u64,
    command: String,
}

/// pgbench with the statement the service runs per delivery, into empty copies of the inbox tables,
/// `connections` clients for `duration`.
async fn pgbench_ceiling(
    db: &PgPool,
    pgbench: &str,
    connections: u64,
    duration: Duration,
    options: &Options,
) -> Result<Ceiling> {
    for statement in [
        "DROP TABLE IF EXISTS bench_events, bench_deliveries",
        "CREATE TABLE bench_deliveries (LIKE orchestrator_webhook_deliveries INCLUDING ALL)",
        "CREATE TABLE bench_events (LIKE orchestrator_webhook_events INCLUDING ALL)",
    ] {
        sqlx::query(statement)
            .execute(db)
            .await
            .with_context(|| format!("preparing the ceiling tables: {statement}"))?;
    }
    // LIKE copies columns, indexes and column storage but not the table's storage parameters
    // (fillfactor, toast_tuple_target), which decide how much an insert writes.
    for (copy, original) in [
        ("bench_deliveries", "orchestrator_webhook_deliveries"),
        ("bench_events", "orchestrator_webhook_events"),
    ] {
        let options: Option<String> =
            sqlx::query_scalar("SELECT array_to_string(reloptions, ', ') FROM pg_class WHERE oid = $1::regclass")
                .bind(original)
                .fetch_one(db)
                .await
                .with_context(|| format!("reading the storage parameters of {original}"))?;
        if let Some(options) = options.filter(|o| !o.is_empty()) {
            sqlx::query(&format!("ALTER TABLE {copy} SET ({options})"))
                .execute(db)
                .await
                .with_context(|| format!("copying the storage parameters of {original}"))?;
        }
    }
    // pgbench -M prepared turns every `:name` into a parameter, even inside a string literal: the
    // script has no colon followed by a letter or digit except `:n`. The body is a hex bytea literal
    // (nothing to escape).
    let body = hex::encode(pull_request_body(123_456));
    let script = format!(
        "\\set n random(1, 1000000000)\n\
         WITH delivery AS (INSERT INTO bench_deliveries (source, delivery_id, event_id) \
         VALUES ('github', gen_random_uuid()::text, gen_random_uuid()) ON CONFLICT DO NOTHING RETURNING delivery_id, event_id), \
         event AS (INSERT INTO bench_events (id, source, kind, delivery_id, headers, body, ordering_key) \
         SELECT event_id, 'github', 'pull_request', delivery_id, '{{\"x-github-delivery\": \"bench\", \"x-github-hook-id\": null}}'::jsonb, \
         '\\x{body}'::bytea, 'github' || ':' || 'acme/bench#' || (:n)::text FROM delivery RETURNING id) \
         SELECT id FROM event;\n"
    );
    let dir = Scratch(std::env::temp_dir().join(format!("orchestrator-bench-pgbench-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0)?;
    let script_path = dir.0.join("insert_event.sql");
    std::fs::write(&script_path, script)?;
    let secs = duration.as_secs().to_string();
    let clients = connections.to_string();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(2)
        .min(connections)
        .to_string();
    let args = [
        "-n", "-M", "prepared", "-c", &clients, "-j", &threads, "-T", &secs, "-f",
    ];
    let command = format!("pgbench {} <script>", args[..args.len() - 1].join(" "));
    println!("[bench] ceiling: {command}");
    let result = run_pgbench(pgbench, &args, &script_path, &options.database_url, duration).await;
    drop(dir);
    let _ = sqlx::query("DROP TABLE IF EXISTS bench_events, bench_deliveries")
        .execute(db)
        .await;
    let out = result?;
    let value_after = |prefix: &str| -> Option<f64> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    // pgbench 14+: "tps = N (without initial connection time)"; older: "(excluding connections establishing)".
    let tps = out
        .lines()
        .filter(|l| l.starts_with("tps = ") && !l.contains("including"))
        .find_map(|l| {
            l["tps = ".len()..]
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
        })
        .ok_or_else(|| anyhow!("no tps line in pgbench's output:\n{out}"))?;
    if value_after("number of failed transactions:").unwrap_or(0.0) > 0.0 {
        bail!("pgbench reports failed transactions:\n{out}");
    }
    Ok(Ceiling {
        tps,
        latency_ms: value_after("latency average =").unwrap_or(0.0),
        transactions: value_after("number of transactions actually processed:").unwrap_or(0.0) as u64,
        command,
    })
}

/// Runs pgbench (bounded: killed after `duration` + 60 s) and returns its standard output.
async fn run_pgbench(pgbench: &str, args: &[&str], script: &Path, url: &str, duration: Duration) -> Result<String> {
    let mut child = tokio::process::Command::new(pgbench)
        .args(args)
        .arg(script)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {pgbench} (set PGBENCH)"))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read = async move {
        let (mut out, mut err) = (String::new(), String::new());
        let read_out = async {
            if let Some(mut s) = stdout {
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        let read_err = async {
            if let Some(mut s) = stderr {
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut err).await?;
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::try_join!(read_out, read_err)?;
        let status = child.wait().await?;
        Ok::<_, std::io::Error>((status, out, err))
    };
    let limit = duration + Duration::from_secs(60);
    let (status, out, err) = tokio::time::timeout(limit, read)
        .await
        .map_err(|_| anyhow!("pgbench did not finish within {limit:?}"))??;
    if !status.success() {
        let lines: Vec<&str> = err.lines().collect();
        bail!(
            "pgbench failed ({status}):\n{out}\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    Ok(out)
}

// ------------------------------------------------------------------------------------------------
// Scenario: proxy

async fn proxy(options: &Options) -> Result<Report> {
    let runs = options.number("runs", 1000)?;
    let warmup = options.number("warmup", 50)?;
    let bench = Bench::start(options).await?;
    bench
        .stack
        .config_service
        .state()
        .set_team_config("acme", "bench-proxy", json!({}));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(Duration::from_secs(30))
        .build()?;
    let direct_url = format!("{}/agents/planner/run", bench.stack.agent.url());
    let proxy_url = bench.url("/api/v1/admin/agents/run");
    let direct_body = json!({
        "message": "hello", "context": {}, "timeout": 30, "max_turns": 5,
        "output_destinations": [], "trigger_source": "bench",
    });
    let proxy_body =
        json!({"org_id": "acme", "team_node_id": "bench-proxy", "agent_name": "planner", "message": "hello"});

    let direct = || async {
        let t = Instant::now();
        let response = client
            .post(&direct_url)
            .header("X-IncidentFox-Team-Token", "x")
            .header("X-Correlation-ID", uuid::Uuid::new_v4().to_string())
            .json(&direct_body)
            .send()
            .await
            .context("calling the agent stand-in")?;
        let status = response.status();
        let text = response.text().await?;
        let elapsed = t.elapsed();
        if status != reqwest::StatusCode::OK {
            bail!("the agent stand-in answered {status}: {}", snippet(&text));
        }
        Ok(elapsed)
    };
    let proxied = || async {
        let t = Instant::now();
        let response = client
            .post(&proxy_url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&proxy_body)
            .send()
            .await
            .context("calling the orchestrator")?;
        let status = response.status();
        let text = response.text().await?;
        let elapsed = t.elapsed();
        let success = serde_json::from_str::<Value>(&text)
            .map(|v| v["agent_result"]["success"] == true)
            .unwrap_or(false);
        if status != reqwest::StatusCode::OK || !success {
            bail!("POST /api/v1/admin/agents/run answered {status}: {}", snippet(&text));
        }
        Ok(elapsed)
    };

    let db = bench_db(options).await?;
    let stats_before = pg_activity(&db).await?;
    let config_calls_before = bench.stack.config_service.calls().len();
    let cpu_before = bench.cpu();
    let started = Instant::now();
    for _ in 0..warmup {
        direct().await?;
        proxied().await?;
    }
    // Interleaved, one direct call then one proxied call: anything else running on the machine
    // disturbs both series alike.
    let mut direct_samples = Vec::new();
    let mut proxy_samples = Vec::new();
    for _ in 0..runs {
        direct_samples.push(direct().await?);
        proxy_samples.push(proxied().await?);
    }
    let wall = started.elapsed();
    let cpu = bench.cpu().service_seconds_since(&cpu_before);
    let config_calls = bench.stack.config_service.calls().len() - config_calls_before;
    let agent_runs = bench.stack.agent.state().runs_completed();
    let peak = bench.peak_rss_kb();
    let (startup, idle) = (bench.startup, bench.idle_rss_kb);
    bench.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats_after = pg_activity(&db).await?;
    db.close().await;
    let proxied_runs = (runs + warmup) as f64;

    let direct = Latencies::new(direct_samples);
    let proxy = Latencies::new(proxy_samples);
    let added = proxy.percentile(50.0).as_secs_f64() - direct.percentile(50.0).as_secs_f64();
    let added_p90 = proxy.percentile(90.0).as_secs_f64() - direct.percentile(90.0).as_secs_f64();
    let mut report = Report::new(
        "proxy",
        &format!("`proxy`: {runs} sequential agent runs, direct and through the orchestrator"),
    );
    report.row("direct p50", ms(direct.percentile(50.0)), "");
    report.row("direct p90", ms(direct.percentile(90.0)), "");
    report.row("through the proxy p50", ms(proxy.percentile(50.0)), "");
    report.row("through the proxy p90", ms(proxy.percentile(90.0)), "");
    report.row("through the proxy max", ms(proxy.max()), "");
    report.row(
        "median added latency (p50 proxy − p50 direct)",
        format!("{:.2} ms", added * 1000.0),
        &aim(added <= 0.0005, "≤ 0.5 ms"),
    );
    report.row("added at p90", format!("{:.2} ms", added_p90 * 1000.0), "");
    report.row("peak RSS (VmHWM)", mb(peak), "");
    report.row("idle RSS after ready (VmRSS)", mb(idle), "");
    report.row("start-up to ready (fresh database, migrations)", ms(startup), "");
    report.row(
        "orchestrator CPU per proxied run",
        format!("{:.2} ms", cpu * 1000.0 / proxied_runs),
        "",
    );
    report.row(
        "work per proxied run",
        format!(
            "{:.1} config service calls, {:.1} Postgres transactions",
            config_calls as f64 / proxied_runs,
            (stats_after.transactions - stats_before.transactions) as f64 / proxied_runs
        ),
        "",
    );
    report.note(format!(
        "Direct: `POST {{agent}}/agents/planner/run` to the agent stand-in (no delay). Proxied: `POST \
         /api/v1/admin/agents/run` (`Authorization: Bearer {ADMIN_TOKEN}`, team `acme/bench-proxy`, agent \
         `planner`). One keep-alive client, sequential, interleaved (direct, proxied, direct, …) after {warmup} \
         warm-up calls of each; {:.1} s in all; the agent stand-in completed {agent_runs} runs.",
        wall.as_secs_f64()
    ));
    Ok(report)
}

// ------------------------------------------------------------------------------------------------
// Results

struct Report {
    scenario: &'static str,
    title: String,
    rows: Vec<(String, String, String)>,
    notes: Vec<String>,
    failure: Option<String>,
}

impl Report {
    fn new(scenario: &'static str, title: &str) -> Report {
        Report {
            scenario,
            title: title.to_owned(),
            rows: Vec::new(),
            notes: Vec::new(),
            failure: None,
        }
    }

    fn row(&mut self, figure: &str, value: String, aim: &str) {
        self.rows.push((figure.to_owned(), value, aim.to_owned()));
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    fn fail_if(&mut self, failed: bool, why: String) {
        if failed && self.failure.is_none() {
            self.failure = Some(why);
        }
    }

    fn render_text(&self, machine: &Machine, command: &str) -> String {
        let width = self.rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let mut out = format!(
            "\n== {}\n{}\ncommand: {command}\n\n",
            self.title.replace('`', ""),
            machine.line()
        );
        for (figure, value, aim) in &self.rows {
            let pad = width - figure.chars().count();
            let _ = writeln!(
                out,
                "  {figure}{} {value}{}",
                " ".repeat(pad),
                if aim.is_empty() {
                    String::new()
                } else {
                    format!("   (aim {aim})")
                }
            );
        }
        if let Some(why) = &self.failure {
            let _ = writeln!(out, "\n  FAILED: {why}");
        }
        out
    }

    fn render_markdown(&self, machine: &Machine, command: &str) -> String {
        let mut out = format!("## {}\n\n", self.title);
        let _ = writeln!(out, "- Date: {}", machine.date);
        let _ = writeln!(out, "- Machine: {}", machine.line());
        let _ = writeln!(out, "- Command: `{command}`");
        if let Some(why) = &self.failure {
            let _ = writeln!(out, "- **FAILED**: {why}");
        }
        out.push_str("\n| figure | value | aim |\n|---|---|---|\n");
        for (figure, value, aim) in &self.rows {
            let _ = writeln!(out, "| {figure} | {value} | {aim} |");
        }
        for note in &self.notes {
            let _ = write!(out, "\n{note}\n");
        }
        out
    }
}

struct Machine {
    date: String,
    cpus: usize,
    model: String,
    memory: String,
    postgres: String,
    revision: String,
}

impl Machine {
    async fn detect(database_url: &str) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, m)| m.trim().to_owned())
            .unwrap_or_else(|| "unknown CPU".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| format!("{:.1} GB RAM", kb / 1024.0 / 1024.0))
            .unwrap_or_default();
        let postgres = async {
            let db = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(Duration::from_secs(5))
                .connect(database_url)
                .await
                .ok()?;
            let row: (String, String, String) = sqlx::query_as(
                "SELECT current_setting('server_version'), current_setting('fsync'), current_setting('synchronous_commit')",
            )
            .fetch_one(&db)
            .await
            .ok()?;
            db.close().await;
            Some(format!("PostgreSQL {} (fsync {}, synchronous_commit {})", row.0, row.1, row.2))
        }
        .await
        .unwrap_or_else(|| "PostgreSQL (version unknown)".into());
        let git = |args: &[&str]| {
            Command::new("git")
                .args(args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        };
        // scripts/bench takes it before building; run by hand, the working tree now.
        let revision =
            std::env::var("BENCH_REVISION")
                .ok()
                .unwrap_or_else(|| match git(&["rev-parse", "--short", "HEAD"]) {
                    Some(rev) => {
                        let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                            .is_some_and(|s| !s.is_empty())
                            || git(&["ls-files", "--others", "--exclude-standard", "src", "migrations"])
                                .is_some_and(|s| !s.is_empty());
                        format!("{rev}{}", if dirty { " + uncommitted changes" } else { "" })
                    }
                    None => "unknown revision".into(),
                });
        Machine {
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            model,
            memory,
            postgres,
            revision,
        }
    }

    fn line(&self) -> String {
        format!(
            "{}, nproc {}, {}; {}; orchestrator {}",
            self.model, self.cpus, self.memory, self.postgres, self.revision
        )
    }
}

const INTRO: &str = "# Benchmarks

Measured with `scripts/bench` (see the intro of that script). To rerun everything:

```sh
scripts/bench all      # or: scripts/bench provision | deprovision | ingest | proxy
```

Each scenario gets a fresh database (`orchestrator_bench`), starts the devstack stand-ins in-process
with no added latency, and runs the release `orchestrator serve` as a child process, whose memory is
read from `/proc/<pid>/status` (peak = `VmHWM`, idle = `VmRSS` right after `/ready`). Each run
replaces its own section below.
";

fn section_markers(scenario: &str) -> (String, String) {
    (
        format!("<!-- bench:{scenario} -->"),
        format!("<!-- /bench:{scenario} -->"),
    )
}

fn write_section(path: &Path, report: &Report, machine: &Machine, command: &str) -> Result<()> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => INTRO.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (start, end) = section_markers(report.scenario);
    let section = format!("{start}\n{}{end}", report.render_markdown(machine, command));
    let updated = match (existing.find(&start), existing.find(&end)) {
        (Some(s), Some(e)) if e > s => format!("{}{section}{}", &existing[..s], &existing[e + end.len()..]),
        _ => format!("{}\n{section}\n", existing.trim_end()),
    };
    let tmp = path.with_extension("md.tmp");
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(updated.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
