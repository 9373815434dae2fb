"""A department node's privacy policy, and the check every training job must pass.

The policy is a TOML file owned by the department (not by the coordinator), e.g.
``examples/policies/health.toml``::

    department = "health"
    max_epsilon = 8.0
    min_noise_multiplier = 0.8
    max_clipping_norm = 1.0
    allowed_tasks = ["heart-disease"]
    max_rounds_per_run = 50
    require_dp = true
    accountant = "rdp"            # or "prv": tighter epsilon, less noise for the same target
    personalisation = true        # fine-tune the run's model on-site, within the run's target epsilon

    [releases]                    # what may leave the node besides the model (DP-safe defaults)
    num_examples_granularity = 1
    train_loss = "off"
    local_evaluation = "off"

Delta is per site: ``1/(10·n)`` for the site's ``n`` training records, or the policy's
``delta`` where that is smaller (:meth:`PrivacyPolicy.site_delta`); with counts rounded to
``g`` > 1, ``n`` is the rounded count plus ``g // 2`` (never fewer than the exact count:
:func:`clients.node.delta_records`).

Before training, :func:`check_job` compares the coordinator's :class:`JobRequest` with the
policy and with the node's :class:`~privacy.ledger.PrivacyLedger`, and refuses jobs that ask
for weaker privacy than the policy allows or that would push the node's lifetime epsilon
past ``max_epsilon``.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from contract.text_files import BOM_FIX, UTF8_BOM, load_toml
from privacy.ledger import PrivacyLedger, Release

__all__ = [
    "MAX_EPSILON",
    "Decision",
    "ReleasePolicy",
    "JobRequest",
    "PolicyError",
    "PrivacyPolicy",
    "check_allowed_tasks",
    "check_job",
    "job_conflict",
    "load_policy",
    "parse_policy",
    "secagg_conflict",
]


#: Highest lifetime ``max_epsilon`` a policy may set. At epsilon = 10 an adversary's odds on any
#: one record may already grow e^10 = 22,000-fold; 100 (e^100) promises nothing at all. The
#: ceiling catches typos and unit slips (``1e308``, a delta written where epsilon belongs)
#: that would otherwise turn the lifetime budget off without a word.
MAX_EPSILON = 100.0


class PolicyError(ValueError):
    """A policy file is missing, is not valid TOML, or does not validate.

    The message names the file, the field (dotted path) and how to fix it.
    """


class ReleasePolicy(BaseModel):
    """What a node may release besides the DP-SGD model update (the ``[releases]`` table).

    Every value computed from the node's records that leaves it is either the DP-SGD update,
    or one of these, released through a Gaussian mechanism whose cost is recorded in the same
    ledger (:mod:`privacy.releases`), or ``energy``, which is not a DP release and is off unless the
    policy opts in. The defaults release nothing extra.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_examples_granularity: int = Field(
        default=1,
        ge=1,
        le=1_000_000,
        description=(
            "Replies report the site's released record count (see count_noise_multiplier) rounded to a multiple "
            "of this (1 = not rounded, the default). What else leaves and follows the count (DP-SGD's steps and "
            "sample rate, the noise calibrated for them, the noise scale of the update, the site's delta and so the "
            "reported epsilon) is derived from the released, rounded count (a reply's timing and its energy-j "
            "still follow the exact count). FedAvg weights sites by it."
        ),
    )
    count_noise_multiplier: float = Field(
        default=10.0,
        ge=1.0,
        le=1e6,
        allow_inf_nan=False,
        description=(
            "Gaussian noise std, in records, of the site's record count: a DP-run node releases the count of its "
            "training records (and, with local_evaluation = \"dp\", of its test records) once per data set, "
            "noised and accounted in the ledger (mechanism gaussian-count, sensitivity 1), and every reply reuses "
            "that value. 10 costs about 1 % of an epsilon-3 budget."
        ),
    )
    train_loss: Literal["off", "dp"] = Field(
        default="off",
        description=(
            '"dp": train replies carry the training loss of the updated model, mean of per-record losses '
            'clipped to [0, bound], with Gaussian noise, accounted in the ledger. "off": no loss leaves.'
        ),
    )
    local_evaluation: Literal["off", "dp"] = Field(
        default="off",
        description=(
            '"off": evaluate messages are refused (score runs on coordinator-held data). "dp": the node '
            "scores the coordinator's model on its own test split and releases noised, clipped metric means "
            "(accuracy and loss; forecasting: the MAE ratio to the naive forecast), accounted in the ledger."
        ),
    )
    metric_noise_multiplier: float = Field(
        default=10.0,
        ge=1.0,
        le=1e6,
        allow_inf_nan=False,
        description=(
            "Gaussian noise std of each released metric sum, in units of one record's largest contribution "
            "(a mean over n records gets noise std metric_noise_multiplier/n of its range)."
        ),
    )
    max_evaluations_per_run: int = Field(
        default=5,
        ge=0,
        le=10_000,
        description=("Evaluate messages of one run this node answers (local_evaluation = \"dp\"); later ones are "
                     "refused. One run's cap: the coordinator names runs, so across runs the lifetime max_epsilon "
                     "binds (each evaluation is an accounted release)."),
    )
    energy: Literal["off", "sent"] = Field(
        default="off",
        description=(
            '"off" (the default): replies carry no energy figure. "sent": train and evaluate replies carry '
            "energy-j (the task's joules, two significant figures) and energy-method, for the coordinator's "
            "per-site and per-run energy tables. Not a DP release and not in the ledger: the figure is measured "
            "from the task's compute, which follows the site's exact record count and, under DP-SGD's Poisson "
            "sampling, each round's realised batch sizes (which the accountant assumes stay hidden); one figure "
            "per reply, so a coordinator can average them over rounds. Opt in only if that is acceptable for "
            "this site. $CITYFED_ENERGY=off on the node turns it off whatever this says."
        ),
    )


