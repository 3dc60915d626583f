//! Parsing and validating the compression half of a job spec (`preset` or `pipeline`,
//! `options`, `outputs`) into a [`Plan`] (the rest is `job::spec`'s). Every refusal names the field.

use super::method::{self, spec_err};
use super::{CompressError, DeployStyle, Plan, Selector, Step, DEFAULT_MIN_PARAMS};
use crate::model::Role;
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The artifacts a job can produce.
pub const OUTPUT_NAMES: &[&str] = &["model", "restored", "report", "archive"];

/// The preset that searches for the smallest model within a metric drop of 0.01 on the job's
/// dataset (see [`crate::search`]).
pub const AUTO_PRESET: &str = "auto";

/// The presets that expand to a fixed pipeline (every name a job takes but `auto`).
pub const PRESET_NAMES: &[&str] = &[
    "int8",
    "int8-tensor",
    "int4",
    "int4-g32",
    "int4-g128",
    "int4-g32-gptq",
    "int4-g128-gptq",
    "int8-static",
    "kmeans4",
    "ternary",
    "binary",
    "prune50",
    "prune50-int8",
    "fp16",
    "bf16",
    "lowrank-90",
    "separable",
    "deep-compression",
];

/// Deep Compression defaults: overall sparsity, and codebook bits for conv and other layers.
pub const DEEP_COMPRESSION_SPARSITY: f64 = 0.3;
pub const DEEP_COMPRESSION_CONV_BITS: u64 = 8;
pub const DEEP_COMPRESSION_FC_BITS: u64 = 5;

