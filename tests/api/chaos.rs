//! Chaos: the database goes away and comes back under a stream of deliveries. The service's
//! connections go through a TCP proxy the test can take down (every connection closed, new ones
//! closed at once, as while Postgres restarts) and bring back up.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator::webhooks::signature::Source;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::helpers::*;
use crate::webhooks::{deliver, github_pr, wait_for_event_status};

/// A TCP proxy to Postgres that can be taken down (silent) and up.
struct PgProxy {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped when the proxy goes down (tunnels go silent) and up (silent ones close).
    generation: watch::Sender<u64>,
}

impl PgProxy {
    async fn start(target: SocketAddr) -> PgProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let proxy = PgProxy {
            addr,
            up: up.clone(),
            generation,
        };
        let generations = proxy.generation.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut closed = generations.subscribe();
                if !up.load(Ordering::SeqCst) {
                    // Down: the connection is accepted and never answered, as a hung or
                    // unreachable server (the harshest case: nothing fails fast).
                    tokio::spawn(async move {
                        let _ = closed.changed().await;
                        drop(client);
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        // Down: the tunnel stops forwarding; its sockets stay open and silent
                        // until the proxy is up again.
                        _ = closed.changed() => {
                            let _ = closed.changed().await;
                        }
                    }
                });
            }
        });
        proxy
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
        // Hung connections are closed now (the client sees its connections reset).
        self.generation.send_modify(|g| *g += 1);
    }

    /// `url` with its host and port replaced by the proxy's.
    fn url(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).unwrap();
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.addr.port())).unwrap();
        url.to_string()
    }
}

fn target_of(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).unwrap();
    let host = url.host_str().unwrap_or("127.0.0.1");
    let host = if host == "localhost" { "127.0.0.1" } else { host };
    format!("{host}:{}", url.port().unwrap_or(5432)).parse().unwrap()
}