class PrivacyPolicy(BaseModel):
    """Privacy policy of one department node (loaded from TOML by :func:`load_policy`).

    Types are strict (``max_rounds_per_run = 5.0`` or ``max_epsilon = "8"`` are errors),
    unknown keys are errors, and ``inf``/``nan`` are refused.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    department: Literal["health", "traffic", "utility"] = Field(
        description="Department that owns this node; jobs for another department are refused."
    )
    max_epsilon: float = Field(
        gt=0,
        le=MAX_EPSILON,
        allow_inf_nan=False,
        description=(
            "Lifetime epsilon budget of this node, across all runs and restarts. At most 100: beyond that "
            "the budget protects nothing (typical budgets are 1-10)."
        ),
    )
    delta: float | None = Field(
        default=None,
        gt=0,
        le=1e-3,  # MAX_DELTA
        allow_inf_nan=False,
        description=(
            "Optional ceiling on delta. Each site accounts epsilon at delta = 1/(10·n) for its n training "
            "records (1e-3 for a site of fewer than 100), or at this value where it is smaller. At most 1e-3: a "
            "larger delta permits leaking a record outright."
        ),
    )
    min_noise_multiplier: float = Field(
        ge=0,
        allow_inf_nan=False,
        description="Jobs with a lower DP-SGD noise multiplier (noise std / clipping norm) are refused.",
    )
    max_clipping_norm: float = Field(
        gt=0,
        allow_inf_nan=False,
        description="Jobs with a larger per-sample gradient clipping norm are refused.",
    )
    allowed_tasks: list[str] = Field(
        min_length=1,
        description='Task names this node accepts, e.g. ["heart-disease"].',
    )
    max_rounds_per_run: int = Field(
        ge=1,
        le=1_000_000,
        description=("Highest server round (1-based) of one run this node takes part in (at most 1,000,000), and the "
                     "most times one run "
                     "trains on this node: the run's trainings in the ledger, replayed rounds included, are counted "
                     "(clients.node.check_run_cap, and again inside the ledger write that records the round, so two "
                     "processes of one node cannot both pass it), so leave headroom above a run's rounds for replays "
                     "after a crash. "
                     "One run's cap: the coordinator names runs, so across runs the lifetime max_epsilon binds."),
    )
    require_dp: bool = Field(
        default=True,
        description=(
            "When true, a job with DP switched off is refused. When false, such a job is accepted and recorded in the "
            "ledger as a 'non-private' release: from then on the site's epsilon is infinite and every DP job, "
            "evaluation or DP personalisation is refused (no finite guarantee holds for records that left without "
            "noise)."),
    )
    require_secure_aggregation: bool = Field(
        default=False,
        description=(
            "When true, this node's model update leaves only masked by secure aggregation (Flower's SecAgg+: the "
            "coordinator sees only the sum of several nodes' updates): a plain train message (a run with "
            "secagg = false, fl-server --no-secagg) is refused before any training or ledger row. False (the "
            "default): the coordinator's run decides, and without SecAgg+ it sees this node's DP-noised update."
        ),
    )
    min_secagg_num_shares: int = Field(
        default=3,
        ge=3,
        le=1023,
        description=(
            "SecAgg+ runs: the fewest shares of this node's mask secrets the coordinator may ask for (its "
            "secagg-num-shares: the node masks with that many - 1 neighbours; odd, as Flower requires). A run "
            "asking for fewer is left at its setup stage, before any key or record is used. The share-keys stage "
            "must then name at least max(2, this - 1) other nodes, or the node leaves the round before training: "
            "neighbours that drop out after setup (or a coordinator that names fewer) cannot shrink its masking "
            "below that. The neighbours' keys come from the coordinator: nodes it registered itself count."
        ),
    )
    min_secagg_threshold: int = Field(
        default=2,
        ge=2,
        le=1022,
        description=(
            "SecAgg+ runs: the fewest shares needed to reconstruct this node's secrets (the coordinator's "
            "secagg-threshold; fewer colluding neighbours cannot unmask its update, against a coordinator that "
            "follows the protocol). A run with a lower threshold is left at its setup stage."
        ),
    )
    central_max_clipping_norm: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description=(
            "Central-DP runs (run config central-dp = true): the largest L2 norm of the model update (new weights - "
            "the coordinator's weights) this node sends. The node clips its update to the smaller of this and the "
            "coordinator's central-clipping-norm (the coordinator can ask for less, never more). Unset: the "
            "coordinator's norm. Central DP never replaces this node's own DP-SGD (require_dp still applies)."
        ),
    )
    accountant: Literal["rdp", "prv"] = Field(
        default="rdp",
        description=(
            'How this node computes epsilon from its ledger, for its budget checks, the epsilon it reports and '
            'the noise it calibrates for a run\'s target-epsilon: "rdp" (Renyi DP, the default) or "prv" (Opacus\' '
            "PRV accountant, its conservative upper bound, never above RDP's: about 10 % lower epsilon, so less "
            "noise for the same target). Applies to the whole ledger, past releases included. Only the node's "
            "policy sets it; the coordinator cannot."
        ),
    )
    personalisation: bool = Field(
        default=False,
        description=(
            "When true, the node answers a run's final 'personalise' message: it fine-tunes the run's final "
            "model on its own training records (DP-SGD when the run is private, its noise calibrated with the "
            "run's rounds so that the run's target-epsilon covers both), keeps the personalised model in its "
            "own folder and records the release in its ledger (mechanism 'personalisation'); nothing derived "
            "from the records is sent back. False (the default): the message is refused and no budget is "
            "reserved for it."
        ),
    )
    releases: ReleasePolicy = Field(
        default_factory=ReleasePolicy,
        description="What may leave the node besides the model update (the [releases] table).",
    )

    @field_validator("min_secagg_num_shares")
    @classmethod
    def _odd_shares(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd, as Flower's SecAgg+ runs only with an odd number of shares; "
                             f"fix: set min_secagg_num_shares = {value + 1} (or {value - 1}, a weaker minimum)")
        return value

    def site_delta(self, n_records: int) -> float:
        """Delta of a site with ``n_records`` training records: ``min(1/(10·n), 1e-3, delta)``.

        Parameters
        ----------
        n_records : int
            The site's training records (at least 1 is assumed).

        Returns
        -------
        float
        """
        per_site = default_site_delta(n_records)  # never above MAX_DELTA, the ceiling `delta` has too
        return per_site if self.delta is None else min(per_site, float(self.delta))


#: The largest delta cityfed accounts at (a policy's ``delta`` may not exceed it either): a larger one
#: permits leaking a record outright.
MAX_DELTA = 1e-3


def default_site_delta(n_records: int) -> float:
    """``min(1/(10·n), MAX_DELTA)`` for ``n = n_records`` (at least 1): a site's delta when its policy sets none.

    :meth:`PrivacyPolicy.site_delta` and :func:`privacy.dp.default_delta` use it; a site of fewer
    than 100 training records gets :data:`MAX_DELTA`.
    """
    return min(1.0 / (10.0 * max(int(n_records), 1)), MAX_DELTA)


class JobRequest(BaseModel):
    """What the coordinator's train message asks this node to do.

    Unknown keys are errors: a knob the node does not understand must not silently weaken
    privacy.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    department: str = Field(description="Department the job is meant for.")
    task: str = Field(description="Task name, checked against the policy's allowed_tasks.")
    run_id: str = Field(min_length=1, description="Federated run id.")
    round: int = Field(ge=0, description="Server round (Flower's 1-based server_round).")
    dp: bool = Field(description="Whether DP-SGD is on.")
    noise_multiplier: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="DP-SGD noise multiplier (None when DP is off)."
    )
    clipping_norm: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="Per-sample clipping norm (None when DP is off)."
    )
    sample_rate: float = Field(ge=0, le=1, description="Poisson sampling rate: 1 / ceil(n / batch-size) of the count the "
                               "node may reveal (clients.node.public_count).")
    steps: int = Field(ge=0, description="Number of noisy optimizer steps this round will take.")


