//! The orchestrator: control plane of a multi-tenant AI SRE platform.
//!
//! `main.rs` only parses the command line; everything else lives here so tests can start the
//! real application on a random port against their own database. The dependency direction:
//! `main` → [`startup`] (the composition root) → `http` and the workers → the capabilities
//! (`provisioning`, `webhooks`, `agent_runs`, `audit`) → [`domain`], `clients` and their stores.
//! Modules are public only where the integration tests and the benchmark reach in.
#![forbid(unsafe_code)]

pub(crate) mod agent_call;
pub(crate) mod agent_runs;
pub(crate) mod audit;
pub(crate) mod auth;
pub(crate) mod cache;
pub mod cli;
pub mod clients;
pub mod config;
pub mod db;
pub mod domain;
pub(crate) mod error;
pub(crate) mod health;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod pagination;
pub mod provisioning;
pub(crate) mod retry;
pub mod startup;
pub(crate) mod state;
pub mod telemetry;
pub mod webhooks;

pub use config::Config;
pub use startup::{Application, Overrides};
