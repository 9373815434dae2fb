"""Department privacy policy: loading with actionable errors, and the job check."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the venv may not have cityfed installed (`make install` does)
    sys.path.insert(0, str(ROOT))

from privacy.ledger import PrivacyLedger, Release  # noqa: E402
from privacy.policy import (  # noqa: E402
    MAX_EPSILON,
    Decision,
    JobRequest,
    PolicyError,
    PrivacyPolicy,
    ReleasePolicy,
    check_allowed_tasks,
    check_job,
    load_policy,
    parse_policy,
)

EXAMPLES = ROOT / "examples" / "policies"
SITE = "health-1"

VALID = """\
department = "health"
max_epsilon = 8.0
delta = 1e-3
min_noise_multiplier = 0.8
max_clipping_norm = 1.0
allowed_tasks = ["heart-disease"]
max_rounds_per_run = 5
"""


# -- TOML writing for tests (tomllib only reads) ----------------------------------------------


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "-_" for c in k) and k.isascii() else _toml_str(k)


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dumps(doc: dict) -> str:
    """Top-level keys only (nested tables as inline tables)."""
    return "".join(f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in doc.items())


def load_policy_text(text: str) -> PrivacyPolicy:
    return parse_policy(text, "p.toml")


def _policy(**kw) -> PrivacyPolicy:
    base = parse_policy(VALID).model_dump()
    base.update(kw)
    return PrivacyPolicy(**base)


def _job(**kw) -> JobRequest:
    base = dict(
        department="health", task="heart-disease", run_id="run-a", round=1, dp=True,
        noise_multiplier=1.0, clipping_norm=1.0, sample_rate=0.05, steps=40,
    )
    base.update(kw)
    return JobRequest(**base)


@pytest.fixture
def ledger(tmp_path):
    return PrivacyLedger(tmp_path / "ledger.sqlite")


# -- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["health", "traffic", "utility"])
def test_example_policies_load(name):
    pol = load_policy(EXAMPLES / f"{name}.toml")
    assert pol.department == name
    assert pol.max_epsilon == 8.0
    # each site accounts at 1/(10 n) of its training records; traffic/utility set a stricter ceiling
    assert pol.delta == (None if name == "health" else 1e-5)
    assert pol.site_delta(200) == pytest.approx(1 / 2000 if name == "health" else 1e-5)
    assert pol.releases.train_loss == "off" and pol.releases.local_evaluation == "off"  # DP-safe defaults
    assert pol.require_dp is True and pol.allowed_tasks


def test_every_field_is_described():
    for name, field in PrivacyPolicy.model_fields.items():
        assert field.description, name
    for name, field in JobRequest.model_fields.items():
        assert field.description, name


def test_error_names_file_field_and_fix(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(VALID.replace("max_epsilon = 8.0", "max_epsilon = -1"))
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: field 'max_epsilon': must be > 0 (got -1)")
    assert "Fix:" in msg and "max_epsilon = 8.0" in msg
    assert isinstance(exc.value, ValueError)


def test_nested_field_is_dotted(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(VALID.replace('["heart-disease"]', '["heart-disease", 3]'))
    with pytest.raises(PolicyError, match=r"field 'allowed_tasks\.1': must be a valid string \(got 3, an int\)"):
        load_policy(path)


def test_extra_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(VALID + "max_epsilom = 3.0\n")
    with pytest.raises(PolicyError, match="field 'max_epsilom': is not a policy field.*did you mean 'max_epsilon'"):
        load_policy(path)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("max_rounds_per_run = 5", "max_rounds_per_run = 5.0", "max_rounds_per_run"),  # strict int
        # no upper bound was set: 2**64 and more were accepted (and outgrow the ledger's SQLite integers)
        ("max_rounds_per_run = 5", "max_rounds_per_run = 99999999999999999999", "max_rounds_per_run"),
        ("max_rounds_per_run = 5", "max_rounds_per_run = 1000001", "max_rounds_per_run"),
        ("max_epsilon = 8.0", 'max_epsilon = "8"', "max_epsilon"),  # no str coercion
        ("max_epsilon = 8.0", "max_epsilon = inf", "max_epsilon"),
        ("delta = 1e-3", "delta = 1.0", "delta"),
        ("delta = 1e-3", "delta = nan", "delta"),
        ('department = "health"', 'department = "police"', "department"),
        ("allowed_tasks = [\"heart-disease\"]", "allowed_tasks = []", "allowed_tasks"),
        ("min_noise_multiplier = 0.8", "min_noise_multiplier = -0.1", "min_noise_multiplier"),
        ("max_clipping_norm = 1.0", "max_clipping_norm = 0", "max_clipping_norm"),
    ],
)
def test_bad_values(tmp_path, old, new, field):
    path = tmp_path / "p.toml"
    path.write_text(VALID.replace(old, new) + "require_dp = 1\n")
    with pytest.raises(PolicyError) as exc:
        load_policy(path)
    msg = str(exc.value)
    assert f"{path}: field '{field}':" in msg
    assert f"{path}: field 'require_dp':" in msg  # every problem reported, one per line


def test_missing_field(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(VALID.replace("max_epsilon = 8.0\n", ""))
    with pytest.raises(PolicyError, match="field 'max_epsilon': is required but missing.*Fix: "):
        load_policy(path)


@pytest.mark.parametrize("n", [0, 1, 10, 74, 99, 100])
def test_a_small_sites_delta_never_exceeds_the_ceiling_the_policy_calls_unsafe(n):
    """``delta`` above 1e-3 is refused in a policy ("permits leaking a record outright"), yet a policy
    without one gave a site of fewer than 100 records 1/(10 n) above it (bundled Switzerland, 74
    training patients: 1.35e-3; privacy review of 2026-12-07)."""
    from privacy.dp import default_delta

    pol = load_policy_text(VALID.replace("delta = 1e-3\n", ""))
    assert pol.delta is None
    assert pol.site_delta(n) <= 1e-3 and default_delta(n) <= 1e-3
    assert pol.site_delta(n) == pytest.approx(min(1e-3, 1 / (10 * max(n, 1))))


def test_delta_is_per_site_with_an_optional_stricter_ceiling(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(VALID.replace("delta = 1e-3\n", ""))
    pol = load_policy(path)
    assert pol.delta is None
    assert pol.site_delta(243) == pytest.approx(1 / 2430)
    assert pol.site_delta(0) == pytest.approx(1e-3)  # never divides by zero
    ceiling = load_policy_text(VALID.replace("delta = 1e-3", "delta = 1e-5"))
    assert ceiling.site_delta(243) == 1e-5 and ceiling.site_delta(10**7) == pytest.approx(1e-8)


@pytest.mark.parametrize(("line", "needle"), [
    ('local_evaluation = "yes"', "releases.local_evaluation"),
    ("metric_noise_multiplier = 0.1", "releases.metric_noise_multiplier"),
    ("max_evaluations_per_run = -1", "releases.max_evaluations_per_run"),
    ("num_examples_granularity = 0", "releases.num_examples_granularity"),
    ("count_noise_multiplier = 0.5", "releases.count_noise_multiplier"),  # the released count's noise std >= 1
    ('train_los = "dp"', "did you mean 'train_loss'"),
    ("energy = true", "releases.energy"),
])
def test_bad_release_settings_name_the_field(line, needle):
    with pytest.raises(PolicyError, match=needle):
        load_policy_text(VALID + "\n[releases]\n" + line + "\n")


def test_bad_toml_syntax_gives_line_and_column(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(VALID.replace('department = "health"', "department = health"))
    with pytest.raises(PolicyError, match=r"p\.toml: not valid TOML: .*line 1, column 14"):
        load_policy(path)


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="nope.toml: cannot read policy file"):
        load_policy(tmp_path / "nope.toml")


def test_not_utf8(tmp_path):
    path = tmp_path / "p.toml"
    path.write_bytes(b"department = \"\xff\"\n")
    with pytest.raises(PolicyError, match="p.toml"):
        load_policy(path)


def test_byte_order_mark_is_named(tmp_path):
    """Every reader of a policy (fl-client, fl-sim run --policy) names a UTF-8 BOM: it was 'not valid
    TOML (line 1, column 1)' outside fl-client's own start-up check."""
    path = tmp_path / "p.toml"
    path.write_bytes(b"\xef\xbb\xbf" + (ROOT / "examples" / "policies" / "health.toml").read_bytes())
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert "p.toml" in str(err.value) and "byte-order mark" in str(err.value) and "without BOM" in str(err.value)


# -- hypothesis: arbitrary documents never crash with anything but PolicyError ------------------

_FIELDS = list(PrivacyPolicy.model_fields)
_scalars = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(min_size=1, max_size=6), inner, max_size=3),
    max_leaves=6,
)
_keys = st.sampled_from(_FIELDS) | st.text(min_size=1, max_size=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _values, max_size=10))
def test_arbitrary_documents_only_raise_policy_error(doc):
    try:
        pol = parse_policy(dumps(doc), "fuzz.toml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.toml:")
    else:
        assert isinstance(pol, PrivacyPolicy)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_only_raises_policy_error(text):
    try:
        parse_policy(text, "fuzz.toml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.toml:")


_valid_policies = st.builds(
    dict,
    department=st.sampled_from(["health", "traffic", "utility"]),
    max_epsilon=st.floats(min_value=1e-6, max_value=100, allow_nan=False, allow_infinity=False),
    delta=st.floats(min_value=1e-12, max_value=1e-3, allow_nan=False, allow_infinity=False),
    min_noise_multiplier=st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False),
    max_clipping_norm=st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
    allowed_tasks=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=4),
    max_rounds_per_run=st.integers(min_value=1, max_value=10**6),
    require_dp=st.booleans(),
    require_secure_aggregation=st.booleans(),
    min_secagg_num_shares=st.integers(min_value=1, max_value=511).map(lambda k: 2 * k + 1),
    min_secagg_threshold=st.integers(min_value=2, max_value=1022),
    central_max_clipping_norm=st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
    accountant=st.sampled_from(["rdp", "prv"]),
    personalisation=st.booleans(),
    releases=st.builds(
        dict,
        num_examples_granularity=st.integers(min_value=1, max_value=1000),
        # the noise std (records) of the released record count (clients.counts), >= 1
        count_noise_multiplier=st.floats(min_value=1.0, max_value=1e6, allow_nan=False, allow_infinity=False),
        train_loss=st.sampled_from(["off", "dp"]),
        local_evaluation=st.sampled_from(["off", "dp"]),
        metric_noise_multiplier=st.floats(min_value=1.0, max_value=1e3, allow_nan=False, allow_infinity=False),
        max_evaluations_per_run=st.integers(min_value=0, max_value=100),
        energy=st.sampled_from(["off", "sent"]),
    ),
)


@settings(max_examples=150, deadline=None)
@given(_valid_policies)
def test_valid_policies_round_trip(doc):
    pol = parse_policy(dumps(doc), "gen.toml")
    assert pol.model_dump() == doc
    assert parse_policy(dumps(pol.model_dump()), "again.toml") == pol


@pytest.mark.parametrize(("line", "field", "needle"), [
    ("max_epsilon = 1e308", "max_epsilon", "must be <= 100"),
    ("max_epsilon = 100.5", "max_epsilon", "must be <= 100"),
    ("delta = 0.5", "delta", "must be <= 0.001"),
    ("delta = 1e-3000", "delta", "must be > 0"),  # TOML reads it as 0.0
])
def test_privacy_bounds(line, field, needle):
    key = line.split(" =")[0]
    text = "".join(ln + "\n" for ln in VALID.splitlines() if not ln.startswith(key + " ")) + line + "\n"
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "p.toml")
    msg = str(exc.value)
    assert f"p.toml: field '{field}': {needle}" in msg and "Fix:" in msg
    if field == "max_epsilon":
        assert "at most 100" in msg  # the fix says why there is a ceiling
    assert parse_policy(VALID.replace("max_epsilon = 8.0", f"max_epsilon = {MAX_EPSILON}")).max_epsilon == MAX_EPSILON


def test_allowed_tasks_must_hold_the_departments_task():
    pol = load_policy_text(VALID)
    check_allowed_tasks(pol, "heart-disease", "p.toml")  # fine
    typo = load_policy_text(VALID.replace('["heart-disease"]', '["heart-diseases", "traffic-forecast"]'))
    with pytest.raises(PolicyError) as exc:
        check_allowed_tasks(typo, "heart-disease", "p.toml")
    msg = str(exc.value)
    assert msg.startswith("p.toml: field 'allowed_tasks':") and "'heart-disease'" in msg
    assert "did you mean 'heart-disease' instead of 'heart-diseases'" in msg and "refuse every job" in msg
    other = load_policy_text(VALID.replace('["heart-disease"]', '["face-recognition"]'))
    with pytest.raises(PolicyError, match=r"allowed_tasks = \["):
        check_allowed_tasks(other, "heart-disease", "p.toml")


@pytest.mark.parametrize("name", ["health", "traffic", "utility"])
def test_example_policies_allow_their_departments_task(name):
    from contract.tasks import TASKS

    check_allowed_tasks(load_policy(EXAMPLES / f"{name}.toml"), TASKS[name])


def _shown(v) -> set[str]:
    """How a rejected value may appear in a PolicyError: its repr (cut at 57 chars) or one of its parts'."""
    out = {repr(v)[:57]}
    if isinstance(v, list):
        for x in v:
            out |= _shown(x)
    if isinstance(v, dict):
        for k, x in v.items():
            out |= _shown(x) | {repr(k)[:57]}
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_policies, st.sampled_from(_FIELDS + [f"releases.{k}" for k in ("num_examples_granularity",
                                                                              "count_noise_multiplier", "train_loss",
                                                                              "local_evaluation", "metric_noise_multiplier",
                                                                              "max_evaluations_per_run", "energy")]), _values)
