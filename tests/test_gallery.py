"""The A/B gallery (gallery.html): the page the batch report and `evaluate.py --ab` write, checked as HTML (every text
escaped, every link relative and resolving, nothing fetched from elsewhere), then opened in headless Chromium over
file:// and over a local static server: every video loads (readyState >= 2), every image shows, no request fails, no
script error, and a full-page screenshot is saved (its path is printed; run pytest with -s to see it).

The videos are real mp4s written by the project's own writer (utils.image_io.write_video: H.264, yuv420p, as train.py
writes them). Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe): no Python package
needed. Without a Chromium/Chrome binary the browser tests skip (Debian/Ubuntu: `apt-get install chromium`; or set
CHROMIUM=/path/to/chrome)."""
import base64
import fcntl
import functools
import html
import http.server
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import pytest

from evaluation.ab_report import write_ab_report
from evaluation.gallery import GALLERY_FILE, GalleryCell, GalleryRow, final_video, gallery_html, href
from jobs.report import summarize, write_results
from test_evaluate import write_metrics
from utils.image_io import write_video
from utils.prompts import slugify

XSS_PROMPT = 'a <b>bold</b> "chair" & <script>window.__xss = 1</script>'
PROMPTS = ["a DSLR photo of a hamburger", XSS_PROMPT, "a red apple"]
ARMS = ["vanilla", "ptd"]
SIZE = 64  # video frame side (train.py's sizes are multiples of 8: even, as yuv420p needs)


# ------------------------------------------------------------------------------------------------- fake outputs
def write_orbit_video(run: Path, iteration: int, color: tuple[int, int, int]) -> Path:
    """A tiny stand-in for train.py's 360-degree video, at its path: a square circling on grey."""
    frames = []
    for k in range(12):
        frame = np.full((SIZE, SIZE, 3), 90, np.uint8)
        x = int((SIZE - 16) * (0.5 + 0.5 * np.cos(2 * np.pi * k / 12)))
        frame[24:40, x:x + 16] = color
        frames.append(frame)
    path = run / "videos" / f"{iteration}_iteration" / f"video_rgb_{iteration}.mp4"
    write_video(frames, path, fps=12)
    return path


def write_png(path: Path) -> None:
    import imageio.v2 as imageio
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    imageio.imwrite(path, np.stack([np.tile(ramp, (48, 1))] * 3, -1), format="png")


def batch_row(prompt: str, arm: str, seed: int = 0, failed: str | None = None) -> dict:
    """A result row as jobs.job writes it."""
    done = failed is None
    return {"job": f"{slugify(prompt, 40)}__{arm}__s{seed}__0123abcd", "prompt": prompt, "arm": arm, "seed": seed,
            "key": "0123abcd", "status": "done" if done else "failed", "workspace": "elsewhere/moved", "attempts": 1,
            "host": "h", "clip": {"tiny": 20.0 + len(prompt) % 7 + (arm == "ptd")} if done else {},
            "matching_loss": (1.5 if arm == "vanilla" else 1.2) if done else None,
            "matching_loss_std": 0.1 if done else None, "num_points": 100 if done else None,
            "stage1_loss_prior": None, "stage1_loss_path": None,
            "stage_s": {"train": 60.0, "evaluate": 5.0} if done else {}, "wall_s": 65.0 if done else None,
            "error": failed}


@pytest.fixture(scope="module")
def batch_out(tmp_path_factory) -> Path:
    """A batch folder as batch.py leaves it: three prompts x vanilla/ptd (one failed), videos in the workspaces, a
    plot; results written by the real report writer."""
    out = tmp_path_factory.mktemp("batch")
    rows = []
    for prompt in PROMPTS:
        for arm in ARMS:
            failed = "train: <oops> & gone" if (prompt, arm) == ("a red apple", "ptd") else None
            rows.append(batch_row(prompt, arm, failed=failed))
            if not failed:
                write_orbit_video(out / "runs" / rows[-1]["job"], 8, (230, 60, 40) if arm == "ptd" else (40, 90, 230))
    write_png(out / "summary.png")
    write_results(out, rows, summarize(rows, ARMS), ["# Batch results: 6 jobs", "", "config: smoke <x> & y"])
    return out


