"""Output controls with the tiny real model and store: the output policy, the verbatim guard (kNN and RIC),
verbatim span evidence and licence notices."""

from __future__ import annotations

import shutil

import pytest
import torch

from silo.core.config import ConfigError, validate
from silo.datastore.format import StoredDocument
from silo.model.lm import SiloLM
from silo.model.output_policy import OutputPolicy
from silo.model.request import OutputControls
from silo.model.sampling import SamplingParams
from silo.model.types import SiloInputError
from silo.model.verbatim import SuffixMatch, longest_suffix_in, matching_spans

CAP = 32
COPY = dict(k=4, lmbda=1.0, tau=0.01)  # a mixture that continues a quoted passage from its source
GREEDY = SamplingParams(max_new_tokens=60, temperature=0)


def capped(cap=CAP, **rules) -> OutputPolicy:
    return OutputPolicy.model_validate({"tiers": {"by": {"max_verbatim_chars": cap}}, **rules})


@pytest.fixture(scope="module")
def lm(tiny_model, tiny_store):
    return SiloLM.load(str(tiny_model), str(tiny_store), window=128, stride=64)


def longest_verbatim(lm, text: str) -> tuple[int, str]:
    """The exact longest common substring of `text` with any store document: (length, document id)."""
    best = (0, "")
    for shard in lm.store.shards:
        for d in shard.documents:
            n = max((longest_suffix_in(text[:i], d.text) for i in range(1, len(text) + 1)), default=0)
            best = max(best, (n, d.id))
    return best


def quote(doc: StoredDocument, at: int) -> str:
    start = doc.text.find("\n", at) + 1
    q = doc.text[start:start + 60]
    return q[:q.rfind(" ")]


@pytest.fixture(scope="module")
def copying(lm):
    """(prompt, uncapped completion, its longest verbatim span, that document's id): the quote of a stored
    play that the copying mixture continues furthest."""
    plays = [d for sh in lm.store.shards for d in sh.documents if d.domain == "shakespeare"]
    best = None
    for doc in plays:
        for at in (1000, 3000):
            prompt = quote(doc, at)
            comp = lm.complete(prompt, GREEDY, lm.retriever("knn", **COPY))
            n, doc_id = longest_verbatim(lm, comp.text)
            if best is None or n > best[2]:
                best = (prompt, comp, n, doc_id)
    assert best[2] > CAP + 8, f"no quote was continued verbatim past {CAP} characters: {best}"
    return best


def test_policy_rules_combine_to_the_strictest():
    p = OutputPolicy.model_validate({
        "all": {"max_verbatim_chars": 200},
        "tiers": {"by": {"max_verbatim_chars": 80}, "copyleft": {"notice": "none"}},
        "owners": {"alice": {"max_verbatim_chars": 40, "allow": False}, "bob": {"notice": "required"}}})
    assert p.rule("carol", "CC-BY-2.5").cap == 80 and p.rule("carol", "CC-BY-2.5").notice  # by: notice by default
    assert p.rule("alice", "CC-BY-2.5").cap == 40 and not p.rule("alice", "CC-BY-2.5").allow
    assert p.rule("carol", "MIT").cap == 200 and not p.rule("carol", "MIT").notice
    assert not p.rule("carol", "GPL-2.0-or-later").notice  # the operator turned the tier's default off
    assert p.rule("bob", "MIT").notice and p.rule("carol", "MIT AND CC-BY-NC-4.0").notice  # nc by default
    assert p.guarded and not OutputPolicy().guarded and OutputPolicy().rule("x", "CC-BY-4.0").cap is None
    # a request tightens, never loosens
    assert p.restricted(max_verbatim_chars=500).rule("carol", "CC-BY-2.5").cap == 80
    r = p.restricted(max_verbatim_chars=50, exclude_owners=["bob"], exclude_tiers=["sw"], notices=True)
    assert r.rule("carol", "CC-BY-2.5").cap == 50 and r.rule("alice", "MIT").cap == 40
    assert not r.rule("bob", "LicenseRef-PublicDomain").allow and not r.rule("carol", "MIT").allow
    assert r.rule("carol", "LicenseRef-PublicDomain").notice and r.rule("carol", "LicenseRef-PublicDomain").allow
    assert r.restricted(max_verbatim_chars=900).rule("carol", "CC-BY-2.5").cap == 50
    # a request's controls are checked where they are made, naming the field
    with pytest.raises(SiloInputError) as err:
        OutputControls(max_verbatim_chars=3)
    assert err.value.field == "max_verbatim_chars" and err.value.renamed("params.max_verbatim_chars").field == \
        "params.max_verbatim_chars"
    with pytest.raises(SiloInputError, match=r"exclude_tiers\[0\]: unknown tier"):
        OutputControls(exclude_tiers=["free-ish"])
    assert OutputControls(max_verbatim_chars=50, exclude_owners=["bob"], exclude_tiers=["sw"], require_notices=True
                          ).policy(p).rule("carol", "CC-BY-2.5").cap == 50


