"""Privacy building blocks: DP-SGD glue (Opacus), the department budget ledger and policy."""

#: Environment switch: "1" seeds DP-SGD's noise and sampling from the job's seed (reproducible
#: simulations on one machine; ``fl-sim`` sets it). Never on a department node: ``fl-client``
#: removes it from the node's environment. See :func:`privacy.dp.dp_seeds`. (Here, not in
#: ``privacy.dp``, so the command-line tools can name it without importing torch.)
SEED_FROM_JOB_ENV = "CITYFED_DP_SEED_FROM_JOB"
