"""Weight quantization: per-layer plans, recipes, memory budgets, GPTQ, reports.

A *plan* maps every quantizable layer (each ``nn.Linear`` and the embedding)
to a ``LayerSpec`` of bits and group size, or to None to keep it in float.
Plans come from a recipe (``quantize/recipes/*.yaml``: a default plus
first-match rules on module paths), or from a memory budget: each layer's
sensitivity is measured on calibration text and extra bits go where they
reduce the error most per byte.

Weights are quantized group-wise with MLX's affine scheme, by plain rounding
(RTN) or by GPTQ (``gptq.py``), which uses the same calibration statistics.
Either way the result is ordinary ``QuantizedLinear``/``QuantizedEmbedding``
layers, and the config's ``quantization`` entry records per-layer overrides
in the form mlx-lm and MLX Swift read.
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten, tree_unflatten

from .gptq import HessianAccumulator, gptq_quantize

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
METHODS = ("gptq", "rtn")

Progress = Callable[[str, int, int], None]


def data_dir() -> Path:
    """The ``quantize/`` folder: beside the package in a checkout, or under
    ``<prefix>/share/mlxbastion`` when installed from a wheel."""
    for candidate in (
        Path(__file__).resolve().parents[1] / "quantize",
        Path(sys.prefix) / "share" / "mlxbastion" / "quantize",
    ):
        if (candidate / "recipes").is_dir():
            return candidate
    raise FileNotFoundError("the quantize/ data folder (recipes, devices) is missing")


@dataclass(frozen=True)
class LayerSpec:
    bits: int
    group_size: int

    def as_config(self) -> dict[str, int]:
        return {"group_size": self.group_size, "bits": self.bits}


Plan = dict[str, "LayerSpec | None"]


def check_bits(bits: int, group_size: int) -> None:
    """Raises ValueError naming the supported values."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(
            f"unsupported bit width {bits}; use one of "
            f"{', '.join(map(str, SUPPORTED_BITS))}"
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"unsupported group size {group_size}; use one of "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )


