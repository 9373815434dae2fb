"""DP-SGD noise multiplier per target epsilon under the RDP and PRV accountants (issue 12.3).

For each site of a department, the noise a node calibrates (``privacy.dp.calibrate_noise``) for
the department's federated job (``simulations.compare.FED_DEFAULTS``: rounds x local epochs,
batch size; Poisson rate q = 1 / ceil(n / batch)) at delta = 1/(10 n), under ``accountant =
"rdp"`` and ``"prv"``, with the policy's default releases (none besides the model). Also shows
the epsilon of the PRV noise by dp-accounting's PLD accountant (independent) and by RDP.

    .venv/bin/python benchmarks/accountant_noise.py --department health --epsilon 1 3 8
"""

from __future__ import annotations

import argparse
import math
import time
import warnings


#: Largest target epsilon (the policy's ceiling, privacy.policy.MAX_EPSILON: beyond it a budget protects nothing).
MAX_EPSILON = 100.0


def target_epsilon(text: str) -> float:
    """An ``--epsilon`` value: a finite number > 0 and <= :data:`MAX_EPSILON` (argparse ``type``).

    Parameters
    ----------
    text : str
        One value as given.

    Returns
    -------
    float

    Raises
    ------
    argparse.ArgumentTypeError
        Naming the value, what is allowed and a fix (argparse exits 2 with the option's name).
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_EPSILON):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number > 0 and <= {MAX_EPSILON:g} (a target "
                                         "epsilon); fix: e.g. --epsilon 1 3 8")
    return value


def main() -> None:
    from contract.tasks import TASKS  # light: the departments, before the slow imports below

    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--department", default="health", choices=sorted(TASKS), help="department (default: health)")
    ap.add_argument("--epsilon", type=target_epsilon, nargs="+", default=[1.0, 3.0, 8.0],
                    help=f"target epsilons, each a finite number > 0 and <= {MAX_EPSILON:g} (default: 1 3 8)")
    args = ap.parse_args()

    import dp_accounting

    from citydata import load_department
    from privacy.accounting import prv_epsilon, rdp_epsilon
    from privacy.dp import calibrate_noise
    from simulations.compare import FED_DEFAULTS

    job = FED_DEFAULTS[args.department]
    ds = load_department(args.department)
    print(f"{args.department}: {job['num-rounds']} rounds x {job['local-epochs']} local epochs, batch {job['batch-size']}, "
          "delta = 1/(10 n), no metric releases")
    print("| site | n | q | steps | epsilon | noise RDP | noise PRV | PRV / RDP | PRV eps (ledger) | PLD eps | "
          "RDP eps of PRV noise | calibration s (RDP / PRV) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for site in ds.sites:
        n = len(ds.site_data(site).train)
        per_epoch = math.ceil(n / job["batch-size"])
        q, steps, delta = 1.0 / per_epoch, job["num-rounds"] * job["local-epochs"] * per_epoch, 1.0 / (10 * n)
        for eps in args.epsilon:
            t0 = time.perf_counter()
            rdp = calibrate_noise(eps, delta, q, steps, accountant="rdp")
            t1 = time.perf_counter()
            prv = calibrate_noise(eps, delta, q, steps, accountant="prv")
            t2 = time.perf_counter()
            pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
            pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(prv)), steps)
            print(f"| {site} | {n} | {q:.4f} | {steps} | {eps:g} | {rdp:.3f} | {prv:.3f} | {prv / rdp:.3f} | "
                  f"{prv_epsilon([(prv, q, steps)], delta):.3f} | {pld.get_epsilon(delta):.3f} | "
                  f"{rdp_epsilon([(prv, q, steps)], delta):.3f} | {t1 - t0:.1f} / {t2 - t1:.1f} |")


if __name__ == "__main__":
    main()
