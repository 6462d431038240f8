"""privrec.course.explorer: the static explorer's HTML, and (in headless Chromium, offline) that moving
its controls changes what it plots."""

import json
import math
import os
import shutil

import pytest

from privrec.course.explorer import explorer_html

EPS = (1.0, 4.0, math.inf)
CLIENTS = (10, 100)


def _records():
    noise = {e: 0.0 if e == math.inf else 0.1 / e for e in EPS}
    return [{"epsilon": e, "clients": m, "rmse": round(0.9 + noise[e] - 0.001 * m, 4),
             "ndcg": round(0.05 - noise[e] / 10, 4)}
            for e in EPS for m in CLIENTS]


def _page():
    body = explorer_html(_records(), controls=["epsilon", "clients"], series="clients",
                         metrics={"rmse": "test RMSE", "ndcg": "NDCG@10"},
                         references=[{"label": "biases", "rmse": 0.95}],
                         initial={"epsilon": 1.0, "clients": 10}, title="demo",
                         epsilon_label="user-level ε (δ = 1e-5)")
    return f"<!doctype html><html><body>{body}</body></html>"


def test_html_is_self_contained():
    page = _page()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page and "<script src" not in page
    spec = page.split('<script type="application/json">')[1].split("</script>")[0]
    assert json.loads(spec)["values"]["epsilon"] == [1.0, 4.0, None]
    assert json.loads(spec)["epsilonLabel"] == "user-level ε (δ = 1e-5)"


def test_values_are_ordered_with_the_non_private_end_last_whatever_the_record_order():
    records = _records()
    spec_of = [explorer_html(r, controls=["epsilon", "clients"], metrics={"rmse": "RMSE"})
               .split('<script type="application/json">')[1].split("</script>")[0]
               for r in (records, records[::-1])]
    values = [json.loads(s)["values"] for s in spec_of]
    assert values[0] == values[1] == {"epsilon": [1.0, 4.0, None], "clients": [10, 100]}
    assert '"epsilonLabel": "\\u03b5"' in spec_of[0]  # the default label: plain epsilon


def test_bad_specs_are_rejected():
    with pytest.raises(ValueError, match="records"):
        explorer_html([], controls=["epsilon"], metrics={"rmse": "RMSE"})
    with pytest.raises(ValueError, match="start with 'epsilon'"):
        explorer_html(_records(), controls=["clients"], metrics={"rmse": "RMSE"})
    with pytest.raises(ValueError, match="lacks"):
        explorer_html(_records(), controls=["epsilon", "missing"], metrics={"rmse": "RMSE"})
    twice = _records() + [dict(_records()[0], rmse=0.5)]
    with pytest.raises(ValueError, match="same configuration"):
        explorer_html(twice, controls=["epsilon", "clients"], metrics={"rmse": "RMSE"})
    with pytest.raises(ValueError, match=r"initial\['clients'\]"):
        explorer_html(_records(), controls=["epsilon", "clients"], metrics={"rmse": "RMSE"},
                      initial={"clients": 50})


def test_the_chart_has_descriptive_alt_text():
    page = _page()
    label = page.split('aria-label="')[1].split('"')[0]
    assert label.startswith("Line chart of test RMSE or NDCG@10 (menu) against user-level ε")
    assert "one line per clients" in label
    custom = explorer_html(_records(), controls=["epsilon", "clients"], metrics={"rmse": "RMSE"},
                           alt="RMSE of DP-FedAvg against ε")
    assert 'aria-label="RMSE of DP-FedAvg against ε"' in custom


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_moving_the_epsilon_control_changes_the_plot(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = _chromium()
    if browser_path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have Chromium for the offline explorer test (.ci/run installs it)")
        pytest.skip("Chromium is not installed (.ci/run installs it)")
    page_file = tmp_path / "explorer.html"
    page_file.write_text(_page())
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_file.as_uri())
        root = page.locator(".privrec-explorer")

        def state():
            return (json.loads(root.get_attribute("data-selected")),
                    page.locator(".privrec-readout").inner_text(),
                    page.locator(".privrec-point").get_attribute("cy"))

        before = state()
        assert before[0]["epsilon"] == 1.0 and before[0]["clients"] == 10
        assert page.locator(".privrec-xlabel").text_content() == "user-level ε (δ = 1e-5)"
        page.eval_on_selector('input[name="epsilon"]',
                              "el => { el.value = 2; el.dispatchEvent(new Event('input')); }")
        after = state()
        assert after[0]["epsilon"] is None  # the non-private end of the axis
        assert after[1] != before[1] and after[2] != before[2]
        page.eval_on_selector('input[name="clients"]',
                              "el => { el.value = 1; el.dispatchEvent(new Event('input')); }")
        assert state()[0]["clients"] == 100
        # every line is labelled with its series value, and the legend names the selected one
        labels = page.locator(".privrec-series-label").all_text_contents()
        assert sorted(labels) == ["10", "100"]
        assert "clients = 100" in page.locator(".privrec-legend").inner_text()
        # drawn for the column and scaled down on a phone: the chart is never cut off
        page.set_viewport_size({"width": 390, "height": 800})
        box = page.locator(".privrec-explorer svg").bounding_box()
        assert box["width"] <= 390 and page.locator(".privrec-point").is_visible()
        browser.close()
    assert all(url.startswith("file://") for url in requests)
