"""The list+watch machine as playbooks: given these answers, expect these requests and ops.

One test per rule of docs/specs/watch.md that ``edgemesh.meta.watch`` decides; no server, no
sockets, no sleeping (the machine only says how long to wait). The same rules run end to end
against tests/kubeapi.py in test_kube_source.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from edgemesh.errors import RemoteProtocolError
from edgemesh.meta import kinds
from edgemesh.meta.kubewire import ApiError, Expired, ListPage, WatchEvent
from edgemesh.meta.watch import (
    Clear,
    Commit,
    Delete,
    Failure,
    KindMachine,
    ListRequest,
    Recovered,
    Refused,
    ReplayDetected,
    Retry,
    Stage,
    Upsert,
    backoff,
)


class Edges:
    """A random source at its edges: the longest jitter, the shortest watch."""

    def uniform(self, a: float, b: float) -> float:
        return b

    def randint(self, a: int, b: int) -> int:
        return a


@dataclass(frozen=True)
class End:
    """The watch stream ended after ``events`` events and ``seconds`` (K6)."""
    events: int = 1
    seconds: float = 300.0
    dropped: bool = False


def machine(slot: str = "Service", required: bool | None = None, namespace: str = "",
            held: dict[tuple[str, str, str], tuple[str, str]] | None = None) -> KindMachine:
    return KindMachine(slot, kinds.BY_NAME[slot],
                       slot in ("Service", "EndpointSlice", "Namespace") if required is None
                       else required, namespace, backoff_max=30.0, optional_retry=60.0,
                       page_size=2, rng=Edges(),
                       held=lambda k, ns, name: (held or {}).get((k, ns, name)))


def svc(name: str, rv: str = "1", uid: str = "") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                         "uid": uid or f"uid-{name}"}}


def ev(etype: str, obj: dict[str, Any]) -> WatchEvent:
    return WatchEvent(etype, obj)


def bookmark(rv: str) -> WatchEvent:
    return WatchEvent("BOOKMARK", {"metadata": {"resourceVersion": rv}})


def status(code: int) -> WatchEvent:
    return WatchEvent("ERROR", {"kind": "Status", "code": code, "message": f"code {code}"})


def refused(code: int, retry_after: float = 0.0) -> Failure:
    error = Expired("gone") if code == 410 else ApiError(code, "no", retry_after)
    return Failure.of(Refused(code, error))


LIST0 = ("list", {"limit": "2", "resourceVersion": "0"})  # K2.6: the first list, from cache
LIST_FRESH = ("list", {"limit": "2"})  # K2.6: after a 410, a consistent read


def watch_from(rv: str) -> tuple[str, dict[str, str]]:
    params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
    return ("watch", {**params, "resourceVersion": rv} if rv else params)


def listed(*items: dict[str, Any], rv: str = "10", token: str = "") -> ListPage:
    return ListPage(list(items), rv, token)


def done(*items: dict[str, Any], count: int | None = None, kind: str = "Service",
         ns: str = "", failures: int = 0, error: str = "") -> list[Any]:
    """The ops of a list's last page."""
    return [Stage(list(items)), Commit(kind, ns, len(items) if count is None else count),
            Recovered(failures, error)]


def play(m: KindMachine, script: list[tuple[Any, Any]], now: float = 1000.0) -> None:
    """Run ``script``: ("list"|"watch", params) expects that request next; (answer, expected)
    feeds a page, an event, a stream end or a failure and expects those ops, that Retry, or
    that exception."""
    for step, (given, want) in enumerate(script):
        where = f"step {step}: {given!r}"
        if given in ("list", "watch"):
            req = m.next_request()
            kind = "list" if isinstance(req, ListRequest) else "watch"
            assert (kind, req.params) == (given, want), where
            continue
        if isinstance(want, type) and issubclass(want, BaseException):
            with pytest.raises(want):
                _feed(m, given, now)
            continue
        assert _feed(m, given, now) == want, where


