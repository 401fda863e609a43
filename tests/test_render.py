"""Pictures: the files exist, parse, and the SVG names the adapted sites."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import matplotlib.image
import pytest

import aurora_fx
from aurora_fx.render import render, render_map, render_site
from tests.models import CASES

SITE = "encoder.layer.0.attention.self.query"


@pytest.fixture(scope="module")
def report():
    model = CASES["bert"].build()
    aurora_fx.apply(model, "query", fuse=False)
    aurora_fx.apply(model, "value", method="lora", rank=4)
    return aurora_fx.inspect(model)


def _svg_text(path):
    root = ET.parse(path).getroot()  # parses as XML
    return ET.tostring(root, encoding="unicode")


def test_model_map_svg_names_every_adapted_site(report, tmp_path):
    svg = _svg_text(render_map(report, tmp_path / "map.svg"))
    for info in report.adapters:
        assert f'id="{info.path}"' in svg
    assert "aurora r2" in svg and "lora r4" in svg


def test_model_map_png_is_an_image(report, tmp_path):
    image = matplotlib.image.imread(render(report, tmp_path / "map.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_site_graph_shows_base_adapter_branches_and_add(report, tmp_path):
    svg = _svg_text(render_site(report, SITE, tmp_path / "site.svg"))
    for label in ("linear(weight, bias)", "linear(A)", "linear(H)", "bspline_basis", "linear(Ws)", "linear(B)",
                  "tanh", "(base + adapter)"):
        assert label in svg, label
    assert SITE in svg
    assert matplotlib.image.imread(render_site(report, SITE, tmp_path / "site.png")).ndim == 3


def test_unknown_suffix_is_refused(report, tmp_path):
    with pytest.raises(ValueError, match=r"render to a \.svg or \.png file"):
        render_map(report, tmp_path / "map.pdf")
