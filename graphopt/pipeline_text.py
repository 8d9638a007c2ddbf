"""Pipeline text, MLIR style: `a,b{k=v,k2=[1,2]},c` <-> [(name, {k: v})]. Values are parsed to
bool/int/float/str/list here; each pass's typed options convert them further.

Strings are TOML strings where quoting is needed: `"..."` with backslash escapes or `'...'` taken literally, a
quote opening only at the start of a value. format_value quotes every string that would not parse back as the
same string (empty, numbers, true/false, separators, quotes, spaces, control characters), so
parse(format_step(...)) gives back what was formatted; to_toml uses the same string syntax."""
from __future__ import annotations

import tomllib

from .errors import BadInput, printable

_SPECIAL = set(",{}[]=\"'\\")


def _unquote(t: str) -> str:
    try:
        doc = tomllib.loads(f"v = {t}")
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"pipeline: bad quoted string {printable(t)} ({e}); write \"...\" with \\\" and \\\\ "
                       f"escapes, or '...'") from None
    if list(doc) != ["v"] or not isinstance(doc["v"], str):
        raise BadInput(f"pipeline: bad quoted string {printable(t)}")
    return doc["v"]


def _scalar(tok: str):
    t = tok.strip()
    if t[:1] in ("'", '"'):
        return _unquote(t)
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split at sep outside brackets and quoted strings."""
    parts, depth, cur = [], 0, []
    quote, escaped, fresh = None, False, True     # fresh: at the start of a value, where a quote may open
    for ch in text:
        cur.append(ch)
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote, fresh = None, False
            continue
        if ch in "'\"" and fresh:
            quote = ch
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise BadInput(f"pipeline '{printable(text)}': unbalanced '{ch}'")
        if ch == sep and depth == 0:
            cur.pop()
            parts.append("".join(cur))
            cur = []
        fresh = ch in "{[,=" or (fresh and ch.isspace())
    if quote:
        raise BadInput(f"pipeline '{printable(text)}': unterminated {quote}")
    if depth != 0:
        raise BadInput(f"pipeline '{printable(text)}': unbalanced braces")
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


def quote(s: str) -> str:
    """s as a TOML basic string: "..." with \\ \" \n \t \r and \\uXXXX / \\UXXXXXXXX for other unprintables."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[ch])
        elif not ch.isprintable():
            out.append(f"\\u{ord(ch):04x}" if ord(ch) < 0x10000 else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _needs_quotes(s: str) -> bool:
    return (not s or not s.isprintable() or any(c in _SPECIAL or c.isspace() for c in s)
            or _scalar(s) != s)


def format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str) and _needs_quotes(v):
        return quote(v)
    return str(v)


def toml_value(v) -> str:
    """v as a TOML value (bool, int, float, string or an array of them)."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, str):
        return quote(v)
    return format_value(v)


def format_step(name: str, opts: dict) -> str:
    if not opts:
        return name
    return name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in opts.items()) + "}"
