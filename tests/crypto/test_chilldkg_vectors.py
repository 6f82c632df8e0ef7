"""ChillDKG (v0.3.0-dev) vectors through the project's own functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from constellation import errors
from constellation.crypto import dkg

VECTORS = Path(__file__).parents[1] / "vectors" / "chilldkg"
ERRORS: dict[str, type[Exception]] = {
    "ValueError": errors.DKGError,
    "HostSeckeyError": errors.HostSeckeyError,
    "RandomnessError": errors.RandomnessError,
    "ThresholdOrCountError": errors.ThresholdOrCountError,
    "InvalidHostPubkeyError": errors.InvalidHostPubkeyError,
    "DuplicateHostPubkeyError": errors.DuplicateHostPubkeyError,
    "FaultyParticipantOrCoordinatorError": errors.FaultyParticipantOrCoordinatorError,
    "FaultyParticipantError": errors.FaultyParticipantError,
    "FaultyCoordinatorError": errors.FaultyCoordinatorError,
    "UnknownFaultyParticipantOrCoordinatorError": dkg.UnknownFaultyParticipantOrCoordinatorError,
}


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def hx(x: str) -> bytes:
    return bytes.fromhex(x)


def params(p: dict[str, Any]) -> dkg.SessionParams:
    return dkg.SessionParams(tuple(hx(k) for k in p["hostpubkeys"]), p["t"])


def raises(expected: dict[str, Any]) -> Any:
    return pytest.raises(ERRORS[expected["type"]])


def check(info: Any, expected: dict[str, Any]) -> None:
    assert type(info.value) is ERRORS[expected["type"]]
    error: Any = info.value
    if "participantId" in expected:
        assert error.participant == expected["participantId"]
    if "participantId1" in expected:
        assert (error.participant1, error.participant2) == (
            expected["participantId1"],
            expected["participantId2"],
        )


def cases(name: str, kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    data = load(name)
    groups = data.get("testGroups", [data])
    return [(g, c) for g in groups for c in g.get(kind, [])]


def cid(gc: tuple[dict[str, Any], dict[str, Any]]) -> str:
    return f"tc{gc[1]['tcId']}"


def output_json(out: dkg.DKGOutput) -> dict[str, Any]:
    return {
        "secshare": out.secshare.hex().upper() if out.secshare is not None else None,
        "threshPk": out.threshold_pubkey.hex().upper(),
        "pubshares": [p.hex().upper() for p in out.pubshares],
    }


def test_hostpubkey_gen() -> None:
    data = load("hostpubkey_gen_vectors.json")
    for case in data["validTestCases"]:
        assert dkg.hostpubkey_gen(hx(case["hostseckey"])) == hx(case["expectedHostpubkey"])
    for case in data["errorTestCases"]:
        with raises(case["expectedError"]) as info:
            dkg.hostpubkey_gen(hx(case["hostseckey"]))
        check(info, case["expectedError"])


def test_params_hash() -> None:
    data = load("params_hash_vectors.json")
    for case in data["validTestCases"]:
        assert dkg.params_hash(params(case["params"])) == hx(case["expectedParamsHash"])
    for case in data["errorTestCases"]:
        with raises(case["expectedError"]) as info:
            dkg.params_hash(params(case["params"]))
        check(info, case["expectedError"])


def step1(group: dict[str, Any]) -> tuple[dkg.ParticipantState1, bytes]:
    return dkg.participant_step1(
        hx(group["hostseckey"]), params(group["params"]), hx(group["random"])
    )


@pytest.mark.parametrize("gc", cases("participant_step1_vectors.json", "validTestCases"), ids=cid)
def test_participant_step1(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, case = gc
    _, pmsg1 = dkg.participant_step1(
        hx(case["hostseckey"]), params(case["params"]), hx(case["random"])
    )
    assert pmsg1 == hx(case["expectedPmsg1"])


@pytest.mark.parametrize("gc", cases("participant_step1_vectors.json", "errorTestCases"), ids=cid)
def test_participant_step1_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, case = gc
    with raises(case["expectedError"]) as info:
        dkg.participant_step1(hx(case["hostseckey"]), params(case["params"]), hx(case["random"]))
    check(info, case["expectedError"])


@pytest.mark.parametrize("gc", cases("participant_step2_vectors.json", "validTestCases"), ids=cid)
def test_participant_step2(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    state1, pmsg1 = step1(group)
    assert pmsg1 == hx(group["pmsg1"])
    _, pmsg2 = dkg.participant_step2(
        hx(group["hostseckey"]), state1, hx(case["cmsg1"]), hx(group["auxRand"])
    )
    assert pmsg2 == hx(case["expectedPmsg2"])


@pytest.mark.parametrize("gc", cases("participant_step2_vectors.json", "errorTestCases"), ids=cid)
def test_participant_step2_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    state1, _ = step1(group)
    seckey = hx(case.get("hostseckey", group["hostseckey"]))
    with raises(case["expectedError"]) as info:
        dkg.participant_step2(
            seckey, state1, hx(case["cmsg1"]), hx(case.get("auxRand", group["auxRand"]))
        )
    check(info, case["expectedError"])


def step2(group: dict[str, Any]) -> dkg.ParticipantState2:
    state1, _ = step1(group)
    state2, pmsg2 = dkg.participant_step2(
        hx(group["hostseckey"]), state1, hx(group["cmsg1"]), hx(group["auxRand"])
    )
    assert pmsg2 == hx(group["pmsg2"])
    return state2


@pytest.mark.parametrize(
    "gc", cases("participant_finalize_vectors.json", "validTestCases"), ids=cid
)
def test_participant_finalize(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    output, recovery = dkg.participant_finalize(step2(group), hx(case["cmsg2"]))
    assert output_json(output) == case["expectedOutput"]["dkgOutput"]
    assert recovery == hx(case["expectedOutput"]["recoveryData"])
    recovered, _ = dkg.recover(hx(group["hostseckey"]), recovery)
    assert recovered == output


@pytest.mark.parametrize(
    "gc", cases("participant_finalize_vectors.json", "errorTestCases"), ids=cid
)
def test_participant_finalize_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    with raises(case["expectedError"]) as info:
        dkg.participant_finalize(step2(group), hx(case["cmsg2"]))
    check(info, case["expectedError"])


def coordinator_group_cases(kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return cases("coordinator_step1_vectors.json", kind)


@pytest.mark.parametrize("gc", coordinator_group_cases("validTestCases"), ids=cid)
def test_coordinator_step1(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    pmsgs1 = [hx(group["pmsg1Pool"][i]) for i in case["pmsg1Indices"]]
    _, cmsg1 = dkg.coordinator_step1(pmsgs1, params(case["params"]))
    assert cmsg1 == hx(case["expectedCmsg1"])


@pytest.mark.parametrize("gc", coordinator_group_cases("errorTestCases"), ids=cid)
def test_coordinator_step1_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    pool = group["pmsg1Pool"]
    pmsgs1 = [
        hx(case["pmsg1s"][k]) if "pmsg1s" in case else hx(pool[i])
        for k, i in enumerate(case.get("pmsg1Indices", range(len(case.get("pmsg1s", [])))))
    ]
    with raises(case["expectedError"]) as info:
        dkg.coordinator_step1(pmsgs1, params(case["params"]))
    check(info, case["expectedError"])


def coordinator_state(group: dict[str, Any]) -> dkg.CoordinatorState:
    state, cmsg1 = dkg.coordinator_step1([hx(m) for m in group["pmsgs1"]], params(group["params"]))
    assert cmsg1 == hx(group["cmsg1"])
    return state


@pytest.mark.parametrize(
    "gc", cases("coordinator_finalize_vectors.json", "validTestCases"), ids=cid
)
def test_coordinator_finalize(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    pmsgs2 = [hx(group["pmsg2Pool"][i]) for i in case["pmsg2Indices"]]
    cmsg2, output, recovery = dkg.coordinator_finalize(coordinator_state(group), pmsgs2)
    expected = case["expectedOutput"]
    assert cmsg2 == hx(expected["cmsg2"])
    assert output_json(output) == expected["dkgOutput"]
    assert recovery == hx(expected["recoveryData"])
    assert dkg.recover(None, recovery)[0] == output


@pytest.mark.parametrize(
    "gc", cases("coordinator_finalize_vectors.json", "errorTestCases"), ids=cid
)
def test_coordinator_finalize_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    pmsgs2 = [hx(group["pmsg2Pool"][i]) for i in case["pmsg2Indices"]]
    with raises(case["expectedError"]) as info:
        dkg.coordinator_finalize(coordinator_state(group), pmsgs2)
    check(info, case["expectedError"])
