//! Raising a model's default-domain opset, when no op it uses changed meaning in between:
//! per-axis `QuantizeLinear`/`DequantizeLinear` exist from opset 13, and mnist-8 is opset 8
//! (onnxruntime's own quantizer writes an invalid per-channel model for it: the shared
//! cases' pitfall 1). Declaring a newer opset only relabels the graph, so it is allowed for
//! the ops below alone, each with the versions at which its inputs, attributes or semantics
//! changed incompatibly.

use tract_onnx::pb::{GraphProto, ModelProto};

/// Ops whose meaning stayed from opset 7 up to opset 21 (type additions and new optional
/// attributes with the old default do not count).
const STABLE: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Add",
    "And",
    "ArgMax",
    "ArgMin",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "AveragePool",
    "Cast",
    "Ceil",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvInteger",
    "ConvTranspose",
    "Cos",
    "Cosh",
    "CumSum",
    "DepthToSpace",
    "DequantizeLinear",
    "Div",
    "DynamicQuantizeLinear",
    "Einsum",
    "Elu",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "EyeLike",
    "Flatten",
    "Floor",
    "GRU",
    "Gather",
    "GatherElements",
    "GatherND",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "GreaterOrEqual",
    "HardSigmoid",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LRN",
    "LSTM",
    "LeakyRelu",
    "Less",
    "LessOrEqual",
    "Log",
    "MatMul",
    "MatMulInteger",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Neg",
    "NonZero",
    "Not",
    "OneHot",
    "Or",
    "PRelu",
    "Pow",
    "QLinearConv",
    "QLinearMatMul",
    "QuantizeLinear",
    "RNN",
    "Range",
    "Reciprocal",
    "Relu",
    "Reshape",
    "Round",
    "ScatterElements",
    "ScatterND",
    "Selu",
    "Shape",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Size",
    "Softplus",
    "Softsign",
    "SpaceToDepth",
    "Sqrt",
    "Sub",
    "Sum",
    "Tan",
    "Tanh",
    "Tile",
    "Transpose",
    "Trilu",
    "Where",
    "Xor",
];

/// Ops that changed, with the opsets that changed them.
const CHANGED: &[(&str, &[i64])] = &[
    ("Softmax", &[13]),
    ("LogSoftmax", &[13]),
    ("Hardmax", &[13]),
    ("Squeeze", &[13]),
    ("Unsqueeze", &[13]),
    ("ReduceSum", &[13]),
    ("ReduceMean", &[18]),
    ("ReduceMax", &[18]),
    ("ReduceMin", &[18]),
    ("ReduceProd", &[18]),
    ("ReduceL1", &[18]),
    ("ReduceL2", &[18]),
    ("ReduceLogSum", &[18]),
    ("ReduceLogSumExp", &[18]),
    ("ReduceSumSquare", &[18]),
    ("Split", &[13, 18]),
    ("Slice", &[10]),
    ("Pad", &[11]),
    ("Clip", &[11]),
    ("Resize", &[11, 13]),
    ("TopK", &[10, 11]),
    ("Dropout", &[12]),
    ("BatchNormalization", &[9, 14]),
    ("LayerNormalization", &[]),
];

fn default_domain(d: &str) -> bool {
    d.is_empty() || d == "ai.onnx"
}

fn check(g: &GraphProto, from: i64, to: i64) -> Result<(), String> {
    for n in &g.node {
        if default_domain(&n.domain) {
            let op = n.op_type.as_str();
            if !STABLE.contains(&op) {
                match CHANGED.iter().find(|(name, _)| *name == op) {
                    None => {
                        return Err(format!(
                            "its op {op} is not known to keep its meaning up to opset {to}"
                        ))
                    }
                    Some((_, at)) => {
                        if let Some(v) = at.iter().find(|&&v| v > from && v <= to) {
                            return Err(format!("its op {op} changed meaning at opset {v}"));
                        }
                    }
                }
            }
        }
        for a in &n.attribute {
            for sub in a.g.iter().chain(&a.graphs) {
                check(sub, from, to)?;
            }
        }
    }
    Ok(())
}

/// Whether `model` (default-domain opset `from`) may be declared at opset `to`, or why not.
pub fn can_raise(model: &ModelProto, from: i64, to: i64) -> Result<(), String> {
    if from >= to {
        return Ok(());
    }
    if from < 7 {
        return Err(format!("its opset {from} is older than 7"));
    }
    let g = model.graph.as_ref().ok_or("it has no graph")?;
    check(g, from, to)
}

/// Declares `model` at opset `to` (see [`can_raise`]), with the IR version that opset needs.
/// Before IR 4 every initializer was also listed as a graph input; from IR 4 such an input is
/// an overridable default, which these weights are not, so the listing goes.
pub fn raise(model: &mut ModelProto, to: i64) {
    let mut found = false;
    for o in &mut model.opset_import {
        if default_domain(&o.domain) {
            o.version = o.version.max(to);
            found = true;
        }
    }
    if !found {
        model.opset_import.push(tract_onnx::pb::OperatorSetIdProto {
            domain: String::new(),
            version: to,
        });
    }
    // IR 7 goes with opset 13, IR 8 with 14 to 18, IR 9 with 19 and 20, IR 10 with 21.
    let ir = match to {
        ..=12 => 6,
        13 => 7,
        14..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    };
    if model.ir_version < 4 {
        if let Some(g) = model.graph.as_mut() {
            let inits: std::collections::HashSet<String> =
                g.initializer.iter().map(|i| i.name.clone()).collect();
            g.input.retain(|i| !inits.contains(&i.name));
        }
    }
    model.ir_version = model.ir_version.max(ir);
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::NodeProto;

    fn model(ops: &[&str]) -> ModelProto {
        ModelProto {
            graph: Some(GraphProto {
                node: ops
                    .iter()
                    .map(|op| NodeProto {
                        op_type: op.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn raising_needs_ops_that_kept_their_meaning() {
        // mnist-8's ops.
        assert!(can_raise(
            &model(&["Conv", "Add", "Relu", "MaxPool", "Reshape", "MatMul"]),
            8,
            13
        )
        .is_ok());
        let e = can_raise(&model(&["Conv", "Softmax"]), 8, 13).unwrap_err();
        assert!(e.contains("Softmax changed meaning at opset 13"), "{e}");
        // Softmax at 13 already: raising to 17 is fine.
        assert!(can_raise(&model(&["Softmax", "LayerNormalization"]), 13, 17).is_ok());
        assert!(can_raise(&model(&["FancyOp"]), 9, 13)
            .unwrap_err()
            .contains("FancyOp"));
        let mut m = model(&["Conv"]);
        m.ir_version = 3;
        m.opset_import.push(tract_onnx::pb::OperatorSetIdProto {
            domain: String::new(),
            version: 8,
        });
        raise(&mut m, 13);
        assert_eq!((m.ir_version, m.opset_import[0].version), (7, 13));
    }
}
