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
    /// Why a step left this tensor alone (e.g. factors not smaller than the matrix).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
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
    /// True bytes of the tensor's sections in `model.mpz`.
    pub archive_bytes: u64,
    /// How the archive stores it: layout, Huffman, bits per weight before and after coding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coding: Option<super::coding::CodingStats>,
    pub relative_l2_error: f64,
    /// Signal-to-quantization-noise ratio; null when the tensor is reproduced exactly.
    pub sqnr_db: Option<f64>,
    pub max_abs_error: f64,
    /// Method-specific figures: structure kept, k-means inertia, ranks, parameters and
    /// multiply-adds before and after.
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub details: serde_json::Map<String, serde_json::Value>,
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
    /// Σ `archive_bytes`: the tensors' share of `model.mpz`.
    pub archive_tensor_bytes: u64,
}

/// Deep Compression's columns over all tensors (Han et al., Table 1): bytes and ratio after
/// pruning (sparse, relative indices, f32 values), after quantization (fixed-width codes,
/// codebooks and scales included) and after Huffman coding. Untouched tensors count at their
/// own size in every column; graph and headers are not tensor bytes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct StageTotals {
    pub bytes_original: u64,
    pub bytes_after_pruning: u64,
    pub bytes_after_quantization: u64,
    pub bytes_after_huffman: u64,
    pub ratio_after_pruning: f64,
    pub ratio_after_quantization: f64,
    pub ratio_after_huffman: f64,
}

impl StageTotals {
    pub fn add(&mut self, original: u64, s: &super::coding::StageBytes) {
        self.bytes_original += original;
        self.bytes_after_pruning += s.pruned;
        self.bytes_after_quantization += s.quantized;
        self.bytes_after_huffman += s.huffman;
    }
    pub fn finish(mut self) -> StageTotals {
        let r = |b: u64| {
            if b > 0 {
                self.bytes_original as f64 / b as f64
            } else {
                0.0
            }
        };
        self.ratio_after_pruning = r(self.bytes_after_pruning);
        self.ratio_after_quantization = r(self.bytes_after_quantization);
        self.ratio_after_huffman = r(self.bytes_after_huffman);
        self
    }
}

/// Something a user must know about a job that still succeeded; clients switch on `code`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Warning {
    /// Stable: `nothing_compressed` (no tensor was changed), `dense_fallback` (an encoded
    /// tensor stays dense in the deployable file), `slower_than_original` (model.onnx ran
    /// more than 1.5x and 1 ms slower than the original in tract).
    pub code: String,
    pub message: String,
}

impl Warning {
    pub fn new(code: &str, message: impl Into<String>) -> Warning {
        Warning {
            code: code.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The input's format name, filled in by the caller (the core never sees containers).
    pub format: String,
    pub steps: Vec<serde_json::Value>,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
    pub deep_compression: StageTotals,
    pub notes: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
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