def test_every_rejected_value_is_named(doc, field, value):
    if field.startswith("releases."):
        doc["releases"][field.split(".", 1)[1]] = value
    else:
        doc[field] = value
    try:
        parse_policy(dumps(doc), "fuzz.toml")
    except PolicyError as exc:
        msg = str(exc)
        assert msg.startswith("fuzz.toml: field '"), msg
        top = field.split(".")[0]
        assert f"field '{top}" in msg, msg  # the field, or a dotted path inside it
        assert any(f"(got {shown}" in msg for shown in _shown(value)), (value, msg)
        assert "Fix: " in msg


# -- check_job ------------------------------------------------------------------------------


def test_accepted_job(ledger):
    d = check_job(_policy(), _job(), ledger, SITE, delta=1e-3)
    assert isinstance(d, Decision)
    assert d.accepted and d.reason.startswith("accepted")
    assert d.epsilon_before == 0.0
    assert 0 < d.epsilon_after <= 8.0
    assert d.epsilon_after == pytest.approx(
        ledger.projected_epsilon(SITE, Release(1.0, 0.05, 40, 1e-3, "run-a", 1, SITE, "health"))
    )


@pytest.mark.parametrize(
    ("job", "fragment"),
    [
        (dict(department="traffic"), "department 'traffic' != policy department 'health'"),
        (dict(task="face-recognition"), "task 'face-recognition' not in policy allowed_tasks"),
        (dict(round=6), "round 6 > policy max_rounds_per_run 5"),
        (dict(dp=False, noise_multiplier=None, clipping_norm=None), "dp is off but policy require_dp = true"),
        (dict(noise_multiplier=0.5), "noise_multiplier 0.5 < policy min_noise_multiplier 0.8"),
        (dict(noise_multiplier=None), "noise_multiplier missing"),
        (dict(clipping_norm=2.5), "clipping_norm 2.5 > policy max_clipping_norm 1"),
        (dict(clipping_norm=None), "clipping_norm missing"),
    ],
)
def test_refusals(ledger, job, fragment):
    ledger.commit(ledger.begin(Release(1.0, 0.05, 40, 1e-3, "old", 1, SITE, "health")))
    before = ledger.epsilon(SITE, 1e-3)
    d = check_job(_policy(), _job(**job), ledger, SITE, delta=1e-3)
    assert not d.accepted
    assert d.reason.startswith("refused: " + fragment)
    assert d.epsilon_before == pytest.approx(before) and d.epsilon_after == pytest.approx(before)


