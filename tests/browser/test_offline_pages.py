"""Every generated HTML page in headless chromium with the network blocked: nothing but file: requests, no
console errors, the controls respond, and a screenshot of each."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from chromium import PageRecord, drain, open_page, wait_for
from conftest import SYSTEM_TEXT, synthetic_ct_case
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select


def assert_offline(record: PageRecord, page: Path) -> None:
    assert record.requests, f"{page}: no request recorded at all (is the performance log on?)"
    assert not record.remote_requests(), f"{page} asked the network for {record.remote_requests()}"
    assert not record.errors(), f"{page} logged console errors: {record.errors()}"


def canvas_png(driver) -> str:
    return driver.execute_script("return document.getElementById('canvas').toDataURL()")


def test_case_viewer_offline_slider_window_masks_heatmap(browser, pages, screenshot_dir):
    record = open_page(browser, pages.case_viewer.as_uri())
    assert_offline(record, pages.case_viewer)
    canvas = browser.find_element(By.ID, "canvas")
    slider = browser.find_element(By.ID, "slice")
    # the CT case opens at the lesion's largest slice, in the soft-tissue window, both masks drawn
    first_slice = int(canvas.get_attribute("data-slice"))
    masks = synthetic_ct_case()["masks"]
    area = (masks["ground_truth"].sum(axis=(1, 2)) + masks["prediction"].sum(axis=(1, 2)))
    assert first_slice == int(np.argmax(area))
    assert Select(browser.find_element(By.ID, "window")).first_selected_option.text == "soft tissue"
    assert canvas.get_attribute("data-drawn-masks") == "ground_truth,prediction"
    # physical aspect: 96 rows x 112 cols at 0.7 mm -> displayed wider than tall by 112/96
    width, height = canvas.size["width"], canvas.size["height"]
    assert abs(width / height - 112 / 96) < 0.02, (width, height)
    browser.save_screenshot(str(screenshot_dir / "case_viewer_ct_axial.png"))

    before = canvas_png(browser)
    slider.send_keys(Keys.ARROW_RIGHT)
    assert int(canvas.get_attribute("data-slice")) == first_slice + 1
    after = canvas_png(browser)
    assert after != before, "moving the slice slider did not change the image"
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert not masks["ground_truth"][first_slice + 11].any()
    assert canvas.get_attribute("data-drawn-masks") == "", "no mask drawn on a slice without masks"

    window = Select(browser.find_element(By.ID, "window"))
    assert [o.text for o in window.options] == ["auto", "soft tissue", "lung", "mediastinum", "bone"]
    shown = canvas_png(browser)
    window.select_by_visible_text("lung")
    assert canvas_png(browser) != shown, "the lung window did not change the grey levels"

    slider.send_keys(Keys.HOME)
    for _ in range(first_slice):
        slider.send_keys(Keys.ARROW_RIGHT)
    browser.find_element(By.CSS_SELECTOR, "#masks input[type=checkbox][data-mask=prediction]").click()
    assert canvas.get_attribute("data-drawn-masks") == "ground_truth"
    with_heat = canvas_png(browser)
    opacity = browser.find_element(By.ID, "opacity")
    opacity.send_keys(Keys.END)
    assert browser.find_element(By.ID, "opacity-value").text == "100%"
    assert canvas_png(browser) != with_heat, "the heatmap opacity slider did not change the image"
    opacity.send_keys(Keys.HOME)
    for _ in range(8):
        opacity.send_keys(Keys.PAGE_UP)
    browser.find_element(By.CSS_SELECTOR, "#masks input[type=checkbox][data-mask=prediction]").click()
    window.select_by_visible_text("soft tissue")

    Select(browser.find_element(By.ID, "view")).select_by_visible_text("coronal")
    assert canvas.get_attribute("data-view") == "coronal"
    # coronal plane: 40 slices x 2.5 mm tall, 112 x 0.7 mm wide
    ratio = canvas.size["width"] / canvas.size["height"]
    assert abs(ratio - (112 * 0.7) / (40 * 2.5)) < 0.02, ratio
    browser.save_screenshot(str(screenshot_dir / "case_viewer_ct_coronal.png"))

    Select(browser.find_element(By.ID, "case")).select_by_index(1)
    assert [o.text for o in Select(browser.find_element(By.ID, "window")).options] == ["auto"]
    assert not browser.find_element(By.ID, "slice-label").is_displayed(), "a 2D image has no slice slider"
    assert "segment the stomach" in browser.find_element(By.ID, "text").text
    assert canvas.get_attribute("data-drawn-masks") == "stomach"
    assert_offline(drain(browser, PageRecord(requests=["file:"])), pages.case_viewer)


def test_bertviz_views_render_offline(browser, pages, screenshot_dir):
    for page, name in ((pages.bertviz_head, "bertviz_head_view.png"), (pages.bertviz_model, "bertviz_model_view.png")):
        record = open_page(browser, page.as_uri())
        assert_offline(record, page)
        tokens = wait_for(lambda: browser.execute_script(
            "return Array.from(document.querySelectorAll('svg text')).map(t => t.textContent)"),
            what=f"bertviz's svg in {page.name}")
        assert "effusion" in tokens or page is pages.bertviz_model
        assert browser.execute_script("return document.querySelectorAll('svg').length") >= 1
        browser.save_screenshot(str(screenshot_dir / name))
    # head view: the layer selector redraws the lines
    open_page(browser, pages.bertviz_head.as_uri())
    lines = browser.execute_script("return document.querySelectorAll('svg line, svg path').length")
    assert lines > 0
    Select(browser.find_element(By.ID, "layer")).select_by_index(1)
    assert not drain(browser).errors()


def test_exported_notebook_renders_offline_with_static_viewer_and_bertviz(browser, pages, screenshot_dir):
    record = open_page(browser, pages.notebook_html.as_uri(), settle_s=0.8)
    assert_offline(record, pages.notebook_html)
    # the headless fallback of slice_viewer is an inline PNG; bertviz drew its svg from the inlined d3
    assert browser.execute_script("return document.querySelectorAll('img[src^=\"data:image/png\"]').length") >= 1
    tokens = wait_for(lambda: browser.execute_script(
        "return Array.from(document.querySelectorAll('svg text')).map(t => t.textContent)"), what="bertviz svg")
    assert "findings" in tokens
    browser.save_screenshot(str(screenshot_dir / "notebook_export.png"))


def test_index_links_notebooks_views_and_metrics(browser, pages):
    record = open_page(browser, pages.index.as_uri())
    assert_offline(record, pages.index)
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.TAG_NAME, "a")}
    assert {"03_viewer_demo.html", "04_case_viewer.html", "04_attention_head_view.html",
            "04_attention_model_view.html", "metrics.json"} <= set(links), sorted(links)
    browser.find_element(By.LINK_TEXT, "04_case_viewer.html").click()
    wait_for(lambda: browser.find_elements(By.ID, "canvas"), what="the case viewer behind the index link")
    assert browser.current_url == pages.case_viewer.as_uri()
    assert not drain(browser).remote_requests()


HAS_COLOUR = """const c = document.getElementById('canvas');
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i] !== d[i + 2]) return true;
return false;"""


@pytest.mark.parametrize("system", sorted(SYSTEM_TEXT))
def test_every_systems_case_viewer_renders_offline_and_responds(browser, system_pages, system):
    page = system_pages[system]
    record = open_page(browser, page.as_uri())
    assert_offline(record, page)
    canvas = browser.find_element(By.ID, "canvas")
    assert SYSTEM_TEXT[system] in browser.find_element(By.ID, "text").text
    assert browser.find_element(By.ID, "heat-label").is_displayed(), f"{system}: no heatmap control"
    slider = browser.find_element(By.ID, "slice")
    before = canvas_png(browser)
    if slider.is_displayed():  # a volume: the slice slider moves through it, in every plane
        first = int(canvas.get_attribute("data-slice"))
        slider.send_keys(Keys.ARROW_LEFT if first > 0 else Keys.ARROW_RIGHT)
        assert int(canvas.get_attribute("data-slice")) != first
        assert canvas_png(browser) != before, f"{system}: moving the slice slider did not change the image"
        Select(browser.find_element(By.ID, "view")).select_by_visible_text("coronal")
        assert canvas.get_attribute("data-view") == "coronal"
        coronal = canvas_png(browser)
        slider.send_keys(Keys.ARROW_RIGHT)
        assert canvas_png(browser) != coronal, f"{system}: the coronal slider did not change the image"
        window = Select(browser.find_element(By.ID, "window"))
        assert [o.text for o in window.options] == ["auto", "soft tissue", "lung", "mediastinum", "bone"]
    else:  # a 2-D image: no slice slider; the case selector steps through the heatmaps
        assert len(Select(browser.find_element(By.ID, "case")).options) > 1
        text = browser.find_element(By.ID, "text").text
        Select(browser.find_element(By.ID, "case")).select_by_index(1)
        assert canvas_png(browser) != before, f"{system}: the next case drew the same image"
        assert browser.find_element(By.ID, "text").text != text, f"{system}: the next case kept the same text"
    shown = canvas_png(browser)
    browser.find_element(By.ID, "opacity").send_keys(Keys.END)
    assert canvas_png(browser) != shown, f"{system}: the heatmap opacity slider did not change the image"
    # without heatmap and masks, only prs_med's photographs have colour; the scans are grey
    browser.find_element(By.ID, "heat").click()
    for box in browser.find_elements(By.CSS_SELECTOR, "#masks input[type=checkbox]"):
        box.click()
    assert browser.execute_script(HAS_COLOUR) == (system == "prs_med"), f"{system}: wrong colour mode"
    assert_offline(drain(browser, PageRecord(requests=["file:"])), page)
