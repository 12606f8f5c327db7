"""The parts of open-mmlab/mmpretrain checkpoints that are not weights, for
:mod:`mimfast.models.mmpretrain` and :mod:`mimfast.models.mmpretrain_beit`: the config text mmengine
saves in ``meta['cfg']``, read with :mod:`ast` (never executed), MMPretrain's ViT arch table
(head counts), small lookups on state_dicts, and the key-mapping loop (:func:`_map_keys`) both
models' conversions run."""

from __future__ import annotations

import ast
import re
from collections.abc import Callable

from mimfast.models import VIT_HEADS_BY_WIDTH

__all__ = ["parse_config_text"]

# MMPretrain VisionTransformer.arch_zoo: name -> (embed_dims, num_layers, num_heads)
_ARCH_ZOO = {"s": (768, 8, 8), "small": (768, 8, 8), "b": (768, 12, 12), "base": (768, 12, 12),
             "l": (1024, 24, 16), "large": (1024, 24, 16), "h": (1280, 32, 16), "huge": (1280, 32, 16),
             "eva-g": (1408, 40, 16), "eva-giant": (1408, 40, 16), "deit-t": (192, 12, 3), "deit-tiny": (192, 12, 3),
             "deit-s": (384, 12, 6), "deit-small": (384, 12, 6), "dinov2-s": (384, 12, 6),
             "dinov2-small": (384, 12, 6), "deit-b": (768, 12, 12), "deit-base": (768, 12, 12),
             "dinov2-g": (1536, 40, 24), "dinov2-giant": (1536, 40, 24)}
_HEADS_BY_SIZE = {(w, d): h for w, d, h in _ARCH_ZOO.values()}
_DROPPED = ("backbone.ln2.weight", "backbone.ln2.bias")  # out_type='avg_featmap': unused when pretraining


def _has(sd: dict, *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in sd)


def _depth(sd: dict, stack: str) -> int:
    found = [int(m.group(1)) for k in sd if (m := re.match(rf"{stack}\.(\d+)\.", k))]
    return 1 + max(found) if found else 0


def _map_keys(sd: dict, fixed: dict, layer_re: re.Pattern, stacks: dict, layer: dict,
              other: Callable[[str, object, re.Match | None], dict]) -> dict:
    """``sd`` under the other side's keys, tensors as they are, in ``sd``'s order: a key of ``fixed`` is
    renamed to its value; a block key that ``layer_re`` splits into (stack, index, name) with ``name``
    in ``layer`` becomes ``{stacks[stack]}.{index}.{layer[name]}``; any other key gives the entries
    ``other(key, value, match)`` returns ({} drops it), or its error."""
    out = {}
    for k, v in sd.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = layer_re.match(k)
        if m and m.group(3) in layer:
            out[f"{stacks[m.group(1)]}.{m.group(2)}.{layer[m.group(3)]}"] = v
        else:
            out.update(other(k, v, m))
    return out


def _find_type(obj, name: str) -> dict | None:
    """The first dict (depth first) in a parsed config whose ``type`` is ``name``."""
    if isinstance(obj, dict):
        if _type_name(obj.get("type")) == name:
            return obj
        values = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return None
    for value in values:
        found = _find_type(value, name)
        if found is not None:
            return found
    return None


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b}


def _literal(node):
    """A config expression's value: constants, containers, ``dict(k=v, ...)``, +, -, *, / and //
    of numbers, dotted names as strings; anything else is None. Nothing is executed."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return tuple(items) if isinstance(node, ast.Tuple) else items
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _literal(node.operand)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _literal(node.left), _literal(node.right)
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
            try:
                return _BINOPS[type(node.op)](a, b)
            except ZeroDivisionError:
                return None
    if isinstance(node, (ast.Name, ast.Attribute)):
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            return ".".join([node.id, *reversed(parts)])
    return None


def parse_config_text(text: str) -> dict:
    """The top-level assignments of an mmengine config's text (``Config.pretty_text``, which the
    runner saves as ``meta['cfg']``) as plain values, read with :mod:`ast` (never executed);
    {} for text that does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return {}
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            out[stmt.targets[0].id] = _literal(stmt.value)
    return out


def _get(cfg, *path, default=None):
    """``cfg[path[0]][path[1]]...`` of a parsed config (mmengine's, or SimMIM's yacs one read as nested
    dicts), or ``default`` where a step is not a dict or lacks the key."""
    for key in path:
        if not isinstance(cfg, dict) or key not in cfg:
            return default
        cfg = cfg[key]
    return cfg


def _type_name(value) -> str | None:
    return value.rsplit(".", 1)[-1] if isinstance(value, str) else None


def _encoder_heads(width: int, depth: int, backbone: dict | None) -> int:
    arch = _get(backbone, "arch")
    if isinstance(arch, dict) and isinstance(arch.get("num_heads"), int):
        return arch["num_heads"]
    if isinstance(arch, str) and arch.lower() in _ARCH_ZOO:
        zoo_width, _, heads = _ARCH_ZOO[arch.lower()]
        if zoo_width == width:
            return heads
    return _HEADS_BY_SIZE.get((width, depth), VIT_HEADS_BY_WIDTH.get(width, max(1, width // 64)))