@pytest.fixture(scope="module")
def ab_out(tmp_path_factory) -> Path:
    """Two runs whose folder names need percent-encoding, and their A/B report in a sibling folder."""
    base = tmp_path_factory.mktemp("ab")
    vanilla, ptd = base / "bagel #1 vanilla", base / "bagel?ptd"
    write_metrics(vanilla, "off", [3.0, 2.5, 2.0], [20.0, 22.0, 24.0])
    write_metrics(ptd, "weighted", [1.5, 1.4, 1.3], [21.0, 24.0, 26.0])
    write_orbit_video(vanilla, 1, (40, 90, 230))  # an early video and the final one: the final one is shown
    write_orbit_video(vanilla, 21, (40, 90, 230))
    write_orbit_video(ptd, 21, (230, 60, 40))
    write_ab_report(vanilla, ptd, base / "ab out")
    return base / "ab out"


def links(page: str) -> list[str]:
    """Every src/href of the page but the inline empty favicon."""
    return [html.unescape(m) for m in re.findall(r'(?:src|href)="([^"]*)"', page) if m != "data:,"]


# ------------------------------------------------------------------------------------------------- the HTML
def test_href_is_relative_and_percent_encoded(tmp_path):
    target = tmp_path / "runs" / "bagel #1" / "a?b c.mp4"
    assert href(target, tmp_path / "ab out") == "../runs/bagel%20%231/a%3Fb%20c.mp4"
    assert href(tmp_path / "x.png", tmp_path) == "x.png"


def test_final_video_is_the_last_iterations_rgb_video(tmp_path):
    assert final_video(tmp_path) is None
    write_orbit_video(tmp_path, 8, (255, 0, 0))
    last = write_orbit_video(tmp_path, 24, (255, 0, 0))
    shutil.copy(last, last.with_name("video_depth_24.mp4"))
    (tmp_path / "videos" / "30_iteration").mkdir()
    (tmp_path / "videos" / "30_iteration" / "video_rgb_30.mp4").write_bytes(b"")  # a write that never finished
    assert final_video(tmp_path) == last


def test_gallery_html_escapes_every_text():
    row = GalleryRow("<img src=x onerror=alert(1)>", "seed <0>",
                     {"a&b": GalleryCell(video='v"1.mp4', numbers=(("<n>", "<v>"),), note="<err>", failed=True)})
    page = gallery_html("<t>", ["a&b", "missing"], [row], plots=["p'1.png"], notes=["<note>"],
                        links=[("<l>", "x.md")])
    body = page.split("<body>", 1)[1]
    assert "<img src=x" not in body and "<t>" not in page and "<n>" not in body and "<err>" not in body
    assert "&lt;img src=x onerror=alert(1)&gt;" in body and "&lt;note&gt;" in body and "a&amp;b" in body
    assert 'src="v&quot;1.mp4"' in body and "p&#x27;1.png" in body
    assert "no job" in body  # the arm without a cell
    assert body.count("<script>") == 1  # ours only


def test_batch_gallery_shows_every_prompt_with_local_links(batch_out):
    page = (batch_out / GALLERY_FILE).read_text()
    assert page.count("<video ") == 5 and page.count('class="prompt-row"') == 3
    assert "<script>window.__xss" not in page and html.escape(XSS_PROMPT) in page
    assert "failed: train: &lt;oops&gt; &amp; gone" in page and "matching loss" in page and "CLIP tiny" in page
    assert "config: smoke &lt;x&gt; &amp; y" in page
    assert str(batch_out) not in page  # nothing absolute: the folder can move
    for url in links(page):
        assert not re.match(r"[a-z]+:|/", url), url  # no scheme (http:, file:, data:), no absolute path, no CDN
        assert (batch_out / unquote(url)).is_file(), url
    assert "summary.png" in links(page) and "results.md" in links(page)


def test_ab_gallery_links_the_runs_final_videos(ab_out):
    page = (ab_out / GALLERY_FILE).read_text()
    videos = [u for u in links(page) if u.endswith(".mp4")]
    assert sorted(set(videos)) == ["../bagel%20%231%20vanilla/videos/21_iteration/video_rgb_21.mp4",
                                   "../bagel%3Fptd/videos/21_iteration/video_rgb_21.mp4"]
    assert "ab_report.png" in links(page) and "2.0000 ± 0.1000" in page and "1.3000 ± 0.1000" in page
    for url in links(page):
        assert (ab_out / unquote(url)).is_file(), url


