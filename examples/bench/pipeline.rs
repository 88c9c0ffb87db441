//! Scenarios `pipeline` and `fairness`: signed deliveries offered at a set rate through the whole
//! path (acknowledged, stored, claimed, routed, the agent called, the outcome written), measured
//! from outside: the backlog each second, and how long each event waited between being stored and
//! its agent call (`received_at` in the inbox, the call's arrival at the agent stand-in).

use std::collections::HashMap;
use std::time::SystemTime;

use super::*;

/// Who sends delivery `n`: every tenth delivery goes to one of the `quiet` teams in turn, the
/// rest to team 0 (with `quiet` = 0, every delivery is team 0's); without the flood, every
/// delivery goes to the quiet teams in turn.
#[derive(Clone, Copy)]
struct Senders {
    quiet: u64,
    flood: bool,
}

impl Senders {
    fn team_of(self, n: u64) -> u64 {
        if !self.flood {
            1 + n % self.quiet.max(1)
        } else if self.quiet > 0 && n % 10 == 9 {
            1 + (n / 10) % self.quiet
        } else {
            0
        }
    }

    /// The same quiet teams without the flood.
    fn alone(self) -> Senders {
        Senders { flood: false, ..self }
    }

    fn teams(self) -> u64 {
        1 + self.quiet
    }
}

/// The repository, and so the team (`bench-{i}` of org `acme`, routed by `github_repos`), of team `i`.
fn repository(team: u64) -> String {
    format!("bench-{team}")
}

async fn route_teams(bench: &Bench, teams: u64) {
    for team in 0..teams {
        let name = repository(team);
        bench.stack.config_service.state().set_team_config(
            "acme",
            &name,
            json!({"routing": {"github_repos": [format!("acme/{name}")]}}),
        );
    }
}

/// One second of an offered load: deliveries accepted and agent calls started so far.
struct Sample {
    at: f64,
    accepted: u64,
    dispatched: u64,
}

/// What offering a load measured.
struct Offered {
    /// Deliveries answered 200, per team.
    accepted: Vec<u64>,
    errors: Vec<String>,
    acks: Latencies,
    elapsed: Duration,
    samples: Vec<Sample>,
}

impl Offered {
    fn total(&self) -> u64 {
        self.accepted.iter().sum()
    }

    /// Agent runs started while the load was offered.
    fn dispatched(&self) -> u64 {
        self.samples.last().map_or(0, |s| s.dispatched)
    }

    /// The backlog (accepted, no agent call yet) at each sample.
    fn backlog(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.samples
            .iter()
            .map(|s| (s.at, s.accepted as f64 - s.dispatched as f64))
    }

    /// The backlog's growth in events a second from `from` seconds on (least squares).
    fn backlog_slope(&self, from: f64) -> f64 {
        let points: Vec<(f64, f64)> = self.backlog().filter(|(t, _)| *t >= from).collect();
        let n = points.len() as f64;
        if n < 2.0 {
            return 0.0;
        }
        let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
        let mean_b = points.iter().map(|p| p.1).sum::<f64>() / n;
        let covariance: f64 = points.iter().map(|(t, b)| (t - mean_t) * (b - mean_b)).sum();
        let variance: f64 = points.iter().map(|(t, _)| (t - mean_t).powi(2)).sum();
        if variance == 0.0 {
            0.0
        } else {
            covariance / variance
        }
    }

    fn backlog_max(&self, from: f64) -> f64 {
        self.backlog()
            .filter(|(t, _)| *t >= from)
            .map(|(_, b)| b)
            .fold(0.0, f64::max)
    }

    fn backlog_at_end(&self) -> f64 {
        self.backlog().last().map_or(0.0, |(_, b)| b)
    }

    /// Agent calls started a second between `from` seconds and the end of the load.
    fn dispatch_rate(&self, from: f64) -> f64 {
        let first = self.samples.iter().find(|s| s.at >= from);
        match (first, self.samples.last()) {
            (Some(a), Some(b)) if b.at > a.at => (b.dispatched - a.dispatched) as f64 / (b.at - a.at),
            _ => 0.0,
        }
    }
}

/// The first pull request number the next load uses.
static NEXT_PULL_REQUEST: AtomicU64 = AtomicU64::new(0);

