"""``medtvt app``: the page driven in headless Chromium (Selenium) and the HTTP API, each checked
against ``medtvt diagnose --json`` run as a separate process on the same patient's files.

The model is a short run of the tiny configuration (the demo preset, shortened) on the shared
cohort; the app process gets its own TMPDIR so that what it leaves behind can be checked.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from test_orchestrator import MEDTVT, _env, medtvt, medtvt_all, ok, one_line_error

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/lib/chromium/chromedriver"
                                                if Path("/usr/lib/chromium/chromedriver").is_file() else None)
SAMPLES = "2"  # sampled reports per condition, the same for the app and diagnose


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_run(tmp_path_factory, tiny_config) -> Path:
    out = tmp_path_factory.mktemp("app") / "run"
    ok(medtvt("run", "--config", tiny_config, "--out", out, "--quiet", "--stages", "sft"))
    return out


@pytest.fixture(scope="module")
def patient(app_run) -> SimpleNamespace:
    """The first test patient's files: the WFDB header and signal file, the radiograph, the labs CSV and row."""
    data = yaml.safe_load((app_run / "config.yaml").read_text())["data"]
    root = Path(data["root"])
    rec = json.loads((root / data["test_file"]).read_text())[0]
    ecg = root / rec["ECG"][0]
    return SimpleNamespace(hea=ecg.with_name(ecg.name + ".hea"), dat=ecg.with_name(ecg.name + ".dat"),
                           cxr=root / rec["image"][0], labs=root / "labs.csv", lab_id=str(rec["lab"][0]))