def test_check_order_first_failure_wins(ledger):
    bad = _job(department="traffic", task="x", round=99, dp=False, noise_multiplier=0.0, clipping_norm=9.0)
    assert "department" in check_job(_policy(), bad, ledger, SITE, delta=1e-3).reason
    assert "task" in check_job(_policy(), bad.model_copy(update={"department": "health"}), ledger, SITE, delta=1e-3).reason


def test_round_equal_to_max_is_accepted(ledger):
    assert check_job(_policy(), _job(round=5), ledger, SITE, delta=1e-3).accepted


def test_dp_off_allowed_when_not_required(ledger):
    d = check_job(_policy(require_dp=False), _job(dp=False, noise_multiplier=None, clipping_norm=None), ledger, SITE, delta=1e-3)
    assert d.accepted and "require_dp = false" in d.reason
    assert d.epsilon_after == math.inf


def test_budget_refusal_exactly_when_projection_passes_max(ledger):
    pol = _policy()
    job = _job(steps=100)
    release = Release(1.0, 0.05, 100, pol.delta, "run-a", 1, SITE, "health")
    # spend rounds until the next one would pass the budget; check the boundary each time
    for rnd in range(1, 200):
        projected = ledger.projected_epsilon(SITE, release)
        d = check_job(pol, job, ledger, SITE, delta=1e-3)
        assert d.epsilon_after == pytest.approx(projected, rel=1e-12)
        assert d.accepted == (projected <= pol.max_epsilon)
        if not d.accepted:
            assert d.reason.startswith("refused: projected epsilon")
            assert "policy max_epsilon 8" in d.reason
            assert d.epsilon_before <= pol.max_epsilon < d.epsilon_after
            break
        ledger.commit(ledger.begin(release))
    else:
        pytest.fail("budget never ran out")
    assert rnd > 3  # several rounds were accepted before the budget ran out
    # a policy whose budget sits exactly on the projection accepts; one just below refuses
    assert check_job(_policy(max_epsilon=projected), job, ledger, SITE, delta=1e-3).accepted
    assert not check_job(_policy(max_epsilon=math.nextafter(projected, 0)), job, ledger, SITE, delta=1e-3).accepted


