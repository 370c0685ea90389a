"""Seeded random mutations of a recipe: values, types, keys, YAML syntax, and command-line overrides.

`mutate(tree, rng)` returns (YAML text of the recipe file, overrides, what was done). Values are drawn from
lists of awkward ones (negative, zero, huge, NaN, wrong types, paths that do not exist, remote URLs); sizes
are either tiny or so large that an allocation fails at once, never a size that would build for minutes.
"""
from __future__ import annotations

import copy
import random
from typing import Any, List, Tuple

import yaml

VALUES: List[Any] = [-1, 0, 1, 3, 7, 2 ** 31, 2 ** 63, 10 ** 30, -0.5, 1e-30, 0.5, 1e30, float("nan"),
                     float("inf"), -float("inf"), "", "x", "1e-3", "auto", "none", "fp16", "cosine", True, False,
                     None, [], [1, 2], [0.5, 0.5], ["a"], {}, {"a": 1}, "/nonexistent/path", "pipe:cat x",
                     "http://example.com/{0..3}.tar", "../..", "RN50", "ViT-B-32", "pkg:no_such_package"]
OVERRIDE_TEXTS = ["[0.9,", "{", "}", "a: b: c", "'", "\"", "!!python/object/apply:os.system ['true']",
                  "&a [*a]", "*x", "- - -", "[1, [2, {3: 4}]]", "\t", "%TAG", "@", "`", "0x10", "1_000", "~",
                  ".inf", "-.nan", "2001-12-14", "!!binary aGVsbG8=", "{a: 1, a: 2}", "|", ">"]
BAD_OVERRIDES = ["=", "=1", ".=1", "train.=3", ".train=3", "train..lr=1", "train", "model.config.=1",
                 "optim.lr.x=1", "data.train[0]=x", "train.output_dir", "a.b.c.d.e=1"]
YAML_NOISE = [":", "[", "]", "{", "}", "-", "#", "&", "*", "!", "|", ">", "'", "\"", "%", "@", "`", " ", "\t",
              "\n", ": :", "\n  - ", "\x00", "\ufeff"]


def leaves(node: Any, path: Tuple = ()) -> List[Tuple]:
    """Paths (tuples of keys / list indices) of every node below the root, parents before children."""
    found = []
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return found
    for key, child in items:
        found.append(path + (key,))
        found += leaves(child, path + (key,))
    return found


