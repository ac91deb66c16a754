"""Neighbour methods on Video-OPD's loop, each a `score` and a `loss_fn` for opd.train, run as modules from the
project root: `python -m neighbours.va_opd` (VA-OPD), `python -m neighbours.visd` (VISD), `python -m
neighbours.tempo` (TEMPO), also under `torchrun --nproc_per_node N -m neighbours.visd ...`."""