def test_budget_counts_across_runs_and_pending(ledger):
    pol = _policy(max_epsilon=1.0)
    job = _job(noise_multiplier=1.0, sample_rate=0.05, steps=40)
    ledger.begin(Release(1.0, 0.05, 40, pol.delta, "earlier-run", 3, SITE, "health"))  # pending: crashed
    d = check_job(pol, job.model_copy(update={"run_id": "new-run"}), ledger, SITE, delta=1e-3)
    assert d.epsilon_before == pytest.approx(ledger.epsilon(SITE, pol.delta)) and d.epsilon_before > 0
    assert d.accepted == (d.epsilon_after <= pol.max_epsilon)
    assert d.epsilon_after == pytest.approx(
        ledger.projected_epsilon(SITE, Release(1.0, 0.05, 40, pol.delta, "new-run", 1, SITE, "health"))
    )


def test_job_request_rejects_unknown_knobs():
    with pytest.raises(ValueError):
        _job(secure_rng=False)


# -- the accountant switch (issue 12.3) ---------------------------------------------------------


def test_accountant_defaults_to_rdp_and_accepts_prv():
    assert load_policy_text(VALID).accountant == "rdp"
    assert load_policy_text(VALID + 'accountant = "prv"\n').accountant == "prv"
    assert load_policy_text(VALID + 'accountant = "rdp"\n').accountant == "rdp"
    for name in ("health", "traffic", "utility"):  # the examples keep the default (README's tables are RDP)
        assert load_policy(EXAMPLES / f"{name}.toml").accountant == "rdp"