@pytest.fixture(scope="module")
def server(app_run, patient, tmp_path_factory):
    """``medtvt app`` on a free local port; ``expected`` is ``diagnose --json`` on the patient (run meanwhile)."""
    tmp = tmp_path_factory.mktemp("app-tmp")
    port = _free_port()
    log = (tmp.parent / "app.log").open("w")
    proc = subprocess.Popen([str(MEDTVT), "app", "--run", str(app_run), "--port", str(port), "--samples", SAMPLES],
                            stdout=log, stderr=subprocess.STDOUT, env={**_env(), "TMPDIR": str(tmp)})
    try:
        r = ok(medtvt("diagnose", "--run", app_run, "--ecg", patient.hea, "--cxr", patient.cxr, "--lab", patient.labs,
                      "--lab-id", patient.lab_id, "--samples", SAMPLES, "--json"))
        expected = json.loads(r.stdout)
        url = f"http://127.0.0.1:{port}/"
        import requests

        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"medtvt app exited ({proc.returncode}):\n{(tmp.parent / 'app.log').read_text()}"
            try:
                if requests.get(url + "api/info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() - t0 < 240, "medtvt app did not start in 240 s"
            time.sleep(0.5)
        yield SimpleNamespace(url=url, tmp=tmp, proc=proc, expected=expected, log=tmp.parent / "app.log")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
        log.close()


def _left_behind(tmp: Path, *names: str) -> list[str]:
    """Files under the app's TMPDIR named like an uploaded file."""
    return sorted(str(p) for p in tmp.rglob("*") if p.is_file() and p.name in names)


def _diseases_text(res: dict) -> str:
    """How the page shows ``diagnose --json``'s disease set (restated from the app)."""
    d = res["diseases"]
    return "; ".join(d) if d else "(none)" if d is not None else "(no <answer> block)"


# --------------------------------------------------------------------------- HTTP API
def test_api_answers_as_diagnose_json(server, patient):
    import requests

    files = [("ecg", (patient.hea.name, patient.hea.read_bytes())), ("ecg", (patient.dat.name, patient.dat.read_bytes())),
             ("cxr", (patient.cxr.name, patient.cxr.read_bytes())), ("lab", (patient.labs.name, patient.labs.read_bytes()))]
    r = requests.post(server.url + "api/diagnose", files=files, data={"lab-id": patient.lab_id}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == server.expected  # report, diseases, gates, attribution, question, model: all equal
    assert set(server.expected["modalities_given"]) == {"ecg", "cxr", "lab"}
    # the WFDB record as one zip gives the same answer
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(patient.hea, patient.hea.name)
        z.write(patient.dat, patient.dat.name)
    files[:2] = [("ecg", ("record.zip", buf.getvalue()))]
    r = requests.post(server.url + "api/diagnose", files=files, data={"lab-id": patient.lab_id}, timeout=120)
    assert r.status_code == 200 and r.json() == server.expected, r.text
    assert not _left_behind(server.tmp, patient.hea.name, patient.dat.name, patient.cxr.name, patient.labs.name, "record.zip")


def test_api_bad_inputs_are_400_with_one_line(server, patient):
    import requests

    post = lambda files, data=None: requests.post(server.url + "api/diagnose", files=files, data=data or {}, timeout=60)  # noqa: E731
    jpeg = patient.cxr.read_bytes()
    r = post([("cxr", ("broken.jpg", jpeg[: len(jpeg) // 3]))])  # a cut JPEG
    assert r.status_code == 400 and "broken.jpg" in r.json()["error"] and "JPEG or PNG" in r.json()["error"], r.text
    r = post([("ecg", (patient.dat.name, patient.dat.read_bytes()))])  # the signal file without its header
    assert r.status_code == 400 and f"{patient.hea.name} does not exist" in r.json()["error"], r.text
    r = post([("xray", ("a.jpg", jpeg))])
    assert r.status_code == 400 and "no such modality" in r.json()["error"], r.text
    r = post([("lab", (patient.labs.name, patient.labs.read_bytes()))])  # many rows, no lab-id
    assert r.status_code == 400 and "--lab-id" in r.json()["error"], r.text
    assert all("Traceback" not in x for x in (r.text, server.log.read_text()))


# --------------------------------------------------------------------------- the page, in Chromium
@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver); "
                    f"chromium: {CHROMIUM}, chromedriver: {CHROMEDRIVER}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
              "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2300",
              f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's network requests
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(cond, timeout: float, what: str):
    t0 = time.monotonic()
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() - t0 < timeout, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.25)


def test_page_diagnoses_a_patient_in_chromium(server, patient, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    find = lambda css: d.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
    text_of = lambda elem_id: find(f"#{elem_id} textarea")[0].get_attribute("value")  # noqa: E731
    message = lambda: " ".join(e.text for e in find("#message")).strip()  # noqa: E731
    d.get(server.url)
    _wait(lambda: find("#in-ecg input[type=file]"), 60, "the page")
    assert find("#in-lab-id textarea, #in-lab-id input") and find("#table-lab"), "lab's row id and table are offered"
    assert find("#example input"), "the run's test patients are offered as examples"
    box = find("#in-lab-id textarea, #in-lab-id input")[0]
    box.send_keys(patient.lab_id, Keys.TAB)
    find("#in-ecg input[type=file]")[0].send_keys(f"{patient.hea}\n{patient.dat}")
    find("#in-cxr input[type=file]")[0].send_keys(str(patient.cxr))
    find("#in-lab input[type=file]")[0].send_keys(str(patient.labs))
    # the labs row appears as a table (the page then diagnoses from it)
    _wait(lambda: patient.lab_id in " ".join(e.text for e in find("#table-lab")), 60, "the lab table")
    uploaded = lambda elem, name: find(f'#{elem} td.filename[aria-label="{name}"]')  # noqa: E731
    _wait(lambda: uploaded("in-ecg", patient.dat.name) and uploaded("in-cxr", patient.cxr.name), 30, "the uploads")
    find("#run")[0].click()
    _wait(lambda: text_of("diseases") or message(), 180, "the report")
    assert not message(), message()
    want = server.expected
    assert text_of("diseases") == _diseases_text(want)
    assert text_of("report") == want["report"]
    # the figures: attribution per disease, the gates, the ECG's 12 leads and the radiograph
    for elem in ("attribution", "gates", "view-ecg", "view-cxr"):
        imgs = find(f"#{elem} img")
        assert imgs and imgs[0].is_displayed(), f"#{elem}: no figure shown"
        assert d.execute_script("return arguments[0].naturalWidth", imgs[0]) > 100, elem
    # the page fetched nothing from outside (no fonts, scripts or analytics): every web request is to the app
    from urllib.parse import urlparse

    urls = [json.loads(e["message"])["message"]["params"]["request"]["url"] for e in d.get_log("performance")
            if '"Network.requestWillBeSent"' in e["message"]]
    outside = {u for u in urls if urlparse(u).scheme in ("http", "https", "ws", "wss")
               and urlparse(u).netloc != urlparse(server.url).netloc}
    assert len(urls) > 10 and not outside, sorted(outside)[:5]
    shot = Path(os.environ.get("MEDTVT_SCREENSHOT_DIR") or tmp_path) / "app.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    # the uploads are gone from the server and from the page
    assert not _left_behind(server.tmp, patient.hea.name, patient.dat.name, patient.cxr.name, patient.labs.name)
    assert not uploaded("in-ecg", patient.dat.name) and not uploaded("in-cxr", patient.cxr.name)

    # a corrupt JPEG: a message in the page naming the file and what is allowed, no stack trace
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    find("#in-cxr input[type=file]")[0].send_keys(str(bad))
    _wait(lambda: uploaded("in-cxr", "corrupt.jpg"), 30, "the corrupt upload")
    find("#run")[0].click()
    msg = _wait(message, 120, "the error message")
    assert "corrupt.jpg" in msg and "JPEG or PNG" in msg, msg
    assert "Traceback" not in d.page_source and "Traceback" not in server.log.read_text()
    assert not _left_behind(server.tmp, "corrupt.jpg")


def test_app_command_line_errors_are_one_line(app_run):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken, neither = medtvt_all(("app", "--run", app_run, "--port", port), ("app",))
    one_line_error(taken, f"--port {port}: cannot listen there")
    one_line_error(neither, "give exactly one of --model DIR or --run DIR")


def test_app_leaves_nothing_when_stopped(server):
    server.proc.terminate()
    assert server.proc.wait(60) == 0, server.log.read_text()
    # torch may make its (empty) inductor cache directory there; everything of the app's is gone
    left = [p for p in server.tmp.iterdir() if not p.name.startswith("torchinductor_")]
    assert not left and not [p for p in server.tmp.rglob("*") if p.is_file()], sorted(server.tmp.rglob("*"))[:10]


# --------------------------------------------------------------------------- uploads (no server)
def _cohort_patient(cohort: Path) -> tuple[Path, Path, str]:
    rec = json.loads((cohort / "qa" / "disease_test.json").read_text())[0]
    return cohort / (rec["ECG"][0] + ".hea"), cohort / rec["image"][0], str(rec["lab"][0])


def test_uploads_are_staged_under_their_names_and_the_header_is_the_input(cohort, tmp_path):
    import wfdb

    from medtvt_core.errors import DataError
    from medtvt_core.run.uploads import choose_input, public_message, stage_files
    from medtvt_plugins.readers.ecg import EcgModality

    hea, cxr, _ = _cohort_patient(cohort)
    dat = hea.with_suffix(".dat")
    reader = EcgModality()
    # a zip whose members carry folders (one of them climbing out): flattened into the request's folder
    z = tmp_path / "rec.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(hea, "../../" + hea.name)
        zf.write(dat, "some/dir/" + dat.name)
        zf.writestr("__MACOSX/._" + hea.name, b"finder")
    staged = stage_files("ecg", [("rec.zip", z)], tmp_path / "req" / "ecg")
    assert sorted(p.name for p in staged) == sorted([hea.name, dat.name])
    assert all(p.parent == tmp_path / "req" / "ecg" for p in staged)
    value = choose_input(reader, staged, {})
    assert Path(value).name in (hea.name, dat.name)
    # the staged record is the uploaded one: same bytes, and wfdb reads the same samples from both
    assert {p.name: p.read_bytes() for p in staged} == {hea.name: hea.read_bytes(), dat.name: dat.read_bytes()}
    a = wfdb.rdrecord(str(Path(value).with_suffix(""))).p_signal
    assert (a == wfdb.rdrecord(str(hea.with_suffix(""))).p_signal).all()
    r, root, ref = reader.for_input(value, {})
    assert r.load(ref, root=root).shape == tuple(reader.sample_shape)
    # a file the reader does not read with the header is refused, not dropped
    extra = tmp_path / "notes.txt"
    extra.write_text("x")
    staged2 = stage_files("ecg", [(hea.name, hea), (dat.name, dat), ("notes.txt", extra)], tmp_path / "req2" / "ecg")
    with pytest.raises(DataError, match="does not read notes.txt"):
        choose_input(reader, staged2, {})
    with pytest.raises(DataError, match="two uploaded files are named"):
        stage_files("ecg", [(hea.name, hea), ("x/" + hea.name, hea)], tmp_path / "req3" / "ecg")
    with pytest.raises(DataError, match="not a readable zip"):
        stage_files("cxr", [("x.zip", cxr)], tmp_path / "req4" / "cxr")
    d = tmp_path / "req5" / "cxr"
    assert public_message(f"image {d}/a.jpg: unreadable", [d, d.parent]) == "image a.jpg: unreadable"


def test_edited_lab_table_is_read_as_the_csv_row(cohort, tmp_path):
    import csv

    from medtvt_core.run.uploads import table_of_row, write_table_row
    from medtvt_plugins.readers.lab import LabModality

    _, _, lab_id = _cohort_patient(cohort)
    reader = LabModality()
    with open(cohort / "labs.csv", newline="") as fh:
        all_rows = list(csv.DictReader(fh))
    reader.fit([r["hadm_id"] for r in all_rows], cohort)
    header, rows = table_of_row(reader, cohort / "labs.csv", lab_id)
    row = next(r for r in all_rows if r["hadm_id"] == lab_id)
    assert header == list(all_rows[0].keys()) and rows == [[c, row[c]] for c in header]  # the stored text
    # unedited: the one-row CSV gives the reader's vector of the original file
    one = tmp_path / "one.csv"
    assert write_table_row(reader, header, rows, one) == lab_id
    r0, root0, ref0 = reader.for_input(str(cohort / "labs.csv"), {"id": lab_id})
    r1, root1, ref1 = reader.for_input(str(one), {"id": lab_id})
    assert r1.load(ref1, root=root1).tolist() == r0.load(ref0, root=root0).tolist()
    # an edited percentile reaches the vector; an emptied one counts as not measured
    labs = sorted(c[: -len("_percentile")] for c in header if c.endswith("_percentile"))
    edited = [[c, "0.99" if c == labs[0] + "_percentile" else "" if c == labs[1] + "_percentile" else v] for c, v in rows]
    write_table_row(reader, header, edited, one)
    r2, root2, ref2 = type(reader)(**{**reader.config.model_dump(), "csv": str(one)}), one.parent, lab_id
    r2.set_stats(reader.stats)
    v = r2.load(ref2, root=root2)
    n = len(labs)
    assert float(v[0]) == pytest.approx(0.99) and float(v[n]) == 1.0
    assert float(v[1]) == pytest.approx(reader.stats["mean_percentile"][labs[1]]) and float(v[n + 1]) == 0.0
