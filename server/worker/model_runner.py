"""Owns the model and the KV tensors; turns a ``SchedulerOutput`` into one forward and sampled tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kernels import SeqAttention, build_metadata
from server.cache.kv_manager import KVManager
from server.engine.scheduler import SchedulerOutput
from server.models.llama import LlamaModel
from server.worker.sampling import new_generator, sample_token

log = logging.getLogger(__name__)


@dataclass
class RunnerOutput:
    new_tokens: dict[str, list[int]] = field(default_factory=dict)  # committed tokens per request


def kv_bytes_per_token(model: LlamaModel, dtype: torch.dtype) -> int:
    c = model.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * torch.tensor([], dtype=dtype).element_size()


class ModelRunner:
    def __init__(self, model: LlamaModel, kv: KVManager, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model
        self.kv = kv
        self.device = torch.device(device)
        c = model.config
        shape = (kv.pool.num_blocks, kv.block_size, c.num_key_value_heads, c.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                           torch.zeros(shape, dtype=dtype, device=self.device))
                          for _ in range(c.num_hidden_layers)]
        self.generators: dict[str, torch.Generator] = {}
        log.info("KV cache: %d blocks x %d slots (%.1f MiB)", kv.pool.num_blocks, kv.block_size,
                 kv.capacity_tokens * kv_bytes_per_token(model, dtype) / 2**20)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run every scheduled request's uncomputed tokens in one forward and sample one token each."""
        ids, positions, seqs = [], [], []
        for s in sched.scheduled:
            req = s.request
            start = req.num_computed_tokens
            ids.extend(req.token_ids[start:])
            positions.extend(range(start, len(req.token_ids)))
            seqs.append(SeqAttention(self.kv.block_table(req.request_id), start, len(req.token_ids) - start))
        meta = build_metadata(seqs, self.kv.block_size, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                            self.kv_caches, meta)                                 # [T, hidden]
        last = torch.tensor([s.num_new for s in seqs], device=self.device).cumsum(0) - 1  # [B]
        logits = self.model.compute_logits(hidden[last]).float()                  # [B, V]
        out = RunnerOutput()
        for row, s in zip(logits, sched.scheduled):
            req = s.request
            gen = self.generators.get(req.request_id)
            if gen is None:
                gen = self.generators[req.request_id] = new_generator(req.params.seed)
            out.new_tokens[req.request_id] = [sample_token(row, req.params, gen)]
        return out

    def release(self, request_id: str) -> None:
        """Forget per-request state when a request ends."""
        self.generators.pop(request_id, None)
