"""Generate docs/api.md from the docstrings: `python -m moe_ref.apidoc > docs/api.md`.

Documents every public name: moe_ref.__all__ and the public names of moe_ref.hf, moe_ref.parallel,
moe_ref.kernels, moe_ref.experiments, moe_ref.plots, moe_ref.widgets and moe_ref.tiny (their __all__; a module
that does not exist yet is left out). tests/test_docs.py fails when a public name is missing from docs/api.md.
The output is deterministic (no dates, no addresses), so regenerating an unchanged tree changes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys

# documented modules, in reading order, with a one-line description
MODULES = {
    "moe_ref": "the library: configuration, router, reference, grouping, permutation, capacity, layer, stats",
    "moe_ref.hf": "Hugging Face transformers interop (needs the `hf` extra; imported on demand)",
    "moe_ref.parallel": "expert parallelism over torch.distributed",
    "moe_ref.kernels": "Triton kernels (needs triton)",
    "moe_ref.experiments": "experiment drivers of the notebooks: sweeps and timings returning rows for the plots",
    "moe_ref.plots": "pure plotting functions: data in, matplotlib Figure out",
    "moe_ref.widgets": "ipywidgets panels over the plotting functions",
    "moe_ref.tiny": "the trained tiny MoE language model: checkpoint, byte codec, routing traces, quality cost",
}


def load(module: str):
    """The module, or None when it does not exist (yet); other import errors propagate."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise


def public_names(mod) -> list[str]:
    """The module's __all__, or its public functions and classes defined in it when it has none."""
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, v in vars(mod).items() if not n.startswith("_") and (inspect.isfunction(v) or
                 inspect.isclass(v)) and getattr(v, "__module__", "").startswith(mod.__name__)]
    return list(names)


def documented() -> dict[str, list[str]]:
    """{module: [public names]} for every documented module that exists here."""
    out = {}
    for m in MODULES:
        mod = load(m)
        if mod is not None:
            out[m] = public_names(mod)
    return out


def _clean(text: str) -> str:
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text)


def _signature(obj) -> str:
    target = getattr(obj, "fn", obj) if not inspect.isclass(obj) and not inspect.isfunction(obj) else obj
    try:
        return _clean(str(inspect.signature(target)))
    except (TypeError, ValueError):
        return "(...)"


def _doc(obj) -> str:
    """The docstring as markdown: its first line as a paragraph, the rest verbatim in a text block."""
    doc = inspect.getdoc(obj)
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc and doc.startswith(obj.__name__ + "("):
        doc = None  # the auto-generated dataclass signature is not documentation
    if not doc:
        return "*(no docstring)*"
    first, _, rest = doc.strip().partition("\n")
    rest = rest.strip("\n")
    return first + (f"\n\n```text\n{rest}\n```" if rest.strip() else "")


def _members(cls) -> list[str]:
    """One line per public method / property defined on the class itself."""
    lines = []
    for name, v in vars(cls).items():
        if name.startswith("_"):
            continue
        fn = v.__func__ if isinstance(v, (classmethod, staticmethod)) else v
        if isinstance(v, property):
            kind, sig, doc = "property", "", inspect.getdoc(v) or ""
        elif inspect.isfunction(fn):
            kind = "classmethod" if isinstance(v, classmethod) else "method"
            sig, doc = _signature(fn), inspect.cleandoc(fn.__doc__ or "")  # own docstring, not nn.Module's
            sig = re.sub(r"^\((self|cls)(, )?", "(", sig)
        else:
            continue
        first = doc.strip().split("\n")[0] if doc else ""
        lines.append(f"- `{name}{sig}` ({kind}){' — ' + first if first else ''}")
    return lines


def render_name(module: str, name: str, obj) -> str:
    qual = f"{module}.{name}"
    if inspect.isclass(obj):
        head = f"### `{qual}`\n\nclass `{name}{_signature(obj)}`\n\n{_doc(obj)}"
        members = _members(obj)
        return head + ("\n\n" + "\n".join(members) if members else "")
    if callable(obj):
        return f"### `{qual}`\n\n`{name}{_signature(obj)}`\n\n{_doc(obj)}"
    value = _clean(repr(obj))
    value = value if len(value) <= 300 else value[:297] + "..."
    return f"### `{qual}`\n\n{type(obj).__name__} constant: `{value}`"


def render() -> str:
    mods = documented()
    parts = ["# API reference", "",
             "Generated from the docstrings by `python -m moe_ref.apidoc > docs/api.md`; do not edit by hand.",
             "`tests/test_docs.py` fails when a public name is missing here. Shapes use the legend",
             "T tokens, D d_model, F d_ff, E experts, K top-k, C capacity per expert, P ranks.", "",
             "## Contents", ""]
    for m, names in mods.items():
        parts.append(f"- [`{m}`](#{m.replace('.', '')}) — {MODULES[m]} ({len(names)} names)")
    missing = [m for m in MODULES if m not in mods]
    if missing:
        parts += ["", "Not present in this tree: " + ", ".join(f"`{m}`" for m in missing) + "."]
    for m, names in mods.items():
        mod = sys.modules[m]
        parts += ["", f"## {m}", "", MODULES[m] + ".", ""]
        for name in sorted(names, key=str.lower):
            parts += [render_name(m, name, getattr(mod, name)), ""]
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
