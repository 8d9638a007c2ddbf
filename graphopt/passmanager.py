"""Pass infrastructure: the Pass base class with typed options, the registry, the context with its analysis
cache, and the PassManager that parses/prints pipelines and runs them with instruments (instruments.py: timing
and the checks after every pass)."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_graphsurgeon as gs

from . import pipeline_text, plugins
from .analyses import AnalysisManager
from .errors import BadInput, CheckFailed, GraphoptError, printable, strict_mode
from .graph import fingerprint
from .hardware import GENERIC, HardwareInfo
from .instruments import Instrument, default_instruments


@dataclass
class Option:
    type: type
    default: Any
    help: str = ""
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None

    def convert(self, pass_name: str, key: str, value):
        def bad(why):
            return BadInput(f"pass '{pass_name}': option {key}={pipeline_text.format_value(value)} {why}")
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                raise bad("must be true or false")
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("must be an integer")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad("must be a number")
            value = float(value)
        elif t is str:
            if isinstance(value, (list, dict)):
                raise bad("must be a single value")
            value = pipeline_text.format_value(value) if not isinstance(value, str) else value
        elif t is list:
            value = [value] if not isinstance(value, list) else value
            value = [pipeline_text.format_value(v) if not isinstance(v, str) else v for v in value]
        if self.choices is not None and value not in self.choices:
            raise bad(f"must be one of: {', '.join(map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise bad(f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise bad(f"must be at most {self.maximum}")
        return value


@dataclass
class PassResult:
    graph: gs.Graph
    modified: bool
    info: dict = field(default_factory=dict)


class Pass:
    """Subclass, set `name`, `help`, `options` (and `lossy`, `exact_for` when the pass may change the outputs;
    `in_place`; `preserves`), implement run(); override the hooks below (checks, report) where the pass has
    something to say. Core code reads a pass only through this class."""
    name: str = ""
    help: str = ""
    lossy: bool = False      # the pass may change the graph's outputs (under some options): drift is measured
    in_place: bool = True    # run() edits the graph it is given; False: leaves it untouched and returns a new one
    report_name: str = ""    # the report.json section its runs fill through report_section ("": none)
    options: dict[str, Option] = {}
    preserves: tuple[str, ...] = ()   # analyses still true of the graph after the pass changed it (kept cached)

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "exact" in cls.__dict__:
            raise TypeError(f"pass class {cls.__name__}: exactness is not an attribute; set lossy = True and "
                            f"override exact_for(opts) where options make the pass exact")

    @classmethod
    def exact_for(cls, opts: dict) -> bool:
        """Whether the pass with the resolved options opts keeps every output (the manager then checks that it
        does); lossy passes are inexact unless they override this."""
        return not cls.lossy

    @property
    def exact(self) -> bool:
        """exact_for(the resolved options)."""
        return self.exact_for(self.opts)

    def __init__(self, **opts):
        unknown = [k for k in opts if k not in self.options]
        if unknown:
            known = ", ".join(self.options) or "none"
            raise BadInput(f"pass '{self.name}' has no option '{unknown[0]}'; its options: {known}")
        self.given = {k: self.options[k].convert(self.name, k, v) for k, v in opts.items()}
        self.opts = {k: o.default for k, o in self.options.items()}
        self.opts.update(self.given)
        self.validate()

    def validate(self) -> None:
        """Check option combinations; raise BadInput. Judge combinations on changed(), not on which keys were
        given, so that the resolved text (every option spelled out) is accepted like the text it came from."""

    def changed(self) -> dict:
        """The options whose value differs from their default."""
        return {k: v for k, v in self.opts.items() if v != self.options[k].default}

    @classmethod
    def target_defaults(cls, hw: HardwareInfo) -> dict:
        """{option: value} that an option left at its default (0, empty: "the target's") takes on hardware hw;
        `graphopt passes --target T` shows them."""
        return {}

    def run(self, graph: gs.Graph, ctx: "PassContext") -> PassResult:
        raise NotImplementedError

    @classmethod
    def check_pipeline(cls, passes: list["Pass"]) -> None:
        """Raise BadInput when this pass cannot run in the order of `passes` (the manager calls it when a pipeline
        is built and again when it runs)."""

    def check_drift(self, drift: dict) -> str | None:
        """A lossy run's drift ({output: figures}, verify.drift) judged against the pass's budget: the problem in
        words (the manager fails the pipeline with it), or None."""
        return None

    def report_section(self, record: dict) -> dict | None:
        """What one run adds to report.json under report_name, from its record (PassManager.run); None: nothing."""
        return None

    @classmethod
    def report_text(cls, entry: dict) -> str:
        """The terminal summary of one report_section entry (`graphopt compile` prints it)."""
        return ""

    def summary(self, record: dict) -> dict:
        """The few facts of one run worth a line in a summary (compress's list of passes); {}: none."""
        return {}

    def text(self, resolved: bool = False) -> str:
        return pipeline_text.format_step(self.name, self.opts if resolved else self.given)

    def __eq__(self, other):
        return type(self) is type(other) and self.opts == other.opts

    def __repr__(self):
        return f"<pass {self.text(True)}>"


REGISTRY: dict[str, type[Pass]] = {}
_ALL_LOADED = False


def register(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def _load_entry_points(name: str | None = None) -> None:
    """Register the passes of the `graphopt.passes` entry-point group (those called `name` when given). An entry
    names a Pass subclass ("module:Class") or a module whose import registers the pass."""
    for ep in plugins.entry_points(plugins.PASSES, name):
        obj = plugins.load(ep)
        if isinstance(obj, type) and issubclass(obj, Pass):
            if obj.name != ep.name:
                raise GraphoptError(f"{plugins.PASSES} entry point '{printable(ep.name)}' names a pass called "
                                    f"'{printable(obj.name)}'")
            register(obj)
        elif ep.name not in REGISTRY:
            raise GraphoptError(f"{plugins.PASSES} entry point '{printable(ep.name)}' ({printable(ep.value)}) "
                                f"registered no pass of that name")


def load_passes() -> None:
    """Register every installed pass (the registry then lists them all: `graphopt passes`, report sections)."""
    global _ALL_LOADED
    if not _ALL_LOADED:
        _load_entry_points()
        _ALL_LOADED = True


def get_pass_class(name: str) -> type[Pass]:
    if name not in REGISTRY:
        _load_entry_points(name)
    if name not in REGISTRY:
        load_passes()
        import difflib
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise BadInput(f"unknown pass '{name}'{hint}; `graphopt passes` lists them")
    return REGISTRY[name]


def make_pass(name: str, **opts) -> Pass:
    return get_pass_class(name)(**opts)


class PassContext:
    """What passes can see besides the graph: analyses, target hardware constants, user data, the seed."""

    def __init__(self, target: str | None = None, hw: HardwareInfo | None = None, data: dict | None = None,
                 seed: int = 0, verify: str = "full", progress=None, target_options: dict | None = None,
                 strict: bool | None = None):
        if hw is not None and not isinstance(hw, HardwareInfo):
            raise TypeError(f"PassContext(hw=...) takes a graphopt.hardware.HardwareInfo (Target.hw()), not "
                            f"{type(hw).__name__}")
        self.target = target
        self.target_options = dict(target_options or {})     # as the target was made (mcpu, ...): latency models
        self.hw = hw if hw is not None else GENERIC
        self.data = dict(data or {})
        self.seed = seed
        self.verify = verify
        self.progress = progress
        # checks for pass authors and tests (default: GRAPHOPT_STRICT=1): a functional pass left its input alone
        self.strict = strict_mode() if strict is None else strict
        self.analyses = AnalysisManager(self)


@dataclass
class PipelineResult:
    graph: gs.Graph
    modified: bool
    records: list[dict]


#: the manager's record keys, in the order records list them (instruments add theirs, e.g. seconds, max_error)
RECORD_KEYS = ("pass", "position", "exact", "modified", "seconds", "nodes_before", "nodes_after", "info")


class PassManager:
    """A pipeline of passes. instruments: what runs around every pass (instruments.Instrument); None: those of
    the run's verification level, PassContext.verify (instruments.default_instruments); []: nothing."""

    def __init__(self, passes: list[Pass] | None = None, instruments: list[Instrument] | None = None):
        self.passes = list(passes or [])
        self.instruments = None if instruments is None else list(instruments)
        self.check_order()

    def check_order(self) -> None:
        """Let each pass class refuse the order of this pipeline (Pass.check_pipeline: quantize refuses structural
        passes after it). Runs when the pipeline is built and again when it runs."""
        for cls in {type(p) for p in self.passes}:
            cls.check_pipeline(self.passes)

    @classmethod
    def parse(cls, text: str) -> "PassManager":
        return cls([make_pass(name, **opts) for name, opts in pipeline_text.parse(text)])

    @classmethod
    def from_toml(cls, path_or_text: str | Path) -> "PassManager":
        text = path_or_text
        where = "pipeline TOML"
        if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and "\n" not in path_or_text
                                              and path_or_text.endswith(".toml")):
            p = Path(path_or_text)
            where = str(p)
            try:
                text = p.read_text()
            except OSError as e:
                raise BadInput(f"{p}: cannot read ({e.strerror})") from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise BadInput(f"{where}: invalid TOML ({e})") from None
        return cls.from_steps(doc.get("pass", []), where)

    @classmethod
    def from_steps(cls, steps, where: str = "pipeline") -> "PassManager":
        if not isinstance(steps, list):
            raise BadInput(f"{where}: [[pass]] must be an array of tables")
        passes = []
        for i, step in enumerate(steps):
            if not isinstance(step, dict) or not isinstance(step.get("name"), str):
                raise BadInput(f"{where}: [[pass]] #{i + 1} needs a string 'name'")
            opts = {k: v for k, v in step.items() if k != "name"}
            passes.append(make_pass(step["name"], **opts))
        return cls(passes)

    def __str__(self) -> str:
        return ",".join(p.text() for p in self.passes)

    def resolved(self) -> str:
        return ",".join(p.text(resolved=True) for p in self.passes)

    def to_toml(self, resolved: bool = False) -> str:
        """The pipeline as [[pass]] tables (every option when resolved, else the given ones)."""
        lines = []
        for p in self.passes:
            lines.append("[[pass]]")
            lines.append(f"name = {pipeline_text.quote(p.name)}")
            for k, v in (p.opts if resolved else p.given).items():
                lines.append(f"{k} = {pipeline_text.toml_value(v)}")
            lines.append("")
        return "\n".join(lines)

    def __eq__(self, other):
        return isinstance(other, PassManager) and self.passes == other.passes

    def _prefix(self, i: int) -> str:
        return ",".join(p.text() for p in self.passes[:i + 1])

    def run(self, graph: gs.Graph, ctx: PassContext | None = None, feeds: dict | None = None) -> PipelineResult:
        """Run every pass in order, with the instruments around each (default: those of ctx.verify, timing and
        at "full" the structural, finite-weight, numeric and drift checks, the last two on feeds, default seeded
        inputs). A failure names the pass, its position and the prefix that reproduces it.
        In-place passes edit the graph they are given, so `graph` belongs to the run (read the result's graph);
        a pipeline of functional passes leaves it as it was. One record per pass: the manager's keys (pass,
        position, exact, modified, nodes_before/after), the instruments' (seconds, max_error or drift) and the
        pass's own under "info"."""
        self.check_order()                   # self.passes may have changed since the pipeline was built
        ctx = ctx or PassContext()
        instruments = self.instruments if self.instruments is not None else default_instruments(ctx.verify, feeds)
        for ins in instruments:
            ins.enter_pipeline(graph, self.passes, ctx)
        records, modified_any = [], False
        for i, p in enumerate(self.passes):
            where = f"pass '{p.name}' (#{i + 1} in the pipeline; reproduce with --pipeline '{self._prefix(i)}')"
            given, mark = graph, (fingerprint(graph) if ctx.strict and not p.in_place else None)
            nodes_before = len(graph.nodes)
            for ins in reversed(instruments):
                ins.before_pass(p, graph, ctx)
            result = p.run(graph, ctx)
            if mark is not None and fingerprint(given) != mark:
                raise CheckFailed(f"{where} is declared functional (in_place = False) but changed the graph it was "
                                  f"given")
            graph = result.graph
            if result.modified:
                modified_any = True
                ctx.analyses.invalidate(keep=p.preserves, graph=graph)
            record = {"pass": p.text(resolved=True), "position": i + 1, "exact": p.exact,
                      "modified": result.modified, "nodes_before": nodes_before, "nodes_after": len(graph.nodes),
                      "info": result.info}
            for ins in instruments:
                problem = ins.after_pass(p, result, record, ctx)
                if problem:
                    raise CheckFailed(f"{where} {problem}")
            records.append({**{k: record[k] for k in RECORD_KEYS if k in record}, **record})
        result = PipelineResult(graph, modified_any, records)
        for ins in instruments:
            ins.exit_pipeline(result, ctx)
        return result
