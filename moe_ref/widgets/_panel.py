"""A small panel: widgets in a box, one Output that shows the Figure of the current widget values.

Legend: none (generic helper for the topic panels of notebooks 01-07).
`make_panel(make_figure, controls)` calls make_figure(**values) now and on every change of a control;
it keeps the last Figure in `.figure` and counts renders in `.renders`, so tests can check that
moving a slider re-renders without a running kernel; the Output's `outputs` hold exactly what a
browser shows (one PNG, or the library's error message).

Inside a kernel, the first Figure is also displayed once as a plain PNG output of the cell (`show_static`),
before the panel: the HTML of an executed notebook (`make tour`, nbconvert) then shows a chart even where
the widget JavaScript cannot load (offline, or any static render), and the live panel below redraws it.
"""

from __future__ import annotations

from collections.abc import Callable

__all__: list[str] = []


def png_output(fig, dpi: int = 100) -> dict:
    """One nbformat display_data output holding fig as a PNG (what an Output widget's `outputs` holds)."""
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return {"output_type": "display_data", "data": {"image/png": png, "text/plain": "<Figure>"}, "metadata": {}}


def show_static(fig, caption: str = "static first figure; the panel below redraws it") -> bool:
    """Display fig as one PNG output of the running cell; False (and nothing shown) outside a kernel."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False
    bundle = png_output(fig)["data"]
    display({"image/png": bundle["image/png"], "text/plain": f"<Figure: {caption}>"}, raw=True)
    return True


def make_panel(make_figure: Callable, controls: dict, rows: list[list[str]] | None = None, static: bool = True):
    """An ipywidgets.VBox of the controls (laid out in `rows` of names) and an Output with the chart.

    Attributes added to the box: controls (dict), output (Output), figure (last Figure),
    renders (int), error (last exception text or None), update() (re-render now).
    static: also display the first Figure as a plain PNG of the cell (`show_static`; only inside a kernel).
    The chart is put in by setting `Output.outputs` in one step, never by capturing display() inside
    `with out:`: under capture, headless runners (nbclient: nbmake, nbconvert) answer on the kernel's shell
    channel while they wait there for the cell's reply, a race that can hang the run (it did, in CI).
    """
    import ipywidgets as W

    out = W.Output()
    rows = rows or [list(controls)]
    box = W.VBox([W.HBox([controls[n] for n in row]) for row in rows] + [out])
    box.controls, box.output, box.figure, box.renders, box.error = controls, out, None, 0, None

    def update(change=None):
        values = {n: w.value for n, w in controls.items()}
        try:
            fig = make_figure(**values)
        except (ValueError, TypeError) as e:  # a combination the library rejects: say why
            box.error = f"{type(e).__name__}: {e}"
            out.outputs = ({"output_type": "stream", "name": "stdout", "text": box.error + "\n"},)
            return
        box.error = None
        box.figure = fig
        box.renders += 1
        out.outputs = (png_output(fig),)

    for w in controls.values():
        w.observe(update, names="value")
    box.update = update
    update()
    if static and box.figure is not None:
        show_static(box.figure)
    return box