def _feed(m: KindMachine, given: Any, now: float) -> Any:
    if isinstance(given, ListPage):
        return m.on_page(given)
    if isinstance(given, WatchEvent):
        return m.on_event(given)
    if isinstance(given, End):
        return m.on_watch_end(given.events, given.seconds, given.dropped)
    assert isinstance(given, Failure)
    return m.on_failure(given, now)


# ---- K2: lists ------------------------------------------------------------------------------

def test_k2_5_pages_follow_the_continue_token_and_keep_the_first_pages_rv():
    m = machine()
    play(m, [
        LIST0,
        (listed(svc("a"), svc("b"), rv="10", token="t1"), [Stage([svc("a"), svc("b")])]),
        ("list", {"limit": "2", "continue": "t1"}),  # K2.5: the token alone, no RV
        (listed(svc("c"), rv="", token=""), done(svc("c"), count=3)),
        watch_from("10"),  # K2.1: the list's RV, not an item's
    ])
    assert m.listed and not m.need_list


def test_k2_5_an_expired_continue_token_restarts_the_list_without_rv():
    m = machine()
    play(m, [
        LIST0,
        (listed(svc("a"), token="t1"), [Stage([svc("a")])]),
        ("list", {"limit": "2", "continue": "t1"}),
        (refused(410), Retry(0.0, "expired")),  # K5.2
        LIST_FRESH,
        (listed(svc("a"), rv="12"), done(svc("a"))),
        watch_from("12"),
    ])


def test_k2_5_a_page_that_fails_restarts_the_list_from_its_first_page():
    m = machine()
    play(m, [
        LIST0,
        (listed(svc("a"), token="t1"), [Stage([svc("a")])]),
        ("list", {"limit": "2", "continue": "t1"}),
        (Failure("connection refused"), Retry(0.8, "failed")),
        LIST0,  # same RV as before: only a 410 or failures in a row drop it
    ])


def test_k2_6_lists_ask_rv_0_first_and_none_after_a_410():
    m = machine()
    play(m, [
        LIST0, (Failure("refused"), Retry(0.8, "failed")),
        LIST0,  # a failure is not a 410: the cheap read again
        (refused(410), Retry(0.0, "expired")),
        LIST_FRESH, (Failure("refused"), Retry(1.6, "failed")),
        LIST_FRESH,  # still fresh until a list succeeds
        (listed(rv="10"), done(failures=2, error="refused")),
        watch_from("10"),
    ])
    assert m.list_rv == ""  # only a kind coming back from "feature off" lists at 0 again


def test_k10_3_an_empty_list_without_rv_watches_without_rv():
    play(machine(), [LIST0, (listed(rv=""), done()), watch_from("")])


# ---- K3, K4, K6: the watch ---------------------------------------------------------------------

def test_k3_k4_events_become_store_ops_and_every_rv_is_kept():
    m = machine()
    play(m, [
        LIST0, (listed(rv="10"), done()),
        watch_from("10"),
        (ev("ADDED", svc("a", "11")), [Upsert("Service", svc("a", "11"))]),
        (ev("MODIFIED", svc("a", "12")), [Upsert("Service", svc("a", "12"))]),
        (ev("DELETED", svc("a", "13")), [Delete("Service", "default", "a")]),
        (ev("DELETED", {"metadata": {"resourceVersion": "14"}}), []),  # no name: nothing to do
        (bookmark("20"), []),  # K4.3: only the RV moves
        (End(events=5), None),  # K6.1: a clean end
        watch_from("20"),  # K6: again at once, from the last RV seen
    ])


def test_k4_4_added_of_a_held_object_is_an_update():
    held = {("Service", "default", "a"): ("uid-a", "5")}
    m = machine(held=held)
    play(m, [
        LIST0, (listed(svc("a", "5"), rv="10"), done(svc("a", "5"))),
        watch_from("10"),
        (ev("ADDED", svc("a", "11")), [Upsert("Service", svc("a", "11"))]),
    ])
    assert not m.replays