/// Offers `rate` deliveries a second for `duration` from `connections` keep-alive connections:
/// delivery `i` is sent at `i / rate` seconds after the start (or as soon as a connection is free,
/// when the service falls behind), with a delivery id `{tag}-{i}`.
async fn offer(
    bench: &Bench,
    tag: &str,
    rate: f64,
    duration: Duration,
    connections: u64,
    senders: Senders,
) -> Result<Offered> {
    let (url, address) = bench.github_webhook()?;
    let teams = senders.teams() as usize;
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let slots = (rate * duration.as_secs_f64()) as u64;
    // Pull requests numbered past every earlier load's: a step that reused them would find each
    // conversation's finished event from the step before in the ordering index (a visit to its
    // row, where no vacuum has removed it), which no delivery of a real stream does.
    let first_pull_request = NEXT_PULL_REQUEST.fetch_add(slots, Ordering::Relaxed);
    let agent = bench.stack.agent.state();
    let dispatched_before = agent.runs_started() as u64;

    let sampler = {
        let (accepted, agent) = (accepted.clone(), agent.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let at = started.elapsed().as_secs_f64();
                samples.push(Sample {
                    at,
                    accepted: accepted.load(Ordering::Relaxed),
                    dispatched: agent.runs_started() as u64 - dispatched_before,
                });
                if at >= duration.as_secs_f64() {
                    return samples;
                }
            }
        })
    };

    let mut workers = Vec::new();
    for _ in 0..connections {
        let mut client = RawClient::connect(address, url.path()).await?;
        let (next, accepted, path, tag) = (next.clone(), accepted.clone(), url.path().to_owned(), tag.to_owned());
        workers.push(tokio::spawn(async move {
            let mut by_team = vec![0u64; teams];
            let mut latencies = Vec::new();
            let mut errors = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= slots {
                    break;
                }
                tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate)).await;
                let team = senders.team_of(i);
                // A distinct pull request per delivery: no two deliveries share an ordering key.
                let body = pull_request_body_in("acme", &repository(team), first_pull_request + i);
                match client.deliver(address, &path, &body, &format!("{tag}-{i}")).await {
                    Ok(elapsed) => {
                        latencies.push(elapsed);
                        by_team[team as usize] += 1;
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(failed) => {
                        errors.extend(failed.errors);
                        if failed.stop {
                            break;
                        }
                    }
                }
            }
            (by_team, latencies, errors)
        }));
    }
    let mut offered = Offered {
        accepted: vec![0; teams],
        errors: Vec::new(),
        acks: Latencies::new(Vec::new()),
        elapsed: Duration::ZERO,
        samples: Vec::new(),
    };
    let mut acks = Vec::new();
    for worker in workers {
        let (by_team, latencies, errors) = worker.await.context("a load client panicked")?;
        for (total, n) in offered.accepted.iter_mut().zip(by_team) {
            *total += n;
        }
        acks.extend(latencies);
        offered.errors.extend(errors);
    }
    offered.elapsed = started.elapsed();
    offered.acks = Latencies::new(acks);
    offered.samples = sampler.await.context("the sampler panicked")?;
    Ok(offered)
}

