"""The job contract between the coordinator and the department nodes.

What both sides must agree on, in one neutral package that imports neither ``server`` nor
``clients`` (both import it; ``tests/test_contract.py`` checks that the server package imports
nothing from the client package):

* :mod:`contract.keys`: run-config and node-config keys (:data:`~contract.keys.NODE_KEYS`,
  the job-config keys a train/evaluate/personalise message carries);
* :mod:`contract.tasks`: the task per department, record and message names, the reply metric
  names and the metric whitelists of each reply;
* :mod:`contract.energy`: the energy figures a reply may carry and their method codes.
* :mod:`contract.text_files`: how a reader of a user's TOML or key file names a UTF-8
  byte-order mark (one wording for node and coordinator);
* :mod:`contract.text`: a peer's free text (a node's refusal reason) escaped and cut before it is
  logged, stored or printed;
* :mod:`contract.files`: the one atomic file write (temporary file, fsync, rename).
"""