class Decision(NamedTuple):
    """Outcome of :func:`check_job`.

    Attributes
    ----------
    accepted : bool
        Whether the node may train.
    reason : str
        Human-readable reason naming the policy field involved.
    epsilon_before : float
        The site's epsilon now (at the policy's delta).
    epsilon_after : float
        Accepted: the projected epsilon once this round is released (``inf`` for an
        accepted non-DP job). Refused on budget: the projected epsilon that was refused.
        Other refusals: equal to ``epsilon_before`` (nothing will be released).
    """

    accepted: bool
    reason: str
    epsilon_before: float
    epsilon_after: float


# -- loading --------------------------------------------------------------------------------

_FIXES: dict[str, str] = {
    "department": 'set the node\'s department, one of "health", "traffic", "utility", e.g. department = "health"',
    "max_epsilon": (
        f"set a positive budget of at most {MAX_EPSILON:g}, e.g. max_epsilon = 8.0 (typical budgets are 1-10; at "
        f"epsilon {MAX_EPSILON:g} the guarantee is void, so larger values are refused as typos)"
    ),
    "delta": "remove it (each site then uses 1/(10·n)) or set a stricter ceiling, at most 1e-3, e.g. delta = 1e-5",
    "min_noise_multiplier": "set a number >= 0, e.g. min_noise_multiplier = 0.8",
    "max_clipping_norm": "set a positive, finite number, e.g. max_clipping_norm = 1.0",
    "allowed_tasks": 'list at least one task name as strings, e.g. allowed_tasks = ["heart-disease"]',
    "max_rounds_per_run": "set a whole number >= 1 (no decimal point), e.g. max_rounds_per_run = 50",
    "require_dp": "set true or false (unquoted), e.g. require_dp = true",
    "require_secure_aggregation": (
        "set true or false (unquoted), e.g. require_secure_aggregation = true (true: this node's update leaves "
        "only masked by SecAgg+, and runs without it are refused), or remove it (default false)"
    ),
    "min_secagg_num_shares": (
        "set an odd whole number from 3 to 1023 (no decimal point), e.g. min_secagg_num_shares = 5, or remove it "
        "(default 3)"
    ),
    "min_secagg_threshold": (
        "set a whole number from 2 to 1022 (no decimal point), e.g. min_secagg_threshold = 3, or remove it (default 2)"
    ),
    "personalisation": (
        "set true or false (unquoted), e.g. personalisation = true, or remove it (default false: the node refuses "
        "to personalise)"
    ),
    "central_max_clipping_norm": "set a positive, finite number, e.g. central_max_clipping_norm = 1.0, or remove it",
    "accountant": 'set "rdp" (Renyi DP, the default) or "prv" (tighter), e.g. accountant = "prv"',
    "releases": (
        'see [releases] in examples/policies/health.toml: num_examples_granularity = 1, count_noise_multiplier >= 1, '
        'train_loss = "off" '
        'or "dp", local_evaluation = "off" or "dp", metric_noise_multiplier >= 1, max_evaluations_per_run >= 0'
    ),
}