@pytest.mark.parametrize(("line", "got"), [
    ('accountant = "pld"', "'pld'"),
    ('accountant = "PRV"', "'PRV'"),
    ("accountant = 1", "1"),
    ('accountant = ""', "''"),
])
def test_bad_accountant_names_the_field_and_the_allowed_values(line, got):
    with pytest.raises(PolicyError) as exc:
        load_policy_text(VALID + line + "\n")
    msg = str(exc.value)
    assert msg.startswith("p.toml: field 'accountant': must be 'rdp' or 'prv'"), msg
    assert f"(got {got}" in msg and 'Fix: set "rdp"' in msg and 'accountant = "prv"' in msg


def test_accountant_typo_in_key_suggests_it():
    with pytest.raises(PolicyError, match="did you mean 'accountant'"):
        load_policy_text(VALID + 'acountant = "prv"\n')


def test_coordinator_cannot_choose_the_accountant():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="accountant"):
        _job(accountant="prv")


def test_check_job_uses_the_policys_accountant(tmp_path):
    from privacy.accounting import prv_epsilon, rdp_epsilon

    led = PrivacyLedger(tmp_path / "l.sqlite", accountant="prv")
    led.commit(led.begin(Release(1.0, 0.05, 200, 1e-3, "old", 1, SITE, "health")))
    hist = [(1.0, 0.05, 200), (1.0, 0.05, 40)]
    prv, rdp = prv_epsilon(hist, 1e-3), rdp_epsilon(hist, 1e-3)
    assert prv < 0.95 * rdp
    d = check_job(_policy(accountant="prv"), _job(), led, SITE, delta=1e-3)
    assert d.accepted and d.epsilon_after == pytest.approx(prv, rel=1e-12) and "PRV" in d.reason
    assert d.epsilon_before == pytest.approx(prv_epsilon(hist[:1], 1e-3), rel=1e-12)
    # the same ledger checked under an RDP policy: RDP over the whole history
    d = check_job(_policy(accountant="rdp"), _job(), led, SITE, delta=1e-3)
    assert d.epsilon_after == pytest.approx(rdp, rel=1e-12) and "RDP" in d.reason
    # a budget between the two: PRV accepts, RDP refuses
    mid = (prv + rdp) / 2
    assert check_job(_policy(accountant="prv", max_epsilon=mid), _job(), led, SITE, delta=1e-3).accepted
    refused = check_job(_policy(accountant="rdp", max_epsilon=mid), _job(), led, SITE, delta=1e-3)
    assert not refused.accepted and "projected epsilon" in refused.reason


