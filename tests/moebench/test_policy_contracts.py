"""A policy whose plug-in part breaks its contract fails its own case with one clear message, leaves no record, and
the session goes on with the next case (engine-side checks: tests/moeoffload/test_contracts.py)."""

import gc
import json
import os
import weakref
from pathlib import Path

import pytest
from tests.moeoffload.models import tiny_switch

from moebench.measure import CaseBroken, Session
from moebench.suite import Case, ModelSpec, Suite
from moebench.workload import Workload
from moeoffload import policies
from moeoffload.eviction import EVICTION_RULES, LRU

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "suites" / "switch"
BROKEN_MESSAGE = ("policy 'lru-bad': eviction rule OutsideVictim.victim() returned (999, 999), which is not one of "
                  "the * candidates; victim() must return one of the keys it is given")

PLUGIN = '''
from moeoffload import Policy
from moeoffload.eviction import EVICTION_RULES, LRU


class OutsideVictim(LRU):
    name = "outside-victim"

    def victim(self, candidates):
        return (999, 999)


def make_policy():
    EVICTION_RULES.setdefault(OutsideVictim.name, OutsideVictim)
    return Policy("lru-bad", "an LRU cache whose rule names an expert it was not offered", eviction=OutsideVictim.name)


def make_sound_policy():
    return Policy("lru-ok", "the built-in LRU rule under another name, registered after lru-bad")


def crash():
    raise RuntimeError("plugin bug")
'''


class OutsideVictim(LRU):
    name = "outside-victim"

    def victim(self, candidates):
        return (999, 999)


def test_a_broken_rule_fails_its_case_with_the_message_and_the_session_goes_on(monkeypatch):
    monkeypatch.setitem(EVICTION_RULES, OutsideVictim.name, OutsideVictim)
    broken = policies.Policy("lru-bad", "broken", eviction=OutsideVictim.name)
    monkeypatch.setitem(policies._REGISTRY, "lru-bad", broken)
    suite = Suite(name="tiny", models=[ModelSpec("tiny-switch", lambda tier, dtype, device: (tiny_switch(), "seeded"))],
                  budgets=["25%"], workload=Workload(batch_size=2, prompt_len=6, new_tokens=4),
                  policies=["lru-bad", "lru"])
    session = Session(suite, device="cpu", tier="quick", rounds=1)
    model, _ = session.model("tiny-switch")
    caches = []
    real_serve = session.serve

    def tracking_serve(*args, **kwargs):
        handle = real_serve(*args, **kwargs)
        caches.append(weakref.ref(handle.cache))
        return handle

    monkeypatch.setattr(session, "serve", tracking_serve)
    with pytest.raises(CaseBroken) as broken:
        session.run(Case("tiny-switch", "lru-bad", "25%"))
    message = str(broken.value)
    assert message.startswith("tiny-switch[lru-bad-25%]: policy 'lru-bad': eviction rule OutsideVictim.victim() "
                              "returned (999, 999), which is not one of the "), message
    assert not hasattr(broken.value, "record")  # nothing to store
    assert not hasattr(model, "_moeoffload"), "the broken case left its model offloaded"
    del broken
    gc.collect()
    assert caches and caches[-1]() is None, "the broken case's expert cache is still referenced"
    assert session.run(Case("tiny-switch", "lru", "25%"))["passed"]  # the same session goes on


@pytest.fixture
def bad_plugin_site(tmp_path, monkeypatch) -> Path:
    """A folder on the subprocess's PYTHONPATH holding an installed-looking package with two policy entry points:
    `lru-bad` (its rule breaks victim()'s contract), `lru-ok` (sound, its cases run after lru-bad's) and `crash`
    (its factory raises)."""
    site = tmp_path / "site"
    (site / "bad_policies").mkdir(parents=True)
    (site / "bad_policies" / "__init__.py").write_text(PLUGIN)
    dist = site / "bad_policies-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bad-policies\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[moeoffload.policies]\nlru-bad = bad_policies:make_policy\nlru-ok = bad_policies:make_sound_policy\n"
        "crash = bad_policies:crash\n")
    paths = (str(site), str(ROOT / "src"), os.environ.get("PYTHONPATH"))  # this checkout's engine, not an installed one
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    return site


def test_a_broken_plugin_policy_fails_its_case_and_the_next_case_passes(pytester, bad_plugin_site, tmp_path):
    hist = tmp_path / "hist"
    result = pytester.runpytest_subprocess(
        "--moebench", str(SUITE), "--moebench-tier", "quick", "--moebench-policy", "lru-bad", "--moebench-policy",
        "lru-ok", "--moebench-rounds", "1", "-k", "switch-base-8 and not 50", "--moebench-history", str(hist),
        "-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "*switch-base-8?lru-bad-25%?*FAILED*",
        "*switch-base-8?lru-ok-25%?*PASSED*",
        "switch-base-8[[]lru-bad-25%[]]: " + BROKEN_MESSAGE,  # the whole failure report: one line, no traceback
    ])
    assert "KeyError" not in result.stdout.str() and "Traceback" not in result.stdout.str()
    run = json.loads((hist / "history.jsonl").read_text().splitlines()[-1])
    assert sorted(r["case"] for r in run["records"]) == ["switch-base-8[lru-ok-25%]", "switch-base-8[resident-all]"]


def test_a_plugin_policy_whose_factory_raises_is_named_when_asked_for(pytester, bad_plugin_site):
    result = pytester.runpytest_subprocess("--moebench", str(SUITE), "--moebench-policy", "crash",
                                           "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--moebench-policy: policy entry point 'crash' (bad_policies:crash) failed to load: "
                                 "its factory raised RuntimeError: plugin bug; it must name a moeoffload.Policy or a "
                                 "callable that returns one; fix or uninstall the package that provides it*"])