# ------------------------------------------------------------------------------------------------- the browser
class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (JSON messages ending in NUL on fds 3 and 4)."""

    NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

    @classmethod
    def find(cls) -> str | None:
        return os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, cls.NAMES)), None)

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="gallery_chromium_")
        self.log = open(Path(self.profile) / "stderr.log", "w+")
        to_browser, from_us = os.pipe()
        to_us, from_browser = os.pipe()
        # above 4, so that the shell's redirections onto fds 3 and 4 cannot overwrite one another
        to_browser, from_browser = (self._above_4(fd) for fd in (to_browser, from_browser))
        argv = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--mute-audio", "--remote-debugging-pipe", f"--user-data-dir={self.profile}", "about:blank"]
        # the browser reads commands on fd 3 and writes replies on fd 4 (a shell would do, but dash refuses fds > 9)
        onto_3_and_4 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                       "os.execvp(sys.argv[3], sys.argv[3:])"
        self.proc = subprocess.Popen([sys.executable, "-c", onto_3_and_4, str(to_browser), str(from_browser), *argv],
                                     pass_fds=(to_browser, from_browser), stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        os.close(to_browser)
        os.close(from_browser)
        self.out, self.inbox, self.events, self.next_id = os.fdopen(from_us, "wb"), queue.Queue(), [], 0
        threading.Thread(target=self._read, args=(to_us,), daemon=True).start()

    @staticmethod
    def _above_4(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
        os.close(fd)
        return moved

    def _read(self, fd: int) -> None:
        buffer = b""
        while chunk := os.read(fd, 1 << 20):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for message in messages:
                self.inbox.put(json.loads(message))
        self.inbox.put(None)

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def _next(self, deadline: float) -> dict:
        try:
            message = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"Chromium did not answer in time; its stderr:\n{self.stderr()}") from None
        if message is None:
            raise RuntimeError(f"Chromium closed the DevTools pipe; its stderr:\n{self.stderr()}")
        return message

    def send(self, method: str, session: str | None = None, timeout: float = 30.0, **params) -> dict:
        self.next_id += 1
        request = {"id": self.next_id, "method": method, "params": params}
        if session:
            request["sessionId"] = session
        try:
            self.out.write(json.dumps(request).encode() + b"\0")
            self.out.flush()
        except BrokenPipeError:
            raise RuntimeError(f"Chromium exited (code {self.proc.poll()}); its stderr:\n{self.stderr()}") from None
        deadline = time.monotonic() + timeout
        while True:
            message = self._next(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_event(self, method: str, session: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method and event.get("sessionId") == session:
                    return event
            self.events.append(self._next(deadline))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
            self.proc.wait(timeout=10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the browser and its helpers only
            self.proc.wait()
        try:
            self.out.close()
        except BrokenPipeError:
            pass
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def chromium():
    exe = Chromium.find()
    if exe is None:
        pytest.skip("no Chromium/Chrome binary (looked for " + ", ".join(Chromium.NAMES) + " and $CHROMIUM): install "
                    "one to run the gallery's browser checks (Debian/Ubuntu: apt-get install chromium)")
    browser = Chromium(exe)
    try:
        version = browser.send("Browser.getVersion", timeout=60)["product"]
    except (RuntimeError, TimeoutError) as err:
        browser.close()
        pytest.skip(f"{exe} does not start headless here (a snap shim in a container?): {err}")
    print(f"browser: {version} ({exe})")
    yield browser
    browser.close()


# Scrolls each video into view (the page plays the videos in view) and waits until it has a frame or failed; then
# reports what the page shows.
PAGE_CHECK = """(async () => {
  const ready = (v) => new Promise((resolve) => {
    if (v.readyState >= 2 || v.error) return resolve();
    v.addEventListener("loadeddata", resolve, {once: true});
    v.addEventListener("error", resolve, {once: true});
    setTimeout(resolve, 20000);
  });
  const videos = [...document.querySelectorAll("video")];
  for (const v of videos) { v.scrollIntoView(); await ready(v); }
  const images = [...document.images];
  await Promise.all(images.map((i) => i.complete ? null : new Promise((r) => { i.onload = i.onerror = r; })));
  window.scrollTo(0, 0);
  await new Promise((r) => setTimeout(r, 500));
  return JSON.stringify({
    videos: videos.map((v) => ({src: v.currentSrc, readyState: v.readyState, error: v.error && v.error.code,
                                width: v.videoWidth, playing: !v.paused})),
    images: images.map((i) => ({src: i.currentSrc, shown: i.complete && i.naturalWidth > 0})),
    prompts: [...document.querySelectorAll("td.prompt")].map((td) => td.firstChild.textContent),
    injected: window.__xss === undefined ? null : window.__xss,
  });
})()"""


def open_page(browser: Chromium, url: str, screenshot: Path) -> dict:
    """Load `url` in a new tab; returns what PAGE_CHECK saw plus the failed requests and script errors, and saves a
    full-page screenshot."""
    target = browser.send("Target.createTarget", url="about:blank")["targetId"]
    session = browser.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    try:
        for domain in ("Network", "Page", "Runtime"):
            browser.send(f"{domain}.enable", session)
        browser.send("Emulation.setDeviceMetricsOverride", session, width=1100, height=800, deviceScaleFactor=1,
                     mobile=False)
        browser.events.clear()
        browser.send("Page.navigate", session, url=url)
        browser.wait_event("Page.loadEventFired", session)
        result = browser.send("Runtime.evaluate", session, timeout=120, expression=PAGE_CHECK, awaitPromise=True,
                              returnByValue=True)
        seen = json.loads(result["result"]["value"])
        size = browser.send("Page.getLayoutMetrics", session)["cssContentSize"]
        shot = browser.send("Page.captureScreenshot", session, format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot of {url}: {screenshot}")
    finally:
        browser.send("Target.closeTarget", targetId=target)
    mine = [e for e in browser.events if e.get("sessionId") == session]
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in mine
            if e["method"] == "Network.requestWillBeSent"}
    failed = [f"{urls.get(e['params']['requestId'], '?')}: {e['params']['errorText']}" for e in mine
              if e["method"] == "Network.loadingFailed" and not e["params"].get("canceled")]
    failed += [f"{e['params']['response']['url']}: HTTP {e['params']['response']['status']}" for e in mine
               if e["method"] == "Network.responseReceived" and e["params"]["response"]["status"] >= 400]
    errors = [e["params"]["exceptionDetails"].get("text") for e in mine if e["method"] == "Runtime.exceptionThrown"]
    return {**seen, "failed_requests": failed, "script_errors": errors}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def static_server():
    """`python -m http.server` in-process: serve(root) -> base URL."""
    servers = []

    def serve(root: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(QuietHandler, directory=str(root)))
        server.handle_error = lambda request, address: None  # the browser dropping a media connection early
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def page_url(scheme: str, page: Path, root: Path, serve) -> str:
    """file:// URL of the page, or its URL on a static server whose root is `root`."""
    if scheme == "file":
        return page.as_uri()
    return serve(root) + "/".join(quote(p) for p in page.relative_to(root).parts)