# -- error messages: misplaced keys, a fix for every field, field validators ------------------

_TOP = [f for f in _FIELDS if f != "releases"]
_RELEASES = list(ReleasePolicy.model_fields)


def _release_lines(releases: dict) -> str:
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in releases.items())


def test_top_level_key_appended_after_the_releases_table_says_move_it_above():
    text = (EXAMPLES / "health.toml").read_text() + "\nrequire_secure_aggregation = true\n"
    with pytest.raises(PolicyError) as exc:
        parse_policy(text, "health.toml")
    msg = str(exc.value)
    assert msg.startswith("health.toml: field 'releases.require_secure_aggregation':"), msg
    assert "top-level policy key" in msg and "move it above the [releases] table" in msg, msg
    assert "Fix: remove it" not in msg  # following that would silently drop the protection


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_policies, st.sampled_from(_TOP))
def test_a_top_level_key_under_releases_is_moved_not_removed(doc, field):
    value = doc.pop(field)
    releases = doc.pop("releases")
    body = dumps(doc) + "[releases]\n" + _release_lines(releases)
    with pytest.raises(PolicyError) as exc:
        parse_policy(body + f"{field} = {_toml_value(value)}\n", "p.toml")
    lines = str(exc.value).splitlines()
    mine = [ln for ln in lines if ln.startswith(f"p.toml: field 'releases.{field}':")]
    assert len(mine) == 1, lines
    assert "move it above the [releases] table" in mine[0] and "remove it" not in mine[0], mine[0]
    # following the fix gives the department the setting it wrote
    moved = dumps(doc) + f"{field} = {_toml_value(value)}\n" + "[releases]\n" + _release_lines(releases)
    assert getattr(parse_policy(moved, "p.toml"), field) == value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_policies, st.sampled_from(_RELEASES))