#[tokio::test]
async fn while_the_database_restarts_deliveries_answer_503_quickly_and_nothing_acknowledged_is_lost() {
    let db = TestDb::create().await;
    let proxy = PgProxy::start(target_of(&db.url)).await;
    let through_proxy = proxy.url(&db.url);
    let app = TestApp::spawn_on(db, |env| {
        env.insert("DATABASE_URL".into(), through_proxy);
        env.insert("ORCHESTRATOR_GITHUB_RATE_LIMIT_PER_MINUTE".into(), "100000".into());
        env.insert("ORCHESTRATOR_GITHUB_RATE_LIMIT_BURST".into(), "100000".into());
        // Margin under the 2 s asserted below on a loaded test machine (the default is 1.5 s).
        env.insert("ORCHESTRATOR_WEBHOOK_STORE_TIMEOUT_MS".into(), "1000".into());
    })
    .await;
    app.stack
        .config_service
        .state()
        .set_team_config("acme", "sre", json!({"routing": {"github_repos": ["acme/api"]}}));

    let mut acknowledged = Vec::new();
    let mut n = 0u64;
    let send = |n: u64| {
        let app = &app;
        async move {
            let started = Instant::now();
            let response = deliver(
                app,
                Source::GitHub,
                &github_pr("acme/api", n, "restart"),
                &format!("d-{n}"),
                &[],
            )
            .await;
            (response.status().as_u16(), started.elapsed())
        }
    };
    for _ in 0..10 {
        let (status, _) = send(n).await;
        assert_eq!(status, 200);
        acknowledged.push(n);
        n += 1;
    }

    // The database goes away for 4 s: every delivery is answered 503 within 2 s.
    proxy.down();
    let away = Instant::now();
    let mut refused = 0;
    while away.elapsed() < Duration::from_secs(4) {
        let (status, took) = send(n).await;
        if status == 200 {
            acknowledged.push(n);
        } else {
            assert_eq!(status, 503);
            refused += 1;
        }
        assert!(
            took < Duration::from_secs(2),
            "a delivery was held {took:?} while the database was away"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused > 0, "the database was away but every delivery was acknowledged");

    // Back: the service recovers without a restart, and everything acknowledged is delivered.
    proxy.up();
    let back = eventually(20, "deliveries to be acknowledged again", || async {
        let (status, _) = send(n).await;
        (status == 200).then_some(n)
    })
    .await;
    acknowledged.push(back);
    // Waited for by content, not by count: a delivery answered 503 may still have been stored
    // (its insert landed after the store timeout), so the delivered count can include it.
    let agent_messages = || -> Vec<String> {
        app.stack
            .agent
            .calls_to("POST", "/agents/")
            .iter()
            .filter_map(|c| c.body["message"].as_str().map(str::to_string))
            .collect()
    };
    let expected = |n: &u64| format!("GitHub PR #{n} opened in acme/api by alice: restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    let lost = loop {
        let messages = agent_messages();
        let lost: Vec<u64> = acknowledged
            .iter()
            .copied()
            .filter(|n| !messages.contains(&expected(n)))
            .collect();
        if lost.is_empty() || Instant::now() > deadline {
            break lost;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(lost.is_empty(), "acknowledged deliveries {lost:?} were lost");
    let health = app.get("/health").await;
    let status = health.status();
    assert_eq!(status, 200, "{}", health.text().await.unwrap_or_default());
}

/// The agent, then the config service, down for a while under a stream of deliveries: nothing
/// is dead-lettered for an outage (only the event's age bounds its retries), and everything is
/// delivered once they are back. The retries here are 10 to 50 ms apart, so an outage of 3 s is
/// over a hundred attempts: far more than `ORCHESTRATOR_DISPATCH_MAX_ATTEMPTS` (8).
#[tokio::test]
async fn a_neighbour_down_for_a_while_loses_nothing_and_everything_is_delivered_after() {
    let app = TestApp::spawn().await;
    app.stack
        .config_service
        .state()
        .set_team_config("acme", "sre", json!({"routing": {"github_repos": ["acme/api"]}}));
    let mut n = 0u64;
    for down in [&app.stack.agent.faults(), &app.stack.config_service.faults()] {
        down.fail_next(u32::MAX, 503);
        for _ in 0..5 {
            let response = deliver(
                &app,
                Source::GitHub,
                &github_pr("acme/api", n, "outage"),
                &format!("o-{n}"),
                &[],
            )
            .await;
            assert_eq!(response.status(), 200);
            n += 1;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        down.reset();
    }
    wait_for_event_status(&app, "delivered", n as usize).await;
    let dead = app.admin_json("/api/v1/admin/webhooks/events?status=dead_letter").await;
    assert!(dead["items"].as_array().unwrap().is_empty(), "{dead:#}");
}

/// An agent run longer than several leases is not taken over by another replica: the lease is
/// renewed while it runs, and the agent is called once.
#[tokio::test]
async fn renewals_keep_a_long_agent_run_alive_across_replicas() {
    let short_lease = |env: &mut std::collections::HashMap<String, String>| {
        env.insert("ORCHESTRATOR_DISPATCH_LEASE_SECONDS".into(), "3".into());
    };
    let app = TestApp::spawn_with(short_lease).await;
    let other = app.another(short_lease).await;
    app.stack
        .config_service
        .state()
        .set_team_config("acme", "sre", json!({"routing": {"github_repos": ["acme/api"]}}));
    app.stack.agent.state().set_delay(Duration::from_secs(8));
    let response = deliver(&app, Source::GitHub, &github_pr("acme/api", 1, "long"), "long-1", &[]).await;
    assert_eq!(response.status(), 200);
    wait_for_event_status(&app, "delivered", 1).await;
    assert_eq!(
        app.stack.agent.calls_to("POST", "/agents/").len(),
        1,
        "the run was taken over"
    );
    other.stop().await;
}
