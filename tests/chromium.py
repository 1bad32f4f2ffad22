"""Headless Chromium for pages a person looks at: render, screenshot, and check every image decodes.

Chromium is Debian's package (`apt-get install chromium`, which .ci/run does). A test that needs it and
finds none fails with that instruction: it never skips.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Appended to a copy of the page: once loaded, count the <img>s that decoded and write that into the DOM.
_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];  // the load event waits for every image: each is loaded or broken
  const out = document.createElement("pre");
  out.id = "ddm-check";
  out.textContent = JSON.stringify({images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length});
  document.body.appendChild(out);
});
</script>"""
_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--hide-scrollbars",
    "--enable-logging=stderr",
    "--v=0",
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError(
        "headless Chromium is needed to check pages a person looks at: apt-get install chromium"
    )


@dataclass
class Rendered:
    screenshot: Path
    images: int
    decoded: int
    console: list[str]  # every console message the page produced (ours print none)


def render(page: Path, out_dir: Path, *, width: int = 1280, height: int = 3200) -> Rendered:
    """Screenshot ``page`` and count its decodable images, through the real browser."""
    exe = chromium()
    shot = out_dir / "screenshot.png"
    r = subprocess.run([exe, *_FLAGS, f"--window-size={width},{height}", f"--screenshot={shot}", page.resolve().as_uri()],
                       capture_output=True, text=True, timeout=180)  # fmt: skip
    assert shot.exists(), f"chromium wrote no screenshot (exit {r.returncode}): {r.stderr[-2000:]}"
    probe = out_dir / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _CHECK + "</body>"))
    r2 = subprocess.run([exe, *_FLAGS, "--virtual-time-budget=20000", "--dump-dom", probe.resolve().as_uri()],
                        capture_output=True, text=True, timeout=180)  # fmt: skip
    found = re.search(r'<pre id="ddm-check">(.*?)</pre>', r2.stdout)
    assert found, f"the image check never ran (exit {r2.returncode}): {r2.stderr[-2000:]}"
    counts = json.loads(found.group(1))
    console = [line for line in (r.stderr + r2.stderr).splitlines() if ":CONSOLE" in line]
    return Rendered(screenshot=shot, images=counts["images"], decoded=counts["decoded"], console=console)


def is_blank(png: Path) -> bool:
    """True when the screenshot is (nearly) one colour."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    return float(pixels.std()) < 2.0
