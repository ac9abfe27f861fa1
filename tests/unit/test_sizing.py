"""Workers sized to the host: how many transcribers `kafscribe services` starts, with what."""

from __future__ import annotations

import pytest

from kafscribe.cli import services
from kafscribe.settings import Settings, SettingsError
from kafscribe.speech import sizing

GIB = 2**30


def test_auto_on_cpu_is_one_single_threaded_transcriber_per_core():
    plan = sizing.plan(Settings(), cores=4, gpus=0, host_available=16 * GIB)
    assert (plan.transcribers, plan.threads, plan.gpus) == (4, 1, 0)


def test_auto_is_bounded_by_memory_and_partitions_and_never_zero():
    assert sizing.plan(Settings(), cores=8, host_available=int(1.5 * GIB)).transcribers == 2
    tight = sizing.plan(Settings(), cores=8, host_available=100 * 2**20)
    assert (tight.transcribers, tight.threads) == (1, 8), "one transcriber then gets every core"
    assert sizing.plan(Settings(uploads_partitions=3), cores=8, host_available=64 * GIB).transcribers == 3


def test_auto_on_cuda_is_one_per_gpu_each_pinned_to_its_own():
    settings = Settings(device="cuda")
    plan = sizing.plan(settings, cores=16, gpus=2)
    assert (plan.transcribers, plan.threads, plan.gpus) == (2, 8, 2)
    envs = [sizing.instance_env(n, plan, settings, 9101) for n in sizing.instance_names(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1"]


def test_a_number_shares_the_cores_unless_threads_are_given():
    assert sizing.plan(Settings(transcribers="1"), cores=2, gpus=0).threads == 2
    assert sizing.plan(Settings(transcribers="3", cpu_threads=2), cores=2, gpus=0).threads == 2
    with pytest.raises(SettingsError):
        sizing.plan(Settings(transcribers="many"), cores=2)
    with pytest.raises(SettingsError):
        sizing.plan(Settings(transcribers="0"), cores=2)


def test_the_supervisor_starts_each_instance_with_its_threads_and_own_metrics_port(tmp_path):
    settings = Settings(state_dir=tmp_path, transcribers="3", cpu_threads=0, metrics_port=0)
    sup = services.Supervisor(settings, services.DEFAULT_SERVICES, log=lambda line: None)
    assert sup.names == ["ingress", "transcriber", "transcriber-2", "transcriber-3", "translator", "sink",
                         "notifier", "merger", "lag"]
    envs = {n: sup.service_env(n) for n in sup.names}
    assert envs["ingress"] == {} and envs["sink"] == {}
    assert "KAFSCRIBE_METRICS_PORT" not in envs["transcriber"], "the first keeps the stage's default port"
    assert [envs[n].get("KAFSCRIBE_METRICS_PORT") for n in ("transcriber-2", "transcriber-3")] == ["9111", "9121"]
    # ... where Prometheus's file-SD targets look for them
    assert [services.service_metrics_port(n, settings) for n in ("transcriber", "transcriber-2", "transcriber-3")] == [
        9101, 9111, 9121]
    assert {envs[n]["KAFSCRIBE_CPU_THREADS"] for n in sup.names if n.startswith("transcriber")} == {
        str(max(1, sizing.usable_cores() // 3))}
    off = services.Supervisor(settings.with_(metrics_port=-1), ["transcriber"], log=lambda line: None)
    assert all("KAFSCRIBE_METRICS_PORT" not in off.service_env(n) for n in off.names)
