//! sprintlink: signed "object created" webhooks in, SprintHub custom-object links out, durably.
//!
//! The HTTP layer (`ingest`, `admin`, `ui`, `openapi`, `app`) and the `delivery` worker use
//! `signature`, `mapping`, `store` and the `sprinthub` client; none of those knows about routes.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod batch;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod error;
pub mod ingest;
pub mod mapping;
pub mod openapi;
pub mod signature;
pub mod sprinthub;
pub mod standin;
pub mod store;
pub mod telemetry;
pub mod ui;

pub use app::{Running, build_app, run, start};
pub use config::Config;
