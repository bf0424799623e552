//! The one integration test binary: a module per capability, all sharing `common` (the
//! spawn-the-app helper, the test databases and the SprintHub stand-ins). One binary links the
//! crate once instead of once per file, which is most of a cold test build on two cores.
//!
//! Tests that need something this machine may lack are reported as ignored (skipped) instead of
//! passed when the operator says it is absent: `SPRINTLINK_SKIP_PG=1`, `SPRINTLINK_SKIP_BROWSER=1`,
//! or a build as a user other than root (the tmpfs test). `build.rs` turns those into `cfg`s.

#[macro_use]
mod common;

mod alerts;
mod architecture;
mod browser;
mod config_cli;
mod crash;
mod delivery_hardening;
mod fleet;
mod integration;
mod lead_resolution;
mod migrations;
mod objects;
mod retention;
mod robustness;
mod search;
mod senders_bodies;
mod senders_schemes;
mod traces;
