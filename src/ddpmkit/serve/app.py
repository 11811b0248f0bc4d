"""The Gradio page of `ddpmkit serve` and its server: a thin layout over the plain functions of
`serve.requests`, `serve.generate`, `serve.forward` and `serve.runs`.

Tabs: Generate (the reverse process streamed, then the grid and its files), Forward process,
Compare, Run. Every sampling event goes through Gradio's queue under one concurrency limit (the
"sampling" id) with a bounded queue; a bad value comes back as a message in the tab and the server
goes on. The page accepts no files (uploads are capped at 1 byte) and Gradio's analytics are off.
"""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path

import gradio as gr

from ddpmkit.core.samplers import SAMPLERS, sampler_options
from ddpmkit.core.schedules import SPACINGS
from ddpmkit.errors import DdpmkitError, either
from ddpmkit.run.config import OPTION_CHOICES
from ddpmkit.serve import forward, generate, requests
from ddpmkit.serve.runs import ServedRun
from ddpmkit.serve.settings import Limits, Settings, exposure_warning

# system fonts only: the page loads nothing from outside this server
THEME = gr.themes.Default(
    font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "Consolas", "monospace")
)
LATEX = [{"left": "$$", "right": "$$", "display": True}]
COMPARE_ROWS = requests.COMPARE_MAX
GUIDANCE_MAX = 10.0
# Whole numbers are Number(step=1), not precision=0 (which rounds 2.5 silently): the page refuses 2.5.


def message(error: Exception) -> str:
    return f"**Cannot do that:** {error}"


def serve(runs: dict[str, ServedRun], settings: Settings, cache_dir: Path) -> None:
    """Serve the page until Ctrl-C or SIGTERM."""
    warning = exposure_warning(settings.host)
    if warning:
        print(f"ddpmkit serve: warning: {warning}", file=sys.stderr, flush=True)
    page = build_page(runs, settings, cache_dir)
    page.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    _, url, _ = page.launch(
        server_name=settings.host,
        server_port=settings.port,
        prevent_thread_lock=True,
        share=False,
        inbrowser=False,
        quiet=True,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        footer_links=["api"],
        run_history=False,
        enable_monitoring=False,
        max_file_size=1,
        theme=THEME,
    )
    print(f"ddpmkit serve: {', '.join(runs)} on {url} (Ctrl-C stops)", flush=True)
    for signum in (signal.SIGINT, signal.SIGTERM):  # both stop it (a background job may ignore SIGINT)
        signal.signal(signum, _interrupt)
    page.block_thread()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _run(runs: dict[str, ServedRun], name) -> ServedRun:
    if name not in runs:
        raise DdpmkitError(f"unknown run {name!r}; this server shows {either(runs)}")
    return runs[name]


# ---- the page ---------------------------------------------------------------------------------


