//! Parsing and validating a job spec (`preset` or `pipeline`, `options`, `outputs`) into a
//! [`Plan`]. Every refusal names the field.

use super::cast::CastType;
use super::kmeans::Algorithm;
use super::lowrank::{RankRule, SvdAlgorithm};
use super::quantize::{Granularity, Scheme};
use super::structured::{Dim, Norm};
use super::{CompressError, DeployStyle, Op, Plan, PruneScope, Selector, Step, DEFAULT_MIN_PARAMS};
use crate::model::Role;
use serde_json::{json, Map, Value};

fn spec_err(field: &str, msg: impl std::fmt::Display) -> CompressError {
    CompressError::InvalidSpec(format!("{field}: {msg}"))
}

/// The artifacts a job can produce.
pub const OUTPUT_NAMES: &[&str] = &["model", "restored", "report", "archive"];

pub const PRESET_NAMES: &[&str] = &[
    "int8",
    "int8-tensor",
    "int4",
    "int4-g32",
    "int4-g128",
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
            let sparsity = fraction(options, "sparsity", "options.sparsity", false)?
                .unwrap_or(DEEP_COMPRESSION_SPARSITY);
            let conv = int_in(options, "conv_bits", "options.conv_bits", 1, 8)?
                .unwrap_or(DEEP_COMPRESSION_CONV_BITS);
            let fc = int_in(options, "fc_bits", "options.fc_bits", 1, 8)?
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
        .map(|v| match v.as_str() {
            Some("weight") => Ok(Role::Weight),
            Some("bias") => Ok(Role::Bias),
            Some("norm") => Ok(Role::Norm),
            Some("embedding") => Ok(Role::Embedding),
            Some("other") => Ok(Role::Other),
            _ => Err(spec_err(
                field,
                "roles are \"weight\", \"bias\", \"norm\", \"embedding\" or \"other\"",
            )),
        })
        .collect()
}

fn fraction(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
    closed: bool,
) -> Result<Option<f64>, CompressError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|s| {
                if closed {
                    (0.0..=1.0).contains(s)
                } else {
                    (0.0..1.0).contains(s)
                }
            })
            .map(Some)
            .ok_or_else(|| {
                spec_err(
                    field,
                    if closed {
                        "must be a number in [0, 1]"
                    } else {
                        "must be a number in [0, 1)"
                    },
                )
            }),
    }
}

fn int_in(
    obj: &Map<String, Value>,
    key: &str,
    field: &str,
    lo: u64,
    hi: u64,
) -> Result<Option<u64>, CompressError> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|b| (lo..=hi).contains(b))
            .map(Some)
            .ok_or_else(|| spec_err(field, format!("must be an integer from {lo} to {hi}"))),
    }
}

fn granularity(
    obj: &Map<String, Value>,
    field: &str,
    default: &str,
) -> Result<Granularity, CompressError> {
    match take_str(obj, "granularity", field)?.unwrap_or(default) {
        "tensor" => Ok(Granularity::Tensor),
        "channel" => Ok(Granularity::Channel),
        _ => Err(spec_err(field, "must be \"tensor\" or \"channel\"")),
    }
}

/// Exactly one of `rank`, `energy`, `ratio`.
fn rank_rule(
    obj: &Map<String, Value>,
    at: &dyn Fn(&str) -> String,
) -> Result<RankRule, CompressError> {
    let rank = int_in(obj, "rank", &at("rank"), 1, 1 << 20)?;
    let energy = fraction(obj, "energy", &at("energy"), true)?;
    let ratio = fraction(obj, "ratio", &at("ratio"), true)?;
    match (rank, energy, ratio) {
        (Some(r), None, None) => Ok(RankRule::Rank(r as usize)),
        (None, Some(e), None) if e > 0.0 => Ok(RankRule::Energy(e)),
        (None, None, Some(f)) if f > 0.0 => Ok(RankRule::Ratio(f)),
        (None, Some(_), None) => Err(spec_err(&at("energy"), "must be above 0")),
        (None, None, Some(_)) => Err(spec_err(&at("ratio"), "must be above 0")),
        _ => Err(spec_err(
            &at("rank"),
            "give exactly one of rank, energy or ratio",
        )),
    }
}

const METHODS: &str =
    "prune, quantize, kmeans, binary, ternary, cast, lowrank, separable, tucker2 or huffman";

