//! All integration tests in one binary (convention 4).

mod archive;
mod auth;
mod calibrate;
mod cli;
mod client;
mod contract;
mod corrupt;
mod crash;
mod dashboard;
mod deploy;
mod distill;
mod eval;
mod events;
mod fleet;
mod formats;
mod fuzz;
mod helpers;
mod jobs;
mod models;
mod openapi;
mod outside;
mod processes;
mod readme;
mod snapshots;
mod train;
mod webhooks;
