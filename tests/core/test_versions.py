"""The version policy and the version table: which versions serve, drain and retire after a load or unload."""

import pytest

from lstm_serve.core.versions import (
    VersionPolicy,
    VersionState,
    plan_load,
    plan_unload,
    reused,
    serving,
    table_from_json,
    table_to_json,
)
from lstm_serve.settings import Settings

NOW, DRAIN = 1000.0, 60.0
LATEST = VersionPolicy.parse("latest")


def disk(*versions: int) -> dict[int, str | None]:
    """Versions on disk, their config.json declaring no sha256."""
    return dict.fromkeys(versions)


@pytest.mark.parametrize(
    ("text", "kept"), [("latest", {3}), ("latest:2", {2, 3}), ("latest:9", {1, 2, 3}), ("all", {1, 2, 3})]
)
def test_the_policy_keeps_the_newest_versions(text, kept):
    assert VersionPolicy.parse(text).select({1, 2, 3}) == kept


@pytest.mark.parametrize("text", ["newest", "latest:0", "latest:-1", "latest:x", "all:2", ""])
def test_a_policy_that_does_not_read_is_refused_at_start(text):
    with pytest.raises(ValueError, match="version_policy"):
        Settings(version_policy=text)


def test_a_first_load_serves_what_the_policy_keeps():
    assert serving(plan_load({}, disk(1, 2, 3), VersionPolicy.parse("latest:2"), DRAIN, False, NOW)) == [2, 3]


def test_loading_a_newer_version_drains_the_one_it_replaces():
    table = plan_load({1: VersionState("serving")}, disk(1, 2), LATEST, DRAIN, True, NOW)
    assert table == {1: VersionState("draining", NOW + DRAIN, 2), 2: VersionState("serving")}
    assert table[1].live(NOW + DRAIN - 1) and table[1].retired_at(NOW + DRAIN)


def test_a_replica_without_the_newest_version_never_downgrades_the_others():
    table = plan_load({2: VersionState("serving")}, disk(1), LATEST, DRAIN, False, NOW)
    assert serving(table) == [2] and 1 not in table


def test_an_unloaded_version_comes_back_only_when_loaded_on_purpose():
    unloaded = plan_unload({1: VersionState("serving"), 2: VersionState("serving")}, 2, DRAIN, NOW)
    assert unloaded[2] == VersionState("draining", NOW + DRAIN, 1)
    assert serving(plan_load(unloaded, disk(1, 2), VersionPolicy(None), DRAIN, False, NOW)) == [1]  # a poll
    assert serving(plan_load(unloaded, disk(1, 2), VersionPolicy(None), DRAIN, True, NOW)) == [1, 2]  # an operator


def test_unloading_a_whole_model_drains_every_version_with_no_replacement():
    table = plan_unload({1: VersionState("serving"), 2: VersionState("serving")}, None, DRAIN, NOW)
    assert {v: (s.status, s.replaced_by) for v, s in table.items()} == {1: ("draining", None), 2: ("draining", None)}


def test_the_table_travels_as_json_unchanged():
    table = {1: VersionState("draining", NOW, 2), 2: VersionState("serving"), 3: VersionState("draining", NOW - 9, 2)}
    assert table_from_json(table_to_json(table)) == table


def test_a_version_keeps_the_sha256_it_was_first_served_with_through_its_drain():
    table = plan_load({}, {1: "aaa"}, LATEST, DRAIN, False, NOW)
    assert table == {1: VersionState("serving", sha256="aaa")}
    table = plan_load(table, {1: "aaa", 2: "bbb"}, LATEST, DRAIN, False, NOW)
    assert table == {1: VersionState("draining", NOW + DRAIN, 2, "aaa"), 2: VersionState("serving", sha256="bbb")}
    assert plan_unload(table, 2, DRAIN, NOW)[2] == VersionState("draining", NOW + DRAIN, None, "bbb")
    assert table_from_json(table_to_json(table)) == table


def test_weights_that_differ_from_those_a_number_was_served_with_are_found():
    table = {1: VersionState("draining", NOW, 2, "aaa"), 2: VersionState("serving", sha256="bbb")}
    assert reused(table, {1: "aaa", 2: "bbb", 3: "ccc"}) == {}
    assert reused(table, {1: "zzz", 2: "bbb"}) == {1: ("aaa", "zzz")}
    assert reused({1: VersionState("serving")}, {1: "zzz"}) == {}  # a table from before sha256 was kept


def test_a_version_served_without_a_sha256_is_not_given_this_replicas_one():
    """A version a replica of an earlier release loaded has no sha256 in the table: a replica with other files
    must not record its own as the version's (it would lock out the replicas that serve the real ones)."""
    table = {1: VersionState("serving")}
    planned = plan_load(table, {1: "mine", 2: "new"}, VersionPolicy(None), DRAIN, False, NOW)
    assert planned == {1: VersionState("serving"), 2: VersionState("serving", sha256="new")}
