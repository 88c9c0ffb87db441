//! Dispatch runs on threads of its own, below request handling in CPU priority.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// Runs `work` on threads of its own whose CPU priority is `nice` below request handling.
/// Acknowledging a delivery is the time-critical path (Slack retries after 3 s, GitHub after 10,
/// and a source that keeps timing out disables the hook); dispatch works from a durable inbox and
/// can lag. When both want the CPU, the kernel gives it to acknowledgements, and dispatch takes the
/// rest. Measured with `scripts/bench ingest` on 2 cores, where a dispatch at full speed halved the
/// rate at which deliveries were accepted.
///
/// Everything `work` starts lives on these threads and ends with this future: on shutdown, and
/// when the service's own runtime is dropped (a crash in tests), so a dead service never dispatches.
pub async fn run_at_lower_priority<F>(nice: u32, work: impl FnOnce(CancellationToken) -> F, stop: CancellationToken)
where
    F: Future<Output = ()> + Send + 'static,
{
    let nice = nice as i32;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("dispatch")
        .on_thread_start(move || lower_this_thread(nice))
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the dispatch threads; dispatching on the request threads");
            return work(stop).await;
        }
    };
    let handle = runtime.spawn(work(stop));
    let _stops_with_this_future = DispatchRuntime(Some(runtime));
    if let Err(e) = handle.await {
        tracing::error!(error = %e, "the dispatch loop failed");
    }
}

/// Stops the dispatch threads when dropped, without waiting for them (allowed in async code).
struct DispatchRuntime(Option<tokio::runtime::Runtime>);

impl Drop for DispatchRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Linux gives every thread its own nice value: this lowers only the calling thread's priority.
fn lower_this_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    if let Err(e) = rustix::process::nice(nice) {
        tracing::warn!(error = %e, "cannot lower the priority of a dispatch thread");
    }
}
