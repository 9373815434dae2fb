"""Run-config, node-config and job-config keys shared by the coordinator and the nodes.

The coordinator validates a run config (:class:`server.app.RunSettings`) and sends each node
a *job config* (the ``"config"`` record of every train, evaluate and personalise message,
:data:`JOB_KEYS`); a node reads its own settings from its node config (:data:`NODE_KEYS`), which
the coordinator passes through unchecked and a department node never takes from the
coordinator.
"""

from __future__ import annotations

#: Run/node config keys read only by department nodes (the ServerApp passes them through). A
#: department node (``fl-client``: its node config names the department) takes them from its
#: node config only, never from the coordinator's run config (:func:`clients.node.node_from_config`).
#: ``data-seed``: seed of the node's train/test split of its records (health: a seeded random
#: draw per hospital; forecasting splits in time and ignores it); simulations set it to the run's seed.
NODE_KEYS = ("policy", "ledger", "ledger-dir", "data", "site", "dropout-probability", "virtual-sites", "partitioner",
             "dirichlet-alpha", "virtual-allow-empty", "partition-id", "num-partitions", "torch-threads", "audit-log",
             "audit-key", "data-seed")

#: Values of the job-config key ``optimizer`` (the rounds' local optimizer, :func:`clients.training.make_optimizer`).
OPTIMIZERS = ("adam", "sgd")

#: Strategies a run config may name (``server.strategy`` builds them; CLIs list them without importing Flower).
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "trimmed-mean", "krum", "fedavgm")

#: Job-config key: the run's identity (kept across resumes; nodes' ledgers record it).
RUN_ID = "run-id"
#: Job-config key: the round (Flower's strategies set it; the coordinator's own SecAgg+ and
#: personalise messages set it too).
SERVER_ROUND = "server-round"
#: Job-config key under SecAgg+: the model's parameter names, newline-joined (legacy ``FitIns``
#: configs hold scalars only, no lists).
PARAM_NAMES_KEY = "param-names"
#: Job-config key under SecAgg+: the L2 bound each node scales its own update to before masking
#: (the coordinator cannot check a masked update).
MAX_UPDATE_NORM = "max-update-norm"
#: Job-config keys of on-site personalisation (sent with every train message too, so that each
#: node reserves the personalisation's DP-SGD steps when it calibrates its rounds' noise).
PERSONALISE_KEYS = ("personalise-epochs", "personalise-lr", "personalise-layers", "personalise-mu", "personalise-batch-size",
                    "personalise-own-lr", "personalise-own-batch-size")
#: Job-config keys of a central-DP run that state the coordinator's *claimed* guarantee, by the
#: name the node's ledger stores them under (:meth:`privacy.ledger.PrivacyLedger.record_central`).
CENTRAL_CLAIM_KEYS = {"noise_multiplier": "central-noise-multiplier", "sample_rate": "central-sample-rate",
                      "epsilon": "central-epsilon-claimed", "delta": "central-delta",
                      "accountant": "central-accountant"}

#: Every key a job config may carry (besides Flower's own central-DP ``clipping_norm``): what
#: the coordinator sends and the only run-level keys a node reads from a message.
JOB_KEYS = ("department", "task", "model", RUN_ID, SERVER_ROUND, "local-epochs", "batch-size", "lr", "optimizer", "dp",
            "clipping-norm", "num-rounds", "seed", "noise-multiplier", "target-epsilon", "proximal-mu",
            MAX_UPDATE_NORM, PARAM_NAMES_KEY, *PERSONALISE_KEYS, *CENTRAL_CLAIM_KEYS.values())


#: SecAgg+'s modulus: masks are drawn uniformly below it, and the masked sum is taken modulo it.
#: Flower's ``SecAggPlusWorkflow`` default; the coordinator sends it at the setup stage and a node
#: accepts no other value (a modulus of 2 makes every mask 0, so the "masked" vector would be the
#: node's quantised update in the clear).
SECAGG_MOD_RANGE = 1 << 32
#: The fewest neighbours a node masks its update with. Flower (1.42) folds each 32-byte mask seed
#: to 32 bits, so with one neighbour the pairwise mask is one of 2**32 values, a search within
#: reach of a coordinator that learns the node's own mask seed at the unmask stage (the protocol
#: gives it that seed for a node whose vector arrived); with two, 2**64.
SECAGG_MIN_NEIGHBOURS = 2
