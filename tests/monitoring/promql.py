"""What a PromQL expression reads, and what the services export: the names a dashboard
or a rule may use.

The services declare their metrics once, in ``services/*/metrics.py`` (and
``services/runtime.py`` declares ``task_failures``, which every service has); each
instantiates them into its own ``CollectorRegistry``. The catalogue is made the same
way: each class such a module defines is instantiated (a ``CollectorRegistry`` or a
callable given where its constructor wants one), and whatever it registered is
collected. So a metric renamed or removed in a service fails the tests of every
dashboard and rule that reads it.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import re
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

SERVICES = Path(__file__).resolve().parents[2] / "services"

# Besides the metrics modules: the supervisor of every service's tasks.
MORE_SOURCES = ("services.runtime:Tasks",)

# Labels Prometheus gives every target (Kubernetes discovery, relabelled as usual).
TARGET_LABELS = frozenset({"namespace", "pod", "job", "instance"})

# Series from outside the services, and their own labels.
EXTERNAL: dict[str, frozenset[str]] = {
    "up": frozenset(),  # Prometheus, per target
    # the kubelet's cAdvisor: the services' registries hold no process_* metrics
    "container_cpu_usage_seconds_total": frozenset({"container", "cpu", "id", "image", "name"}),
}

# The sample names a family of each type exposes, by suffix.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "unknown": ("",),
}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


FUNCTIONS = _words(
    """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil
    changes clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week
    day_of_year days_in_month deg delta deriv exp floor histogram_count
    histogram_fraction histogram_quantile histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 max_over_time
    min_over_time minute month pi predict_linear present_over_time quantile_over_time
    rad rate resets round scalar sgn sin sinh sort sort_desc sqrt stddev_over_time
    stdvar_over_time sum_over_time tan tanh time timestamp vector year avg bottomk count
    count_values group max min quantile stddev stdvar sum topk start end
    """
)
KEYWORDS = _words("and or unless by without on ignoring group_left group_right bool offset atan2")

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)", re.IGNORECASE
)
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(?![\w:])(\s*\()?")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_]\w*)\s*\}\}")


# -- what the services export --------------------------------------------------------------


def _constructed(cls: type, registry: CollectorRegistry) -> object:
    """An instance of ``cls``, given ``registry`` where it asks for a registry and a
    callable that returns nothing where it asks for a callable (as the replica machine's
    metrics ask for its copies)."""
    hints = typing.get_type_hints(cls.__init__)  # type: ignore[misc]
    args: dict[str, object] = {}
    for name, param in inspect.signature(cls).parameters.items():
        if param.default is not inspect.Parameter.empty or param.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        hint = hints.get(name)
        if hint is CollectorRegistry:
            args[name] = registry
        elif typing.get_origin(hint) is collections.abc.Callable:
            args[name] = lambda: ()
        else:
            raise TypeError(f"cannot make a {cls.__qualname__}: what is its {name}: {hint}?")
    return cls(**args)


def _families(
    obj: object, registry: CollectorRegistry
) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(name, type, label names) of each metric family ``obj`` registered or collects.
    prometheus_client keeps label names private (``_labelnames``), and collects a
    labelled metric with no child yet without them: they are read from the objects."""
    wrappers = {
        family.name: tuple(w._labelnames)
        for w in vars(obj).values()
        if isinstance(w, MetricWrapperBase)
        for family in w.describe()
    }
    registries = [registry]
    own = getattr(obj, "registry", None)
    if isinstance(own, CollectorRegistry) and own is not registry:
        registries.append(own)
    families = [f for r in registries for f in r.collect()]
    collect = getattr(obj, "collect", None)  # a collector of its own (the replica's copies)
    if callable(collect) and not isinstance(obj, CollectorRegistry):
        families += list(collect())
    for family in families:
        # A family a collector builds knows its labels; one a wrapper (Counter, ...)
        # collects does not, and the wrapper does.
        labels = getattr(family, "_labelnames", None)
        if labels is None:
            labels = wrappers.get(family.name)
        if labels is None:
            raise LookupError(f"the labels of {family.name} are not known")
        yield family.name, family.type, tuple(labels)


