"""A self-contained report.html for `graphopt build`: metric and gate tables plus inline SVG plots (matplotlib)."""
from __future__ import annotations

import html
import io
import json


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    import matplotlib.pyplot as plt
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plots(summary: dict) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "graphopt"     # deterministic ids: same inputs, same bytes
    import matplotlib.pyplot as plt

    plots = []
    m = summary["metrics"]
    before, after = m.get("channels_before", {}), m.get("channels_after", {})
    if before:
        names = list(before)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.2))
        idx = range(len(names))
        ax.bar([i - 0.2 for i in idx], [before[n] for n in names], width=0.4, label="before")
        ax.bar([i + 0.2 for i in idx], [after.get(n, 0) for n in names], width=0.4, label="after")
        ax.set_xticks(list(idx))
        ax.set_xticklabels([n.strip("/")[-28:] for n in names], rotation=70, fontsize=7)
        ax.set_ylabel("output channels")
        ax.set_title("Channels per layer")
        ax.legend()
        plots.append(("channels", _svg(fig)))
    stages = summary.get("stages", [])
    if stages:
        labels = [s["stage"] for s in stages]
        series = [("MACs", [s["macs"] for s in stages]), ("latency ms (onnxruntime)", [s["ort_latency_ms"] for s in stages])]
        if all("top1" in s for s in stages):
            series.append(("top-1", [s["top1"] for s in stages]))
        fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
        for ax, (title, values) in zip(axes if len(series) > 1 else [axes], series):
            ax.plot(range(len(values)), values, marker="o")
            ax.set_xticks(range(len(values)))
            ax.set_xticklabels([str(i) for i in range(len(values))])
            ax.set_xlabel("stage")
            ax.set_title(title)
        fig.subplots_adjust(top=0.8)
        fig.suptitle("After each pass (stage 0 = original): " + ", ".join(f"{i}={l}" for i, l in enumerate(labels))[:160],
                     fontsize=8)
        plots.append(("stages", _svg(fig)))
        pareto = _pareto(summary, plt)
        if pareto is not None:
            plots.append(("accuracy-latency", pareto))
    return plots


def _pareto(summary: dict, plt) -> str | None:
    """Accuracy (top-1 with labels, else agreement with the original) against measured latency for every stage
    (onnxruntime, 1 thread) and for the compiled artifact (graphopt on the target); None without such figures."""
    stages, m = summary["stages"], summary["metrics"]
    if all("top1" in s for s in stages):
        key, compiled, what = "top1", m.get("top1_after"), "top-1"
    elif all("agreement" in s for s in stages):
        key, compiled, what = "agreement", m.get("agreement"), f"agreement with the original ({m.get('agreement_metric')})"
    else:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs, ys = [s["ort_latency_ms"] for s in stages], [s[key] for s in stages]
    ax.plot(xs, ys, marker="o", linestyle=":", label="stages (onnxruntime, 1 thread)")
    for s, x, y in zip(stages, xs, ys):
        ax.annotate(s.get("label", s["stage"])[:40], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if m.get("latency_ms") is not None and compiled is not None:
        ax.plot([xs[-1], m["latency_ms"]], [ys[-1], compiled], linestyle=":", color="gray")
        ax.scatter([m["latency_ms"]], [compiled], marker="*", s=150, color="C3",
                   label=f"compiled ({summary['target']}, {m.get('threads', 1)} thread(s))")
        ax.annotate("compiled", (m["latency_ms"], compiled), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("latency ms (measured)")
    ax.set_ylabel(what)
    ax.set_title("Accuracy against latency, per stage")
    ax.legend(fontsize=7)
    return _svg(fig)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return html.escape(json.dumps(v, sort_keys=True)[:200])
    return html.escape(str(v))


def render(summary: dict) -> str:
    plots = _plots(summary)
    m = summary["metrics"]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in m.items()
                   if not k.startswith("channels_"))
    gates = "".join(
        f"<tr class='{'ok' if g['passed'] else 'fail'}'><td>{html.escape(n)}</td><td>{g['threshold']:g}</td>"
        f"<td>{'passed' if g['passed'] else 'FAILED'}</td></tr>" for n, g in summary["gates"].items()) \
        or "<tr><td colspan=3>no gates</td></tr>"
    figures = "".join(f"<figure class='plot' id='plot-{name}'>{svg}</figure>" for name, svg in plots)
    status = "FAILED" if summary["failed_gates"] else "passed"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>graphopt build report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;font-size:13px}}.fail{{background:#fdd}}.ok{{background:#dfd}}
figure{{margin:1em 0}}</style></head>
<body data-plots="0">
<h1>graphopt build: {status}</h1>
<p>pipeline file <code>{html.escape(summary['toml'])}</code>, target <b>{html.escape(summary['target'])}</b>,
pipeline <code>{html.escape(summary['pipeline'] or '(none)')}</code>; cached stages:
{html.escape(', '.join(summary['cached_stages']) or 'none')}</p>
<h2>Gates</h2><table><tr><th>gate</th><th>threshold</th><th>result</th></tr>{gates}</table>
<h2>Metrics</h2><table>{rows}</table>
<h2>Plots</h2>{figures}
<div id="errors"></div>
<script>
window.addEventListener("error", function (e) {{
  document.getElementById("errors").textContent += "script error: " + e.message + "\\n";
}});
document.addEventListener("DOMContentLoaded", function () {{
  var n = 0;
  document.querySelectorAll("figure.plot svg").forEach(function (s) {{
    var box = s.getBoundingClientRect();
    if (box.width > 50 && box.height > 50 && s.querySelectorAll("path").length > 3) n += 1;
  }});
  document.body.setAttribute("data-plots", String(n));
}});
</script>
</body></html>
"""
