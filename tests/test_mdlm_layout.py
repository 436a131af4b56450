"""The layering of ``mdlm_ctc.mdlm``: dependency arrows run one way, from the study down to the objective API.

Every import between the package's modules (at the top of a file or inside a function) is read from the
source: a module may import its own layer or a lower one, never a higher one, and the import graph has no
cycle. Bottom: the objective API and the model plumbing; above it the loop and the trainer integrations
(which do not import one another); on top the comparison study (report <- compare <- ablation).
"""

import ast
import functools
import os

import mdlm_ctc.mdlm as package

LAYERS = [
    ("objective API and model plumbing", {"config", "data", "prompts", "tokenizer", "remote_code", "model",
                                          "lora", "plan", "checkpoint", "base", "distributed", "objectives",
                                          "sampler", "evaluate"}),
    ("the loop and the trainer integrations", {"train", "hf_trainer", "nemo"}),
    ("the comparison study", {"report", "compare", "ablation", "build_base"}),
]
SIBLINGS_APART = {"train", "hf_trainer", "nemo"}  # the loop and each integration stand beside one another


@functools.lru_cache(maxsize=1)
def _imports() -> dict[str, set[str]]:
    folder = os.path.dirname(package.__file__)
    names = {f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for name in names:
        with open(os.path.join(folder, f"{name}.py"), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                found.update(t.split(".")[0] for t in targets if t.split(".")[0] in names)
        graph[name] = found - {name}
    return graph


def test_every_module_has_a_layer():
    placed = set().union(*(members for _, members in LAYERS))
    assert set(_imports()) == placed, "a module of mdlm_ctc/mdlm was added or removed: place it in LAYERS"


def test_imports_never_point_up():
    rank = {m: i for i, (_, members) in enumerate(LAYERS) for m in members}
    wrong = [f"{a} ({LAYERS[rank[a]][0]}) imports {b} ({LAYERS[rank[b]][0]})"
             for a, targets in _imports().items() for b in targets if rank[b] > rank[a]]
    wrong += [f"{a} imports {b}" for a, targets in _imports().items() for b in targets
              if a in SIBLINGS_APART and b in SIBLINGS_APART]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = _imports()
    cycles = []

    def visit(node, path):
        for nxt in graph[node]:
            if nxt in path:
                cycle = path[path.index(nxt):]
                cycles.append(" -> ".join(cycle + [nxt]))
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, sorted(set(cycles))
