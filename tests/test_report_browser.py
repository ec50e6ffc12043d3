"""The diagnosis report as a person sees it: rendered by headless Chromium (Debian's `chromium`), offline.

Checks, from the DOM after the scripts ran, that every plot div holds plotly's rendered SVG with drawn
traces and every empty panel says why, and, from a screenshot, that the page is not blank and the plot
colours are on it. Without Chromium these tests skip locally and FAIL in CI (CI=true): `scripts/setup.sh`
installs it. Set OVERTHINK_KEEP_SCREENSHOTS=DIR to keep the PNGs for a look.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from factories import make_signal_trace, make_trace

from monitor.report import render_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        msg = "Debian's chromium is not installed; run scripts/setup.sh (it installs it with apt-get)"
        if IN_CI:
            pytest.fail(msg + " -- the browser test must run in CI", pytrace=False)
        pytest.skip(msg)
    return CHROMIUM


def run_chromium(binary: str, url: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="overthink-chromium-") as profile:
        proc = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args, url], capture_output=True,
                              text=True, timeout=timeout)
    return proc


# --------------------------------------------------------------------------- DOM
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class PlotCensus(HTMLParser):
    """For each element with data-fig (a plot div) and each .empty-panel: what was rendered inside."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []  # (tag, plot id this element opened, if any)
        self.open_plots: list[str] = []
        self.plots: dict[str, dict[str, int]] = {}
        self.empty_panels: dict[str, str] = {}
        self._empty: str | None = None
        self._empty_depth = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        if self._empty is not None:
            self._empty_depth += tag not in VOID
        if "empty-panel" in classes:
            self._empty, self._empty_depth = a.get("data-panel", "?"), 1
            self.empty_panels[self._empty] = ""
        for pid in self.open_plots:
            c = self.plots[pid]
            c["main-svg"] += "main-svg" in classes
            c["traces"] += bool(classes & {"trace", "hm"}) and tag == "g"
            c["paths"] += tag == "path"
        opened = None
        if "plot" in classes and a.get("data-fig"):
            opened = a["data-fig"]
            self.plots[opened] = {"main-svg": 0, "traces": 0, "paths": 0, "rendered": int("data-rendered" in a)}
            self.open_plots.append(opened)
        if tag not in VOID:
            self.stack.append((tag, opened))

    def handle_endtag(self, tag):
        if self._empty is not None:
            self._empty_depth -= 1
            if self._empty_depth <= 0:
                self._empty = None
        while self.stack:
            t, opened = self.stack.pop()
            if opened:
                self.open_plots.remove(opened)
            if t == tag:
                break

    def handle_data(self, data):
        if self._empty is not None:
            self.empty_panels[self._empty] += data


