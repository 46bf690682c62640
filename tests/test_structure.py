"""The code's shape: dependencies point one way, and every refusal uses a documented ErrorCode."""

import ast
import re
from pathlib import Path

import pytest

from comneck.errors import ErrorCode

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "shared" / "comneck"

#: Every module of the core package, lowest first: a module may import only modules before it.
LAYERS = [
    "version", "errors", "rans_encoder", "checkpoints", "unet", "zero_shot", "presets", "yaml_config", "provenance", "photo", "latents", "edge_format", "bitstream", "image", "safe_decoding", "cut_tables", "fixed_point", "fixed_point_onnx", "codec", "neck", "clip_split",
    "weights_folder", "importers", "importers.reading", "importers.fitting", "importers.elic", "importers.compressai_zoo", "importers.sources", "importers.clip",
    "models", "edge_export",
    "backends.base", "backends.c_abstractor", "backends.registry", "backends.clip_zero_shot", "backends.engines.base",
    "backends.engines.hf", "backends.engines.vllm", "backends.engines", "backends.sp_tokenizer", "backends.hf_checkpoint", "backends.meta_checkpoint",
    "backends.v2l_fewshot", "backends.shikra", "backends.honeybee", "backends.llava", "backends.llama_adapter", "backends.v2l", "backends.vllm_export", "backends",
    "pipeline", "complexity", "convert",
    "train.config", "train.checkpointing", "train.interrupt", "train.data", "train.objectives", "train.student", "train.trainer",
    "train.cli", "eval.items", "eval.datasets", "eval.metrics", "eval.report", "eval.pipelines", "eval.config", "eval.harness",
    "eval.cli", "eval", "cli", "__main__", "launch", "",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, modules: set[str]) -> set[str]:
    """The core modules ``path`` imports (absolute ``comneck.x`` and relative imports)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + ([node.module] if node.module else [])
            elif node.module and node.module.split(".")[0] == "comneck":
                base = node.module.split(".")[1:]
            else:
                continue
            candidates = [".".join(base + [alias.name]) for alias in node.names] + [".".join(base)]
        elif isinstance(node, ast.Import):
            candidates = [".".join(alias.name.split(".")[1:]) for alias in node.names if alias.name.split(".")[0] == "comneck"]
        else:
            continue
        for candidate in candidates:
            while candidate not in modules and candidate:
                candidate = candidate.rpartition(".")[0]
            if candidate in modules and candidate != name:
                found.add(candidate)
                break
    return found


def test_every_module_is_placed_and_imports_only_modules_below_it():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    assert set(paths) == set(LAYERS), "add new modules to LAYERS (and only there)"
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"comneck.{name} imports comneck.{dep}"
        for name, path in paths.items()
        if name  # the package itself imports Pipeline lazily, for `comneck.Pipeline`
        for dep in imported(path, set(paths))
        if rank[dep] > rank[name]
    ]
    assert not upward


def test_every_error_code_has_a_status_a_meaning_and_a_line_in_the_api_docs():
    docs = (ROOT / "docs" / "api.md").read_text()
    for code in ErrorCode:
        assert 400 <= code.status < 600 and code.meaning, code
        assert re.search(rf"^\| `{code.value}` \| {code.status} \| .+ \|$", docs, re.M), f"docs/api.md lacks {code.value}"


def test_raise_sites_name_codes_by_the_enum():
    """No refusal spells its code as a string literal (the enum is the one list)."""
    errors = {"ComneckInputError", "BitstreamError", "ApiError", "GatewayError"}
    literal = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "cloud_server").rglob("*.py"), *(ROOT / "edge_client").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in errors:
                codes = [a for a in [*node.args, *(k.value for k in node.keywords)] if isinstance(a, ast.Constant) and a.value in set(ErrorCode)]
                literal += [f"{path.relative_to(ROOT)}:{node.lineno}" for _ in codes]
    assert not literal


@pytest.mark.parametrize("code", list(ErrorCode))
def test_codes_compare_as_their_wire_names(code):
    assert code == code.value and str(code) == code.value and ErrorCode(code.value) is code
