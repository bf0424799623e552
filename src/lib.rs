//! sprintlink: signed "object created" webhooks in, SprintHub custom-object links out, durably.
//!
//! Dependencies point one way (`tests/it/architecture.rs` fails on a cycle):
//! `main -> cli -> app -> {http, delivery, retention} -> {operations, mapping, signature, sprinthub} ->
//! {batch, store} -> {domain, config}`. The HTTP layer lives in `http`; `store` knows nothing of
//! routes or of the worker; `domain` (states, ids) and `config` import nothing of the crate.

#![forbid(unsafe_code)]

pub mod alerts;
pub mod app;
pub mod batch;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod http;
pub mod mapping;
pub mod operations;
pub mod retention;
pub mod signature;
pub mod sprinthub;
pub mod standin;
pub mod store;
pub mod telemetry;

pub use app::{Running, run, start};
pub use config::Config;
pub use http::build_app;
