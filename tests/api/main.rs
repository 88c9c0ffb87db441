//! One integration-test binary (link once): every test starts the real application on a random
//! port against its own database and the in-process stand-ins.

mod agent_runs;
mod chaos;
mod destinations;
mod dropin;
mod foundation;
mod helpers;
mod lifecycle;
mod provisioning;
mod reconcile;
mod standins;
mod webhooks;
