"""Writes a model whose weights are Constant nodes, some inside both branches of an If (the
layout of stateful exports with one network per sample rate), plus one main-graph Constant.

usage: python3 if_constants_model.py OUT.onnx
y = If(cond, then: relu(x @ W1) @ W2, else: relu(x @ W3) @ W4) + (x @ W5)[:, :10]
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

rng = np.random.default_rng(7)


def const(name, shape):
    w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(w, name + "_value"))


def branch(tag, a, b):
    nodes = [
        const(a, (64, 96)),
        helper.make_node("MatMul", ["x", a], [f"{tag}_h"]),
        helper.make_node("Relu", [f"{tag}_h"], [f"{tag}_r"]),
        const(b, (96, 10)),
        helper.make_node("MatMul", [f"{tag}_r", b], [f"{tag}_out"]),
    ]
    out = helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, [None, 10])
    return helper.make_graph(nodes, f"{tag}_branch", [], [out])


x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])
cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 10])
nodes = [
    helper.make_node("If", ["cond"], ["branch_out"],
                     then_branch=branch("then", "W1", "W2"), else_branch=branch("else", "W3", "W4")),
    const("W5", (64, 32)),
    helper.make_node("MatMul", ["x", "W5"], ["skip"]),
    helper.make_node("Slice", ["skip", "starts", "ends", "axes"], ["skip10"]),
    helper.make_node("Add", ["branch_out", "skip10"], ["y"]),
]
inits = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
         [("starts", [0]), ("ends", [10]), ("axes", [1])]]
graph = helper.make_graph(nodes, "if_constants", [cond, x], [y], initializer=inits)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