def test_a_releases_key_at_top_level_is_moved_under_releases(doc, field):
    releases = doc.pop("releases")
    value = releases.pop(field)
    with pytest.raises(PolicyError) as exc:
        parse_policy(dumps(doc) + f"{field} = {_toml_value(value)}\n", "p.toml")
    msg = str(exc.value)
    assert msg.startswith(f"p.toml: field '{field}':") and "move it under the [releases] table" in msg, msg
    assert "remove it" not in msg, msg
    moved = dumps(doc) + "[releases]\n" + _release_lines({**releases, field: value})
    assert getattr(parse_policy(moved, "p.toml").releases, field) == value


@pytest.mark.parametrize(("line", "field"), [
    ("require_secure_aggregation = 1", "require_secure_aggregation"),
    ('require_secure_aggregation = "true"', "require_secure_aggregation"),
    ("min_secagg_num_shares = 1", "min_secagg_num_shares"),
    ("min_secagg_num_shares = 3.0", "min_secagg_num_shares"),
    ("min_secagg_num_shares = 2048", "min_secagg_num_shares"),
    ("min_secagg_threshold = 1", "min_secagg_threshold"),
    ("min_secagg_threshold = 1e9", "min_secagg_threshold"),
    ('personalisation = "yes"', "personalisation"),
])
def test_secagg_and_personalisation_errors_have_a_real_fix(line, field):
    with pytest.raises(PolicyError) as exc:
        parse_policy(VALID + line + "\n", "p.toml")
    msg = str(exc.value)
    assert msg.startswith(f"p.toml: field '{field}':"), msg
    assert "see the field descriptions" not in msg, msg
    assert "Fix: " in msg and f"{field} = " in msg.split("Fix: ", 1)[1], msg


def test_every_field_has_its_own_fix():
    from privacy.policy import _FIXES

    assert set(_FIELDS) <= set(_FIXES), set(_FIELDS) - set(_FIXES)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=511).map(lambda k: 2 * k))
def test_even_num_shares_message_is_plain(shares):
    with pytest.raises(PolicyError) as exc:
        parse_policy(VALID + f"min_secagg_num_shares = {shares}\n", "p.toml")
    msg = str(exc.value)
    assert "\n" not in msg and "Value error" not in msg, msg
    assert msg.count("(got ") == 1 and f"(got {shares})" in msg, msg
    assert msg.lower().count("fix:") == 1, msg
    assert msg.startswith(f"p.toml: field 'min_secagg_num_shares': must be odd"), msg
    assert f"min_secagg_num_shares = {shares + 1}" in msg.split("Fix: ", 1)[1], msg
    fixed = parse_policy(VALID + f"min_secagg_num_shares = {shares + 1}\n", "p.toml")  # the fix works
    assert fixed.min_secagg_num_shares == shares + 1


@pytest.mark.parametrize("value, expected", [
    (4, "t.toml: field 'v': must be rejected (got 4). Fix: v = 7"),
    # the message echoes the value: a value holding "; fix:" must not split the message there
    ("x; fix: y", "t.toml: field 'v': must be rejected (got 'x; fix: y'). Fix: v = 7"),
])
def test_any_field_validator_message_is_cleaned_up(value, expected):
    from pydantic import BaseModel, ValidationError, field_validator

    from privacy.policy import _format_validation

    class Toy(BaseModel):
        v: int | str

        @field_validator("v")
        @classmethod
        def _reject(cls, v):
            raise ValueError(f"must be rejected (got {v!r}); fix: v = 7")

    with pytest.raises(ValidationError) as exc:
        Toy(v=value)
    assert _format_validation("t.toml", exc.value) == expected


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_policies, st.sampled_from(_FIELDS + [f"releases.{k}" for k in _RELEASES]), _values)
def test_every_error_line_has_one_plain_fix(doc, field, value):
    if field.startswith("releases."):
        doc["releases"][field.split(".", 1)[1]] = value
    else:
        doc[field] = value
    try:
        parse_policy(dumps(doc), "fuzz.toml")
    except PolicyError as exc:
        for line in str(exc).splitlines():
            assert "Value error" not in line and "Assertion failed" not in line, line
            # the bad value is shown ("(got ...)"): text of its own is not the message's
            own = line.replace(repr(value)[:57], "")
            assert own.count(". Fix: ") == 1 and "; fix:" not in own, line
            assert "see the field descriptions" not in line, line