/// Built-in presets, as pipelines. `options` only apply to `deep-compression`.
pub fn preset(
    name: &str,
    options: &Map<String, Value>,
) -> Result<Option<Vec<Value>>, CompressError> {
    // Per output channel for weights; one scale per embedding table, whose per-row scales
    // would cost 4 bytes per row (1 % of an int8 table of width 384) for little accuracy
    // (paraphrase-MiniLM-L3: mean cosine 0.99976 per row, 0.99929 per table).
    let int8 = [
        json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "channel", "roles": ["weight"]}),
        json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "tensor", "roles": ["embedding"]}),
    ];
    if name != "deep-compression" {
        if let Some(k) = options.keys().next() {
            return Err(spec_err(
                &format!("options.{k}"),
                format!("preset {name:?} takes no options"),
            ));
        }
    }
    Ok(Some(match name {
        "int8" => int8.to_vec(),
        "int8-tensor" => vec![
            json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "tensor"}),
        ],
        "int4" => vec![
            json!({"method": "quantize", "bits": 4, "scheme": "symmetric", "granularity": "channel"}),
        ],
        "int4-g32" => vec![
            json!({"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 32}),
        ],
        "int4-g128" => vec![
            json!({"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 128}),
        ],
        // GPTQ where a MatMul, Gemm or Conv multiplies the weight; embedding tables (read by
        // Gather: each row alone, nothing to compensate) round to nearest.
        "int4-g32-gptq" => vec![
            json!({"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 32, "roles": ["weight"], "calibrated": true}),
            json!({"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 32, "roles": ["embedding"]}),
        ],
        "int4-g128-gptq" => vec![
            json!({"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 128, "roles": ["weight"], "calibrated": true}),
            json!({"method": "quantize", "bits": 4, "scheme": "affine", "granularity": "channel", "group_size": 128, "roles": ["embedding"]}),
        ],
        // Weights per channel with their consumers' activations quantized too (ranges at the
        // 99.999th percentile: on paraphrase-MiniLM-L3 mean cosine 0.9939, min-max 0.9929,
        // entropy 0.959), every weighted op however small, so that the whole network runs
        // on integer kernels; embedding tables (read by Gather, no arithmetic to make integer)
        // as in `int8`.
        "int8-static" => vec![
            json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "channel", "roles": ["weight"], "activations": "percentile", "min_params": 1}),
            json!({"method": "quantize", "bits": 8, "scheme": "symmetric", "granularity": "tensor", "roles": ["embedding"]}),
        ],
        "kmeans4" => vec![json!({"method": "kmeans", "bits": 4})],
        "ternary" => vec![json!({"method": "ternary", "granularity": "channel"})],
        "binary" => vec![json!({"method": "binary", "granularity": "channel"})],
        "prune50" => vec![json!({"method": "prune", "sparsity": 0.5, "scope": "tensor"})],
        "prune50-int8" => {
            let mut steps = vec![json!({"method": "prune", "sparsity": 0.5, "scope": "tensor"})];
            steps.extend(int8);
            steps
        }
        "fp16" => vec![json!({"method": "cast", "dtype": "float16"})],
        "bf16" => vec![json!({"method": "cast", "dtype": "bfloat16"})],
        "lowrank-90" => vec![json!({"method": "lowrank", "energy": 0.9})],
        "separable" => vec![json!({"method": "separable", "energy": 0.9})],
        "deep-compression" => {
            for key in options.keys() {
                if !["sparsity", "conv_bits", "fc_bits"].contains(&key.as_str()) {
                    return Err(spec_err(
                        &format!("options.{key}"),
                        "unknown option (sparsity, conv_bits, fc_bits)",
                    ));
                }
            }
            let sparsity = method::fraction(
                number(options, "sparsity", "options.sparsity")?,
                "options.sparsity",
                false,
            )?
            .unwrap_or(DEEP_COMPRESSION_SPARSITY);
            let conv = method::int_in(
                unsigned(options, "conv_bits", "options.conv_bits")?,
                "options.conv_bits",
                1,
                8,
            )?
            .unwrap_or(DEEP_COMPRESSION_CONV_BITS);
            let fc = method::int_in(
                unsigned(options, "fc_bits", "options.fc_bits")?,
                "options.fc_bits",
                1,
                8,
            )?
            .unwrap_or(DEEP_COMPRESSION_FC_BITS);
            vec![
                json!({"method": "prune", "scope": "sensitivity", "sparsity": sparsity, "min_keep": 0.02}),
                json!({"method": "kmeans", "bits": fc, "conv_bits": conv}),
                json!({"method": "huffman"}),
            ]
        }
        _ => return Ok(None),
    }))
}

/// Whether a preset has steps that learn from a calibration dataset (a job then needs a
/// `calibration` block).
pub fn preset_needs_calibration(name: &str) -> bool {
    preset(name, &Map::new())
        .ok()
        .flatten()
        .is_some_and(|steps| {
            steps.iter().enumerate().any(|(i, s)| {
                parse_step(i, s).is_ok_and(|s| s.method.needs() != super::method::Needs::default())
            })
        })
}

fn take_str<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<&'a str>, CompressError> {
    match obj.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(spec_err(field, "must be a string")),
    }
}

fn take_globs(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Vec<glob::Pattern>, CompressError> {
    let list = match obj.get(key) {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| spec_err(field, "must be a list of glob strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(spec_err(field, "must be a glob string or a list of them")),
    };
    list.iter()
        .map(|g| glob::Pattern::new(g).map_err(|e| spec_err(field, format!("bad glob {g:?}: {e}"))))
        .collect()
}

/// `roles`: a role name or a list of them (weight, bias, norm, embedding, other).
fn take_roles(obj: &Map<String, Value>, field: &str) -> Result<Vec<Role>, CompressError> {
    let names: Vec<&Value> = match obj.get("roles") {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) if !a.is_empty() => a.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        Some(_) => {
            return Err(spec_err(
                field,
                "must be a role or a non-empty list of roles",
            ))
        }
    };
    names
        .into_iter()
        .map(|v| {
            v.as_str().and_then(Role::parse).ok_or_else(|| {
                spec_err(
                    field,
                    "roles are \"weight\", \"bias\", \"norm\", \"embedding\" or \"other\"",
                )
            })
        })
        .collect()
}

/// A number option (the caller checks its range).
fn number(obj: &Map<String, Value>, key: &str, field: &str) -> Result<Option<f64>, CompressError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| spec_err(field, "must be a number")),
    }
}

/// A non-negative integer option (the caller checks its range).
fn unsigned(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<u64>, CompressError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| spec_err(field, "must be a non-negative integer")),
    }
}

/// Fields every step takes besides its method's parameters.
const COMMON: &[&str] = &["method", "include", "exclude", "min_params", "roles"];

fn parse_step(index: usize, v: &Value) -> Result<Step, CompressError> {
    let at = |k: &str| format!("pipeline[{index}].{k}");
    let obj = v
        .as_object()
        .ok_or_else(|| spec_err(&format!("pipeline[{index}]"), "must be an object"))?;
    let name = take_str(obj, "method", &at("method"))?
        .ok_or_else(|| spec_err(&at("method"), format!("is required ({})", method::names())))?;
    let registration = method::find(name).ok_or_else(|| {
        spec_err(
            &at("method"),
            format!("unknown method {name:?} ({})", method::names()),
        )
    })?;
    let min_params = match obj.get("min_params") {
        None => DEFAULT_MIN_PARAMS,
        Some(v) => v
            .as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| spec_err(&at("min_params"), "must be a non-negative integer"))?,
    };
    let select = Selector {
        include: take_globs(obj, "include", &at("include"))?,
        exclude: take_globs(obj, "exclude", &at("exclude"))?,
        min_params,
        roles: take_roles(obj, &at("roles"))?,
    };
    let parameters: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !COMMON.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let method = (registration.parse)(&parameters, &at)?;
    Ok(Step {
        method: Arc::from(method),
        select,
    })
}