def open_in_chromium(binary: str, html_file: Path, fragment: str = "",
                     png: Path | None = None) -> tuple[PlotCensus, np.ndarray | None]:
    """Load the report (after its scripts ran) once: the DOM census and, with `png`, the screenshot as RGB."""
    shot = [f"--screenshot={png}", "--window-size=1400,3000"] if png is not None else []
    proc = run_chromium(binary, html_file.as_uri() + fragment, "--dump-dom", *shot)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "</html>" in proc.stdout, "chromium printed no DOM: " + proc.stderr[-2000:]
    census = PlotCensus()
    census.feed(proc.stdout)
    if png is None:
        return census, None
    assert png.exists(), "chromium wrote no screenshot: " + proc.stderr[-2000:]
    keep = os.environ.get("OVERTHINK_KEEP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    return census, read_png(png)[..., :3].astype(np.int16)


# --------------------------------------------------------------------------- screenshot
def read_png(path: Path) -> np.ndarray:
    """Decode an 8-bit, non-interlaced PNG (what Chromium writes) into an (h, w, channels) uint8 array."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    w, h, depth, ctype, _, _, interlace = ihdr
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[ctype]
    assert depth == 8 and not interlace, f"unsupported PNG (depth {depth}, interlace {interlace})"
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    out = np.zeros((h, stride), dtype=np.uint8)
    prior = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1)
        if f == 0:
            cur = line.copy()
        elif f == 1:  # Sub: a running sum per channel
            cur = (np.cumsum(line.reshape(w, bpp), axis=0, dtype=np.int64) % 256).astype(np.uint8).reshape(-1)
        elif f == 2:  # Up
            cur = line + prior
        else:  # Average (3) and Paeth (4) depend on the left neighbour: byte by byte
            b = bytearray(line.tobytes())
            up = prior.tobytes()
            for i in range(stride):
                a = b[i - bpp] if i >= bpp else 0
                if f == 3:
                    b[i] = (b[i] + ((a + up[i]) >> 1)) & 255
                    continue
                c = up[i - bpp] if i >= bpp else 0
                p = a + up[i] - c
                pa, pb, pc = abs(p - a), abs(p - up[i]), abs(p - c)
                b[i] = (b[i] + (a if pa <= pb and pa <= pc else (up[i] if pb <= pc else c))) & 255
            cur = np.frombuffer(bytes(b), dtype=np.uint8)
        out[y] = cur
        prior = cur
    return out.reshape(h, w, bpp)


def pixels_near(img: np.ndarray, hex_colour: str, tol: int = 30) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(img - rgb).max(axis=-1) <= tol).sum())


# --------------------------------------------------------------------------- tests
def test_single_trace_report_renders_every_plot_offline(chromium, tmp_path):
    out = render_report([make_signal_trace()], tmp_path / "one.html")
    census, img = open_in_chromium(chromium, out, png=tmp_path / "one.png")
    expected = {"fig-0-policy", "fig-0-path_deviation", "fig-0-jsd_instability", "fig-0-latent_trajectory",
                "fig-0-redundancy", "fig-0-similarity_matrix"}
    assert expected <= set(census.plots), sorted(census.plots)
    for pid, c in census.plots.items():
        assert c["rendered"] and c["main-svg"] >= 1, f"{pid} was not drawn by plotly: {c}"
        assert c["traces"] >= 1 and c["paths"] >= 1, f"{pid} has no drawn traces: {c}"
    assert census.empty_panels == {}

    assert img.shape == (3000, 1400, 3)
    background = np.array([250, 250, 250])
    assert (np.abs(img - background).max(axis=-1) > 10).mean() > 0.03, "the page is (nearly) blank"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 300, "too few colours for a page with plots"
    for colour in ("#1f77b4", "#ff7f0e", "#2ca02c"):  # plotly's first line colours, used only by the plots
        assert pixels_near(img, colour) > 300, f"no plot lines in {colour} on the screenshot"


def test_logprob_only_trace_renders_with_empty_panels_that_say_why(chromium, tmp_path):
    t = make_trace()  # path deviation and JSD only: no hidden-state families
    out = render_report([t], tmp_path / "logprob.html")
    census, _ = open_in_chromium(chromium, out)
    for pid in ("fig-0-path_deviation", "fig-0-jsd_instability"):
        assert census.plots[pid]["traces"] >= 1, pid
    assert set(census.empty_panels) == {"latent_trajectory", "redundancy", "similarity_matrix"}
    for key, text in census.empty_panels.items():
        assert "hidden states" in text, (key, text)


def test_batch_report_renders_summary_plots_and_opens_a_trace_section_from_its_link(chromium, tmp_path):
    traces = [make_signal_trace(id=f"p{i}", correct=(i % 2 == 0), halt=(i != 1)) for i in range(4)]
    out = render_report(traces, tmp_path / "batch.html")
    census, img = open_in_chromium(chromium, out, png=tmp_path / "batch.png")
    for pid in ("fig-batch-lengths", "fig-batch-halt_positions", "fig-batch-signal_distributions"):
        c = census.plots[pid]
        assert c["rendered"] and c["main-svg"] >= 1 and c["traces"] >= 1, (pid, c)
    assert pixels_near(img, "#2ca02c") > 300 and pixels_near(img, "#d62728") > 300  # correct / incorrect colours
    # trace sections are closed and draw when opened ...
    assert not census.plots["fig-2-jsd_instability"]["rendered"]
    # ... e.g. by following the trace's link (#anchor) from the trace table
    census, _ = open_in_chromium(chromium, out, "#trace-2-p2")
    c = census.plots["fig-2-jsd_instability"]
    assert c["rendered"] and c["traces"] >= 1, c
    assert not census.plots["fig-1-jsd_instability"]["rendered"]


def test_step_similarities_of_a_long_trace_draw_as_a_scatter(chromium, tmp_path):
    # 100 steps, recorded as Redundancy writes them by default: each step's 8 most similar earlier steps
    t = make_signal_trace(n_steps=100, halt=False)
    red = t.summary["redundancy"]
    mat = red.pop("step_similarity_matrix")
    red["step_similarity_k"] = 8
    red["step_similarity_topk"] = [[[j, mat[i][j]] for j in sorted(range(i), key=lambda j: -mat[i][j])[:8]]
                                   for i in range(100)]
    out = render_report([t], tmp_path / "long.html")
    census, _ = open_in_chromium(chromium, out)
    c = census.plots["fig-0-similarity_matrix"]
    assert c["rendered"] and c["main-svg"] >= 1 and c["traces"] >= 1, c
    assert c["paths"] >= sum(min(i, 8) for i in range(100)), c  # one marker per recorded pair
