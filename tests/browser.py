"""Open a local HTML page in headless Chromium and say what it drew and what it asked for.

inspect(page.html) loads the page through Playwright with Debian's /usr/bin/chromium, lets no
request leave the machine (any URL whose scheme is not file:, data:, blob: or about: is
recorded and aborted), waits until every vega chart has drawn, takes a screenshot of the
whole page and, for each chart and image, counts the pixels inside its box that differ from
the background. `require()` skips a test when Chromium or Playwright is missing, and fails
it instead when FERPIPE_REQUIRE_BROWSER=1 (CI: .ci/run installs Chromium and sets it).
"""
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = os.environ.get("FERPIPE_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium itself calls home (and, on a closed
# network, has those connections refused); none of them changes how a page renders.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")

# What counts as drawn: at least MIN_PIXELS pixels (and MIN_SHARE of the box) off the
# background, in at least MIN_COLOURS distinct colours. An empty vega div or a broken image
# has none; a line chart with its axes has thousands.
MIN_PIXELS = 200
MIN_SHARE = 0.005
MIN_COLOURS = 3


def missing():
    """Why a browser check cannot run here, or None."""
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} not found (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (requirements.txt)"
    return None


def require():
    reason = missing()
    if reason:
        if os.environ.get("FERPIPE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"FERPIPE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


@dataclass
class Element:
    kind: str          # "vega" (a vega-embed chart, or a div whose vegaEmbed never ran) or "img"
    id: str            # the element's id, or the id of the nearest ancestor that has one
    box: tuple         # x, y, width, height in page pixels
    drawn: int = 0     # pixels inside the box that differ from the background
    colours: int = 0   # distinct colours inside the box

    @property
    def blank(self):
        w, h = self.box[2], self.box[3]
        return (w * h == 0 or self.drawn < MIN_PIXELS or self.drawn < MIN_SHARE * w * h
                or self.colours < MIN_COLOURS)


@dataclass
class Page:
    url: str
    requests: list = field(default_factory=list)   # every URL the page asked for
    external: list = field(default_factory=list)   # those not file:/data:/blob:/about:
    errors: list = field(default_factory=list)     # uncaught exceptions and console errors
    elements: list = field(default_factory=list)
    screenshot: Path = None

    def blank(self):
        return [e for e in self.elements if e.blank]

    def ids(self, kind=None):
        return {e.id for e in self.elements if kind is None or e.kind == kind}


# Finds the charts and images; a vega chart is done when vega-embed has put its canvas (or
# svg) in the div, sized, and the view has run.
FIND = """() => {
  const owner = el => { for (let e = el; e; e = e.parentElement) if (e.id) return e.id; return ''; };
  const box = el => { const r = el.getBoundingClientRect();
    return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height]; };
  const out = [];
  const mark = el => { el.dataset.ferpipeCheck = out.length; return el; };
  // vega-embed empties its div (script included) and marks it .vega-embed; a div still
  // holding its vegaEmbed script was never embedded (vega-embed missing or failed).
  for (const div of document.querySelectorAll('div')) {
    const s = div.querySelector(':scope > script');
    const embedded = div.classList.contains('vega-embed');
    if (!embedded && !(s && s.textContent.includes('vegaEmbed'))) continue;
    const drawn = embedded ? div.querySelector('canvas, svg.marks') : null;
    out.push({kind: 'vega', id: owner(mark(drawn || div)), box: box(drawn || div), ready: !!drawn &&
              drawn.getBoundingClientRect().width > 0});
  }
  for (const img of document.querySelectorAll('img'))
    out.push({kind: 'img', id: owner(mark(img)), box: box(img),
              ready: img.complete, ok: img.naturalWidth > 0});
  return out;
}"""


def _count(pixels, box, background):
    x, y, w, h = (int(round(v)) for v in box)
    crop = pixels[max(y, 0):y + h, max(x, 0):x + w].reshape(-1, 3)
    if crop.size == 0:
        return 0, 0
    off = np.abs(crop.astype(int) - background).sum(1) > 24
    return int(off.sum()), len(np.unique(crop, axis=0))


def inspect(html, screenshot=None, timeout_s=30, width=1400):
    """Load `html` (a local file), return a Page. `screenshot`: where to keep the PNG."""
    from playwright.sync_api import sync_playwright

    html = Path(html).resolve()
    page_info = Page(url=html.as_uri())
    keep = Path(screenshot) if screenshot else None
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        # A new, empty profile each time (launch_persistent_context owns --user-data-dir).
        context = pw.chromium.launch_persistent_context(
            str(Path(tmp) / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": width, "height": 900}, device_scale_factor=1,
            service_workers="block")

        def on_request(request):
            page_info.requests.append(request.url)
            if not request.url.startswith(LOCAL_SCHEMES):
                page_info.external.append(request.url)

        def route(r):  # nothing leaves the machine, even when a check fails
            if r.request.url.startswith(LOCAL_SCHEMES):
                r.continue_()
            else:
                r.abort()

        context.on("request", on_request)
        context.route("**/*", route)
        page = context.pages[0] if context.pages else context.new_page()
        page.on("pageerror", lambda e: page_info.errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and page_info.errors.append(m.text))
        page.on("websocket", lambda ws: page_info.external.append(ws.url))
        page.goto(page_info.url, wait_until="load", timeout=timeout_s * 1000)
        try:  # every chart drawn and every image decoded; a blank one is reported below
            page.wait_for_function(f"() => ({FIND})().every(e => e.ready)",
                                   timeout=timeout_s * 1000)
        except Exception as e:  # noqa: BLE001 - playwright's TimeoutError
            page_info.errors.append(f"not every chart or image finished: {e}".splitlines()[0])
        frames = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"
        page.evaluate(frames)
        found = page.evaluate(FIND)
        shot = Path(tmp) / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        # Side-by-side revisions (dvc plots diff) of a wide figure overflow the page to the
        # right, out of the full-page screenshot: those are shot on their own, scrolled into
        # view, and counted there.
        alone = {}
        for i, f in enumerate(found):
            x, _, w, _ = f["box"]
            if f.get("ok", True) and x + w > width:
                part = Path(tmp) / f"element{i}.png"
                page.locator(f'[data-ferpipe-check="{i}"]').screenshot(path=str(part))
                alone[i] = np.asarray(Image.open(part).convert("RGB"))
        context.close()
        pixels = np.asarray(Image.open(shot).convert("RGB"))
        if keep:
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, keep)
            page_info.screenshot = keep
    background = pixels[0, 0].astype(int)
    for i, f in enumerate(found):
        el = Element(f["kind"], f["id"], tuple(f["box"]))
        if i in alone:
            h, w = alone[i].shape[:2]
            el.drawn, el.colours = _count(alone[i], (0, 0, w, h), background)
        elif f.get("ok", True):
            el.drawn, el.colours = _count(pixels, el.box, background)
        page_info.elements.append(el)
    return page_info


def describe(page):
    """A failure message: what was blank, requested from outside, or raised."""
    lines = [f"page {page.url}"]
    lines += [f"  external request: {u}" for u in page.external]
    lines += [f"  blank {e.kind} #{e.id} at {e.box}: {e.drawn} pixels drawn, {e.colours} colours"
              for e in page.blank()]
    lines += [f"  error: {m}" for m in page.errors]
    return "\n".join(lines)


# Runs each vega-lite spec through the page's vega-lite and vega without drawing it, and
# lists the leaves of its scenegraph: what the chart would draw, with the data behind it.
SCENES = """async (specs) => {
  const out = [];
  for (const spec of specs) {
    const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), {renderer: 'none'});
    await view.runAsync();
    const items = [];
    // A datum's own values only: some (a voronoi cell's, a selection's) point back into the
    // scenegraph.
    const flat = d => d && typeof d === 'object' ? Object.fromEntries(
      Object.entries(d).filter(([, v]) => v === null || typeof v !== 'object')) : (d ?? null);
    const walk = (node, ctx) => {
      if (node.marktype !== undefined) {
        const inner = {...ctx, marktype: node.marktype, role: node.role, name: node.name || null};
        for (const i of node.items || []) walk(i, inner);
        return;
      }
      let inner = ctx;
      if (ctx.role === 'axis') inner = {...ctx, axis: node.datum.scale};
      else if (ctx.role === 'legend') inner = {...ctx, legend: Object.values(node.datum.scales)};
      if (!node.items) {
        const item = {...ctx, datum: flat(node.datum)};
        for (const k of ['text', 'opacity', 'fill', 'stroke', 'strokeDash', 'x', 'y'])
          if (node[k] !== undefined) item[k] = node[k];
        items.push(item);
      }
      for (const i of node.items || []) walk(i, inner);
    };
    walk(view.scenegraph().root, {});
    view.finalize();
    out.push(JSON.stringify(items));
  }
  return out;
}"""


def scenes(specs, page, timeout_s=60):
    """Each vega-lite spec (as `dvc plots show --json` gives it) compiled and run by the
    vega and vega-lite that `page` (a local HTML file, e.g. vendor/vega/offline.html)
    carries. Per spec, the leaf items of its scenegraph, each a dict with marktype, role and
    name of its mark, `axis` (the scale of the axis it belongs to) or `legend` (the scales of
    its legend) where it has one, its datum, and text, opacity, fill, stroke, strokeDash, x
    and y where set."""
    import json

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(Path(tmp) / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
            service_workers="block")
        context.route("**/*", lambda r: r.continue_() if r.request.url.startswith(LOCAL_SCHEMES)
                      else r.abort())
        tab = context.pages[0] if context.pages else context.new_page()
        tab.set_default_timeout(timeout_s * 1000)
        tab.goto(Path(page).resolve().as_uri(), wait_until="load")
        found = tab.evaluate(SCENES, list(specs))
        context.close()
    return [json.loads(s) for s in found]
