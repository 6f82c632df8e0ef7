"""BIP445 (FROST signing for BIP340, v0.8.0) vectors through the project's own functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from coincurve import PublicKeyXOnly

from constellation.crypto import frost
from constellation.errors import InvalidContribution, SigningError

VECTORS = Path(__file__).parents[1] / "vectors" / "bip445"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def h(x: str | None) -> bytes | None:
    return None if x is None else bytes.fromhex(x)


def hx(x: str) -> bytes:
    return bytes.fromhex(x)


def expect_error(error: dict[str, Any]) -> Any:
    """A pytest.raises matching the vector's error kind exactly."""
    if error["type"] == "InvalidContributionError":
        return pytest.raises(InvalidContribution)
    return pytest.raises(SigningError)


def check_error(info: Any, error: dict[str, Any]) -> None:
    if error["type"] == "InvalidContributionError":
        assert info.value.signer_id == error["signer_index"]
        assert info.value.contrib == error["contrib"]
    else:
        assert not isinstance(info.value, InvalidContribution)


@pytest.mark.parametrize(
    "case", load("nonce_gen_vectors.json")["valid_tests"], ids=lambda c: f"tc{c['tc_id']}"
)
def test_nonce_gen(case: dict[str, Any]) -> None:
    secnonce, pubnonce = frost.nonce_gen(
        h(case["secshare"]),
        h(case["pubshare"]),
        h(case["thresh_pk_xonly"]),
        h(case["msg"]),
        h(case["extra_in"]),
        hx(case["rand"]),
    )
    k1, k2 = secnonce.take()
    assert k1.to_bytes(32, "big") + k2.to_bytes(32, "big") == hx(case["expected"][0])
    assert pubnonce == hx(case["expected"][1])


NONCE_AGG = load("nonce_agg_vectors.json")


@pytest.mark.parametrize("case", NONCE_AGG["valid_tests"], ids=lambda c: f"tc{c['tc_id']}")
def test_nonce_agg(case: dict[str, Any]) -> None:
    pubnonces = [hx(NONCE_AGG["pubnonces"][i]) for i in case["pubnonce_indices"]]
    assert frost.nonce_agg(pubnonces) == hx(case["expected"])


@pytest.mark.parametrize("case", NONCE_AGG["error_tests"], ids=lambda c: f"tc{c['tc_id']}")
def test_nonce_agg_errors(case: dict[str, Any]) -> None:
    pubnonces = [hx(NONCE_AGG["pubnonces"][i]) for i in case["pubnonce_indices"]]
    with expect_error(case["error"]) as info:
        frost.nonce_agg(pubnonces)
    check_error(info, case["error"])


def signers(group: dict[str, Any], case: dict[str, Any]) -> frost.SignersContext:
    return frost.SignersContext(
        group["n"],
        group["t"],
        tuple(case["ids"]),
        tuple(hx(group["pubshares"][i]) for i in case["pubshare_indices"]),
        hx(group["thresh_pk"]),
    )


def sign_cases(kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(g, c) for g in load("sign_verify_vectors.json")["test_groups"] for c in g[kind]]


def case_id(gc: tuple[dict[str, Any], dict[str, Any]]) -> str:
    return f"{gc[0]['tg_id']}-tc{gc[1]['tc_id']}"


@pytest.mark.parametrize("gc", sign_cases("valid_tests"), ids=case_id)
def test_sign_and_verify(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    ctx = signers(group, case)
    msg = hx(case["msg"])
    pubnonces = [hx(group["pubnonces"][i]) for i in case["pubnonce_indices"]]
    aggnonce = frost.nonce_agg(pubnonces)
    assert aggnonce == hx(case["aggnonce"])
    session = frost.SessionContext(ctx, aggnonce, (), (), msg)
    secnonce = frost.SecNonce(hx(group["secnonces"][case["secnonce_index"]]))
    psig = frost.sign(
        secnonce, hx(group["secshares"][case["secshare_index"]]), case["my_id"], session
    )
    assert psig == hx(case["expected"])
    i = case["ids"].index(case["my_id"])
    assert frost.partial_sig_verify(psig, pubnonces, ctx, [], [], msg, i)


@pytest.mark.parametrize("gc", sign_cases("sign_error_tests"), ids=case_id)
def test_sign_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    session = frost.SessionContext(
        signers(group, case), hx(case["aggnonce"]), (), (), hx(case["msg"])
    )
    secnonce = frost.SecNonce(hx(group["secnonces"][case["secnonce_index"]]))
    with expect_error(case["error"]) as info:
        frost.sign(secnonce, hx(group["secshares"][case["secshare_index"]]), case["my_id"], session)
    check_error(info, case["error"])


@pytest.mark.parametrize("gc", sign_cases("verify_fail_tests"), ids=case_id)
def test_verify_fails(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    pubnonces = [hx(group["pubnonces"][i]) for i in case["pubnonce_indices"]]
    assert not frost.partial_sig_verify(
        hx(case["psig"]),
        pubnonces,
        signers(group, case),
        [],
        [],
        hx(case["msg"]),
        case["signer_index"],
    )


@pytest.mark.parametrize("gc", sign_cases("verify_error_tests"), ids=case_id)
def test_verify_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    pubnonces = [hx(group["pubnonces"][i]) for i in case["pubnonce_indices"]]
    with expect_error(case["error"]) as info:
        frost.partial_sig_verify(
            hx(case["psig"]),
            pubnonces,
            signers(group, case),
            [],
            [],
            hx(case["msg"]),
            case["signer_index"],
        )
    check_error(info, case["error"])


def agg_cases(kind: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(g, c) for g in load("sig_agg_vectors.json")["test_groups"] for c in g[kind]]


def agg_session(group: dict[str, Any], case: dict[str, Any]) -> frost.SessionContext:
    return frost.SessionContext(
        signers(group, case),
        hx(case["aggnonce"]),
        tuple(hx(group["tweaks"][i]) for i in case["tweak_indices"]),
        tuple(case["is_xonly"]),
        hx(case["msg"]),
    )


@pytest.mark.parametrize("gc", agg_cases("valid_tests"), ids=case_id)
def test_sig_agg(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    session = agg_session(group, case)
    sig = frost.partial_sig_agg([hx(p) for p in case["psigs"]], session)
    assert sig == hx(case["expected"])
    key = frost.tweak_context(session.signers.thresh_pk, session.tweaks, session.is_xonly)
    assert PublicKeyXOnly(key.xonly_pk).verify(sig, session.msg)


@pytest.mark.parametrize("gc", agg_cases("error_tests"), ids=case_id)
def test_sig_agg_errors(gc: tuple[dict[str, Any], dict[str, Any]]) -> None:
    group, case = gc
    with expect_error(case["error"]) as info:
        frost.partial_sig_agg([hx(p) for p in case["psigs"]], agg_session(group, case))
    check_error(info, case["error"])
