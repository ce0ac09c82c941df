"""Start-up calibration's drafting cost with one token vs tau(n) tokens committed before each timed proposal.

Usage: OMP_NUM_THREADS=1 .venv/bin/python -m bench.draft_commit_ab
Builds the default engine (hybrid drafter, no calibration), then times ``measure_draft_cost`` at batch 1 and 4,
budgets 4 / 8 / 16, alternating ``tau = 1`` and ``tau = the drafter's acceptance profile`` for three rounds;
prints ms per proposal for each. Both arms copy their committed tokens from the request's own context.
"""
import torch

from server.build import build_engine
from server.config import ServerConfig
from server.engine.budget import tau_at
from server.worker.calibrate import measure_draft_cost

torch.set_num_threads(1)
eng, _ = build_engine(ServerConfig(calibrate_tree=False))
drafter, cfg = eng.runner.drafter, eng.runner.model.config
profile = drafter.acceptance_profile
print(drafter.name, profile)
for _ in range(3):
    for label, tau in (("k=1", lambda n: 1.0), ("k=tau", lambda n: tau_at(n, profile))):
        table = measure_draft_cost(drafter, cfg.hidden_size, cfg.vocab_size, [1, 4], [4, 8, 16], repeats=5, tau=tau)
        print(label, {b: {n: round(v * 1000, 2) for n, v in row.items()} for b, row in table.items()})