def test_k6_3_a_dropped_stream_rewatches_from_the_last_rv():
    play(machine(), [
        LIST0, (listed(rv="10"), done()),
        watch_from("10"), (ev("ADDED", svc("a", "11")), [Upsert("Service", svc("a", "11"))]),
        (End(events=1, seconds=0.1, dropped=True), None),
        watch_from("11"),
    ])


def test_k6_a_stream_that_ends_at_once_and_empty_is_a_failure():
    m = machine()
    play(m, [
        LIST0, (listed(rv="10"), done()),
        watch_from("10"),
        (End(events=0, seconds=0.01), RemoteProtocolError),
        (Failure("watch stream ended at once without events"), Retry(0.8, "failed")),
        watch_from("10"),
    ])


# ---- K5: errors -------------------------------------------------------------------------------

def test_k5_1_an_error_event_410_relists_without_rv_and_backs_off_when_repeated():
    m = machine()
    play(m, [
        LIST0, (listed(rv="10"), done()),
        watch_from("10"),
        (status(410), Expired),
        (Failure.of(Expired("too old")), Retry(0.0, "expired")),  # the first: at once
        LIST_FRESH,
        (refused(410), Retry(0.8, "expired")),  # the second in a row: backoff
        LIST_FRESH,
        (refused(410), Retry(1.6, "expired")),
        LIST_FRESH, (listed(rv="30"), done()),
        watch_from("30"),
        (status(410), Expired),
        (Failure.of(Expired("too old")), Retry(0.0, "expired")),  # a list reset the count
    ])


def test_k5_3_a_504_relists_at_once():
    m = machine()
    play(m, [
        LIST0, (listed(rv="10"), done()),
        watch_from("10"),
        (refused(504), Retry(0.8, "failed")),
        LIST_FRESH,
    ])


def test_k5_4_other_errors_back_off_rewatch_and_relist_after_three():
    m = machine()
    play(m, [
        LIST0, (listed(rv="10"), done()),
        watch_from("10"),
        (status(500), ApiError),  # K10.4: the metaServer's ERROR events
        (Failure.of(ApiError(500, "stop to watch")), Retry(0.8, "failed")),
        watch_from("10"),
        (refused(503), Retry(1.6, "failed")),
        watch_from("10"),
        (refused(429, retry_after=10.0), Retry(10.0, "failed")),  # Retry-After, if longer
        LIST_FRESH,  # three in a row
        (listed(svc("a"), rv="40"), done(svc("a"), failures=3, error="429: no")),
        watch_from("40"),
    ])
    assert m.failures == 0 and m.last_error == "" and m.error_since == 0.0


def test_k5_4_backoff_doubles_to_the_cap_and_retry_after_is_capped_too():
    assert [backoff(n, 0.8, 5.0, Edges()) for n in range(1, 6)] == [0.8, 1.6, 3.2, 5.0, 5.0]
    m = machine()
    m.backoff_max = 5.0
    play(m, [LIST0, (refused(503, retry_after=3600.0), Retry(5.0, "failed"))])


def test_k5_4_the_first_failure_sets_since_and_an_event_clears_it():
    m = machine()
    play(m, [LIST0, (listed(rv="10"), done()), watch_from("10"),
              (Failure("reset by peer"), Retry(0.8, "failed"))], now=1000.0)
    play(m, [watch_from("10"), (Failure("refused"), Retry(1.6, "failed"))], now=1005.0)
    assert (m.failures, m.last_error, m.error_since) == (2, "refused", 1000.0)
    assert m.view()["failingSince"] == "1970-01-01T00:16:40Z"
    play(m, [watch_from("10"), (bookmark("11"), [Recovered(2, "refused")]),
             (bookmark("12"), [])])
    assert (m.failures, m.last_error, m.error_since) == (0, "", 0.0)


def test_k5_an_error_event_403_is_a_failure_even_for_an_optional_kind():
    m = machine("DestinationRule")
    play(m, [
        LIST0, (listed(rv="10"), done(kind="DestinationRule")),
        watch_from("10"),
        (Failure.of(ApiError(403, "forbidden")), Retry(0.8, "failed")),  # in the stream
        watch_from("10"),
    ])
    assert m.feature_off == ""


