//! The orchestrator: control plane of a multi-tenant AI SRE platform.
//!
//! `main.rs` only parses the command line; everything else lives here so tests can start the
//! real application on a random port against their own database.
#![forbid(unsafe_code)]

pub mod agent_runs;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod clients;
pub mod config;
pub mod db;
pub mod error;
pub mod health;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod pagination;
pub mod provisioning;
pub mod retry;
pub mod telemetry;
pub mod webhooks;

pub use app::{AppState, Application, Overrides};
pub use config::Config;
