#!/usr/bin/env python3
"""Keeps the house's layering true (../shared/STYLE.md, "The house").

Reads every `crate::…` path in src/ outside test code and fails (exit 1) on:
- a cycle between top-level modules;
- an import that points up the layer table below (a module may import its own layer and
  the layers before it);
- an import between the compute stack and the infrastructure (the compression never sees
  SQL, blobs or HTTP; the database, store and event code never see a model);
- a top-level module that the table does not place.

Usage: python3 .ci/layers.py [SRC]   (default: src)
"""
import os
import re
import sys

# Lowest first. A module imports only modules of its own layer or of the layers before it.
LAYERS = [
    ("leaves", ["util", "error", "model", "telemetry", "charts"]),
    ("infrastructure", ["queue", "store", "manifest"]),
    ("infrastructure views", ["views", "auth", "events", "webhook"]),
    ("formats", ["formats"]),
    ("methods", ["compress"]),
    ("deploy", ["deploy"]),
    ("running a model", ["eval", "calibrate"]),
    ("search and training", ["search", "train"]),
    ("jobs", ["job"]),
    ("process state", ["config", "state"]),
    ("workers", ["worker"]),
    ("http", ["api"]),
    ("startup", ["startup"]),
    ("entry points", ["cli"]),
]
# Neither side imports the other (the job layer, above both, joins them).
COMPUTE = {"formats", "compress", "deploy", "eval", "calibrate", "search", "train"}
INFRASTRUCTURE = {"queue", "store", "manifest", "views", "auth", "events", "webhook"}

RANK = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
LAYER_NAME = {m: name for name, mods in LAYERS for m in mods}


def top_level_modules(src):
    text = open(os.path.join(src, "lib.rs"), encoding="utf-8").read()
    return re.findall(r"^\s*pub\s+mod\s+([a-z_][a-z0-9_]*)\s*;", text, re.M)


def module_file(directory, name):
    for candidate in (os.path.join(directory, name + ".rs"), os.path.join(directory, name, "mod.rs")):
        if os.path.exists(candidate):
            return os.path.normpath(candidate)
    return None


def child_dir(path):
    """Where `mod x;` declared in `path` looks for x."""
    base = os.path.basename(path)
    if base in ("mod.rs", "lib.rs", "main.rs"):
        return os.path.dirname(path)
    return os.path.join(os.path.dirname(path), base[:-3])


def block_end(lines, start):
    """The index of the line that closes the item opened at `start` (by brace counting)."""
    depth = 0
    opened = False
    for i in range(start, len(lines)):
        code = re.sub(r"//.*", "", lines[i])
        code = re.sub(r'"(\\.|[^"\\])*"', '""', code)
        depth += code.count("{") - code.count("}")
        opened = opened or "{" in code
        if opened and depth <= 0:
            return i
        if not opened and code.rstrip().endswith(";"):
            return i
    return len(lines) - 1


def scan(src):
    """Yields (module, target, file, line) for each `crate::target` path outside test code."""
    test_files = set()
    files = []
    for root, _, names in os.walk(src):
        for n in sorted(names):
            if n.endswith(".rs"):
                files.append(os.path.normpath(os.path.join(root, n)))
    # First pass: files that are test-only modules (`#[cfg(test)] mod x;`).
    for path in files:
        lines = open(path, encoding="utf-8").read().split("\n")
        for i, line in enumerate(lines):
            if re.match(r"\s*#\[cfg\(test\)\]", line):
                nxt = next((l for l in lines[i + 1:] if l.strip() and not l.strip().startswith("#[")), "")
                m = re.match(r"\s*(pub(\([a-z]+\))?\s+)?mod\s+([a-z_][a-z0-9_]*)\s*;", nxt)
                if m:
                    f = module_file(child_dir(path), m.group(3))
                    if f:
                        test_files.add(f)
    changed = True
    while changed:  # everything below a test-only module is test code too
        changed = False
        for path in files:
            if path in test_files:
                continue
            parent_dirs = {child_dir(t) for t in test_files}
            if any(path.startswith(os.path.normpath(d) + os.sep) for d in parent_dirs):
                test_files.add(path)
                changed = True
    for path in files:
        if path in test_files:
            continue
        rel = os.path.relpath(path, src)
        module = rel.split(os.sep)[0].removesuffix(".rs")
        lines = open(path, encoding="utf-8").read().split("\n")
        i = 0
        while i < len(lines):
            line = lines[i]
            if re.match(r"\s*#\[cfg\(test\)\]", line):
                j = i + 1
                while j < len(lines) and (not lines[j].strip() or lines[j].strip().startswith("#[")):
                    j += 1
                i = block_end(lines, j) + 1
                continue
            code = line.split("//")[0]
            targets = re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code)
            for group in re.findall(r"\bcrate::\{([^}]*)", code):
                targets += re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", group)
            for t in targets:
                if t != module:
                    yield module, t, rel, i + 1
            i += 1


def cycles(edges, nodes):
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in index:
            strong(v)
    return out


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "src"
    modules = top_level_modules(src)
    problems = []
    for m in modules:
        if m not in RANK:
            problems.append(f"module `{m}` has no place in .ci/layers.py's LAYERS: add it where it belongs")
    edges, where = {}, {}
    for module, target, rel, line in scan(src):
        if target not in modules:
            continue
        edges.setdefault(module, set()).add(target)
        where.setdefault((module, target), []).append(f"{rel}:{line}")
    for (a, b), places in sorted(where.items()):
        if a not in RANK or b not in RANK:
            continue
        at = ", ".join(places[:3]) + (f" (+{len(places) - 3} more)" if len(places) > 3 else "")
        if RANK[b] > RANK[a]:
            problems.append(
                f"`{a}` ({LAYER_NAME[a]}) imports `{b}` ({LAYER_NAME[b]}), a layer above it: {at}"
            )
        elif (a in COMPUTE and b in INFRASTRUCTURE) or (a in INFRASTRUCTURE and b in COMPUTE):
            problems.append(f"`{a}` imports `{b}` across compute and infrastructure: {at}")
    for c in cycles(edges, modules):
        problems.append("import cycle between top-level modules: " + " <-> ".join(c))
    if problems:
        print("layers: FAILED")
        for p in problems:
            print("  - " + p)
        return 1
    n = sum(len(v) for v in edges.values())
    print(f"layers: ok ({len(modules)} top-level modules, {n} imports between them, no cycle, none upwards)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