def build_page(runs: dict[str, ServedRun], settings: Settings, cache_dir: Path) -> gr.Blocks:
    first, limits = next(iter(runs.values())), settings.limits
    options = requests.option_names()
    with gr.Blocks(analytics_enabled=False, title="ddpmkit serve", delete_cache=(300, 1800)) as page:
        gr.Markdown("## ddpmkit serve")
        run_menu = _menu(list(runs), first.name, "run", visible=len(runs) > 1, elem_id="run")
        with gr.Tabs():
            with gr.Tab("Generate"):
                g = _generate_tab(first, limits, options)
            with gr.Tab("Forward process"):
                f = _forward_tab(first, max(run.T for run in runs.values()))
            with gr.Tab("Compare"):
                c = _compare_tab(first, limits)
            with gr.Tab("Run"):
                r = _run_tab(first)

        def on_generate(run_name, class_choice, guidance, sampler, steps, spacing, seed, n, *option_values):
            try:
                run = _run(runs, run_name)
                request = requests.generate_request(
                    run,
                    class_choice,
                    guidance,
                    sampler,
                    steps,
                    spacing,
                    seed,
                    n,
                    dict(zip(options, option_values)),
                    limits,
                )
                yield {g["status"]: f"sampling {request.n} images", g["grid"]: None, g["info"]: ""} | {
                    g[key]: None for key in ("png", "gif", "npz")
                }
                for update in generate.stream(run, request, limits):
                    if isinstance(update, generate.Frame):
                        steps_text = f"step {update.i + 1} of {request.settings.steps} (t = {update.t})"
                        yield {g["live"]: update.picture, g["status"]: steps_text}
                    else:
                        png, gif, npz = generate.downloads(run, update, cache_dir / "downloads")
                        yield {
                            g["grid"]: update.grid,
                            g["info"]: generate.describe(update),
                            g["png"]: str(png),
                            g["gif"]: str(gif),
                            g["npz"]: str(npz),
                            g["status"]: "",
                        }
            except Exception as e:
                yield {g["status"]: _report(e)}

        def on_compare(run_name, class_choice, guidance, seed, n, *rows):
            try:
                run = _run(runs, run_name)
                chosen = [rows[k : k + 4] for k in range(0, len(rows), 4)]
                batch = requests.compare_requests(run, class_choice, guidance, seed, n, chosen, limits)
                for results in generate.compare(run, batch):
                    gallery = [(result.grid, generate.describe(result)) for result in results]
                    done = len(results) == len(batch)
                    yield gallery, _compare_table(results), "" if done else f"{len(results)} of {len(batch)} done"
            except Exception as e:
                yield gr.skip(), gr.skip(), _report(e)

        def on_forward(run_name, example, t):
            try:
                picture, text = forward.forward_view(_run(runs, run_name), example, t)
                return picture, text, ""
            except Exception as e:
                return gr.skip(), gr.skip(), _report(e)

        def on_run_info(run_name):
            try:
                return _run_info(_run(runs, run_name))
            except Exception as e:
                return gr.skip(), gr.skip(), gr.skip(), _report(e)

        def on_select_run(run_name):
            if run_name not in runs:
                return [gr.skip()] * 8
            return _run_controls(runs[run_name])

        generate_inputs = [run_menu, g["class"], g["guidance"], g["sampler"], g["steps"], g["spacing"], g["seed"]]
        generate_inputs += [g["n"], *(g["options"][name] for name in options)]
        g_outputs = [g[key] for key in ("live", "grid", "info", "png", "gif", "npz", "status")]
        g["go"].click(on_generate, generate_inputs, g_outputs, api_name="generate", concurrency_id="sampling")
        compare_inputs = [run_menu, c["class"], c["guidance"], c["seed"], c["n"], *c["rows"]]
        c["go"].click(
            on_compare,
            compare_inputs,
            [c["gallery"], c["table"], c["status"]],
            api_name="compare",
            concurrency_id="sampling",
        )
        gr.on(
            [f["t"].change, f["example"].change],
            on_forward,
            [run_menu, f["example"], f["t"]],
            [f["picture"], f["text"], f["status"]],
            api_name="forward",
        )
        if options:  # each sampler shows its own options
            g["sampler"].change(
                lambda sampler: [gr.update(visible=name in sampler_options(sampler)) for name in options],
                g["sampler"],
                [g["options"][name] for name in options],
                api_name="sampler_options",
            )
        run_menu.change(on_run_info, run_menu, [r["title"], r["loss"], r["eval"], r["config"]], api_name="run_info")
        run_menu.change(
            on_select_run,
            run_menu,
            [g["class"], g["guidance"], g["steps"], c["class"], c["guidance"], f["example"], f["t"], f["status"]],
            api_name="select_run",
        )
    return page


def _report(error: Exception) -> str:
    """The message for the page; an unexpected error is also printed on the server's console."""
    if not isinstance(error, DdpmkitError):
        traceback.print_exception(error, file=sys.stderr)
        return message(f"{type(error).__name__}: {error}")
    return message(error)