/// Waits until the agent stand-in has answered `expected` more runs than `before`; false on timeout.
async fn drained(bench: &Bench, before: usize, expected: u64, timeout: Duration) -> bool {
    let agent = bench.stack.agent.state();
    let deadline = Instant::now() + timeout;
    while ((agent.runs_completed() - before) as u64) < expected {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

/// How long each event with delivery id `{tag}-…` waited between being stored and its first agent
/// call, by team: from the inbox's `received_at` and the agent stand-in's record of each call
/// (the event id is its correlation id).
async fn waits_by_team(bench: &Bench, db: &PgPool, tag: &str, teams: u64) -> Result<Vec<Latencies>> {
    let mut first_call: HashMap<String, SystemTime> = HashMap::new();
    for call in bench.stack.agent.calls() {
        if let Some(id) = call.headers.get("x-correlation-id") {
            first_call
                .entry(id.clone())
                .and_modify(|at| *at = (*at).min(call.at))
                .or_insert(call.at);
        }
    }
    let events: Vec<(String, chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT id::text, received_at, convert_from(body, 'UTF8')::jsonb #>> '{repository,name}' \
         FROM orchestrator_webhook_events WHERE delivery_id LIKE $1",
    )
    .bind(format!("{tag}-%"))
    .fetch_all(db)
    .await
    .context("reading the events' arrival times")?;
    let mut waits: Vec<Vec<Duration>> = vec![Vec::new(); teams as usize];
    for (id, received, repo) in events {
        let Some(called) = first_call.get(&id) else { continue };
        let Some(team) = (0..teams).find(|t| repository(*t) == repo) else {
            continue;
        };
        let wait = chrono::DateTime::<chrono::Utc>::from(*called) - received;
        waits[team as usize].push(wait.to_std().unwrap_or_default());
    }
    Ok(waits.into_iter().map(Latencies::new).collect())
}

/// Whether a load's backlog stayed bounded after the first 10 s: it never held more than a
/// quarter of a second of load, or it grew by less than 1% of the offered rate a second and what
/// was left at the end is less than a second of load.
fn bounded(offered: &Offered, rate: f64) -> bool {
    offered.backlog_max(WARM_UP) < rate * 0.25
        || (offered.backlog_slope(WARM_UP) < rate * 0.01 && offered.backlog_at_end() < rate)
}

/// The first seconds of a load, while dispatch and the pools warm up, are left out of the rates.
const WARM_UP: f64 = 10.0;

/// One step of `pipeline`: a rate offered as a fraction of the pgbench ceiling measured just before.
struct Step {
    fraction: f64,
    ceiling_before: Option<Ceiling>,
    ceiling_after: Option<Ceiling>,
    rate: f64,
    offered: Offered,
    waits: Latencies,
    drained: bool,
    cpu: String,
    cpu_per_event: String,
}

impl Step {
    fn ceiling(&self) -> Option<f64> {
        mean_ceiling(&self.ceiling_before, &self.ceiling_after)
    }

    fn bounded(&self) -> bool {
        self.drained && self.offered.errors.is_empty() && bounded(&self.offered, self.rate)
    }

    /// The rate the whole path sustained after the warm-up, as a ratio to the ceiling.
    fn sustained_ratio(&self) -> Option<f64> {
        self.ceiling().map(|c| self.offered.dispatch_rate(WARM_UP) / c)
    }
}

pub(super) async fn pipeline(options: &Options) -> Result<Report> {
    let duration = Duration::from_secs(options.number("duration", 60)?);
    // The ceiling's pgbench clients, as `ingest` measures it.
    let connections = options.number("connections", 32)?;
    // The load's connections, more than the ceiling's: each waits for its acknowledgement before
    // sending again, so 32 of them offered at most 32 ÷ ack latency (about 4,300 a second at the
    // 7 ms of a loaded 2-core guest) whatever rate was asked, and steps of 60% and 70% were
    // reported as offered while they were not (4,125 and 4,287 a second accepted of 4,984 and
    // 6,304). Webhook senders are not limited to a few connections to one endpoint.
    let load_connections = options.number("senders", 64)?;
    let fractions = options.fractions("fractions", &[0.4, 0.5, 0.6, 0.7])?;
    // A fixed rate instead (one step): the same work for two revisions compared back to back,
    // whatever the ceiling of the minute.
    let fixed_rate = options.optional_number("rate")?;
    let fractions = if fixed_rate.is_some() {
        vec![fractions[0]]
    } else {
        fractions
    };
    let pgbench = std::env::var("PGBENCH").unwrap_or_else(|_| "pgbench".into());
    let db = bench_db(options).await?;
    let bench = Bench::start(options).await?;
    route_teams(&bench, 1).await;
    let senders = Senders { quiet: 0, flood: true };
    let ceiling = |when: &'static str| {
        let (db, pgbench) = (&db, &pgbench);
        async move {
            pgbench_ceiling(db, pgbench, connections, Duration::from_secs(10), options)
                .await
                .map_err(|e| eprintln!("[bench] error: the pgbench ceiling {when}: {e:#}"))
                .ok()
        }
    };

    let mut steps: Vec<Step> = Vec::new();
    for (i, fraction) in fractions.iter().copied().enumerate() {
        let ceiling_before = ceiling("before the load").await;
        let Some(tps) = ceiling_before.as_ref().map(|c| c.tps) else {
            bail!("the pgbench ceiling could not be measured");
        };
        let rate = fixed_rate.map_or(tps * fraction, |r| r as f64);
        let fraction = rate / tps;
        println!(
            "[bench] step {}: {rate:.0} deliveries/s ({fraction:.2} of {tps:.0} tps) for {duration:?}",
            i + 1
        );
        let tag = format!("pipeline-{i}");
        let runs_before = bench.stack.agent.state().runs_completed();
        let cpu_before = bench.cpu();
        let offered = offer(&bench, &tag, rate, duration, load_connections, senders).await?;
        let cpu_after = bench.cpu();
        let cpu = cpu_after.usage_since(&cpu_before);
        let cpu_per_event = cpu_after.per_event_since(&cpu_before, offered.dispatched() as f64);
        let drained = drained(&bench, runs_before, offered.total(), DRAIN_TIMEOUT).await;
        let waits = waits_by_team(&bench, &db, &tag, 1).await?.remove(0);
        let ceiling_after = ceiling("after the load").await;
        let step = Step {
            fraction,
            ceiling_before,
            ceiling_after,
            rate,
            offered,
            waits,
            drained,
            cpu,
            cpu_per_event,
        };
        println!(
            "[bench] step {}: accepted {:.0}/s, dispatched {:.0}/s after {WARM_UP} s, backlog slope {:.1}/s, \
             at the end {:.0}: {}",
            i + 1,
            step.offered.total() as f64 / step.offered.elapsed.as_secs_f64(),
            step.offered.dispatch_rate(WARM_UP),
            step.offered.backlog_slope(WARM_UP),
            step.offered.backlog_at_end(),
            if step.bounded() { "bounded" } else { "NOT bounded" }
        );
        let stop = !step.bounded();
        steps.push(step);
        if stop {
            break;
        }
    }
    bench.stop().await;
    db.close().await;

    let best = steps
        .iter()
        .filter(|s| s.bounded())
        .max_by(|a, b| a.fraction.total_cmp(&b.fraction));
    let mut report = Report::new(
        "pipeline",
        &format!(
            "`pipeline`: signed deliveries through the whole path at a fixed rate, {} s a step",
            duration.as_secs()
        ),
    );
    let ratio = best.and_then(Step::sustained_ratio);
    report.row(
        "highest rate sustained with a bounded backlog, ÷ pgbench ceiling",
        match best {
            Some(step) => format!(
                "{:.0}/s ÷ {:.0} = {} (offered {:.0}% of the ceiling)",
                step.offered.dispatch_rate(WARM_UP),
                step.ceiling().unwrap_or(0.0),
                percent(ratio),
                step.fraction * 100.0
            ),
            None => "none of the steps".into(),
        },
        &aim(ratio.is_some_and(|r| r >= 0.5), "≥ 50%"),
    );
    report.fail_if(best.is_none(), "no step kept its backlog bounded".into());
    for (i, step) in steps.iter().enumerate() {
        let o = &step.offered;
        report.row(
            &format!("step {}: offered {:.0}% of the ceiling", i + 1, step.fraction * 100.0),
            format!(
                "{:.0}/s offered, {:.0}/s accepted, {:.0}/s dispatched after the first {WARM_UP:.0} s; ceiling {}; \
                 backlog max {:.0} after {WARM_UP:.0} s, slope {:+.1}/s, at the end {:.0}: {}",
                step.rate,
                o.total() as f64 / o.elapsed.as_secs_f64(),
                o.dispatch_rate(WARM_UP),
                [&step.ceiling_before, &step.ceiling_after]
                    .iter()
                    .map(|c| c.as_ref().map_or("failed".into(), |c| format!("{:.0}", c.tps)))
                    .collect::<Vec<_>>()
                    .join(" before, ")
                    + " after",
                o.backlog_max(WARM_UP),
                o.backlog_slope(WARM_UP),
                o.backlog_at_end(),
                if step.bounded() { "bounded" } else { "growing" }
            ),
            "",
        );
        report.row(
            &format!("step {}: ack p50 / p99 / max", i + 1),
            o.acks.p50_p99_max(),
            "",
        );
        report.row(
            &format!("step {}: queued → dispatched p50 / p99 / max", i + 1),
            step.waits.p50_p99_max(),
            "",
        );
        report.row(&format!("step {}: CPU during the load", i + 1), step.cpu.clone(), "");
        report.row(
            &format!("step {}: CPU per event dispatched during the load", i + 1),
            step.cpu_per_event.clone(),
            "",
        );
        report.fail_if(
            !o.errors.is_empty(),
            format!("step {}: {} deliveries were not accepted", i + 1, o.errors.len()),
        );
        report.fail_if(
            !step.drained,
            format!("step {}: not every accepted delivery reached the agent", i + 1),
        );
        print_errors(&o.errors);
    }
    if let Some(step) = best {
        let b = step
            .offered
            .backlog()
            .map(|(_, b)| format!("{b:.0}"))
            .collect::<Vec<_>>();
        report.note(format!(
            "Backlog (accepted, not yet handed to the agent) each second of step {}: {}.",
            steps.iter().position(|s| std::ptr::eq(s, step)).unwrap_or(0) + 1,
            b.join(", ")
        ));
    }
    report.note(format!(
        "Each step measures the pgbench ceiling (`ingest`'s: the service's insert, {connections} connections, 10 s) \
         with the service idle, offers a fraction of it as signed GitHub `pull_request` deliveries (2 KB, one \
         repository routed to one team, a distinct pull request each) from {load_connections} keep-alive connections, \
         delivery i sent i/rate seconds after the start, then waits for every accepted delivery to reach the agent \
         stand-in (no delay) and measures the ceiling again. The sustained rate is the agent calls a second after \
         the first {WARM_UP:.0} s, compared with the mean of the two ceilings; bounded means that after the first \
         {WARM_UP:.0} s the backlog never held more than a quarter of a second's load, or grew by less than 1% of \
         the offered rate a second and less than a second's load was left at the end. Steps go up until one is not bounded. Queued → dispatched: from the event's \
         `received_at` to the agent stand-in receiving its call."
    ));
    Ok(report)
}

/// One load of `fairness`: what the quiet teams and the flooding team waited, and the rate of the
/// whole path.
struct FairnessRun {
    label: &'static str,
    offered: Offered,
    /// Waits of team 0 (the flood; empty without it) and of the quiet teams together.
    flood: Latencies,
    quiet: Latencies,
    drained: bool,
}

async fn fairness_run(
    bench: &Bench,
    db: &PgPool,
    label: &'static str,
    rate: f64,
    duration: Duration,
    senders: Senders,
) -> Result<FairnessRun> {
    println!("[bench] {label}: {rate:.0} deliveries/s for {duration:?}");
    let runs_before = bench.stack.agent.state().runs_completed();
    let offered = offer(bench, label, rate, duration, 32, senders).await?;
    let drained = drained(bench, runs_before, offered.total(), DRAIN_TIMEOUT).await;
    let mut waits = waits_by_team(bench, db, label, senders.teams()).await?.into_iter();
    let flood = waits.next().unwrap_or_else(|| Latencies::new(Vec::new()));
    let quiet = Latencies::new(waits.flat_map(|l| l.0).collect());
    println!(
        "[bench] {label}: dispatched {:.0}/s after {WARM_UP} s; quiet teams p50 {} p95 {}, flooding team p95 {}",
        offered.dispatch_rate(WARM_UP),
        ms(quiet.percentile(50.0)),
        ms(quiet.percentile(95.0)),
        ms(flood.percentile(95.0)),
    );
    Ok(FairnessRun {
        label,
        offered,
        flood,
        quiet,
        drained,
    })
}

pub(super) async fn fairness(options: &Options) -> Result<Report> {
    let duration = Duration::from_secs(options.number("duration", 30)?);
    let delay = Duration::from_millis(options.number("delay-ms", 100)?);
    let rate = options.number("rate", 400)? as f64;
    let workers = 32;
    let db = bench_db(options).await?;
    let flood = Senders { quiet: 9, flood: true };

    let mut runs = Vec::new();
    for fair in [true, false] {
        let setting = if fair { "true" } else { "false" };
        let bench = Bench::start_with(options, &[("ORCHESTRATOR_DISPATCH_FAIR_SHARES", setting)]).await?;
        route_teams(&bench, flood.teams()).await;
        bench.stack.agent.state().set_delay(delay);
        if fair {
            // The quiet teams' share of the load, alone.
            runs.push(fairness_run(&bench, &db, "quiet-alone", rate / 10.0, duration, flood.alone()).await?);
            runs.push(fairness_run(&bench, &db, "flood-fair", rate, duration, flood).await?);
        } else {
            runs.push(fairness_run(&bench, &db, "flood-oldest-first", rate, duration, flood).await?);
        }
        bench.stop().await;
    }
    db.close().await;
    let [alone, fair, unfair] = &runs[..] else {
        bail!("expected three loads");
    };

    let mut report = Report::new(
        "fairness",
        &format!(
            "`fairness`: one team sends 90% of {rate:.0} deliveries/s, nine others the rest, {} s; agent runs of {} ms, {workers} workers",
            duration.as_secs(),
            delay.as_millis()
        ),
    );
    let p95 = |l: &Latencies| l.percentile(95.0);
    let ratio = p95(&fair.quiet).as_secs_f64() / p95(&alone.quiet).as_secs_f64().max(1e-6);
    report.row(
        "quiet teams' p95 queued → dispatched: with the flood (fair) ÷ without it",
        format!("{} ÷ {} = {ratio:.2}", ms(p95(&fair.quiet)), ms(p95(&alone.quiet))),
        &aim(ratio <= 2.0, "≤ 2"),
    );
    let total = |r: &FairnessRun| r.offered.dispatch_rate(WARM_UP);
    let rate_ratio = total(fair) / total(unfair).max(1e-6);
    report.row(
        "total dispatch rate, fair ÷ oldest first",
        format!("{:.0}/s ÷ {:.0}/s = {:.2}", total(fair), total(unfair), rate_ratio),
        &aim((rate_ratio - 1.0).abs() <= 0.10 || rate_ratio > 1.0, "within 10%"),
    );
    for run in &runs {
        report.row(
            &format!("{}: quiet teams p50 / p95 / max", run.label),
            run.quiet.p50_p95_max(),
            "",
        );
        if !run.flood.0.is_empty() {
            report.row(
                &format!("{}: flooding team p50 / p95 / max", run.label),
                run.flood.p50_p95_max(),
                "",
            );
        }
        report.row(
            &format!(
                "{}: accepted, dispatched after {WARM_UP:.0} s, backlog at the end",
                run.label
            ),
            format!(
                "{:.0}/s, {:.0}/s, {:.0}; ack p99 {}",
                run.offered.total() as f64 / run.offered.elapsed.as_secs_f64(),
                total(run),
                run.offered.backlog_at_end(),
                ms(run.offered.acks.percentile(99.0))
            ),
            "",
        );
        report.fail_if(
            !run.offered.errors.is_empty(),
            format!(
                "{}: {} deliveries were not accepted",
                run.label,
                run.offered.errors.len()
            ),
        );
        report.fail_if(
            !run.drained,
            format!("{}: not every accepted delivery reached the agent", run.label),
        );
        print_errors(&run.offered.errors);
    }
    report.note(format!(
        "Ten teams, each routed by its own repository (`acme/bench-0` … `acme/bench-9`); every tenth delivery \
         goes to one of the nine quiet teams in turn, the rest to `bench-0`. The agent stand-in takes {} ms a run \
         and dispatch has {workers} workers, so the path moves about {:.0} events a second and a load of {rate:.0} \
         a second builds a backlog. Three loads of {} s, each followed by a drain: the quiet teams' share alone \
         ({:.0}/s) and then the whole load, on a service with fair shares (the default); the whole load again on a \
         service started with `ORCHESTRATOR_DISPATCH_FAIR_SHARES=false` (oldest first). Queued → dispatched: from \
         the event's `received_at` to the agent stand-in receiving its call; the total rate is the agent calls a \
         second after the first {WARM_UP:.0} s.",
        delay.as_millis(),
        workers as f64 / delay.as_secs_f64(),
        duration.as_secs(),
        rate / 10.0
    ));
    Ok(report)
}
