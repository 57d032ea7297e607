"""A small panel: widgets in a box, one Output that shows the Figure of the current widget values.

Legend: none (generic helper for the topic panels of notebooks 01-05).
`Panel(make_figure, controls)` calls make_figure(**values) now and on every change of a control;
it keeps the last Figure in `.figure` and counts renders in `.renders`, so tests can check that
moving a slider re-renders without a running kernel.
"""

from __future__ import annotations

from collections.abc import Callable

__all__: list[str] = []


def figure_png(fig, dpi: int = 100):
    """An IPython Image (PNG) of a Figure: shows in any kernel, whatever matplotlib backend is active."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return Image(data=buf.getvalue(), format="png")


def make_panel(make_figure: Callable, controls: dict, rows: list[list[str]] | None = None):
    """An ipywidgets.VBox of the controls (laid out in `rows` of names) and an Output with the chart.

    Attributes added to the box: controls (dict), output (Output), figure (last Figure),
    renders (int), error (last exception text or None), update() (re-render now).
    """
    import ipywidgets as W
    from IPython.display import clear_output, display

    out = W.Output()
    rows = rows or [list(controls)]
    box = W.VBox([W.HBox([controls[n] for n in row]) for row in rows] + [out])
    box.controls, box.output, box.figure, box.renders, box.error = controls, out, None, 0, None

    def update(change=None):
        values = {n: w.value for n, w in controls.items()}
        with out:
            clear_output(wait=True)
            try:
                fig = make_figure(**values)
            except (ValueError, TypeError) as e:  # a combination the library rejects: say why
                box.error = f"{type(e).__name__}: {e}"
                print(box.error)
                return
            box.error = None
            box.figure = fig
            box.renders += 1
            display(figure_png(fig))

    for w in controls.values():
        w.observe(update, names="value")
    box.update = update
    update()
    return box