def _sources() -> Iterator[type]:
    """Each class a metrics module defines, and the other sources."""
    for path in sorted(SERVICES.glob("*/metrics.py")):
        module = importlib.import_module(f"services.{path.parent.name}.metrics")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                yield cls
    for source in MORE_SOURCES:
        name, _, attr = source.partition(":")
        yield getattr(importlib.import_module(name), attr)


def exported() -> dict[str, frozenset[str]]:
    """Every sample name the services export, with its label names (``le`` included for
    a histogram's buckets)."""
    series: dict[str, frozenset[str]] = {}
    for cls in _sources():
        registry = CollectorRegistry()
        obj = _constructed(cls, registry)
        for name, kind, labels in _families(obj, registry):
            for suffix in SUFFIXES[kind]:
                extra = {"le"} if suffix == "_bucket" else set()
                series[name + suffix] = frozenset(labels) | extra
    return series


def catalogue(records: Mapping[str, str] | None = None) -> dict[str, frozenset[str]]:
    """The series an expression may read: the services', the external ones, and those
    the ``records`` (recording rule name -> its expression) make. A recorded series may
    carry any label its expression's series carry."""
    known = {**exported(), **EXTERNAL}
    for name, expr in (records or {}).items():
        labels = set(TARGET_LABELS)
        for metric in metric_names(expr):
            labels |= known.get(metric, frozenset())
        known[name] = frozenset(labels - {"le"})
    return known


# -- what an expression reads --------------------------------------------------------------


def _bare(expr: str) -> str:
    if "__name__" in expr:
        raise ValueError(f"name the metric, not __name__: {expr}")
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads."""
    text = _MATCHERS.sub(" ", _bare(expr))
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    names = set()
    for m in _IDENTIFIER.finditer(text):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in KEYWORDS or word.lower() in ("inf", "nan"):
            continue
        names.add(word)
    return names


def function_names(expr: str) -> set[str]:
    """The functions and aggregations ``expr`` calls."""
    text = _VARIABLE.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _bare(expr))))
    text = _GROUPING.sub(" ", text)
    return {
        m.group(1)
        for m in _IDENTIFIER.finditer(text)
        if m.group(2) and m.group(1).lower() not in KEYWORDS
    }


def label_names(expr: str) -> set[str]:
    """The label names ``expr`` matches on or groups by."""
    text = _bare(expr)
    labels = {
        m.group(1) for block in _MATCHERS.findall(text) for m in _MATCHER_LABEL.finditer(block)
    }
    for m in _GROUPING.finditer(_MATCHERS.sub(" ", text)):
        labels |= {label.strip() for label in m.group(1).split(",") if label.strip()}
    return labels


def legend_labels(legend: str) -> set[str]:
    return set(_LEGEND_LABEL.findall(legend))


@dataclass(frozen=True)
class Problem:
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def problems(
    where: str, expr: str, known: Mapping[str, frozenset[str]], legend: str = ""
) -> list[Problem]:
    """What in ``expr`` (and the legend drawn from it) names a metric, a function or a
    label that does not exist: a label must be one of the target's or of a series the
    expression reads."""
    found = []
    names = metric_names(expr)
    if not names:
        found.append(Problem(where, f"reads no metric: {expr}"))
    found += [Problem(where, f"no such metric: {n}") for n in sorted(names - known.keys())]
    found += [
        Problem(where, f"no such function: {f}") for f in sorted(function_names(expr) - FUNCTIONS)
    ]
    allowed = set(TARGET_LABELS)
    for n in names & known.keys():
        allowed |= known[n]
    used = label_names(expr) | legend_labels(legend)
    found += [Problem(where, f"no such label: {label}") for label in sorted(used - allowed)]
    return found


def all_problems(
    exprs: Iterable[tuple[str, str, str]], known: Mapping[str, frozenset[str]]
) -> list[str]:
    """Each problem of each (where, expr, legend), as a line."""
    return [str(p) for where, expr, legend in exprs for p in problems(where, expr, known, legend)]