def test_policy_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"output_policy\.tiers.*unknown licence tier"):
        validate(OutputPolicy, {"tiers": {"permissive": {}}}, prefix="output_policy", source="c.yaml")
    with pytest.raises(ConfigError, match=r"output_policy\.owners\.x\.max_verbatim_chars"):
        validate(OutputPolicy, {"owners": {"x": {"max_verbatim_chars": 2}}}, prefix="output_policy", source="c.yaml")
    with pytest.raises(ConfigError, match=r"output_policy\.tiers\.by\.notice"):
        validate(OutputPolicy, {"tiers": {"by": {"notice": "sometimes"}}}, prefix="output_policy", source="c.yaml")


def test_guard_keeps_every_span_within_the_cap(lm, copying):
    prompt, uncapped, n_uncapped, doc_id = copying
    comp = lm.complete(prompt, GREEDY, lm.retriever("knn", **COPY), policy=capped())
    n, _ = longest_verbatim(lm, comp.text)
    assert n <= CAP < n_uncapped
    assert comp.guard_events, "the guard must have steered away from the quoted play"
    ev = comp.guard_events[0]
    assert ev.document_id == doc_id and ev.owner == "shksprdata" and ev.cap == CAP and ev.span <= CAP
    assert ev.blocked_tokens >= 1 and 0.0 <= ev.blocked_mass <= 1.0
    # identical until the guard acted, then it parts from the quoted play
    assert comp.text[:ev.offset] == uncapped.text[:ev.offset] and comp.text != uncapped.text
    for seed in range(3):  # sampled completions too
        s = lm.complete(prompt, SamplingParams(max_new_tokens=60, temperature=1.0, seed=seed),
                        lm.retriever("knn", **COPY), policy=capped())
        assert longest_verbatim(lm, s.text)[0] <= CAP
    # an owner rule stricter than the tier's, and a request that tightens the operator's policy
    for policy, cap in ((capped(owners={"shksprdata": {"max_verbatim_chars": 20}}), 20),
                        (capped().restricted(max_verbatim_chars=16), 16)):
        c = lm.complete(prompt, GREEDY, lm.retriever("knn", **COPY), policy=policy)
        assert longest_verbatim(lm, c.text)[0] <= cap and all(e.cap == cap for e in c.guard_events)


def test_blocked_tokens_are_exactly_those_that_pass_the_cap(lm, copying):
    """Against brute force: every token appended to the completion so far, longest span measured from
    scratch with binary search."""
    prompt, uncapped, _, doc_id = copying
    doc = next(d for sh in lm.store.shards for d in sh.documents if d.id == doc_id).text
    guard = lm.guard(lm.retriever("knn", **COPY), capped())
    texts = guard.tokens.texts
    checked = 0
    for cut in range(len(uncapped.text)):
        text = uncapped.text[:cut]
        m = SuffixMatch.start(doc, text)
        if not CAP - 12 <= m.length <= CAP:
            continue
        guard.text = text
        got = set(guard.blocked(m, CAP).tolist())
        want = {t for t, s in enumerate(texts) if s and max(
            longest_suffix_in((text + s)[:cut + j], doc) for j in range(1, len(s) + 1)) > CAP}
        assert got == want, (cut, sorted(got ^ want)[:10])
        checked += 1
        if checked >= 6:
            break
    assert checked >= 2


def test_disallowed_documents_never_surface_in_generation(lm, copying):
    prompt = copying[0]
    knn = lm.retriever("knn", **COPY)
    policy = OutputPolicy.model_validate({"owners": {"shksprdata": {"allow": False}}})
    plays = next(i for i, sh in enumerate(lm.store.shards) if sh.documents[0].owner == "shksprdata")
    comp = lm.complete(prompt, GREEDY, knn, policy=policy)
    steps = [st for st in comp.steps if st.token >= 0]
    assert steps and all(sh != plays for st in steps for sh, _, _ in st.support.neighbors)
    assert all(s.owner != "shksprdata" for a in comp.attributions for s in a.sources)
    assert all(n.owner != "shksprdata" for n in comp.notices)
    # retrieved for scoring all the same (the output policy applies to generation only)
    doc = lm.store.shards[plays].documents[1].text[1000:2000]
    res = lm.score([doc], lm.retriever("knn", k=16, lmbda=0.5, tau=1.0))[0]
    assert res.perplexity < 0.5 * res.perplexity_parametric


def test_span_evidence_points_to_the_exact_text(lm, copying):
    _, comp, n, doc_id = copying
    docs = {d.id: d.text for sh in lm.store.shards for d in sh.documents}
    spans = [(a, s) for a in comp.attributions for s in a.spans]
    assert spans and max(s.end - s.start for _, s in spans) >= min(n, 20)
    assert any(s.document_id == doc_id for _, s in spans)
    for a, s in spans:
        assert comp.text[s.start:s.end] == docs[s.document_id][s.doc_start:s.doc_end]
        assert a.start <= s.start < s.end <= a.end and s.end - s.start >= 20 and s.owner and s.shard
    assert sum(a.tokens for a in comp.attributions) == len(comp.tokens)
    # the matcher itself: greedy maximal spans starting at words, offsets exact
    doc = "It was the best of times, it was the worst of times."
    text = "so it was the worst of times, and then the best of times!"
    found = matching_spans(text, 0, len(text), doc, 10)
    assert [text[a:b] for a, b, _ in found] == [" it was the worst of times", " the best of times"]
    assert all(doc[d:d + b - a] == text[a:b] for a, b, d in found)


