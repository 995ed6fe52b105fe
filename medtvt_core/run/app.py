"""``medtvt app``: a saved model in the browser (Gradio) and over HTTP (``POST /api/diagnose``).

The page and the API run the one inference of ``medtvt diagnose``
(:func:`~medtvt_core.run.diagnose.diagnose_json`), on a model loaded once. The inputs are
discovered from the model's readers as ``diagnose`` discovers its options: one upload per
modality (several files, or a zip, for a WFDB record), one box per extra option (``lab-id``), and
an editable table of the row for readers with a key column.

Uploads are never kept: every request stages them in its own temporary directory (removed when
it ends) and deletes gradio's cached copies of them; gradio's cache is a directory of this
process (``GRADIO_TEMP_DIR``), swept by ``delete_cache`` and removed at exit. Figures travel
inline (base64), so no output is written to disk either.

gradio is imported only by :func:`serve` (after the cache directory and the offline settings are
in place): it is the optional extra ``medtvt[app]``.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import webbrowser
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ConfigError, MedtvtError
from .diagnose import diagnose_json, load_model_dir
from .uploads import (
    _plt,
    attribution_figure,
    choose_input,
    example_patients,
    gates_figure,
    image_figure,
    public_message,
    signal_figure,
    stage_files,
    table_of_row,
    write_table_row,
)

__all__ = ["AppInputError", "Diagnoser", "serve", "API_PATH"]

log = logging.getLogger("medtvt.app")

#: The HTTP API: multipart form, one file field per modality (repeat it for several files), ``<modality>-<key>``
#: for extras, optional ``question``, ``samples``, ``max_new_tokens``; the answer is ``diagnose --json``'s object.
API_PATH = "/api/diagnose"
# Gradio's cache sweep: every 5 minutes, files older than 10 (uploads a page made but never submitted).
DELETE_CACHE = (300, 600)


class AppInputError(Exception):
    """A problem with what the user gave (shown in the page, HTTP 400 from the API)."""


class Diagnoser:
    """A loaded model and the one inference path of the page and the API (one request at a time)."""

    def __init__(self, model_dir: Path, *, run_dir: Path | None = None, samples: int = 8,
                 max_new_tokens: int | None = None):
        self.model_dir = Path(model_dir)
        self.model, self.processor = load_model_dir(self.model_dir)
        self.modalities: list[str] = list(self.model.modalities)
        self.readers = {m: self.processor.readers[m] for m in self.modalities}
        self.samples, self.max_new_tokens = samples, max_new_tokens
        self.examples = example_patients(run_dir, self.model, self.processor)
        _plt()  # matplotlib's import is seconds: paid at start, not by the first patient
        self._lock = threading.Lock()  # one generation at a time: the model is shared and CPU-bound

    def extras(self, m: str) -> dict[str, str]:
        """Extra options of modality ``m``: key -> help (``{"id": ...}`` for the labs row)."""
        return dict(getattr(type(self.readers[m]), "cli_extras", {}))

    def help(self, m: str) -> str:
        return getattr(type(self.readers[m]), "cli_help", "") or f"{m} file(s)"

    def has_table(self, m: str) -> bool:
        return getattr(getattr(self.readers[m], "config", None), "key_column", None) is not None

    def previewable(self, m: str) -> bool:
        return len(tuple(self.readers[m].sample_shape)) in (2, 3)

    # ------------------------------------------------------------------ the one inference path
    def run(self, uploads: Mapping[str, Sequence[tuple[str, Path]]], extras: Mapping[str, Mapping[str, str]],
            tables: Mapping[str, tuple[str, Sequence[Sequence[Any]]]] | None = None, *, question: str | None = None,
            samples: int | None = None, max_new_tokens: int | None = None,
            progress: Callable[[float, str], None] | None = None, figures: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(diagnose --json object, figures)`` of one patient. ``uploads``: modality -> ``(name, path)``;
        ``tables``: modality -> ``(file name, [[column, value], ...])`` used instead of that modality's file."""
        unknown = sorted(set(uploads) - set(self.modalities))
        if unknown:
            raise AppInputError(f"{unknown[0]}: the model has no such modality (modalities: {', '.join(self.modalities)})")
        tables = tables or {}
        with tempfile.TemporaryDirectory(prefix="medtvt-request-") as tmp:
            try:
                given: dict[str, tuple[str, dict[str, str]]] = {}
                for m in self.modalities:
                    reader, files = self.readers[m], list(uploads.get(m) or [])
                    ex = {k: str(v).strip() for k, v in (extras.get(m) or {}).items() if v is not None and str(v).strip()}
                    bad = sorted(set(ex) - set(self.extras(m)))
                    if bad:
                        raise AppInputError(f"{m}-{bad[0]}: no such option (allowed: "
                                            f"{', '.join(f'{m}-{k}' for k in self.extras(m)) or 'none'})")
                    d = Path(tmp) / m
                    if m in tables and tables[m][1]:
                        d.mkdir()
                        name, rows = tables[m]
                        path = d / (Path(name).name or f"{m}.csv")
                        key = write_table_row(reader, [], rows, path)
                        if len(self.extras(m)) == 1:
                            ex = {next(iter(self.extras(m))): key}
                        given[m] = (str(path), ex)
                    elif files:
                        given[m] = (choose_input(reader, stage_files(m, files, d), ex), ex)
                    elif ex:
                        raise AppInputError(f"{m}-{next(iter(ex))} needs {m} file(s)")
                if not given:
                    raise AppInputError("give at least one input: " + ", ".join(self.modalities))
                with self._lock:
                    read = self.processor.read_patient(given, question, modalities=self.model.modalities)
                    figs = self._figures(read) if figures else {}
                    res = diagnose_json(self.model_dir, self.model, self.processor, given, question=question,
                                        max_new_tokens=max_new_tokens or self.max_new_tokens,
                                        samples=self.samples if samples is None else samples, progress=progress,
                                        batch=read)
            except MedtvtError as exc:
                raise AppInputError(public_message(str(exc), [Path(tmp) / m for m in self.modalities] + [Path(tmp)])) from None
        return res, figs

    def _figures(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for m, x in batch["modality_inputs"].items():
            cfg = getattr(self.readers[m], "config", None)
            if x[0].dim() == 2:
                out[m] = signal_figure(x[0], getattr(cfg, "leads", None), getattr(cfg, "target_fs", None),
                                       f"{m}: the {x.shape[1]} channels the encoder reads")
            elif x[0].dim() == 3 and x.shape[1] in (1, 3):
                out[m] = image_figure(x[0].expand(3, -1, -1), getattr(cfg, "mean", None), getattr(cfg, "std", None),
                                      f"{m}: {x.shape[2]}x{x.shape[3]} after the reader's transforms")
        return out

    def table(self, m: str, files: Sequence[tuple[str, Path]], key: str | None) -> list[list[str]]:
        """The ``[[column, value], ...]`` of the row ``key`` of an uploaded table file (validated by the reader)."""
        with tempfile.TemporaryDirectory(prefix="medtvt-request-") as tmp:
            try:
                staged = stage_files(m, files, Path(tmp) / m)
                if len(staged) != 1:
                    raise AppInputError(f"{m}: {len(staged)} files; allowed: one table file")
                return table_of_row(self.readers[m], staged[0], key or None)[1]
            except MedtvtError as exc:
                raise AppInputError(public_message(str(exc), [Path(tmp) / m, Path(tmp)])) from None


# ---------------------------------------------------------------------- gradio page
def _forget(paths: Sequence[str]) -> None:
    """Delete gradio's cached copies of uploads (each sits in a folder of its own, named by its hash)."""
    cache = Path(os.environ["GRADIO_TEMP_DIR"]).resolve()
    for p in paths:
        p = Path(p).resolve()
        if cache in p.parents:
            p.unlink(missing_ok=True)
            if p.parent != cache and not any(p.parent.iterdir()):
                p.parent.rmdir()


def _paths(value: Any) -> list[str]:
    if not value:
        return []
    return [str(getattr(v, "name", v)) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _rows(value: Any) -> list[list[Any]]:
    if value is None:
        return []
    rows = value.values.tolist() if hasattr(value, "values") else list(value)
    return [list(r) for r in rows if len(r) >= 2 and str(r[0]).strip()]


def _diseases_text(res: Mapping[str, Any]) -> str:
    d = res.get("diseases")
    return "; ".join(d) if d else "(none)" if d is not None else "(no <answer> block)"


def build_blocks(svc: Diagnoser) -> Any:
    """The page: inputs per modality, the report, the disease set and the figures."""
    import gradio as gr

    files, boxes, tables = {}, {}, {}
    with gr.Blocks(title="medtvt", delete_cache=DELETE_CACHE, analytics_enabled=False) as page:
        gr.Markdown(f"## medtvt: one patient\nModel `{svc.model_dir}` (modalities: {', '.join(svc.modalities)}). "
                    "Give any subset of the inputs. Uploads are deleted when the diagnosis ends.")
        with gr.Row():
            with gr.Column(scale=1):
                for m in svc.modalities:
                    files[m] = gr.File(label=f"{m}: {svc.help(m)} (several files, or a .zip)", file_count="multiple",
                                       elem_id=f"in-{m}")
                    for key, helptext in svc.extras(m).items():
                        boxes[(m, key)] = gr.Textbox(label=f"{m}-{key}: {helptext}", elem_id=f"in-{m}-{key}", max_lines=1)
                    if svc.has_table(m):
                        tables[m] = gr.Dataframe(headers=["column", "value"], label=f"{m}: the row given (editable; the {m} input while it holds a row, Clear empties it)",
                                                 interactive=True, static_columns=[0], elem_id=f"table-{m}",
                                                 max_height=260, row_count=0)
                with gr.Accordion("Options", open=False):
                    question = gr.Textbox(label="Question (default: the model's)", value=svc.processor.default_question or "",
                                          lines=3, elem_id="question")
                    samples = gr.Slider(0, 32, value=svc.samples, step=1, elem_id="samples",
                                        label="Sampled reports per condition for the attribution (0: none)")
                example = None
                if svc.examples:
                    example = gr.Dropdown([e["id"] for e in svc.examples], value=None, elem_id="example",
                                          label="Example patient (the model's test split)")
                with gr.Row():
                    run = gr.Button("Diagnose", variant="primary", elem_id="run")
                    clear = gr.ClearButton(value="Clear")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                report = gr.Textbox(label="Report (reasoning and answer)", lines=8, elem_id="report")
                diseases = gr.Textbox(label="Disease set", elem_id="diseases")
                attribution = gr.Plot(label="Modality attribution per disease", elem_id="attribution")
                gates = gr.Plot(label="CAO gates (fusion weight per modality)", elem_id="gates")
                views = {m: gr.Plot(label=f"{m} as the model sees it", elem_id=f"view-{m}")
                         for m in svc.modalities if svc.previewable(m)}
                with gr.Accordion("JSON (as medtvt diagnose --json and POST " + API_PATH + ")", open=False):
                    as_json = gr.JSON(elem_id="json")
        clear.add([*files.values(), *boxes.values(), *tables.values(), message, report, diseases, attribution,
                   gates, *views.values(), as_json])

        mods, keys = list(files), list(boxes)
        table_mods = list(tables)
        outputs = [message, report, diseases, attribution, gates, *views.values(), as_json, *files.values()]

        def diagnose(*args: Any, progress: Any = gr.Progress()) -> list[Any]:
            it = iter(args)
            f_vals = {m: next(it) for m in mods}
            b_vals = {k: next(it) for k in keys}
            t_vals = {m: next(it) for m in table_mods}
            q, n = next(it), next(it)
            uploads = {m: [(Path(p).name, Path(p)) for p in _paths(v)] for m, v in f_vals.items()}
            extras: dict[str, dict[str, str]] = {}
            for (m, k), v in b_vals.items():
                extras.setdefault(m, {})[k] = v
            tbl = {}
            for m, v in t_vals.items():
                rows = _rows(v)
                if rows:
                    tbl[m] = (uploads[m][0][0] if len(uploads.get(m) or []) == 1 else f"{m}.csv", rows)
            cleared = [None] * len(mods)  # the uploads are gone after this request: so are they from the page
            empty = [None] * (4 + len(views) + 1)
            try:
                res, figs = svc.run(uploads, extras, tbl, question=q.strip() or None, samples=int(n),
                                    progress=lambda f, d: progress(f, desc=d), figures=True)
            except AppInputError as exc:
                return [f"**Error:** {exc}", *empty, *cleared]
            except Exception as exc:  # never a stack trace in the page; the log has it
                log.exception("medtvt app: request failed")
                return [f"**Error:** internal error ({type(exc).__name__}: {exc}); see the server log", *empty, *cleared]
            finally:
                _forget([p for v in f_vals.values() for p in _paths(v)])
            return ["", res["report"], _diseases_text(res), attribution_figure(res.get("attribution")),
                    gates_figure(res.get("modality_weights")), *[figs.get(m) for m in views], res, *cleared]

        run.click(diagnose, [*files.values(), *boxes.values(), *tables.values(), question, samples], outputs,
                  api_visibility="private", concurrency_limit=1)

        for m in table_mods:
            key_box = next((boxes[(m, k)] for k in svc.extras(m)), None)

            def fill(value: Any, key: str | None = None, m: str = m) -> list[Any]:
                paths = _paths(value)
                if not paths:
                    return [gr.update(), gr.update()]  # cleared after a request: the table stays (it is the page's)
                try:
                    rows = svc.table(m, [(Path(p).name, Path(p)) for p in paths], key)
                except AppInputError as exc:
                    return [f"**Error:** {exc}", gr.update()]
                return ["", rows]

            ins = [files[m]] + ([key_box] if key_box is not None else [])
            files[m].upload(fill, ins, [message, tables[m]], api_visibility="private")
            if key_box is not None:
                key_box.submit(fill, ins, [message, tables[m]], api_visibility="private")
                key_box.blur(fill, ins, [message, tables[m]], api_visibility="private")

        if example is not None:
            ex_dir = Path(os.environ["GRADIO_TEMP_DIR"]) / "examples"

            def load_example(eid: str) -> list[Any]:
                # copies in this process's cache: the page gets the files without exposing the data root
                shutil.rmtree(ex_dir, ignore_errors=True)
                e = next((e for e in svc.examples if e["id"] == eid), None)
                vals_f, vals_b = {m: None for m in mods}, {k: "" for k in keys}
                for m, (paths, ex) in (e["inputs"].items() if e else []):
                    d = ex_dir / m
                    d.mkdir(parents=True, exist_ok=True)
                    vals_f[m] = [str(shutil.copy(p, d / Path(p).name)) for p in paths]
                    for k, v in ex.items():
                        vals_b[(m, k)] = v
                rows = []
                for m in table_mods:
                    try:
                        files_m = [(Path(p).name, Path(p)) for p in vals_f[m] or []]
                        rows.append(svc.table(m, files_m, vals_b.get((m, next(iter(svc.extras(m)), "")))) if files_m else None)
                    except AppInputError:
                        rows.append(None)
                return [*vals_f.values(), *vals_b.values(), *rows]

            example.change(load_example, [example], [*files.values(), *boxes.values(), *tables.values()],
                           api_visibility="private")
    return page


# ---------------------------------------------------------------------- HTTP API and server
def _api(svc: Diagnoser) -> Any:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile

    api = FastAPI(title="medtvt", docs_url=None, redoc_url=None, openapi_url=None)

    @api.get("/api/info")
    def info() -> dict[str, Any]:
        """The model and its inputs: form fields of POST /api/diagnose."""
        return {"model": str(svc.model_dir), "modalities": svc.modalities,
                "extras": {m: [f"{m}-{k}" for k in svc.extras(m)] for m in svc.modalities},
                "options": ["question", "samples", "max_new_tokens"], "samples_default": svc.samples}

    async def diagnose(request: Request) -> Any:
        form = await request.form()  # starlette spools uploads to temporary files, closed below
        try:
            with tempfile.TemporaryDirectory(prefix="medtvt-upload-") as tmp:
                uploads: dict[str, list[tuple[str, Path]]] = {}
                extras: dict[str, dict[str, str]] = {}
                opts: dict[str, str] = {}
                for i, (key, value) in enumerate(form.multi_items()):
                    if isinstance(value, UploadFile):
                        path = Path(tmp) / str(i)
                        with open(path, "wb") as fh:
                            shutil.copyfileobj(value.file, fh)
                        uploads.setdefault(key, []).append((value.filename or key, path))
                    elif key in ("question", "samples", "max_new_tokens"):
                        opts[key] = value
                    elif "-" in key and key.split("-", 1)[0] in svc.modalities:
                        m, k = key.split("-", 1)
                        extras.setdefault(m, {})[k] = value
                    else:
                        raise AppInputError(f"form field {key!r}: unknown; allowed: {', '.join(svc.modalities)} (files), "
                                            "<modality>-<option>, question, samples, max_new_tokens")
                try:
                    n = int(opts["samples"]) if "samples" in opts else None
                    mnt = int(opts["max_new_tokens"]) if "max_new_tokens" in opts else None
                except ValueError:
                    raise AppInputError("samples and max_new_tokens must be integers") from None
                if (n is not None and n < 0) or (mnt is not None and mnt < 1):
                    raise AppInputError("samples must be >= 0 and max_new_tokens >= 1")
                res, _ = await run_in_threadpool(svc.run, uploads, extras, question=opts.get("question") or None,
                                                 samples=n, max_new_tokens=mnt)
            return JSONResponse(res)
        except AppInputError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        finally:
            await form.close()

    # this module's annotations are strings (PEP 563) and Request is no global of it: give FastAPI the class
    diagnose.__annotations__ = {"request": Request}
    api.add_api_route(API_PATH, diagnose, methods=["POST"])
    return api


def serve(model_dir: Path, *, run_dir: Path | None = None, host: str = "127.0.0.1", port: int = 7860,
          samples: int = 8, max_new_tokens: int | None = None, open_browser: bool = False,
          echo: Callable[[str], None] = print) -> None:
    """Load the model, start the page and the API, serve until interrupted."""
    cache = tempfile.mkdtemp(prefix="medtvt-gradio-")
    atexit.register(shutil.rmtree, cache, True)
    os.environ["GRADIO_TEMP_DIR"] = cache  # read by gradio at import
    # Nothing phones home: no usage analytics, no version check, no hub telemetry.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
        import uvicorn
    except ModuleNotFoundError as exc:
        raise ConfigError(f"medtvt app needs {exc.name}: pip install 'medtvt[app]'") from None

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # before the model loads
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                              "allowed: a free port of this machine's address") from None
    svc = Diagnoser(model_dir, run_dir=run_dir, samples=samples, max_new_tokens=max_new_tokens)
    api = _api(svc)
    # System fonts: the default theme would fetch Google Fonts from the browser.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    app = gr.mount_gradio_app(api, build_blocks(svc), path="/", ssr_mode=False, footer_links=[], theme=theme,
                              show_error=False, mcp_server=False, pwa=False)
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    echo(f"medtvt app: {svc.model_dir} on {url} (API: POST {url.rstrip('/')}{API_PATH}); Ctrl-C stops it")
    if open_browser:
        threading.Timer(1.5, webbrowser.open, (url,)).start()
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit through Python so atexit removes the cache
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
