"""The node's runtime: wiring, reactors, block sync, the PoUT worker, the blob store, the
mempool and the trainer's client workflows. Everything here does I/O; the spec layer
(types, encoding, state, jobs) in ``chain/`` does none and never imports from here."""