#: Longest form of a value a message shows (a policy field, a key, a job's department or task): longer
#: ones are cut, so a 100,000-character entry makes one readable line, not a 100 KB one.
SHOWN_MAX = 60


def shown_value(value: Any, limit: int = SHOWN_MAX) -> str:
    """``repr(value)``, cut to ``limit`` characters (ending ``...``) when it is longer.

    Parameters
    ----------
    value : Any
        The value to show: a string, a list of task names, a number.
    limit : int
        The most characters returned.

    Returns
    -------
    str
    """
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(err: dict[str, Any]) -> str:
    """Short, plain wording for one pydantic error."""
    etype = err.get("type", "")
    ctx = err.get("ctx") or {}
    if etype == "missing":
        return "is required but missing"
    if etype == "extra_forbidden":
        return "is not a policy field"
    for key, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
        if etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and key in ctx:
            bound = ctx[key]
            return f"must be {op} {bound:g}" if isinstance(bound, (int, float)) else f"must be {op} {bound}"
    if etype == "finite_number":
        return "must be a finite number (not inf or nan)"
    if etype == "too_short":
        return "must not be empty"
    return str(err.get("msg", "is invalid")).replace("Input should be", "must be")


def _format_validation(source: str, exc: ValidationError) -> str:
    """One line per pydantic error: file, dotted field, what is wrong, the value found, and one fix.

    A field validator's ``ValueError`` is shown without pydantic's ``"Value error, "`` prefix, without a
    ``(got ...)`` of its own (the value is added once, here) and with its ``fix: ...`` tail, if any, as
    the line's single ``Fix:``. A key in the wrong table (a top-level key written after the
    ``[releases]`` line, or a ``[releases]`` setting at top level) is told to move, not to go.
    """
    lines = []
    allowed = list(PrivacyPolicy.model_fields)
    top_level = [f for f in allowed if f != "releases"]
    in_releases = list(ReleasePolicy.model_fields)
    for err in exc.errors():
        loc_parts = [str(p) for p in err.get("loc", ())]
        loc = ".".join(loc_parts) or "<document>"
        top = loc_parts[0] if loc_parts else ""
        etype = str(err.get("type", ""))
        described, own_fix = _describe(err), None
        if etype in ("value_error", "assertion_error"):
            described = str(err.get("msg", "is invalid")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if "input" in err:  # the value is shown once, below; first, so a value reading "; fix:" splits nothing
                for shown in {repr(err["input"]), str(err["input"])}:
                    described = described.replace(f" (got {shown})", "").replace(f"(got {shown})", "")
            head, sep, tail = described.partition("; fix:")
            if not sep:
                head, sep, tail = described.partition("; Fix:")
            if sep and tail.strip():
                described, own_fix = head, tail.strip().rstrip(".")
            described = described.strip().rstrip(";:,.") or "is invalid"
        fix = own_fix or _FIXES.get(top, "see the field descriptions in privacy/policy.py")
        if etype == "extra_forbidden":
            if len(loc_parts) == 2 and top == "releases" and loc_parts[1] in top_level:
                described = "is not a [releases] setting"
                fix = ("this is a top-level policy key: move it above the [releases] table (TOML puts every key "
                       "written after the [releases] line into that table, e.g. a line appended at the end of the file)")
            elif len(loc_parts) == 1 and top in in_releases:
                described = "is not a top-level policy key"
                fix = ("this is a [releases] setting: move it under the [releases] table (after the [releases] line; "
                       "add that line at the end of the file if there is none)")
            else:
                name, known = (loc_parts[-1], in_releases) if len(loc_parts) > 1 and top == "releases" \
                    else (top, allowed)
                close = difflib.get_close_matches(name, known, n=1)
                fix = f"remove it{f' (did you mean {close[0]!r}?)' if close else ''}; allowed fields: {', '.join(known)}"
        text = f"{source}: field {shown_value(loc)}: {described}"
        if etype != "missing" and "input" in err:
            got = err["input"]
            shown = shown_value(got)
            name = type(got).__name__
            kind = f", {'an' if name[0] in 'aeiou' else 'a'} {name}" if etype.endswith("_type") else ""
            text += f" (got {shown}{kind})"
        lines.append(f"{text}. Fix: {fix}")
    return "\n".join(lines)


def parse_policy(text: str, source: str = "<string>") -> PrivacyPolicy:
    """Parse and validate a policy from TOML text.

    Parameters
    ----------
    text : str
        TOML document with the policy fields at top level.
    source : str
        Name used in error messages (normally the file path).

    Raises
    ------
    PolicyError
        Invalid TOML (message gives line and column) or invalid fields (one line per
        problem: file, dotted field, what is wrong, the value found, and a fix).
    """
    try:
        data = load_toml(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(
            f"{source}: not valid TOML: {exc}. Fix: correct the syntax at that line/column "
            '(strings need double quotes, e.g. department = "health").'
        ) from exc
    try:
        return PrivacyPolicy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_format_validation(source, exc)) from exc


def load_policy(path: str | os.PathLike) -> PrivacyPolicy:
    """Load and validate a policy TOML file.

    Parameters
    ----------
    path : str or os.PathLike
        The policy file.

    Returns
    -------
    PrivacyPolicy

    Raises
    ------
    PolicyError
        Missing/unreadable file, invalid TOML or invalid fields; the message names the file,
        the field and the fix, e.g. ``policy.toml: field 'max_epsilon': must be > 0 (got -1). Fix: set a positive, finite budget, e.g. max_epsilon = 8.0``.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise PolicyError(
            f"{p}: cannot read policy file: {exc.strerror or exc}. "
            "Fix: pass the path of an existing TOML policy (see examples/policies/)."
        ) from exc
    if raw.startswith(UTF8_BOM):
        raise PolicyError(f"{p}: the file starts with a byte-order mark (BOM), which TOML does not allow. "
                          f"Fix: {BOM_FIX}.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{p}: not UTF-8 text ({exc}). Fix: save the policy as UTF-8 TOML.") from exc
    return parse_policy(text, str(p))


def check_allowed_tasks(policy: PrivacyPolicy, task: str, source: str = "<policy>") -> None:
    """Refuse a policy whose ``allowed_tasks`` does not list its department's task.

    Such a node would refuse every job ("task not in policy allowed_tasks") while looking
    healthy; ``fl-client`` calls this at start-up (exit 2) so a typo is found before the first
    run, not in the coordinator's logs.

    Parameters
    ----------
    policy : PrivacyPolicy
    task : str
        The department's task name (``contract.tasks.TASKS[policy.department]``).
    source : str
        The policy file, for the message.

    Raises
    ------
    PolicyError
        Naming the file, the field, the missing task, the closest listed name ("did you
        mean") and the fix. The listed names are shown cut to 60 characters.
    """
    if task in policy.allowed_tasks:
        return
    close = difflib.get_close_matches(task, policy.allowed_tasks, n=1, cutoff=0.6)
    hint = f" (did you mean {task!r} instead of {shown_value(close[0])}?)" if close else ""
    raise PolicyError(
        f"{source}: field 'allowed_tasks': {shown_value(policy.allowed_tasks)} does not list {task!r}, the task of "
        f"department {policy.department!r}{hint}; this node would refuse every job. "
        f"Fix: write allowed_tasks = [\"{task}\"]"
    )


# -- checking -------------------------------------------------------------------------------


def job_conflict(policy: PrivacyPolicy, *, department: str, task: str, dp: bool, noise_multiplier: float | None,
                 clipping_norm: float | None, round: int = 0) -> tuple[str, str] | None:
    """The first of the policy's fixed checks a job fails, as ``(setting, reason)``, else None.

    The checks that need neither data nor ledger, in :func:`check_job`'s order: department,
    task, round above ``max_rounds_per_run``, DP off under ``require_dp``, noise multiplier
    missing or below ``min_noise_multiplier``, clipping norm missing or above
    ``max_clipping_norm``. ``check_job`` applies them on the node; ``fl-sim`` applies them up
    front, so that a run every node would refuse is not started.

    Parameters
    ----------
    policy : PrivacyPolicy
    department, task : str
    dp : bool
    noise_multiplier, clipping_norm : float or None
        Ignored when ``dp`` is off.
    round : int
        The job's round (0: not checked against ``max_rounds_per_run``).

    Returns
    -------
    tuple of (str, str) or None
        The setting that conflicts (``department``, ``task``, ``round``, ``dp``,
        ``noise_multiplier``, ``clipping_norm``) and the reason, or None. The reason shows the
        job's department or task and the policy's ``allowed_tasks`` cut to 60 characters.
    """
    if department != policy.department:
        return "department", f"department {shown_value(department)} != policy department {policy.department!r}"
    if task not in policy.allowed_tasks:
        return "task", f"task {shown_value(task)} not in policy allowed_tasks {shown_value(policy.allowed_tasks)}"
    if round > policy.max_rounds_per_run:
        return "round", f"round {round} > policy max_rounds_per_run {policy.max_rounds_per_run}"
    if not dp:
        return ("dp", "dp is off but policy require_dp = true") if policy.require_dp else None
    if noise_multiplier is None:
        return "noise_multiplier", f"noise_multiplier missing, policy min_noise_multiplier is {policy.min_noise_multiplier:g}"
    if noise_multiplier < policy.min_noise_multiplier:
        return ("noise_multiplier",
                f"noise_multiplier {noise_multiplier:g} < policy min_noise_multiplier {policy.min_noise_multiplier:g}")
    if clipping_norm is None:
        return "clipping_norm", f"clipping_norm missing, policy max_clipping_norm is {policy.max_clipping_norm:g}"
    if clipping_norm > policy.max_clipping_norm:
        return "clipping_norm", f"clipping_norm {clipping_norm:g} > policy max_clipping_norm {policy.max_clipping_norm:g}"
    return None


def secagg_conflict(policy: PrivacyPolicy, *, secagg: bool, num_shares: int | None = None,
                    threshold: int | None = None) -> tuple[str, str] | None:
    """The first of the policy's secure-aggregation settings a run fails, as ``(setting, reason)``, else None.

    The node applies it to every train message (:mod:`clients.secagg`: a plain one, or SecAgg+'s
    setup stage with the coordinator's shares and threshold); ``fl-sim`` applies it up front.

    Parameters
    ----------
    policy : PrivacyPolicy
    secagg : bool
        Whether the node's update would leave masked by SecAgg+.
    num_shares, threshold : int, optional
        The run's ``secagg-num-shares`` and ``secagg-threshold`` (SecAgg+ only; None: not known yet).

    Returns
    -------
    tuple of (str, str) or None
        ``("require_secure_aggregation" | "min_secagg_num_shares" | "min_secagg_threshold", reason)``.
    """
    if not secagg:
        if policy.require_secure_aggregation:
            return ("require_secure_aggregation", "this node's policy requires secure aggregation "
                    "(require_secure_aggregation = true) and the run sends its update unmasked (secagg = false)")
        return None
    if num_shares is not None and num_shares < policy.min_secagg_num_shares:
        return ("min_secagg_num_shares", f"the run's SecAgg+ secagg-num-shares {num_shares} < policy "
                f"min_secagg_num_shares {policy.min_secagg_num_shares}")
    if threshold is not None and threshold < policy.min_secagg_threshold:
        return ("min_secagg_threshold", f"the run's SecAgg+ secagg-threshold {threshold} < policy "
                f"min_secagg_threshold {policy.min_secagg_threshold}")
    return None


def check_job(policy: PrivacyPolicy, job: JobRequest, ledger: PrivacyLedger, site: str, *, delta: float,
              extra: list[Release] | tuple[Release, ...] = ()) -> Decision:
    """Decide whether ``site`` may run ``job`` under ``policy``.

    Checks, in order (the first failure is the reason): department mismatch, task not
    allowed, round > ``max_rounds_per_run``, DP off while ``require_dp``, noise multiplier
    missing or < ``min_noise_multiplier``, clipping norm missing or > ``max_clipping_norm``,
    projected epsilon (:meth:`PrivacyLedger.projected_epsilon` at the site's ``delta``, the
    DP-SGD round plus the ``extra`` releases planned with it, by the policy's ``accountant`` over
    the ledger's whole history) > ``max_epsilon``.

    Parameters
    ----------
    policy : PrivacyPolicy
    job : JobRequest
    ledger : PrivacyLedger
        The node's ledger; only read here. On acceptance the caller records the round with
        ``ledger.begin(...)`` (pass ``max_epsilon``/``delta`` to re-check the budget
        atomically against concurrent processes).
    site : str
        The node's site id in the ledger.
    delta : float
        The site's delta (:meth:`PrivacyPolicy.site_delta` of its training records).
    extra : sequence of Release
        Further releases of the same round that must fit the budget too (a DP training loss).

    Returns
    -------
    Decision

    Notes
    -----
    A non-DP job that the policy allows (``require_dp = false``) is accepted without the
    noise, clipping and budget checks; its ``epsilon_after`` is ``inf`` because a non-DP
    release has no finite privacy guarantee. The node records it in the ledger as a
    ``non-private`` release (:data:`privacy.ledger.MECHANISMS`), so the site's epsilon stays
    infinite and every later DP job is refused here: no finite guarantee can be claimed for
    records that already left without noise.
    """
    before = ledger.epsilon(site, delta, policy.accountant)

    def refuse(reason: str, after: float | None = None) -> Decision:
        return Decision(False, "refused: " + reason, before, before if after is None else after)

    conflict = job_conflict(policy, department=job.department, task=job.task, dp=job.dp,
                            noise_multiplier=job.noise_multiplier, clipping_norm=job.clipping_norm, round=job.round)
    if conflict is not None:
        return refuse(conflict[1])
    if not job.dp:
        return Decision(True, "accepted: dp is off, allowed by policy require_dp = false (recorded as a non-private "
                        "release: the site's epsilon is infinite from now on)", before, math.inf)
    if math.isinf(before):
        return refuse(f"this site's records already left without DP (a non-private release in the ledger, allowed by "
                      f"policy require_dp = false): its epsilon is infinite, so no DP release stays within max_epsilon "
                      f"{policy.max_epsilon:g}; a DP guarantee needs a site whose records never left without noise",
                      math.inf)
    release = Release(
        noise_multiplier=float(job.noise_multiplier),
        sample_rate=float(job.sample_rate),
        steps=int(job.steps),
        delta=delta,
        run_id=job.run_id,
        round=int(job.round),
        site=site,
        department=policy.department,
        accountant=policy.accountant,
    )
    after = ledger.projected_epsilon(site, release, *extra, accountant=policy.accountant)
    if after > policy.max_epsilon:
        return refuse(
            f"projected epsilon {after:.4g} (now {before:.4g}, delta {delta:.3g}, {policy.accountant.upper()}) > policy max_epsilon "
            f"{policy.max_epsilon:g}",
            after,
        )
    return Decision(
        True,
        f"accepted: projected epsilon {after:.4g} <= policy max_epsilon {policy.max_epsilon:g} (delta {delta:.3g}, "
        f"{policy.accountant.upper()})",
        before,
        after,
    )