def _menu(choices: list, value, label: str, **kwargs) -> gr.Dropdown:
    """A dropdown whose value the page checks itself: one outside the menu gets the page's message."""
    return gr.Dropdown(choices, value=value, label=label, allow_custom_value=True, **kwargs)


def _class_menu(run: ServedRun, elem_id: str) -> gr.Dropdown:
    choices = requests.class_choices(run.config)
    return _menu(choices, choices[0], "class", elem_id=elem_id)


def _guidance(run: ServedRun) -> gr.Slider:
    return gr.Slider(
        0.0,
        GUIDANCE_MAX,
        value=run.config.sample.guidance,
        step=0.5,
        label="guidance",
        info="classifier-free guidance weight: 1 = the plain conditional model, more follows the class more closely",
        interactive=requests.guidance_allowed(run.config),
    )


def _generate_tab(run: ServedRun, limits: Limits, options: list[str]) -> dict:
    s, c = run.config.sample, {}
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            c["class"] = _class_menu(run, "class")
            c["guidance"] = _guidance(run)
            c["sampler"] = _menu(list(SAMPLERS), s.sampler, "sampler", elem_id="sampler")
            c["steps"] = gr.Number(min(s.steps, run.T), step=1, label=_steps_label(run), elem_id="steps")
            c["spacing"] = _menu(list(SPACINGS), s.spacing, "step spacing")
            c["options"] = {name: _option_control(name, s) for name in options}
            c["seed"] = gr.Number(0, step=1, label="seed", elem_id="seed")
            c["n"] = gr.Number(min(16, limits.max_images), step=1, label=f"images (1 to {limits.max_images})")
            c["go"] = gr.Button("Generate", variant="primary", elem_id="generate")
            c["status"] = gr.Markdown(elem_id="generate-status")
        with gr.Column(scale=2):
            gr.Markdown("**The reverse process** as it runs: the iterate x_t and the model's estimate x0_hat")
            c["live"] = gr.Image(show_label=False, type="pil", format="png", height=360, elem_id="live")
            gr.Markdown("**The samples** x_0")
            c["grid"] = gr.Image(show_label=False, type="pil", format="png", height=360, elem_id="grid")
            c["info"] = gr.Markdown(elem_id="generate-info")
            with gr.Row():
                c["png"] = gr.DownloadButton("grid (PNG)", size="sm")
                c["gif"] = gr.DownloadButton("animation (GIF)", size="sm")
                c["npz"] = gr.DownloadButton("arrays (NPZ)", size="sm")
    return c


def _steps_label(run: ServedRun) -> str:
    return f"steps (1 to T = {run.T})"


def _option_control(name: str, defaults):
    """A control for the sampler option `name`, by its SampleConfig field's type; shown for its samplers."""
    value, takers = getattr(defaults, name), requests.samplers_taking(name)
    (kind, optional), label = requests.option_type(name), f"{name} ({', '.join(takers)})"
    shown = {"label": label + (" (empty: none)" if optional else ""), "visible": defaults.sampler in takers}
    if kind is bool:
        return gr.Checkbox(value, **shown)
    if name in OPTION_CHOICES:
        return _menu(list(OPTION_CHOICES[name]), value, **shown)
    if kind in (int, float):
        return gr.Number(value, step=1 if kind is int else 0.1, **shown)
    return gr.Textbox("" if value is None else str(value), **shown)


def _forward_tab(run: ServedRun, T_max: int) -> dict:
    """(T_max: the largest T of the runs; Gradio refuses a slider value above the maximum it was built with.)"""
    c, names = {}, run.examples.names if run.examples else []
    t = run.T // 4
    gr.Markdown(
        "The forward process adds Gaussian noise to a training image: "
        "$$q(x_t \\mid x_0) = \\mathcal{N}(\\sqrt{\\bar\\alpha_t}\\, x_0,\\ (1 - \\bar\\alpha_t) I)$$",
        latex_delimiters=LATEX,
    )
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            c["example"] = _menu(names, names[0] if names else None, "image")
            c["t"] = gr.Slider(0, T_max, value=t, step=1, label="t", elem_id="forward-t")
            c["status"] = gr.Markdown(_examples_message(run))
        with gr.Column(scale=2):
            picture, text = forward.forward_view(run, names[0], t) if names else (None, "")
            c["picture"] = gr.Image(picture, label="x_0 and x_t", type="pil", format="png")
            c["text"] = gr.Markdown(text, latex_delimiters=LATEX)
    return c