def get(tree: Any, path: Tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def parent_of(tree: Any, path: Tuple) -> Any:
    return get(tree, path[:-1])


def mappings(tree: dict) -> List[Tuple]:
    """Paths of every mapping in the tree, the root `()` included."""
    return [()] + [p for p in leaves(tree) if isinstance(get(tree, p), dict)]


def set_value(tree: dict, rng: random.Random) -> str:
    path = rng.choice(leaves(tree))
    value = copy.deepcopy(rng.choice(VALUES))
    parent_of(tree, path)[path[-1]] = value
    return f"value {'.'.join(map(str, path))}={value!r}"


INTS = [-1, 0, 1, 2, 3, 2 ** 31, 2 ** 63, 10 ** 30]
FLOATS = [-1.0, 0.0, 1e-30, 0.5, 1.0, 1.5, 1e30, float("nan"), float("inf")]


def extreme_number(tree: dict, rng: random.Random) -> str:
    """A number replaced by another of its type: the mutations that reach past type checks into building."""
    numbers = [p for p in leaves(tree) if isinstance(get(tree, p), (int, float))]
    if not numbers:
        return set_value(tree, rng)
    path = rng.choice(numbers)
    old = get(tree, path)
    new = (not old) if isinstance(old, bool) else rng.choice(INTS if isinstance(old, int) else FLOATS)
    parent_of(tree, path)[path[-1]] = new
    return f"number {'.'.join(map(str, path))}: {old!r} -> {new!r}"


def schema_fields() -> List[Tuple[str, str, Any]]:
    """(section, key, annotation) of every field of mmcl's recipe schema, defaults included."""
    import dataclasses
    import typing

    from mmcl.config import Recipe

    found = []
    for section, cls in typing.get_type_hints(Recipe).items():
        found += [(section, f.name, typing.get_type_hints(cls)[f.name]) for f in dataclasses.fields(cls)]
    return found


def schema_value(tree: dict, rng: random.Random) -> str:
    """Any field of the schema (also those the recipe leaves at their defaults), set to a value of its type
    when it has one: a recipe only names a few of the keys a user may write."""
    section, key, hint = rng.choice(schema_fields())
    text = str(hint)
    pool = INTS if "int" in text and "float" not in text else FLOATS if "float" in text else VALUES
    value = copy.deepcopy(rng.choice(pool))
    if not isinstance(tree.get(section), dict):
        tree[section] = {}
    tree[section][key] = [value] if "List" in text and rng.random() < 0.5 else value
    return f"schema {section}.{key}={tree[section][key]!r}"


def change_type(tree: dict, rng: random.Random) -> str:
    path = rng.choice(leaves(tree))
    parent, key = parent_of(tree, path), path[-1]
    old = parent[key]
    new = rng.choice([[old], {"value": old}, str(old), None] + ([old[0]] if isinstance(old, list) and old else []))
    parent[key] = new
    return f"type {'.'.join(map(str, path))}: {type(old).__name__} -> {type(new).__name__}"


def change_key(tree: dict, rng: random.Random) -> str:
    where = rng.choice(mappings(tree))
    node = get(tree, where)
    action = rng.choice(["rename", "delete", "add"]) if node else "add"
    if action == "add":
        key = rng.choice(["extra", "lr", "batch_size", "train", "model", "vision_cfg", "1", "None"])
        node[key] = copy.deepcopy(rng.choice(VALUES))
        return f"key add {'.'.join(map(str, where + (key,)))}"
    key = rng.choice(sorted(node, key=str))
    if action == "delete":
        del node[key]
        return f"key delete {'.'.join(map(str, where + (key,)))}"
    new = str(key)[:-1] if rng.random() < 0.5 else f"{key}s"
    node[new] = node.pop(key)
    return f"key rename {'.'.join(map(str, where + (key,)))} -> {new}"


def break_syntax(text: str, rng: random.Random) -> Tuple[str, str]:
    at = rng.randrange(len(text))
    kind = rng.choice(["insert", "delete", "cut", "indent"])
    if kind == "insert":
        return text[:at] + rng.choice(YAML_NOISE) + text[at:], f"syntax insert@{at}"
    if kind == "delete":
        return text[:at] + text[at + 1:], f"syntax delete@{at}"
    if kind == "cut":
        return text[:at], f"syntax cut@{at}"
    lines = text.splitlines()
    line = rng.randrange(len(lines))
    lines[line] = " " * rng.choice([1, 3, 5]) + lines[line]
    return "\n".join(lines) + "\n", f"syntax indent line {line}"


def override(tree: dict, rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(BAD_OVERRIDES)
    path = rng.choice(leaves(tree))
    dotted = ".".join(str(p) for p in path if not isinstance(p, int))
    text = rng.choice(OVERRIDE_TEXTS) if rng.random() < 0.5 else yaml.safe_dump(rng.choice(VALUES)).splitlines()[0]
    return f"{dotted}={text}"


def mutate(tree: dict, rng: random.Random) -> Tuple[str, List[str], List[str]]:
    """(recipe text, overrides, what was done): one to three edits of the tree, then maybe a syntax break
    of the text or an override."""
    tree, done = copy.deepcopy(tree), []
    for _ in range(rng.choice([1, 1, 2, 3])):
        edit = rng.choice([extreme_number, extreme_number, schema_value, schema_value, set_value, change_type,
                           change_key])
        done.append(edit(tree, rng))
    text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    overrides = []
    roll = rng.random()
    if roll < 0.2:
        text, what = break_syntax(text, rng)
        done.append(what)
    elif roll < 0.4:
        overrides.append(override(tree, rng))
        done.append(f"override {overrides[-1]!r}")
    return text, overrides, done
