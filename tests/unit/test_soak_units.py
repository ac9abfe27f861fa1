"""The soak drill's logic without servers: the kill schedule, the RSS figures, what counts as a failure."""

from __future__ import annotations

from collections import Counter

from bench import soak


def test_kill_order_is_a_shuffled_cycle_fixed_by_the_seed():
    order = soak.kill_order(3, 20)
    assert order == soak.kill_order(3, 20)
    assert order != soak.kill_order(4, 20)
    for start in range(0, 18, 6):  # every cycle holds every kind once
        assert sorted(order[start:start + 6]) == sorted(soak.KINDS)
    assert all(a != b for a, b in zip(order, order[1:], strict=False)), "never one kind twice in a row"
    assert sorted(soak.kill_order(3, 6)) == sorted(soak.KINDS)


def test_kill_times_start_five_seconds_in_and_stay_inside_the_window():
    assert soak.kill_times(1200, 60) == [5.0 + 60 * k for k in range(20)]
    assert soak.kill_times(156, 30) == [5.0, 35.0, 65.0, 95.0, 125.0, 155.0]
    assert soak.kill_times(150, 30) == [5.0, 35.0, 65.0, 95.0, 125.0]


def samples(*points: tuple[float, float, int]) -> list[soak.Sample]:
    return [soak.Sample(t, pid=1, rss=int(mb * 2**20), age_s=age) for t, mb, age in points]


def test_rss_compares_the_median_of_the_first_and_last_third_after_warm_up():
    series = {
        # 300 MB throughout; a restart at 50 s whose first 30 s (lower) are left out
        "flat": samples((5, 300, 60), (10, 300, 65), (50, 120, 1), (70, 300, 40), (95, 301, 65), (99, 299, 69)),
        "leak": samples((5, 100, 60), (20, 102, 75), (70, 120, 125), (90, 130, 145)),
        "short": samples((5, 100, 60)),
    }
    figs = {f.name: f for f in soak.rss_figures(series, window_s=100, warmup_s=30)}
    assert figs["flat"].start == 300 * 2**20 and figs["flat"].end == 300 * 2**20 and figs["flat"].flat
    assert figs["flat"].peak == 301 * 2**20 and figs["flat"].samples == 5
    assert not figs["leak"].flat and round(figs["leak"].change, 2) == 0.24
    assert figs["short"].end is None and not figs["short"].flat


def test_report_failures_name_each_broken_promise():
    rep = soak.Report(seed=1, window_s=100, kill_every_s=30)
    rep.accepted = [soak.Accepted("a", "http", 1, False), soak.Accepted("b", "direct", 2, True),
                    soak.Accepted("c", "http", 3, False)]
    rep.statuses = {"a": "completed", "b": "completed", "c": "queued"}
    rep.results, rep.finished = Counter({"a": 1, "b": 2}), Counter({"a": 1, "b": 1})
    rep.callback_ids = {"a": {"id-a"}, "b": {"id-b", "id-b2"}}
    rep.deliveries = Counter({"a": 2, "b": 2})
    rep.kills = [soak.Kill(5, kind, kind, 10, back_s=1.0) for kind in soak.KINDS if kind != "merger"]
    rep.lag_checked, rep.lag = True, {"sink results[0]": 2}
    text = "\n".join(rep.failures())
    assert "1 job(s) lost (unfinished at the end): c" in text
    assert "1 job(s) doubled (more than one Result or finished event): b" in text
    assert "1 job(s) without a callback: c" in text
    assert "1 job(s) with more than one callback id: b" in text
    assert "never killed: merger" in text
    assert "partitions left with lag" in text
    assert rep.redeliveries == 2

    rep.statuses["c"], rep.results["b"], rep.results["c"], rep.finished["c"] = "completed", 1, 1, 1
    rep.callback_ids = {"a": {"id-a"}, "b": {"id-b"}, "c": {"id-c"}}
    rep.kills.append(soak.Kill(35, "merger", "merger", 11, back_s=2.0))
    rep.lag = {}
    assert rep.failures() == []
    assert any("redeliveries of the same id 2" in line for line in rep.lines())
