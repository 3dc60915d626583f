//! Per-tensor and total figures for `report.json`.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub role: String,
    /// The steps applied, in order, e.g. `["prune(0.5)", "quantize(int8,symmetric,channel)"]`.
    pub methods: Vec<String>,
    /// The channel axis used by per-channel quantization.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_axis: Option<usize>,
    pub parameters: u64,
    pub nonzero: u64,
    pub sparsity: f64,
    /// True on-disk bits per weight in `model.<ext>` (codes + scales + zero points).
    pub bits_per_weight: f64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub relative_l2_error: f64,
    /// Signal-to-quantization-noise ratio; null when the tensor is reproduced exactly.
    pub sqnr_db: Option<f64>,
    pub max_abs_error: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Totals {
    pub tensors: u64,
    pub tensors_compressed: u64,
    pub parameters: u64,
    pub nonzero_parameters: u64,
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub mean_bits_per_weight: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub format: String,
    pub steps: Vec<serde_json::Value>,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
    pub notes: Vec<String>,
}

/// Error figures of `after` against `before`.
pub struct ErrorStats {
    pub relative_l2_error: f64,
    pub sqnr_db: Option<f64>,
    pub max_abs_error: f64,
}

pub fn error_stats(before: &[f32], after: &[f32]) -> ErrorStats {
    let mut signal = 0f64;
    let mut noise = 0f64;
    let mut max_abs = 0f64;
    for (&a, &b) in before.iter().zip(after) {
        let (a, b) = (f64::from(a), f64::from(b));
        signal += a * a;
        noise += (a - b) * (a - b);
        max_abs = max_abs.max((a - b).abs());
    }
    ErrorStats {
        relative_l2_error: if signal > 0.0 {
            (noise / signal).sqrt()
        } else if noise > 0.0 {
            // Infinite, but JSON has no infinity.
            f64::MAX
        } else {
            0.0
        },
        sqnr_db: (noise > 0.0 && signal > 0.0).then(|| 10.0 * (signal / noise).log10()),
        max_abs_error: max_abs,
    }
}
