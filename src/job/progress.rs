//! How a job's progress is shared between its stages.

use crate::compress::Control;

/// The share of a searching job's progress the search takes; the chosen pipeline's run the
/// rest.
pub(super) const SEARCH_SHARE: f64 = 0.8;

/// Where a fine-tuning job's training ends in its progress (the compression of the trained
/// weights follows).
pub(super) const TRAINING_END: f64 = 0.85;

/// The share of a calibrating job's progress that calibration takes.
pub(super) const CALIBRATION_SHARE: f64 = 0.3;

/// Progress of an inner stage mapped onto `[lo, hi]` of the job.
pub(super) struct Span<'a> {
    inner: &'a dyn Control,
    lo: f64,
    hi: f64,
}

impl<'a> Span<'a> {
    pub(super) fn new(inner: &'a dyn Control, lo: f64, hi: f64) -> Self {
        Span { inner, lo, hi }
    }
}

impl Control for Span<'_> {
    fn progress(&self, fraction: f64, stage: &str) {
        self.inner
            .progress(self.lo + (self.hi - self.lo) * fraction, stage);
    }
    fn detail(&self, detail: serde_json::Value) {
        self.inner.detail(detail)
    }
    fn cancelled(&self) -> bool {
        self.inner.cancelled()
    }
    fn tensor_done(&self) {
        self.inner.tensor_done()
    }
}
