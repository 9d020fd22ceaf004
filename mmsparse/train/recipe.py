"""Reading recipes: YAML that keeps the file and line of every key and refuses duplicate keys,
``base:`` chains, and the command line's ``key=value`` items. What the keys mean and how their
values are checked is ``config``'s business."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable

import yaml

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


class ConfigError(ValueError):
    """A recipe or override that does not fit the config tree."""


def at(source: str) -> str:
    """`` (source)`` for a message, or nothing."""
    return f" ({source})" if source else ""


class Sources(dict):
    """Dotted key -> where its value was set (``recipes/x.yaml:12``, ``command line 'k=v'``)."""

    def of(self, key: str) -> str:
        """The source of ``key`` or of the nearest enclosing key that has one."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self:
                return self[".".join(parts[:n])]
        return ""

    def under(self, key: str) -> list[str]:
        return sorted({v for k, v in self.items() if k == key or k.startswith(key + ".")})


def set_key(tree: dict, key: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``key`` "a.b.c" (copying the mappings on the way)."""
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        node[part] = nxt = dict(nxt) if isinstance(nxt, dict) else {}
        node = nxt
    node[parts[-1]] = value


Normalize = Callable[[dict, Sources], tuple[dict, Sources]]


def deep_merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``; mappings merge recursively, anything else is replaced."""
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_recipe(recipe: str | Path) -> Path:
    """A path, or a name in the repository's recipes/ ("tiny_cpu" or "tiny_cpu.yaml")."""
    p = Path(recipe)
    candidates = [p, p.with_suffix(".yaml") if p.suffix == "" else p, RECIPES_DIR / p.name,
                  RECIPES_DIR / (p.name + ".yaml")]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    hint = difflib.get_close_matches(p.stem, known, n=1)
    raise ConfigError(f"recipe {str(recipe)!r} not found (looked in . and {RECIPES_DIR})"
                      + (f"; did you mean {hint[0]!r}?" if hint else f"; known recipes: {known}"))


class _Lined(dict):
    """A YAML mapping that knows the line of each of its keys."""

    lines: dict


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and keeps each key's line."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Lined:
    loader.flatten_mapping(node)
    out = _Lined()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in out:
            raise ConfigError(f"{loader.source}:{line}: duplicate key {key!r} (first at line {out.lines[key]}); "
                              f"a YAML mapping keeps only one value per key")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(RECIPES_DIR.parent))
    except ValueError:
        return str(path)


def _plain(node: Any, source: str, sources: Sources, prefix: str = "") -> Any:
    """Plain dicts from ``_Lined`` ones, each key's ``file:line`` into ``sources``."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(node, _Lined):
                sources[key] = f"{source}:{node.lines[k]}"
            out[k] = _plain(v, source, sources, key + ".")
        return out
    if isinstance(node, list):
        return [_plain(v, source, sources, prefix) for v in node]
    return node


def _load_file(path: Path) -> tuple[dict, Sources]:
    loader = _Loader(path.read_text())
    loader.source = _show(path)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, Sources()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping, got {type(data).__name__}")
    sources = Sources()
    return _plain(data, _show(path), sources), sources


def load_tree(path: str | Path, normalize: Normalize = lambda tree, sources: (tree, sources),
              _seen: tuple[Path, ...] = ()) -> tuple[dict, Sources]:
    """The recipe as a dict with its ``base:`` chain merged in (cycles are errors), and the source
    of every key. ``normalize`` rewrites each file's tree (older key spellings) before the merge."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"recipe inheritance cycle: {' -> '.join(str(p) for p in (*_seen, path))}")
    if not path.is_file():
        raise ConfigError(f"recipe file {path} not found" + (f" (base of {_seen[-1]})" if _seen else ""))
    data, sources = _load_file(path)
    bases = data.pop("base", None) or []
    merged, merged_sources = {}, Sources()
    for b in [bases] if isinstance(bases, str) else bases:
        bp = Path(b)
        tree, src = load_tree(bp if bp.is_absolute() else path.parent / bp, normalize, (*_seen, path))
        merged, merged_sources = deep_merge(merged, tree), Sources({**merged_sources, **src})
    data, sources = normalize(data, sources)
    return deep_merge(merged, data), Sources({**merged_sources, **sources})


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value
