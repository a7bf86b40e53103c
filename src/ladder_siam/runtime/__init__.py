"""What every training loop needs, whatever it trains.

Checkpoints and the one resume rule (:mod:`.checkpoint`, :mod:`.resume`), the run folder's
layout (:mod:`.run_folder`), torchrun/DDP setup (:mod:`.distributed`), progress bars and pod
log lines (:mod:`.progress`), Prometheus metrics (:mod:`.metrics`), MLflow runs
(:mod:`.tracking`), NaN and collapse checks (:mod:`.health`), the JSONL training log
(:mod:`.train_log`), config-to-flags (:mod:`.flags`), LARS (:mod:`.optim`) and learning-rate
and EMA schedules (:mod:`.schedules`). It builds on :mod:`ladder_siam.io` only.
"""