# ---- K1: what is listed, and what is refused ---------------------------------------------

def test_k1_endpointslices_refused_fall_back_to_endpoints():
    m = machine("EndpointSlice")
    play(m, [
        LIST0,
        (refused(404), Retry(0.0, "fallback", [Clear("EndpointSlice", "")],
                             reason="HTTP 404 for /apis/discovery.k8s.io/v1/endpointslices")),
        LIST0,
        (listed(rv="10"), done(kind="Endpoints")),
    ])
    assert m.kind is kinds.ENDPOINTS and m.path == "/api/v1/endpoints" and m.slot == "EndpointSlice"


@pytest.mark.parametrize("code", [403, 404])
def test_k1_an_optional_kind_refused_is_feature_off_and_retried_slowly(code):
    m = machine("DestinationRule")
    reason = f"HTTP {code} for /apis/networking.istio.io/v1beta1/destinationrules"
    off = Retry(66.0, "feature_off", [Clear("DestinationRule", "")], True, reason)
    play(m, [
        LIST0, (refused(code), off),
        LIST0, (refused(code), Retry(66.0, "feature_off", off.ops, False, reason)),  # said once
        LIST0, (listed(rv="10"), done(kind="DestinationRule")),  # installed later
    ])
    assert m.feature_off == "" and m.failures == 0


def test_k1_a_required_kind_refused_is_a_failure_not_feature_off():
    m = machine("Service")
    play(m, [LIST0, (refused(403), Retry(0.8, "failed")), LIST0])
    assert m.feature_off == "" and m.last_error == "403: no"


def test_k1_secrets_are_listed_in_one_namespace_and_a_403_clears_only_it():
    m = machine("Secret", namespace="blog")
    assert m.path == "/api/v1/namespaces/blog/secrets" and m.what == "Secret in blog"
    reason = "HTTP 403 for /api/v1/namespaces/blog/secrets"
    play(m, [
        LIST0, (refused(403), Retry(66.0, "feature_off", [Clear("Secret", "blog")], True,
                                    reason)),
        LIST0, (listed(rv="10"), done(kind="Secret", ns="blog")),
    ])


# ---- K10.4: a server that replays every watch ---------------------------------------------

def test_k10_4_a_replaying_server_is_relisted_before_every_rewatch():
    held = {("Service", "default", "a"): ("uid-a", "5")}
    m = machine(held=held)
    play(m, [
        LIST0, (listed(svc("a", "5"), rv="10"), done(svc("a", "5"))),
        watch_from("10"),
        (ev("ADDED", svc("a", "5")), [ReplayDetected(), Upsert("Service", svc("a", "5"))]),
        (ev("ADDED", svc("a", "5")), [Upsert("Service", svc("a", "5"))]),  # said once
        (End(events=2), None),
        LIST0,  # a replay never reports deletions made while no watch was open
        (listed(svc("a", "5"), rv="10"), done(svc("a", "5"))),
        watch_from("10"),
    ])
    assert m.replays


@pytest.mark.parametrize("held,since,why", [
    ({("Service", "default", "a"): ("uid-old", "5")}, "10", "recreated: a new uid"),
    ({}, "10", "not held"),
    ({("Service", "default", "a"): ("uid-a", "5")}, "", "a watch without RV replays anyway"),
])
def test_k10_4_what_is_not_a_replay(held, since, why):
    m = machine(held=held)
    play(m, [LIST0, (listed(rv=since), done()), watch_from(since),
             (ev("ADDED", svc("a", "5")), [Upsert("Service", svc("a", "5"))])])
    assert not m.replays, why


def test_failure_of_maps_the_loops_errors():
    assert Failure.of(Refused(404, ApiError(404, "nf"))) == Failure("404: nf", 404, 404)
    assert Failure.of(Refused(410, Expired("gone"))) == Failure("gone", 410, 410, expired=True)
    assert Failure.of(ApiError(500, "x", 2.0)) == Failure("500: x", 500, 0, 2.0)
    assert Failure.of(OSError("boom"), "refused") == Failure("refused")
