//! modelpress: a service that compresses trained neural networks.
//!
//! A job flows: `api` (upload, submit) → `queue` (durable, leased) → `worker` → `job` (stages) →
//! `formats` (bytes ↔ [`formats::TensorSet`]) and `compress` (pure methods over
//! [`model::Tensor`]s) →
//! `store` (artifacts) → `api` (status, download).

pub mod api;
pub mod auth;
pub mod calibrate;
pub mod charts;
pub mod cli;
pub mod compress;
pub mod config;
pub mod deploy;
pub mod error;
pub mod eval;
pub mod events;
pub mod formats;
pub mod job;
pub mod manifest;
pub mod model;
pub mod queue;
pub mod search;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod train;
pub mod util;
pub mod views;
pub mod webhook;
pub mod worker;