def assert_page_works(seen: dict, videos: int, images: int) -> None:
    assert not seen["failed_requests"], seen["failed_requests"]
    assert not seen["script_errors"], seen["script_errors"]
    assert len(seen["videos"]) == videos and len(seen["images"]) == images, seen
    for video in seen["videos"]:
        assert video["readyState"] >= 2 and video["error"] is None and video["width"] == SIZE, video
    assert seen["videos"][0]["playing"], seen["videos"][0]  # the first row is in view: the page plays it
    assert all(image["shown"] for image in seen["images"]), seen["images"]
    assert seen["injected"] is None  # the prompt's <script> stayed text


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_batch_gallery_plays_in_chromium(chromium, static_server, batch_out, scheme, tmp_path):
    url = page_url(scheme, batch_out / GALLERY_FILE, batch_out, static_server)
    seen = open_page(chromium, url, tmp_path / f"batch_gallery_{scheme}.png")
    assert_page_works(seen, videos=5, images=1)
    assert [p.strip() for p in seen["prompts"]] == PROMPTS  # shown as typed, markup and all
    assert (tmp_path / f"batch_gallery_{scheme}.png").stat().st_size > 0


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_ab_gallery_plays_in_chromium(chromium, static_server, ab_out, scheme, tmp_path):
    url = page_url(scheme, ab_out / GALLERY_FILE, ab_out.parent, static_server)  # served from above the runs
    seen = open_page(chromium, url, tmp_path / f"ab_gallery_{scheme}.png")
    assert_page_works(seen, videos=2, images=1)


def test_the_browser_check_sees_a_broken_gallery(chromium, tmp_path):
    """The check itself: a page whose video and plot are missing fails it."""
    page = gallery_html("broken", ["a"], [GalleryRow("p", cells={"a": GalleryCell(video="gone.mp4")})],
                        plots=["gone.png"])
    (tmp_path / GALLERY_FILE).write_text(page)
    seen = open_page(chromium, (tmp_path / GALLERY_FILE).as_uri(), tmp_path / "broken.png")
    assert any("gone.mp4" in f for f in seen["failed_requests"]) and any("gone.png" in f
                                                                         for f in seen["failed_requests"])
    assert seen["videos"][0]["readyState"] < 2 and not seen["images"][0]["shown"]
