//! Evaluation: running a model on a dataset ([`run`]) and scoring a candidate's outputs
//! against the original's ([`metrics`]), with the same figures as the shared cases'
//! `evaluate.py`.

pub mod metrics;
pub mod run;
