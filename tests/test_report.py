"""vectorgeo.report: one self-contained HTML file with the metrics tables and inline PNG figures."""

from __future__ import annotations

import base64
import os
import re
import struct
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vectorgeo.report import render_report, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics() -> dict[str, Any]:
    def cls(f1: float | None, acc: float, knn: float) -> dict[str, dict[str, float | None]]:
        return {
            "linear_macro_f1": {"mean": f1, "std": None if f1 is None else 0.034},
            "linear_accuracy": {"mean": acc, "std": 0.02},
            "knn_macro_f1": {"mean": knn, "std": 0.05},
        }

    def reg(r2: float, knn: float) -> dict[str, dict[str, float]]:
        return {"linear_r2": {"mean": r2, "std": 0.111}, "knn_r2": {"mean": knn, "std": 0.222}}

    return {
        "tasks": {
            "koppen": {
                "kind": "classification",
                "methods": {"embedding": cls(0.712, 0.9, 0.65), "class_histogram": cls(0.5, 0.8, 0.45)},
            },
            "elevation": {
                "kind": "regression",
                "methods": {"embedding": reg(0.3, 0.25), "class_histogram": reg(0.875, 0.6)},
            },
            "<b>odd</b>": {
                "kind": "classification",
                "methods": {"embedding": cls(None, 0.5, 0.5), "class_histogram": cls(0.25, 0.5, 0.5)},
            },
        },
        "n_cells": 254,
        "folds": 3,
    }


def report_kwargs(**overrides: Any) -> dict[str, Any]:
    """Keyword arguments of render_report/write_report besides the metrics: a plausible evaluation."""
    rng = np.random.default_rng(0)
    kwargs: dict[str, Any] = {
        "details": {
            "koppen": {"n_cells": 250, "n_classes": 4, "n_folds_scored": 3},
            "elevation": {"n_cells": 254, "n_classes": 0, "n_folds_scored": 3},
        },
        "goal": {"passed": False, "beats": {"class_histogram": {"koppen": True, "elevation": False}}},
        "map_lat": rng.uniform(35, 38, 50),
        "map_lng": rng.uniform(-7, -3, 50),
        "map_rgb": rng.uniform(0, 1, (50, 3)),
        "training": {
            "epochs": [{"epoch": i, "train_loss": 1 / (i + 1), "val_loss": 1.2 / (i + 1)} for i in range(3)],
            "best_val_triplet_accuracy": 0.8125,
            "pca_components_99": 7,
        },
        "notes": ["elevation: a <note> to escape"],
        "info": {"model_version": "5cc6addeb756", "cells_with_embedding": 254, "fold_resolution": 3},
    }
    kwargs.update(overrides)
    return kwargs


def render(**overrides: Any) -> str:
    return render_report(metrics(), **report_kwargs(**overrides))


class Tables(HTMLParser):
    """Every <table> as rows of cell texts, and every src/href attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.links: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v or "" for k, v in attrs if k in ("src", "href")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> Tables:
    t = Tables()
    t.feed(html)
    return t


def png_size(data_uri: str) -> tuple[int, int]:
    raw = base64.b64decode(data_uri.removeprefix("data:image/png;base64,"), validate=True)
    assert raw[:8] == PNG_MAGIC
    return struct.unpack(">II", raw[16:24])  # IHDR width, height


def test_main_table_holds_each_task_and_method_score() -> None:
    doc = parse(render())
    main = doc.tables[0]
    assert main[0] == ["task", "metric", "embedding", "class_histogram"]
    rows = {r[0]: r[1:] for r in main[1:]}
    assert rows["koppen"] == ["linear_macro_f1", "0.712 ± 0.034", "0.500 ± 0.034"]
    assert rows["elevation"] == ["linear_r2", "0.300 ± 0.111", "0.875 ± 0.111"]
    assert rows["<b>odd</b>"] == ["linear_macro_f1", "–", "0.250 ± 0.034"]  # no score: a dash, not nan


def test_best_method_per_row_is_bold() -> None:
    html = render()
    assert "<td><b>0.712 ± 0.034</b></td><td>0.500 ± 0.034</td>" in html
    assert "<td>0.300 ± 0.111</td><td><b>0.875 ± 0.111</b></td>" in html


def test_all_metrics_and_cells_tables() -> None:
    doc = parse(render())
    every = {(r[0], r[1]): r[2:] for r in doc.tables[1][1:]}
    assert len(every) == 3 + 2 + 3  # koppen and odd: 3 classification metrics, elevation: 2 regression
    assert every[("koppen", "linear_accuracy")] == ["0.900 ± 0.020", "0.800 ± 0.020"]
    assert every[("elevation", "knn_r2")] == ["0.250 ± 0.222", "0.600 ± 0.222"]
    cells = doc.tables[2]
    assert cells[1:] == [["koppen", "250", "4", "3"], ["elevation", "254", "–", "3"]]


def test_self_contained_with_three_inline_figures() -> None:
    html = render()
    doc = parse(html)
    assert len(doc.links) == 3 and all(link.startswith("data:image/png;base64,") for link in doc.links)
    for uri in doc.links:
        w, h = png_size(uri)
        assert w > 100 and h > 100
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)
    assert not re.search(r"(?:https?:)?//\w", text, re.IGNORECASE), "an external URL"
    assert "<script" not in text and "<link" not in text and "url(" not in text and "@import" not in text
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


def test_text_is_escaped_and_settings_shown() -> None:
    html = render()
    assert "&lt;b&gt;odd&lt;/b&gt;" in html and "<b>odd</b>" not in html
    assert "a &lt;note&gt; to escape" in html
    assert "Model <code>5cc6addeb756</code>; 254 cells evaluated" in html
    assert "3-fold spatial-block cross-validation" in html and "resolution 3" in html
    assert "Best validation triplet accuracy: 0.8125; principal components for 99% variance: 7;" in html


def test_goal_verdict() -> None:
    failed = render()
    assert "<p class='fail'>Goal not met" in failed
    assert "beats <b>class_histogram</b> on 1/2 tasks (koppen)" in failed
    passed = render(goal={"passed": True, "beats": {"class_histogram": {"koppen": True, "elevation": True}}})
    assert "<p class='pass'>Goal met" in passed and "on 2/2 tasks (koppen, elevation)" in passed


def test_without_training_metrics_there_is_no_training_figure() -> None:
    html = render(training=None)
    assert "No training metrics were available." in html
    assert [link.startswith("data:image/png") for link in parse(html).links] == [True, True]


def test_write_report_writes_the_rendered_file(tmp_path: Path) -> None:
    path = tmp_path / "eval" / "report.html"
    write_report(path, metrics(), **report_kwargs())
    html = path.read_text(encoding="utf-8")
    assert parse(html).tables[0] == parse(render()).tables[0]
    assert html.count("data:image/png;base64,") == 3
    assert os.listdir(path.parent) == ["report.html"]


def test_write_report_failure_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "report.html"
    bad = metrics()
    bad["tasks"]["koppen"]["kind"] = "clustering"  # no main metric for that kind
    with pytest.raises(KeyError):
        write_report(path, bad, **report_kwargs())
    assert os.listdir(tmp_path) == []
