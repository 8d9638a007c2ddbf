"""Pipeline text, MLIR style: `a,b{k=v,k2=[1,2]},c` <-> [(name, {k: v})]. Values are parsed to
bool/int/float/str/list here; each pass's typed options convert them further."""
from __future__ import annotations

from .errors import BadInput


def _scalar(tok: str):
    t = tok.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    if len(t) >= 2 and t[0] == t[-1] and t[0] in "'\"":
        return t[1:-1]
    return t


def _split_top(text: str, sep: str = ",") -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise BadInput(f"pipeline '{text}': unbalanced '{ch}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise BadInput(f"pipeline '{text}': unbalanced braces")
    parts.append("".join(cur))
    return parts


def _value(tok: str):
    t = tok.strip()
    if t.startswith("[") and t.endswith("]"):
        inner = t[1:-1].strip()
        return [_scalar(x) for x in _split_top(inner)] if inner else []
    return _scalar(t)


def parse(text: str) -> list[tuple[str, dict]]:
    text = text.strip()
    if not text:
        return []
    steps = []
    for part in _split_top(text):
        part = part.strip()
        if not part:
            raise BadInput(f"pipeline '{text}': empty pass name")
        opts = {}
        if "{" in part:
            if not part.endswith("}"):
                raise BadInput(f"pipeline '{text}': '{part}' must end with '}}'")
            name, body = part[:part.index("{")].strip(), part[part.index("{") + 1:-1]
            for kv in _split_top(body):
                if not kv.strip():
                    continue
                if "=" not in kv:
                    raise BadInput(f"pipeline '{text}': option '{kv.strip()}' of '{name}' needs a value (key=value)")
                k, _, v = kv.partition("=")
                opts[k.strip()] = _value(v)
        else:
            name = part
        steps.append((name, opts))
    return steps


def format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def format_step(name: str, opts: dict) -> str:
    if not opts:
        return name
    return name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + "}"
