"""Saving a kernel's variables when its session pauses, and restoring them in the next kernel.

The kernel pickles its own user namespace into a file in its working directory (HOME in every
backend's kernels) and the next kernel of the session unpickles it: the host never unpickles
anything a kernel wrote. cloudpickle is used because it pickles what a notebook defines
(functions, lambdas and classes of `__main__`) by value and everything else by the standard
pickle protocol that numpy, pandas and scikit-learn implement; each name is pickled on its
own, so one that cannot be (a lock, a generator, an open socket) is reported by name with the
reason, and the rest are kept. Modules are kept as their names and imported again. Objects
two names shared become two copies.

Both snippets answer through `user_expressions` as a JSON text; the host reads that report
bounded and checked (`parse_report`).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field

#: the file, under the kernel's HOME (its working directory), that holds a paused namespace
STATE_FILE = ".kernelbox/paused-namespace.pkl"
#: the most a report may be; a kernel answering more is not believed
MAX_REPORT_BYTES = 1024**2
#: names (and reasons) reported at most
MAX_NAMES = 1000
MAX_REASON_CHARS = 300

_HELPERS = r"""
def __kernelbox_state_path():
    import os
    return os.path.join(os.environ.get("HOME", "."), @STATE@)

def __kernelbox_names():
    import re
    ip = get_ipython()
    hidden = set(ip.user_ns_hidden)
    cache = re.compile(r"^_(i{1,3}|i?\d+|_*|oh|ih|dh)?$")  # IPython's own history names
    for name, value in list(ip.user_ns.items()):
        if name in hidden or cache.match(name) or name.startswith("__kernelbox"):
            continue
        if name.startswith("__") and name.endswith("__"):
            continue
        yield name, value

def __kernelbox_reason(exc):
    return (type(exc).__name__ + ": " + str(exc))[:@REASON@]

def __kernelbox_cleanup():
    ns = get_ipython().user_ns
    for name in [n for n in ns if n.startswith("__kernelbox")]:
        del ns[name]
"""

SAVE_CODE = (
    _HELPERS
    + r"""
def __kernelbox_pause():
    import json, os, pickle, types
    import cloudpickle
    values, modules, failed = {}, {}, {}
    for name, value in __kernelbox_names():
        if isinstance(value, types.ModuleType):
            modules[name] = value.__name__
            continue
        try:
            values[name] = cloudpickle.dumps(value, protocol=5)
        except BaseException as exc:
            failed[name] = __kernelbox_reason(exc)
    state = {
        "values": values,
        "modules": modules,
        "failed": failed,
        "count": get_ipython().execution_count,
    }
    path = __kernelbox_state_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".part", "wb") as f:
        pickle.dump(state, f, protocol=5)
    os.replace(path + ".part", path)
    __kernelbox_cleanup()
    return json.dumps({"saved": sorted(values) + sorted(modules), "failed": failed})
"""
)

RESTORE_CODE = (
    _HELPERS
    + r"""
def __kernelbox_resume():
    import importlib, json, os, pickle
    path = __kernelbox_state_path()
    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except FileNotFoundError:
        __kernelbox_cleanup()
        return json.dumps({"missing": True})
    ns = get_ipython().user_ns
    restored, failed = [], dict(state.get("failed", {}))
    for name, module in state.get("modules", {}).items():
        try:
            ns[name] = importlib.import_module(module)
            restored.append(name)
        except BaseException as exc:
            failed[name] = __kernelbox_reason(exc)
    for name, blob in state.get("values", {}).items():
        try:
            ns[name] = pickle.loads(blob)
            restored.append(name)
        except BaseException as exc:
            failed[name] = __kernelbox_reason(exc)
    get_ipython().execution_count = max(1, int(state.get("count", 1)))
    os.remove(path)
    __kernelbox_cleanup()
    return json.dumps({"restored": sorted(restored), "failed": failed})
"""
)


def _fill(code: str) -> str:
    return code.replace("@STATE@", repr(STATE_FILE)).replace("@REASON@", str(MAX_REASON_CHARS))


SAVE_CODE = _fill(SAVE_CODE)
RESTORE_CODE = _fill(RESTORE_CODE)


@dataclass
class Report:
    """What a kernel said it saved or restored, and what it could not, with why."""

    names: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    #: the kernel found no saved state at all
    missing: bool = False


class BadReport(ValueError):
    """The kernel's answer is not a report (too big, not JSON, not the expected shape)."""


def parse_report(reply: dict, key: str) -> Report:
    """The report in an execute_reply's user_expressions[key], checked before it is used."""
    content = reply.get("content") if isinstance(reply, dict) else None
    if not isinstance(content, dict) or content.get("status") != "ok":
        raise BadReport("the snippet did not run")
    expression = (content.get("user_expressions") or {}).get(key)
    if not isinstance(expression, dict) or expression.get("status") != "ok":
        error = expression.get("evalue") if isinstance(expression, dict) else None
        raise BadReport(f"the snippet failed: {str(error)[:MAX_REASON_CHARS]}")
    text = (expression.get("data") or {}).get("text/plain")
    if not isinstance(text, str) or len(text) > MAX_REPORT_BYTES:
        raise BadReport("the report is missing or too large")
    try:
        body = json.loads(ast.literal_eval(text))  # the repr of a str: a literal, no code
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise BadReport(f"the report is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadReport("the report is not an object")
    names = body.get("saved", body.get("restored", []))
    failed = body.get("failed", {})
    if not isinstance(names, list) or not isinstance(failed, dict):
        raise BadReport("the report has the wrong shape")
    return Report(
        names=[str(n)[:200] for n in names[:MAX_NAMES]],
        failed={
            str(k)[:200]: str(v)[:MAX_REASON_CHARS] for k, v in list(failed.items())[:MAX_NAMES]
        },
        missing=bool(body.get("missing", False)),
    )