def test_notices_for_sources_whose_licence_requires_one(lm, copying):
    _, comp, _, doc_id = copying
    assert comp.notices, "CC-BY sources need a notice by default"
    n = next(x for x in comp.notices if x.document_id == doc_id)
    d = next(d for sh in lm.store.shards for d in sh.documents if d.id == doc_id)
    assert (n.title, n.owner, n.license) == (d.title, "shksprdata", "CC-BY-2.5") and n.source == d.source
    assert n.share >= 0.05 and d.title in n.text() and "CC-BY-2.5" in n.text()
    quiet = OutputPolicy.model_validate({"tiers": {"by": {"notice": "none"}, "copyleft": {"notice": "none"}}})
    assert lm.complete(copying[0], GREEDY, lm.retriever("knn", **COPY), policy=quiet).notices == []
    high = OutputPolicy.model_validate({"notice_min_share": 1.0})
    assert all(x.share >= 1.0 for x in lm.complete(copying[0], GREEDY, lm.retriever("knn", **COPY),
                                                   policy=high).notices)


@pytest.fixture(scope="module")
def ric_lm(tmp_path_factory, tiny_model, tiny_store):
    from transformers import AutoTokenizer

    from silo.datastore.blocks import build_blocks

    path = tmp_path_factory.mktemp("guard-ric") / "store"
    shutil.copytree(tiny_store, path)
    build_blocks(path, AutoTokenizer.from_pretrained(tiny_model), block_tokens=32, stride=16, retrievers=("bm25",),
                 progress=False)
    return SiloLM.load(str(tiny_model), str(path))


def test_ric_guard_follows_the_prepended_block(ric_lm):
    lm = ric_lm
    doc = next(d for sh in lm.store.shards for d in sh.documents if d.domain == "shakespeare")
    prompt = quote(doc, 3000)
    ric = lm.retriever("ric")
    guard = lm.guard(ric, capped())
    ids, state = ric.prepare(lm, lm.prompt_ids(prompt), GREEDY, allowed=guard.allowed)
    assert state.blocks and len(ids) > len(lm.prompt_ids(prompt))
    hit = state.blocks[0][0]
    key = (hit.shard << 32) | hit.doc
    assert key in set(ric.documents(state).tolist())
    # the block's document is followed from the first step: a completion repeating its text is measured,
    # and once past the cap no token may continue it
    block_doc = lm.store.document(hit.shard, hit.doc)
    guard.observe(block_doc.text[:50], ric.documents(state))
    assert guard.longest[key] == 50 and key in guard.exclude().tolist()
    p = guard.adjust(torch.full((lm.vocab_size,), 1.0 / lm.vocab_size, dtype=torch.float64))
    assert guard.events and guard.events[-1].document_id == block_doc.id
    cont = guard.tokens.starting_with(block_doc.text[50])
    assert len(cont) and float(p[torch.from_numpy(cont)].sum()) == 0.0 and float(p.sum()) == pytest.approx(1.0)
    comp = lm.complete(prompt, GREEDY, lm.retriever("ric"), policy=capped())
    assert longest_verbatim(lm, comp.text)[0] <= CAP
    assert comp.attributions and all(sp.document_id for a in comp.attributions for sp in a.spans)
    # a disallowed owner's blocks are never prepended
    policy = OutputPolicy.model_validate({"owners": {hit.owner: {"allow": False}}})
    _, state2 = ric.prepare(lm, lm.prompt_ids(prompt), GREEDY, allowed=lm.guard(ric, policy).allowed)
    assert state2.blocks and all(h.owner != hit.owner for h, _ in state2.blocks)


def test_generate_cli_prints_spans_notices_and_guard_events(tmp_path, tiny_model, tiny_store, copying, capsys):
    import yaml

    from silo.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "lm": {"model": str(tiny_model), "store": str(tiny_store)},
        "knn": {"mixture": "fixed", "k": COPY["k"], "lmbda": COPY["lmbda"], "tau": COPY["tau"]},
        "output_policy": {"tiers": {"by": {"max_verbatim_chars": 200}}}}))
    argv = ["generate", "--config", str(cfg), "--max-tokens", "60", copying[0]]
    assert main(argv) == 0
    free = capsys.readouterr().out
    assert "verbatim: completion [" in free and "licence notices:" in free and "CC-BY-2.5" in free
    assert "[guard:" not in free  # 200 is not reached
    assert main(argv + ["--max-verbatim-chars", "24"]) == 0  # the command line tightens the file's cap
    out = capsys.readouterr().out
    assert "verbatim (cap 24)" in out and "[guard: at character" in out
    cfg.write_text(cfg.read_text().replace("by:", "permissive:"))
    assert main(argv) == 2
    assert "output_policy.tiers" in capsys.readouterr().err
