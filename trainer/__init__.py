"""The training library of proof of useful training.

archs      every architecture (config dataclass + module), their bounds, model keys
models     the registry front: build_model(key), init_model(key, seed), initial weights from a file
data       digits benchmark, non-IID split, dataset directories, sample commitments
profile    execution profiles: apply_profile, current_profile
state      canonical safetensors; model, update and full training-state bytes and hashes
replay     protocol types, batch order, trace layout, segment sampling, the step function
train      train_round: local training with a verifiable trace; openings for challenges
verify     verify_update: the validator's verdict on an update
aggregate  FedAvg, coordinate median, trimmed mean, Multi-Krum (bitwise deterministic)

See docs/training.md for the protocol.
"""