def _examples_message(run: ServedRun) -> str:
    return "" if run.examples else message(run.examples_problem)


def _compare_tab(run: ServedRun, limits: Limits) -> dict:
    c, s = {}, run.config.sample
    gr.Markdown("The same seed and class through two to four sampler settings, each with its time and NFE.")
    with gr.Row():
        c["class"] = _class_menu(run, "compare-class")
        c["guidance"] = _guidance(run)
        c["seed"] = gr.Number(0, step=1, label="seed")
        c["n"] = gr.Number(min(8, limits.max_images), step=1, label=f"images (1 to {limits.max_images})")
    samplers = list(SAMPLERS)
    first = samplers.index(s.sampler) if s.sampler in samplers else 0
    c["rows"] = []
    for k in range(COMPARE_ROWS):
        with gr.Row():
            c["rows"] += [
                gr.Checkbox(k < requests.COMPARE_MIN, label=f"setting {k + 1}"),
                _menu(samplers, samplers[(first + k) % len(samplers)], "sampler"),
                gr.Number(min(s.steps, run.T), step=1, label="steps"),
                _menu(list(SPACINGS), s.spacing, "spacing"),
            ]
    c["go"] = gr.Button("Compare", variant="primary")
    c["status"] = gr.Markdown()
    c["gallery"] = gr.Gallery(
        label="results", columns=COMPARE_ROWS, object_fit="contain", height=420, type="pil", format="png"
    )
    c["table"] = gr.Markdown()
    return c


def _compare_table(results: list[generate.Result]) -> str:
    rows = ["| sampler | steps | spacing | time (s) | NFE |", "|---|---|---|---|---|"]
    for result in results:
        s = result.request.settings
        rows.append(f"| {s.sampler} | {s.steps} | {s.spacing} | {result.seconds:.2f} | {result.nfe} |")
    return "\n".join(rows)


def _run_tab(run: ServedRun) -> dict:
    title, loss, table, config = _run_info(run)[:4]
    return {
        "title": gr.Markdown(title),
        "loss": gr.Image(loss, label="training loss", type="pil", format="png"),
        "eval": gr.Markdown(table),
        "config": gr.Code(config, language="json", label="config.json", max_lines=40),
    }


def _run_info(run: ServedRun) -> tuple:
    summary = run.summary
    title = f"**{run.name}**: {summary.steps_trained:,} steps trained; {run.config.data.dataset}, " + (
        f"{run.config.image_size}x{run.config.image_size}, T = {run.T}"
    )
    if summary.eval_name is None:
        table = "No `ddpmkit eval` report in this run yet."
    else:
        table = f"Latest evaluation, `{summary.eval_name}`:\n\n```\n{summary.eval_table}\n```"
    return title, summary.loss_curve, table, summary.config_json


def _run_controls(run: ServedRun) -> list:
    """What changes on the page when another run is chosen."""
    choices, names = requests.class_choices(run.config), run.examples.names if run.examples else []
    guidance = {"interactive": requests.guidance_allowed(run.config), "value": run.config.sample.guidance}
    return [
        gr.update(choices=choices, value=choices[0]),
        gr.update(**guidance),
        gr.update(label=_steps_label(run), value=min(run.config.sample.steps, run.T)),
        gr.update(choices=choices, value=choices[0]),
        gr.update(**guidance),
        gr.update(choices=names, value=names[0] if names else None),
        gr.update(maximum=run.T, value=run.T // 4),
        _examples_message(run),
    ]
