"""Reading configuration files: YAML, `include:`, `${NAME}` / `${NAME:-default}` substitution, and errors
that name the file, the field path and the problem."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from bastion.config.schema import Config

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass
class ConfigProblem:
    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used. `problems` lists every issue found, each with file and path."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Provenance:
    """Which file each top-level value (or list item, or mapping key) came from."""

    def __init__(self) -> None:
        self.scalars: dict[str, str] = {}
        self.items: dict[str, list[str]] = {}
        self.keys: dict[str, dict[str, str]] = {}

    def file_for(self, loc: tuple, default: str) -> str:
        if not loc:
            return default
        top = loc[0]
        if len(loc) > 1 and top in self.items and isinstance(loc[1], int) and loc[1] < len(self.items[top]):
            return self.items[top][loc[1]]
        if len(loc) > 1 and top in self.keys and loc[1] in self.keys[top]:
            return self.keys[top][loc[1]]
        return self.scalars.get(top, default)


def _substitute(value, file: str, problems: list[ConfigProblem], path: str):
    if isinstance(value, dict):
        return {k: _substitute(v, file, problems, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, file, problems, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None or (found == "" and default is not None):
            if default is None:
                problems.append(ConfigProblem(file, path, f"environment variable {name} is not set (use ${{{name}:-default}})"))
                return ""
            return default
        return found

    whole = _ENV_REF.fullmatch(value)
    result = _ENV_REF.sub(replace, value)
    if whole:
        # A value that is only a reference takes the type its text has: ${PORT:-8080} is a number.
        try:
            typed = yaml.safe_load(result)
        except yaml.YAMLError:
            return result
        if isinstance(typed, (int, float, bool)) or typed is None:
            return typed if result.strip() else result
    return result


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(path), "", f"cannot read: {exc.strerror or exc}")]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigProblem(str(path), "", f"{where}invalid YAML: {problem}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([ConfigProblem(str(path), "", "the top level must be a mapping of sections")])
    return data


def _merge_file(path: Path, merged: dict, prov: _Provenance, seen: set[Path], problems: list[ConfigProblem]) -> None:
    real = path.resolve()
    if real in seen:
        problems.append(ConfigProblem(str(path), "include", "includes itself (directly or through another file)"))
        return
    seen.add(real)
    data = _read_yaml(path)
    data = _substitute(data, str(path), problems, "")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        problems.append(ConfigProblem(str(path), "include", "must be a file name or a list of file names"))
        includes = []
    file = str(path)
    for key, value in data.items():
        if isinstance(value, list) and isinstance(merged.get(key, []), list):
            merged.setdefault(key, []).extend(value)
            prov.items.setdefault(key, []).extend([file] * len(value))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict) and key in ("upstreams",):
            merged[key].update(value)
            prov.keys.setdefault(key, {}).update({k: file for k in value})
        else:
            if key in merged and key in prov.scalars and prov.scalars[key] != file:
                problems.append(ConfigProblem(file, key, f"already set in {prov.scalars[key]}"))
            merged[key] = value
            prov.scalars[key] = file
            if isinstance(value, dict):
                prov.keys[key] = {k: file for k in value}
    for index, pattern in enumerate(includes):
        pattern_path = Path(pattern) if os.path.isabs(pattern) else path.parent / pattern
        matches = sorted(glob.glob(str(pattern_path)))
        if not matches and not glob.has_magic(str(pattern_path)):
            problems.append(ConfigProblem(file, f"include[{index}]", f"no such file: {pattern_path}"))
        for match in matches:
            _merge_file(Path(match), merged, prov, seen, problems)


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_TAGS = frozenset({"int", "str", "float", "bool", "none", "list", "dict", "bytes"})


def _is_union_tag(part) -> bool:
    return isinstance(part, str) and (
        part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()
    )


def _navigable_loc(loc: tuple, data) -> tuple:
    """pydantic puts union member tags ('str', 'Upstream', 'literal[...]') into locations; keep what the
    file has, plus field names below a value given in short form (a string for a mapping)."""
    kept: list = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            kept.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            kept.append(part)
            node = node[part]
        elif _is_union_tag(part):
            continue
        else:
            kept.append(part)
            node = None
    return tuple(kept)


def problems_from_validation(exc: ValidationError, data: dict, prov: _Provenance, main_file: str) -> list[ConfigProblem]:
    found: dict[tuple, list[str]] = {}
    for error in exc.errors(include_url=False):
        loc = _navigable_loc(tuple(error["loc"]), data)
        message = error["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if message.startswith(prefix):
                message = message[len(prefix) :]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check its spelling and docs/configuration.md)"
        elif error["type"] == "missing":
            message = "required field is missing"
        found.setdefault(loc, [])
        if message not in found[loc]:
            found[loc].append(message)
    # A union reports each member's complaint; the deepest location is the useful one.
    locs = list(found)
    problems = []
    for loc in locs:
        if any(other != loc and other[: len(loc)] == loc for other in locs):
            continue
        problems.append(ConfigProblem(prov.file_for(loc, main_file), _format_loc(loc), "; or ".join(found[loc])))
    return problems


def load_config(path: str | os.PathLike) -> Config:
    """Read, merge and validate a configuration file. Raises ConfigError naming file, field and problem."""
    main = Path(path)
    merged: dict = {}
    prov = _Provenance()
    problems: list[ConfigProblem] = []
    _merge_file(main, merged, prov, set(), problems)
    if problems:
        raise ConfigError(problems)
    try:
        config = Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, merged, prov, str(main))) from None
    for index, route in enumerate(config.routes):
        if isinstance(route.upstream, str) and route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams)) or "none defined"
            problems.append(ConfigProblem(
                prov.file_for(("routes", index), str(main)), f"routes[{index}].upstream",
                f"no upstream named {route.upstream!r} (known: {known})"))
    if problems:
        raise ConfigError(problems)
    return config