# ---------------------------------------------------------------------------
# Layers and sizes


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every float ``Linear`` and ``Embedding``, by module path."""
    return {
        path: module
        for path, module in model.named_modules()
        if type(module) in (nn.Linear, nn.Embedding)
    }


def layer_bytes(module: nn.Module, spec: LayerSpec | None, float_bytes: int) -> int:
    """Bytes of a layer's weights (plus bias) as planned."""
    out_dims, in_dims = module.weight.shape
    bias = out_dims * float_bytes if "bias" in module else 0
    if spec is None:
        return out_dims * in_dims * float_bytes + bias
    codes = out_dims * in_dims * spec.bits // 8
    scales_biases = 2 * out_dims * (in_dims // spec.group_size) * float_bytes
    return codes + scales_biases + bias


def fits(module: nn.Module, spec: LayerSpec) -> bool:
    """MLX quantizes groups along the input dimension, which must divide."""
    return module.weight.shape[1] % spec.group_size == 0


def planned_bytes(model: nn.Module, plan: Plan, float_bytes: int) -> int:
    """Size of all weights under ``plan`` (other parameters stay float)."""
    layers = quantizable_layers(model)
    total = sum(layer_bytes(layers[p], spec, float_bytes) for p, spec in plan.items())
    covered = {f"{p}.{name}" for p in plan for name in ("weight", "bias")}
    rest = sum(v.size for k, v in tree_flatten(model.parameters()) if k not in covered)
    return total + rest * float_bytes


def format_bytes(n: int) -> str:
    """A size in the largest decimal unit (as --budget reads them) that keeps
    it at or above 1, so that two small sizes never both print as 0.000 GB."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f} {unit}"
    return f"{n} bytes"


def kv_cache_bytes(
    args, context_length: int, *, kv_bits: int | None = None, float_bytes: int = 2
) -> int:
    """Bytes of a KV cache holding ``context_length`` tokens for one sequence."""
    per_token = 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim
    if kv_bits is None:
        return context_length * per_token * float_bytes
    # Group of 64 along head_dim: codes plus a scale and a bias per group.
    groups = per_token / 64
    return int(context_length * (per_token * kv_bits / 8 + 2 * groups * float_bytes))


# ---------------------------------------------------------------------------
# Recipes


@dataclass
class Recipe:
    name: str
    bits: int
    group_size: int
    description: str = ""
    rules: list[dict[str, Any]] = field(default_factory=list)


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (data_dir() / "recipes").glob("*.yaml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (``quantize/recipes/NAME.yaml``) or from a YAML file.

    Raises:
        ValueError: unknown name, or a malformed recipe.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = data_dir() / "recipes" / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(
                f"unknown recipe {name_or_path!r}; use a YAML file or one of "
                f"{', '.join(available_recipes())}"
            )
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping of bits, group_size and rules")
        _check_keys(raw, _RECIPE_KEYS, "the recipe")
        if not isinstance(raw.get("rules") or [], list):
            raise ValueError("'rules' must be a list")
        recipe = Recipe(
            name=path.stem,
            bits=int(raw.get("bits", 4)),
            group_size=int(raw.get("group_size", 64)),
            description=str(raw.get("description", "")),
            rules=list(raw.get("rules") or []),
        )
    except (yaml.YAMLError, TypeError, ValueError) as e:
        # YAML errors span several lines; the CLI shows only the first.
        message = " ".join(str(e).split())
        raise ValueError(f"recipe {path} is malformed ({message})") from None
    check_bits(recipe.bits, recipe.group_size)
    for rule in recipe.rules:
        _check_rule(rule, path)
        check_bits(
            rule.get("bits", recipe.bits), rule.get("group_size", recipe.group_size)
        )
    return recipe


_RECIPE_KEYS = ("description", "bits", "group_size", "rules")
_RULE_KEYS = ("match", "bits", "group_size", "layers")
_LAYERS_KEYS = ("first", "last", "every")


def _check_keys(mapping: dict, known: tuple[str, ...], what: str) -> None:
    # A misspelt key would otherwise be ignored and the rule silently do nothing.
    unknown = sorted(str(k) for k in mapping if k not in known)
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in {what}; use {', '.join(known)}"
        )


def _check_rule(rule: Any, path: Path) -> None:
    """Raises ValueError unless ``rule`` is a well-formed recipe rule."""
    if not isinstance(rule, dict) or not isinstance(rule.get("match"), str):
        raise ValueError(f"recipe {path}: every rule needs a 'match' pattern")
    try:
        _check_keys(rule, _RULE_KEYS, f"the rule for {rule['match']!r}")
        if rule.get("layers") is not None:
            _check_layers(rule["layers"])
    except ValueError as e:
        raise ValueError(f"recipe {path} is malformed ({e})") from None


def _check_layers(layers: Any) -> None:
    if not isinstance(layers, dict):
        raise ValueError("'layers' must be a mapping of first, last and every")
    _check_keys(layers, _LAYERS_KEYS, "'layers'")
    for key in ("first", "last"):
        value = layers.get(key, 0)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not 0 <= value <= 1:
            raise ValueError(f"'layers.{key}' must be within 0..1, not {value!r}")
    every = layers.get("every")
    if every is not None and (type(every) is not int or every < 1):
        raise ValueError(f"'layers.every' must be a positive integer, not {every!r}")


def _layer_index(path: str) -> int | None:
    match = re.search(r"\.layers\.(\d+)\.", path)
    return int(match.group(1)) if match else None


def _selected(path: str, layers: dict | None, n_layers: int) -> bool:
    """Whether a rule's ``layers: {first, last, every}`` selection covers path."""
    if not layers:
        return True
    index = _layer_index(path)
    if index is None:
        return False
    first = math.ceil(n_layers * layers.get("first", 0))
    last = math.ceil(n_layers * layers.get("last", 0))
    every = layers.get("every")
    return (
        index < first or index >= n_layers - last or bool(every and index % every == 0)
    )


def plan_from_recipe(
    model: nn.Module,
    recipe: Recipe,
    *,
    bits: int | None = None,
    group_size: int | None = None,
) -> Plan:
    """Apply a recipe; ``bits``/``group_size`` replace its defaults when given.
    A layer whose input size does not divide by its group size stays float."""
    default = LayerSpec(bits or recipe.bits, group_size or recipe.group_size)
    n_layers = len(model.layers)
    plan: Plan = {}
    for path, module in quantizable_layers(model).items():
        spec = default
        for rule in recipe.rules:
            if fnmatch.fnmatchcase(path, rule["match"]) and _selected(
                path, rule.get("layers"), n_layers
            ):
                spec = LayerSpec(
                    rule.get("bits", spec.bits), rule.get("group_size", spec.group_size)
                )
                break
        plan[path] = spec if fits(module, spec) else None
    return plan


# ---------------------------------------------------------------------------
# Calibration statistics


def _hessian_key(path: str) -> str:
    """Layers that read the same input share one X^T X: q/k/v read the
    attention norm's output, gate/up the MLP norm's."""
    for names, shared in (
        (("q_proj", "k_proj", "v_proj"), "qkv"),
        (("gate_proj", "up_proj"), "gate_up"),
    ):
        head, _, leaf = path.rpartition(".")
        if leaf in names:
            return f"{head}.{shared}"
    return path


class _Recorder(nn.Module):
    """Stands in for a layer during calibration and records what it reads."""

    def __init__(self, layer: nn.Module, stats: Calibration, path: str):
        super().__init__()
        self.layer = layer
        self._stats = stats
        self._path = path

    def __call__(self, x: mx.array) -> mx.array:
        if isinstance(self.layer, nn.Embedding):
            self._stats.count_tokens(x)
        else:
            self._stats.add(self._path, x)
        return self.layer(x)

    def as_linear(self, x: mx.array) -> mx.array:
        # A tied embedding also serves as the output head.
        self._stats.add(self._path, x)
        return self.layer.as_linear(x)


class Calibration:
    """Per-layer input statistics gathered from a float model on sample text:
    ``X^T X`` for each linear layer (and for a tied embedding used as the
    head), and token counts for the embedding lookup."""

    def __init__(self) -> None:
        # Limitation: every layer's X^T X is held at once (about 0.5 GB for a
        # 135M model, several GB for 1B-class ones); a block-by-block pass
        # would hold one block's.
        self.hessians: dict[str, HessianAccumulator] = {}
        self.token_counts: mx.array | None = None
        self._ids: list[mx.array] = []

    def add(self, path: str, x: mx.array) -> None:
        key = _hessian_key(path)
        if key not in self.hessians:
            self.hessians[key] = HessianAccumulator(x.shape[-1])
        self.hessians[key].add(x)

    def count_tokens(self, ids: mx.array) -> None:
        self._ids.append(ids.reshape(-1))

    def hessian(self, path: str) -> mx.array | None:
        accumulator = self.hessians.get(_hessian_key(path))
        return accumulator.hessian if accumulator is not None else None

    @classmethod
    def collect(
        cls,
        model: nn.Module,
        windows: mx.array,
        *,
        progress: Progress | None = None,
    ) -> Calibration:
        """Run ``windows`` (``(N, L)`` token ids) through ``model`` and record."""
        stats = cls()
        layers = quantizable_layers(model)
        model.update_modules(
            tree_unflatten([(p, _Recorder(m, stats, p)) for p, m in layers.items()])
        )
        try:
            for i in range(windows.shape[0]):
                mx.eval(model(windows[i : i + 1]))
                if progress is not None:
                    progress("calibrating", i + 1, windows.shape[0])
        finally:
            model.update_modules(tree_unflatten(list(layers.items())))
        vocab = model.args.vocab_size
        ids = mx.concatenate(stats._ids) if stats._ids else mx.array([], mx.int32)
        stats.token_counts = mx.zeros((vocab,)).at[ids].add(1.0)
        stats._ids = []
        return stats


# ---------------------------------------------------------------------------
# Sensitivity and budget fitting


def rtn_error(
    module: nn.Module, spec: LayerSpec, stats: Calibration, path: str
) -> float:
    """Output error of rounding this layer: ``tr(dW H dW^T)`` over calibration
    inputs, plus, for the embedding, the squared row error weighted by how
    often each token was looked up."""
    w = module.weight.astype(mx.float32)
    wq, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    dw = w - mx.dequantize(
        wq, scales, biases, group_size=spec.group_size, bits=spec.bits
    )
    error = mx.array(0.0)
    hessian = stats.hessian(path)
    if hessian is not None:
        error = error + ((dw @ hessian) * dw).sum()
    if isinstance(module, nn.Embedding) and stats.token_counts is not None:
        error = error + (stats.token_counts[:, None] * dw * dw).sum()
    return error.item()


def plan_for_budget(
    model: nn.Module,
    budget_bytes: int,
    stats: Calibration,
    *,
    group_size: int = 64,
    float_bytes: int = 2,
    reserved_bytes: int = 0,
    candidates: tuple[int, ...] = SUPPORTED_BITS,
    progress: Progress | None = None,
) -> Plan:
    """Bits per layer so that weights plus ``reserved_bytes`` fit the budget.

    Every layer starts at the fewest bits; then, greedily, the upgrade with
    the largest drop in measured error per extra byte is taken while it
    fits. Layers whose input size does not divide by ``group_size`` stay
    float.

    Raises:
        ValueError: even the smallest plan does not fit, with both sizes.
    """
    layers = quantizable_layers(model)
    lowest = LayerSpec(candidates[0], group_size)
    plan: Plan = {p: lowest if fits(m, lowest) else None for p, m in layers.items()}
    used = planned_bytes(model, plan, float_bytes) + reserved_bytes
    if used > budget_bytes:
        raise ValueError(
            f"nothing fits: at {candidates[0]} bits the weights plus KV cache need "
            f"{format_bytes(used)} but the budget is {format_bytes(budget_bytes)}; "
            "raise the budget, shorten --context-length or pick a smaller model"
        )

    tunable = [p for p, spec in plan.items() if spec is not None]
    errors: dict[str, dict[int, float]] = {}
    for i, path in enumerate(tunable, start=1):
        errors[path] = {
            b: rtn_error(layers[path], LayerSpec(b, group_size), stats, path)
            for b in candidates
        }
        if progress is not None:
            progress("measuring sensitivity", i, len(tunable))

    def next_step(path: str) -> tuple[float, int, int] | None:
        bits = plan[path].bits
        higher = [b for b in candidates if b > bits]
        if not higher:
            return None
        b = higher[0]
        extra = layer_bytes(layers[path], LayerSpec(b, group_size), float_bytes) - (
            layer_bytes(layers[path], plan[path], float_bytes)
        )
        gain = errors[path][bits] - errors[path][b]
        return (-gain / extra, b, extra)

    heap = []
    for path in tunable:
        step = next_step(path)
        if step is not None:
            heapq.heappush(heap, (*step, path))
    while heap:
        _, bits, extra, path = heapq.heappop(heap)
        if used + extra > budget_bytes:
            continue
        plan[path] = LayerSpec(bits, group_size)
        used += extra
        step = next_step(path)
        if step is not None:
            heapq.heappush(heap, (*step, path))
    return plan


# ---------------------------------------------------------------------------
# Applying a plan


def quantize_layers(
    model: nn.Module,
    plan: Plan,
    *,
    method: str = "rtn",
    stats: Calibration | None = None,
    dtype: mx.Dtype | None = None,
    progress: Progress | None = None,
) -> None:
    """Replace the planned layers of ``model`` by quantized ones, in place.

    With ``method="gptq"`` each linear layer is quantized by GPTQ against its
    calibration ``X^T X``; the embedding (a lookup, with no input to
    calibrate against) is always rounded. Weights are cast to ``dtype`` (the
    dtype the scales will be stored in) first, so the rounding of the
    scales is part of what each method minimises.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if method == "gptq" and stats is None:
        raise ValueError("GPTQ needs calibration statistics")
    layers = quantizable_layers(model)
    todo = [(p, spec) for p, spec in plan.items() if spec is not None]
    replaced = []
    for i, (path, spec) in enumerate(todo, start=1):
        module = layers[path]
        if dtype is not None:
            module.set_dtype(dtype)
        kw = {"group_size": spec.group_size, "bits": spec.bits}
        if isinstance(module, nn.Embedding):
            quantized = nn.QuantizedEmbedding.from_embedding(module, **kw)
        else:
            quantized = nn.QuantizedLinear.from_linear(module, **kw)
            hessian = stats.hessian(path) if method == "gptq" else None
            if hessian is not None:
                quantized.weight, quantized.scales, quantized.biases = gptq_quantize(
                    module.weight, hessian, **kw
                )
        mx.eval(quantized.parameters())
        replaced.append((path, quantized))
        if progress is not None:
            progress("quantizing", i, len(todo))
    model.update_modules(tree_unflatten(replaced))


def quantization_config(plan: Plan) -> dict[str, Any]:
    """The config.json ``quantization`` entry: the most common spec as the
    default, per-layer entries where a layer differs, ``false`` for layers
    left in float."""
    specs = [s for s in plan.values() if s is not None]
    if not specs:
        raise ValueError(
            "no layer can be quantized at this group size (every layer's input "
            "size must divide by it); pick a smaller --group-size"
        )
    default = max(set(specs), key=lambda s: (specs.count(s), s.bits))
    config: dict[str, Any] = {**default.as_config(), "mode": "affine"}
    for path, spec in sorted(plan.items()):
        if spec is None:
            config[path] = False
        elif spec != default:
            config[path] = spec.as_config()
    return config


def plan_from_config(model: nn.Module, quantization: dict[str, Any]) -> Plan:
    """The plan a saved model follows, for reports on quantized folders."""
    plan: Plan = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            plan[path] = LayerSpec(module.bits, module.group_size)
        elif type(module) in (nn.Linear, nn.Embedding):
            plan[path] = None
    return plan


def dequantize_layers(model: nn.Module) -> int:
    """Turn every quantized layer back into a float one; returns how many."""
    replaced = []
    for path, module in model.named_modules():
        kw = (
            {"group_size": module.group_size, "bits": module.bits}
            if hasattr(module, "bits")
            else {}
        )
        if isinstance(module, nn.QuantizedLinear):
            w = mx.dequantize(module.weight, module.scales, module.biases, **kw)
            out_dims, in_dims = w.shape
            layer = nn.Linear(in_dims, out_dims, bias="bias" in module)
            layer.weight = w
            if "bias" in module:
                layer.bias = module.bias
            replaced.append((path, layer))
        elif isinstance(module, nn.QuantizedEmbedding):
            w = mx.dequantize(module.weight, module.scales, module.biases, **kw)
            layer = nn.Embedding(*w.shape)
            layer.weight = w
            replaced.append((path, layer))
    if replaced:
        model.update_modules(tree_unflatten(replaced))
    return len(replaced)


def bits_per_weight(model: nn.Module) -> float:
    """Stored bits per weight over the whole model, scales and biases included
    (the figure mlx-lm reports)."""
    total_bits = sum(v.nbytes * 8 for _, v in tree_flatten(model.parameters()))
    n_weights = 0
    for _, module in model.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            # Packed uint32 codes hold 32 / bits weights each.
            n_weights += module.weight.size * 32 // module.bits
            n_weights += module.bias.size if "bias" in module else 0
        elif not module.children():
            n_weights += sum(v.size for _, v in tree_flatten(module.parameters()))
    return total_bits / n_weights