fn parse_step(index: usize, v: &Value) -> Result<Step, CompressError> {
    let at = |k: &str| format!("pipeline[{index}].{k}");
    let obj = v
        .as_object()
        .ok_or_else(|| spec_err(&format!("pipeline[{index}]"), "must be an object"))?;
    let method = take_str(obj, "method", &at("method"))?
        .ok_or_else(|| spec_err(&at("method"), format!("is required ({METHODS})")))?;
    let allowed: &[&str] = match method {
        "prune" => &[
            "sparsity",
            "scope",
            "min_keep",
            "structure",
            "ratio",
            "norm",
            "pattern",
        ],
        "quantize" => &["bits", "scheme", "granularity", "group_size"],
        "kmeans" => &[
            "bits",
            "conv_bits",
            "granularity",
            "zero_cluster",
            "algorithm",
        ],
        "binary" => &["granularity"],
        "ternary" => &["granularity", "threshold"],
        "cast" => &["dtype"],
        "lowrank" => &["rank", "energy", "ratio", "algorithm"],
        "separable" | "tucker2" => &["rank", "energy", "ratio"],
        "huffman" => &[],
        other => {
            return Err(spec_err(
                &at("method"),
                format!("unknown method {other:?} ({METHODS})"),
            ))
        }
    };
    for key in obj.keys() {
        let common = ["method", "include", "exclude", "min_params", "roles"];
        if !common.contains(&key.as_str()) && !allowed.contains(&key.as_str()) {
            return Err(spec_err(
                &at(key),
                format!("unknown field for method {method:?}"),
            ));
        }
    }
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
    let op = match method {
        "prune" => parse_prune(obj, &at)?,
        "quantize" => {
            let bits = int_in(obj, "bits", &at("bits"), 2, 8)?.unwrap_or(8) as u8;
            let scheme = match take_str(obj, "scheme", &at("scheme"))?.unwrap_or("symmetric") {
                "symmetric" => Scheme::Symmetric,
                "affine" => Scheme::Affine,
                _ => {
                    return Err(spec_err(
                        &at("scheme"),
                        "must be \"symmetric\" or \"affine\"",
                    ))
                }
            };
            let granularity = granularity(obj, &at("granularity"), "channel")?;
            let group_size = int_in(obj, "group_size", &at("group_size"), 16, 256)?;
            if group_size.is_some() && granularity == Granularity::Tensor {
                return Err(spec_err(
                    &at("group_size"),
                    "groups split each output channel: it goes with granularity \"channel\"",
                ));
            }
            Op::Quantize {
                bits,
                scheme,
                granularity,
                group_size: group_size.map(|g| g as usize),
            }
        }
        "kmeans" => {
            let bits = int_in(obj, "bits", &at("bits"), 1, 8)?.unwrap_or(4) as u8;
            let conv_bits = int_in(obj, "conv_bits", &at("conv_bits"), 1, 8)?.map(|b| b as u8);
            let zero_cluster = match obj.get("zero_cluster") {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(spec_err(&at("zero_cluster"), "must be true or false")),
            };
            let algorithm = match take_str(obj, "algorithm", &at("algorithm"))?.unwrap_or("auto") {
                "auto" => Algorithm::Auto,
                "optimal" => Algorithm::Optimal,
                "lloyd" => Algorithm::Lloyd,
                _ => {
                    return Err(spec_err(
                        &at("algorithm"),
                        "must be \"auto\", \"optimal\" or \"lloyd\"",
                    ))
                }
            };
            Op::Kmeans {
                bits,
                conv_bits,
                granularity: granularity(obj, &at("granularity"), "tensor")?,
                zero_cluster,
                algorithm,
            }
        }
        "binary" => Op::Binary {
            granularity: granularity(obj, &at("granularity"), "channel")?,
        },
        "ternary" => {
            let threshold = match obj.get("threshold") {
                None => super::ternary::TWN_THRESHOLD,
                Some(v) => v
                    .as_f64()
                    .filter(|t| *t > 0.0 && *t < 10.0)
                    .ok_or_else(|| spec_err(&at("threshold"), "must be a number in (0, 10)"))?
                    as f32,
            };
            Op::Ternary {
                granularity: granularity(obj, &at("granularity"), "channel")?,
                threshold,
            }
        }
        "cast" => {
            let dtype = match take_str(obj, "dtype", &at("dtype"))? {
                Some("float16") => CastType::Float16,
                Some("bfloat16") => CastType::Bfloat16,
                _ => {
                    return Err(spec_err(
                        &at("dtype"),
                        "must be \"float16\" or \"bfloat16\"",
                    ))
                }
            };
            Op::Cast { dtype }
        }
        "lowrank" => {
            let algorithm = match take_str(obj, "algorithm", &at("algorithm"))?.unwrap_or("auto") {
                "auto" => SvdAlgorithm::Auto,
                "exact" => SvdAlgorithm::Exact,
                "randomized" => SvdAlgorithm::Randomized,
                _ => {
                    return Err(spec_err(
                        &at("algorithm"),
                        "must be \"auto\", \"exact\" or \"randomized\"",
                    ))
                }
            };
            Op::LowRank {
                rule: rank_rule(obj, &at)?,
                algorithm,
            }
        }
        "separable" => Op::Separable {
            rule: rank_rule(obj, &at)?,
        },
        "tucker2" => Op::Tucker2 {
            rule: rank_rule(obj, &at)?,
        },
        _ => Op::Huffman,
    };
    Ok(Step { op, select })
}

