//! A job: its spec and the stages that run it.

pub mod spec;

pub use spec::{parse_spec, JobPlan};
