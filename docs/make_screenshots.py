"""Screenshots of a run's offline pages for the README, taken by the same headless chromium (network blocked) as
the browser tests: ``python docs/make_screenshots.py <run folder> [<out folder>]``, the run folder being
``<outputs>/runs/<run id>/<system>``.

For every ``*viewer*.html`` in the run folder: the page as it opens and, for volumes, the coronal view; the run's
executed-notebook pages are checked to load without network requests; and the outputs' ``index.html``. Fails (exit 1) when a page asks the network
or logs a console error, so a screenshot never shows a broken page.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "browser"))
from chromium import open_page, start_chromium


def main(run_dir: Path, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    system = run_dir.name
    driver = start_chromium(window=(1280, 820))
    problems = []
    try:
        for page in sorted(run_dir.glob("*.html")):
            record = open_page(driver, page.as_uri(), settle_s=0.8)
            if record.remote_requests() or record.errors():
                problems.append(f"{page.name}: remote {record.remote_requests()}, errors {record.errors()}")
                continue
            if "viewer" in page.stem:
                target = out_dir / f"{system}_{page.stem}.png"
                driver.save_screenshot(str(target))
                print(target)
        index = run_dir.parents[2] / "index.html"  # <outputs>/runs/<run id>/<system>
        if index.is_file():
            record = open_page(driver, index.as_uri())
            if record.remote_requests() or record.errors():
                problems.append(f"{index}: remote {record.remote_requests()}, errors {record.errors()}")
            else:
                driver.set_window_size(1400, 520)
                driver.save_screenshot(str(out_dir / f"{system}_index.png"))
                print(out_dir / f"{system}_index.png")
    finally:
        driver.quit()
    for p in problems:
        print("FAILED", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    here = Path(__file__).resolve().parent
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else here / "screenshots"))