fn parse_prune(obj: &Map<String, Value>, at: &dyn Fn(&str) -> String) -> Result<Op, CompressError> {
    let has = |k: &str| obj.contains_key(k);
    if let Some(p) = take_str(obj, "pattern", &at("pattern"))? {
        for k in [
            "sparsity",
            "scope",
            "min_keep",
            "structure",
            "ratio",
            "norm",
        ] {
            if has(k) {
                return Err(spec_err(&at(k), "does not go with pattern"));
            }
        }
        let parsed = p
            .split_once(':')
            .and_then(|(n, m)| Some((n.parse::<usize>().ok()?, m.parse::<usize>().ok()?)))
            .filter(|&(n, m)| n >= 1 && n < m && m <= 64);
        let Some((n, m)) = parsed else {
            return Err(spec_err(
                &at("pattern"),
                "must be \"N:M\" with 1 ≤ N < M ≤ 64, e.g. \"2:4\"",
            ));
        };
        return Ok(Op::PruneNM { n, m });
    }
    if let Some(s) = take_str(obj, "structure", &at("structure"))? {
        for k in ["sparsity", "scope", "min_keep"] {
            if has(k) {
                return Err(spec_err(&at(k), "does not go with structure (use ratio)"));
            }
        }
        let dim = match s {
            "output" => Dim::Output,
            "input" => Dim::Input,
            _ => {
                return Err(spec_err(
                    &at("structure"),
                    "must be \"output\" or \"input\"",
                ))
            }
        };
        let ratio = fraction(obj, "ratio", &at("ratio"), false)?
            .ok_or_else(|| spec_err(&at("ratio"), "is required with structure"))?;
        let norm = match take_str(obj, "norm", &at("norm"))?.unwrap_or("l1") {
            "l1" => Norm::L1,
            "l2" => Norm::L2,
            _ => return Err(spec_err(&at("norm"), "must be \"l1\" or \"l2\"")),
        };
        return Ok(Op::PruneStructured {
            ratio: ratio as f32,
            dim,
            norm,
        });
    }
    for k in ["ratio", "norm"] {
        if has(k) {
            return Err(spec_err(&at(k), "goes with structure"));
        }
    }
    let sparsity = fraction(obj, "sparsity", &at("sparsity"), false)?
        .ok_or_else(|| spec_err(&at("sparsity"), "is required"))?;
    let scope = match take_str(obj, "scope", &at("scope"))?.unwrap_or("tensor") {
        "tensor" => PruneScope::Tensor,
        "global" => PruneScope::Global,
        "sensitivity" => PruneScope::Sensitivity,
        _ => {
            return Err(spec_err(
                &at("scope"),
                "must be \"tensor\", \"global\" or \"sensitivity\"",
            ))
        }
    };
    let min_keep = fraction(obj, "min_keep", &at("min_keep"), true)?;
    if scope == PruneScope::Tensor && min_keep.is_some() {
        return Err(spec_err(
            &at("min_keep"),
            "applies to global and sensitivity scopes",
        ));
    }
    Ok(Op::Prune {
        sparsity: sparsity as f32,
        scope,
        min_keep: min_keep.unwrap_or(0.01) as f32,
    })
}

/// Validates a job spec (`preset` or `pipeline`, optional `options` and `outputs`).
/// `model_id` is allowed and ignored here; any other key is refused by name.
pub fn parse_spec(spec: &Value) -> Result<Plan, CompressError> {
    let obj = spec
        .as_object()
        .ok_or_else(|| spec_err("spec", "must be a JSON object"))?;
    for key in obj.keys() {
        if ![
            "model_id", "preset", "pipeline", "outputs", "options", "latency", "deploy",
        ]
        .contains(&key.as_str())
        {
            return Err(spec_err(
                key,
                "unknown field (expected preset, options, pipeline, outputs, latency, deploy)",
            ));
        }
    }
    let empty = Map::new();
    let options = match obj.get("options") {
        None => &empty,
        Some(Value::Object(o)) => o,
        Some(_) => return Err(spec_err("options", "must be an object")),
    };
    let steps_json = match (obj.get("preset"), obj.get("pipeline")) {
        (Some(_), Some(_)) => {
            return Err(spec_err(
                "preset",
                "give either preset or pipeline, not both",
            ))
        }
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
    Ok(Plan {
        steps,
        steps_json,
        outputs,
        outputs_explicit,
        latency,
        deploy,
    })
}
