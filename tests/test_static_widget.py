"""The static face of a chapter's widget (issue 15): every setting pre-drawn, switched offline."""

from __future__ import annotations

import json
import os
import shutil

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from privrec.course.static_widget import static_widget_html  # noqa: E402


def _draw(slope, shift):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [shift, shift + slope], label="the line")
    ax.set(xlabel="x", ylabel="height", title="a line")
    ax.legend()
    plt.show()
    print(f"slope {slope}, shift {shift}")


def _html():
    return static_widget_html(_draw, {"slope": [1, 2, 3], "shift": [0.0, 0.5]},
                              labels={"slope": "slope a"}, initial={"slope": 2}, title="lines")


def test_one_frame_per_combination_with_its_printout():
    plt.close("all")  # figures other tests in this worker left open are not this test's business
    page = _html()
    assert page.count("<figure data-key=") == 6
    assert page.count('style="margin:0"') == 1  # only the initial frame is visible
    assert '<figure data-key="1,0" style="margin:0">' in page
    assert "slope 3, shift 0.5" in page and "slope a" in page
    assert "http" not in page.replace("http://www.w3.org", "")  # self-contained
    assert not plt.get_fignums()  # every frame's figure was closed


def _alts(page):
    return [part.split('"')[0] for part in page.split(' alt="')[1:]]


def test_every_frame_has_descriptive_alt_text_not_its_kwargs():
    alts = _alts(_html())
    assert len(alts) == 6 and len(set(alts)) == 6
    assert alts[0] == "Plot of a line: height against x (the line). Shown for slope a = 1, shift = 0.0."
    assert not any("{" in a or "&#x27;" in a for a in alts)
    templated = static_widget_html(_draw, {"slope": [1, 2], "shift": [0.0]},
                                   alt="A line of slope {slope} from height {shift}")
    assert _alts(templated) == ["A line of slope 1 from height 0.0", "A line of slope 2 from height 0.0"]
    called = static_widget_html(_draw, {"slope": [1], "shift": [0.5]},
                                alt=lambda slope, shift: f"slope {slope}")
    assert _alts(called) == ["slope 1"]


def test_frames_are_drawn_at_the_figure_dpi_for_the_column():
    import base64
    import io

    from PIL import Image

    from privrec.course.figures import figure

    def wide(slope):
        fig, ax = figure()
        ax.plot([0, 1], [0, slope])
        return fig

    page = static_widget_html(wide, {"slope": [1]})
    png = page.split("data:image/png;base64,")[1].split('"')[0]
    width = Image.open(io.BytesIO(base64.b64decode(png))).width
    assert 640 <= width <= 720  # 6.9 in at dpi 100, cropped by bbox_inches="tight"


def test_infinite_and_odd_values_become_text():
    page = static_widget_html(lambda slope, shift: plt.subplots(figsize=(1, 1))[0],
                              {"slope": [1.0, float("inf")], "shift": [(0, 1)]})
    spec = page.split('<script type="application/json">')[1].split("</script>")[0]
    assert json.loads(spec)["values"] == {"slope": [1.0, "∞"], "shift": ["(0, 1)"]}


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="at least one"):
        static_widget_html(_draw, {})
    with pytest.raises(ValueError, match="at most 64"):
        static_widget_html(_draw, {"slope": list(range(9)), "shift": list(range(8))})
    with pytest.raises(ValueError, match=r"initial\['slope'\]"):
        static_widget_html(_draw, {"slope": [1], "shift": [0]}, initial={"slope": 5})


def test_moving_each_control_changes_the_figure(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have Chromium (.ci/run installs it)")
        pytest.skip("Chromium is not installed")
    page_file = tmp_path / "widget.html"
    page_file.write_text(f"<!doctype html><meta charset='utf-8'><body>{_html()}</body>")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        root = page.locator(".privrec-static-widget")

        def state():
            return (json.loads(root.get_attribute("data-selected")),
                    page.locator("figure:visible img").get_attribute("src"),
                    page.locator("figure:visible").count())

        before = state()
        assert before[0] == {"slope": 2, "shift": 0.0} and before[2] == 1
        for name, value in (("slope", 0), ("shift", 1)):
            old = state()
            page.eval_on_selector(f'input[name="{name}"]',
                                  f"el => {{ el.value = {value}; el.dispatchEvent(new Event('input')); }}")
            new = state()
            assert new[2] == 1 and new[1] != old[1] and new[0] != old[0]
        assert state()[0] == {"slope": 1, "shift": 0.5}
        assert page.locator('output[name="slope"]').text_content() == "1"
        browser.close()
    assert all(url.startswith(("file://", "data:")) for url in requests)
