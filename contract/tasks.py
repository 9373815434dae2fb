"""Tasks, record and message names, and the reply metric whitelists.

A node sends back only the metric keys of its reply's whitelist (anything else is a leak by
definition; :func:`clients.app.whitelisted` refuses to send it); the coordinator aggregates
and records these keys.
"""

from __future__ import annotations

from contract.energy import ENERGY_METRICS

#: Task name per department (what policies list in ``allowed_tasks``; every job config names it).
TASKS = {"health": "heart-disease", "traffic": "traffic-forecast", "utility": "utility-forecast"}

#: Record names of a message's ``RecordDict`` (Flower's strategies' defaults, passed explicitly).
ARRAYS, METRICS, CONFIG = "arrays", "metrics", "config"
#: Action and message type of the coordinator's last step of a run, on-site personalisation
#: (``ClientApp.train(PERSONALISE_ACTION)`` answers ``PERSONALISE_MESSAGE``).
PERSONALISE_ACTION = "personalise"
PERSONALISE_MESSAGE = f"train.{PERSONALISE_ACTION}"

#: Error code of a reply to a job the node's privacy policy or budget refused (its reason says which setting).
REFUSED = 4031
#: Error code of a reply from a node without training records (nothing to send).
NO_DATA = 4041
#: Error code of a reply to a task the node could not complete for any other reason (a failure, not a
#: refusal: its cause stays in the node's own log).
FAILED = 5001

#: Reply metric: records used, rounded as the node's policy says (Flower's weighting key).
NUM_EXAMPLES = "num-examples"
#: Reply metric: the node's epsilon after the task (every release counted).
EPSILON = "epsilon"
#: Reply metric (simulation only): the node's partition, so reports can name its site.
PARTITION_ID = "partition-id"

#: The only metric keys of a train reply. ``train-loss`` leaves only as a DP release the node's
#: policy allows; the energy keys are the task's energy, not computed from records.
TRAIN_METRICS = (NUM_EXAMPLES, EPSILON, "noise-multiplier", "steps", "train-loss", PARTITION_ID) + ENERGY_METRICS
#: The only metric keys of an evaluate reply (``accuracy``/``loss`` or ``mae-ratio``: DP releases only).
EVAL_METRICS = (NUM_EXAMPLES, EPSILON, "accuracy", "loss", "mae-ratio", PARTITION_ID) + ENERGY_METRICS
#: The only metric keys of a personalise reply (no loss, no score: nothing computed from the records).
PERSONALISE_METRICS = (NUM_EXAMPLES, EPSILON, "noise-multiplier", "steps", PARTITION_ID)
