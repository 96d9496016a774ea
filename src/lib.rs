//! egressd: an egress-enforcing appliance — an HTTP/HTTPS forward proxy and a DNS firewall
//! deciding with one policy.
//!
//! Data flows one way: [`config`] → validated [`policy::Policy`] → (proxy | dns) → decision.
//! The [`policy`] module is pure: no sockets, no files, no clocks.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod dns;
/// Property checks shared by the cargo-fuzz targets (`fuzz/`) and `tests/fuzz_corpora.rs`.
#[doc(hidden)]
pub mod fuzzing;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod resolve;
pub mod state;
pub mod telemetry;