/// The compression half of a job spec: the steps (`preset` with its `options`, or
/// `pipeline`), `outputs`, `latency` and `deploy`, and whether a `calibration` block goes
/// with the steps. `searching`: a search chooses the steps (there are none here). Keys that
/// are not the compression's are the caller's to check (`job::spec`).
pub fn parse_plan(spec: &Value, searching: bool) -> Result<Plan, CompressError> {
    let obj = spec
        .as_object()
        .ok_or_else(|| spec_err("spec", "must be a JSON object"))?;
    let empty = Map::new();
    let options = match obj.get("options") {
        None => &empty,
        Some(Value::Object(o)) => o,
        Some(_) => return Err(spec_err("options", "must be an object")),
    };
    let steps_json = match (obj.get("preset"), obj.get("pipeline")) {
        _ if searching => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(spec_err(
                "preset",
                "give either preset or pipeline, not both",
            ))
        }
        // A distilled student is stored in float unless a preset or pipeline follows.
        (None, None) if obj.contains_key("distill") => Vec::new(),
        (None, None) => return Err(spec_err("pipeline", "a preset or a pipeline is required")),
        (Some(p), None) => {
            let name = p
                .as_str()
                .ok_or_else(|| spec_err("preset", "must be a string"))?;
            preset(name, options)?.ok_or_else(|| {
                spec_err(
                    "preset",
                    format!(
                        "unknown preset {name:?} (known: {})",
                        PRESET_NAMES.join(", ")
                    ),
                )
            })?
        }
        (None, Some(Value::Array(steps))) => {
            if obj.contains_key("options") {
                return Err(spec_err(
                    "options",
                    "go with a preset; write them into the pipeline",
                ));
            }
            if steps.is_empty() {
                return Err(spec_err("pipeline", "must hold at least one step"));
            }
            if steps.len() > 64 {
                return Err(spec_err("pipeline", "at most 64 steps"));
            }
            steps.clone()
        }
        (None, Some(_)) => return Err(spec_err("pipeline", "must be a list of steps")),
    };
    let steps = steps_json
        .iter()
        .enumerate()
        .map(|(i, s)| parse_step(i, s))
        .collect::<Result<Vec<_>, _>>()?;
    let (outputs, outputs_explicit) = match obj.get("outputs") {
        None => (OUTPUT_NAMES.iter().map(|s| s.to_string()).collect(), false),
        Some(Value::Array(a)) => {
            let mut out = Vec::new();
            for (i, v) in a.iter().enumerate() {
                let name = v
                    .as_str()
                    .filter(|n| OUTPUT_NAMES.contains(n))
                    .ok_or_else(|| {
                        spec_err(
                            &format!("outputs[{i}]"),
                            format!("must be one of {}", OUTPUT_NAMES.join(", ")),
                        )
                    })?;
                if !out.iter().any(|o| o == name) {
                    out.push(name.to_string());
                }
            }
            if out.is_empty() {
                return Err(spec_err("outputs", "must name at least one artifact"));
            }
            (out, true)
        }
        Some(_) => return Err(spec_err("outputs", "must be a list")),
    };
    let latency = match obj.get("latency") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(spec_err("latency", "must be true or false")),
    };
    let deploy = match obj.get("deploy") {
        None => DeployStyle::Auto,
        Some(v) => match v.as_str() {
            Some("auto") => DeployStyle::Auto,
            Some("folded") => DeployStyle::Folded,
            Some("operators") => DeployStyle::Operators,
            _ => {
                return Err(spec_err(
                    "deploy",
                    "must be \"auto\", \"folded\" or \"operators\"",
                ))
            }
        },
    };
    // Calibrated steps learn from a dataset the spec names; a dataset no step learns from
    // is a mistake worth saying.
    let calibrating = steps
        .iter()
        .position(|s| s.method.needs() != super::method::Needs::default());
    match (calibrating, obj.contains_key("calibration")) {
        (Some(i), false) => {
            return Err(spec_err(
                &format!("pipeline[{i}]"),
                "a calibrated or static quantize step needs a `calibration` block (the dataset to calibrate on: {\"dataset_id\": …})",
            ))
        }
        (None, true) if !searching => {
            return Err(spec_err(
                "calibration",
                "no step uses it: give a quantize step \"calibrated\": true or \"activations\" (or constraints: a search then quantizes by GPTQ)",
            ))
        }
        _ => {}
    }
    Ok(Plan {
        steps,
        steps_json,
        outputs,
        outputs_explicit,
        latency,
        deploy,
        finetune: obj.contains_key("finetune"),
    })
}
