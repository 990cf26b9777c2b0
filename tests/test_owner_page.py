"""The data owners' web page in a real headless browser (the system's chromium through selenium), against a
real server on a copy of the tiny store: look up as the public and as the owner, sign in, remove a
document, follow the removal to verified, read and download the receipt.

Screenshots of each step go to $SILO_SCREENSHOTS (docs/screenshots/ holds a set), else to a temporary folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from silo.model.lm import SiloLM
from silo.serving.config import ServeConfig
from silo.serving.server import SiloServer

ADMIN = "admin-token-0123456789abcdef"
GCIDE = "gcide-secret-0123456789abcdef"
SHKSPR = "shakespeare-secret"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="the owner page test drives a browser with selenium")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no headless browser here: install Debian's chromium and chromium-driver (apt-get install -y chromium "
           "chromium-driver); .ci/run does so where it can")


@pytest.fixture()
def served(tiny_model, tiny_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)  # the removal edits the store: never the shared fixture
    cfg = ServeConfig(model=str(tiny_model), store=str(store), port=0, http_port=0, admin_token=ADMIN,
                      owner_tokens={"gcide": "sha256:" + hashlib.sha256(GCIDE.encode()).hexdigest(),
                                    "shksprdata": SHKSPR})
    server = SiloServer(cfg, lm=SiloLM.load(str(tiny_model), str(store), window=128, stride=64)).start()
    yield server, store
    server.dataowner.wait_background(120)
    server.stop()


@pytest.fixture()
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1000,1250",
                "--disable-extensions", "--no-first-run", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def left_page(b) -> bool:
    """The page that `press` marked is gone and its successor has loaded."""
    return bool(b.execute_script("return window.__siloOldPage === undefined && document.readyState === 'complete'"))


def test_owner_page_lookup_remove_follow_receipt(served, browser, tmp_path):
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server, store = served
    shots = Path(os.environ.get("SILO_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    url = server.http.url
    docs = [json.loads(x) for x in (store / "shards" / "gcide" / "documents.jsonl").read_text().splitlines()]
    gdoc = docs[0]
    passage = gdoc["text"][200:600]
    b = browser

    def shot(name):
        b.save_screenshot(str(shots / f"owner-{name}.png"))

    def text(css):
        return b.find_element(By.CSS_SELECTOR, css).text

    def press(element_id):  # click a button or link and wait until the next page has loaded in its place
        # a marker on the current page's window: the next page starts with a fresh window without it. Waiting
        # on an element of the old page instead asks chromium about a node that may be mid-teardown, which
        # some chromium releases answer with "Node with given id does not belong to the document"
        b.execute_script("window.__siloOldPage = true")
        for attempt in range(3):
            try:
                b.find_element(By.ID, element_id).click()
                break
            except WebDriverException:  # chromium may report the click's node as gone while the page swaps
                if left_page(b):
                    break  # the click went through: the next page is already here
                if attempt == 2:
                    raise
                time.sleep(0.5)
        WebDriverWait(b, 60, ignored_exceptions=(WebDriverException,)).until(left_page)

    def fill(field, value):
        el = b.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)

    # 1. the public: whether and how much, never where or whose
    b.get(url + "/owner")
    assert "Is my work in this datastore?" in b.title + text("h1")
    fill("text", passage)
    press("lookup-button")
    result = text("#lookup-result")
    assert "In the store" in result and "sentences" in result and gdoc["id"] not in b.page_source
    assert not b.find_elements(By.ID, "matches")
    shot("1-public-lookup")

    # 2. a wrong token is refused; the owner's token signs in
    fill("token", "not-a-token")
    press("signin-button")
    assert "not recognised" in text("#error")
    shot("2-wrong-token")
    fill("token", GCIDE)
    press("signin-button")
    assert text("#who") == "gcide"

    # 3. the owner sees its own documents among the matches
    fill("text", passage)
    press("lookup-button")
    assert gdoc["id"] in text("#matches")
    shot("3-owner-lookup")

    # 4. removing another owner's document is refused (403), nothing removed
    other = json.loads((store / "shards" / "shksprdata" / "documents.jsonl").read_text().splitlines()[0])["id"]
    fill("document_ids", other)
    fill("reason", "not mine")
    press("remove-button")
    assert "may only remove its own documents" in text("#error")

    # 5. the owner removes its document and follows it to verified
    fill("document_ids", gdoc["id"])
    fill("reason", "opt-out")
    shot("4-removal-form")
    press("remove-button")
    assert "/owner/removals/" in b.current_url
    rid = b.current_url.rsplit("/", 1)[1]
    first = text("#status")
    assert any(s in first for s in ("applied", "compacted", "verified"))
    shot("5-removal-applied")
    WebDriverWait(b, 180, poll_frequency=0.5, ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)
                  ).until(lambda d: any(s in d.find_element(By.ID, "status").text for s in ("verified", "failed")))
    assert "Status: verified" in text("#status") and "Verification passed" in text("#status"), text("#status")
    done = [li.get_attribute("data-step") for li in b.find_elements(By.CSS_SELECTOR, "#steps li.done")]
    assert done == ["received", "applied", "compacted", "verified"]
    shot("6-removal-verified")

    # 6. the receipt: a readable page and a JSON download
    assert b.find_element(By.ID, "receipt-json").get_attribute("download") is not None
    press("receipt-html")
    assert rid in text("#receipt") and "passed" in text("#receipt")
    shot("7-receipt")
    cookie = "silo_owner=" + b.get_cookie("silo_owner")["value"]
    req = urllib.request.Request(f"{url}/owner/removals/{rid}/receipt.json", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert "attachment" in r.headers["Content-Disposition"]
        receipt = json.loads(r.read())
    assert receipt["request_id"] == rid and receipt["verification"]["passed"]
    assert receipt["removed"]["documents"][0]["document_ids"] == [gdoc["id"]]

    # 7. the removal is live: the public lookup no longer finds the document; another owner cannot see it
    b.get(url + "/owner")
    fill("document_id", gdoc["id"])
    press("lookup-button")
    errors = b.find_elements(By.ID, "error")
    assert not errors, errors[0].text
    assert "Not in the store" in text("#lookup-result")
    from silo.serving.auth import Caller
    from silo.serving.http.owner_session import session_cookie

    other = urllib.request.Request(f"{url}/owner/removals/{rid}", headers={
        "Cookie": f"silo_owner={session_cookie(server, Caller('owner', 'shksprdata'))}"})
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(other, timeout=30)
    assert ei.value.code == 403
    raw = urllib.request.Request(f"{url}/owner/removals/{rid}", headers={"Cookie": f"silo_owner={GCIDE}"})
    with pytest.raises(urllib.error.HTTPError) as ei:  # a token is no session: the cookie never holds one
        urllib.request.urlopen(raw, timeout=30)
    assert ei.value.code == 401 and GCIDE not in cookie
